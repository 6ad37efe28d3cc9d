"""Mistakes a user can fix end train.py and eval.py with one line on stderr that names the file, record and
field (or the config key, or the checkpoint), and exit status 2, without a traceback.

The entry points' Hydra mains run in this process (fast); one case also runs as a real command line.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import DATA, ROOT, base_overrides


def feedback_file(directory, name, lines=None, content=None):
    path = directory / name
    if content is not None:
        path.write_bytes(content)
    else:
        path.write_text(''.join(json.dumps(line) + '\n' for line in lines))
    return str(path)


def torch_optimizers():
    """torch.optim's optimizers but LBFGS (it steps through a closure), SparseAdam (sparse gradients) and Muon
    (matrices only), which cannot step a language model."""
    import torch
    return sorted(name for name, c in vars(torch.optim).items()
                  if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
                  and name not in ('LBFGS', 'SparseAdam', 'Muon'))


CASES = ['missing field', 'not UTF-8', 'empty feedback file', 'identical outputs', 'unknown role', 'one split only',
         'unknown key', 'unknown loss key', 'missing load_from', 'resume without a checkpoint', 'bad optimizer',
         'eval: unknown key', 'eval: unknown mode', 'load_from not a checkpoint', 'load_from empty',
         'reward function syntax', 'unknown loss choice', 'a number as the loss', 'eval: saved_policy not a checkpoint', 'eval: no reward function',
         'resume a corrupt checkpoint', 'resume a checkpoint without its optimizer', 'eval: a loss choice', 'scores alike in every group', 'unlabelled samples',
         'prompts only, offline', 'missing feedback file', 'model not there', 'not a model directory',
         'reward model not there', 'eval: a run without a checkpoint', 'binary feedback for a pair loss',
         'online prompts not there', 'unknown key without ++', 'unknown loss key without ++',
         'unknown key without ++, nothing close', 'load_from an optimizer file', 'no chat template',
         'load_from a run directory', 'demonstrations for a pair loss', 'an optimizer that cannot step a model',
         "eval.py's mode given to train.py", 'loss.name on the command line', 'a character Hydra reads only quoted',
         'an override Hydra cannot read']


@pytest.fixture(scope='module')
def made_once(tmp_path_factory):
    """Files some cases need, made once for the module (every case is built for each test): the tiny model's
    tokenizer without its chat template, and a run's optimizer.pt (its 'state' maps parameter numbers to dicts)."""
    import torch

    import models
    directory = tmp_path_factory.mktemp('made_once')
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    tokenizer.chat_template = None
    tokenizer.save_pretrained(directory / 'tokenizer_without_template')
    torch.save({'state': {0: {'step': torch.tensor(1.0)}}, 'param_groups': [{'lr': 1e-3, 'params': [0]}]},
               directory / 'optimizer.pt')
    return directory


