"""Monitors of online training: what the samples of a step or a round look like (reward, degenerate groups,
length, truncation, repetition, diversity), and the warnings that reward hacking tends to give first: the
training reward rising while the held-out reward falls, completions growing longer or more repetitive.

Online rounds and step-level trainers log `sample_stats` of their samples and pass an `Observation` to a
`HackingMonitor` at every held-out evaluation; with online.stop_on_hacking the run then stops before the
checkpoint of the evaluated policy is written, so the last good checkpoint is the one kept.
"""
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

from halos.errors import UserError
from utils import rank0_print

REPEAT_N, DISTINCT_N = 4, 2  # repetition: 4-grams seen earlier in the completion; diversity: distinct bigrams


class RewardHackingStop(UserError):
    """online.stop_on_hacking=true and a monitor warned."""


def repeated_ngram_share(tokens: Sequence, n: int = REPEAT_N) -> float:
    """The share of a completion's n-grams that already occurred earlier in it (0 when it has none)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_ngrams(completions: Sequence[Sequence], n: int = DISTINCT_N) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams over all n-grams of the completions (1 when there are none)."""
    grams = [tuple(tokens[i:i + n]) for tokens in completions for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def sample_stats(scores: Sequence[float], group_ids: Sequence, completions: Sequence[Sequence],
                 finished: Sequence[bool]) -> Dict[str, float]:
    """Monitors of one step's or round's samples: reward mean and std, the share of degenerate groups (one
    sample, or all of a prompt's samples scored alike), completion length (tokens) and the share cut at the
    length budget, the share of repeated 4-grams and distinct-2; and each part's mean where scores have parts."""
    groups: Dict = {}
    for group, score in zip(group_ids, scores):
        groups.setdefault(group, []).append(score)
    return {'reward/mean': statistics.fmean(scores), 'reward/std': statistics.pstdev(scores),
            'groups/degenerate': statistics.fmean(len(set(group)) == 1 for group in groups.values()),
            'completions/length': statistics.fmean(len(tokens) for tokens in completions),
            'completions/truncated': statistics.fmean(not done for done in finished),
            'completions/repetition': statistics.fmean(map(repeated_ngram_share, completions)),
            'completions/distinct2': distinct_ngrams(completions),
            **part_means(scores, 'reward_parts/')}


def part_values(scores: Sequence[float], prefix: str = '') -> Dict[str, List[float]]:
    """Each named part of the scores given in parts (labelers.PartedScore), over those that have it, by `prefix` +
    its name."""
    values: Dict[str, List[float]] = {}
    for score in scores:
        for name, value in getattr(score, 'parts', {}).items():
            values.setdefault(prefix + name, []).append(value)
    return values


def part_means(scores: Sequence[float], prefix: str = '') -> Dict[str, float]:
    """The mean of each named part of the scores given in parts, over those that have it."""
    return {name: statistics.fmean(each) for name, each in part_values(scores, prefix).items()}


@dataclass(frozen=True)
class MonitorSettings:
    window: int                # evaluations over which the training reward rises while the held-out reward falls
    max_length_growth: float   # warn when completions grow past this many times their first length
    max_repetition: float      # warn when the share of repeated 4-grams passes this
    stop_on_hacking: bool      # stop the run (the last checkpoint stays the last good one) when a monitor warns


@dataclass(frozen=True)
class Observation:
    """What the monitor sees at a held-out evaluation: the training samples since the previous one, and the
    held-out reward."""
    where: str                 # 'step 12', 'round 3'
    train_reward: float
    held_out: float
    held_out_se: float
    length: float
    repetition: float


class HackingMonitor:
    """Keeps the observations of a run and warns (and, with stop_on_hacking, stops) on:
    - the training reward higher than `window` evaluations ago while the held-out reward fell by more than the
      standard error of that difference;
    - the completion length past max_length_growth times its first value;
    - the share of repeated 4-grams past max_repetition."""

    def __init__(self, settings: MonitorSettings):
        self.settings = settings
        self.history: List[Observation] = []

    def warnings(self, now: Observation) -> List[str]:
        s, history = self.settings, self.history + [now]
        found = []
        if len(history) > s.window:
            then = history[-1 - s.window]
            noise = math.hypot(then.held_out_se, now.held_out_se)  # the SE of the difference
            if now.train_reward > then.train_reward and then.held_out - now.held_out > noise:
                found.append(f"the training reward rose ({then.train_reward:.3f} -> {now.train_reward:.3f}) while the "
                             f"held-out reward fell ({then.held_out:.3f} -> {now.held_out:.3f}) since {then.where}")
        first = history[0].length
        if first > 0 and now.length > s.max_length_growth * first:
            found.append(f"completions grew from {first:.1f} to {now.length:.1f} tokens (online.max_length_growth="
                         f"{s.max_length_growth})")
        if now.repetition > s.max_repetition:
            found.append(f"{now.repetition:.0%} of the completions' 4-grams repeat (online.max_repetition="
                         f"{s.max_repetition})")
        return found

    def observe(self, now: Observation, checkpoint: str) -> Dict[str, float]:
        """Record an observation; print each warning; stop with stop_on_hacking. Returns what to log."""
        found = self.warnings(now)
        self.history.append(now)
        for warning in found:
            rank0_print(f"warning: possible reward hacking at {now.where}: {warning}")
        if found and self.settings.stop_on_hacking:
            raise RewardHackingStop(f"stopped at {now.where} (online.stop_on_hacking=true): {'; '.join(found)}; the "
                                    f"last good checkpoint is {checkpoint}, written before this evaluation")
        return {'monitor/warnings': float(len(found))}

    def state_dict(self) -> List[Dict]:
        return [asdict(observation) for observation in self.history]

    def load_state_dict(self, state: List[Dict]) -> None:
        self.history = [Observation(**observation) for observation in state]


def reward_summary(rewards: Sequence[float]) -> Dict[str, float]:
    """Mean, standard error and n of held-out rewards."""
    n = len(rewards)
    mean = statistics.fmean(rewards) if n else float('nan')
    se = statistics.stdev(rewards) / math.sqrt(n) if n > 1 else float('nan')
    return {'mean': mean, 'se': se, 'n': n}
