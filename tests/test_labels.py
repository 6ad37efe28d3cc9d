"""Labels checked at the boundary: every score a finite number, a broken labeller stopping the run with one line
that names it and the sample, a round with too few scores or nothing to train on stopping too, and the resumed
run, its labeller fixed, labelling the round again without sampling it (the real round loop, in this process)."""
import json
import math
import re
import os

import numpy as np
import pytest
import torch

import label
from fault_proxy import FaultProxy
from halos.errors import ConfigError, DataError
from halos.labelers import LabelError, SampleFailed, checked_scores
from helpers import DATA, ROOT, run_in_process
from utils import free_port

REWARD = os.path.join(ROOT, 'tests', 'rewards.py')
BROKEN = '''
def raises(prompt, completion):
    raise ValueError('boom')


def nan(prompt, completion):
    return float('nan')


def text(prompt, completion):
    return 'high'


def constant(prompt, completion):
    return 1.0
'''


class Labeler:
    name, may_abstain = 'a test labeler', False

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, prompts, completions, extras):
        return self.scores


@pytest.mark.parametrize('score, expected', [(0.5, 0.5), (3, 3.0), (True, 1.0), (np.float32(0.25), 0.25),
                                             (torch.tensor(2.0), 2.0), (np.int64(4), 4.0)])
def test_a_finite_number_of_any_numeric_type_passes_as_a_float(score, expected):
    assert checked_scores(Labeler([score]), ['p'], ['c'], ['sample 1']) == [expected]


@pytest.mark.parametrize('score', [float('nan'), math.inf, -math.inf, 'high', '0.5', None, [1.0], torch.ones(2)])
def test_anything_else_stops_with_the_labeler_the_sample_and_the_value(score):
    with pytest.raises(LabelError) as error:
        checked_scores(Labeler([0.0, score]), ['p', 'q'], ['c', 'd'], ['sample 1', 'sample 2'])
    batched = ("; function(prompt, completion) scores one completion a call (a function with a parameter named "
               "completions is given a batch, as TRL's are)") if isinstance(score, list) else ''
    assert str(error.value) == f"a test labeler gave {score!r} for sample 2: a score must be a finite number{batched}"


def test_a_score_whose_sums_would_overflow_float32_stops_with_the_sample_as_an_infinite_one_would():
    """Two scores of 3e38 each lie in float32's range, but their sum, and so a group's mean, does not."""
    assert checked_scores(Labeler([1e30, -1e30]), ['p', 'q'], ['c', 'd'], ['sample 1', 'sample 2']) == [1e30, -1e30]
    for score, says in ((3e38, 'a score must'), (-1e39, 'a score must'), ({'a': 6e29, 'b': 6e29}, 'the sum of its '
                                                                                                 'parts must')):
        with pytest.raises(LabelError) as error:
            checked_scores(Labeler([score]), ['p'], ['c'], ['sample 1'])
        assert str(error.value) == (f"a test labeler gave {score!r} for sample 1: {says} lie within +-1e+30, where "
                                    f"the float32 sums and means of training stay finite")


def test_a_score_in_named_parts_is_their_sum_and_keeps_them():
    from halos.labelers import PartedScore
    score, = checked_scores(Labeler([{'correct': 1, 'format': np.float32(0.25)}]), ['p'], ['c'], ['sample 1'])
    assert isinstance(score, PartedScore) and score == 1.25 and score.parts == {'correct': 1.0, 'format': 0.25}
    for parts, why in [({'correct': 1.0, 'format': math.nan}, 'not format'), ({}, 'it has none'),
                       ({'correct': 'yes'}, 'not correct')]:
        with pytest.raises(LabelError) as error:
            checked_scores(Labeler([parts]), ['p'], ['c'], ['sample 1'])
        assert str(error.value) == (f"a test labeler gave {parts!r} for sample 1: a score's parts must be finite "
                                    f"numbers ({why})")


def test_label_py_writes_each_part_of_a_score_beside_it(tmp_path):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text(''.join(json.dumps({'prompt': 'Hi', 'output': output, 'prompt_id': 'h', 'sample_id': i}) + '\n'
                               for i, output in enumerate(['Hello there.', 'Yo.'])))
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function',
                       f'{REWARD}:vowels_and_brevity', '--feedback', 'scalar']) == 0
    records = [json.loads(line) for line in open(tmp_path / 'out.jsonl')]
    assert [r['reward_parts'] for r in records] == [{'vowels': 4.0, 'brevity': -0.12}, {'vowels': 1.0, 'brevity': -0.03}]
    assert [r['reward'] for r in records] == [pytest.approx(3.88), pytest.approx(0.97)]


def test_a_huge_or_long_value_is_named_in_a_short_line():
    for value, shown in ((10 ** 400, repr(10 ** 400)[:77] + '...'), ('x' * 500, repr('x' * 500)[:77] + '...')):
        with pytest.raises(LabelError) as error:
            checked_scores(Labeler([value]), ['p'], ['c'], ['sample 1'])
        assert str(error.value) == f"a test labeler gave {shown} for sample 1: a score must be a finite number"


def test_only_a_labeler_that_may_abstain_gives_none():
    judge = Labeler([None, 7.0])
    judge.may_abstain = True
    assert checked_scores(judge, ['p', 'q'], ['c', 'd'], ['one', 'two']) == [None, 7.0]
    with pytest.raises(LabelError, match=r'^a test labeler gave 1 scores for the batch of 2 completions from one to '
                                         r'two$'):
        checked_scores(Labeler([1.0]), ['p', 'q'], ['c', 'd'], ['one', 'two'])
    with pytest.raises(LabelError, match=r'^a test labeler gave 3 scores for the batch of 2 completions of one$'):
        checked_scores(Labeler([1.0] * 3), ['p', 'p'], ['c', 'd'], ['one', 'one'])


FIELDS = """
def by_name(prompt, completion, answer, unit='m'):
    return float(completion == answer + unit)


def every_field(prompt, completion, **fields):
    return float(len(fields))


def none(prompt, completion):
    return 1.0


def spread(*args, **fields):
    return float(len(args) * 10 + len(fields))


def short_names(p, c, **fields):
    return float(sorted(fields) == ['answer'])
"""


