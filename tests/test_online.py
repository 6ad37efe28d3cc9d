"""Online alignment: feedback built from scores (each pairwise mode, binary thresholds, best-of-k),
per-example weights, prompt rotation, label.py, the judge labeler's cache, and rounds that resume exactly."""
import json
import os
import shutil
import sys

import pytest
import torch

from halos import labelling
from halos.build import build_trainer
from halos.checkpoint import load_policy_file
from halos.online import round_block
from helpers import DATA, ROOT, make_config, run_train, whole_and_killed

REWARD = os.path.join(ROOT, 'tests', 'rewards.py')
UPBEAT = os.path.join(DATA, 'upbeat')


def samples(rewards_by_prompt):
    """Labelled samples: prompt id -> rewards (the outputs are 'p<i>-<j>')."""
    return [{'prompt_id': prompt, 'prompt': f'prompt {prompt}', 'output': f'{prompt}-{j}', 'reward': reward}
            for prompt, rewards in rewards_by_prompt.items() for j, reward in enumerate(rewards)]


def pairs_of(records):
    """{(better output, worse output)} of pairwise records, whatever their A/B order."""
    return {(r['output_A'], r['output_B']) if r['label'] else (r['output_B'], r['output_A']) for r in records}


def test_pairwise_max_pairs_best_with_worst_and_drops_ties():
    records = labelling.pairwise_feedback(samples({'a': [0.2, 0.9, 0.5], 'b': [0.4, 0.4], 'c': [1.0]}), 'max')
    assert pairs_of(records) == {('a-1', 'a-0')}  # b is a tie: dropped, never labelled; c has no pair
    assert all(r['label'] == int(r['reward_A'] > r['reward_B']) for r in records)


def test_pairwise_min_takes_the_closest_pair_still_above_the_threshold():
    rewards = {'a': [0.0, 0.5, 0.55, 1.0]}
    assert pairs_of(labelling.pairwise_feedback(samples(rewards), 'min')) == {('a-2', 'a-1')}  # gap 0.05
    assert pairs_of(labelling.pairwise_feedback(samples(rewards), 'min', threshold=0.1)) == {('a-3', 'a-2')}  # 0.45
    assert pairs_of(labelling.pairwise_feedback(samples(rewards), 'min', threshold=0.45)) == {('a-3', 'a-1')}  # > 0.45
    assert labelling.pairwise_feedback(samples(rewards), 'min', threshold=1.0) == []  # no gap above 1.0
    assert labelling.pairwise_feedback(samples({'t': [0.3, 0.3, 0.3]}), 'min') == []  # never a tie nor a self-pair


def test_pairwise_random_pairs_consecutive_samples_of_a_seeded_shuffle():
    rewards = {'a': [0.1, 0.2, 0.3, 0.4, 0.5], 'b': [0.0, 1.0, 0.0, 1.0]}
    first = labelling.pairwise_feedback(samples(rewards), 'random', seed=3)
    assert first == labelling.pairwise_feedback(samples(rewards), 'random', seed=3)
    assert len([r for r in first if r['prompt_id'] == 'a']) == 2  # 5 samples: 2 pairs, one left over
    for record in first:
        assert record['output_A'] != record['output_B'] and record['reward_A'] != record['reward_B']
    orders = {labelling.pairwise_feedback(samples(rewards), 'random', seed=seed)[0]['label'] for seed in range(20)}
    assert orders == {0, 1}  # A is the better output in some seeds and the worse in others


def test_pairwise_skips_two_samples_with_the_same_text():
    same = [{'prompt_id': 'a', 'prompt': 'p', 'output': 'Same text.', 'reward': r} for r in (0.1, 0.9)]
    assert labelling.pairwise_feedback(same, 'max') == []


def test_binary_thresholds_over_the_file_and_per_prompt():
    labelled = samples({'a': [1.0, 2.0, 3.0], 'b': [10.0, 20.0]})
    label = lambda records: {r['output']: r['label'] for r in records}
    assert label(labelling.binary_feedback(labelled, 'median')) == {'a-0': 0, 'a-1': 0, 'a-2': 1, 'b-0': 1, 'b-1': 1}
    assert label(labelling.binary_feedback(labelled, 'mean')) == {'a-0': 0, 'a-1': 0, 'a-2': 0, 'b-0': 1, 'b-1': 1}
    assert label(labelling.binary_feedback(labelled, 2.5)) == {'a-0': 0, 'a-1': 0, 'a-2': 1, 'b-0': 1, 'b-1': 1}
    assert label(labelling.binary_feedback(labelled, '2.0')) == {'a-0': 0, 'a-1': 1, 'a-2': 1, 'b-0': 1, 'b-1': 1}
    per_prompt = label(labelling.binary_feedback(labelled, 'median', per_prompt=True))
    assert per_prompt == {'a-0': 0, 'a-1': 1, 'a-2': 1, 'b-0': 0, 'b-1': 1}  # the median itself counts (>=)
    with pytest.raises(ValueError, match="threshold='middle': give mean, median or a number"):
        labelling.binary_feedback(labelled, 'middle')


