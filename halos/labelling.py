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

Every score passes halos.labelers.checked_scores: a labeler that fails on a sample or gives anything but a
finite number stops the run, naming the sample. A sample whose labeler gave no score (a failed or
unparseable judgment) is dropped and counted; `scored_enough` stops a run when too few got one. An empty
completion is scored (its reward counts in a round's statistics) but never written as feedback.
"""
import random
import statistics
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

from halos.errors import ConfigError
from halos.feedback import extra_fields
from halos.labelers import LabelError, checked_scores, parts_of

FEEDBACK_KINDS = ('binary', 'pairwise', 'scalar', 'best')
FEEDBACK_TYPES = ('binary_feedback', 'pairwise_feedback', 'scalar_feedback')  # the `type` of the records written
PAIR_MODES = ('max', 'min', 'random')
# the options of building feedback that only some of its kinds read (label.py's --threshold, online.threshold, ...)
FEEDBACK_OPTIONS = {'threshold': ('binary', 'pairwise'), 'per_prompt': ('binary',), 'pair_mode': ('pairwise',)}
Threshold = Union[str, float]


def sample_name(sample: Dict) -> str:
    """How a message names a sample record: 'round 2, prompt 3f9a0c1d, sample 1'."""
    parts = [sample.get('generator'), f"prompt {sample.get('prompt_id')}",
             f"sample {sample['sample_id']}" if 'sample_id' in sample else None]
    return ', '.join(str(part) for part in parts if part)


def label_samples(samples: List[Dict], labeler, batch_size: int = 64) -> Tuple[List[Dict], Counter]:
    """The samples with a `reward` each, those the labeler could not score left out; and the counts."""
    labelled, counts = [], Counter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rewards = checked_scores(labeler, [s['prompt'] for s in chunk], [s['output'] for s in chunk],
                                 [sample_name(s) for s in chunk], [extra_fields(s) for s in chunk])
        for sample, reward in zip(chunk, rewards):
            if not sample['output'].strip():
                counts['empty completions (scored, not written as feedback)'] += 1
            if reward is None:
                counts['dropped: no score'] += 1
            else:
                earlier = {name: value for name, value in sample.items() if name != 'reward_parts'}
                labelled.append({**earlier, 'reward': reward, **reward_parts_field(reward)})
    counts['labelled'] = len(labelled)
    return labelled, counts


def scored_enough(n_scored: int, n_samples: int, least_share: float, labeler, what: str) -> None:
    """Stop, naming the count, the labeler and its last error, when fewer than `least_share` of `what`'s
    samples got a score."""
    if n_scored > 0 and n_scored >= least_share * n_samples:
        return
    share = f' (fewer than {least_share:.0%})' if n_scored else ''
    raise LabelError(f"{what}: {getattr(labeler, 'name', 'the labeler')} scored {n_scored} of {n_samples} samples"
                     f"{share}{last_error_note(labeler)}")


def unscored_note(n_scored: int, n_samples: int, labeler) -> str:
    """'; <labeler> scored n of the N samples; last error: ...' where some samples went unscored (which may be
    why they give nothing to train on), else ''."""
    if n_scored == n_samples:
        return ''
    return (f"; {getattr(labeler, 'name', 'the labeler')} scored {n_scored} of the {n_samples} samples"
            f"{last_error_note(labeler)}")


def last_error_note(labeler) -> str:
    """'; last error: ...' where the labeller kept one (a judge's failed requests), else ''."""
    last_error = getattr(labeler, 'last_error', None)
    return f"; last error: {last_error}" if last_error else ''


TRAINING_UNITS = {'pairwise': 'pairs', 'scalar': 'groups whose scores differ', 'best': 'best samples'}


def why_no_training_data(labelled: List[Dict], records: List[Dict], kind: str,
                         threshold: Threshold = 'median') -> Optional[str]:
    """Why scored samples gave `kind` feedback `records` with nothing to learn from (None when they did not):
    pairwise and scalar feedback learn from the differences between a prompt's samples, binary feedback against a
    mean or median threshold from the differences between samples."""
    if labelled and not any(sample['output'].strip() for sample in labelled):
        return f"every one of the {len(labelled)} completions is empty or whitespace"
    if kind == 'binary' and threshold in ('mean', 'median') and len({r['label'] for r in records}) == 1:
        return f"0 undesirable samples: every reward reaches the {threshold} threshold, as the rewards are tied"
    if kind not in TRAINING_UNITS:
        return None if records else 'no feedback record'
    groups = by_prompt(labelled).values()
    too_few = sum(len(group) < 2 for group in groups)
    differing = sum(len({s['reward'] for s in group}) > 1 for group in groups)
    if differing == 0:
        unscored = f" ({too_few} of them {'has' if too_few == 1 else 'have'} fewer than 2 scored samples)" \
            if too_few else ''
        return f"0 {TRAINING_UNITS[kind]}: no prompt of {len(groups)} has two samples with different rewards{unscored}"
    if not records:
        return f"0 {TRAINING_UNITS[kind]}: no pair of different samples differs by more than the threshold"
    return None


def one_class(records: List[Dict], kind: str, threshold: Threshold) -> Optional[str]:
    """What binary feedback that a fixed threshold made all of one class teaches (None where both classes are in
    it): a warning, not a refusal, as the unpaired losses still learn from one class."""
    if kind != 'binary' or len({record['label'] for record in records}) != 1:
        return None
    desirable = records[0]['label'] == 1
    shown = f'{threshold:g}' if isinstance(threshold, float) else threshold
    return (f"every sample is {'desirable' if desirable else 'undesirable'} against the threshold {shown}, so the "
            f"feedback teaches only what to {'do' if desirable else 'avoid'}")


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


def reward_parts_field(score: float) -> Dict:
    """{'reward_parts': {name: part}} for a score given in parts, else nothing."""
    parts = parts_of(score)
    return {'reward_parts': parts} if parts else {}


def feedback_record(sample: Dict, **fields) -> Dict:
    return {**extra_fields(sample), 'prompt_id': sample['prompt_id'], 'prompt': sample['prompt'], **fields}


def scored_record(sample: Dict, **fields) -> Dict:
    """The feedback record of one labelled output: its reward, and the reward's parts where it has them."""
    parts = {'reward_parts': sample['reward_parts']} if 'reward_parts' in sample else {}
    return feedback_record(sample, output=sample['output'], reward=sample['reward'], **parts, **fields)


def binary_feedback(samples: List[Dict], threshold: Threshold = 'median', per_prompt: bool = False) -> List[Dict]:
    groups = by_prompt(samples).values() if per_prompt else [samples] if samples else []
    records = []
    for group in groups:
        cut = threshold_value([s['reward'] for s in group], threshold)
        records += [scored_record(s, label=int(s['reward'] >= cut), type='binary_feedback') for s in group]
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
    return [scored_record(s, type='scalar_feedback') for s in samples]


def best_feedback(samples: List[Dict]) -> List[Dict]:
    """Each prompt's best sample (the first of equals), a desirable output: SFT trains on it."""
    best = [max(group, key=lambda s: s['reward']) for group in by_prompt(samples).values()]
    return [scored_record(s, label=1, type='binary_feedback') for s in best]


def kind_defaults(kind: str, threshold: Optional[Threshold], pair_mode: Optional[str]) -> Tuple[Threshold, str]:
    """The threshold and pair mode, where unset (None), as `kind` reads them: binary's median, pairwise's least
    reward gap of 0 and best-vs-worst pairs."""
    if threshold is None:
        threshold = 'median' if kind == 'binary' else 0.0
    return threshold, pair_mode or 'max'


def build_feedback(samples: List[Dict], kind: str, threshold: Optional[Threshold] = None, per_prompt: bool = False,
                   pair_mode: Optional[str] = None, seed: int = 0) -> List[Dict]:
    """Feedback records of `kind` (binary, pairwise, scalar or best) from labelled samples, but for those whose
    completion is empty: a feedback file holds none (halos.feedback refuses them). An unset threshold or pair mode
    is the kind's default (kind_defaults)."""
    samples = [sample for sample in samples if sample['output'].strip()]
    threshold, pair_mode = kind_defaults(kind, threshold, pair_mode)
    if kind == 'binary':
        return binary_feedback(samples, threshold, per_prompt)
    if kind == 'pairwise':
        return pairwise_feedback(samples, pair_mode, threshold, seed)
    if kind == 'scalar':
        return scalar_feedback(samples)
    if kind == 'best':
        return best_feedback(samples)
    raise ConfigError(f"feedback {kind!r}: give one of {', '.join(FEEDBACK_KINDS)}")
