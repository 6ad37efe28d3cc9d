"""Online alignment in one process: every round samples k completions per prompt from the current policy,
labels them, writes them as a feedback file and trains on it, then checkpoints.

    <run_dir>/rounds/<r>/samples.jsonl     HALOs sample records (written atomically)
    <run_dir>/rounds/<r>/feedback.jsonl    the round's feedback, in the format datasets=[file] reads
    <run_dir>/rounds/judgments.jsonl       the LLM judge's cache, when the labeler is a judge
    <run_dir>/rounds/reward_per_round.png  the held-out reward per round (with online.eval_prompts)

Round r takes the r-th block of prompts_per_round prompts of a seeded permutation of the pool, so blocks
never overlap until the pool is used up (then a fresh permutation starts). The files are the resumable
state: a rerun with ++resume=true does not resample a round whose samples are on disk, nor relabel one
whose feedback is, nor retrain a round already trained (the checkpoint counts the rounds trained, and a
round cut short resumes at its data position). The optimizer and scheduler carry over from round to round.
With reference=previous the reference model is set to the policy at the start of each round (its weights
are then part of every checkpoint, so a resumed round keeps its reference).
"""
import json
import math
import os
import random
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from halos.errors import ConfigError
from halos.feedback import read_json_records, write_jsonl
from halos.labelling import build_feedback, label_samples
from halos.sampling import Sampler, sample_records
from utils import barrier, get_world_size, is_distributed, on_rank0, rank0_print

REFERENCES = ('fixed', 'previous')


@dataclass(frozen=True)
class OnlineSettings:
    """config.online, read once at the edge."""
    rounds: int
    prompts_per_round: int
    samples_per_prompt: int
    feedback: str
    pair_mode: str
    threshold: object
    per_prompt: bool
    reference: str
    seed: int

    @classmethod
    def of(cls, config) -> 'OnlineSettings':
        online = config.online
        if online.reference not in REFERENCES:
            raise ConfigError(f"online.reference={online.reference}: give fixed or previous")
        return cls(online.rounds, online.prompts_per_round, online.samples_per_prompt, online.feedback,
                   online.pair_mode, online.threshold, online.per_prompt, online.reference, config.seed)