def test_build_feedback_takes_each_kinds_default_where_the_threshold_and_pair_mode_are_unset():
    labelled = samples({'a': [1.0, 2.0, 3.0], 'b': [10.0, 20.0]})
    assert labelling.build_feedback(labelled, 'binary') == labelling.binary_feedback(labelled, 'median')
    assert labelling.build_feedback(labelled, 'pairwise', seed=4) == labelling.pairwise_feedback(labelled, 'max', 0.0, 4)
    assert pairs_of(labelling.build_feedback(labelled, 'pairwise', threshold=1.5, pair_mode='min')) == {('a-2', 'a-0'),
                                                                                                       ('b-1', 'b-0')}


def test_best_and_scalar_feedback():
    labelled = samples({'a': [1.0, 3.0, 2.0], 'b': [5.0]})
    assert [(r['output'], r['label']) for r in labelling.best_feedback(labelled)] == [('a-1', 1), ('b-0', 1)]
    scalar = labelling.scalar_feedback(labelled)
    assert [r['reward'] for r in scalar] == [1.0, 3.0, 2.0, 5.0] and all('label' not in r for r in scalar)


def test_unscored_samples_are_dropped_and_counted():
    labeler = lambda prompts, completions, extras: [None if 'bad' in c else 1.0 for c in completions]
    raw = [{'prompt_id': 'a', 'prompt': 'p', 'output': o} for o in ('good', 'bad', 'fine')]
    labelled, counts = labelling.label_samples(raw, labeler)
    assert [s['output'] for s in labelled] == ['good', 'fine'] and counts == {'dropped: no score': 1, 'labelled': 2}


def test_prompt_blocks_rotate_through_the_pool_without_overlap():
    blocks = [round_block(10, 3, r, seed=1) for r in range(4)]
    assert blocks == [round_block(10, 3, r, seed=1) for r in range(4)]  # deterministic
    first_pass = [i for block in blocks[:3] for i in block]
    assert len(first_pass) == len(set(first_pass)) == 9  # 3 rounds of 3 cover 9 of the 10 prompts once
    assert len(set(blocks[3])) == 3 and blocks[3] != blocks[0]  # then a fresh permutation
    assert round_block(10, 3, 0, seed=2) != blocks[0]


# ---------------------------------------------------------------- weights

def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return str(path)


PAIRS = [{'prompt': f'Question {i}?', 'output_A': f'A good answer {i}.', 'output_B': f'A bad reply {i}', 'label': 1}
         for i in range(4)]


