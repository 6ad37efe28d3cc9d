"""Online alignment in one process: every round samples k completions per prompt from the current policy,
labels them, writes them as a feedback file and trains on it; then the held-out reward is measured and the
monitors (halos/monitors.py) see it, and then the round's checkpoint is written (so with
online.stop_on_hacking a policy the monitors stop is never saved).

    <run_dir>/rounds/<r>/samples.jsonl     HALOs sample records (written atomically)
    <run_dir>/rounds/<r>/feedback.jsonl    the round's feedback, in the format datasets=[file] reads
    <run_dir>/rounds/judgments.jsonl       the LLM judge's cache, when the labeler is a judge
    <run_dir>/rounds/reward_per_round.png  per round: the held-out reward (with online.eval_prompts), the
                                           training samples' reward, the held-out length

Round r takes the r-th block of prompts_per_round prompts of a seeded permutation of the pool, so blocks
never overlap until the pool is used up (then a fresh permutation starts). The files are the resumable
state: a rerun with ++resume=true does not resample a round whose samples are on disk, nor relabel one
whose feedback is, nor retrain a round already trained (the checkpoint counts the rounds trained, and a
round cut short resumes at its data position). The optimizer and scheduler carry over from round to round.
With reference=previous the reference model is set to the policy at the start of each round (its weights
are then part of every checkpoint, so a resumed round keeps its reference).
"""
import os
import random
import statistics
from typing import Callable, Dict, List, Optional, TypeVar

import torch

from halos import checkpoint
from halos.errors import DataError, UserError
from halos.feedback import extra_fields, read_json_records
from halos.jsonl import logged_number, read_json_lines, write_jsonl
from halos.labelers import LabelError, checked_scores
from halos.labelling import (build_feedback, kind_defaults, label_samples, one_class, sample_name,
                             scored_enough, unscored_note, why_no_training_data)
from halos.monitors import (HackingMonitor, Observation, part_means, repeated_ngram_share, reward_summary,
                            sample_stats)
from halos.sampling import Sampler, sample_records
from halos.settings import OnlineSettings
from utils import all_gather_list, barrier, is_distributed, on_rank0, rank0_print

T = TypeVar('T')