def test_a_reward_function_is_given_the_prompt_fields_it_names(tmp_path):
    from halos.labelers import RewardFunctionLabeler
    (tmp_path / 'fields.py').write_text(FIELDS)
    label = lambda name, completions, extras: checked_scores(
        RewardFunctionLabeler(f"{tmp_path / 'fields.py'}:{name}"), ['p'] * len(completions), completions,
        [f'sample {i}' for i in range(len(completions))], extras)
    extras = [{'answer': '4', 'unit': 'km', 'level': 2}, {'answer': '4'}]
    assert label('by_name', ['4km', '4m'], extras) == [1.0, 1.0]  # unit from the first record, its default after
    assert label('every_field', ['a', 'b'], extras) == [3.0, 1.0]
    assert label('none', ['a', 'b'], extras) == [1.0, 1.0]  # fields it does not name are not given
    assert label('spread', ['a', 'b'], extras) == [23.0, 21.0]
    assert label('short_names', ['a'], [{'answer': '4', 'p': 'its own', 'c': 3}]) == [1.0]  # never twice
    with pytest.raises(LabelError) as error:
        label('by_name', ['4m', '5m'], [{'answer': '4'}, {'level': 2}])
    assert str(error.value) == (f"reward function {tmp_path / 'fields.py'}:by_name failed on sample 1: it takes "
                                f"answer, which its prompt's record lacks (a field given as null counts as absent; "
                                f"the prompt's own fields: level)")


CALLING_CONVENTIONS = """
import asyncio

def trl_style(completions, answer, **kwargs):
    return [float(c == a) + 10 * len(kwargs['prompts']) for c, a in zip(completions, answer)]

def trl_turns(prompts, completions, **kwargs):
    return [{'turns': len(p), 'roles': float(isinstance(c, list) and c[0]['role'] == 'assistant')}
            for p, c in zip(prompts, completions)]

def trl_no_prompts(completions):
    return [len(c) for c in completions]

def trl_scalar(completions, **kwargs):
    return 1.0

def trl_raises(completions, **kwargs):
    raise RuntimeError('the sandbox is down')

ORDER = []

async def one_async(prompt, completion, answer):
    await asyncio.sleep(0.05 if completion == 'slow' else 0)
    ORDER.append(completion)
    return float(completion == answer)

async def async_raises(prompt, completion):
    if completion == 'bad':
        raise ConnectionError('refused')
    return 1.0

async def trl_async(completions, **kwargs):
    return [0.5] * len(completions)

LIMIT = asyncio.Semaphore(2)  # a rate limit kept between calls: bound to the loop of the first

async def exits(prompt, completion):
    raise SystemExit(3)

async def limited(prompt, completion):
    async with LIMIT:
        await asyncio.sleep(0)
        return 1.0

IN_FLIGHT, PEAK = [0], [0]

async def in_flight(prompt, completion):
    IN_FLIGHT[0] += 1
    await asyncio.sleep(0.01)
    PEAK[0] = max(PEAK[0], IN_FLIGHT[0])
    IN_FLIGHT[0] -= 1
    return 1.0

async def trl_in_flight(completions, **kwargs):
    return [await in_flight(None, completion) for completion in completions]

def one_argument(completion):
    return 1.0

def trl_token_count(completions, completion_ids, **kwargs):
    return [len(ids) for ids in completion_ids]

def keyword_only(*, prompt, completion):
    return 1.0
"""


def calling(tmp_path, name):
    from halos.labelers import RewardFunctionLabeler
    (tmp_path / 'conventions.py').write_text(CALLING_CONVENTIONS)
    labeler = RewardFunctionLabeler(f"{tmp_path / 'conventions.py'}:{name}")
    return lambda prompts, completions, extras: checked_scores(
        labeler, prompts, completions, [f'sample {i}' for i in range(len(completions))], extras)


def test_a_reward_function_that_names_completions_is_called_once_per_batch_as_trl_calls_it(tmp_path):
    label = calling(tmp_path, 'trl_style')
    assert label(['p', 'q'], ['4', '5'], [{'answer': '4'}, {'answer': '4'}]) == [21.0, 20.0]
    turns = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}, {'role': 'user', 'content': '?'}]
    scores = calling(tmp_path, 'trl_turns')([turns, 'plain'], ['a', 'b'], [{}, {}])
    assert scores == [4.0, 5.0]
    assert [s.parts for s in scores] == [{'turns': 3.0, 'roles': 1.0}, {'turns': 5.0, 'roles': 0.0}]
    assert calling(tmp_path, 'trl_no_prompts')(['p', 'q'], ['ab', 'c'], [{'level': 1}, {}]) == [2.0, 1.0]
    with pytest.raises(LabelError) as error:
        calling(tmp_path, 'trl_scalar')(['p', 'q'], ['a', 'b'], [{}, {}])
    assert str(error.value) == (f"reward function {tmp_path / 'conventions.py'}:trl_scalar failed on the batch of 2 "
                                f"completions from sample 0 to sample 1: it gave 1.0, not a list of one score per completion")
    with pytest.raises(LabelError, match=r"trl_raises failed on the batch of 2 completions from sample 0 to sample 1: it raised "
                                         r"RuntimeError: the sandbox is down$"):
        calling(tmp_path, 'trl_raises')(['p', 'q'], ['a', 'b'], [{}, {}])
    with pytest.raises(LabelError, match=r"trl_style failed on sample 2: it takes answer, which its prompt's record "
                                         r"lacks \(a field given as null counts as absent; the prompt's own "
                                         r"fields: none\)$"):
        label(['p', 'q', 'r'], ['4', '5', '6'], [{'answer': '4'}, {'answer': '4'}, {}])


def test_a_trl_reward_function_that_needs_what_halos_does_not_give_stops_at_once(tmp_path):
    with pytest.raises(ConfigError) as error:
        calling(tmp_path, 'trl_token_count')
    assert str(error.value) == (f"reward function {tmp_path / 'conventions.py'}:trl_token_count: it takes "
                                f"completion_ids, which TRL gives and halos does not (halos gives prompts, completions "
                                f"and the prompts' own fields); give completion_ids a default")


def test_an_async_reward_function_scores_the_completions_of_a_call_concurrently(tmp_path):
    label = calling(tmp_path, 'one_async')
    from halos.labelers import load_reward_function
    order = load_reward_function(f"{tmp_path / 'conventions.py'}:one_async").__globals__['ORDER']
    assert label(['p'] * 3, ['slow', '4', '5'], [{'answer': '4'}] * 3) == [0.0, 1.0, 0.0]
    assert order == ['4', '5', 'slow']  # the slow one finished last: all three ran at once, in input order out
    with pytest.raises(LabelError, match=r"async_raises failed on sample 1: it raised ConnectionError: refused$"):
        calling(tmp_path, 'async_raises')(['p'] * 3, ['ok', 'bad', 'ok'], [{}] * 3)
    assert calling(tmp_path, 'trl_async')(['p', 'q'], ['a', 'b'], [{}, {}]) == [0.5, 0.5]
    limited = calling(tmp_path, 'limited')
    assert [limited(['p'] * 3, ['a', 'b', 'c'], [{}] * 3) for _ in range(2)] == [[1.0] * 3] * 2
    with pytest.raises(LabelError, match=r'exits failed on sample 0: it raised SystemExit: 3$'):  # the loop lives on
        calling(tmp_path, 'exits')(['p'], ['a'], [{}])
    assert limited(['p'], ['a'], [{}]) == [1.0]


