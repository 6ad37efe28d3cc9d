"""The README's "Implementing a new HALO" walkthrough works exactly as written."""
import os
import re
import shlex
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
    trainer_class = namespace['MySimpleKTOTrainer']
    trainer = trainer_class.__new__(trainer_class)
    shipped = trainers.SimpleKTOTrainer.__new__(trainers.SimpleKTOTrainer)
    trainer.params, shipped.params = trainer_class.Params(beta=0.1), trainers.SimpleKTOTrainer.Params(beta=0.1)
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


def commands(program):
    """The arguments of every `python <program> ...` command in the README's bash blocks."""
    for text in re.findall(r'```bash\n(.*?)```', README, re.S):
        for line in text.replace('\\\n', ' ').splitlines():
            line = line.split(' # ')[0].strip()
            if line.startswith(f'python {program} '):
                yield shlex.split(line)[2:]


def test_every_readme_command_line_passes_the_settings_check(monkeypatch):
    """Each train.py and eval.py command of the README composes and passes the start-up checks (train.py's
    path, in this process; eval.py's against halos' config, its run directory standing in); label.py's and
    compare.py's parse."""
    import compare
    import eval as eval_script
    import label
    from halos.build import run_settings
    from helpers import compose_config
    monkeypatch.chdir(ROOT)
    trained = [args for args in commands('train.py') if 'loss=my-kto-simple' not in args]  # the walkthrough's: above
    for args in trained:
        settings = run_settings(compose_config(args), args)
        assert settings.mode == 'train' and settings.exp_name in ' '.join(args)
    evaluated = list(commands('eval.py'))
    for args in evaluated:
        overrides = ['loss=sft', 'model=tiny', 'exp_name=run', 'datasets=[hh]', 'mode=train'] + args[1:]
        assert eval_script.checked(run_settings(compose_config(overrides), overrides)).mode == args[1].split('=')[1]
    assert len(trained) >= 6 and len(evaluated) == 4
    for args in commands('compare.py'):
        compare.parse_args(args)
    assert [label.parse_args(args.split()) for args in re.findall(r'`python label.py (.*?)`', README.replace('\n', ' '))]
