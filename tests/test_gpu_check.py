"""`make gpu-check` (scripts/gpu_check.py) on a machine without a GPU: it runs, writes its report, skips every part
with a reason that names CUDA, and exits 0."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA GPU is present: make gpu-check runs every part here')
def test_without_a_gpu_the_check_skips_every_part_naming_cuda_and_exits_0(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'gpu_check.py'), '--out', str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = glob.glob(str(tmp_path / 'gpu-*.json'))
    assert len(reports) == 1 and os.path.exists(reports[0][:-len('.json')] + '.md')
    with open(reports[0]) as f:
        report = json.load(f)
    assert set(report['parts']) == {'tests', 'training', 'sampling'}
    for name, part in report['parts'].items():
        assert part['status'] == 'skipped' and 'CUDA' in part['reason'], name
    assert {entry['part'] for entry in report['skipped']} == {'tests', 'training', 'sampling'}
    assert all('CUDA' in entry['reason'] for entry in report['skipped'])
    assert 'no CUDA GPU' in result.stdout


def test_a_report_of_skipped_parts_stays_out_of_bench_results(monkeypatch):
    # gpu_check puts bench/ on sys.path (for bench.py): the path is restored after the test, so that a later
    # `import bench` still finds the package
    monkeypatch.setattr(sys, 'path', [os.path.join(ROOT, 'scripts'), *sys.path])
    from gpu_check import report_dir
    assert report_dir('no CUDA GPU (torch.cuda.is_available() is False)') == os.path.join(ROOT, 'runs', 'gpu-check')
    assert report_dir(None) == os.path.join(ROOT, 'bench', 'results')