def test_the_async_functions_of_a_list_score_at_once(tmp_path):
    from halos.labelers import RewardFunctionsLabeler, load_reward_function
    (tmp_path / 'conventions.py').write_text(CALLING_CONVENTIONS)
    specs = [f"{tmp_path / 'conventions.py'}:{name}" for name in ('in_flight', 'trl_in_flight', 'one_async')]
    scores = checked_scores(RewardFunctionsLabeler(specs, [1.0, 2.0, 1.0]), ['p', 'q'], ['4', '5'],
                            ['sample 0', 'sample 1'], [{'answer': '4'}] * 2)
    assert scores == [4.0, 3.0] and [s.parts for s in scores] == [
        {'in_flight': 1.0, 'trl_in_flight': 1.0, 'one_async': 1.0},
        {'in_flight': 1.0, 'trl_in_flight': 1.0, 'one_async': 0.0}]
    # each completion's own call, and the batch's call (which scores its completions one after another)
    assert load_reward_function(specs[0]).__globals__['PEAK'] == [3]
    # the functions of one file share its module, however the file is named
    assert load_reward_function(specs[1]).__globals__ is load_reward_function(
        f"{tmp_path}/./conventions.py:one_async").__globals__ is load_reward_function(specs[0]).__globals__


def test_an_async_reward_function_is_awaited_from_a_caller_whose_own_loop_runs(tmp_path):
    import asyncio
    label = calling(tmp_path, 'async_raises')

    async def in_a_notebook():
        return label(['p', 'q'], ['ok', 'fine'], [{}, {}])
    assert asyncio.run(in_a_notebook()) == [1.0, 1.0]


@pytest.mark.parametrize('name, signature', [('one_argument', '(completion)'),
                                             ('keyword_only', '(*, prompt, completion)')])
def test_a_reward_function_that_cannot_be_called_with_a_prompt_and_a_completion_stops_at_once(tmp_path, name,
                                                                                            signature):
    with pytest.raises(ConfigError) as error:
        calling(tmp_path, name)
    assert str(error.value) == (
        f"reward function {tmp_path / 'conventions.py'}:{name}: it takes {signature}; halos calls a reward function "
        f"as function(prompt, completion) for each completion, or, where it has a parameter named completions, as "
        f"TRL does: function(prompts=[...], completions=[...]) for a batch")


SEVERAL = """
def length(prompt, completion):
    return float(len(completion))

def has_x(prompt, completion):
    return None if completion.startswith('skip') else {'x': float('x' in completion), 'bonus': 0.5}

def never(prompt, completion):
    return None

def text(prompt, completion):
    return 'high'

def needs_answer(prompt, completion, answer):
    return float(completion == answer)

def trl_length(completions, **kwargs):
    return [2.0 * len(c) for c in completions]
"""


def test_several_reward_functions_score_the_weighted_sum_with_each_functions_score_a_part(tmp_path):
    from halos.labelers import PartedScore, reward_function_labeler
    (tmp_path / 'several.py').write_text(SEVERAL)
    spec = lambda name: f"{tmp_path / 'several.py'}:{name}"
    label = lambda names, completions, weights=None, extras=None: checked_scores(
        reward_function_labeler([spec(name) for name in names], weights), ['p'] * len(completions), completions,
        [f'sample {i}' for i in range(len(completions))], extras)
    scores = label(['length', 'has_x', 'trl_length'], ['xyz', 'skip', 'ab'], [1.0, -2.0, 0.25])
    # xyz: 3 - 2 * (1 + 0.5) + 0.25 * 6; skip: has_x does not apply, 4 + 0.25 * 8; ab: 2 - 2 * 0.5 + 0.25 * 4
    assert scores == [1.5, 6.0, 2.0] and all(isinstance(score, PartedScore) for score in scores)
    assert [score.parts for score in scores] == [{'length': 3.0, 'has_x': 1.5, 'trl_length': 6.0},
                                                 {'length': 4.0, 'trl_length': 8.0},
                                                 {'length': 2.0, 'has_x': 0.5, 'trl_length': 4.0}]
    assert label(['length', 'has_x'], ['xy']) == [3.5]  # no weights: all 1
    assert label(['length', 'never'], ['ab']) == [2.0]  # a function that gives None does not apply
    for names, completion, why in [
            (['never', 'has_x'], 'skip', 'none of the reward functions applies to it (each gave None)'),
            (['length', 'text'], 'ab', f"{spec('text')} gave 'high': a score must be a finite number")]:
        with pytest.raises(LabelError) as error:
            label(names, [completion])
        assert str(error.value) == f"reward functions {spec(names[0])}, {spec(names[1])} failed on sample 0: {why}"
    with pytest.raises(LabelError) as error:
        label(['length', 'needs_answer'], ['4', '5'], extras=[{'answer': '4'}, {}])
    assert str(error.value) == (f"reward functions {spec('length')}, {spec('needs_answer')} failed on sample 1: "
                                f"{spec('needs_answer')}: it takes answer, which its prompt's record lacks (a field "
                                f"given as null counts as absent; the prompt's own fields: none)")
    with pytest.raises(ConfigError, match=rf"^the reward functions .* name {spec('length')} twice: give each once "
                                          rf"\(a weight scales one\)$"):
        reward_function_labeler([spec('length'), spec('has_x'), spec('length')])
    same_file = os.path.join(os.path.relpath(tmp_path), '.', 'several.py:length')  # the same file, spelled otherwise
    with pytest.raises(ConfigError, match=rf"^the reward functions .* name {re.escape(same_file)} twice"):
        reward_function_labeler([spec('length'), same_file])
    with pytest.raises(ConfigError) as error:
        reward_function_labeler([spec('length'), spec('has_x')], [0.0, 0.0])
    assert str(error.value) == (f"the reward weights of {spec('length')}, {spec('has_x')} are all 0, so every score "
                                f"would be 0: give some function a weight")
    with pytest.raises(ConfigError) as error:
        reward_function_labeler([spec('length'), spec('has_x')], [1.0])
    assert str(error.value) == (f"1 reward weight for the 2 reward functions {spec('length')}, {spec('has_x')}: "
                                f"give one weight per function")