@pytest.mark.parametrize('loss', ['dpo', 'kto-zero', 'sft', 'grpo'])
def test_unit_weights_reproduce_the_loss_and_a_zero_weight_removes_the_example(tmp_path, loss):
    """Three feedback files: no weights, unit weights, and weight 0 on the first pair (or its outputs).
    Unit weights give the very same loss; a zero weight gives the gradient of the other examples alone."""
    unary = loss in ('kto-zero', 'sft', 'grpo')
    records = [{'prompt': p['prompt'], 'output': p[k], 'label': int(k == 'output_A'), 'reward': float(k == 'output_A')}
               for p in PAIRS for k in ('output_A', 'output_B')] if unary else PAIRS
    weighted = lambda w: [dict(r, weight=w(i)) for i, r in enumerate(records)]
    first_prompt = lambda i: (i // 2 if unary else i) == 0
    files = {'plain': records, 'unit': weighted(lambda i: 1.0), 'zero': weighted(lambda i: 0.0 if first_prompt(i) else 1.0),
             'dropped': [r for i, r in enumerate(records) if not first_prompt(i)]}
    results = {}
    for name, data in files.items():
        path = write_jsonl(tmp_path / f'{name}.jsonl', data)
        trainer = build_trainer(make_config(tmp_path / name, f'datasets=[{path}]', '++n_examples=8',
                                            '++model.batch_size=8', loss=loss))
        batch = next(iter(trainer.train_iterator))
        loss_value, _ = trainer.get_batch_metrics(batch, 'train')
        loss_value.backward()
        results[name] = (loss_value.detach(), [p.grad.clone() for p in trainer.policy.parameters()])
    assert torch.equal(results['unit'][0], results['plain'][0])
    for zero, dropped in zip(results['zero'][1], results['dropped'][1]):
        torch.testing.assert_close(zero, dropped, atol=1e-6, rtol=1e-5)
    assert not all(torch.allclose(a, b) for a, b in zip(results['zero'][1], results['plain'][1]))


def test_weights_are_normalised_over_the_global_microbatch_not_each_rank(monkeypatch):
    """Two ranks, one holding weight-0.1 items and one weight-1 items: the mean of their losses (what FSDP's
    gradient average gives) is the weighted mean over both, as one process computes it."""
    import utils
    values = [torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0])]
    weights = [torch.tensor([0.1, 0.1]), torch.tensor([1.0, 1.0])]
    mean_weight_sum = torch.stack([w.sum() for w in weights]).mean()
    monkeypatch.setattr(utils, 'all_reduce_mean', lambda value: mean_weight_sum)
    per_rank = [utils.weighted_mean(v, w) for v, w in zip(values, weights)]
    monkeypatch.undo()
    whole = utils.weighted_mean(torch.cat(values), torch.cat(weights))
    assert torch.stack(per_rank).mean().item() == pytest.approx(whole.item()) == pytest.approx(12.4 / 2.2)


@pytest.mark.parametrize('weight', [-1, 1e31])
def test_a_negative_weight_or_one_that_would_overflow_is_refused(tmp_path, weight):
    from halos.errors import DataError
    import dataloader
    path = write_jsonl(tmp_path / 'bad.jsonl', [dict(PAIRS[0], weight=weight)])
    with pytest.raises(DataError) as error:
        dataloader.load_dataset(path, 'train', '\n<|user|>\n', '', '\n<|assistant|>\n', '')
    assert str(error.value) == (f"{path}: record 1: field 'weight' must be a number in [0, 1e+30] (weights are "
                                f"relative; a larger one overflows the float32 sums of a batch), got {float(weight)!r}")


# ---------------------------------------------------------------- label.py and the judge labeler

def sample_file(tmp_path, n_prompts=3, k=3):
    records = [{'output': text, 'prompt': [{'role': 'user', 'content': f'Say something, number {p}.'}],
                'prompt_id': f'p{p}', 'sample_id': s, 'generator': 'test', 'dataset': 'test', 'type': 'sample'}
               for p in range(n_prompts) for s, text in enumerate(['Hello there, friend.', 'A quiet evening at home.',
                                                                   'Everything is wonderful today.'][:k])]
    return write_jsonl(tmp_path / 'samples.jsonl', records)


def test_label_py_writes_feedback_that_trains(tmp_path):
    import label
    samples = sample_file(tmp_path)
    out = str(tmp_path / 'feedback.jsonl')
    assert label.main([samples, out, '--reward-function', f'{REWARD}:vowels', '--feedback', 'pairwise']) == 0
    records = [json.loads(line) for line in open(out)]
    assert len(records) == 3 and all(r['type'] == 'pairwise_feedback' for r in records)
    assert {r['prompt_id'] for r in records} == {'p0', 'p1', 'p2'}
    trainer = build_trainer(make_config(tmp_path, f'datasets=[{out}]', '++n_examples=3', '++model.batch_size=1'))
    assert len(trainer.train_iterator.items) == 3
    assert label.main([samples, out, '--reward-function', f'{REWARD}:vowels', '--feedback', 'binary']) == 0  # again


def test_label_py_replaces_no_file_but_its_own_feedback(tmp_path, capsys):
    import label
    samples, other = sample_file(tmp_path), str(tmp_path / 'other_samples.jsonl')
    shutil.copy(samples, other)
    kept = open(other).read()
    assert label.main([samples, other, '--reward-function', f'{REWARD}:vowels']) == 2
    assert capsys.readouterr().err.strip() == (
        f"label.py: output {other} holds something other than feedback that label.py wrote (record 1 is not "
        f"feedback: its 'type' is none of binary_feedback, pairwise_feedback, scalar_feedback): give the output "
        f"another path (nothing was written)")
    assert open(other).read() == kept


