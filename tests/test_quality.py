"""bench/quality.py on a second task given on the command line (prompts files and a reward function of the
tests' own) with the tiny random model: every method trains and is measured, the table and plots are written,
and every command it ran is a command line a user can rerun."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

TASK_PROMPTS = ['Describe the sea.', 'Name a colour.', 'Tell me about trees.', 'What is a kettle?',
                'Write a line about rain.', 'Say something about bread.']
HELD_OUT = ['Describe a cloud.', 'What is a spoon?', 'Tell me about rivers.']
REWARD = os.path.join(ROOT, 'tests', 'rewards.py') + ':letter_e'
METHODS = ('sft-best', 'dpo', 'kto', 'grpo', 'online-dpo', 'online-ppo', 'grpo-online')  # IPO, SimPO: DPO's pairs


def prompts_file(path, prompts):
    path.write_text(''.join(json.dumps({'prompt': prompt}) + '\n' for prompt in prompts))
    return str(path)


@pytest.fixture(scope='module')
def quality(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('quality')
    command = [sys.executable, os.path.join(ROOT, 'bench', 'quality.py'), '--model', 'tiny', '--no-chat-template',
               '--prompts-train', prompts_file(tmp / 'train.jsonl', TASK_PROMPTS),
               '--prompts-test', prompts_file(tmp / 'test.jsonl', HELD_OUT), '--reward-function', REWARD,
               '--samples-per-prompt', '2', '--rounds', '2', '--max-new-tokens', '6', '--top-k', '8', '--epochs', '1',
               '--lr', '1e-3', '--methods', ','.join(METHODS), '--work-dir', str(tmp / 'work'), '--results-dir', str(tmp / 'results'), '--tag', 'second']
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp / 'results' / 'quality-second.json') as f:
        return json.load(f), (tmp / 'results'), result.stdout


@pytest.mark.slow
def test_every_method_is_measured_on_the_held_out_prompts_of_the_given_task(quality):
    report, _, _ = quality
    assert report['budget'] == 2 * len(TASK_PROMPTS) and report['reward_function'].endswith('rewards.py:letter_e')
    assert [row['method'] for row in report['methods']] == list(METHODS)
    for row in [report['start'], *report['methods']]:
        assert row['n'] == len(HELD_OUT) and row['prompts'] == [report['prompts_test']]
        assert 0 <= row['reward_mean'] <= 1 and math.isfinite(row['reward_se']) and math.isfinite(row['kl'])
    assert report['start']['kl'] == 0.0  # the starting model against itself
    assert any(row['kl'] != 0.0 for row in report['methods'])  # training moved the policies


@pytest.mark.slow
def test_the_online_methods_record_their_curves(quality):
    rows = {row['method']: row for row in quality[0]['methods']}
    assert [point['round'] for point in rows['online-dpo']['curve']] == [0, 1, 2]
    assert rows['online-dpo']['trains_on'] == '2 rounds x 3 prompts x 2'
    ppo_steps = [point['step'] for point in rows['online-ppo']['curve']]  # one score per step (batch 8: all 6 prompts)
    assert ppo_steps == [6, 12] and ppo_steps[-1] == quality[0]['budget']
    assert rows['grpo-online']['trains_on'] == '6 prompts x 2, step by step'  # the budget's 12 samples, k = 2
    assert [point['step'] for point in rows['grpo-online']['curve']] == [6]  # one step of 8 prompts (6 there are)


@pytest.mark.slow
def test_the_table_plots_and_commands_are_written(quality):
    report, results, stdout = quality
    table = (results / 'quality-second.md').read_text()
    for row in report['methods']:
        assert f"| {row['method']} (`loss={row['loss']}`) |" in table
        assert f"{row['reward_mean']:.3f} ± {row['reward_se']:.3f}" in table
    for name in ('quality-second-reward.png', 'quality-second-frontier.png'):
        assert (results / name).read_bytes().startswith(b'\x89PNG')
    commands = report['commands']
    assert sum(command.startswith('python train.py ') for command in commands) == len(METHODS)
    assert sum('++mode=reward' in command for command in commands) == len(METHODS) + 1
    assert sum(command.startswith('python label.py ') for command in commands) == 3  # best, pairwise, scalar
    assert all(f'$ {command}' in stdout for command in commands)
    assert all(command in table for command in commands)


@pytest.mark.slow
def test_the_sweep_picks_each_methods_best_validation_configuration(tmp_path):
    """--sweep: every configuration of dpo's and grpo-online's grids trains on the train prompts less the last 2
    and is scored on those 2; the best trains on all of them and is measured on the held-out prompts."""
    command = [sys.executable, os.path.join(ROOT, 'bench', 'quality.py'), '--model', 'tiny', '--no-chat-template',
               '--prompts-train', prompts_file(tmp_path / 'train.jsonl', TASK_PROMPTS),
               '--prompts-test', prompts_file(tmp_path / 'test.jsonl', HELD_OUT), '--reward-function', REWARD,
               '--samples-per-prompt', '2', '--max-new-tokens', '6', '--top-k', '8', '--epochs', '1', '--methods',
               'dpo,grpo-online', '--sweep', '--sweep-lrs', '1e-3', '--val-prompts', '2', '--work-dir',
               str(tmp_path / 'work'), '--results-dir', str(tmp_path / 'results'), '--tag', 'swept']
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / 'results' / 'quality-swept.json').read_text())
    for method, coefficient in (('dpo', 'loss.beta'), ('grpo-online', 'loss.beta')):
        trials = report['sweep'][method]['trials']
        assert [trial['overrides'][1].split('=')[0] for trial in trials] == [f'++{coefficient}'] * 2
        best = max(trials, key=lambda trial: (trial['reward_mean'], -trial['kl']))
        assert report['sweep'][method]['chosen'] == best['overrides']
        row = next(row for row in report['methods'] if row['method'] == method)
        assert row['hyperparameters'] == f"lr 1e-3, beta {best['overrides'][1].split('=')[1]}"
    validation = [line for line in report['commands'] if '++mode=reward' in line and 'val_prompts.jsonl' in line]
    assert len(validation) == 4 and all('test.jsonl' not in line for line in validation)
    assert '## Sweep' in (tmp_path / 'results' / 'quality-swept.md').read_text()
    recorded = [json.loads(line) for line in (tmp_path / 'results' / 'quality-swept-trials.jsonl').open()]
    assert [line.pop('trial') for line in recorded] == ['dpo-0', 'dpo-1', 'grpo-online-0', 'grpo-online-1']
    assert recorded == report['sweep']['dpo']['trials'] + report['sweep']['grpo-online']['trials']
    assert not any((tmp_path / 'work' / 'sweep').glob('quality_*/LATEST'))  # a trial keeps its result, not its checkpoint
    # as if the run had been cut short after dpo's trials on another machine (no work directory): --reuse with the
    # results trains nothing again, neither the trials nor the table's dpo row
    swept = report['sweep'].pop('dpo')
    (tmp_path / 'results' / 'quality-swept.json').write_text(json.dumps(report))
    shutil.rmtree(tmp_path / 'work')
    rerun = subprocess.run([*command, '--reuse', '--methods', 'dpo'], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    rewritten = json.loads((tmp_path / 'results' / 'quality-swept.json').read_text())
    assert rewritten['sweep']['dpo'] == swept
    assert rewritten['wall_seconds'] > report['wall_seconds']  # the wall time spans both invocations
    assert '$ python train.py' not in rerun.stdout


def test_reuse_keeps_a_row_only_if_it_trained_with_the_same_overrides():
    sys.path.insert(0, ROOT)
    from bench.quality import METHODS, kept_row
    dpo = dataclasses.replace(METHODS['dpo'], overrides=('++lr=5e-5', '++loss.beta=0.2'))
    row = {'method': 'dpo', 'overrides': ['++lr=5e-5', '++loss.beta=0.2'], 'reward_mean': 0.6}
    earlier = {'methods': [{'method': 'ipo', 'overrides': list(dpo.overrides)}, row]}
    assert kept_row(earlier, dpo) is row
    assert kept_row(earlier, dataclasses.replace(dpo, overrides=('++lr=2e-5', '++loss.beta=0.2'))) is None
    assert kept_row(earlier, METHODS['kto']) is None
    assert kept_row({'methods': [{'method': 'dpo', 'reward_mean': 0.6}]}, dpo) is None  # a row from before overrides
    assert kept_row(None, dpo) is None


def test_reuse_keeps_only_what_was_made_under_the_same_arguments(tmp_path):
    """Rows, samples or runs made with another learning rate or k would stand in the table as this invocation's."""
    sys.path.insert(0, ROOT)
    from bench.quality import check_same_settings, measured_under, parse_args
    from halos.errors import ConfigError
    recorded = measured_under(parse_args(['--lr', '2e-5', '--samples-per-prompt', '2']))
    check_same_settings(parse_args(['--lr', '2e-5', '--samples-per-prompt', '2', '--methods', 'dpo']), recorded, 'x')
    check_same_settings(parse_args(['--lr', '1e-3']), None, 'x')  # nothing recorded: a report from before
    with pytest.raises(ConfigError) as error:
        check_same_settings(parse_args(['--lr', '1e-3', '--samples-per-prompt', '3']), recorded, 'the report quality-t1')
    assert str(error.value) == ("--reuse: the report quality-t1 was made with --samples-per-prompt 2 (now 3), --lr "
                                "2e-05 (now 0.001): give the same arguments, or another --work-dir and --tag to "
                                "measure anew")