def test_label_py_scores_with_several_weighted_reward_functions(tmp_path):
    (tmp_path / 'several.py').write_text(SEVERAL)
    samples = tmp_path / 'samples.jsonl'
    samples.write_text(''.join(json.dumps({'prompt': 'Say x.', 'output': output, 'prompt_id': 'q', 'sample_id': i})
                               + '\n' for i, output in enumerate(['x', 'no'])))
    assert label.main(['--reward-function', f"{tmp_path}/several.py:length", '--reward-weights', '0.5,2',
                       str(samples), str(tmp_path / 'out.jsonl'), '--reward-function', f"{tmp_path}/several.py:has_x",
                       '--feedback', 'scalar']) == 0
    records = [json.loads(line) for line in open(tmp_path / 'out.jsonl')]
    assert [(r['output'], r['reward'], r['reward_parts']) for r in records] == [
        ('x', 0.5 + 2 * 1.5, {'length': 1.0, 'has_x': 1.5}), ('no', 1.0 + 2 * 0.5, {'length': 2.0, 'has_x': 0.5})]


def test_label_py_gives_a_samples_own_fields_to_the_reward_function_and_keeps_them(tmp_path, capsys):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text(''.join(json.dumps({'prompt': 'What is 2+2?', 'output': output, 'prompt_id': 'q',
                                           'sample_id': i, 'answer': '4'}) + '\n'
                               for i, output in enumerate(['It is 4.', 'It is 5.'])))
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function',
                       f'{REWARD}:answer_count', '--feedback', 'scalar']) == 0
    records = [json.loads(line) for line in open(tmp_path / 'out.jsonl')]
    assert [(r['output'], r['reward'], r['answer']) for r in records] == [('It is 4.', 1.0, '4'), ('It is 5.', 0.0, '4')]
    import pyarrow
    import pyarrow.parquet
    rows = [json.loads(line) for line in open(samples)]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / 'samples.parquet')
    assert label.main([str(tmp_path / 'samples.parquet'), str(tmp_path / 'from_parquet.jsonl'), '--reward-function',
                       f'{REWARD}:answer_count', '--feedback', 'scalar']) == 0
    assert [json.loads(line) for line in open(tmp_path / 'from_parquet.jsonl')] == records


def test_a_labeler_that_fails_on_a_sample_is_named_with_it():
    class Failing(Labeler):
        def __call__(self, prompts, completions, extras):
            raise SampleFailed(1, 'it raised KeyError: x')
    with pytest.raises(LabelError, match=r'^a test labeler failed on two: it raised KeyError: x$'):
        checked_scores(Failing([]), ['p', 'q'], ['c', 'd'], ['one', 'two'])


def test_a_reward_function_that_does_not_import_is_named_with_its_file_and_line(tmp_path):
    from halos.labelers import load_reward_function
    (tmp_path / 'syntax.py').write_text('def reward(prompt, completion)\n    return 1.0\n')
    (tmp_path / 'raising.py').write_text('import no_such_module\n')
    with pytest.raises(ConfigError, match=rf"^reward function '{tmp_path}/syntax.py:reward': {tmp_path}/syntax.py "
                                          rf"line 1: expected ':'$"):
        load_reward_function(f'{tmp_path}/syntax.py:reward')
    with pytest.raises(ConfigError, match=rf"importing {tmp_path}/raising.py raised ModuleNotFoundError: No module "
                                          rf"named 'no_such_module'$"):
        load_reward_function(f'{tmp_path}/raising.py:reward')


def test_a_reward_function_that_calls_exit_is_named_with_its_sample_instead_of_ending_the_run(tmp_path):
    from halos.labelers import reward_function_labeler
    (tmp_path / 'exits.py').write_text('import sys\n'
                                       'def reward(prompt, completion):\n    sys.exit(3) if completion == "b" else 1.0\n'
                                       'async def later(prompt, completion):\n    sys.exit("done")\n'
                                       'def batch(prompts, completions):\n    exit()\n')
    for name, says in [('reward', 'sample b: it raised SystemExit: 3'), ('later', 'sample a: it raised SystemExit: done'),
                       ('batch', 'the batch of 2 completions from sample a to sample b: it raised SystemExit: None')]:
        with pytest.raises(LabelError) as error:
            checked_scores(reward_function_labeler(f'{tmp_path}/exits.py:{name}'), ['p', 'q'], ['a', 'b'],
                           ['sample a', 'sample b'])
        assert str(error.value) == f"reward function {tmp_path}/exits.py:{name} failed on {says}"
    (tmp_path / 'exits_on_import.py').write_text('raise SystemExit(4)\n')
    with pytest.raises(ConfigError, match=r"importing .*exits_on_import.py raised SystemExit: 4$"):
        reward_function_labeler(f'{tmp_path}/exits_on_import.py:reward')


# ---------------------------------------------------------------- the round loop