def cases(tmp_path, made_once):
    """name -> (script, overrides, the exact message after '<script>: ')."""
    binary = {'prompt': 'Say hi.', 'output': 'Hi!', 'label': 1}
    latin1 = feedback_file(tmp_path, 'latin1.jsonl', content=b'{"prompt": "Caf\xe9?", "output": "Oui.", "label": 1}\n')
    empty = feedback_file(tmp_path, 'empty.jsonl', content=b'')
    binary_only = feedback_file(tmp_path, 'binary.jsonl', [binary])
    demonstrations = feedback_file(tmp_path, 'demonstrations.jsonl', [{'messages': [
        {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]}])
    same = feedback_file(tmp_path, 'same.jsonl', [binary, {'prompt': 'Pick one.', 'output_A': 'This one.',
                                                           'output_B': 'This one.', 'label': 1}])
    role = feedback_file(tmp_path, 'role.jsonl', [binary, {'prompt': [{'role': 'user', 'content': 'Hi'},
                                                                      {'role': 'bot', 'content': 'Hello'},
                                                                      {'role': 'user', 'content': 'Bye'}],
                                                           'output': 'Bye!', 'label': 0}])
    alike = feedback_file(tmp_path, 'alike.jsonl', [{'prompt': 'Say hi.', 'output': 'Hi!', 'reward': 0.5},
                                                    {'prompt': 'Say hi.', 'output': 'Hello!', 'reward': 0.5},
                                                    {'prompt': 'Say bye.', 'output': 'Bye!', 'reward': 2.0}])
    prompts = os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')
    no_template, optimizer_file = made_once / 'tokenizer_without_template', made_once / 'optimizer.pt'
    unlabelled = feedback_file(tmp_path, 'run_samples.jsonl', [{'prompt': 'Say hi.', 'output': 'Hi!', 'prompt_id': 'a',
                                                                'sample_id': 0, 'type': 'sample'}])
    train_only = feedback_file(tmp_path, 'train_only.jsonl', [{'prompt': 'Pick one.', 'output_A': 'This one.',
                                                                'output_B': 'That one.', 'label': 1, 'split': 'train'}])
    missing = os.path.join(DATA, 'bad', 'missing_field.jsonl')
    notes = tmp_path / 'notes.txt'
    notes.write_text('these are my notes, not weights\n')
    (tmp_path / 'empty.pt').write_bytes(b'')
    (tmp_path / 'syntax.py').write_text('def reward(prompt, completion):\n    return 1.0 +\n')
    online = ['++online.rounds=1', '++online.prompts=data/upbeat/train_prompts.jsonl']
    latest = tmp_path / 'corrupt' / 'LATEST'
    latest.mkdir(parents=True)
    with zipfile.ZipFile(latest / 'policy.pt', 'w') as archive:  # a zip, as torch writes, without its pickle
        archive.writestr('hello.txt', 'hello')
    for name in ('trainer_state.pt', 'optimizer.pt', 'scheduler.pt'):
        (latest / name).write_bytes(b'')
    unfinished = tmp_path / 'unfinished' / 'LATEST'
    shutil.copytree(latest, unfinished)
    (unfinished / 'optimizer.pt').unlink()
    return {
        'eval: a loss choice': ('eval.py', ['++mode=sample', 'loss=kto'],
                                "loss=kto: loss must be a group of keys (a run directory's config.yaml holds its own; "
                                "change one with ++loss.<key>=...)"),
        'resume a corrupt checkpoint': ('train.py', ['++resume=true', '++exp_name=corrupt'],
                                        f"{latest}/policy.pt: not a checkpoint torch can read: it holds a zip archive "
                                        f"of 1 files (hello.txt)"),
        'resume a checkpoint without its optimizer': ('train.py', ['++resume=true', '++exp_name=unfinished'],
                                                      f"resume=true but the checkpoint in {unfinished} lacks "
                                                      f"optimizer.pt, so it cannot be resumed; ++model.load_from="
                                                      f"{unfinished}/policy.pt starts a new run from its weights"),
        'load_from not a checkpoint': ('train.py', [f'++model.load_from={notes}'],
                                       f"model.load_from={notes}: not a checkpoint (a policy.pt that torch.save wrote): "
                                       f"it holds text ('these are my notes, not weights')"),
        'load_from a run directory': ('train.py', [f"++model.load_from={tmp_path / 'corrupt'}"],
                                      f"model.load_from={tmp_path / 'corrupt'}: a run directory; give its checkpoint, "
                                      f"model.load_from={latest}/policy.pt"),
        'load_from empty': ('train.py', [f'++model.load_from={tmp_path}/empty.pt'],
                            f"model.load_from={tmp_path}/empty.pt: not a checkpoint (a policy.pt that torch.save "
                            f"wrote): it holds nothing (an empty file)"),
        'reward function syntax': ('train.py', online + [f'++online.reward_function={tmp_path}/syntax.py:reward'],
                                   f"reward function '{tmp_path}/syntax.py:reward': {tmp_path}/syntax.py line 2: "
                                   f"invalid syntax"),
        'unknown loss choice': ('train.py', ['loss=dpoo'], "loss=dpoo: config/loss has no dpoo.yaml; the choices are "
                                                           + ', '.join(sorted(name[:-5] for name in os.listdir(
                                                               os.path.join(ROOT, 'config', 'loss'))))),
        'a number as the loss': ('train.py', ['loss=1'], "loss=1: loss takes the name of a config/loss/*.yaml, one of "
                                 + ', '.join(sorted(name[:-5] for name in os.listdir(os.path.join(ROOT, 'config',
                                                                                                  'loss'))))),
        'eval: saved_policy not a checkpoint': ('eval.py', ['++mode=sample', f'++saved_policy={notes}'],
                                                f"saved_policy={notes}: not a checkpoint (a policy.pt that torch.save "
                                                f"wrote): it holds text ('these are my notes, not weights')"),
        'eval: a run without a checkpoint': ('eval.py', ['++mode=sample', f'++saved_policy={tmp_path}/run/LATEST/policy.pt'],
                                             f"saved_policy={tmp_path}/run/LATEST/policy.pt does not exist: the run has "
                                             f"no checkpoint yet (train it, or continue it with ++resume=true), or give "
                                             f"++saved_policy=<a policy.pt or an HF directory>"),
        'eval: no reward function': ('eval.py', ['++mode=reward'],
                                     "mode=reward needs ++reward_function=path/to/file.py:function (the run scored "
                                     "with none of its own), or a reward model or judge: ++online.labeler="
                                     "reward_model ++online.reward_model=<dir> (or ++online.labeler=judge "
                                     "++online.judge=<name>)"),
        'missing field': ('train.py', [f'datasets=[{missing}]'],
                          f"{missing}: record 3: missing field 'output_B'"),
        'not UTF-8': ('train.py', [f'datasets=[{latin1}]'],
                      f"{latin1}: not UTF-8 text (byte 15, line 1: invalid continuation byte); save the file as UTF-8"),
        'empty feedback file': ('train.py', [f'datasets=[{empty}]'],
                                f"{empty}: the file holds no records (of feedback, or prompts to sample)"),
        'missing feedback file': ('train.py', [f'datasets=[{tmp_path}/nowhere.jsonl]'],
                                  f"{tmp_path}/nowhere.jsonl: no such file (a .json/.jsonl/.parquet file of feedback records "
                                  f"or prompts)"),
        'identical outputs': ('train.py', [f'datasets=[{same}]'],
                              f"{same}: record 2: fields 'output_A' and 'output_B' are the same text; a preference "
                              f"needs two different outputs"),
        'scores alike in every group': ('train.py', [f'datasets=[{alike}]', 'loss=grpo'],
                                        f"{alike}: all completions of each prompt share one score (2 prompts), so "
                                        f"every advantage would be 0 and training would learn nothing; a prompt needs "
                                        f"completions with different rewards (or desirable and undesirable ones)"),
        'prompts only, offline': ('train.py', [f"datasets=[{prompts}]", 'loss=kto'],
                                  f"{prompts}: 110 prompts and no completions to train on: sample and label them "
                                  f"first (eval.py ++mode=sample ++num_samples_per_prompt=k, then label.py), or train "
                                  f"online on them (++online.rounds=N, or loss=grpo-online)"),
        'unlabelled samples': ('train.py', [f'datasets=[{unlabelled}]'],
                               f"{unlabelled}: record 1: an unlabelled sample (type 'sample', as eval.py writes it); "
                               f"label the file first: python label.py {unlabelled} feedback.jsonl --reward-function "
                               f"file.py:function (or --reward-model, --judge)"),
        'model not there': ('train.py', [f'++model.name_or_path={tmp_path}/no_model'],
                            f"model.name_or_path='{tmp_path}/no_model': no such directory (a model is a local HF "
                            f"directory, a hub id or embedded:<name>)"),
        'not a model directory': ('eval.py', ['++mode=sample', f'++model.name_or_path={tmp_path}'],
                                  f"model.name_or_path='{tmp_path}': not an HF model directory (it has no config.json "
                                  f"or tokenizer_config.json)"),
        'reward model not there': ('train.py', online + ['++online.labeler=reward_model',
                                                         f'++online.reward_model={tmp_path}/rm/LATEST/hf'],
                                   f"online.reward_model='{tmp_path}/rm/LATEST/hf': no such directory (a model is a "
                                   f"local HF directory, a hub id or embedded:<name>)"),
        'binary feedback for a pair loss': ('train.py', [f'datasets=[{binary_only}]'],
                                            f"{binary_only}: binary feedback (desirable and undesirable outputs), and "
                                            f"PairedPreferenceDataLoader (loss.dataloader) trains on preference pairs: "
                                            f"choose a loss for this feedback (binary: csft, grpo, kto-simple, kto-zero, "
                                            f"kto, ppo, sft), or label the samples as pairwise feedback (label.py "
                                            f"--feedback pairwise) ({binary_only}: prompts 1, {binary_only}: records 1, "
                                            f"items 0, prompts without pairs 1)"),
        'demonstrations for a pair loss': ('train.py', [f'datasets=[{demonstrations}]'],
                                           f"{demonstrations}: demonstrations (outputs without a label or a score), "
                                           f"and PairedPreferenceDataLoader (loss.dataloader) trains on preference "
                                           f"pairs: choose a loss for this feedback (demonstration: sft), or label "
                                           f"the samples as pairwise feedback (label.py --feedback pairwise) "
                                           f"({demonstrations}: prompts 1, {demonstrations}: records 1, items 0, "
                                           f"prompts without pairs 1)"),
        'online prompts not there': ('train.py', ['++online.rounds=1', f'++online.prompts={tmp_path}/no_prompts.jsonl',
                                                  f"++online.reward_function={ROOT}/tests/rewards.py:vowels"],
                                     f"{tmp_path}/no_prompts.jsonl: no such file (a .json/.jsonl/.parquet file of feedback "
                                     f"records or prompts)"),
        'unknown role': ('train.py', [f'datasets=[{role}]'],
                         f"{role}: record 2: field 'prompt' turn 2 has role 'bot'; roles are user, assistant, system"),
        'one split only': ('train.py', [f'datasets=[{train_only}]'],
                           f"{train_only}: no records for split 'test': every record's 'split' field names another "
                           f"split (train); records without a 'split' field are used for both splits; or train "
                           f"without evaluating: ++n_eval_examples=0"),
        'unknown key': ('train.py', ['++model.bach_size=8'],
                        "++model.bach_size=8: no config defines the key 'model.bach_size'; did you mean model.batch_size or "
                        "model.eval_batch_size?"),
        'unknown loss key': ('train.py', ['++loss.betta=0.2'],
                             "++loss.betta=0.2: no config defines the key 'loss.betta'; did you mean loss.beta?"),
        'unknown key without ++': ('train.py', ['model.bach_size=8'],
                                   "model.bach_size=8: no config defines the key 'model.bach_size'; did you mean "
                                   "model.batch_size or model.eval_batch_size?"),
        'unknown loss key without ++': ('train.py', ['loss.betta=0.2'],
                                        "loss.betta=0.2: no config defines the key 'loss.betta'; did you mean "
                                        "loss.beta?"),
        'unknown key without ++, nothing close': ('train.py', ['qqq=1'],
                                                  "qqq=1: no config defines the key 'qqq'; no key is close to it "
                                                  "(docs/training.md lists them)"),
        'no chat template': ('train.py', ['++use_chat_template=true', f'++model.tokenizer_name_or_path={no_template}'],
                             f"use_chat_template=true, but the tokenizer of {no_template} has no chat template: set "
                             f"use_chat_template=false (prompts then take human_prefix and assistant_prefix), or give "
                             f"model.tokenizer_name_or_path a tokenizer that has one"),
        'load_from an optimizer file': ('train.py', [f'++model.load_from={optimizer_file}'],
                                        f"{optimizer_file}: not a policy checkpoint: its 'state' maps 0 to a dict, where "
                                        f"a policy's maps each parameter's name to its tensor"),
        'missing load_from': ('train.py', ['++model.load_from=no_run/LATEST/policy.pt'],
                              f"model.load_from='no_run/LATEST/policy.pt' does not exist (looked in "
                              f"cache_dir='{tmp_path}' and the working directory); give a policy.pt file or an HF "
                              f"model directory"),
        'resume without a checkpoint': ('train.py', ['++resume=true'],
                                        f"resume=true but there is no complete checkpoint in {tmp_path}/test/LATEST (to start "
                                        f"afresh, give ++resume=false)"),
        'an optimizer that cannot step a model': ('train.py', ['++optimizer=LBFGS'],
                                                  f"++optimizer=LBFGS: optimizer must be one of "
                                                  f"{', '.join(torch_optimizers())}"),
        'bad optimizer': ('train.py', ['++optimizer=Adamm'],
                          f"++optimizer=Adamm: optimizer must be one of {', '.join(torch_optimizers())} (did you "
                          f"mean Adam?)"),
        'eval: unknown key': ('eval.py', ['++n_sample=3'],
                              "++n_sample=3: no config defines the key 'n_sample'; did you mean n_samples?"),
        'a character Hydra reads only quoted': ('train.py', ['++exp_name=run_✓'], "++exp_name=run_✓: Hydra reads "
                                                "'✓' only inside quotes: quote the value inside the shell's quotes, "
                                                "'++exp_name=\"run_✓\"'"),
        'an override Hydra cannot read': ('train.py', ['++lr=[1,'], "++lr=[1,: Hydra cannot read it: no viable "
                                                                   "alternative at input '[1,'"),
        'loss.name on the command line': ('train.py', ['++loss.name=sft'], "++loss.name=sft: loss.name is the name "
                                          "of the loss YAML that loss=<name> chooses (a resume checks it): choose the "
                                          "loss with loss=<name>"),
        "eval.py's mode given to train.py": ('train.py', ['++mode=eval'], "mode=eval: train.py trains, with "
                                             "mode=train; eval.py does the others: python eval.py --config-path=<a run "
                                             "directory> ++mode=eval"),
        'eval: unknown mode': ('eval.py', ['++mode=samples'], "++mode=samples: mode must be one of train, sample, eval, "
                                                              "alpacaeval, reward, lm_eval (did you mean sample?)"),
    }


def last_line(stderr: str) -> str:
    """The last line written (progress bars before it redraw with carriage returns)."""
    return [line for line in stderr.splitlines() if line.strip()][-1]


def run_in_process(monkeypatch, capsys, script: str, argv: list):
    """Run train.py's or eval.py's main (the Hydra entry point) in this process; (exit status, stderr)."""
    import importlib
    module = importlib.import_module(script[:-len('.py')])
    monkeypatch.delenv('HYDRA_FULL_ERROR', raising=False)
    monkeypatch.setattr(sys, 'argv', [script] + argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        module.main()
    return exit.value.code, capsys.readouterr().err


def test_every_case_is_run(tmp_path, made_once):
    assert sorted(CASES) == sorted(cases(tmp_path, made_once))


@pytest.mark.parametrize('name', CASES)
def test_a_user_error_ends_with_one_line_and_status_2(tmp_path, made_once, monkeypatch, capsys, name):
    script, overrides, message = cases(tmp_path, made_once)[name]
    hydra_dir = [f'hydra.run.dir={tmp_path / "hydra"}']
    if script == 'train.py':
        argv = [f'--config-path={ROOT}/config'] + base_overrides(tmp_path, 'dpo', 'test') + hydra_dir + overrides
    else:
        from helpers import make_config
        from omegaconf import OmegaConf

        from halos.settings import as_dict
        run_dir = tmp_path / 'run'
        run_dir.mkdir()
        (run_dir / 'config.yaml').write_text(OmegaConf.to_yaml(as_dict(make_config(tmp_path, loss='sft'))))  # as train.py saves it
        argv = [f'--config-path={run_dir}'] + hydra_dir + overrides
    status, stderr = run_in_process(monkeypatch, capsys, script, argv)
    assert status == 2, stderr[-2000:]
    assert 'Traceback' not in stderr and 'HYDRA_FULL_ERROR' not in stderr
    assert last_line(stderr) == f'{script}: {message}'


def test_eval_py_without_a_config_path_says_which_to_give(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), f'hydra.run.dir={tmp_path}', '++mode=sample'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and last_line(result.stderr) == (
        "eval.py: no config.yaml to start from: give --config-path=<a run directory> (the config.yaml the run saved) "
        "or --config-path=config (halos' defaults)")


def test_a_run_directory_given_as_config_dir_is_pointed_to_config_path(tmp_path, monkeypatch, capsys):
    (tmp_path / 'config.yaml').write_text('exp_name: run\n')
    status, stderr = run_in_process(monkeypatch, capsys, 'train.py', [
        '--config-dir', str(tmp_path), f'hydra.run.dir={tmp_path / "hydra"}', '++resume=true'])
    assert status == 2 and last_line(stderr).endswith(
        f"slic (--config-dir={tmp_path} adds config groups, and its config.yaml is not read: to compose from it, give "
        f"--config-path={tmp_path})")


def test_a_copied_config_without_the_config_groups_beside_it_is_pointed_to_them(tmp_path, monkeypatch, capsys):
    (tmp_path / 'my.yaml').write_text(open(os.path.join(ROOT, 'config', 'config.yaml')).read())
    for choices in (['loss=dpo', 'model=tiny'], []):  # a loss it cannot find, or none to choose from
        status, stderr = run_in_process(monkeypatch, capsys, 'train.py', [
            f'--config-path={tmp_path}', '--config-name=my', f'hydra.run.dir={tmp_path / "hydra"}', *choices])
        assert status == 2 and last_line(stderr) == (
            f"train.py: --config-path={tmp_path} has no loss/ directory of config groups, which its config chooses "
            f"from: add --config-dir={ROOT}/config to choose halos' loss=<name>")


def test_a_config_name_that_is_not_there_is_named(tmp_path, monkeypatch, capsys):
    status, stderr = run_in_process(monkeypatch, capsys, 'train.py', [
        '--config-name=nosuch', f'hydra.run.dir={tmp_path}', 'loss=sft', 'model=tiny'])
    assert status == 2 and last_line(stderr) == ("train.py: --config-name=nosuch: no nosuch.yaml in the config directory "
                                                 "(halos' config is config.yaml: leave --config-name out)")


def test_eval_py_names_a_config_path_that_is_not_there(tmp_path, monkeypatch, capsys):
    status, stderr = run_in_process(monkeypatch, capsys, 'eval.py', [
        f'--config-path={tmp_path}/runs/nosuch', f'hydra.run.dir={tmp_path}', '++mode=sample'])
    assert status == 2 and last_line(stderr) == (
        f"eval.py: --config-path={tmp_path}/runs/nosuch: no such directory; give a run directory "
        "(<cache_dir>/<exp_name>, where train.py saved config.yaml) or --config-path=config (halos' defaults)")


def test_a_config_flag_after_an_override_is_hydras_flag_still():
    from halos.cli import config_flags_first
    assert config_flags_first(['++a=1', '--config-path=runs/x', '++b=2', '-cn', 'config', 'c=3']) == [
        '--config-path=runs/x', '-cn', 'config', '++a=1', '++b=2', 'c=3']
    assert config_flags_first(['++a=1', '--config-path']) == ['--config-path', '++a=1']  # Hydra names what lacks
    overrides = ['--config-path', 'runs/x', '++a=1']
    assert config_flags_first(overrides) == overrides


def test_a_config_path_from_the_working_directory_or_to_a_config_file_is_taken(tmp_path, monkeypatch):
    from halos.cli import config_flags_first
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'config.yaml').write_text('loss: {}\n')
    monkeypatch.chdir(tmp_path)  # Hydra would read a relative path against the script's directory
    assert config_flags_first(['++a=1', '--config-path', 'run']) == [f'--config-path={tmp_path}/run', '++a=1']
    assert config_flags_first(['-cp=run/config.yaml', '++a=1']) == [f'--config-path={tmp_path}/run',
                                                                     '--config-name=config', '++a=1']


def test_eval_py_takes_its_config_path_after_an_override(tmp_path, monkeypatch, capsys):
    status, stderr = run_in_process(monkeypatch, capsys, 'eval.py', [
        f'hydra.run.dir={tmp_path}', f'--config-path={tmp_path}/runs/nosuch', '++mode=sample'])
    assert status == 2 and f"eval.py: --config-path={tmp_path}/runs/nosuch: no such directory" in last_line(stderr)


def test_a_reward_function_that_raises_mid_run_ends_it_with_its_line_last(tmp_path):
    """The training progress bar is closed before the error is printed, so the error is the last line."""
    (tmp_path / 'broken.py').write_text('def reward(prompt, completion):\n    return len(completion) / 0\n')
    command = [sys.executable, os.path.join(ROOT, 'train.py')] + base_overrides(
        tmp_path, 'rloo', datasets=f"[{os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')}]") + [
        f'++online.reward_function={tmp_path}/broken.py:reward', '++do_first_eval=false', '++n_examples=2',
        '++model.batch_size=2', '++max_new_tokens=4', f'hydra.run.dir={tmp_path}/hydra']
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert re.fullmatch(rf"train\.py: reward function {tmp_path}/broken\.py:reward failed on step 0 prompt \w+ sample "
                        rf"0: it raised ZeroDivisionError: division by zero", last_line(result.stderr.replace('\r', '\n')))


def test_the_command_line_exits_with_status_2_and_hydra_full_error_shows_the_traceback(tmp_path):
    command = [sys.executable, os.path.join(ROOT, 'train.py')] + base_overrides(tmp_path) + ['++model.bach_size=8']
    env = {key: value for key, value in os.environ.items() if key != 'HYDRA_FULL_ERROR'}
    plain = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert plain.returncode == 2 and 'Traceback' not in plain.stderr
    assert last_line(plain.stderr).startswith("train.py: ++model.bach_size=8: no config defines the key")
    full = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(env, HYDRA_FULL_ERROR='1'))
    assert full.returncode == 1 and 'Traceback' in full.stderr and 'ConfigError' in full.stderr


