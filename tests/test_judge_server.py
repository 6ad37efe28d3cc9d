"""Judge answers constrained to a JSON schema: halos' scoring judge server, the detection of what a server
honours, and verdicts and scores that cannot be unparseable."""
import json
import os
import subprocess
import sys

import pytest
import torch

import compare
import models
from halos import judge
from halos.labelers import SCORE_SCHEMA, JudgeLabeler
from judge_server import ScoringJudge, UnsupportedSchema, instances, schema_of, scoring_judge_server
from test_compare import judge_env, result_lines, write_samples
from helpers import ROOT

TINY = models.embedded_model_dir('tiny-smollm2')


def test_the_instances_of_a_verdict_and_a_score_schema():
    assert instances(compare.verdict_schema('12')) == [{'response': '1'}, {'response': '2'}]
    assert instances(SCORE_SCHEMA) == [{'score': n} for n in range(1, 11)]
    assert instances({'type': 'object', 'properties': {'ok': {'type': 'boolean'}, 'n': {'const': 3}}}) == \
        [{'ok': True, 'n': 3}, {'ok': False, 'n': 3}]
    assert instances({'type': 'integer', 'minimum': -1, 'maximum': 1}) == [-1, 0, 1]
    with pytest.raises(UnsupportedSchema, match='finitely many'):
        instances({'type': 'object', 'properties': {'reason': {'type': 'string'}}})


def test_the_schema_a_response_format_asks_for():
    schema = compare.verdict_schema('AB')
    assert schema_of(judge.RESPONSE_FORMATS['json_schema'](schema)) == schema
    assert schema_of(judge.RESPONSE_FORMATS['json_object'](schema)) == schema
    assert schema_of(None) is None and schema_of({'type': 'text'}) is None
    with pytest.raises(UnsupportedSchema, match='names no JSON schema'):
        schema_of({'type': 'json_object'})


def test_the_scoring_judge_answers_the_most_likely_instance_and_scores_it_as_one_unpadded_forward_does():
    scorer = ScoringJudge(TINY)
    request = {'messages': [{'role': 'user', 'content': 'Which is better, 1 or 2?'}],
               'response_format': judge.RESPONSE_FORMATS['json_schema'](SCORE_SCHEMA)}
    text = scorer.tokenizer.apply_chat_template(request['messages'], add_generation_prompt=True, tokenize=False)
    prompt = scorer.tokenizer(text, add_special_tokens=False)['input_ids']
    candidates = [json.dumps(instance) for instance in instances(SCORE_SCHEMA)]
    batched = scorer.log_likelihoods(prompt, candidates)
    alone = []
    for candidate in candidates:  # each candidate on its own, no padding: the independent computation
        completion = scorer.tokenizer(candidate, add_special_tokens=False)['input_ids']
        with torch.no_grad():
            logps = torch.log_softmax(scorer.model(torch.tensor([prompt + completion])).logits[0].float(), -1)
        alone.append(sum(logps[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion)))
    assert batched == pytest.approx(alone, abs=1e-4)
    assert scorer.answer(request) == candidates[max(range(len(alone)), key=alone.__getitem__)]


@pytest.fixture(scope='module')
def scoring_url():
    with scoring_judge_server(TINY) as base_url:
        yield base_url


def test_json_schema_is_detected_once_per_server_and_judge(scoring_url, monkeypatch):
    monkeypatch.setattr(judge, 'constraining_formats', {})
    client = judge.make_client(scoring_url, 30, 0)
    probes = []
    honours = judge.honours
    monkeypatch.setattr(judge, 'honours', lambda *args: probes.append(args[2]['type']) or honours(*args))
    schema = compare.verdict_schema('12')
    assert judge.constrained(client, scoring_url, TINY, schema) == judge.RESPONSE_FORMATS['json_schema'](schema)
    assert judge.constrained(client, scoring_url, TINY, SCORE_SCHEMA)['json_schema']['schema'] == SCORE_SCHEMA
    assert probes == ['json_schema']  # found by the first probe, then cached