def online(tmp_path, exp_name, *extra, loss='dpo'):
    """One online round on 4 prompts x 3 samples, in the README's form: the prompt pool is `online.prompts`
    (one file, not a list) and no `datasets` is given."""
    prompts = tmp_path / 'prompts.jsonl'
    if not prompts.exists():
        prompts.write_text(''.join(open(os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')).readlines()[:4]))
    return [f'loss={loss}', 'model=tiny', f'exp_name={exp_name}', 'mode=train', f'++data_dir={DATA}',
            f'++cache_dir={tmp_path}', '++wandb.enabled=false', '++minimum_log_interval_secs=0', '++online.rounds=1',
            f'++online.prompts={prompts}', '++online.prompts_per_round=4', '++online.samples_per_prompt=3',
            '++max_new_tokens=8', '++model.batch_size=2', '++n_eval_examples=2', '++eval_every=1000', *extra]


def train(tmp_path, overrides, capsys):
    """train.py in this process: (exit status, the last line of stderr, stdout)."""
    capsys.readouterr()
    status, out = 0, ''
    try:
        out = run_in_process('train.py', overrides, tmp_path / 'hydra')
    except SystemExit as exit_:
        status = exit_.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return status, lines[-1] if lines else '', out


def test_a_fresh_run_samples_its_own_rounds_where_an_earlier_run_of_its_name_left_some(tmp_path, capsys):
    first, second = tmp_path / 'first.jsonl', tmp_path / 'second.jsonl'
    lines = open(os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')).readlines()
    first.write_text(''.join(lines[:4]))
    second.write_text(''.join(lines[-4:]))
    judgments = tmp_path / 'again' / 'rounds' / 'judgments.jsonl'  # a judge's cache, kept by a fresh run
    for prompts in (first, second):
        status, error, out = train(tmp_path, online(tmp_path, 'again', f'++online.prompts={prompts}',
                                                          f'++online.reward_function={REWARD}:vowels'), capsys)
        assert status == 0, error
        if prompts == first:
            judgments.write_text('{"a judgment": 1}\n')
    assert (f"warning: {tmp_path}/again holds an earlier run (LATEST, metrics.jsonl, rounds): this run starts afresh "
            f"and removes them once its models have loaded (++resume=true continues the earlier run instead)") in out
    assert judgments.read_text() == '{"a judgment": 1}\n'
    sampled = {json.loads(line)['prompt'] for line in open(tmp_path / 'again' / 'rounds' / '0' / 'samples.jsonl')}
    assert sampled == {json.loads(line)['prompt'] for line in lines[-4:]}
    rounds = [json.loads(line)['round'] for line in open(tmp_path / 'again' / 'metrics.jsonl') if 'round' in line]
    assert rounds == sorted(rounds)  # one run's records


def test_a_round_prompt_without_the_field_its_reward_function_needs_stops_the_run_before_the_models_load(
        tmp_path, monkeypatch):
    import halos.build
    from helpers import make_config
    questions = tmp_path / 'questions.jsonl'
    questions.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "What is 3+3?", "level": 1}\n')
    monkeypatch.setattr(halos.build, 'load_models', lambda *args: pytest.fail('the models loaded'))
    run = make_config(tmp_path, '++online.rounds=1', f'++online.prompts={questions}',
                      f'++online.reward_function=[{REWARD}:vowels,{REWARD}:answer_count]')
    with pytest.raises(LabelError) as error:
        halos.build.build_trainer(run)
    assert str(error.value) == (f"reward functions {REWARD}:vowels, {REWARD}:answer_count cannot score the prompt "
                                f"pool: {questions}: record 2: {REWARD}:answer_count: it takes answer, which its "
                                f"prompt's record lacks (a field given as null counts as absent; the prompt's own "
                                f"fields: level)")


def stops_then_resumes(tmp_path, capsys, name, broken, fixed, expected, loss='dpo'):
    """The run with `broken` labeller settings stops with `expected(samples)` (exit 2, no traceback); rerun with
    `fixed` and ++resume=true, it completes without sampling round 0 again."""
    status, last, _ = train(tmp_path, online(tmp_path, name, *broken, loss=loss), capsys)
    samples_file = tmp_path / name / 'rounds' / '0' / 'samples.jsonl'
    samples = [dict(json.loads(line), file=samples_file) for line in samples_file.read_text().splitlines()]
    assert status == 2 and len(samples) == 12
    assert last == f'train.py: {expected(samples)}'
    assert not (tmp_path / name / 'rounds' / '0' / 'feedback.jsonl').exists()
    sampled, content = samples_file.stat().st_mtime_ns, samples_file.read_text()
    status, _, out = train(tmp_path, online(tmp_path, name, *fixed, '++resume=true', loss=loss), capsys)
    assert status == 0 and 'no checkpoint yet' in out
    assert samples_file.stat().st_mtime_ns == sampled and samples_file.read_text() == content
    assert (tmp_path / name / 'rounds' / '0' / 'feedback.jsonl').exists()
    state = torch.load(tmp_path / name / 'LATEST' / 'trainer_state.pt', weights_only=True)
    assert state['completed_rounds'] == 1 and state['batch_counter'] > 0


def first_sample(samples):
    return f"round 0, prompt {samples[0]['prompt_id']}, sample 0"


def kept(samples):
    """The end of the message of a round stopped by its labeler."""
    return f"; the samples of round 0 stay in {samples[0]['file']}: rerun with ++resume=true once the labeler is fixed"


@pytest.mark.slow
@pytest.mark.parametrize('function, expected', [
    ('raises', lambda spec, samples: f"reward function {spec} failed on {first_sample(samples)}: it raised "
                                     f"ValueError: boom{kept(samples)}"),
    ('nan', lambda spec, samples: f"reward function {spec} gave nan for {first_sample(samples)}: a score must be a "
                                  f"finite number{kept(samples)}"),
    ('text', lambda spec, samples: f"reward function {spec} gave 'high' for {first_sample(samples)}: a score must "
                                   f"be a finite number{kept(samples)}"),
    ('constant', lambda spec, samples: f"round 0: 0 pairs: no prompt of 4 has two samples with different rewards; "
                                       f"sample more per prompt (online.samples_per_prompt) or at a higher temperature, "
                                       f"change online.threshold, or delete "
                                       f"{samples[0]['file'].parent}/ to sample the round again"),
])
def test_a_broken_reward_function_stops_the_round_and_the_fixed_one_resumes_it(tmp_path, capsys, function, expected):
    (tmp_path / 'broken.py').write_text(BROKEN)
    spec = f'{tmp_path}/broken.py:{function}'
    stops_then_resumes(tmp_path, capsys, function, [f'++online.reward_function={spec}'],
                       [f'++online.reward_function={REWARD}:vowels'], lambda samples: expected(spec, samples))


@pytest.mark.slow
def test_a_round_whose_samples_file_lost_records_is_named_on_resume(tmp_path, capsys):
    (tmp_path / 'broken.py').write_text(BROKEN)
    status, _, _ = train(tmp_path, online(tmp_path, 'cut', f'++online.reward_function={tmp_path}/broken.py:raises'),
                         capsys)
    samples_file = tmp_path / 'cut' / 'rounds' / '0' / 'samples.jsonl'
    samples_file.write_text(''.join(samples_file.read_text().splitlines(keepends=True)[:5]))  # whole lines, too few
    fixed = online(tmp_path, 'cut', f'++online.reward_function={REWARD}:vowels', '++resume=true')
    status, last, _ = train(tmp_path, fixed, capsys)
    assert (status, last) == (2, f"train.py: {samples_file} holds 5 samples, where round 0 samples 12 (4 prompts x 3): "
                                 f"delete {samples_file.parent}/ to sample the round again")


def judged_by(url):
    """The fake judge scores every sample alike: against a fixed threshold each is a desirable SFT target."""
    return ['++online.labeler=judge', '++online.judge=smollm2', f'++online.base_url={url}', '++online.feedback=binary',
            '++online.threshold=1']


def test_a_judge_server_that_is_down_stops_the_run_before_it_samples(tmp_path, capsys):
    down = f'http://127.0.0.1:{free_port()}/v1'  # nothing listens there
    status, last, _ = train(tmp_path, online(tmp_path, 'down', *judged_by(down), loss='sft'), capsys)
    assert (status, last) == (2, f"train.py: no judge server reachable at {down}: start one (python -m "
                                 f"llama_cpp.server --model M.gguf, vllm serve M, or ollama serve) and pass its URL "
                                 f"(--base-url; online.base_url in training), or unset OPENAI_BASE_URL to use OpenAI")
    assert not (tmp_path / 'down').exists()


def test_the_judge_client_logs_no_line_per_request():
    import logging

    from halos import judge  # noqa: F401 (importing it quiets the HTTP client)
    assert all(logging.getLogger(name).level == logging.WARNING for name in ('httpx', 'openai'))


def test_judging_with_openai_without_a_key_stops_the_run_before_it_samples(tmp_path, capsys, monkeypatch):
    for name in ('OPENAI_API_KEY', 'OPENAI_BASE_URL'):
        monkeypatch.delenv(name, raising=False)
    judged = ['++online.labeler=judge', '++online.judge=gpt-4o', '++online.feedback=best']
    status, last, _ = train(tmp_path, online(tmp_path, 'no_key', *judged, loss='sft'), capsys)
    assert (status, last) == (2, "train.py: judging with OpenAI needs an API key: export OPENAI_API_KEY=... (it is read "
                                 "from the environment only), or point --base-url at a local server such as "
                                 "http://127.0.0.1:8000/v1")
    assert not (tmp_path / 'no_key').exists()


@pytest.mark.slow
def test_a_judge_server_lost_mid_round_stops_the_round_and_a_working_one_resumes_it(tmp_path, capsys, monkeypatch):
    from halos import judge
    make_client = judge.make_client
    monkeypatch.setattr(judge, 'make_client', lambda url, timeout, max_retries: make_client(url, timeout, 0))  # fast
    with FaultProxy(None, die=range(1, 1000)) as dying, FaultProxy(None) as working:
        cache = tmp_path / 'lost' / 'rounds' / 'judgments.jsonl'
        stops_then_resumes(tmp_path, capsys, 'lost', judged_by(dying.base_url), judged_by(working.base_url),
                           lambda samples: f"lost the judge server at {dying.base_url} (APIConnectionError: "
                                           f"Connection error.); the judgments received are in {cache}: restart the "
                                           f"server and rerun to continue{kept(samples)}",
                           loss='sft')


@pytest.mark.slow
def test_a_judge_that_answers_garbage_stops_the_round_and_asks_again_on_resume(tmp_path, capsys):
    with FaultProxy(None, garbage_text=range(1, 1000)) as garbage, FaultProxy(None) as working:
        stops_then_resumes(
            tmp_path, capsys, 'garbage', judged_by(garbage.base_url), judged_by(working.base_url),
            lambda samples: f"round 0: judge smollm2 at {garbage.base_url} scored 0 of 12 samples; "
                            f"last error: ValueError: an answer without a 1-10 score: 'banana bread is nice this time "
                            f"of year'{kept(samples)}", loss='sft')
        assert garbage.chat_requests == 12 and working.chat_requests == 12  # an answer without a score is not kept


def test_label_py_names_a_missing_samples_file(tmp_path, capsys):
    missing = tmp_path / 'no_samples.jsonl'
    assert label.main([str(missing), str(tmp_path / 'out.jsonl'), '--reward-function', f'{REWARD}:vowels']) == 2
    assert capsys.readouterr().err.strip() == f'label.py: {missing}: no such file'
    assert not (tmp_path / 'out.jsonl').exists()


@pytest.mark.slow
def test_a_held_out_reward_the_judge_fails_stops_before_the_rounds_checkpoint(tmp_path, capsys):
    """The judge answers garbage from its 15th request: the held-out reward before round 1 (2 requests) and round
    0's labels (12) come through, the held-out reward after it does not. The run stops before that round's
    checkpoint (a policy is saved only once evaluated); resumed, it trains the round again from its labels on
    disk, asking the judge only for the held-out samples after the round (its other judgments are cached)."""
    held_out = tmp_path / 'held_out.jsonl'
    held_out.write_text(''.join(open(os.path.join(DATA, 'upbeat', 'test_prompts.jsonl')).readlines()[:2]))
    with FaultProxy(None, garbage_text=range(15, 1000)) as failing, FaultProxy(None) as working:
        status, last, _ = train(tmp_path, online(tmp_path, 'late', *judged_by(failing.base_url),
                                                 f'++online.eval_prompts={held_out}', loss='sft'), capsys)
        assert status == 2 and last.startswith(f"train.py: the held-out reward after 1 rounds: judge smollm2 at "
                                               f"{failing.base_url} scored 0 of 2 samples; last error: ValueError")
        assert failing.chat_requests == 16 and not (tmp_path / 'late' / 'LATEST').exists()
        status, _, out = train(tmp_path, online(tmp_path, 'late', *judged_by(working.base_url),
                                                f'++online.eval_prompts={held_out}', '++resume=true', loss='sft'), capsys)
        assert status == 0 and working.chat_requests == 2  # the held-out samples after the round: the rest is cached
    assert torch.load(tmp_path / 'late' / 'LATEST' / 'trainer_state.pt', weights_only=True)['completed_rounds'] == 1
    evaluations = [json.loads(line) for line in open(tmp_path / 'late' / 'metrics.jsonl') if 'reward_eval/mean' in line]
    assert [e['round'] for e in evaluations] == [0, 0, 1] and evaluations[-1]['reward_eval/mean'] == 1.0


@pytest.mark.parametrize('record, says', [
    ({'prompt': 'hi', 'output': None}, "field 'output' must be a string (the sampled completion), got None"),
    ({'prompt': 5, 'output': 'yo'}, "field 'prompt' must be a string or a non-empty list of {'role', 'content'} turns"),
])
def test_label_py_names_a_sample_of_the_wrong_type(tmp_path, capsys, record, says):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text('{"prompt": "hi", "output": "hello"}\n' + json.dumps(record) + '\n')
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function', f'{REWARD}:vowels']) == 2
    assert capsys.readouterr().err.strip() == f'label.py: {samples}: record 2: {says}'
    assert not (tmp_path / 'out.jsonl').exists()


def test_label_py_names_an_output_it_cannot_write_and_leaves_no_temporary_file(tmp_path, capsys):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text('{"prompt": "hi", "output": "hello"}\n{"prompt": "hi", "output": "yo"}\n')
    (tmp_path / 'out').mkdir()
    assert label.main([str(samples), str(tmp_path / 'out'), '--reward-function', f'{REWARD}:vowels']) == 2
    assert capsys.readouterr().err.strip() == f'label.py: {tmp_path}/out: cannot be written (Is a directory)'
    assert sorted(os.listdir(tmp_path)) == ['out', 'samples.jsonl']


def test_label_py_names_a_reward_model_that_is_not_there(tmp_path, capsys):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text('{"prompt": "hi", "output": "hello"}\n')
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-model', str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"label.py: model '{tmp_path}': not an HF model directory (it has no "
                                               f"config.json or tokenizer_config.json)")
    import models
    models.load_tokenizer('embedded:tiny-smollm2').save_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text('{"hidden_size": 8}')  # no model_type: no architecture to build
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-model', str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"label.py: model '{tmp_path}': Unrecognized model in {tmp_path}. Should "
                                               f"have a `model_type` key in its config.json.")
    latest = tmp_path / 'run' / 'LATEST'
    latest.mkdir(parents=True)
    (latest / 'policy.pt').write_bytes(b'weights')
    for export, says in ((False, 'a training checkpoint? its run exports an HF directory, LATEST/hf, when it ends)'),
                         (True, f'give the HF export beside it, {latest}/hf')):
        if export:
            (latest / 'hf').mkdir()
        assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-model', str(latest / 'policy.pt')]) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith(f"label.py: model '{latest}/policy.pt': a file, not a model directory") and \
            message.endswith(says)
    (latest / 'adapter').mkdir()
    (latest / 'adapter' / 'adapter_config.json').write_text('{}')
    for given, says in ((tmp_path / 'run', f"a run directory, not a model: give its HF export, {latest}/hf"),
                        (latest / 'adapter', f"LoRA adapters, not a whole model: give the merged model their run "
                                             f"saves beside them, {latest}/hf")):
        assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-model', str(given)]) == 2
        assert capsys.readouterr().err.strip() == f"label.py: model '{given}': {says}"


def test_label_py_says_which_samples_it_reads_when_given_eval_pys_compare_file(tmp_path, capsys):
    samples = tmp_path / 'run.json'
    samples.write_text(json.dumps({'sampled_at': 'now', 'config': {}, 'samples': [{'prompt': 'hi', 'policy': 'yo'}]}))
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function', f'{REWARD}:vowels']) == 2
    assert capsys.readouterr().err.strip() == (
        f"label.py: {samples}: eval.py's samples with their run's config (what compare.py reads), not records; "
        f"label.py labels the sample records that eval.py ++mode=sample ++num_samples_per_prompt=k writes")
    assert not (tmp_path / 'out.jsonl').exists()


@pytest.mark.parametrize('option, value, says', [
    ('--threshold', 'abc', 'abc is not mean, median or a number'),
    ('--threshold', 'nan', 'nan is not mean, median or a number'),
    ('--concurrency', '0', '0 is not an integer >= 1'),
    ('--max-length', '-5', '-5 is not an integer >= 1'),
    ('--min-scored', 'most', 'most is not a share between 0 and 1'),
    ('--min-scored', '1.5', '1.5 is not a share between 0 and 1'),
])
def test_label_py_names_a_bad_argument_and_writes_nothing(tmp_path, capsys, option, value, says):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text('{"prompt": "hi", "output": "hello"}\n{"prompt": "hi", "output": "yo"}\n')
    with pytest.raises(SystemExit) as exit_:
        label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function', f'{REWARD}:vowels', option, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f'label.py: argument {option}: {says} (--help lists the arguments)'
    assert not (tmp_path / 'out.jsonl').exists()


@pytest.mark.parametrize('options, says', [
    (['--feedback', 'pairwise', '--threshold', 'median'], '--threshold median: --feedback pairwise takes the least '
                                                           'reward gap of a pair, a number'),
    (['--feedback', 'pairwise', '--per-prompt'], '--per-prompt applies to --feedback binary, not pairwise'),
    (['--feedback', 'binary', '--pair-mode', 'min'], '--pair-mode applies to --feedback pairwise, not binary'),
    (['--feedback', 'scalar', '--threshold', '0.5'], '--threshold applies to --feedback binary or pairwise, not scalar'),
])
def test_label_py_refuses_an_option_its_feedback_kind_would_ignore(tmp_path, capsys, options, says):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text('{"prompt": "hi", "output": "hello"}\n{"prompt": "hi", "output": "yo"}\n')
    with pytest.raises(SystemExit) as exit_:
        label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function', f'{REWARD}:vowels', *options])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f'label.py: {says} (--help lists the arguments)'
    assert not (tmp_path / 'out.jsonl').exists()


@pytest.mark.parametrize('content, says', [
    ('{"use_chat_template": false', "not readable as the reward model's format (Expecting ',' delimiter"),
    ('{"use_chat_template": "no"}', "the reward model's format needs use_chat_template (true/false) and human_prefix, "
                                    "human_suffix, assistant_prefix, assistant_suffix (strings), and may give "
                                    "max_length (an integer > 0)"),
    ('{"use_chat_template": false, "human_prefix": "", "human_suffix": "", "assistant_prefix": "", '
     '"assistant_suffix": "", "max_length": "2k"}', "the reward model's format needs use_chat_template"),
])
def test_a_broken_reward_model_format_file_is_named(tmp_path, content, says):
    from halos.labelers import read_reward_model_format
    path = tmp_path / 'halos_reward_model.json'
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_reward_model_format(str(path))
    assert str(error.value).startswith(f"{path}: {says}")
    assert read_reward_model_format(str(tmp_path / 'absent.json')) is None


@pytest.mark.parametrize('options, says', [
    (['--feedback', 'binary'], "0 undesirable samples: every reward reaches the median threshold, as the rewards are tied"),
    (['--feedback', 'binary', '--threshold', 'mean', '--per-prompt'],
     "0 undesirable samples: every reward reaches the mean threshold, as the rewards are tied"),
    (['--feedback', 'pairwise'], "0 pairs: no prompt of 2 has two samples with different rewards"),
    (['--feedback', 'best'], "0 best samples: no prompt of 2 has two samples with different rewards"),
])
def test_label_py_refuses_feedback_that_tied_rewards_leave_nothing_to_learn_from(tmp_path, capsys, options, says):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text(''.join(json.dumps({'prompt': prompt, 'output': output, 'prompt_id': prompt}) + '\n'
                               for prompt in ('hi', 'yo') for output in ('hello', 'howdy')))
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function', f'{REWARD}:constant',
                       *options]) == 2
    assert capsys.readouterr().err.strip() == f"label.py: {samples}: no {options[1]} feedback to write: {says}"
    assert not (tmp_path / 'out.jsonl').exists()
    # against a fixed threshold, every sample may rightly be desirable
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function', f'{REWARD}:constant',
                       '--feedback', 'binary', '--threshold', '0.5']) == 0
    assert [json.loads(line)['label'] for line in open(tmp_path / 'out.jsonl')] == [1, 1, 1, 1]


