"""Training curves from runs' metrics.jsonl: what a researcher reads learning from. Every run gets its loss
(raw and smoothed); a preference loss its implicit reward margin and accuracy; KTO its KL estimate; an online
run its reward per round, and a run that samples every step (online RL, online PPO) its reward per step (the
training samples' and, where evaluated, the held-out prompts')."""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from halos.errors import DataError
from halos.jsonl import logged_number, read_json_lines

EXAMPLES = 'training examples'


@dataclass
class Series:
    label: str
    x: List[float]
    y: List[float]
    error: Optional[List[float]] = None  # a standard error per point
    right_axis: bool = False  # drawn against the panel's second y-axis


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: List[Series] = field(default_factory=list)
    right_ylabel: Optional[str] = None


def read_metrics(run_dir: str) -> List[dict]:
    """The records of a run's metrics.jsonl, each value a number, null (not finite) or a list of them; a text
    value stops with its record and key."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    records = read_json_lines(path)
    for number, record in enumerate(records, 1):
        for key, value in record.items():
            if isinstance(value, (str, bool)):
                raise DataError(f"{path}: record {number}: {key} is {value!r}, not a number")
    return records


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """The mean of each value and the up to window - 1 values before it (a trailing window: no future leaks in)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def smoothing_window(n_points: int) -> int:
    """A tenth of the run, at least 5 points, at most half of them."""
    return max(1, min(max(5, n_points // 10), n_points // 2))


def last_per_step(records: Sequence[dict], key: str) -> Dict[float, dict]:
    """The last record holding `key` at each step, in step order (a run resumed from a checkpoint logs the steps
    after it again)."""
    last = {record['step']: record for record in records if key in record and 'step' in record}
    return {step: last[step] for step in sorted(last)}


def points(records: Sequence[dict], key: str) -> Tuple[List[float], List[float]]:
    last = last_per_step(records, key)
    return list(last), [record[key] for record in last.values()]


def per_round(records: Sequence[dict], key: str) -> Dict[int, dict]:
    """The last record per round holding `key` (a round evaluated again after a resume counts once)."""
    return {r['round']: r for r in records if key in r and 'round' in r}


TRAINING_LOSSES = ('loss/train', 'loss/total')  # the total of online PPO's policy, value and KL terms


def loss_panel(records: Sequence[dict]) -> Optional[Panel]:
    key = next((key for key in TRAINING_LOSSES if any(key in record for record in records)), TRAINING_LOSSES[0])
    x, y = points(records, key)
    if not y:
        return None
    window = smoothing_window(len(y))
    return Panel('loss', EXAMPLES, 'training loss (per example)',
                 [Series('per batch', x, y), Series(f'moving average of {window}', x, moving_average(y, window))])


def preference_panel(records: Sequence[dict]) -> Optional[Panel]:
    x, margins = points(records, 'rewards_train/margins')
    if not margins:
        return None
    accuracy_x, accuracies = points(records, 'rewards_train/accuracies')
    window = smoothing_window(len(margins))
    return Panel('reward margin and accuracy', EXAMPLES, 'chosen - rejected implicit reward (nats)',
                 [Series('margin (moving average)', x, moving_average(margins, window)),
                  Series('accuracy (moving average)', accuracy_x, moving_average(accuracies, window), right_axis=True)],
                 right_ylabel='accuracy (share of pairs)')


def kl_panel(records: Sequence[dict]) -> Optional[Panel]:
    x, kl = points(records, 'rewards_train/KL_estimate')
    if not kl:
        return None
    return Panel('KL estimate', EXAMPLES, 'KL(policy || reference) estimate (nats)', [Series('z0', x, kl)])


def reward_panel(records: Sequence[dict]) -> Optional[Panel]:
    sampled, evaluated = per_round(records, 'reward_train/mean'), per_round(records, 'reward_eval/mean')
    if not sampled and not evaluated:
        return None
    series = []
    if sampled:
        rounds = sorted(sampled)
        series.append(Series("the round's samples", rounds, [sampled[r]['reward_train/mean'] for r in rounds]))
    if evaluated:
        rounds = sorted(evaluated)
        series.append(Series('held-out prompts', rounds, [evaluated[r]['reward_eval/mean'] for r in rounds],
                             [logged_number(evaluated[r], 'reward_eval/se', 0.0) for r in rounds]))
    return Panel('reward per round', 'round', 'mean reward (the reward function\'s units)', series)


# what a run that samples every step logs: its training samples' mean score, the held-out prompts' (online RL;
# online PPO logs its samples' score under the reward function or model)
STEP_REWARDS = (('reward_train/mean', 'reward_eval/mean'), ('rewards/score', 'rewards_eval/score'))


def step_reward_panel(records: Sequence[dict]) -> Optional[Panel]:
    if any('round' in record for record in records):
        return None
    for sampled_key, evaluated_key in STEP_REWARDS:
        (steps, rewards), evaluated = points(records, sampled_key), last_per_step(records, evaluated_key)
        if rewards or evaluated:
            window = smoothing_window(len(rewards))
            series = [Series(f"the step's samples (moving average of {window})", steps,
                             moving_average(rewards, window))] if rewards else []
            if evaluated:
                series.append(Series('held-out prompts', list(evaluated),
                                     [record[evaluated_key] for record in evaluated.values()],
                                     [logged_number(record, 'reward_eval/se', 0.0) for record in evaluated.values()]))
            return Panel('reward per step', EXAMPLES, "mean reward (the reward function's units)", series)
    return None


PANELS = (loss_panel, preference_panel, kl_panel, reward_panel, step_reward_panel)
TITLES = ('loss', 'reward margin and accuracy', 'KL estimate', 'reward per round', 'reward per step')  # the rows


def run_panels(records: Sequence[dict]) -> List[Panel]:
    """The panels a run's metrics support, in a fixed order."""
    return [panel for panel in (make(records) for make in PANELS) if panel is not None]


def plot_training_curves(run_dirs: Mapping[str, str], out_path: str) -> str:
    """One column per run (named by the mapping's keys), one row per kind of panel any run has."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    columns = {}
    for name, path in run_dirs.items():
        records = read_metrics(path)
        if not any('step' in record or 'round' in record for record in records):
            raise DataError(f"{path}/metrics.jsonl: no metrics yet (no record of a step or round: the run logged "
                            f"nothing)")
        columns[name] = run_panels(records)
        if not columns[name]:
            raise DataError(f"{path}/metrics.jsonl: no training step yet (it holds the evaluation before the first "
                            f"step alone)")
    present = {panel.title for panels in columns.values() for panel in panels}
    kinds = [title for title in TITLES if title in present]
    figure, axes = plt.subplots(len(kinds), len(columns), figsize=(4.2 * len(columns), 3.2 * len(kinds)),
                                squeeze=False)
    for column, (name, panels) in enumerate(columns.items()):
        by_title = {panel.title: panel for panel in panels}
        for row, kind in enumerate(kinds):
            panel = by_title.get(kind)
            if panel is None:
                axes[row][column].axis('off')
            else:
                draw(axes[row][column], panel, f'{name}: {panel.title}')
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path


def draw(axis, panel: Panel, title: str) -> None:
    right = axis.twinx() if any(s.right_axis for s in panel.series) else None
    colours = iter(('tab:blue', 'tab:orange', 'tab:green', 'tab:red'))
    for series in panel.series:
        target, colour = (right if series.right_axis else axis), next(colours)
        if series.error is not None:
            target.errorbar(series.x, series.y, yerr=series.error, marker='o', capsize=3, label=series.label,
                            color=colour)
        else:
            faint = series.label == 'per batch'
            target.plot(series.x, series.y, label=series.label, color=colour, alpha=0.35 if faint else 1.0,
                        marker='o' if panel.xlabel == 'round' or len(series.x) < 3 else None)
    axis.set_title(title, fontsize=9)
    axis.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
    if right is not None:
        right.set(ylabel=panel.right_ylabel, ylim=(0, 1))
    handles = [h for a in (axis, right) if a is not None for h in a.get_legend_handles_labels()[0]]
    labels = [lb for a in (axis, right) if a is not None for lb in a.get_legend_handles_labels()[1]]
    axis.legend(handles, labels, fontsize=7)