def test_every_other_entry_point_ends_a_mistake_with_one_line_and_status_2(tmp_path, capsys):
    import visualize
    missing = tmp_path / 'results.jsonl'
    with pytest.raises(SystemExit) as exit_:
        visualize.main([str(missing)])
    # the last line: a first import of matplotlib on a fresh machine first says that it builds its font cache
    assert exit_.value.code == 2 and last_line(capsys.readouterr().err) == f'visualize.py: {missing}: no such file'
    missing.write_text('{"judge": "j"}\n')
    with pytest.raises(SystemExit):
        visualize.main([str(missing)])
    assert last_line(capsys.readouterr().err) == (f'visualize.py: {missing}: line 1 lacks candidate, baseline: not a '
                                               f'compare.py result line')
    missing.write_text('{"judge": "j", "candidate": {}, "baseline": {}}\n[1]\n')
    with pytest.raises(SystemExit):
        visualize.main([str(missing)])
    assert last_line(capsys.readouterr().err) == (f'visualize.py: {missing}: line 2 is not a JSON object (a record): '
                                               f'not a compare.py result line')
    missing.write_text('{"judge": "j", "candidate": {}, "baseline": {}}\n')
    with pytest.raises(SystemExit):
        visualize.main([str(missing)])
    assert last_line(capsys.readouterr().err) == (f'visualize.py: {missing}: result 1 has neither win_rate nor total: '
                                               f'not a compare.py result line')
    quality = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'quality.py'), '--prompts-train', 'nope.jsonl'],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert quality.returncode == 2 and quality.stderr.strip() == (
        'quality.py: argument --prompts-train: no such file: nope.jsonl (--help lists the arguments)')
    stackllama = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'stackllama.py'), '--new-tokens', '0'],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)  # before any stage starts
    assert stackllama.returncode == 2 and stackllama.stderr.strip() == (
        'stackllama.py: argument --new-tokens: 0 is not an integer >= 1 (--help lists the arguments)')


