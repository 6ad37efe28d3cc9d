"""Step-level online RL (GRPO as TRL and DeepSeek define it, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++): every
optimizer step samples k completions of each of its prompts from the current policy, scores them, and takes
`mu` optimizer passes over them.

- The old policy is the policy that sampled: on the first pass its per-token log-probs are the pass's own
  forward, detached, so the ratio is exactly 1 there; later passes keep them, and the clip acts.
- The reference is the starting model: its per-token log-probs give the KL (in the loss, or in the reward
  with the log-probs the sampler recorded) and the `kl/start` monitor.
- DAPO's dynamic sampling drops the groups whose scores are all equal and samples new prompts in their place
  (`max_refills` times at most; what is still missing is filled with the dropped groups, which carry no
  advantage), counted.
- Sampling draws from seeds derived from the run's seed and the data position, so a run resumed at a
  checkpoint samples what the uninterrupted run sampled. Every step's samples and scores are appended to
  `<run_dir>/rollouts.jsonl` (cut back to the checkpoint when a run resumes).
- A step whose advantages are all 0 (every prompt's samples scored alike) teaches nothing: while no step of
  the run has had one, each evaluation warns, and a run that ends so stops with exit status 2.
- A sample the labeller could not score (a judge that abstains) is left out of its step, as label.py leaves it
  out of the feedback; a microbatch whose labeller scored fewer than online.min_scored of its samples stops
  the run with the labeller's last error.
- Evaluation samples one completion of each held-out prompt and scores it with the held-out labeler
  (online.eval_reward_function, else the labeler); the HackingMonitor (halos/monitors.py) sees it.

A trainer on it (trainers.py) gives `advantages` (of a whole step) and the per-token `loss`.
"""
import os
import random
import statistics
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from halos import batch as schema
from halos import checkpoint, rl
from halos.errors import DataError
from halos.jsonl import append_json_lines, keep_json_lines
from halos.labelers import LabelError, Labeler, checked_scores, parts_of
from halos.labelling import last_error_note, scored_enough
from halos.monitors import (HackingMonitor, MonitorSettings, Observation, part_means, repeated_ngram_share,
                            reward_summary, sample_stats)
from halos.packing import token_level_logps
from halos.policy_gradient import PolicyGradientTrainer, Reduction
from halos.sampling import Sample
from halos.settings import at_least, greater_than, setting
from utils import all_gather_list, all_reduce_sum, get_world_size, on_rank0, rank0_print

ROLLOUTS = 'rollouts.jsonl'


@dataclass(frozen=True)
class Rollouts:
    """What a trainer that samples its own completions needs beyond the loop, built by halos/build.py."""
    samples_per_prompt: int       # k completions of each prompt: a group
    labeler: Labeler              # scores the training samples
    held_out_labeler: Labeler     # scores the held-out samples of evaluation
    monitor: MonitorSettings
    min_scored: float             # the least share of a microbatch's samples a labeller must score


@dataclass
class Group:
    """One prompt's k scored completions."""
    prompt_ids: torch.Tensor      # [P] the prompt's tokens
    prompt_id: str
    samples: List[Sample]
    scores: List[float]

    def degenerate(self) -> bool:
        return len(set(self.scores)) < 2


@dataclass
class Part:
    """One microbatch of a step: its groups as prompt + completion rows (a group's rows consecutive)."""
    groups: List[Group]
    rows: schema.Sequences        # [rows, T]
    mask: torch.Tensor            # [rows, T-1] 1 where a completion token is predicted
    scores: torch.Tensor          # [rows]
    weights: torch.Tensor         # [rows] each row's weight in the loss (0: a truncated one under mask_truncated)
    sampler_logps: torch.Tensor   # [rows, T-1] what the sampler recorded for each completion token
    reference_logps: Optional[torch.Tensor]  # [rows, T-1]; None without a reference model (beta = 0)
    advantages: Optional[torch.Tensor] = None  # [rows] or [rows, T-1]
    old_logps: Optional[torch.Tensor] = None   # [rows, T-1]: the first pass's, detached

    @property
    def group_ids(self) -> List[str]:
        return [group.prompt_id for group in self.groups for _ in group.samples]

    def sampled_kl(self) -> torch.Tensor:
        """[rows, T-1] log pi_old - log pi_ref of each completion token as sampled (0 without a reference)."""
        if self.reference_logps is None:
            return torch.zeros_like(self.sampler_logps)
        return (self.sampler_logps - self.reference_logps) * self.mask


