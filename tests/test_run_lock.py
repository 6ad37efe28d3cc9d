"""One run at a time in a run directory: a second train.py of the same exp_name stops at once, a killed holder
frees the directory, and a run that stops before writing anything but its config leaves no directory behind."""
import os
import subprocess
import sys

import pytest

from halos.errors import ConfigError
from halos.run_lock import LOCK, exclusive_run_dir
from helpers import ROOT, train_in_process


def test_a_held_run_directory_refuses_a_second_holder_until_it_is_released(tmp_path):
    run_dir = str(tmp_path / 'run')
    with exclusive_run_dir(run_dir):
        with pytest.raises(ConfigError) as error, exclusive_run_dir(run_dir):
            pass
        assert str(error.value).startswith(f"{run_dir} is in use by a run that is still training (pid {os.getpid()} "
                                           f"on ")
        (tmp_path / 'run' / 'config.yaml').write_text('written by the holder\n')
    with exclusive_run_dir(run_dir):
        pass
    assert sorted(os.listdir(run_dir)) == [LOCK, 'config.yaml']  # a directory with a run in it stays


def test_a_killed_holder_frees_the_directory(tmp_path):
    run_dir = str(tmp_path / 'run')
    killed = subprocess.run([sys.executable, '-c', f'import os, signal, sys; sys.path.insert(0, {ROOT!r})\n'
                             f'from halos.run_lock import exclusive_run_dir\n'
                             f'with exclusive_run_dir({run_dir!r}):\n'
                             f'    open(os.path.join({run_dir!r}, "started"), "w").close()\n'
                             f'    os.kill(os.getpid(), signal.SIGKILL)'])
    assert killed.returncode == -9 and os.path.exists(os.path.join(run_dir, 'started'))
    with exclusive_run_dir(run_dir):
        assert open(os.path.join(run_dir, LOCK)).read() == f'pid {os.getpid()} on {os.uname().nodename}\n'


def test_train_py_stops_while_another_run_trains_in_its_directory_and_leaves_it_untouched(tmp_path, capsys):
    run_dir = tmp_path / 'busy'
    with exclusive_run_dir(str(run_dir)):
        (run_dir / 'metrics.jsonl').write_text('{"step": 1}\n')
        with pytest.raises(SystemExit) as exit_:
            train_in_process(tmp_path, '++n_examples=8', exp_name='busy')
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
            f"train.py: {run_dir} is in use by a run that is still training (pid {os.getpid()} on ")
        assert sorted(os.listdir(run_dir)) == [LOCK, 'metrics.jsonl']
        assert (run_dir / 'metrics.jsonl').read_text() == '{"step": 1}\n'


def test_a_run_that_stops_before_writing_anything_leaves_no_directory(tmp_path):
    with pytest.raises(SystemExit):
        train_in_process(tmp_path, f'datasets=[{tmp_path}/missing.jsonl]', exp_name='never')
    assert not (tmp_path / 'never').exists()


def test_a_run_directory_left_holding_only_what_a_run_writes_at_its_start_is_removed(tmp_path):
    """A run that stops before its first checkpoint (a reward function that fails, a Ctrl-C) leaves only its
    config.yaml: nothing to resume, so no directory; metrics, rounds or checkpoints keep it."""
    for written, kept in [(['config.yaml'], False), (['config.yaml', 'metrics.jsonl'], True)]:
        run_dir = tmp_path / f'run{len(written)}'
        with exclusive_run_dir(str(run_dir), disposable=('config.yaml',)):
            for name in written:
                (run_dir / name).write_text('{}\n')
        assert run_dir.exists() == kept
    made_before = tmp_path / 'earlier'
    made_before.mkdir()
    with exclusive_run_dir(str(made_before), disposable=('config.yaml',)):
        (made_before / 'config.yaml').write_text('{}\n')
    assert sorted(os.listdir(made_before)) == [LOCK, 'config.yaml']  # a directory it did not make stays


def test_ctrl_c_says_whether_there_is_a_checkpoint_to_resume(tmp_path):
    import train
    from helpers import make_config
    run = make_config(tmp_path, '++online.rounds=2', f'++online.reward_function={ROOT}/data/upbeat/reward.py:reward',
                      loss='kto')
    assert train.what_an_interrupt_left(run) == ("interrupted before the first checkpoint, so there is nothing to "
                                                 "resume: rerun without ++resume=true")
    os.makedirs(os.path.join(run.local_run_dir, 'rounds', '0'))
    assert train.what_an_interrupt_left(run) == (f"interrupted before the first checkpoint: continue with "
                                                 f"++resume=true, which keeps the rounds in {run.local_run_dir}/rounds")
    os.makedirs(os.path.join(run.local_run_dir, 'LATEST'))
    assert train.what_an_interrupt_left(run) == (f"interrupted: the last checkpoint in {run.local_run_dir}/LATEST is "
                                                 f"intact; continue with ++resume=true")