def test_an_output_that_is_an_input_stops_label_py_and_compare_py_before_anything_is_written(tmp_path, capsys):
    import compare
    import label
    samples = tmp_path / 'samples.jsonl'
    samples.write_text(open(os.path.join(DATA, 'upbeat', 'samples.jsonl')).read())
    content = samples.read_text()
    same = str(tmp_path / '.' / 'samples.jsonl')
    assert label.main([str(samples), same, '--reward-function', 'data/upbeat/reward.py:reward']) == 2
    assert last_line(capsys.readouterr().err) == (f"label.py: samples and output are the same file ({same}): give "
                                                  f"output another path")
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--judge', 'j', '--cache', str(samples)]) == 2
    assert last_line(capsys.readouterr().err) == (f"label.py: samples and --cache are the same file ({samples}): give "
                                                  f"--cache another path")
    eval_samples = tmp_path / 'run.json'
    eval_samples.write_text('{"config": {}, "samples": []}')
    assert compare.main(['-f', str(eval_samples), '-r', str(eval_samples)]) == 2
    assert last_line(capsys.readouterr().err) == (f"compare.py: --file and --results_file are the same file "
                                                  f"({eval_samples}): give --results_file another path")
    assert samples.read_text() == content and eval_samples.read_text() == '{"config": {}, "samples": []}'