def test_samples_the_labeller_left_unscored_are_named_where_nothing_is_left_to_train_on():
    """A judge that failed on most samples, not the sampling, is then why the prompts give no pair."""
    from types import SimpleNamespace
    from halos.labelling import unscored_note, why_no_training_data
    judge = SimpleNamespace(name='judge fake', last_error='Error code: 500')
    labelled = [{'prompt_id': 'p1', 'prompt': 'hi', 'output': 'a', 'reward': 1.0}]
    assert why_no_training_data(labelled, [], 'pairwise') + unscored_note(1, 6, judge) == (
        "0 pairs: no prompt of 1 has two samples with different rewards (1 of them has fewer than 2 scored samples); "
        "judge fake scored 1 of the 6 samples; last error: Error code: 500")
    assert unscored_note(6, 6, judge) == ''


def test_label_py_says_what_to_do_with_one_sample_per_prompt(tmp_path, capsys):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text('{"prompt": "hi", "output": "hello"}\n{"prompt": "yo", "output": "a longer hello"}\n')
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--reward-function', f'{REWARD}:vowels',
                       '--feedback', 'scalar']) == 2
    assert capsys.readouterr().err.strip() == (
        f"label.py: {samples}: no scalar feedback to write: 0 groups whose scores differ: no prompt of 2 has two "
        f"samples with different rewards (2 of them have fewer than 2 scored samples); each prompt has one sample (eval.py "
        f"++mode=sample ++num_samples_per_prompt=k samples k per prompt; eval.py ++mode=reward measures a policy by "
        f"one per prompt)")