def test_label_py_names_a_bad_sample_and_a_missing_function(tmp_path, capsys):
    import label
    bad = write_jsonl(tmp_path / 'bad.jsonl', [{'prompt': 'p', 'output': 'o'}, {'prompt': 'q'}])
    assert label.main([bad, str(tmp_path / 'f.jsonl'), '--reward-function', f'{REWARD}:vowels']) == 2
    assert capsys.readouterr().err.strip() == f"label.py: {bad}: record 2: missing field 'output'"
    assert label.main([sample_file(tmp_path), str(tmp_path / 'f.jsonl'), '--reward-function', f'{REWARD}:nope']) == 2
    assert capsys.readouterr().err.strip() == f"label.py: reward function '{REWARD}:nope': {REWARD} has no function 'nope'"
    assert label.main([sample_file(tmp_path), str(tmp_path / 'f.jsonl'), '--reward-function', f'{REWARD}:CALLS']) == 2
    assert capsys.readouterr().err.strip() == (f"label.py: reward function '{REWARD}:CALLS': {REWARD} has 'CALLS' of "
                                               f"type list, not a function")


def test_label_py_refuses_a_prompt_id_of_two_prompts_and_warns_of_repeated_samples(tmp_path, capsys):
    import label
    clash = write_jsonl(tmp_path / 'clash.jsonl', [{'prompt': 'p', 'output': 'o', 'prompt_id': 0},
                                                   {'prompt': 'q', 'output': 'o', 'prompt_id': 0}])
    assert label.main([clash, str(tmp_path / 'f.jsonl'), '--reward-function', f'{REWARD}:vowels']) == 2
    assert capsys.readouterr().err.strip() == (f"label.py: {clash}: record 2: prompt_id 0 already names another prompt "
                                               f"(in record 1); one prompt_id stands for one prompt")
    twice = write_jsonl(tmp_path / 'twice.jsonl', [json.loads(line) for line in open(sample_file(tmp_path))] * 2)
    assert label.main([twice, str(tmp_path / 'f.jsonl'), '--reward-function', f'{REWARD}:vowels']) == 0
    assert (f"warning: {twice}: 9 records repeat the prompt and output of an earlier one; each is labelled, and "
            f"trained on, as often as it appears") in capsys.readouterr().out


@pytest.mark.slow
def test_the_judge_labeler_asks_nothing_twice_on_a_rerun(tmp_path, capsys):
    """Against the local llama.cpp server (SmolLM2 as the judge) behind a proxy that counts requests. A judgment
    with a score is cached and never asked again; an answer without one is not (a rerun asks again). When fewer
    than half of the samples get one, label.py stops (exit 2) instead of writing feedback from the few."""
    import label
    from fault_proxy import FaultProxy
    from judge_server import local_judge_server
    samples = sample_file(tmp_path)
    with local_judge_server() as url, FaultProxy(url) as proxy:
        arguments = [samples, str(tmp_path / 'feedback.jsonl'), '--judge', 'smollm2', '--base-url', proxy.base_url,
                     '--feedback', 'binary', '--threshold', '5']  # keeps every scored sample, tied or not
        status = label.main(arguments)
        assert proxy.chat_requests == 9
        cache = tmp_path / 'feedback.judgments.jsonl'
        cached = [json.loads(line) for line in open(cache)] if cache.exists() else []
        assert all(1 <= record['score'] <= 10 for record in cached)
        proxy.reset()
        assert label.main(arguments) == status  # temperature 0: the same answers
        assert proxy.chat_requests == 9 - len(cached)  # only the answers without a score are asked again
    if len(cached) >= 9 / 2:
        scored = [json.loads(line) for line in open(tmp_path / 'feedback.jsonl')]
        assert status == 0 and sorted(r['reward'] for r in scored) == sorted(r['score'] for r in cached)
    else:
        assert status == 2 and not (tmp_path / 'feedback.jsonl').exists()
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
            f"label.py: {samples}: judge smollm2 at {proxy.base_url} scored {len(cached)} of 9 samples"
            + (" (fewer than 50%)" if cached else '') + "; last error: ValueError: an answer without a 1-10 score:")


# ---------------------------------------------------------------- sampling k per prompt and online rounds

