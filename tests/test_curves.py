"""Training curves: the panels each kind of run gets, their values, and the plot visualize.py --curves writes."""
import json
import os
import subprocess
import sys

import pytest

from halos.curves import moving_average, read_metrics, run_panels, smoothing_window
from halos.jsonl import append_json_lines
from helpers import ROOT


def write_metrics(run_dir, records):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    return run_dir


DPO = [{'step': 8 * (i + 1), 'loss/train': loss, 'rewards_train/margins': margin, 'rewards_train/accuracies': acc}
       for i, (loss, margin, acc) in enumerate(zip([0.69, 0.6, 0.5, 0.45, 0.3, 0.2, 0.25, 0.1, 0.12, 0.05, 0.04],
                                                   [0, .1, .3, .4, .8, 1.2, 1.1, 1.9, 1.8, 2.5, 2.6],
                                                   [.5, .5, .75, .75, 1, 1, 1, 1, 1, 1, 1]))]
KTO = [{'step': 4, 'loss/train': 0.5, 'rewards_train/KL_estimate': 0.0},
       {'step': 8, 'loss/train': 0.4, 'rewards_train/KL_estimate': 0.02}]
ONLINE = [{'round': 0, 'reward_eval/mean': 0.1, 'reward_eval/se': 0.02},
          {'round': 0, 'reward_eval/mean': 0.11, 'reward_eval/se': 0.03},  # evaluated again after a resume
          {'step': 8, 'loss/train': 0.7}, {'round': 1, 'reward_train/mean': 0.2},
          {'round': 1, 'reward_eval/mean': 0.3, 'reward_eval/se': 0.04}, {'step': 16, 'loss/train': 0.6}]


def test_the_smoothing_window_is_a_tenth_of_the_run_within_bounds():
    assert [smoothing_window(n) for n in (1, 4, 11, 60, 200)] == [1, 2, 5, 6, 20]


def test_the_moving_average_looks_only_back():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([4, 0, 2], 5) == [4, 2, 2]
    assert moving_average([3, 1], 1) == [3, 1]


def test_a_preference_run_gets_its_loss_smoothed_and_its_margin_and_accuracy():
    panels = {p.title: p for p in run_panels(DPO)}
    assert list(panels) == ['loss', 'reward margin and accuracy']
    raw, smoothed = panels['loss'].series
    assert raw.x == [8 * i for i in range(1, 12)] and raw.y[0] == 0.69
    assert smoothed.label == 'moving average of 5'  # 11 points: at least 5, at most half
    assert smoothed.y[:3] == pytest.approx([0.69, 0.645, 0.5966667]) and smoothed.y[-1] == pytest.approx(0.112)
    margin, accuracy = panels['reward margin and accuracy'].series
    assert margin.y[4] == pytest.approx(0.32) and margin.y[-1] == pytest.approx(1.98) and accuracy.right_axis
    assert accuracy.y[-1] == 1
    assert panels['loss'].xlabel == 'training examples' and 'nats' in panels['reward margin and accuracy'].ylabel


def test_kto_gets_its_kl_estimate_and_an_online_run_its_reward_per_round():
    assert [p.title for p in run_panels(KTO)] == ['loss', 'KL estimate']
    assert run_panels(KTO)[1].series[0].y == [0.0, 0.02]
    panels = {p.title: p for p in run_panels(ONLINE)}
    assert list(panels) == ['loss', 'reward per round']
    sampled, held_out = panels['reward per round'].series
    assert (sampled.x, sampled.y) == ([1], [0.2])
    assert (held_out.x, held_out.y, held_out.error) == ([0, 1], [0.11, 0.3], [0.03, 0.04])
    assert panels['reward per round'].xlabel == 'round'


STEP_LEVEL = [{'step': 0, 'reward_eval/mean': 1.0, 'reward_eval/se': 0.1},
              {'step': 4, 'loss/train': 0.2, 'reward_train/mean': 1.5},
              {'step': 8, 'loss/train': 0.1, 'reward_train/mean': 2.5},
              {'step': 8, 'loss/train': 0.3, 'reward_train/mean': 2.0},  # logged again after a resume at step 4
              {'step': 8, 'reward_eval/mean': 2.2, 'reward_eval/se': 0.2}]
ONLINE_PPO = [{'step': 8, 'loss/total': 1.1, 'rewards/score': 0.5}, {'step': 16, 'loss/total': 0.9, 'rewards/score': 0.7},
              {'step': 16, 'rewards_eval/score': 0.6}]


def test_a_run_that_samples_every_step_gets_its_reward_per_step_the_last_value_of_each_step():
    panels = {p.title: p for p in run_panels(STEP_LEVEL)}
    assert list(panels) == ['loss', 'reward per step']
    assert panels['loss'].series[0].y == [0.2, 0.3]
    sampled, held_out = panels['reward per step'].series
    assert (sampled.x, sampled.y) == ([4, 8], [1.5, 2.0])  # two points: a moving average of 1
    assert (held_out.x, held_out.y, held_out.error) == ([0, 8], [1.0, 2.2], [0.1, 0.2])
    ppo = {p.title: p for p in run_panels(ONLINE_PPO)}  # online PPO logs its loss as loss/total
    assert ppo['loss'].series[0].y == [1.1, 0.9] and ppo['reward per step'].series[1].y == [0.6]


