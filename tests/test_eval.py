"""eval.py loads a trained checkpoint: sampling writes the documented JSON, mode=eval prints metrics."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, run_train


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
             f'++samples_dir={everything}')
    with open(everything / 'sft.json') as f:
        assert len(json.load(f)['samples']) == 11   # every prompt of hh/test


@pytest.mark.slow
def test_eval_mode_prints_metrics(trained_run):
    result = run_eval(trained_run, '++mode=eval')
    metrics = json.loads(result.stdout[result.stdout.index('{\n'):])
    assert set(metrics) == {'logps_eval/chosen', 'loss/eval'}
    assert metrics['loss/eval'] == pytest.approx(-metrics['logps_eval/chosen'])