def scores_parts(scores: List[float]) -> Dict:
    """{'score_parts': [each score's parts]} for scores given in parts, else nothing (rollouts.jsonl)."""
    parts = [parts_of(score) for score in scores]
    return {'score_parts': parts} if any(parts) else {}


class OnlineGroupTrainer(PolicyGradientTrainer):
    """The step-level loop; trains on a PromptDataLoader (model.batch_size prompts x k samples a microbatch)."""
    abstract = True
    use_reference_model = True
    loss_returns = ('token_losses', 'stats')
    samples_online = True   # the wiring gives it Rollouts; online.rounds stays 0
    trains_on_prompts = True
    baseline_of = 'prompt'  # the samples its baseline compares a score with: its prompt's (a group), or the step's

    @dataclass(frozen=True)
    class Params(Reduction):
        mu: int = setting(1, 'optimizer passes over each step\'s samples (the first at ratio 1)', at_least(1))
        epsilon: float = setting(0.2, 'the clip range [1 - epsilon, 1 + epsilon_high]', greater_than(0))
        epsilon_high: Optional[float] = setting(None, "the clip range's upper side (null: epsilon)", greater_than(0))
        beta: float = setting(0.0, 'weight of the KL to the starting model', at_least(0))
        dynamic_sampling: bool = setting(False, 'DAPO: replace the groups whose scores are all equal')
        max_refills: int = setting(3, 'dynamic sampling: rounds of replacement prompts at most per microbatch',
                                   at_least(0))
        mask_truncated: bool = setting(False, 'a completion cut at the length limit (no EOS) carries no loss '
                                              "(DAPO's overlong filtering)")

    def steps_per_batch(self) -> int:
        return self.params.mu

    @classmethod
    def uses_reference(cls, params) -> bool:
        """At beta = 0 nothing reads the reference: it is not loaded, and kl/start is not monitored."""
        return params.beta > 0

    def __init__(self, *args, rollouts: Rollouts, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts = rollouts
        self.monitor = HackingMonitor(rollouts.monitor)
        self.step_rewards: List[float] = []   # the training samples' mean reward of each step since the last evaluation
        self.held_out: List[Tuple[float, List[int]]] = []  # each held-out sample's score and tokens, this evaluation
        self.steps_with_advantage = 0  # steps with a sample whose advantage is not 0
        self.steps_all_cut = 0  # steps whose every sample was cut at the length budget

    # --- what a method provides
    def advantages(self, parts: List[Part]) -> List[torch.Tensor]:
        """Each part's advantages ([rows], or per token [rows, T-1]) from its scores, over the whole step."""
        raise NotImplementedError

    def loss(self, log_ratios, reference_log_ratios, advantages, mask) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """[rows, T-1] per-token losses (log_ratios: log pi - log pi_old; reference_log_ratios: log pi_ref - log pi)
        and their stats ('clipped', and 'KL' where the loss has one)."""
        raise NotImplementedError

    # --- sampling and scoring
    def sample_groups(self, batch: Dict, k: int, salt: str) -> List[List[Sample]]:
        """k samples of each prompt of the batch, from a seed of the run's seed, the data position and `salt`."""
        training = self.policy.training
        self.policy.eval()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(zlib.crc32(f'{self.settings.seed}/{self.batches_seen}/{batch[schema.PROMPT_ID][0]}/'
                                         f'{salt}'.encode()))
            samples = self.sampler()(batch, k)
        self.policy.train(training)
        return samples

    def scored_groups(self, batch: Dict, salt: str) -> List[Group]:
        k = self.rollouts.samples_per_prompt
        samples = self.sample_groups(batch, k, salt)
        prompts = [prompt for prompt in batch[schema.PROMPT_AS_GIVEN] for _ in range(k)]
        extras = [extra for extra in batch[schema.PROMPT_EXTRA] for _ in range(k)]
        names = [f'step {self.batch_counter} prompt {prompt_id} sample {j}' for prompt_id in batch[schema.PROMPT_ID]
                 for j in range(k)]
        labeler = self.rollouts.labeler
        scores = checked_scores(labeler, prompts, [s.text for group in samples for s in group], names, extras)
        # a refill's groups only add to the microbatch's own: a process may get none of them
        self.scored_enough(scores, labeler, f'step {self.batch_counter}', on_every_rank=salt == 'step')
        groups = []
        for i, (ids, mask, prompt_id, group) in enumerate(zip(batch[schema.PROMPT_INPUT_IDS],
                                                              batch[schema.PROMPT_ATTENTION_MASK],
                                                              batch[schema.PROMPT_ID], samples)):
            scored = [(sample, score) for sample, score in zip(group, scores[i * k:(i + 1) * k]) if score is not None]
            if scored:
                samples_kept, scores_kept = zip(*scored)
                groups.append(Group(ids[mask.bool()], prompt_id, list(samples_kept), list(scores_kept)))
        return groups

    def scored_enough(self, scores: List[Optional[float]], labeler: Labeler, what: str,
                      on_every_rank: bool = False) -> None:
        """Stop on every rank, with the labeller's last error, when fewer than online.min_scored of the samples of
        all ranks got a score, or (`on_every_rank`: a microbatch to train on) some rank got none."""
        scored = sum(score is not None for score in scores)
        counts = all_reduce_sum(torch.tensor([float(scored), float(len(scores)), float(scored == 0)]))
        scored_enough(int(counts[0]), int(counts[1]), self.rollouts.min_scored, labeler, what)
        if on_every_rank and counts[2] > 0:
            raise LabelError(f"{what}: {labeler.name} scored none of the samples of {int(counts[2])} of "
                             f"{get_world_size()} processes, which have nothing to train on{last_error_note(labeler)}")

    def refilled(self, groups: List[Group]) -> Tuple[List[Group], Dict[str, float]]:
        """Dynamic sampling: the degenerate groups replaced by groups of fresh prompts drawn from the pool (seeded
        by the data position), while any rank has some left and refills remain; then the dropped ones fill what
        is left."""
        kept = [group for group in groups if not group.degenerate()]
        dropped = [group for group in groups if group.degenerate()]
        pool, refills = self.train_iterator.items, 0
        rng = random.Random(f'{self.settings.seed}/{self.batches_seen}/{groups[0].prompt_id}')
        while refills < self.params.max_refills and all_reduce_sum(torch.tensor(float(len(groups) - len(kept)))) > 0:
            refills += 1  # on every rank while any rank misses groups: the ranks sample in step
            wanted = max(len(groups) - len(kept), 1)
            batch = self.train_iterator.batch_of(rng.sample(pool, min(wanted, len(pool))))
            fresh = self.scored_groups(batch, f'refill {refills}')
            kept += [group for group in fresh if not group.degenerate()]
            dropped += [group for group in fresh if group.degenerate()]
        counts = {'groups/dropped': float(len(dropped)), 'groups/refills': float(refills)}
        return (kept + dropped)[:len(groups)], counts

    def part(self, groups: List[Group]) -> Part:
        samples = [sample for group in groups for sample in group.samples]
        prompt_rows = [group.prompt_ids for group in groups for _ in group.samples]
        rows = rl.rollout_sequences_of(prompt_rows, [s.token_ids for s in samples], self.tokenizer.pad_token_id)
        rows = rows.to(self.device)
        mask = rl.completion_mask(rows.labels)
        # a completion that did not end was scored unfinished: it counts in its group's advantages, not in the loss
        weights = mask.new_tensor([float(sample.finished or not self.params.mask_truncated) for sample in samples])
        sampler_logps = torch.zeros_like(mask)
        for row, (prompt, sample) in enumerate(zip(prompt_rows, samples)):
            sampler_logps[row, len(prompt) - 1:len(prompt) - 1 + len(sample.token_ids)] = torch.tensor(sample.token_logps)
        reference_logps = None
        if self.reference_model is not None:
            with torch.no_grad():
                reference_logps = self.row_logps(self.reference_model, rows)
        scores = torch.tensor([score for group in groups for score in group.scores], device=self.device)
        return Part(groups, rows, mask, scores, weights, sampler_logps, reference_logps)

    def row_logps(self, model, rows: schema.Sequences, entropy: bool = False):
        """Per-token log-probs [rows, T-1] of the rows' completions under `model` (and their entropies)."""
        with self.autocast():
            return token_level_logps(model, rows.input_ids, rows.attention_mask, rows.labels, self.padding_free,
                                     self.share_prompts, entropy)

    # --- the step
    def experience(self, microbatches: List[Dict]) -> List[Part]:
        parts, counts = [], []
        for batch in microbatches:
            groups = self.scored_groups(batch, 'step')
            if self.params.dynamic_sampling:
                groups, refill_counts = self.refilled(groups)
                counts.append(refill_counts)
            parts.append(self.part(groups))
        for part, advantages in zip(parts, self.advantages(parts)):
            part.advantages = advantages
        with_advantage = torch.tensor(float(self.scores_teach(parts)))
        self.steps_with_advantage += all_reduce_sum(with_advantage).item() > 0  # on any rank
        finished = sum(sample.finished for part in parts for group in part.groups for sample in group.samples)
        self.steps_all_cut += all_reduce_sum(torch.tensor(float(finished))).item() == 0
        self.record(parts, counts)
        return parts

    def score_advantages(self, parts: List[Part]) -> List[torch.Tensor]:
        """The advantages that the scores alone give (without a KL folded into the reward, which teaches nothing of
        the reward): a trainer whose advantages hold one overrides this."""
        return [part.advantages for part in parts]

    def scores_teach(self, parts: List[Part]) -> bool:
        """Whether the step's scores give a sample that carries loss an advantage other than 0 (on this rank; its
        verdict is all-reduced)."""
        for part, advantages in zip(parts, self.score_advantages(parts)):
            carried = advantages * part.weights.view(-1, *[1] * (advantages.dim() - 1))
            if bool((carried.abs() > 1e-6).any()):  # a baseline of tied scores may leave rounding errors
                return True
        return False

    def record(self, parts: List[Part], counts: List[Dict[str, float]]) -> None:
        """The step's monitors into the training metrics; its samples and scores into rollouts.jsonl."""
        groups = [group for part in parts for group in part.groups]
        samples = [sample for group in groups for sample in group.samples]
        scores = [score for group in groups for score in group.scores]
        stats = sample_stats(scores, [p for part in parts for p in part.group_ids], [s.token_ids for s in samples],
                             [s.finished for s in samples])
        for part_counts in counts:
            stats.update(part_counts)
        # every rank adds the same keys (the accumulator reduces them in order): the parts any rank's scores have
        named = set(stats) | set(all_gather_list([name for name in stats if name.startswith('reward_parts/')]))
        for name in named:
            group, leaf = name.split('/', 1)
            self.train_metrics.add(f'{group}_train/{leaf}', torch.tensor([stats[name]] if name in stats else []))
        self.step_rewards.append(stats['reward/mean'])
        lines = all_gather_list([{'step': self.batch_counter, 'examples': self.example_counter,
                                  'prompt': group.prompt_id, 'completions': [s.text for s in group.samples],
                                  'scores': group.scores, **scores_parts(group.scores)} for group in groups])
        if on_rank0():
            append_json_lines(os.path.join(self.run_dir, ROLLOUTS), lines)

    def pass_loss(self, part: Part, step_tokens, first_pass: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One microbatch's loss on one pass, and its metrics."""
        if first_pass:  # the entropy monitor: once per sampled batch
            logps, entropy = self.row_logps(self.policy, part.rows, entropy=True)
        else:
            logps = self.row_logps(self.policy, part.rows)
        if part.old_logps is None:  # the first pass: the sampling policy is this very forward
            part.old_logps = logps.detach()
        # without a reference (beta = 0) the policy stands in for it: its KL is exactly 0 (never 0 times an overflow)
        reference_logps = logps.detach() if part.reference_logps is None else part.reference_logps
        token_losses, stats = self.checked_loss(logps - part.old_logps, reference_logps - logps, part.advantages,
                                                part.mask)
        loss = self.reduced(token_losses, part.mask, part.weights, step_tokens)
        token_mean = lambda values: (values * part.mask).sum(-1) / part.mask.sum(-1).clamp(min=1)
        metrics = {'loss/train': loss.detach().reshape(1), 'clipfrac_train/policy': token_mean(stats['clipped'])}
        if first_pass:
            metrics.update({'entropy_train': token_mean(entropy),
                            'sampling_train/logp_gap': ((part.sampler_logps - logps.detach()) * part.mask).sum(-1)})
            if part.reference_logps is not None:
                metrics['kl_train/start'] = ((logps.detach() - part.reference_logps) * part.mask).sum(-1)
        return loss, metrics

    def train_step(self, microbatches):
        parts = self.experience(microbatches)
        step_tokens = self.step_tokens([part.mask for part in parts], [part.weights for part in parts])
        for epoch in range(self.params.mu):
            for part, batch in zip(parts, microbatches):
                loss, metrics = self.pass_loss(part, step_tokens, first_pass=epoch == 0)
                self.accumulate(loss, metrics, batch[schema.PROMPT_TEXT][0], len(parts))
            self.optimizer_step()
        return loss.item()

    def train(self) -> None:
        super().train()
        nothing_learned = self.nothing_learned()
        if nothing_learned:
            raise DataError(f"{nothing_learned}, so nothing was learned: check it, or {self.what_to_change()}; the "
                            f"samples and scores are in {os.path.join(self.run_dir, ROLLOUTS)}")

    def what_to_change(self) -> str:
        """Where no sample has had an advantage: the length budget, where mask_truncated left every completion out
        of the loss, else the sampling."""
        if self.params.mask_truncated and self.steps_all_cut == self.batch_counter:
            return "raise max_new_tokens (or model.max_length)"
        return "sample more completions per prompt (online.samples_per_prompt) or at a higher temperature"

    def nothing_learned(self) -> Optional[str]:
        """Why no step so far had a sample with an advantage other than 0, else None."""
        if not self.batch_counter or self.steps_with_advantage:
            return None
        n = self.batch_counter
        budget = 'every completion was cut at the length budget (max_new_tokens, or model.max_length less the prompt)'
        if self.params.mask_truncated and self.steps_all_cut == n:
            why = f"{budget}, and loss.mask_truncated=true leaves a cut completion out of the loss"
        else:
            cut = f'; {budget}, so maybe too short to tell apart' if self.steps_all_cut == n else ''
            why = f"{self.rollouts.labeler.name} scored the samples of each {self.baseline_of} alike{cut}"
        return f"after {n} optimizer step{'s' if n > 1 else ''}, no sample has had an advantage other than 0 ({why})"

    # --- evaluation: the held-out reward, and the monitors
    def get_batch_metrics(self, batch, mode):
        """One sample of each held-out prompt, scored by the held-out labeler."""
        samples = [group[0] for group in self.sample_groups(batch, 1, f'eval {self.example_counter}')]
        names = [f'held-out prompt {prompt_id} after step {self.batch_counter}' for prompt_id in batch[schema.PROMPT_ID]]
        labeler = self.rollouts.held_out_labeler
        scores = checked_scores(labeler, batch[schema.PROMPT_AS_GIVEN], [s.text for s in samples], names,
                                batch[schema.PROMPT_EXTRA])
        repeated = batch.get(schema.REPEATED, [False] * len(samples))  # filling a batch up: counted once
        scored = [(score, sample.token_ids) for score, sample, again in zip(scores, samples, repeated)
                  if score is not None and not again]
        self.scored_enough(scores, labeler, f'the held-out reward after step {self.batch_counter}')
        self.held_out += scored
        return torch.zeros(()), {f'reward_{mode}/mean': torch.tensor([score for score, _ in scored]),
                                 f'completions_{mode}/length': torch.tensor([float(len(s.token_ids)) for s in samples])}

    def evaluate(self) -> Dict[str, float]:
        nothing_learned = self.nothing_learned()
        if nothing_learned:
            rank0_print(f"warning: {nothing_learned}: nothing is learned until one has")
        self.held_out = []
        results = super().evaluate()
        held_out = all_gather_list(self.held_out)
        if not held_out:
            return results
        scores, tokens = [score for score, _ in held_out], [ids for _, ids in held_out]
        summary = reward_summary(scores)
        observation = Observation(
            where=f'step {self.batch_counter} ({self.example_counter} examples)',
            train_reward=statistics.fmean(self.step_rewards or [float('nan')]),
            held_out=summary['mean'], held_out_se=summary['se'],
            length=statistics.fmean(len(ids) for ids in tokens),
            repetition=statistics.fmean(map(repeated_ngram_share, tokens)))
        self.step_rewards = []
        monitors = self.monitor.observe(observation, os.path.join(self.run_dir, checkpoint.LATEST))
        self.log({'reward_eval/se': summary['se'], 'reward_eval/n': summary['n'],
                  **part_means(scores, 'reward_parts_eval/'), **monitors})
        return results

    # --- resume
    def trainer_state(self) -> Dict:
        return {**super().trainer_state(), 'monitor': self.monitor.state_dict(), 'step_rewards': self.step_rewards,
                'steps_with_advantage': self.steps_with_advantage, 'steps_all_cut': self.steps_all_cut}

    def restore_trainer_state(self, state: Dict) -> None:
        super().restore_trainer_state(state)
        self.monitor.load_state_dict(state['monitor'])
        self.step_rewards = list(state['step_rewards'])
        self.steps_with_advantage = state.get('steps_with_advantage', self.batch_counter)
        self.steps_all_cut = state.get('steps_all_cut', 0)
        if on_rank0():  # the steps after the checkpoint are sampled again
            keep_json_lines(os.path.join(self.run_dir, ROLLOUTS), lambda line: line['examples'] < self.example_counter)