@pytest.fixture
def sigint_handler_kept():
    """An answered Ctrl-C sets the next one's handler: this test process keeps its own."""
    import signal
    kept = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, kept)


def test_ctrl_c_in_an_entry_point_ends_with_one_line_and_status_130(tmp_path, capsys, monkeypatch, sigint_handler_kept):
    import label
    from halos.errors import reported_as_one_line
    monkeypatch.delenv('HYDRA_FULL_ERROR', raising=False)
    with pytest.raises(SystemExit) as exit_, reported_as_one_line('eval.py'):
        raise KeyboardInterrupt
    assert exit_.value.code == 130 and capsys.readouterr().err == '\neval.py: interrupted\n'
    monkeypatch.setenv('LOCAL_RANK', '1')  # under torchrun the Ctrl-C reaches every process: one per node says so
    with pytest.raises(SystemExit) as exit_, reported_as_one_line('train.py'):
        raise KeyboardInterrupt
    assert exit_.value.code == 130 and capsys.readouterr().err == ''
    monkeypatch.delenv('LOCAL_RANK')

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(label, 'run', interrupted)
    assert label.main([str(tmp_path / 'samples.jsonl'), str(tmp_path / 'out.jsonl'), '--reward-function', 'r.py:f']) == 130
    assert last_line(capsys.readouterr().err) == (f"label.py: interrupted before {tmp_path}/out.jsonl was written (a "
                                                  f"judge's answers so far are cached for the rerun)")


