"""Shared helpers of the tests: composing configs and running train.py and eval.py."""
import os
import random
import signal
import subprocess
import sys
import time
from typing import List

from hydra import compose, initialize_config_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'data')


def base_overrides(cache_dir, loss='dpo', exp_name='test', datasets='[hh]'):
    return [f'loss={loss}', 'model=tiny', f'datasets={datasets}', f'exp_name={exp_name}', 'mode=train',
            f'++data_dir={DATA}', f'++cache_dir={cache_dir}', '++wandb.enabled=false', '++n_eval_examples=8',
            '++minimum_log_interval_secs=0']


def tiny_reward_model(directory) -> str:
    """A randomly initialised one-logit Llama sequence classifier with the tiny model's tokenizer, saved in
    `directory`; returns the directory."""
    import torch
    import transformers

    import models
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def compose_config(overrides):
    """The config Hydra composes from config/ and these command-line overrides, as train.py gets it."""
    with initialize_config_dir(config_dir=os.path.join(ROOT, 'config'), version_base=None):
        return compose('config', overrides=list(overrides))


def make_config(cache_dir, *overrides, loss='dpo', datasets='[hh]'):
    """The checked settings train.py builds from these command-line overrides."""
    from halos.build import run_settings
    overrides = base_overrides(cache_dir, loss, datasets=datasets) + list(overrides)
    return run_settings(compose_config(overrides), overrides)


def train_command(cache_dir, *overrides, loss='dpo', exp_name='test', nproc=1) -> List[str]:
    """The train.py command line (under torchrun when nproc > 1)."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] \
        if nproc > 1 else [sys.executable]
    return launcher + [os.path.join(ROOT, 'train.py')] + base_overrides(cache_dir, loss, exp_name) + list(overrides)


def eval_command(run_dir, *overrides) -> List[str]:
    return [sys.executable, os.path.join(ROOT, 'eval.py'), f'--config-path={run_dir}', *overrides]


def checked(result, command) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise AssertionError(f'{os.path.basename(command[1])} failed ({result.returncode}):\n'
                             f'{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result


def run_train(cache_dir, *overrides, loss='dpo', exp_name='test', nproc=1, timeout=600, check=True, env=None):
    """Run train.py in a subprocess."""
    command = train_command(cache_dir, *overrides, loss=loss, exp_name=exp_name, nproc=nproc)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return checked(result, command) if check else result


def whole_and_killed(cache_dir, *overrides, loss='dpo', max_delay=1.0, timeout=900) -> None:
    """Run `whole` and `killed` side by side; SIGKILL `killed` a random moment (up to `max_delay` s) after its
    first checkpoint appears; wait for `whole` to finish (checked)."""
    whole = subprocess.Popen(train_command(cache_dir, *overrides, loss=loss, exp_name='whole'), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(train_command(cache_dir, *overrides, loss=loss, exp_name='killed'), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(cache_dir, 'killed', 'LATEST', 'trainer_state.pt')
    deadline = time.time() + 300
    while not os.path.exists(state) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, max_delay))  # a random moment: mid-step, mid-eval or mid-save
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait(timeout=timeout) == 0, whole.stderr.read()[-3000:]


def run_in_process(script: str, argv: List[str], hydra_dir) -> str:
    """Run train.py's or eval.py's Hydra main in this process (the same code path as the command line, without
    a second interpreter's imports); returns what it printed. Hydra's own files go to `hydra_dir`."""
    import contextlib
    import importlib
    import io
    module = importlib.import_module(script[:-len('.py')])
    config_path = [f'--config-path={ROOT}/config'] if script == 'train.py' else []
    saved_argv, printed = sys.argv, io.StringIO()
    sys.argv = [script, *config_path, *argv, f'hydra.run.dir={hydra_dir}']
    try:
        with contextlib.redirect_stdout(printed):
            module.main()
    finally:
        sys.argv = saved_argv
    return printed.getvalue()


def train_in_process(cache_dir, *overrides, loss='dpo', exp_name='test') -> str:
    return run_in_process('train.py', base_overrides(cache_dir, loss, exp_name) + list(overrides),
                          os.path.join(cache_dir, 'hydra', exp_name))


def eval_in_process(run_dir, *overrides) -> str:
    return run_in_process('eval.py', [f'--config-path={run_dir}', *overrides], os.path.join(run_dir, 'hydra_eval'))
