"""eval.py loads a trained checkpoint: sampling writes the documented JSON, mode=eval prints metrics,
a CSFT run is sampled with its desirable control token, and vLLM is used only when it can run."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, make_config, run_train

eval_script = importlib.import_module('eval')


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp('runs')
    run_train(cache_dir, '++n_examples=8', '++lr=1e-3', '++optimizer=AdamW', loss='sft', exp_name='sft')
    return cache_dir / 'sft'


def run_eval(run_dir, *overrides):
    command = [sys.executable, os.path.join(ROOT, 'eval.py'), f'--config-path={run_dir}', *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_sampling_writes_the_documented_json_deterministically(trained_run, tmp_path):
    outputs = []
    for attempt in ('a', 'b'):
        samples_dir = tmp_path / attempt
        run_eval(trained_run, '++mode=sample', '++n_samples=6', '++model.eval_batch_size=4', '++model.max_length=96',
                 f'++samples_dir={samples_dir}')
        with open(samples_dir / 'sft.json') as f:
            outputs.append(json.load(f))
    data = outputs[0]
    assert set(data) == {'sampled_at', 'config', 'samples'} and len(data['samples']) == 6
    assert all(set(s) == {'prompt', 'chosen', 'policy'} for s in data['samples'])
    assert data['samples'][0]['prompt'].endswith('\n<|assistant|>\n')
    assert data['samples'] == outputs[1]['samples']
    everything = tmp_path / 'all'
    run_eval(trained_run, '++mode=sample', '++n_samples=null', '++model.eval_batch_size=4', '++model.max_length=96',
             f'++samples_dir={everything}', '++seed=2')
    with open(everything / 'sft.json') as f:
        other_seed = json.load(f)['samples']
    assert len(other_seed) == 11   # every prompt of hh/test
    first_seed = {s['prompt']: s['policy'] for s in data['samples']}
    assert any(first_seed[s['prompt']] != s['policy'] for s in other_seed if s['prompt'] in first_seed)


@pytest.mark.slow
def test_eval_mode_prints_metrics(trained_run):
    result = run_eval(trained_run, '++mode=eval')
    metrics = json.loads(result.stdout[result.stdout.index('{\n'):])
    assert set(metrics) == {'logps_eval/chosen', 'loss/eval'}
    assert metrics['loss/eval'] == pytest.approx(-metrics['logps_eval/chosen'])


def test_csft_sampling_prompts_end_in_the_desirable_control_token(tmp_path):
    import models
    config = make_config(tmp_path, '++n_samples=5', '++model.eval_batch_size=5', loss='csft')
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2', ['<|good|>', '<|bad|>'])
    batch = next(iter(eval_script.sampling_loader(config, tokenizer, ['hh'])))
    good = tokenizer.convert_tokens_to_ids('<|good|>')
    assert all(text.endswith('\n<|assistant|>\n<|good|>') for text in batch['prompt_text'])
    assert batch['prompt_input_ids'][:, -1].tolist() == [good] * 5
    plain = next(iter(eval_script.sampling_loader(make_config(tmp_path, loss='sft'), tokenizer, ['hh'])))
    assert plain['prompt_text'][0].endswith('\n<|assistant|>\n') and good not in plain['prompt_input_ids'].tolist()[0]


@pytest.mark.slow
def test_sampling_a_trained_csft_run_writes_prompts_with_the_control_token(tmp_path):
    run_train(tmp_path, '++n_examples=4', '++model.batch_size=2', loss='csft', exp_name='csft')
    run_eval(tmp_path / 'csft', '++mode=sample', '++n_samples=3', '++model.eval_batch_size=3', '++model.max_length=96',
             f'++samples_dir={tmp_path / "samples"}')
    with open(tmp_path / 'samples' / 'csft.json') as f:
        samples = json.load(f)['samples']
    assert len(samples) == 3 and all(s['prompt'].endswith('\n<|assistant|>\n<|good|>') for s in samples)


@pytest.mark.parametrize('installed, gpu, expected', [(True, True, True), (True, False, False), (False, True, False)])
def test_vllm_generates_only_when_installed_and_a_gpu_is_present(monkeypatch, installed, gpu, expected):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: (object() if installed else None) if name == 'vllm' else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: gpu)
    assert eval_script.use_vllm() is expected