def test_a_second_ctrl_c_while_the_exit_handlers_run_ends_the_process_without_a_traceback(tmp_path):
    """As a user pressing Ctrl-C twice (or `timeout -s INT`, which signals the process and its group) does."""
    import signal
    import time
    ready = tmp_path / 'ready'
    script = (f"import atexit, pathlib, sys, time\nsys.path.insert(0, {ROOT!r})\n"
              f"from halos.errors import reported_as_one_line\n"
              f"atexit.register(lambda: (pathlib.Path({str(ready)!r}).write_text('exiting'), time.sleep(30)))\n"
              f"with reported_as_one_line('train.py'):\n"
              f"    pathlib.Path({str(ready)!r}).write_text('running')\n"
              f"    time.sleep(30)\n")
    process = subprocess.Popen([sys.executable, '-c', script], stderr=subprocess.PIPE, text=True)
    for state in ('running', 'exiting'):
        while not (ready.exists() and ready.read_text() == state) and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 130
    assert process.stderr.read() == '\ntrain.py: interrupted\n'


def test_a_file_system_refusal_ends_with_one_line_naming_the_path_and_other_os_errors_keep_their_traceback(
        tmp_path, capsys, monkeypatch):
    import errno

    from halos.errors import reported_as_one_line
    monkeypatch.delenv('HYDRA_FULL_ERROR', raising=False)
    with pytest.raises(SystemExit) as exit_, reported_as_one_line('train.py'):
        raise PermissionError(errno.EACCES, 'Permission denied', '/data/runs/x')
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        'train.py: /data/runs/x: Permission denied\n')
    a_file = tmp_path / 'a_file'
    a_file.write_text('')
    with pytest.raises(SystemExit), reported_as_one_line('train.py'):
        os.makedirs(a_file / 'runs')  # a file where a directory must be
    assert capsys.readouterr().err == f'train.py: {a_file}/runs: Not a directory\n'
    with pytest.raises(SystemExit), reported_as_one_line('train.py'):
        open(tmp_path, 'w')  # a directory where a file must be
    assert capsys.readouterr().err == f'train.py: {tmp_path}: Is a directory\n'
    with pytest.raises(SystemExit), reported_as_one_line('eval.py'):
        os.makedirs(a_file, exist_ok=True)  # e.g. ++samples_dir=<a file>
    assert capsys.readouterr().err == f'eval.py: {a_file}: a file, where a directory must be\n'
    with pytest.raises(SystemExit), reported_as_one_line('train.py'):
        os.makedirs(tmp_path / ('x' * 300))  # e.g. an exp_name a sweep built from many values
    assert capsys.readouterr().err == f"train.py: {tmp_path / ('x' * 300)}: File name too long\n"
    with pytest.raises(ConnectionResetError), reported_as_one_line('train.py'):
        raise ConnectionResetError(errno.ECONNRESET, 'Connection reset by peer')


