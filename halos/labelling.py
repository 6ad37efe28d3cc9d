"""From samples to feedback: score HALOs sample records with a labeler, then turn the scores into the
feedback-file records halos trains on (halos/feedback.py reads them, like any user's file).

    binary    each sample desirable when its reward >= the threshold (mean, median or a number; over the
              whole file or per prompt)
    pairwise  one pair per prompt (max: best vs worst; min: the closest pair still above the threshold) or
              consecutive pairs of a seeded shuffle (random); a pair needs |reward_A - reward_B| > threshold
              (here the least gap: mean and median count as 0), so ties are dropped, never labelled; a
              sample is never paired with itself or with a same text; A and B are in a seeded random order,
              label 1 when A is better
    scalar    every sample with its reward (GRPO, weights)
    best      the best sample of each prompt as its SFT target (rejection sampling / ReST-style fine-tuning)

A sample whose labeler gave no score (a failed or unparseable judgment) is dropped and counted.
"""
import random
import statistics
from collections import Counter
from typing import Dict, List, Sequence, Tuple, Union

from halos.errors import ConfigError

FEEDBACK_KINDS = ('binary', 'pairwise', 'scalar', 'best')
PAIR_MODES = ('max', 'min', 'random')
Threshold = Union[str, float]


def label_samples(samples: List[Dict], labeler, batch_size: int = 64) -> Tuple[List[Dict], Counter]:
    """The samples with a `reward` each, those the labeler could not score left out; and the counts."""
    labelled, counts = [], Counter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rewards = labeler([s['prompt'] for s in chunk], [s['output'] for s in chunk])
        for sample, reward in zip(chunk, rewards):
            if reward is None:
                counts['dropped: no score'] += 1
            else:
                labelled.append({**sample, 'reward': float(reward)})
    counts['labelled'] = len(labelled)
    return labelled, counts


def by_prompt(samples: List[Dict]) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = {}
    for sample in samples:
        groups.setdefault(sample['prompt_id'], []).append(sample)
    return groups


def threshold_value(rewards: Sequence[float], threshold: Threshold) -> float:
    """'mean' or 'median' of the rewards, or a number (floats accepted)."""
    if threshold == 'mean':
        return statistics.fmean(rewards)
    if threshold == 'median':
        return statistics.median(rewards)
    try:
        return float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold={threshold!r}: give mean, median or a number") from None


def feedback_record(sample: Dict, **fields) -> Dict:
    return {'prompt_id': sample['prompt_id'], 'prompt': sample['prompt'], **fields}


def binary_feedback(samples: List[Dict], threshold: Threshold = 'median', per_prompt: bool = False) -> List[Dict]:
    groups = by_prompt(samples).values() if per_prompt else [samples]
    records = []
    for group in groups:
        cut = threshold_value([s['reward'] for s in group], threshold)
        records += [feedback_record(s, output=s['output'], label=int(s['reward'] >= cut), reward=s['reward'],
                                    type='binary_feedback') for s in group]
    return records


def candidate_pairs(group: List[Dict], mode: str, threshold: float, rng: random.Random) -> List[Tuple[Dict, Dict]]:
    """(better, worse) pairs of one prompt's samples whose rewards differ by more than `threshold`."""
    distinct = lambda a, b: a['output'].strip() != b['output'].strip() and abs(a['reward'] - b['reward']) > threshold
    ranked = sorted(group, key=lambda s: -s['reward'])
    if mode == 'max':
        pairs = [(ranked[0], ranked[-1])] if len(ranked) > 1 else []
    elif mode == 'min':
        gaps = [(a['reward'] - b['reward'], i, j) for i, a in enumerate(ranked) for j, b in enumerate(ranked)
                if i < j and distinct(a, b)]
        pairs = [(ranked[i], ranked[j]) for _, i, j in [min(gaps)]] if gaps else []
    elif mode == 'random':
        shuffled = list(group)
        rng.shuffle(shuffled)
        pairs = [tuple(sorted(shuffled[i:i + 2], key=lambda s: -s['reward'])) for i in range(0, len(shuffled) - 1, 2)]
    else:
        raise ConfigError(f"pair mode {mode!r}: give one of {', '.join(PAIR_MODES)}")
    return [(a, b) for a, b in pairs if distinct(a, b)]


def pairwise_feedback(samples: List[Dict], mode: str = 'max', threshold: float = 0.0, seed: int = 0) -> List[Dict]:
    rng = random.Random(seed)
    records = []
    for group in by_prompt(samples).values():
        for better, worse in candidate_pairs(group, mode, float(threshold), rng):
            a, b = (better, worse) if rng.random() < 0.5 else (worse, better)
            records.append(feedback_record(a, output_A=a['output'], output_B=b['output'],
                                           label=int(a['reward'] > b['reward']), reward_A=a['reward'],
                                           reward_B=b['reward'], type='pairwise_feedback'))
    return records


def scalar_feedback(samples: List[Dict]) -> List[Dict]:
    return [feedback_record(s, output=s['output'], reward=s['reward'], type='scalar_feedback') for s in samples]


def best_feedback(samples: List[Dict]) -> List[Dict]:
    """Each prompt's best sample (the first of equals), a desirable output: SFT trains on it."""
    best = [max(group, key=lambda s: s['reward']) for group in by_prompt(samples).values()]
    return [feedback_record(s, output=s['output'], label=1, reward=s['reward'], type='binary_feedback') for s in best]


def build_feedback(samples: List[Dict], kind: str, threshold: Threshold = 'median', per_prompt: bool = False,
                   pair_mode: str = 'max', seed: int = 0) -> List[Dict]:
    """Feedback records of `kind` (binary, pairwise, scalar or best) from labelled samples."""
    if kind == 'binary':
        return binary_feedback(samples, threshold, per_prompt)
    if kind == 'pairwise':
        return pairwise_feedback(samples, pair_mode, 0.0 if threshold in ('mean', 'median') else threshold, seed)
    if kind == 'scalar':
        return scalar_feedback(samples)
    if kind == 'best':
        return best_feedback(samples)
    raise ConfigError(f"feedback {kind!r}: give one of {', '.join(FEEDBACK_KINDS)}")