def test_visualize_plots_the_curves_of_several_runs(tmp_path):
    runs = [write_metrics(str(tmp_path / name), records) for name, records in
            (('dpo', DPO), ('kto', KTO), ('online', ONLINE))]
    out = tmp_path / 'curves.png'
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'visualize.py'), '--curves', *runs, '-o', str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b'\x89PNG' and 'training curves of 3 run(s)' in result.stdout


@pytest.mark.parametrize('arguments, message', [
    (['--curves', 'no_such_run'], 'no_such_run: no such directory'),
    (['--curves', 'empty/metrics.jsonl'], 'empty/metrics.jsonl: a file: give the run directory that holds metrics.jsonl'),
    (['--curves', 'garbled/..'], 'garbled/..: no metrics.jsonl (not a run directory)'),
    (['a.jsonl', 'b.jsonl'], 'one results file'),
    (['--curves', 'empty'], 'empty/metrics.jsonl: no metrics yet (no record of a step or round: the run logged '
                            'nothing)'),
    (['--curves', 'stepless'], 'stepless/metrics.jsonl: no metrics yet (no record of a step or round'),
    (['--curves', 'garbled'], 'garbled/metrics.jsonl: line 2 is not JSON (Expecting value)'),
    (['--curves', 'first_eval'], 'first_eval/metrics.jsonl: no training step yet (it holds the evaluation before the '
                                 'first step alone)'),
    (['--curves', 'text'], "text/metrics.jsonl: record 1: loss/train is 'abc', not a number"),
    (['empty'], "empty: a directory, not a compare.py results file; --curves plots a run directory's training curves"),
])
def test_visualize_names_a_wrong_argument(tmp_path, arguments, message):
    write_metrics(str(tmp_path / 'empty'), [])
    write_metrics(str(tmp_path / 'stepless'), [{'loss/train': 0.5}])
    write_metrics(str(tmp_path / 'text'), [{'step': 1, 'loss/train': 'abc'}])
    write_metrics(str(tmp_path / 'first_eval'), [{'step': 0, 'loss/eval': 0.69, 'rewards_eval/margins': 0.0}])
    os.makedirs(tmp_path / 'garbled')
    (tmp_path / 'garbled' / 'metrics.jsonl').write_text('{"step": 1, "loss/train": 0.5}\nthis is not json\n')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'visualize.py'), *arguments], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and 'Traceback' not in result.stderr


def test_a_metrics_line_cut_by_a_kill_is_skipped_and_the_next_record_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 4, "loss/train": 1.5}\n{"step": 8, "loss/tr')  # killed mid-write
    assert read_metrics(str(tmp_path)) == [{'step': 4, 'loss/train': 1.5}]
    append_json_lines(str(path), [{'step': 8, 'loss/train': 1.25}])  # the resumed run logs again
    assert path.read_text() == '{"step": 4, "loss/train": 1.5}\n{"step": 8, "loss/train": 1.25}\n'


def test_a_number_that_is_not_finite_is_written_as_null_and_read_back_as_nan(tmp_path):
    import math
    from halos.jsonl import logged_number
    from halos.online import plot_rounds
    path = tmp_path / 'metrics.jsonl'
    append_json_lines(str(path), [{'round': 0, 'reward_eval/mean': 0.5, 'reward_eval/se': float('nan'),
                                   'reward_eval/length': 3.0, 'parts': [float('inf'), 1.0]}])
    assert path.read_text() == ('{"round": 0, "reward_eval/mean": 0.5, "reward_eval/se": null, '
                                '"reward_eval/length": 3.0, "parts": [null, 1.0]}\n')  # strict JSON
    record, = read_metrics(str(tmp_path))
    assert math.isnan(logged_number(record, 'reward_eval/se')) and logged_number(record, 'reward_eval/mean') == 0.5
    assert logged_number(record, 'reward_eval/repetition', 0.0) == 0.0
    plot_rounds(str(path), str(tmp_path / 'rounds.png'))  # one held-out value: no error bar
    assert (tmp_path / 'rounds.png').stat().st_size > 0


@pytest.mark.parametrize('output, says', [('curves.txt', 'curves.txt has no extension of an image format'),
                                          ('curves', 'curves has no extension of an image format'),
                                          ('.', '. is a directory')])
def test_visualize_refuses_an_output_that_is_no_image_file_name_before_plotting(tmp_path, capsys, monkeypatch,
                                                                                output, says):
    import visualize
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        visualize.main(['--curves', 'no_such_run', '-o', output])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"visualize.py: argument --output/-o: {says}; give a file name ending in one of ")
    assert '.pdf' in error and '.png' in error and os.listdir(tmp_path) == []