def test_a_config_file_that_is_not_valid_yaml_is_named_with_its_line(tmp_path, monkeypatch, capsys):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'config.yaml').write_text('loss:\n  name: dpo\n beta: 0.1\n')  # a user's edit gone wrong
    status, stderr = run_in_process(monkeypatch, capsys, 'eval.py', [
        f'--config-path={tmp_path}/run', f'hydra.run.dir={tmp_path}', '++mode=sample'])
    assert status == 2 and last_line(stderr) == (f"eval.py: {tmp_path}/run/config.yaml line 3, column 2: not valid "
                                                 f"YAML: expected <block end>, but found '<block mapping start>'")


def test_wandb_that_does_not_start_ends_in_one_line(tmp_path, monkeypatch):
    import wandb

    import train
    from halos.errors import ConfigError
    from helpers import make_config

    def refuse(**kwargs):
        raise RuntimeError('No API key configured.\nUse `wandb login` to log in.')
    monkeypatch.setattr(wandb, 'init', refuse)
    with pytest.raises(ConfigError) as error:
        train.start_run_records(make_config(tmp_path, '++wandb.enabled=true'), [])
    assert str(error.value) == ("wandb did not start (RuntimeError: No API key configured. Use `wandb login` to log "
                                "in.): fix that, or train without it (++wandb.enabled=false, or WANDB_MODE=offline)")


