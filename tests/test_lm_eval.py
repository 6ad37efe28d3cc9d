"""eval.py ++mode=lm_eval: lm-eval-harness on the policy, on halos_basics (a multiple-choice task shipped in
data/lm_eval, no hub), with the embedded SmolLM2; its accuracy equals one computed here from the model's own
log-probs of every answer."""
import json
import os
import sys

import pytest
import torch

import models
from helpers import DATA, ROOT, run_in_process

pytest.importorskip('lm_eval')


def answer_logp(model, tokenizer, context: str, answer: str) -> float:
    """log p(' ' + answer | context), the answer's tokens those of context + answer after the context's (as
    lm-eval's HFLM splits them), no special tokens."""
    context_ids = tokenizer(context, add_special_tokens=False)['input_ids']
    whole = tokenizer(context + ' ' + answer, add_special_tokens=False)['input_ids']
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logps = torch.log_softmax(logits, -1)
    return sum(logps[position - 1, token].item() for position, token in enumerate(whole) if position >= len(context_ids))


def test_lm_eval_accuracy_equals_the_one_from_the_models_log_probs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data file is relative to the repository
    printed = run_in_process('eval.py', ['--config-path=' + os.path.join(ROOT, 'config'), 'model=smollm2', 'loss=sft',
                                         'exp_name=lm', '++mode=lm_eval', '++lm_eval.tasks=[halos_basics]',
                                         '++saved_policy=null', f'++cache_dir={tmp_path}'], tmp_path / 'hydra')
    results = json.loads((tmp_path / 'lm' / 'lm_eval.json').read_text())
    accuracy = results['results']['halos_basics']['acc,none']
    assert '|halos_basics|' in printed and 'acc' in printed

    tokenizer = models.load_tokenizer('embedded:smollm2-135m-instruct')
    model = models.load_causal_lm('embedded:smollm2-135m-instruct', 'float32').eval()
    items = [json.loads(line) for line in open(os.path.join(DATA, 'lm_eval', 'halos_basics.jsonl'))]
    correct = []
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        scores = [answer_logp(model, tokenizer, context, choice) for choice in item['choices']]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == item['answer'])
    assert accuracy == pytest.approx(sum(correct) / len(items), abs=1e-9)
    assert 0 < accuracy < 1  # neither side trivially right or wrong on all 20


def lm_eval_stops(tmp_path, monkeypatch, capsys, *overrides) -> str:
    """eval.py ++mode=lm_eval on the tiny model, which stops before the policy loads: its last line."""
    import eval as eval_py

    def no_load(*args, **kwargs):
        raise AssertionError('the policy loaded before the tasks were checked')
    monkeypatch.setattr(eval_py, 'load_run_tokenizer', no_load)
    monkeypatch.setattr(sys, 'argv', ['eval.py', '--config-path=' + os.path.join(ROOT, 'config'), 'model=tiny',
                                      'loss=sft', 'exp_name=lm', '++mode=lm_eval', '++saved_policy=null',
                                      f'++cache_dir={tmp_path}', f'hydra.run.dir={tmp_path}', *overrides])
    with pytest.raises(SystemExit) as exit_:
        eval_py.main()
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_unknown_task_stops_before_the_policy_loads(tmp_path, monkeypatch, capsys):
    assert lm_eval_stops(tmp_path, monkeypatch, capsys, '++lm_eval.tasks=[halos_basics,nosuch]') == (
        f"eval.py: lm_eval.tasks: no task nosuch in lm-eval or {os.path.join(DATA, 'lm_eval')}")


def test_an_include_path_that_is_not_there_stops_before_the_policy_loads(tmp_path, monkeypatch, capsys):
    assert lm_eval_stops(tmp_path, monkeypatch, capsys, '++lm_eval.tasks=[halos_basics]',
                         f'++lm_eval.include_path={tmp_path}/tasks') == (
        f"eval.py: lm_eval.include_path={tmp_path}/tasks: no such directory (of task YAMLs)")