@pytest.mark.slow
def test_eval_py_samples_k_per_prompt_with_stable_prompt_ids(tmp_path):
    from helpers import eval_in_process, train_in_process
    train_in_process(tmp_path, '++n_examples=4', loss='sft', exp_name='sft')
    eval_in_process(tmp_path / 'sft', '++mode=sample', '++num_samples_per_prompt=3', '++n_samples=4',
                    '++max_new_tokens=8', f'++samples_dir={tmp_path / "a"}')
    eval_in_process(tmp_path / 'sft', '++mode=sample', '++num_samples_per_prompt=2', '++n_samples=4', '++seed=5',
                    '++max_new_tokens=8', f'++samples_dir={tmp_path / "b"}')
    first = [json.loads(line) for line in open(tmp_path / 'a' / 'sft_samples.jsonl')]
    second = [json.loads(line) for line in open(tmp_path / 'b' / 'sft_samples.jsonl')]
    assert len(first) == 12 and [r['sample_id'] for r in first[:3]] == [0, 1, 2]
    assert set(first[0]) == {'output', 'prompt', 'prompt_id', 'sample_id', 'generator', 'dataset', 'type',
                            'finished'}
    assert first[0]['type'] == 'sample' and first[0]['dataset'] == 'hh_test' and isinstance(first[0]['prompt'], list)
    ids = {json.dumps(r['prompt']): r['prompt_id'] for r in first}
    assert len(set(ids.values())) == 4
    assert all(ids[json.dumps(r['prompt'])] == r['prompt_id'] for r in second if json.dumps(r['prompt']) in ids)


def test_eval_py_reward_mode_scores_the_policy_and_measures_its_kl(tmp_path):
    from helpers import eval_in_process, train_in_process
    sys.path.insert(0, os.path.dirname(REWARD))
    from rewards import vowels
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_text(''.join(open(os.path.join(UPBEAT, 'test_prompts.jsonl')).readlines()[:5]))
    train_in_process(tmp_path, '++n_examples=8', '++lr=1e-3', '++optimizer=AdamW', loss='sft', exp_name='sft')
    greedy = ['++temperature=0', '++max_new_tokens=8', f'++samples_dir={tmp_path / "out"}']
    eval_in_process(tmp_path / 'sft', '++mode=sample', '++num_samples_per_prompt=1', f'datasets=[{prompts}]', *greedy)
    eval_in_process(tmp_path / 'sft', '++mode=reward', f'++prompts={prompts}', f'++reward_function={REWARD}:vowels',
                    *greedy)
    eval_in_process(tmp_path / 'sft', '++mode=reward', f'++prompts={prompts}', f'++reward_function={REWARD}:vowels',
                    f"++model.load_from={tmp_path / 'sft' / 'LATEST' / 'policy.pt'}", *greedy)  # start = the policy
    samples = [json.loads(line) for line in open(tmp_path / 'out' / 'sft_samples.jsonl')]
    trained, against_itself = [json.loads(line) for line in open(tmp_path / 'out' / 'rewards.jsonl')]
    rewards = [vowels(s['prompt'], s['output']) for s in samples]
    assert trained['n'] == len(rewards) == 5
    assert trained['reward_mean'] == pytest.approx(sum(rewards) / 5)
    mean = sum(rewards) / 5
    assert trained['reward_se'] == pytest.approx((sum((r - mean) ** 2 for r in rewards) / 4 / 5) ** 0.5)
    assert abs(trained['kl']) > 1e-3 and against_itself['kl'] == pytest.approx(0, abs=1e-4)
    assert against_itself['reward_mean'] == trained['reward_mean']
    written = json.load(open(tmp_path / 'out' / 'sft.json'))['samples']  # the samples behind the figures
    assert len(written) == 5 and all(s['reward'] == vowels(s['prompt'], s['policy']) for s in written)
    assert sorted(s['reward'] for s in written) == sorted(rewards)