def test_wandb_writes_into_the_run_directory_unless_wandb_dir_says_where(tmp_path, monkeypatch):
    import wandb

    import train
    from helpers import make_config
    directories = []
    monkeypatch.setattr(wandb, 'init', lambda **options: directories.append(options['dir']))
    config = make_config(tmp_path, '++wandb.enabled=true')
    train.start_run_records(config, [])
    monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb_files'))
    train.start_run_records(config, [])
    assert directories == [config.local_run_dir, str(tmp_path / 'wandb_files')]


def test_a_script_passes_a_stop_on_to_the_halos_command_it_waits_for(tmp_path):
    """A SIGTERM to a script that runs train.py (stackllama.py, bench/quality.py) reaches train.py, which saves and
    stops with 128 + 15; the script then exits with it, leaving nothing running."""
    saved = tmp_path / 'saved'
    command = ("import signal, sys, time; "
               f"signal.signal(signal.SIGTERM, lambda *a: (open({str(saved)!r}, 'w').write('checkpoint'), sys.exit(143))); "
               f"open({str(tmp_path / 'started')!r}, 'w').close(); time.sleep(60)")
    script = (f"import subprocess, sys; sys.path.insert(0, {ROOT!r}); from halos.errors import wait_passing_stops; "
              f"child = subprocess.Popen([sys.executable, '-c', {command!r}]); print(child.pid, flush=True); "
              f"sys.exit(wait_passing_stops(child.pid))")
    parent = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    while not (tmp_path / 'started').exists():
        assert parent.poll() is None
    parent.send_signal(15)
    assert parent.wait(timeout=30) == 143 and saved.read_text() == 'checkpoint'
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)


def test_help_of_train_py_and_eval_py_shows_their_usage_and_choices():
    train = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--help'], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    losses = sorted(name[:-len('.yaml')] for name in os.listdir(os.path.join(ROOT, 'config', 'loss')))
    assert train.returncode == 0 and train.stdout.startswith('usage: python train.py loss=<loss> model=<model>')
    assert f"losses (config/loss): {', '.join(losses)}\n" in train.stdout
    evaluation = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '-h'], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
    assert evaluation.returncode == 0 and evaluation.stdout.startswith(
        'usage: python eval.py --config-path=<run directory> ++mode=<sample|eval|alpacaeval|reward|lm_eval>')


def test_a_settings_or_build_error_is_named_by_one_process_of_a_node_and_any_other_error_by_each(capsys, monkeypatch):
    from halos.errors import ConfigError, DataError, met_alike_by_every_process, reported
    monkeypatch.delenv('HYDRA_FULL_ERROR', raising=False)
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert reported('train.py', ConfigError('bad key')) == 2 and capsys.readouterr().err == ''
    assert reported('train.py', DataError('its own shard')) == 2 and capsys.readouterr().err == 'train.py: its own shard\n'
    with pytest.raises(DataError) as error, met_alike_by_every_process():
        raise DataError('data.jsonl: record 10: a bad label')  # read whole by every process
    assert reported('train.py', error.value) == 2 and capsys.readouterr().err == ''
    monkeypatch.setenv('LOCAL_RANK', '0')
    assert reported('train.py', ConfigError('bad key')) == 2 and capsys.readouterr().err == 'train.py: bad key\n'