def test_a_task_yaml_that_does_not_parse_is_named_beside_the_task_it_would_have_given(tmp_path, monkeypatch, capsys):
    tasks = tmp_path / 'tasks'
    tasks.mkdir()
    (tasks / 'mine.yaml').write_text('task: mine\ndataset_path: json\n  doc_to_text: "{{question}}"\n')
    (tasks / 'fine.yaml').write_text('task: fine\nprocess_results: !function utils.process\n')  # lm-eval's tag is valid
    (tasks / 'group.yaml').write_text('group: both\ntask: [fine]\n')
    (tasks / 'named.yaml').write_text('name: other\ndataset_path: json\n')  # `name:` where lm-eval reads `task:`
    assert lm_eval_stops(tmp_path, monkeypatch, capsys, '++lm_eval.tasks=[mine]', f'++lm_eval.include_path={tasks}') == (
        f"eval.py: lm_eval.tasks: no task mine in lm-eval or {os.path.join(DATA, 'lm_eval')} or {tasks} (lm-eval "
        f"skipped these task files: {tasks}/mine.yaml line 3, column 14: not valid YAML: mapping values are not "
        f"allowed here; {tasks}/named.yaml names no task (no 'task:' key))")


def test_a_task_whose_data_is_missing_or_broken_stops_before_the_policy_loads(tmp_path, monkeypatch, capsys):
    tasks = tmp_path / 'tasks'
    tasks.mkdir()
    (tmp_path / 'broken.jsonl').write_text('not json\n')
    for name, data in (('gone', tmp_path / 'gone.jsonl'), ('broken', tmp_path / 'broken.jsonl')):
        (tasks / f'{name}.yaml').write_text(f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
                                            f'    test: {data}\ntest_split: test\noutput_type: multiple_choice\n'
                                            f'doc_to_text: "{{{{question}}}}"\ndoc_to_choice: "{{{{choices}}}}"\n'
                                            f'doc_to_target: "{{{{answer}}}}"\n')
    line = lm_eval_stops(tmp_path, monkeypatch, capsys, '++lm_eval.tasks=[gone]', f'++lm_eval.include_path={tasks}')
    assert line.startswith("eval.py: lm_eval.tasks: task gone: its data is not there (") and str(tmp_path) in line
    import eval as eval_py
    from lm_eval.tasks import TaskManager
    from halos.errors import ConfigError
    with pytest.raises(ConfigError) as error:  # lm-eval's own tasks left out of the index: the same check, faster
        eval_py.check_task_builds(TaskManager(include_path=[str(tasks)], include_defaults=False), 'broken')
    assert str(error.value).startswith(f"lm_eval.tasks: task broken ({tasks}/broken.yaml) does not build: ArrowInvalid: "
                                       f"JSON parse")


def test_the_results_file_keeps_the_other_tasks_of_the_same_policy_and_replaces_another_policys(tmp_path, capsys):
    """A run's tasks may be evaluated one invocation at a time, each adding its own."""
    import importlib
    eval_script = importlib.import_module('eval')
    path = tmp_path / 'lm_eval.json'
    record = lambda policy, task, acc: {'saved_policy': policy, 'results': {task: {'acc,none': acc}},
                                        'versions': {task: 1}, 'n-shot': {task: 0}, 'n-samples': {task: {'effective': 2}},
                                        'config': {'limit': '2'}}
    assert eval_script.with_earlier_tasks(str(path), record('a.pt', 'one', 0.5)) == record('a.pt', 'one', 0.5)
    path.write_text(json.dumps(record('a.pt', 'one', 0.5)))
    both = eval_script.with_earlier_tasks(str(path), record('a.pt', 'two', 0.25))
    assert both['results'] == {'one': {'acc,none': 0.5}, 'two': {'acc,none': 0.25}}
    assert both['n-shot'] == {'one': 0, 'two': 0} and both['saved_policy'] == 'a.pt'
    again = eval_script.with_earlier_tasks(str(path), record('a.pt', 'one', 0.75))
    assert again['results'] == {'one': {'acc,none': 0.75}}
    other = eval_script.with_earlier_tasks(str(path), record('b.pt', 'two', 0.25))
    assert other == record('b.pt', 'two', 0.25)
    assert capsys.readouterr().out == f"note: {path} held the results of saved_policy=a.pt: replaced\n"