def test_a_judge_url_without_its_scheme_is_named_with_the_fix(tmp_path, capsys):
    samples = tmp_path / 'samples.jsonl'
    samples.write_text('{"prompt": "hi", "output": "hello"}\n')
    assert label.main([str(samples), str(tmp_path / 'out.jsonl'), '--judge', 'm', '--base-url', '127.0.0.1:9/v1']) == 2
    assert capsys.readouterr().err.strip() == ("label.py: judge server URL 127.0.0.1:9/v1 has no http:// or https:// "
                                               "(give it as http://127.0.0.1:9/v1)")


@pytest.mark.parametrize('feedback', ['binary', 'pairwise', 'scalar', 'best'])
def test_an_empty_completion_is_scored_but_never_written_as_feedback(tmp_path, capsys, feedback):
    """A policy may end a sample at once: its reward counts, but a feedback file holds no empty completion (the
    reader refuses one), so the feedback is written from the others, and training reads it."""
    from halos.batching import load_examples
    samples, output = tmp_path / 'samples.jsonl', tmp_path / 'out.jsonl'
    samples.write_text(''.join(json.dumps({'prompt': 'hi', 'prompt_id': 'hi', 'output': text}) + '\n'
                               for text in ('', 'a b', 'a', '  ')))
    threshold = ['--threshold', '1.5'] if feedback == 'binary' else []
    assert label.main([str(samples), str(output), '--reward-function', f'{REWARD}:characters', '--feedback', feedback,
                       *threshold]) == 0
    assert 'empty completions (scored, not written as feedback) 2, labelled 4' in capsys.readouterr().out
    records = [json.loads(line) for line in open(output)]
    written = {feedback: [r.get('output') or (r['output_A'], r['output_B']) for r in records]}
    assert written == {'binary': {'binary': ['a b', 'a']}, 'pairwise': {'pairwise': [('a', 'a b')]},
                       'scalar': {'scalar': ['a b', 'a']}, 'best': {'best': ['a b']}}[feedback]
    examples, _ = load_examples([str(output)], 'train', ('', '', '', ''), None, 0)
    assert sum(len(example.generations) for example in examples.values()) == (1 if feedback == 'best' else 2)
    samples.write_text(''.join(json.dumps({'prompt': 'hi', 'prompt_id': 'hi', 'output': text}) + '\n'
                               for text in ('', ' ')))
    assert label.main([str(samples), str(output), '--reward-function', f'{REWARD}:characters',
                       '--feedback', feedback]) == 2
    assert capsys.readouterr().err.strip() == (f"label.py: {samples}: no {feedback} feedback to write: every one of "
                                               f"the 2 completions is empty or whitespace")