def round_block(pool_size: int, prompts_per_round: int, round_index: int, seed: int) -> List[int]:
    """The pool indices of round `round_index`'s prompts: consecutive blocks of a seeded permutation, a fresh
    permutation (seed + pass) each time the pool is used up; a block never holds a prompt twice."""
    per_pass = max(1, pool_size // prompts_per_round)
    passes, block = divmod(round_index, per_pass)
    order = list(range(pool_size))
    random.Random(seed * 7919 + passes).shuffle(order)
    return order[block * prompts_per_round:(block + 1) * prompts_per_round]


def reward_summary(rewards: Sequence[float]) -> Dict[str, float]:
    """Mean, standard error and n of held-out rewards."""
    n = len(rewards)
    mean = statistics.fmean(rewards) if n else float('nan')
    se = statistics.stdev(rewards) / math.sqrt(n) if n > 1 else float('nan')
    return {'mean': mean, 'se': se, 'n': n}


def plot_reward_per_round(metrics_path: str, out_path: str) -> None:
    """The held-out reward (mean +- SE) per round, from every evaluation logged in metrics.jsonl (a round
    evaluated again after a resume counts once, with its last value)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        by_round = {r['round']: r for r in map(json.loads, f) if 'reward_eval/mean' in r}
    rounds = sorted(by_round)
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.errorbar(rounds, [by_round[r]['reward_eval/mean'] for r in rounds],
                  yerr=[by_round[r]['reward_eval/se'] for r in rounds], marker='o', capsize=3)
    axes.set(xlabel='rounds trained', ylabel='held-out reward (mean ± SE)', xticks=rounds,
             title='held-out reward per round')
    figure.tight_layout()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    figure.savefig(out_path, dpi=120)
    plt.close(figure)


def gathered(records: List[Dict]) -> List[Dict]:
    """Every rank's records, in rank order (the records themselves in one process)."""
    if not is_distributed():
        return records
    parts = [None] * get_world_size()
    torch.distributed.all_gather_object(parts, records)
    return [record for part in parts for record in part]


class OnlineRounds:
    """The round loop around a trainer. `prompt_loader` is a PromptDataLoader over the pool,
    `held_out` one over the held-out prompts (or None); `make_loaders(feedback_path)` gives the round's
    (train, eval) loaders; `labeler` scores (prompts, completions)."""

    def __init__(self, trainer, settings: OnlineSettings, prompt_loader, held_out, make_loaders: Callable,
                 make_sampler: Callable[[], Sampler], labeler):
        self.trainer, self.settings = trainer, settings
        self.prompt_loader, self.held_out, self.make_loaders = prompt_loader, held_out, make_loaders
        self.make_sampler, self.labeler = make_sampler, labeler
        self.pool = list(prompt_loader.items)
        self.rounds_dir = os.path.join(trainer.run_dir, 'rounds')
        trainer.reference_moves = trainer.reference_moves or settings.reference == 'previous'

    def path(self, round_index: int, name: str) -> str:
        return os.path.join(self.rounds_dir, str(round_index), name)

    def sample(self, loader, k: int, generator: str, seed: int) -> List[Dict]:
        """k samples per prompt of `loader` from the current policy (every rank samples its part), drawn with
        their own seed: the training RNG is left as it was, so a resumed run samples what it would have."""
        self.trainer.policy.eval()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            records = sample_records(self.make_sampler(), loader, k, generator)
        self.trainer.policy.train()
        return gathered(records)

    def round_samples(self, round_index: int) -> List[Dict]:
        """The round's samples: read back if on disk, else sampled and written."""
        path = self.path(round_index, 'samples.jsonl')
        if not os.path.exists(path):
            block = round_block(len(self.pool), self.settings.prompts_per_round, round_index, self.settings.seed)
            self.prompt_loader.items = [self.pool[i] for i in block]
            records = self.sample(self.prompt_loader, self.settings.samples_per_prompt, f'round {round_index}',
                                  self.settings.seed * 1_000_003 + 2 * round_index)
            if on_rank0():
                write_jsonl(path, records)
            barrier()
        return read_json_records(path)

    def round_feedback(self, round_index: int) -> str:
        """The path of the round's feedback file, labelled (on rank 0) if it is not on disk yet."""
        path = self.path(round_index, 'feedback.jsonl')
        if not os.path.exists(path):
            samples = self.round_samples(round_index)
            if on_rank0():
                labelled, counts = label_samples(samples, self.labeler)
                s = self.settings
                records = build_feedback(labelled, s.feedback, s.threshold, s.per_prompt, s.pair_mode,
                                         s.seed + round_index)
                write_jsonl(path, records)
                self.trainer.log({'round': round_index, 'round/samples': len(samples),
                                  'round/feedback_records': len(records), **{f'round/{k}': v for k, v in counts.items()}})
            barrier()
        return path

    def evaluate_reward(self, round_index: int) -> Optional[Dict[str, float]]:
        """Held-out reward after `round_index` rounds (one sample per held-out prompt), logged."""
        if self.held_out is None:
            return None
        samples = self.sample(self.held_out, 1, f'after round {round_index}', self.settings.seed * 1_000_003 + 2 * round_index + 1)
        summary, lengths = {}, [len(s['output'].split()) for s in samples]
        if on_rank0():
            rewards = [r for r in self.labeler([s['prompt'] for s in samples], [s['output'] for s in samples])
                       if r is not None]
            summary = reward_summary(rewards)
            self.trainer.log({'round': round_index, 'reward_eval/mean': summary['mean'], 'reward_eval/se': summary['se'],
                              'reward_eval/n': summary['n'], 'reward_eval/length': statistics.fmean(lengths)})
            rank0_print(f"held-out reward after {round_index} rounds: {summary['mean']:.4f} +- {summary['se']:.4f} "
                        f"(n={summary['n']})")
            plot_reward_per_round(os.path.join(self.trainer.run_dir, 'metrics.jsonl'),
                                  os.path.join(self.rounds_dir, 'reward_per_round.png'))
        return summary

    def run(self) -> None:
        trainer = self.trainer
        if trainer.completed_rounds == 0 and trainer.batches_seen == 0:
            self.evaluate_reward(0)
        for round_index in range(trainer.completed_rounds, self.settings.rounds):
            feedback = self.round_feedback(round_index)
            if self.settings.reference == 'previous' and trainer.batches_seen == 0:
                trainer.sync_reference()  # the policy that sampled this round
            if read_json_records(feedback):
                trainer.set_data(*self.make_loaders(feedback))
                trainer.train()
            else:
                rank0_print(f"round {round_index}: its samples gave no {self.settings.feedback} feedback (all ties or "
                            f"unscored), so it trains on nothing; sample more per prompt or lower the threshold")
            trainer.completed_rounds, trainer.batches_seen = round_index + 1, 0
            trainer.save_checkpoint()
            self.evaluate_reward(round_index + 1)