def test_reuse_with_fewer_methods_keeps_the_other_rows_of_the_table():
    sys.path.insert(0, ROOT)
    from bench.quality import with_earlier_rows
    earlier = {'methods': [{'method': 'dpo', 'reward_mean': 0.1}, {'method': 'kto', 'reward_mean': 0.2}]}
    again = {'method': 'dpo', 'reward_mean': 0.3}
    assert with_earlier_rows(earlier, [again]) == [again, earlier['methods'][1]]
    assert with_earlier_rows(None, [again]) == [again]
    assert with_earlier_rows(earlier, [{'method': 'sft-best'}])[0] == {'method': 'sft-best'}  # in METHODS' order


def test_a_reward_that_never_varies_gives_an_infinite_gap_and_the_report_is_written_whole(tmp_path, monkeypatch):
    """Every held-out sample scored alike gives standard errors of 0: the gap is infinite (or 0), not a crash
    that leaves an emptied table."""
    sys.path.insert(0, ROOT)
    from bench import quality
    start = {'reward_mean': 0.0, 'reward_se': 0.0}
    assert quality.gap_in_se({'reward_mean': 1.0, 'reward_se': 0.0}, start) == math.inf
    assert quality.gap_in_se({'reward_mean': -1.0, 'reward_se': 0.0}, start) == -math.inf
    assert quality.gap_in_se({'reward_mean': 0.0, 'reward_se': 0.0}, start) == 0.0
    assert quality.gap_in_se({'reward_mean': 0.3, 'reward_se': 0.3}, {'reward_mean': 0.0, 'reward_se': 0.4}) == \
        pytest.approx(0.6)
    (tmp_path / 'quality-t.md').write_text('the table so far')
    monkeypatch.setattr(quality, 'markdown', lambda report: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        quality.write_report({'methods': []}, str(tmp_path), 't')
    assert (tmp_path / 'quality-t.md').read_text() == 'the table so far'


def test_arguments_a_sampling_run_would_refuse_stop_it_at_once(capsys):
    sys.path.insert(0, ROOT)
    from bench.quality import parse_args
    for argument, value, reason in [('--samples-per-prompt', '0',
                                     'argument --samples-per-prompt: 0 is not an integer >= 1'),
                                    ('--max-new-tokens', '-1', 'argument --max-new-tokens: -1 is not an integer >= 1'),
                                    ('--top-p', '0', 'argument --top-p: 0 is not a number > 0'),
                                    ('--methods', 'dpo,', "--methods: unknown ''; the methods are sft-best, dpo, ipo, "
                                     "simpo, kto, grpo, online-dpo, online-ppo, grpo-rounds, grpo-online, dr-grpo, "
                                     "dapo, gspo, rloo, reinforce-pp")]:
        with pytest.raises(SystemExit) as exit:
            parse_args([argument, value])
        assert exit.value.code == 2
        assert capsys.readouterr().err.strip().split(': ', 1)[1] == f'{reason} (--help lists the arguments)'


def test_reuse_keeps_a_methods_sweep_only_if_it_tried_the_same_grid():
    sys.path.insert(0, ROOT)
    from bench.quality import METHODS, grid, kept_sweep
    two = grid(METHODS['grpo-rounds'], ('2e-5',))
    assert two == [('++lr=2e-5', '++loss.epsilon=0.01'), ('++lr=2e-5', '++loss.epsilon=0.2')]
    earlier = {'grpo-rounds': {'trials': [{'overrides': list(c), 'reward_mean': 0.3} for c in two],
                               'chosen': list(two[0])}}
    assert kept_sweep(earlier, 'grpo-rounds', two) is earlier['grpo-rounds']
    assert kept_sweep(earlier, 'grpo-rounds', grid(METHODS['grpo-rounds'], ('2e-5', '1e-4'))) is None  # it grew
    assert kept_sweep(earlier, 'dpo', grid(METHODS['dpo'], ('2e-5',))) is None


def test_a_forked_command_runs_in_the_repository_with_its_arguments_and_fails_with_its_exit_status(tmp_path):
    """bench/quality.py's Runner forks each command from its own process (torch and halos imported once)."""
    sys.path.insert(0, ROOT)
    from bench.quality import run_forked
    script = tmp_path / 'script.py'
    script.write_text('import json, os, sys\n'
                      'json.dump({"cwd": os.getcwd(), "argv": sys.argv[1:], "name": __name__}, open(sys.argv[1], "w"))\n'
                      'sys.exit(int(sys.argv[2]))\n')
    seen = tmp_path / 'seen.json'
    run_forked(str(script), [str(seen), '0'])
    assert json.loads(seen.read_text()) == {'cwd': ROOT, 'argv': [str(seen), '0'], 'name': '__main__'}
    with pytest.raises(subprocess.CalledProcessError) as error:
        run_forked(str(script), [str(seen), '3'])
    assert error.value.returncode == 3 and error.value.cmd == ['python', str(script), str(seen), '3']


def test_a_demo_rerun_keeps_each_row_an_earlier_demo_measured_and_measures_the_others(monkeypatch):
    """scripts/demo.py (make demo) through bench/quality.py's rows; its --help shows its usage and runs nothing."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('demo', os.path.join(ROOT, 'scripts', 'demo.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    trained = []
    monkeypatch.setattr(demo.quality, 'run_method',
                        lambda run, args, method, *rest: trained.append(method.name) or {'method': method.name})
    kto, dpo = demo.ALIGNED[:2]
    earlier = {'methods': [{'method': 'kto', 'overrides': list(kto.overrides), 'reward_mean': 0.4},
                           {'method': 'dpo', 'overrides': ['++lr=1e-3'], 'reward_mean': 0.5}]}  # other overrides
    rows = [demo.quality.measured(None, None, earlier, method, 88, 44, {}) for method in (kto, dpo, demo.SFT)]
    assert rows == [earlier['methods'][0], {'method': 'dpo'}, {'method': 'sft-best'}] and trained == ['dpo', 'sft-best']
    shown = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'demo.py'), '--help'], capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and shown.stdout.startswith('usage: demo.py [-h]')


def test_a_work_directory_that_holds_what_quality_py_does_not_write_is_not_cleared(tmp_path):
    (tmp_path / 'work' / 'quality_dpo').mkdir(parents=True)
    (tmp_path / 'work' / 'samples').mkdir()
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    command = [sys.executable, os.path.join(ROOT, 'bench', 'quality.py'), '--methods', 'dpo', '--work-dir']
    result = subprocess.run(command + [str(tmp_path / 'mine')], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"quality.py: --work-dir {tmp_path}/mine holds notes.txt, which quality.py does not write; it clears its work "
        f"directory at the start (unless --reuse): give it a directory of its own")
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'
    from bench.quality import check_clearable
    check_clearable(str(tmp_path / 'work'))  # its own runs and samples: cleared
    check_clearable(str(tmp_path / 'nowhere'))


def test_a_broken_reward_function_stops_it_before_anything_is_sampled_or_cleared(tmp_path):
    (tmp_path / 'work' / 'samples').mkdir(parents=True)
    (tmp_path / 'work' / 'samples' / 'kept.jsonl').write_text('{}\n')
    command = [sys.executable, os.path.join(ROOT, 'bench', 'quality.py'), '--methods', 'dpo', '--work-dir',
               str(tmp_path / 'work'), '--reward-function', os.path.join(ROOT, 'tests', 'rewards.py') + ':no_such']
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"quality.py: reward function 'tests/rewards.py:no_such': {ROOT}/tests/rewards.py has no function 'no_such'")
    assert (tmp_path / 'work' / 'samples' / 'kept.jsonl').read_text() == '{}\n' and result.stdout == ''
