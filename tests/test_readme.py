"""The README's "Implementing a new HALO" walkthrough works exactly as written."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import trainers
from helpers import DATA, ROOT

README = open(os.path.join(ROOT, 'README.md')).read()


def block(language, after):
    """The first fenced block of `language` after the text `after`."""
    start = README.index(after)
    match = re.compile(rf'```{language}\n(.*?)```', re.S).search(README, start)
    return match.group(1)


def test_the_walkthrough_loss_equals_the_shipped_simple_kto():
    namespace = dict(vars(trainers))
    exec(block('python', 'Append to `trainers.py`'), namespace)
    trainer = namespace['MySimpleKTOTrainer'].__new__(namespace['MySimpleKTOTrainer'])
    shipped = trainers.SimpleKTOTrainer.__new__(trainers.SimpleKTOTrainer)
    import types
    trainer.config = shipped.config = types.SimpleNamespace(loss=types.SimpleNamespace(beta=0.1))
    inputs = [torch.tensor(v) for v in ([-10., -12., -8., -15.], [-11., -9., -14., -13.],
                                        [-10.5, -11., -9., -14.], [-10., -10., -13., -14.5])]
    for ours, reference in zip(trainer.loss(*inputs), shipped.loss(*inputs)):
        assert torch.allclose(ours, reference)
    assert trainer.loss(*inputs)[0].mean().item() == pytest.approx(0.504676, abs=1e-6)


@pytest.mark.slow
def test_the_walkthrough_trains(tmp_path):
    repo = tmp_path / 'repo'
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns('.venv', '.git', 'runs', '__pycache__', '.cache'))
    with open(repo / 'trainers.py', 'a') as f:
        f.write('\n\n' + block('python', 'Append to `trainers.py`'))
    (repo / 'config' / 'loss' / 'my-kto-simple.yaml').write_text(block('yaml', 'create `config/loss/my-kto-simple.yaml`'))
    command = block('bash', 'and train:').split()
    assert command[:3] == ['python', 'train.py', 'loss=my-kto-simple']
    command = [sys.executable] + [arg.replace('model=smollm2', 'model=tiny') for arg in command[1:]]
    command += [f'++data_dir={DATA}', '++n_examples=8', f'++cache_dir={tmp_path}', '++wandb.enabled=false',
                '++n_eval_examples=8']
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / 'my_kto_simple' / 'LATEST' / 'policy.pt', weights_only=True)
    assert saved['step_idx'] == 8 and 'rewards_eval/accuracies' in saved['metrics']
