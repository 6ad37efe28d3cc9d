"""compare.py and visualize.py: the judge prompt, answer parsing, counting and CI math, the judgment cache,
newcomer errors, and end-to-end runs against a real local judge server (llama-cpp-python serving the
embedded SmolLM2) behind a fault-injecting proxy."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import compare
import visualize
from fault_proxy import FaultProxy
from helpers import DATA, ROOT
from judge_server import local_judge_server
from utils import free_port


SECRET_KEY = 'sk-halos-test-3f9c1e7a5b2d-must-never-be-written'
JUDGE = 'smollm2-135m'


# --- fixtures and helpers
@pytest.fixture(scope='session')
def judge_url():
    with local_judge_server() as base_url:
        yield base_url


@pytest.fixture
def proxy(judge_url):
    with FaultProxy(judge_url) as fault_proxy:
        yield fault_proxy


def hh_samples(n):
    """eval.py-style samples from the shipped HH test split: the chosen reply vs the rejected one as 'policy'."""
    samples = []
    with open(os.path.join(DATA, 'hh', 'test.jsonl')) as f:
        for line in list(f)[:n]:
            record = json.loads(line)
            history, chosen = record['chosen'].rsplit('\n\nAssistant: ', 1)
            rejected = record['rejected'].rsplit('\n\nAssistant: ', 1)[1]
            question = history.replace('\n\nHuman: ', '', 1)
            samples.append({'prompt': f'\n<|user|>\n{question}\n<|assistant|>\n', 'chosen': chosen, 'policy': rejected})
    return samples


def write_samples(path, n, tokenizer=None):
    config = {'exp_name': 'hh_test', 'human_prefix': '\n<|user|>\n', 'assistant_prefix': '\n<|assistant|>\n',
              'local_run_dir': str(path.parent / 'no_run'), 'model': {'name_or_path': tokenizer}}
    with open(path, 'w') as f:
        json.dump({'sampled_at': '2026-01-01 00:00:00', 'config': config, 'samples': hh_samples(n)}, f)
    return path


def compare_command(tmp_path, base_url, *extra):
    return [sys.executable, os.path.join(ROOT, 'compare.py'), '-f', str(tmp_path / 'samples.json'),
            '-r', str(tmp_path / 'results.jsonl'), '--base-url', base_url, '--judge', JUDGE, '-st', '0', *extra]


def judge_env():
    env = dict(os.environ, OPENAI_API_KEY=SECRET_KEY)
    env.pop('OPENAI_BASE_URL', None)
    return env


def run_compare(tmp_path, base_url, *extra):
    result = subprocess.run(compare_command(tmp_path, base_url, *extra), cwd=tmp_path, env=judge_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def result_lines(tmp_path):
    with open(tmp_path / 'results.jsonl') as f:
        return [json.loads(line) for line in f]


def cache_keys(tmp_path):
    with open(tmp_path / 'results.judgments.jsonl') as f:
        return [json.loads(line)['key'] for line in f]


def assert_counts_add_up(result, n):
    assert result['total'] == n
    assert result['wins'] + result['losses'] + result['ties'] + result['failures'] == n
    assert result['failures'] == result['unparseable'] + result['errors']
    assert result['candidate']['wins'] == result['wins'] and result['baseline']['wins'] == result['losses']


def assert_secret_never_written(tmp_path, *outputs):
    written = [path for path in tmp_path.rglob('*') if path.is_file()]
    assert written, 'compare.py wrote nothing'
    for path in written:
        assert SECRET_KEY.encode() not in path.read_bytes(), f'the API key was written to {path}'
    for text in outputs:
        assert SECRET_KEY not in text


def args_for(**overrides):
    args = compare.parse_args(['-f', 'unused.json'])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


# --- the prompt, the answer, the statistics
@pytest.mark.parametrize('answer, labels, position', [
    ('Response 1', '12', 0),
    ('response 2 is better.', '12', 1),
    ('I prefer Response 2; Response 1 is rude.', '12', 1),
    ('Response B', 'AB', 1),
    ('2', '12', 1),
    (' "1". ', '12', 0),
    ('Response 3', '12', None),
    ('Both are fine.', '12', None),
    ('', '12', None),
    ('The second one', '12', None),
    ('The most helpful and concise response is Response 1', '12', 0),
    ('The correct response is "Response 2".', '12', 1),
    ('Response 12 is best', '12', None),
])
def test_parse_verdict(answer, labels, position):
    assert compare.parse_verdict(answer, labels) == position


def test_wilson_interval_matches_hand_computed_values():
    # p = 0.8, n = 10, z = 1.959964: centre 0.716737, half-width 0.226587
    assert compare.wilson_interval(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    assert compare.wilson_interval(0, 5) == pytest.approx((0.0, 0.434482), abs=1e-6)
    assert compare.wilson_interval(1.5, 3) == pytest.approx((0.125334, 0.874666), abs=1e-6)
    assert compare.wilson_interval(5, 5) == pytest.approx((0.565518, 1.0), abs=1e-6)
    assert compare.wilson_interval(0, 0) is None


def test_judge_prompt_has_the_original_structure():
    history = compare.conversation_history('\n<|user|>\nHi there\n<|assistant|>\nHello!\n<|user|>\nA joke?\n<|assistant|>\n',
                                           '\n<|assistant|>\n')
    assert history == '<|user|>\nHi there\n<|assistant|>\nHello!\n<|user|>\nA joke?'
    messages = compare.judge_messages(history, ['Why not.', 'No.'], 'AB', '<|user|>', '<|assistant|>')
    assert [m['role'] for m in messages] == ['user', 'user']
    assert '<|user|>' in messages[0]['content'] and '<|assistant|>' in messages[0]['content']
    assert messages[0]['content'].endswith(history)
    parts = messages[1]['content'].split('\n\n')
    assert parts[1] == 'Response A: Why not.\nEND OF RESPONSE A'
    assert parts[2] == 'Response B: No.\nEND OF RESPONSE B'
    assert 'more helpful, harmless, and concise' in parts[3]
    assert compare.trim_incomplete_sentence('One. Two! Three? Four is cut') == 'One. Two! Three?'
    assert compare.trim_incomplete_sentence('no sentence end at all') == 'no sentence end at all'


def test_response_order_is_random_per_comparison_and_seeded():
    comparisons = [compare.Comparison(i, f'q{i}', f'c{i}', f'b{i}') for i in range(200)]
    orders = lambda seed, both=False: [j.order for j in compare.plan_judgments(
        comparisons, args_for(seed=seed, both_orders=both), 'user', 'assistant')]
    first = orders(0)
    assert first == orders(0) and first != orders(1)
    assert 80 <= first.count(('candidate', 'baseline')) <= 120
    both = orders(0, both=True)
    assert len(both) == 400 and both.count(('candidate', 'baseline')) == 200
    keys = [j.key for j in compare.plan_judgments(comparisons, args_for(both_orders=True), 'user', 'assistant')]
    assert len(set(keys)) == 400


def test_summary_counts_wins_losses_ties_and_failures():
    """Five comparisons judged in both orders: a win, a loss, a tie, an unparseable answer, a failed request."""
    comparisons = [compare.Comparison(i, f'q{i}', f'c{i}', f'b{i}') for i in range(5)]
    judgments = compare.plan_judgments(comparisons, args_for(both_orders=True), 'user', 'assistant')
    winners = {0: ['candidate', 'candidate'], 1: ['baseline', 'baseline'], 2: ['candidate', 'baseline'],
               3: ['candidate', None], 4: ['candidate', 'failed']}
    records, errors = {}, {}
    for judgment in judgments:
        winner = winners[judgment.comparison.index].pop(0)
        if winner == 'failed':
            errors[judgment.key] = 'APITimeoutError'
        else:
            position = None if winner is None else judgment.order.index(winner)
            records[judgment.key] = {'key': judgment.key, 'position': position}
    summary = compare.summarize(comparisons, judgments, records, errors)
    assert {k: summary[k] for k in ('total', 'wins', 'losses', 'ties', 'failures', 'unparseable', 'errors')} == \
        {'total': 5, 'wins': 1, 'losses': 1, 'ties': 1, 'failures': 2, 'unparseable': 1, 'errors': 1}
    assert summary['win_rate'] == pytest.approx(0.5)
    assert summary['win_rate_ci95'] == pytest.approx([0.125334, 0.874666], abs=1e-6)
    # candidate shown first: comparisons 0, 1, 2, 3, 4 -> won 0, 2, 3, 4, lost 1
    # candidate shown second: comparisons 0, 1, 2 (3 unparseable, 4 failed) -> won 0, lost 1, 2
    bias = summary['position_bias']
    assert bias['candidate_first'] == {'judged': 5, 'win_rate': pytest.approx(0.8)}
    assert bias['candidate_second'] == {'judged': 3, 'win_rate': pytest.approx(1 / 3)}
    assert bias['first_position_picked'] == pytest.approx(6 / 8)


def test_cache_drops_a_truncated_last_line_and_appends_after_it(tmp_path):
    path = tmp_path / 'judgments.jsonl'
    path.write_text('{"key": "a", "position": 0}\n{"key": "b", "posi')
    cache = compare.JudgmentCache(str(path))
    assert set(cache.records) == {'a'}
    cache.add({'key': 'c', 'position': 1, 'answer': 'Response 2\u2028(line separator)'})
    cache.close()
    assert path.read_text() == '{"key": "a", "position": 0}\n{"key": "c", "position": 1, "answer": "Response 2\u2028(line separator)"}\n'
    reopened = compare.JudgmentCache(str(path)).records
    assert set(reopened) == {'a', 'c'} and reopened['c']['answer'] == 'Response 2\u2028(line separator)'


def test_a_last_record_that_only_lacks_its_newline_is_kept_and_read(tmp_path):
    from halos.jsonl import append_json_lines, read_json_lines
    path = tmp_path / 'results.jsonl'
    path.write_text('{"judge": "j", "candidate": {}, "baseline": {}, "total": 2}')  # an editor that adds no newline
    append_json_lines(str(path), [{'judge': 'k', 'candidate': {}, 'baseline': {}, 'total': 4}])
    assert [record['judge'] for record in read_json_lines(str(path))] == ['j', 'k']
    cache = tmp_path / 'judgments.jsonl'
    cache.write_text('{"key": "a", "position": 0}')
    assert set(compare.JudgmentCache(str(cache)).records) == {'a'}
    assert cache.read_text() == '{"key": "a", "position": 0}\n'


def test_another_file_given_as_the_results_file_or_cache_is_refused_and_left_as_it_was(tmp_path, capsys,
                                                                                       monkeypatch):
    samples = write_samples(tmp_path / 'samples.json', 2)
    other = tmp_path / 'other.json'
    for text in (json.dumps({'config': {}, 'samples': []}), json.dumps({'a': [1, 2]}, indent=2)):
        other.write_text(text)  # one line without a newline; an indented JSON document
        base = ['-f', str(samples), '--base-url', 'http://127.0.0.1:9/v1']
        message = compare_error(capsys, monkeypatch, base + ['-r', str(other)])
        assert message.startswith(f'compare.py: {other}: line 1 ') and message.endswith(
            ': --results_file takes compare.py result lines, and this file holds something else; give --results_file '
            'another path (nothing was written to it)')
        message = compare_error(capsys, monkeypatch, base + ['-r', str(tmp_path / 'r.jsonl'), '--cache', str(other)])
        assert message.startswith(f'compare.py: {other}: line ') and message.endswith(
            'is no judgment, nor is any other line: this is not a judgment cache; give the cache another path '
            '(nothing was written to it)')
        assert other.read_text() == text
    (tmp_path / 'adir').mkdir()
    message = compare_error(capsys, monkeypatch, base + ['-r', str(tmp_path / 'adir')])
    assert message == f'compare.py: --results_file {tmp_path}/adir: a directory, not compare.py result lines'


def test_the_cache_key_changes_with_judge_seed_answer_length_and_prompt_version(monkeypatch):
    messages = compare.judge_messages('q', ['a', 'b'], '12', 'user', 'assistant')
    key = lambda **overrides: compare.judgment_key(messages, args_for(**overrides))
    base = key()
    assert key() == base
    assert len({base, key(judge='other-judge'), key(seed=1), key(max_tokens=11)}) == 4
    swapped = compare.judge_messages('q', ['b', 'a'], '12', 'user', 'assistant')
    assert compare.judgment_key(swapped, args_for()) != base
    monkeypatch.setattr(compare, 'PROMPT_VERSION', 'halos-judge-v2')
    assert key() != base


class CountingClient:
    """An OpenAI client stand-in that answers 'Response 1' and counts the requests."""

    def __init__(self):
        self.requests = []
        self.chat = self
        self.completions = self

    def create(self, **request):
        import types
        self.requests.append(request['messages'])
        return types.SimpleNamespace(choices=[types.SimpleNamespace(message=types.SimpleNamespace(content='Response 1'))])


def test_samples_that_repeat_a_prompt_and_its_responses_are_warned_of(capsys):
    samples = [{'prompt': 'q', 'policy': 'a', 'chosen': 'b'}] * 3 + [{'prompt': 'q', 'policy': 'c', 'chosen': 'b'}]
    comparisons = compare.build_comparisons({}, samples, args_for())
    assert len(comparisons) == 4 and capsys.readouterr().err.strip() == (
        "warning: unused.json: 2 of the 4 samples repeat another's prompt and responses; each counts in the win rate "
        "and its interval (judged once)")
    compare.build_comparisons({}, samples[2:], args_for())
    assert capsys.readouterr().err == ''


def test_the_same_response_twice_is_a_tie_that_the_judge_is_not_asked(tmp_path, capsys):
    samples = [{'prompt': 'q', 'policy': 'Same. Cut o', 'chosen': 'Same.'}, {'prompt': 'q2', 'policy': 'a.', 'chosen': 'b.'},
               {'prompt': 'q3', 'policy': '', 'chosen': ' '}]
    args = args_for(both_orders=True, sleep_time=0, verbose=False)
    comparisons = compare.build_comparisons({}, samples, args)
    assert capsys.readouterr().err.strip() == (
        "warning: unused.json: 2 of the 3 samples give policy and chosen the same response (up to its last full "
        "sentence): each is a tie, not asked of the judge")
    judgments = compare.plan_judgments(comparisons, args, 'user', 'assistant')
    assert {j.comparison.index for j in judgments} == {1}
    # the other comparisons keep the order they had beside a draw
    alone = compare.plan_judgments(comparisons, args_for(), 'user', 'assistant')
    assert alone[0].order == compare.plan_judgments(
        [compare.Comparison(0, 'q', 'c', 'b'), comparisons[1]], args_for(), 'user', 'assistant')[1].order
    client = CountingClient()
    with compare.JudgmentCache(str(tmp_path / 'judgments.jsonl')) as cache:
        errors, requested = compare.judge_missing(judgments, client, args, cache)
        summary = compare.summarize(comparisons, judgments, cache.records, errors)
    assert requested == 2 and {k: summary[k] for k in ('total', 'wins', 'losses', 'ties', 'failures')} == \
        {'total': 3, 'wins': 0, 'losses': 0, 'ties': 3, 'failures': 0}  # 'Response 1' in both orders: a tie too


def test_identical_comparisons_share_one_judgment_and_the_cache_answers_a_rerun(tmp_path):
    comparisons = [compare.Comparison(0, 'q', 'same answer', 'other'), compare.Comparison(1, 'q', 'same answer', 'other'),
                   compare.Comparison(2, 'q2', 'c', 'b')]
    args = args_for(both_orders=True, sleep_time=0, verbose=False)
    judgments = compare.plan_judgments(comparisons, args, 'user', 'assistant')
    assert len(judgments) == 6 and len({j.key for j in judgments}) == 4
    client = CountingClient()
    cache = compare.JudgmentCache(str(tmp_path / 'judgments.jsonl'))
    errors, requested = compare.judge_missing(judgments, client, args, cache)
    assert errors == {} and requested == 4 and len(client.requests) == 4
    summary = compare.summarize(comparisons, judgments, cache.records, errors)
    assert summary['total'] == 3 and summary['ties'] == 3  # 'Response 1' in both orders: the orders disagree
    cache.close()
    reopened = compare.JudgmentCache(str(tmp_path / 'judgments.jsonl'))
    assert compare.judge_missing(judgments, client, args, reopened) == ({}, 0) and len(client.requests) == 4
    reopened.close()
    other_judge = args_for(both_orders=True, sleep_time=0, verbose=False, judge='other-judge')
    rejudged = compare.plan_judgments(comparisons, other_judge, 'user', 'assistant')
    _, requested = compare.judge_missing(rejudged, client, other_judge, compare.JudgmentCache(str(tmp_path / 'judgments.jsonl')))
    assert requested == 4 and len(client.requests) == 8


def test_urls_are_written_without_credentials():
    assert compare.public_url('http://user:tok3n@judge.example:8000/v1?api-key=abc#x') == 'http://judge.example:8000/v1'
    assert compare.public_url('https://api.openai.com/v1') == 'https://api.openai.com/v1'


def test_visualize_plots_new_and_original_result_lines(tmp_path):
    new = {'exp_name': 'kto', 'judge': 'j', 'candidate': {'name': 'policy', 'wins': 7}, 'baseline': {'name': 'chosen'},
           'total': 12, 'win_rate': 0.75, 'win_rate_ci95': [0.5, 0.9]}
    original = {'exp_name': 'sft', 'judge': 'gpt-4-0613', 'total': 10, 'candidate': {'name': 'policy', 'wins': 8},
                'baseline': {'name': 'chosen', 'wins': 1}}
    nothing = dict(new, win_rate=None, win_rate_ci95=None)
    results = tmp_path / 'results.jsonl'
    results.write_text(''.join(json.dumps(r) + '\n' for r in (new, original, nothing)))
    bars = [visualize.bar_for(r) for r in visualize.load_results(str(results))]
    assert bars[0].win_rate == 0.75 and bars[0].interval == (0.5, 0.9)
    assert bars[1].win_rate == 0.8 and bars[1].interval == pytest.approx((0.490162, 0.943318), abs=1e-6)
    assert bars[1].label == 'sft: policy vs chosen\n(judge gpt-4-0613)' and bars[2] is None
    served = visualize.bar_for(dict(new, judge='/home/me/.cache/halos/models/smollm2-135m-instruct'))
    assert served.label == 'kto: policy vs chosen\n(judge smollm2-135m-instruct)'  # a judge served from a directory
    assert visualize.main([str(results), '-o', str(tmp_path / 'winrates.png')]) == 0
    assert (tmp_path / 'winrates.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# --- newcomer errors: one line that names the problem
def compare_error(capsys, monkeypatch, argv):
    monkeypatch.delenv('OPENAI_BASE_URL', raising=False)
    assert compare.main(argv) == 2
    stderr = capsys.readouterr().err
    message = stderr.strip().split('\n')[-1]  # any line before it is the progress bar's
    assert message.startswith('compare.py: ') and 'Traceback' not in stderr
    return message


@pytest.mark.parametrize('option, value, says', [
    ('--concurrency', '0', '0 is not an integer >= 1'),
    ('--max-tokens', '-3', '-3 is not an integer >= 1'),
    ('--max_comp', 'all', 'all is not an integer >= 1'),
    ('--max-retries', '-1', '-1 is not an integer >= 0'),
    ('--timeout', '0', '0 is not a number > 0'),
    ('--timeout', 'inf', 'inf is not a number > 0'),
    ('--sleep_time', '-1', '-1 is not a number >= 0'),
])
def test_a_bad_argument_is_named_before_anything_is_judged(tmp_path, capsys, option, value, says):
    with pytest.raises(SystemExit) as exit_:
        compare.main(['-f', str(write_samples(tmp_path / 'samples.json', 2)), '-r', str(tmp_path / 'results.jsonl'),
                      option, value])
    assert exit_.value.code == 2
    named = {'--max_comp': '--max_comp/-mc', '--sleep_time': '--sleep_time/-st'}.get(option, option)
    assert capsys.readouterr().err.strip() == f'compare.py: argument {named}: {says} (--help lists the arguments)'
    assert not (tmp_path / 'results.jsonl').exists()


def test_a_sample_field_judged_against_itself_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare.main(['-f', str(write_samples(tmp_path / 'samples.json', 2)), '-ck', 'policy', '-bk', 'policy'])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        "compare.py: --candidate_key and --baseline_key are both 'policy': a sample field judged against itself "
        "(--help lists the arguments)")


def test_samples_file_problems_are_named(tmp_path, capsys, monkeypatch):
    results = ['-r', str(tmp_path / 'results.jsonl'), '--base-url', 'http://127.0.0.1:9/v1']
    message = compare_error(capsys, monkeypatch, ['-f', str(tmp_path / 'missing.json')] + results)
    assert 'missing.json' in message and 'not found' in message and 'eval.py' in message
    (tmp_path / 'broken.json').write_text('{"samples": [')
    assert 'not valid JSON' in compare_error(capsys, monkeypatch, ['-f', str(tmp_path / 'broken.json')] + results)
    (tmp_path / 'records.jsonl').write_text('{"prompt": "p", "output": "a"}\n{"prompt": "p", "output": "b"}\n')
    assert compare_error(capsys, monkeypatch, ['-f', str(tmp_path / 'records.jsonl')] + results) == (
        f"compare.py: samples file '{tmp_path / 'records.jsonl'}' holds JSON records one per line (sample records, as "
        f"eval.py ++num_samples_per_prompt=k writes for label.py), not the samples JSON compare.py judges (eval.py "
        f"++mode=sample writes it)")
    (tmp_path / 'flat.json').write_text('[{"prompt": "p"}]')
    assert "'samples' list and a 'config'" in compare_error(capsys, monkeypatch, ['-f', str(tmp_path / 'flat.json')] + results)
    data = {'config': {}, 'samples': [{'prompt': 'p', 'chosen': 'c', 'policy': 'x'}] * 2 + [{'prompt': 'p', 'chosen': 'c'}]}
    (tmp_path / 'field.json').write_text(json.dumps(data))
    message = compare_error(capsys, monkeypatch, ['-f', str(tmp_path / 'field.json')] + results)
    assert "field.json': samples[2] has no field 'policy' (it has: prompt, chosen)" in message
    (tmp_path / 'empty.json').write_text('{"config": {}, "samples": []}')
    message = compare_error(capsys, monkeypatch, ['-f', str(tmp_path / 'empty.json')] + results)
    assert message == f"compare.py: samples file '{tmp_path}/empty.json' holds no samples to judge"
    message = compare_error(capsys, monkeypatch, ['-f', str(tmp_path)] + results)
    assert message == f"compare.py: samples file '{tmp_path}' cannot be read: Is a directory"
    assert not (tmp_path / 'results.jsonl').exists()


def test_openai_without_a_key_says_where_the_key_comes_from(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    samples = write_samples(tmp_path / 'samples.json', 2)
    message = compare_error(capsys, monkeypatch, ['-f', str(samples), '-r', str(tmp_path / 'results.jsonl')])
    assert 'OPENAI_API_KEY' in message and '--base-url' in message


def test_no_server_at_the_base_url_says_what_to_do(tmp_path, capsys, monkeypatch):
    samples = write_samples(tmp_path / 'samples.json', 2)
    url = f'http://127.0.0.1:{free_port()}/v1'
    started = time.monotonic()
    message = compare_error(capsys, monkeypatch, ['-f', str(samples), '-r', str(tmp_path / 'results.jsonl'),
                                                  '--base-url', url])
    assert f'no judge server reachable at {url}' in message and 'llama_cpp.server' in message
    assert time.monotonic() - started < 15


def fake_server_error(tmp_path, capsys, monkeypatch, **plan):
    """compare.py against a stand-in server (no model behind it) that misbehaves as `plan` says."""
    samples = write_samples(tmp_path / 'samples.json', 4)
    with FaultProxy(None, **plan) as server:
        message = compare_error(capsys, monkeypatch, ['-f', str(samples), '-r', str(tmp_path / 'results.jsonl'),
                                                      '--base-url', server.base_url, '-st', '0', '--concurrency', '1',
                                                      '--max-retries', '1', '-v', 'false'])
    return message, server


def test_a_rejected_key_is_named(tmp_path, capsys, monkeypatch):
    message, _ = fake_server_error(tmp_path, capsys, monkeypatch, models_status=401)
    assert message.startswith('compare.py: the judge server at http://127.0.0.1:')
    assert 'rejected the API key: check OPENAI_API_KEY' in message


def test_an_unknown_judge_model_stops_the_run_and_names_the_judge(tmp_path, capsys, monkeypatch):
    message, server = fake_server_error(tmp_path, capsys, monkeypatch, status={n: 404 for n in range(1, 9)})
    assert 'refused the request (NotFoundError' in message and "check --judge 'gpt-4-0613'" in message
    # a refusal that every request would get is not retried (with one worker, the next request may have left)
    assert server.chat_requests <= 2
    assert not (tmp_path / 'results.jsonl').exists() and not (tmp_path / 'results.judgments.jsonl').exists()


def test_a_judge_that_never_names_a_response_appends_no_result(tmp_path, capsys, monkeypatch):
    message, server = fake_server_error(tmp_path, capsys, monkeypatch, garbage_text=range(1, 100))
    assert message == (f"compare.py: no comparison of 4 got a verdict (4 answers named neither response, 0 requests "
                       f"failed); nothing appended to {tmp_path}/results.jsonl; the answers that named neither are "
                       f"cached in {tmp_path}/results.judgments.jsonl, which a rerun reads: delete it to ask again")
    assert server.chat_requests == 4 and not (tmp_path / 'results.jsonl').exists()


def test_an_empty_answer_is_a_failed_request_that_a_rerun_asks_again(tmp_path, capsys, monkeypatch):
    samples = write_samples(tmp_path / 'samples.json', 4)
    with FaultProxy(None, empty=range(1, 5)) as server:
        argv = ['-f', str(samples), '-r', str(tmp_path / 'results.jsonl'), '--base-url', server.base_url, '-st', '0',
                '--concurrency', '1', '--max-retries', '1', '-v', 'false']
        message = compare_error(capsys, monkeypatch, argv)
        assert message == (
            f"compare.py: no comparison of 4 got a verdict (0 answers named neither response, 4 requests failed; last "
            f"error: ValueError: the judge gave an empty answer (one that reasons before it answers may spend all of "
            f"its 10 tokens first)); nothing appended to {tmp_path}/results.jsonl")
        assert not (tmp_path / 'results.judgments.jsonl').exists()
        assert compare.main(argv) == 0
    assert server.chat_requests == 8 and result_lines(tmp_path)[0]['judgments'] == {'requested': 4, 'cached': 0}


def test_a_lost_server_keeps_what_was_judged_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    message, _ = fake_server_error(tmp_path, capsys, monkeypatch, die={3})
    assert 'lost the judge server at http://127.0.0.1:' in message
    assert 'restart the server and rerun to continue' in message
    assert len(cache_keys(tmp_path)) == 2  # the two judgments before the server went away are kept


# --- end to end against the real local judge server
@pytest.mark.slow
def test_judging_end_to_end_counts_add_up_and_a_rerun_judges_nothing(tmp_path, proxy):
    write_samples(tmp_path / 'samples.json', 5, tokenizer='embedded:tiny-smollm2')
    first = run_compare(tmp_path, proxy.base_url, '--both-orders', '--concurrency', '2', '--max-tokens', '8',
                        '-csv', str(tmp_path / 'tables' / 'judgments.csv'))  # its directory is made
    result = result_lines(tmp_path)[0]
    assert_counts_add_up(result, 5)
    assert result['judgments'] == {'requested': 10, 'cached': 0} and proxy.chat_requests == 10
    assert set(proxy.answered.values()) == {1} and len(proxy.answered) == 10
    assert result['errors'] == 0 and result['length_unit'] == 'tokens' and len(result['candidate']['lengths']) == 5
    assert result['constrained'] is True and result['unparseable'] == 0  # llama.cpp honours the verdict schema
    assert result['judge'] == JUDGE and result['base_url'] == proxy.base_url and result['both_orders'] is True
    bias = result['position_bias']
    assert bias['candidate_first']['judged'] + bias['candidate_second']['judged'] == 10 - \
        sum(1 for line in open(tmp_path / 'results.judgments.jsonl') if json.loads(line)['position'] is None)
    keys = cache_keys(tmp_path)
    assert len(keys) == 10 and len(set(keys)) == 10
    with open(tmp_path / 'tables' / 'judgments.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {(r['src_A'], r['src_B']) for r in rows} == {('policy', 'chosen'), ('chosen', 'policy')}
    assert f"{result['wins']} wins, {result['losses']} losses" in first.stdout

    proxy.reset()
    second = run_compare(tmp_path, proxy.base_url, '--both-orders', '--concurrency', '2', '--max-tokens', '8')
    again = result_lines(tmp_path)[1]
    assert proxy.chat_requests == 0 and again['judgments'] == {'requested': 0, 'cached': 10}
    assert {k: again[k] for k in ('wins', 'losses', 'ties', 'failures')} == \
        {k: result[k] for k in ('wins', 'losses', 'ties', 'failures')}
    assert len(cache_keys(tmp_path)) == 10

    plot = subprocess.run([sys.executable, os.path.join(ROOT, 'visualize.py'), str(tmp_path / 'results.jsonl'),
                           '-o', str(tmp_path / 'winrates.png')], capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / 'winrates.png').read_bytes()[:4] == b'\x89PNG'
    assert_secret_never_written(tmp_path, first.stdout, first.stderr, second.stdout, second.stderr)


@pytest.mark.slow
def test_a_killed_run_resumes_without_judging_anything_twice(tmp_path, proxy):
    n = 5  # the sixth shipped sample's two replies read alike up to their last full sentence: a draw, not asked
    write_samples(tmp_path / 'samples.json', n)
    cache = tmp_path / 'results.judgments.jsonl'
    process = subprocess.Popen(compare_command(tmp_path, proxy.base_url, '--concurrency', '1'), cwd=tmp_path,
                               env=judge_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (cache.exists() and cache.read_bytes().count(b'\n') >= 2):
        assert process.poll() is None, 'compare.py ended before it could be killed'
        assert time.monotonic() < deadline, 'no judgment reached the cache'
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / 'results.jsonl').exists()
    done = len(compare.JudgmentCache(str(cache)).records)
    assert 2 <= done < n

    proxy.reset()
    rerun = run_compare(tmp_path, proxy.base_url, '--concurrency', '1')
    result = result_lines(tmp_path)[0]
    assert proxy.chat_requests == n - done
    assert result['judgments'] == {'requested': n - done, 'cached': done}
    assert_counts_add_up(result, n)
    keys = cache_keys(tmp_path)
    assert len(keys) == n and len(set(keys)) == n
    assert_secret_never_written(tmp_path, rerun.stdout, rerun.stderr)


@pytest.mark.slow
def test_injected_faults_lose_or_double_no_judgment_and_count_failures(tmp_path, proxy):
    """Requests 1-2 get a 500 and 4 hangs past the timeout (all retried); 6 gets an answer naming no response
    (cached, unparseable); 8 gets invalid JSON (a failure, judged again by the next run)."""
    n = 5  # each sample one judgment: none is a draw
    write_samples(tmp_path / 'samples.json', n)
    proxy.reset(fail_first=2, hang={4}, garbage_text={6}, garbage_json={8})
    proxy.hang_seconds = 16
    options = ('--concurrency', '1', '--timeout', '12', '--max-retries', '3')  # room for a slow constrained answer
    faulty = run_compare(tmp_path, proxy.base_url, *options)
    result = result_lines(tmp_path)[0]
    assert dict(proxy.faults) == {'500': 2, 'hang': 1, 'garbage_text': 1, 'garbage_json': 1}
    assert proxy.chat_requests == n + 3  # one answer per judgment, plus the three retried faults
    assert set(proxy.answered.values()) == {1}
    assert_counts_add_up(result, n)
    assert result['errors'] == 1 and result['unparseable'] >= 1
    assert result['judgments'] == {'requested': n, 'cached': 0}
    answers = {json.loads(line)['answer'] for line in open(tmp_path / 'results.judgments.jsonl')}
    assert len(cache_keys(tmp_path)) == n - 1 and 'banana bread is nice this time of year' in answers

    proxy.reset()
    clean = run_compare(tmp_path, proxy.base_url, *options)
    final = result_lines(tmp_path)[1]
    assert proxy.chat_requests == 1 and final['judgments'] == {'requested': 1, 'cached': n - 1}
    assert_counts_add_up(final, n)
    assert final['errors'] == 0 and final['unparseable'] >= 1
    keys = cache_keys(tmp_path)
    assert len(keys) == n and len(set(keys)) == n
    assert_secret_never_written(tmp_path, faulty.stdout, faulty.stderr, clean.stdout, clean.stderr)