def round_block(pool_size: int, prompts_per_round: int, round_index: int, seed: int) -> List[int]:
    """The pool indices of round `round_index`'s prompts: consecutive blocks of a seeded permutation, a fresh
    permutation (seed + pass) each time the pool is used up; a block never holds a prompt twice."""
    per_pass = max(1, pool_size // prompts_per_round)
    passes, block = divmod(round_index, per_pass)
    order = list(range(pool_size))
    random.Random(seed * 7919 + passes).shuffle(order)
    return order[block * prompts_per_round:(block + 1) * prompts_per_round]


def plot_rounds(metrics_path: str, out_path: str) -> None:
    """Per round, from metrics.jsonl (a round evaluated again after a resume counts once, with its last value):
    the held-out reward (mean +- SE), the mean reward of the round's training samples, and the held-out
    completions' length."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    records = read_json_lines(metrics_path)
    evaluated = {r['round']: r for r in records if 'reward_eval/mean' in r}
    sampled = {r['round']: r['reward_train/mean'] for r in records if 'reward_train/mean' in r and 'round' in r}
    rounds = sorted(evaluated)
    figure, (reward, training, length) = plt.subplots(1, 3, figsize=(12, 3.5))
    reward.errorbar(rounds, [evaluated[r]['reward_eval/mean'] for r in rounds],
                    yerr=[logged_number(evaluated[r], 'reward_eval/se', 0.0) for r in rounds], marker='o', capsize=3)
    reward.set(xlabel='rounds trained', ylabel='held-out reward (mean ± SE)', xticks=rounds, title='held-out reward')
    training.plot(sorted(sampled), [sampled[r] for r in sorted(sampled)], marker='o', color='tab:orange')
    training.set(xlabel='round', ylabel='mean reward of its samples', title="the training samples' reward")
    length.plot(rounds, [evaluated[r]['reward_eval/length'] for r in rounds], marker='o', color='tab:green')
    length.set(xlabel='rounds trained', ylabel='held-out completion length (words)', xticks=rounds,
               title='length')
    figure.tight_layout()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    figure.savefig(out_path, dpi=120)
    plt.close(figure)


def on_rank0_for_all(work: Callable[[], T]) -> Optional[T]:
    """`work()` on rank 0 (None elsewhere). When it fails, rank 0 raises its error and every other rank exits
    (status 2 for a UserError, else 1) instead of waiting at the next collective."""
    result, error = None, None
    if on_rank0():
        try:
            result = work()
        except Exception as raised:
            error = raised
    if is_distributed():
        failed = [None if error is None else isinstance(error, UserError)]
        torch.distributed.broadcast_object_list(failed, src=0)
        if failed[0] is not None and not on_rank0():
            raise SystemExit(2 if failed[0] else 1)
    if error is not None:
        raise error
    return result


class OnlineRounds:
    """The round loop around a trainer. `prompt_loader` is a PromptDataLoader over the pool,
    `held_out` one over the held-out prompts (or None); `make_loaders(feedback_path)` gives the round's
    (train, eval) loaders; `labeler` scores (prompts, completions, extras)."""

    def __init__(self, trainer, settings: OnlineSettings, seed: int, prompt_loader, held_out, make_loaders: Callable,
                 make_sampler: Callable[[], Sampler], labeler, held_out_labeler, monitor: HackingMonitor):
        self.trainer, self.settings, self.seed = trainer, settings, seed
        self.prompt_loader, self.held_out, self.make_loaders = prompt_loader, held_out, make_loaders
        self.make_sampler, self.labeler, self.held_out_labeler, self.monitor = make_sampler, labeler, held_out_labeler, \
            monitor
        self.pool = list(prompt_loader.items)
        # a resume checks the pool, whose blocks the rounds sample, as a step-level run checks its data
        trainer.data_digest, trainer.fields_digest = prompt_loader.digest(), prompt_loader.fields_digest()
        if settings.prompts_per_round > len(self.pool):
            rank0_print(f"warning: online.prompts_per_round={settings.prompts_per_round}, but the prompt pool holds "
                        f"{len(self.pool)} prompts: every round samples all of them")
        self.rounds_dir = os.path.join(trainer.run_dir, 'rounds')
        self.metrics_path = os.path.join(trainer.run_dir, 'metrics.jsonl')
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
        return all_gather_list(records)

    def round_samples(self, round_index: int) -> List[Dict]:
        """The round's samples: read back if on disk, else sampled and written."""
        path, k = self.path(round_index, 'samples.jsonl'), self.settings.samples_per_prompt
        block = round_block(len(self.pool), self.settings.prompts_per_round, round_index, self.seed)
        if not os.path.exists(path):
            self.prompt_loader.items = [self.pool[i] for i in block]
            seed = self.seed * 1_000_003 + 2 * round_index
            records = self.sample(self.prompt_loader, k, f'round {round_index}', seed)
            if on_rank0():
                write_jsonl(path, records)
            barrier()
        records = read_json_records(path)
        if len(records) != len(block) * k:  # halos writes the file whole: another count is someone else's doing
            raise DataError(f"{path} holds {len(records)} samples, where round {round_index} samples "
                            f"{len(block) * k} ({len(block)} prompts x {k}): delete {self.path(round_index, '')} to "
                            f"sample the round again")
        return records

    def round_feedback(self, round_index: int) -> str:
        """The path of the round's feedback file, labelled (on rank 0) if it is not on disk yet. A round whose
        labeler scores too few samples, or whose scores give nothing to train on, stops the run; its samples
        stay on disk, so a resumed run labels them again without sampling."""
        path = self.path(round_index, 'feedback.jsonl')
        if not os.path.exists(path):
            samples = self.round_samples(round_index)
            on_rank0_for_all(lambda: self.label_round(round_index, samples, path))
            barrier()
        return path

    def label_round(self, round_index: int, samples: List[Dict], path: str) -> None:
        """Label the round's samples into its feedback file; a labeler that fails, or scores too few of them, or
        scores that give nothing to train on, stop the run (its samples stay on disk)."""
        s = self.settings
        try:
            labelled, counts = label_samples(samples, self.labeler)
            scored_enough(len(labelled), len(samples), s.min_scored, self.labeler, f'round {round_index}')
        except UserError as error:
            raise LabelError(f"{error}; the samples of round {round_index} stay in "
                             f"{self.path(round_index, 'samples.jsonl')}: rerun with ++resume=true once the labeler "
                             f"is fixed") from None
        threshold, pair_mode = kind_defaults(s.feedback, s.threshold, s.pair_mode)
        records = build_feedback(labelled, s.feedback, threshold, s.per_prompt, pair_mode, self.seed + round_index)
        reason = why_no_training_data(labelled, records, s.feedback, threshold)
        if reason:
            reason += unscored_note(len(labelled), len(samples), self.labeler)
            raise DataError(f"round {round_index}: {reason}; sample more per prompt (online.samples_per_prompt) or "
                            f"at a higher temperature, change online.threshold, or delete {self.path(round_index, '')} "
                            f"to sample the round again")
        lopsided = one_class(records, s.feedback, threshold)
        if lopsided:
            rank0_print(f"warning: round {round_index} (online.threshold): {lopsided}")
        write_jsonl(path, records)
        stats = sample_stats([s['reward'] for s in labelled], [s['prompt_id'] for s in labelled],
                             [s['output'].split() for s in labelled], [s.get('finished', True) for s in labelled])
        self.trainer.log({'round': round_index, 'round/samples': len(samples), 'round/feedback_records': len(records),
                          **{f'round/{k}': v for k, v in counts.items()},
                          **{name.replace('/', '_train/', 1): value for name, value in stats.items()}})

    def logged(self) -> Dict[int, Dict]:
        """The last record of each round in metrics.jsonl that has a held-out reward or a training reward,
        merged by round."""
        merged: Dict[int, Dict] = {}
        if os.path.exists(self.metrics_path):
            for record in read_json_lines(self.metrics_path):
                if 'round' in record:
                    merged.setdefault(record['round'], {}).update(record)
        return merged

    def evaluate_reward(self, round_index: int) -> Optional[Dict[str, float]]:
        """Held-out reward after `round_index` rounds (one sample per held-out prompt), logged."""
        if self.held_out is None:
            return None
        samples = self.sample(self.held_out, 1, f'after round {round_index}',
                              self.seed * 1_000_003 + 2 * round_index + 1)
        return on_rank0_for_all(lambda: self.score_held_out(round_index, samples))

    def score_held_out(self, round_index: int, samples: List[Dict]) -> Dict[str, float]:
        """The held-out reward, logged and plotted; the monitors see it (with stop_on_hacking they may stop the
        run here, before the round's checkpoint is written)."""
        scores = checked_scores(self.held_out_labeler, [s['prompt'] for s in samples], [s['output'] for s in samples],
                                [f'held-out {sample_name(s)}' for s in samples], [extra_fields(s) for s in samples])
        rewards = [r for r in scores if r is not None]
        scored_enough(len(rewards), len(samples), self.settings.min_scored, self.held_out_labeler,
                      f'the held-out reward after {round_index} rounds')
        summary, words = reward_summary(rewards), [s['output'].split() for s in samples]
        trained_on = self.logged().get(round_index - 1, {})
        observation = Observation(f'round {round_index}', trained_on.get('reward_train/mean', float('nan')),
                                  summary['mean'], summary['se'], statistics.fmean(map(len, words)),
                                  statistics.fmean(map(repeated_ngram_share, words)))
        rank0_print(f"held-out reward after {round_index} rounds: {summary['mean']:.4f} +- {summary['se']:.4f} "
                    f"(n={summary['n']})")
        self.trainer.log({'round': round_index, 'reward_eval/mean': summary['mean'], 'reward_eval/se': summary['se'],
                          'reward_eval/n': summary['n'], 'reward_eval/length': observation.length,
                          'reward_eval/repetition': observation.repetition,
                          **part_means(rewards, 'reward_parts_eval/'),
                          **self.monitor.observe(observation, os.path.join(self.trainer.run_dir, checkpoint.LATEST))})
        plot_rounds(self.metrics_path, os.path.join(self.rounds_dir, 'reward_per_round.png'))
        return summary

    def restore_monitor(self) -> None:
        """A resumed run's monitor sees again what the evaluations up to its checkpoint saw."""
        logged = self.logged()
        self.monitor.load_state_dict([
            {'where': f'round {r}', 'train_reward': logged_number(logged.get(r - 1, {}), 'reward_train/mean'),
             'held_out': logged_number(logged[r], 'reward_eval/mean'),
             'held_out_se': logged_number(logged[r], 'reward_eval/se'),
             'length': logged_number(logged[r], 'reward_eval/length'),
             'repetition': logged_number(logged[r], 'reward_eval/repetition', 0.0)}
            for r in sorted(logged) if r <= self.trainer.completed_rounds and 'reward_eval/mean' in logged[r]])

    def run(self) -> None:
        trainer = self.trainer
        if trainer.completed_rounds == 0 and trainer.batches_seen == 0:
            self.evaluate_reward(0)
        else:
            self.restore_monitor()
        for round_index in range(trainer.completed_rounds, self.settings.rounds):
            feedback = self.round_feedback(round_index)
            if self.settings.reference == 'previous' and trainer.batches_seen == 0:
                trainer.sync_reference()  # the policy that sampled this round
            trainer.set_data(*self.make_loaders(feedback))
            trainer.train()
            trainer.completed_rounds, trainer.batches_seen = round_index + 1, 0
            self.evaluate_reward(round_index + 1)  # before the checkpoint: a policy the monitors stop is not saved
            if round_index + 1 == self.settings.rounds:
                break  # the run's final save follows its final evaluation
            trainer.save_checkpoint()
            if trainer.stop_asked():  # before the next round's sampling, which may outlast a scheduler's grace
                raise trainer.stopped()
