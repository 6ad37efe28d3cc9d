"""The benchmark runs three steps of each side (and of halos with unshared prompts) for SFT, DPO and KTO and
writes its report.

A smoke test, not a benchmark: no timing is asserted. It needs TRL, a benchmark-only dependency of
halos that `make test` installs (requirements-test.txt includes requirements-bench.txt); it is
skipped where TRL is absent.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT


pytest.importorskip('trl')

SIDE_FIELDS = ('examples_per_s', 'tokens_per_s', 'compute_examples_per_s', 'seconds_per_step', 'flops_per_s',
               'fraction_of_matmul_peak', 'peak_rss_mib', 'n_params', 'threads', 'losses', 'runs')


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('bench')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench.py'), '--smoke', '--unshared', '--jobs', '3',
                             '--out-dir', str(out_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out_dir / 'latest.json') as f:
        return json.load(f), (out_dir / 'latest.md').read_text()


@pytest.mark.slow
def test_smoke_run_reports_both_sides_of_every_trainer(report):
    data, _ = report
    assert data['matmul_peak_flops'] > 0 and data['machine']['cpu'] and data['flops_formula']
    assert set(data['trainers']) == {'sft', 'dpo', 'kto'}
    for name, entry in data['trainers'].items():
        for side in ('halos', 'trl'):
            summary = entry[side]
            assert set(SIDE_FIELDS) <= set(summary), (name, side)
            assert summary['examples_per_s'] > 0 and summary['peak_rss_mib'] > 0
            assert len(summary['losses']) == 3 and all(math.isfinite(x) for x in summary['losses'])
        assert entry['trl']['token_mismatches'] == 0, name  # TRL trains on exactly halos' tokens
        assert set(entry['ratio_halos_over_trl']) >= {'examples_per_s', 'tokens_per_s', 'peak_rss_mib'}


@pytest.mark.slow
def test_both_sides_make_the_same_updates(report):
    """The first step's DPO and KTO losses are log 2 and 0.5 for any implementation; the third step's
    depend on the two updates before it, so they agree only if both sides train the same way."""
    trainers = report[0]['trainers']
    assert trainers['dpo']['halos']['losses'][0] == pytest.approx(math.log(2), abs=1e-4)
    for name in ('sft', 'dpo', 'kto'):
        halos, trl = trainers[name]['halos']['losses'], trainers[name]['trl']['losses']
        tolerance = 1e-5 * abs(halos[0]) + 2e-6
        assert max(abs(a - b) for a, b in zip(halos, trl)) <= tolerance, (name, halos, trl)
        moved = max(abs(loss - halos[0]) for loss in halos[1:])
        assert moved > 20 * tolerance, f'{name}: the updates hardly moved the loss ({halos}), so agreeing proves little'
        unshared = trainers[name]['halos-unshared']['losses']  # model.share_prompts=false: the same updates
        assert max(abs(a - b) for a, b in zip(halos, unshared)) <= tolerance, (name, halos, unshared)


def test_markdown_table_lists_every_trainer_and_side(report):
    _, text = report
    assert 'Machine:' in text and '| trainer | side | examples/s' in text
    for name in ('sft', 'dpo', 'kto'):
        assert f'| {name} | halos |' in text and f'| {name} | trl |' in text and f'| {name} | halos-unshared |' in text
    assert 'examples/s shared/unshared prompts' in text


def test_a_smoke_check_reports_outside_the_published_results_and_bad_arguments_are_named():
    # in a process of its own: the bench directory on the path would make `bench` its bench.py, not the package
    show = "import sys; sys.path.insert(0, 'bench'); import bench; print(bench.parse_args(sys.argv[1:]).out_dir)"
    out_dir = lambda *arguments: subprocess.run([sys.executable, '-c', show, *arguments], cwd=ROOT, capture_output=True,
                                                text=True, check=True, timeout=120).stdout.strip()
    assert out_dir('--smoke') == os.path.join(ROOT, 'runs', 'bench-smoke')
    assert out_dir() == os.path.join(ROOT, 'bench', 'results')
    assert out_dir('--smoke', '--out-dir', 'elsewhere') == 'elsewhere'
    for arguments, says in ((['--steps', '3', '--skip', '3'], '--skip 3 leaves none of the 3 steps (--steps) to time'),
                            (['--runs', '0'], 'argument --runs: 0 is not an integer >= 1')):
        result = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'bench.py'), *arguments], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr == f'bench.py: {says} (--help lists the arguments)\n'