def test_the_kl_from_the_samplers_log_probs_equals_the_kl_from_two_forwards(tmp_path):
    """eval.py's KL takes the policy's side from the log-probs its sampler recorded: the same log-ratios, within
    1e-4, as a forward of each model; a policy with a different start gets non-zero ratios."""
    import models
    from eval import log_ratios_to_start
    from halos.sampling import SamplingOptions, halos_sampler
    config = make_config(tmp_path)
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    tokenizer.padding_side = 'left'
    policy, start = (models.load_causal_lm('embedded:tiny-smollm2', 'float32').eval() for _ in range(2))
    with torch.no_grad():
        for weight in start.parameters():
            weight.mul_(0.9)
    prompts = tokenizer(['\n<|user|>\nSay hi.\n<|assistant|>\n', '\n<|user|>\nName a fruit.\n<|assistant|>\n'],
                        return_tensors='pt', padding=True)
    batch = {'prompt_input_ids': prompts['input_ids'], 'prompt_attention_mask': prompts['attention_mask']}
    torch.manual_seed(0)
    samples = [group[0] for group in halos_sampler(policy, tokenizer, SamplingOptions(
        prompts['input_ids'].shape[1] + 8, temperature=1.0))(batch, 1)]
    recorded, forwards = (log_ratios_to_start(config, policy, start, batch, samples, tokenizer.pad_token_id, recorded)
                          for recorded in (True, False))
    assert recorded == pytest.approx(forwards, abs=1e-4) and min(abs(ratio) for ratio in forwards) > 1e-2


def test_eval_py_reward_mode_names_what_it_lacks(tmp_path, capsys):
    from helpers import eval_in_process, train_in_process
    train_in_process(tmp_path, '++n_examples=4', loss='sft', exp_name='sft')
    with pytest.raises(SystemExit):
        eval_in_process(tmp_path / 'sft', '++mode=reward')
    assert 'mode=reward needs ++reward_function=' in capsys.readouterr().err


def test_eval_py_measures_an_online_rounds_run_by_its_own_held_out_reward(tmp_path, capsys):
    from helpers import eval_in_process, train_in_process
    trained = train_in_process(tmp_path, *online_overrides(tmp_path), '++online.rounds=1',
                               '++online.prompts_per_round=2', '++online.samples_per_prompt=2', '++max_new_tokens=4',
                               exp_name='online')
    assert trained.count('saved checkpoint') == 1  # the last round's is the final one, saved once
    out = ['++max_new_tokens=4', '++n_samples=3', f'++samples_dir={tmp_path / "out"}']
    eval_in_process(tmp_path / 'online', '++mode=reward', *out)
    measured, = [json.loads(line) for line in open(tmp_path / 'out' / 'rewards.jsonl')]
    assert measured['prompts'] == [str(tmp_path / 'held_out.jsonl')] and measured['n'] == 3
    assert measured['reward_function'] == f'{REWARD}:vowels'
    (tmp_path / 'counted.py').write_text('CALLS = []\n\n\ndef counted(prompt, completion):\n'
                                         '    CALLS.append(completion)\n    return 1.0\n')
    eval_in_process(tmp_path / 'online', '++mode=reward', f"++reward_function={tmp_path / 'counted.py'}:counted", *out)
    from halos.labelers import load_reward_function
    assert len(load_reward_function(f"{tmp_path / 'counted.py'}:counted").__globals__['CALLS']) == 3  # of a batch of 4
    with pytest.raises(SystemExit):
        eval_in_process(tmp_path / 'online', '++mode=eval', *out)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "eval.py: mode=eval: online trained in online rounds on prompts, which hold no completions to evaluate its "
        "loss on; its measure is the held-out reward: ++mode=reward (on online.eval_prompts, scored as the run "
        "scored them), or give ++datasets=[feedback files] for the loss")


def test_the_shipped_upbeat_feedback_is_what_its_reward_function_says():
    """data/upbeat's offline feedback (scripts/upbeat_data.py) agrees with reward.py on every record."""
    import statistics
    sys.path.insert(0, UPBEAT)
    from reward import reward
    read = lambda name: [json.loads(line) for line in open(os.path.join(UPBEAT, name))]
    samples, pairs, binary, scalar = (read(f'{name}.jsonl') for name in ('samples', 'pairs', 'binary', 'scalar'))
    assert len(samples) == len(binary) == len(scalar) == 110 * 4 and 0 < len(pairs) <= 110
    assert all(s['reward'] == reward(s['prompt'], s['output']) for s in samples)
    assert all(p['label'] == int(p['reward_A'] > p['reward_B']) and p['reward_A'] != p['reward_B'] and
               {p['reward_A'], p['reward_B']} == {reward(p['prompt'], p['output_A']), reward(p['prompt'], p['output_B'])}
               for p in pairs)
    medians = {pid: statistics.median(s['reward'] for s in samples if s['prompt_id'] == pid)
               for pid in {s['prompt_id'] for s in samples}}
    assert all(b['label'] == (b['reward'] >= medians[b['prompt_id']]) for b in binary)