def test_label_py_warns_of_binary_feedback_that_a_fixed_threshold_makes_one_class(tmp_path, capsys):
    samples, output = tmp_path / 'samples.jsonl', tmp_path / 'feedback.jsonl'
    samples.write_text(''.join(json.dumps({'prompt': 'hi', 'prompt_id': 'hi', 'output': text}) + '\n'
                               for text in ('one', 'three')))
    assert label.main([str(samples), str(output), '--reward-function', f'{REWARD}:characters', '--feedback', 'binary',
                       '--threshold', '2']) == 0
    assert (f"warning: {samples} (--threshold): every sample is desirable against the threshold 2, so the feedback "
            f"teaches only what to do") in capsys.readouterr().err
    assert [json.loads(line)['label'] for line in output.read_text().splitlines()] == [1, 1]


def test_a_round_trains_at_most_n_examples_and_a_round_of_one_class_is_warned_of(tmp_path, capsys):
    status, line, out = train(tmp_path, online(tmp_path, 'capped', f'++online.reward_function={REWARD}:vowels',
                                               '++online.feedback=binary', '++online.threshold=1000', '++n_examples=2',
                                               loss='kto'), capsys)
    assert status == 0, line
    assert ("warning: round 0 (online.threshold): every sample is undesirable against the threshold 1000, so the "
            "feedback teaches only what to avoid") in out
    state = torch.load(tmp_path / 'capped' / 'LATEST' / 'trainer_state.pt', weights_only=True)
    assert state['example_counter'] == 2  # of the round's 12 labelled samples