def test_a_server_that_ignores_response_format_is_parsed_as_text(monkeypatch):
    class Client:  # answers in words whatever it is asked, as a server without constrained decoding does
        def with_options(self, **_):
            return self

        class chat:
            class completions:
                @staticmethod
                def create(**_):
                    message = type('Message', (), {'content': 'I think Response 2 is better.'})
                    return type('Completion', (), {'choices': [type('Choice', (), {'message': message})]})

    monkeypatch.setattr(judge, 'constraining_formats', {})
    assert judge.constrained(Client(), 'http://127.0.0.1:1/v1', 'words', compare.verdict_schema('12')) is None
    assert judge.constraining_formats == {('http://127.0.0.1:1/v1', 'words'): None}


def test_compare_through_the_scoring_judge_has_no_unparseable_verdict(tmp_path, scoring_url):
    write_samples(tmp_path / 'samples.json', 4)
    command = [sys.executable, os.path.join(ROOT, 'compare.py'), '-f', str(tmp_path / 'samples.json'), '-r',
               str(tmp_path / 'results.jsonl'), '--base-url', scoring_url, '--judge', TINY, '-st', '0',
               '--both-orders', '--max-tokens', '4']
    result = subprocess.run(command, cwd=tmp_path, env=judge_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result_lines(tmp_path)[0]
    assert line['constrained'] is True and line['unparseable'] == 0 and line['errors'] == 0
    assert line['wins'] + line['losses'] + line['ties'] == 4
    answers = [json.loads(row)['answer'] for row in open(tmp_path / 'results.judgments.jsonl')]
    assert len(answers) == 8 and {json.loads(a)['response'] for a in answers} <= {'1', '2'}
    unknown = subprocess.run([*command[:command.index('--judge') + 1], 'no-such-judge', '-st', '0'], cwd=tmp_path,
                             env=judge_env(), capture_output=True, text=True, timeout=600)  # as a real server refuses it
    assert unknown.returncode == 2 and "the model 'no-such-judge' does not exist here" in unknown.stderr.splitlines()[-1]


def test_the_judge_labeler_through_the_scoring_judge_scores_every_sample(tmp_path, scoring_url):
    labeler = JudgeLabeler(TINY, scoring_url, str(tmp_path / 'judgments.jsonl'), max_tokens=4)
    scores = labeler(['Say hello.', 'Name a colour.', 'Add 2 and 2.'], ['Hello!', 'Blue.', 'Four, I think.'], [{}] * 3)
    assert len(scores) == 3 and all(isinstance(s, float) and 1 <= s <= 10 for s in scores)
    answers = [json.loads(json.loads(line)['answer']) for line in open(tmp_path / 'judgments.jsonl')]
    assert [a['score'] for a in answers] == scores


def test_judge_server_py_ends_a_mistake_with_one_line(tmp_path):
    import socket
    command = [sys.executable, os.path.join(ROOT, 'judge_server.py')]
    run = lambda *args: subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    bad_port = run('embedded:tiny-smollm2', '--port', '70000')
    assert bad_port.returncode == 2 and bad_port.stderr.strip() == (
        'judge_server.py: argument --port: 70000 is not a port (1 to 65535) (--help lists the arguments)')
    run_dir = tmp_path / 'run'  # a run directory holds the run's tokenizer and config.yaml, and no model
    models.load_tokenizer('embedded:tiny-smollm2').save_pretrained(run_dir)
    (run_dir / 'config.yaml').write_text('loss: {}\n')
    given_a_run = run(str(run_dir), '--port', '8911')
    assert given_a_run.returncode == 2 and given_a_run.stderr.strip().splitlines()[-1] == (
        f"judge_server.py: model '{run_dir}': a halos run directory, not a model: give its trained model, "
        f"{run_dir}/LATEST/hf")
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        in_use = run('embedded:tiny-smollm2', '--port', port)
    assert in_use.returncode == 2 and in_use.stderr.strip().splitlines()[-1] == (
        f"judge_server.py: --port {port}: the port is in use; choose another")