def test_upbeat_data_writes_no_file_where_one_kind_of_feedback_would_have_nothing_to_learn_from():
    import importlib.util

    from halos.errors import DataError
    from halos.labelling import build_feedback
    spec = importlib.util.spec_from_file_location('upbeat_data', os.path.join(ROOT, 'scripts', 'upbeat_data.py'))
    upbeat_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upbeat_data)
    one_each = [{'prompt_id': str(i), 'prompt': f'p{i}', 'output': f'o{i}', 'reward': float(i)} for i in range(3)]
    outputs = lambda labelled: {'pairs': build_feedback(labelled, 'pairwise', pair_mode='max', seed=0),
                                'binary': build_feedback(labelled, 'binary', threshold='median', per_prompt=True),
                                'scalar': build_feedback(labelled, 'scalar')}
    with pytest.raises(DataError) as error:
        upbeat_data.check_learnable(one_each, outputs(one_each))
    assert str(error.value) == ("pairs: 0 pairs: no prompt of 3 has two samples with different rewards (3 of them "
                                "have fewer than 2 scored samples); nothing written (sample more per prompt, longer or at a "
                                "higher temperature)")
    two_each = one_each + [{**sample, 'output': 'again', 'reward': sample['reward'] + 1} for sample in one_each]
    upbeat_data.check_learnable(two_each, outputs(two_each))


def test_written_feedback_files_get_the_usual_file_mode(tmp_path):
    from halos.jsonl import write_jsonl
    umask = os.umask(0o022)
    try:
        write_jsonl(str(tmp_path / 'f.jsonl'), [{'a': 1}])
    finally:
        os.umask(umask)
    assert (tmp_path / 'f.jsonl').stat().st_mode & 0o777 == 0o644


def test_a_write_interrupted_by_ctrl_c_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    from halos.jsonl import write_jsonl

    def interrupted():
        yield {'a': 2}
        raise KeyboardInterrupt
    write_jsonl(str(tmp_path / 'f.jsonl'), [{'a': 1}])
    with pytest.raises(KeyboardInterrupt):
        write_jsonl(str(tmp_path / 'f.jsonl'), interrupted())
    assert os.listdir(tmp_path) == ['f.jsonl'] and (tmp_path / 'f.jsonl').read_text() == '{"a": 1}\n'


def test_more_prompts_per_round_than_the_pool_holds_warns(tmp_path, capsys):
    from halos.build import build_online_rounds
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_text(''.join(open(os.path.join(UPBEAT, 'train_prompts.jsonl')).readlines()[:3]))
    run = make_config(tmp_path, *online_overrides(tmp_path), f'++online.prompts={prompts}')
    rounds = build_online_rounds(run, build_trainer(run))
    assert len(rounds.pool) == 3 and len(round_block(3, 4, 0, run.seed)) == 3
    assert ("warning: online.prompts_per_round=4, but the prompt pool holds 3 prompts: every round samples all of "
            "them") in capsys.readouterr().out


def test_a_rounds_samples_and_feedback_keep_their_prompts_own_fields_for_the_reward_function(tmp_path):
    from halos.build import build_online_rounds
    prompts = tmp_path / 'questions.jsonl'
    answers = {'Name a vowel.': 'e', 'Name another vowel.': 'a', 'Name a consonant.': 't'}
    prompts.write_text(''.join(json.dumps({'prompt': prompt, 'answer': answer}) + '\n'
                               for prompt, answer in answers.items()))
    run = make_config(tmp_path, *online_overrides(tmp_path), f'++online.prompts={prompts}',
                      '++online.prompts_per_round=3', f'++online.reward_function={REWARD}:answer_count',
                      f'++online.eval_prompts={prompts}', '++online.feedback=scalar', loss='grpo')
    rounds = build_online_rounds(run, build_trainer(run))
    samples = rounds.round_samples(0)
    assert len(samples) == 9 and all(s['answer'] == answers[s['prompt']] for s in samples)  # the prompt as given
    feedback = [json.loads(line) for line in open(rounds.round_feedback(0))]
    assert [(r['output'], r['answer'], r['reward']) for r in feedback] == \
           [(s['output'], s['answer'], float(s['output'].count(s['answer']))) for s in samples]
    assert len({r['reward'] for r in feedback}) > 1


