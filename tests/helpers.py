"""Shared helpers of the tests: composing configs and running train.py."""
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'data')


def base_overrides(cache_dir, loss='dpo', exp_name='test', datasets='[hh]'):
    return [f'loss={loss}', 'model=tiny', f'datasets={datasets}', f'exp_name={exp_name}', 'mode=train',
            f'++data_dir={DATA}', f'++cache_dir={cache_dir}', '++wandb.enabled=false', '++n_eval_examples=8',
            '++minimum_log_interval_secs=0']


def make_config(cache_dir, *overrides, loss='dpo', datasets='[hh]'):
    """A validated config, as train.py would build it from these command-line overrides."""
    import train
    with initialize_config_dir(config_dir=os.path.join(ROOT, 'config'), version_base=None):
        config = compose('config', overrides=base_overrides(cache_dir, loss, datasets=datasets) + list(overrides))
    train.validate_config(config)
    return config


def run_train(cache_dir, *overrides, loss='dpo', exp_name='test', nproc=1, timeout=600, check=True, env=None):
    """Run train.py in a subprocess (under torchrun when nproc > 1)."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 else [sys.executable]
    command = launcher + [os.path.join(ROOT, 'train.py')] + base_overrides(cache_dir, loss, exp_name) + list(overrides)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f'train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result