def online_overrides(tmp_path):
    held_out = tmp_path / 'held_out.jsonl'
    held_out.write_text(''.join(open(os.path.join(UPBEAT, 'test_prompts.jsonl')).readlines()[:8]))
    return [f'datasets=[{UPBEAT}/train_prompts.jsonl]', '++online.rounds=3', '++online.prompts_per_round=4',
            '++online.samples_per_prompt=3', f'++online.reward_function={REWARD}:vowels', '++max_new_tokens=12',
            f'++online.eval_prompts={held_out}', '++lr=1e-3', '++optimizer=AdamW', '++online.reference=previous',
            '++model.batch_size=2', '++eval_every=4']


@pytest.mark.slow
def test_online_rounds_resume_exactly_without_resampling_or_relabelling(tmp_path):
    """An online DPO run killed at a random moment and resumed ends with the policy of an uninterrupted run;
    the rounds sampled before the kill are not sampled again."""
    ONLINE = online_overrides(tmp_path)
    whole_and_killed(tmp_path, *ONLINE, max_delay=2.0)
    state = tmp_path / 'killed' / 'LATEST' / 'trainer_state.pt'
    rounds_dir = tmp_path / 'killed' / 'rounds'
    sampled = {path: path.stat().st_mtime_ns for path in rounds_dir.glob('*/samples.jsonl')}
    labelled = {path: path.stat().st_mtime_ns for path in rounds_dir.glob('*/feedback.jsonl')}
    assert sampled, 'the run was killed before it sampled anything'
    assert torch.load(state, weights_only=True)['completed_rounds'] < 3, 'the run finished before it was killed'

    rerun = run_train(tmp_path, *ONLINE, '++resume=true', exp_name='killed')
    assert 'resumed from' in rerun.stdout or not state.exists()
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in sampled.items())
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in labelled.items())
    for r in range(3):
        for name in ('samples.jsonl', 'feedback.jsonl'):
            assert (rounds_dir / str(r) / name).read_text() == (tmp_path / 'whole' / 'rounds' / str(r) / name).read_text()
    assert len((rounds_dir / '0' / 'samples.jsonl').read_text().splitlines()) == 4 * 3  # prompts x samples
    one, two = (load_policy_file(tmp_path / name / 'LATEST' / 'policy.pt') for name in ('whole', 'killed'))
    assert one['step_idx'] == two['step_idx'] > 0
    for name, tensor in one['state'].items():
        assert torch.allclose(tensor, two['state'][name], atol=1e-6), name
    evaluations = [json.loads(line) for line in open(tmp_path / 'whole' / 'metrics.jsonl') if 'reward_eval/mean' in line]
    assert [e['round'] for e in evaluations] == [0, 1, 2, 3] and all(e['reward_eval/n'] == 8 for e in evaluations)
    assert (tmp_path / 'whole' / 'rounds' / 'reward_per_round.png').stat().st_size > 1000


@pytest.mark.parametrize('rounds', [True, False])
def test_a_resume_on_prompts_whose_text_or_own_fields_changed_is_refused(tmp_path, rounds):
    """Online rounds check their prompt pool as step-level RL checks its data, and both the fields a reward function
    is given: a changed answer would change the reward halfway through the run."""
    from halos.build import build_online_rounds
    from halos.errors import ConfigError
    prompts = tmp_path / 'sums.jsonl'
    write = lambda shift, word: prompts.write_text(''.join(
        json.dumps({'prompt': f'{word} {i}+1?', 'answer': str(i + shift)}) + '\n' for i in range(6)))
    reward = f'++online.reward_function={REWARD}:answer_count'

    def trainer():
        if not rounds:
            return build_trainer(make_config(tmp_path, f'datasets=[{prompts}]', reward, '++n_examples=4',
                                             loss='grpo-online'))
        run = make_config(tmp_path, *online_overrides(tmp_path), f'++online.prompts={prompts}', reward,
                          f'++online.eval_prompts={prompts}')
        built = build_trainer(run)
        build_online_rounds(run, built)
        return built
    write(1, 'What is')
    state = trainer().trainer_state()
    trainer().restore_trainer_state(state)  # the same prompts
    write(2, 'What is')
    with pytest.raises(ConfigError, match=r"^resume=true: the prompts' own fields \(what a reward function is given "):
        trainer().restore_trainer_state(state)
    write(1, 'Compute')
    with pytest.raises(ConfigError, match=r'^resume=true: the training data is not the data the checkpoint was '):
        trainer().restore_trainer_state(state)
