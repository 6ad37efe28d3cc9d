"""eval.py loads a trained checkpoint: samples come from the saved policy with the prompt removed,
mode=eval reproduces the trained checkpoint's metrics (and the base model's with saved_policy=null),
mode=alpacaeval writes AlpacaEval outputs, a CSFT run is sampled with its desirable control token, and
vLLM is used only when it can run."""
import importlib
import json
import os
import re
import subprocess

import pytest
import torch

import dataloader
import trainers
from halos.build import build_loader
from halos.errors import ConfigError
from halos.labelers import checked_scores
from helpers import DATA, ROOT, eval_command, eval_in_process, make_config, run_train, train_in_process


eval_script = importlib.import_module('eval')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Three trained runs (SFT, CSFT, SFT with the chat template), trained by train.py's main."""
    cache_dir = tmp_path_factory.mktemp('runs')
    train_in_process(cache_dir, '++n_examples=8', '++lr=1e-2', '++optimizer=Adam', loss='sft', exp_name='sft')
    train_in_process(cache_dir, '++n_examples=4', '++model.batch_size=2', loss='csft', exp_name='csft')
    train_in_process(cache_dir, '++n_examples=4', '++use_chat_template=true', loss='sft', exp_name='chat')
    return {name: cache_dir / name for name in ('sft', 'csft', 'chat')}


@pytest.fixture(scope='module')
def trained_run(runs):
    return runs['sft']


@pytest.fixture(scope='module')
def evaluations(runs, tmp_path_factory):
    """Every eval.py run of these tests (eval.py's main): name -> (what it printed, samples_dir)."""
    out = tmp_path_factory.mktemp('evaluations')
    sample = ('++mode=sample', '++n_samples=6', '++model.eval_batch_size=4', '++model.max_length=96')
    plans = {
        'sample a': (runs['sft'], sample), 'sample b': (runs['sft'], sample),
        'sample all, seed 2': (runs['sft'], ('++mode=sample', '++n_samples=null', '++model.eval_batch_size=4',
                                             '++model.max_length=96', '++seed=2')),
        'greedy': (runs['sft'], ('++mode=sample', '++n_samples=3', '++model.eval_batch_size=1', '++model.max_length=160',
                                 '++model.max_prompt_length=128', '++temperature=0')),
        'eval': (runs['sft'], ('++mode=eval',)),
        'eval base': (runs['sft'], ('++mode=eval', '++saved_policy=null')),
        'alpacaeval': (runs['sft'], ('++mode=alpacaeval', '++n_samples=3', '++model.eval_batch_size=3',
                                     '++model.max_length=96')),
        'csft': (runs['csft'], ('++mode=sample', '++n_samples=3', '++model.eval_batch_size=3', '++model.max_length=96')),
        'more than there are': (runs['sft'], ('++mode=sample', '++n_samples=50', '++model.eval_batch_size=11',
                                              '++model.max_length=96', '++max_new_tokens=4')),
        'chat': (runs['chat'], ('++mode=sample', '++n_samples=2', '++model.eval_batch_size=2', '++model.max_length=160')),
        'chat reward': (runs['chat'], ('++mode=reward', '++n_samples=2', '++model.eval_batch_size=2',
                                       '++model.max_length=160', f"++prompts=[{DATA}/upbeat/test_prompts.jsonl]",
                                       f"++reward_function={ROOT}/tests/rewards.py:vowels")),
    }
    directory = lambda name: out / re.sub(r'\W+', '_', name)
    return {name: (eval_in_process(run_dir, *overrides, f'++samples_dir={directory(name)}'), directory(name))
            for name, (run_dir, overrides) in plans.items()}


@pytest.mark.slow
def test_the_command_line_trains_and_samples(tmp_path):
    """Once through real processes: train.py, then eval.py on its run directory."""
    run_train(tmp_path, '++n_examples=4', loss='sft', exp_name='cli')
    result = subprocess.run(eval_command(tmp_path / 'cli', '++mode=sample', '++n_samples=2', '++model.eval_batch_size=2',
                                         '++model.max_length=96', f'++samples_dir={tmp_path / "samples"}'),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'wrote 2 samples' in result.stdout and len(json.load(open(tmp_path / 'samples' / 'cli.json'))['samples']) == 2


def samples_of(evaluations, name, exp_name='sft'):
    with open(evaluations[name][1] / f'{exp_name}.json') as f:
        return json.load(f)


def printed_metrics(printed: str) -> dict:
    return json.loads(printed[printed.index('{\n'):])


@pytest.mark.slow
def test_sampling_writes_the_documented_json_deterministically(evaluations):
    data, again = samples_of(evaluations, 'sample a'), samples_of(evaluations, 'sample b')
    assert set(data) == {'sampled_at', 'config', 'samples'} and len(data['samples']) == 6
    assert all(set(s) == {'prompt', 'chosen', 'policy'} for s in data['samples'])
    assert data['samples'][0]['prompt'].endswith('\n<|assistant|>\n')
    assert data['samples'] == again['samples']
    other_seed = samples_of(evaluations, 'sample all, seed 2')['samples']
    assert len(other_seed) == 11   # every prompt of hh/test
    first_seed = {s['prompt']: s['policy'] for s in data['samples']}
    assert any(first_seed[s['prompt']] != s['policy'] for s in other_seed if s['prompt'] in first_seed)


@pytest.mark.slow
def test_n_samples_beyond_the_prompts_says_all_of_them_were_sampled(evaluations):
    printed, samples_dir = evaluations['more than there are']
    assert f"wrote 11 samples to {samples_dir / 'sft.json'} (n_samples=50, but there are only 11 prompts: all of " \
           f"them)" in printed
    assert len(samples_of(evaluations, 'more than there are')['samples']) == 11


def greedy_completions(model_dir, tokenizer, prompts, max_length):
    """Greedy continuations of each prompt (alone, unpadded) by the HF model in `model_dir`, new tokens only."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    completions = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors='pt')['input_ids']
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_length=max_length, pad_token_id=tokenizer.pad_token_id)
        completions.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
    return completions


@pytest.mark.slow
def test_samples_come_from_the_saved_policy_with_the_prompt_removed(trained_run, evaluations):
    """temperature=0 decodes greedily, so eval.py's samples must be the trained checkpoint's greedy
    continuations (new tokens only), and not the base model's."""
    import models
    samples = samples_of(evaluations, 'greedy')['samples']
    tokenizer = models.load_tokenizer(str(trained_run))
    prompts = [s['prompt'] for s in samples]
    trained = greedy_completions(trained_run / 'LATEST' / 'hf', tokenizer, prompts, 160)
    base = greedy_completions(models.resolve_model_path('embedded:tiny-smollm2'), tokenizer, prompts, 160)
    assert [s['policy'] for s in samples] == trained
    assert trained != base
    assert not any(s['policy'].startswith(s['prompt'].strip()[:20]) for s in samples)


@pytest.mark.slow
def test_eval_mode_reproduces_the_trained_checkpoint_and_the_base_model(trained_run, evaluations):
    saved = torch.load(trained_run / 'LATEST' / 'policy.pt', weights_only=True)['metrics']
    metrics = printed_metrics(evaluations['eval'][0])
    assert set(metrics) == {'logps_eval/chosen', 'loss/eval'}
    for name, value in metrics.items():
        assert value == pytest.approx(saved[name], abs=1e-5), name
    # saved_policy=null evaluates the base model: the run's first evaluation, before any training step
    with open(trained_run / 'metrics.jsonl') as f:
        before_training = next(r for r in map(json.loads, f) if 'loss/eval' in r)
    assert before_training['step'] == 0
    base = printed_metrics(evaluations['eval base'][0])
    assert base['loss/eval'] == pytest.approx(before_training['loss/eval'], abs=1e-5)
    assert abs(base['loss/eval'] - metrics['loss/eval']) > 1e-2


@pytest.mark.slow
def test_alpacaeval_mode_writes_model_outputs_for_the_instructions(evaluations):
    with open(evaluations['alpacaeval'][1] / 'alpaca_sft.json') as f:
        outputs = json.load(f)
    with open(os.path.join(DATA, 'alpacaeval', 'test.jsonl')) as f:
        rows = {r['instruction']: r for r in map(json.loads, f)}
    assert len(outputs) == 3 and all(set(o) == {'instruction', 'output', 'reference', 'generator'} for o in outputs)
    assert len({o['instruction'] for o in outputs}) == 3
    for output in outputs:
        assert output['instruction'] in rows and output['reference'] == rows[output['instruction']]['output'].strip()
        assert output['generator'] == 'sft' and output['instruction'] not in output['output']


def test_sampling_a_prompts_file_writes_each_prompt_and_its_sample_without_a_chosen(tmp_path):
    """A run trained on prompts (online RL) has no completions in its data to pair a sample with."""
    prompts = os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')
    config = make_config(tmp_path, '++n_samples=3', '++model.eval_batch_size=2', '++max_new_tokens=4',
                         f"++online.reward_function={os.path.join(DATA, 'upbeat', 'reward.py')}:reward",
                         loss='grpo-online', datasets=f'[{prompts}]')
    samples = eval_script.sample(config, config.datasets)
    assert [sorted(s) for s in samples] == [['policy', 'prompt']] * 3
    texts = [json.loads(line)['prompt'] for line in open(prompts)]
    assert all(any(text in s['prompt'] for text in texts) and s['policy'] for s in samples)


def test_eval_mode_of_a_step_level_rl_run_gives_its_held_out_reward(tmp_path):
    """Its evaluation samples one completion of each held-out prompt and scores it (with the run's labeller)."""
    prompts = os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')
    config = make_config(tmp_path, '++n_eval_examples=4', '++model.eval_batch_size=2', '++max_new_tokens=4',
                         f"++online.reward_function={os.path.join(ROOT, 'tests', 'rewards.py')}:vowels",
                         '++saved_policy=null', loss='dapo', datasets=f'[{prompts}]')
    results = eval_script.evaluate(config)['results']
    assert 0 < results['completions_eval/length'] <= 4 and results['reward_eval/mean'] >= 0


def test_mode_reward_on_prompts_the_run_trained_on_warns(tmp_path, capsys):
    """A prompts file without 'split' fields serves both splits, so its held-out reward is a training reward."""
    import models
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_text(''.join(json.dumps({'prompt': f'Question {i}?'}) + '\n' for i in range(4)) +
                       json.dumps({'prompt': 'A held-out question?', 'split': 'test'}) + '\n')
    reward = f"++online.reward_function={os.path.join(ROOT, 'tests', 'rewards.py')}:vowels"
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    for datasets, prompts_file, warned in [(f'[{prompts}]', prompts, True), ('[hh]', prompts, False)]:
        run = make_config(tmp_path, reward, loss='grpo-online', datasets=datasets)
        held_out = build_loader(run, tokenizer, 'test', [str(prompts_file)], loader_class=dataloader.PromptDataLoader)
        eval_script.warn_of_training_prompts(run, tokenizer, held_out.items)
        printed = capsys.readouterr().out
        assert ("warning: 4 of the 5 held-out prompts are also training prompts, so the held-out reward is not held "
                "out there: give ++prompts=<a file of other prompts>" in printed) == warned


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
    # the prompt loader of k samples per prompt, mode=reward and online rounds ends them so too
    prompts = next(iter(build_loader(config, tokenizer, 'test', loader_class=dataloader.PromptDataLoader)))
    assert prompts['prompt_input_ids'][:, -1].tolist() == [good] * 5


@pytest.mark.slow
def test_a_trained_csft_run_has_single_control_tokens_in_tokenizer_embedding_and_samples(runs, evaluations, tokenizer):
    import dataloader
    import models
    run_dir = runs['csft']
    run_tokenizer = models.load_tokenizer(str(run_dir))
    assert len(run_tokenizer) == len(tokenizer) + 2
    for token in ('<|good|>', '<|bad|>'):
        token_id = run_tokenizer.convert_tokens_to_ids(token)
        assert token_id >= len(tokenizer)  # an added token, not pieces of the base vocabulary
        assert run_tokenizer(f'Hi{token}', add_special_tokens=False)['input_ids'][-1] == token_id
        assert run_tokenizer(token, add_special_tokens=False)['input_ids'] == [token_id]
    saved = torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)['state']
    assert saved['model.embed_tokens.weight'].shape[0] == len(run_tokenizer)
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(run_dir / 'LATEST' / 'hf')
    assert exported.get_input_embeddings().num_embeddings == len(run_tokenizer)
    assert len(models.load_tokenizer(str(run_dir / 'LATEST' / 'hf'))) == len(run_tokenizer)
    # the control token belongs to the prompt: masked out of the loss, and the completion right after it is not
    loader = dataloader.ConditionalSFTDataLoader(['hh'], run_tokenizer, batch_size=4, n_epochs=1, data_dir=DATA)
    batch = next(iter(loader))
    for is_desirable, ids, labels in zip(batch['is_desirable'], batch['target_combined_input_ids'], batch['target_labels']):
        position = (ids == run_tokenizer.convert_tokens_to_ids('<|good|>' if is_desirable else '<|bad|>'))
        index = position.nonzero().item()
        assert labels[index] == -100 and labels[index + 1] == ids[index + 1]

    samples = samples_of(evaluations, 'csft', 'csft')['samples']
    assert len(samples) == 3 and all(s['prompt'].endswith('\n<|assistant|>\n<|good|>') for s in samples)


@pytest.mark.slow
def test_chat_template_runs_render_train_export_and_sample_with_the_template(runs, evaluations, tokenizer):
    import models
    exported = models.load_tokenizer(str(runs['chat'] / 'LATEST' / 'hf'))
    assert exported.chat_template == tokenizer.chat_template and exported.chat_template
    samples = samples_of(evaluations, 'chat', 'chat')['samples']
    assert len(samples) == 2
    scored = samples_of(evaluations, 'chat reward', 'chat')['samples']  # mode=reward's, as the policy was given them
    assert len(scored) == 2
    for sample in samples + scored:
        assert sample['prompt'].startswith('<|im_start|>system\n') and sample['prompt'].endswith('<|im_start|>assistant\n')
        assert '<|user|>' not in sample['prompt']


@pytest.mark.parametrize('installed, gpu, expected', [(True, True, True), (True, False, False), (False, True, False)])
def test_vllm_generates_only_when_installed_and_a_gpu_is_present(monkeypatch, installed, gpu, expected):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: (object() if installed else None) if name == 'vllm' else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: gpu)
    from halos import sampling
    assert sampling.use_vllm() is expected


@pytest.mark.parametrize('loss, overrides, prompts, function', [
    # step-level online RL: the test split of the prompts it trained on, scored by its reward function
    ('grpo-online', ['++online.prompts=[train.jsonl]', '++online.reward_function=r.py:vowels'], ['train.jsonl'],
     'r.py:vowels'),
    ('rloo', ['datasets=[train.jsonl]', '++online.reward_function=r.py:vowels', '++online.eval_prompts=[held.jsonl]',
              '++online.eval_reward_function=r.py:gold'], ['held.jsonl'], 'r.py:gold'),
    # online PPO: its datasets are its prompts, its reward function a key of its loss (online.* it never reads)
    ('ppo-online', ['datasets=[train.jsonl]', '++loss.reward_function=r.py:vowels', '++online.prompts=[held.jsonl]',
                    '++online.reward_function=r.py:gold'], ['train.jsonl'], 'r.py:vowels'),
    # online rounds: their held-out prompts alone
    ('dpo', ['datasets=[pairs.jsonl]', '++online.rounds=1', '++online.reward_function=r.py:vowels',
             '++online.eval_prompts=[held.jsonl]'], ['held.jsonl'], 'r.py:vowels'),
    # an offline run: the test split of its datasets, as mode=sample, or its held-out prompts where it sets them
    ('dpo', ['datasets=[pairs.jsonl]', '++online.reward_function=r.py:vowels'], ['pairs.jsonl'], 'r.py:vowels'),
    ('dpo', ['datasets=[pairs.jsonl]', '++online.eval_prompts=[held.jsonl]', '++online.eval_reward_function=r.py:gold'],
     ['held.jsonl'], 'r.py:gold'),
    ('dpo', ['datasets=[pairs.jsonl]'], ['pairs.jsonl'], None),
    # online rounds without held-out prompts measured none
    ('dpo', ['datasets=[pairs.jsonl]', '++online.rounds=1', '++online.reward_function=r.py:vowels'], None,
     'r.py:vowels'),
])
def test_reward_mode_defaults_to_the_held_out_prompts_and_reward_of_a_run_trained_online(tmp_path, monkeypatch, loss,
                                                                                       overrides, prompts, function):
    import dataclasses
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'r.py').write_text('def vowels(prompt, completion):\n    return 1.0\n\n\n'
                                   'def gold(prompt, completion):\n    return 0.0\n')
    for name in ('train.jsonl', 'held.jsonl', 'pairs.jsonl'):
        (tmp_path / name).write_text('{"prompt": "Hi.", "chosen": "a", "rejected": "b"}\n')
    run = dataclasses.replace(make_config(tmp_path, *overrides, loss=loss), mode='reward')
    if prompts is None or function is None:
        with pytest.raises(ConfigError) as error:
            eval_script.checked(run)
        lacking = '++prompts=<prompts file or dataset names> (the run trained in online rounds and measured no ' \
                  'held-out prompts: online.eval_prompts)' if prompts is None else \
                  '++reward_function=path/to/file.py:function (the run scored with none of its own), or a reward ' \
                  'model or judge: ++online.labeler=reward_model ++online.reward_model=<dir> (or ' \
                  '++online.labeler=judge ++online.judge=<name>)'
        assert str(error.value) == f'mode=reward needs {lacking}'
        return
    run = eval_script.checked(run)
    assert (run.prompts, run.reward_function) == (prompts, function)


def test_reward_mode_weighs_a_runs_own_reward_functions_as_training_did(tmp_path):
    import dataclasses
    (tmp_path / 'r.py').write_text('def one(prompt, completion):\n    return 1.0\n\n\n'
                                   'def two(prompt, completion):\n    return 2.0\n')
    (tmp_path / 'prompts.jsonl').write_text('{"prompt": "Hi."}\n')
    functions = f'[{tmp_path}/r.py:one,{tmp_path}/r.py:two]'
    run = dataclasses.replace(make_config(tmp_path, f'++online.prompts=[{tmp_path}/prompts.jsonl]',
                                          f'++online.reward_function={functions}', '++online.reward_weights=[1,10]',
                                          loss='grpo-online'), mode='reward')
    labeler = eval_script.reward_labeler(eval_script.checked(run))
    assert checked_scores(labeler, ['p'], ['c'], ['sample 0']) == [21.0]
    other = dataclasses.replace(run, reward_function=[f'{tmp_path}/r.py:two', f'{tmp_path}/r.py:one'])
    assert checked_scores(eval_script.reward_labeler(eval_script.checked(other)), ['p'], ['c'], ['sample 0']) == [3.0]


def test_mode_eval_of_no_example_is_refused(tmp_path):
    """As a run trained with n_eval_examples=0 (no evaluation) leaves it in its config.yaml."""
    import dataclasses
    run = make_config(tmp_path, '++n_eval_examples=0', loss='sft')
    with pytest.raises(ConfigError) as error:
        eval_script.checked(dataclasses.replace(run, mode='eval'))
    assert str(error.value) == ("n_eval_examples=0: mode=eval would evaluate no example; give ++n_eval_examples=N "
                                "(null: the whole test split)")
    assert eval_script.checked(dataclasses.replace(run, mode='eval', n_eval_examples=None)).n_eval_examples is None


def test_prompts_choose_what_sample_mode_samples_and_k_samples_are_sample_modes_alone(tmp_path, capsys):
    import dataclasses
    run = make_config(tmp_path, loss='sft')
    sampling = eval_script.checked(dataclasses.replace(run, mode='sample', prompts=['held.jsonl']))
    assert sampling.datasets == ['held.jsonl']
    assert eval_script.checked(dataclasses.replace(run, mode='sample')).datasets == ['hh']
    for mode in ('reward', 'eval'):
        with pytest.raises(ConfigError) as error:
            eval_script.checked(dataclasses.replace(run, mode=mode, num_samples_per_prompt=4, prompts=['held.jsonl'],
                                                    reward_function='r.py:f'))
        assert str(error.value) == (f"num_samples_per_prompt=4: mode={mode} samples one completion per prompt; k "
                                    f"completions per prompt are mode=sample's")
    capsys.readouterr()
    eval_script.checked(dataclasses.replace(run, mode='sample', num_samples_per_prompt=3, temperature=0.0))
    assert capsys.readouterr().out == ("warning: temperature=0 decodes greedily, so the 3 samples of each prompt are "
                                       "the same (label.py finds only ties among them): sample at a temperature "
                                       "above 0\n")


def test_an_exp_name_that_is_a_path_writes_its_samples_there(tmp_path):
    """exp_name may be a path of directories under cache_dir; its samples go to the same path under samples_dir."""
    from helpers import eval_in_process, train_in_process
    train_in_process(tmp_path, '++n_examples=4', '++do_first_eval=false', loss='sft', exp_name='sweep/lr_1e-5')
    eval_in_process(tmp_path / 'sweep' / 'lr_1e-5', '++mode=sample', '++n_samples=2', '++max_new_tokens=4',
                    f'++samples_dir={tmp_path / "samples"}')
    with open(tmp_path / 'samples' / 'sweep' / 'lr_1e-5.json') as f:
        written = json.load(f)
    assert len(written['samples']) == 2 and written['config']['exp_name'] == 'sweep/lr_1e-5'
    assert os.listdir(tmp_path / 'samples' / 'sweep') == ['lr_1e-5.json']  # no temporary file left


def test_reward_line_gives_the_standard_error_only_where_there_are_two_rewards_or_more():
    result = {'reward_mean': 0.5, 'reward_se': 0.125, 'n': 2, 'length_words': 3.0, 'kl': 0.25}
    assert eval_script.reward_line(result) == ('reward 0.5000 +- 0.1250 (n=2), length 3.0 words, '
                                               'KL to the starting model 0.250')
    one = {**result, 'reward_se': float('nan'), 'n': 1}
    assert eval_script.reward_line(one) == 'reward 0.5000 (n=1), length 3.0 words, KL to the starting model 0.250'
    assert eval_script.reward_line({**result, 'kl': -0.0004}).endswith('KL to the starting model 0.000')
    assert eval_script.reward_line({**result, 'kl': -0.0006}).endswith('KL to the starting model -0.001')


def test_an_empty_prompts_list_and_the_mode_of_a_training_config_are_refused(tmp_path):
    import dataclasses
    run = make_config(tmp_path, loss='sft')
    for mode in ('sample', 'reward'):
        with pytest.raises(ConfigError) as error:
            eval_script.checked(dataclasses.replace(run, mode=mode, prompts=[]))
        where = "the run's own held-out prompts" if mode == 'reward' else 'the datasets'
        assert str(error.value) == f"prompts=[]: no prompts files or dataset names; give some, or leave prompts out " \
                                   f"for {where}"
    with pytest.raises(ConfigError) as error:
        eval_script.checked(dataclasses.replace(run, mode='train'))
    assert str(error.value) == 'mode=train: eval.py takes ++mode=<sample|eval|alpacaeval|reward|lm_eval>'


def test_a_missing_saved_policy_is_named_as_the_runs_checkpoint_not_yet_written_or_as_the_path_given(tmp_path):
    import dataclasses
    from halos.errors import MissingFileError
    run = make_config(tmp_path, loss='sft')
    own = dataclasses.replace(run, saved_policy=os.path.join(run.local_run_dir, 'LATEST', 'policy.pt'))
    with pytest.raises(MissingFileError) as error:
        eval_script.check_saved_policy(own)
    assert str(error.value) == (f"saved_policy={own.saved_policy} does not exist: the run has no checkpoint yet (train "
                                f"it, or continue it with ++resume=true), or give ++saved_policy=<a policy.pt or an HF "
                                f"directory>")
    with pytest.raises(MissingFileError) as error:
        eval_script.check_saved_policy(dataclasses.replace(run, saved_policy='sft1/LATEST/hf_nope'))
    assert str(error.value) == (f"saved_policy=sft1/LATEST/hf_nope does not exist (looked in cache_dir={tmp_path} and "
                                f"the working directory)")


def test_a_run_directory_read_elsewhere_than_it_was_saved_gives_its_own_checkpoint(tmp_path, capsys):
    run = make_config(tmp_path, loss='sft')
    saved = os.path.join(run.local_run_dir, 'LATEST', 'policy.pt')
    import dataclasses
    run = dataclasses.replace(run, saved_policy=saved)  # as train.py saves it in config.yaml
    copy = tmp_path / 'copied'
    (copy / 'LATEST').mkdir(parents=True)
    moved = eval_script.where_it_is(run, str(copy), ['++mode=eval'])
    assert (moved.local_run_dir, moved.saved_policy) == (str(copy), str(copy / 'LATEST' / 'policy.pt'))
    assert capsys.readouterr().out == f"note: {copy} holds the run saved as {run.local_run_dir}: reading it where it is\n"
    named = eval_script.where_it_is(run, str(copy), ['++mode=eval', '++saved_policy=other.pt'])
    assert (named.local_run_dir, named.saved_policy) == (str(copy), saved)
    for config_dir, overrides in ((str(tmp_path / 'config'), []), (None, []), (str(copy), ['++cache_dir=/x'])):
        assert eval_script.where_it_is(run, config_dir, overrides) == run  # halos' config, none, or told where
    os.makedirs(os.path.join(run.local_run_dir, 'LATEST'))
    assert eval_script.where_it_is(run, run.local_run_dir, []) == run  # where it was saved
    capsys.readouterr()
    config_only = tmp_path / 'config_only'
    config_only.mkdir()
    assert eval_script.where_it_is(run, str(config_only), ['++mode=eval']) == run
    assert capsys.readouterr().out == (f"note: {config_only} holds no checkpoint: reading that of the run its "
                                       f"config.yaml was saved from, {run.local_run_dir} (where mode=lm_eval also "
                                       f"writes)\n")
    (config_only / 'loss').mkdir()  # a tree of configs to compose from, as halos' config/
    assert eval_script.where_it_is(run, str(config_only), ['++mode=eval']) == run
    assert capsys.readouterr().out == ''


def test_reward_mode_scores_with_the_reward_model_a_run_trained_online_scored_with(tmp_path):
    import dataclasses

    from halos.labelers import RewardModelLabeler
    from helpers import tiny_reward_model
    rm = tiny_reward_model(tmp_path / 'rm')
    (tmp_path / 'held.jsonl').write_text('{"prompt": "Hi."}\n')
    for loss, overrides in (('dpo', ['++online.rounds=1', '++online.labeler=reward_model', f'++online.reward_model={rm}',
                                     f'++online.eval_prompts=[{tmp_path}/held.jsonl]']),
                            ('ppo-online', [f'++loss.reward_model={rm}']),
                            ('ppo', [f'++loss.reward_model={rm}']),  # offline PPO scored its data with one
                            ('dpo', ['++online.labeler=reward_model', f'++online.reward_model={rm}'])):  # given one
        run = eval_script.checked(dataclasses.replace(make_config(tmp_path, *overrides, loss=loss), mode='reward'))
        assert run.reward_function is None and eval_script.own_labeler(run) == 'reward_model'
        labeler = eval_script.reward_labeler(run)
        assert isinstance(labeler, RewardModelLabeler) and labeler.name == f'reward model {rm}'
    gold = make_config(tmp_path, '++online.rounds=1', '++online.labeler=reward_model', f'++online.reward_model={rm}',
                       f"++online.eval_reward_function={os.path.join(ROOT, 'tests', 'rewards.py')}:vowels")
    assert eval_script.own_labeler(gold) is None  # its held-out samples were scored by the gold function


def test_eval_mode_of_online_rl_evaluates_on_the_held_out_prompts_its_training_evaluated_on(tmp_path):
    (tmp_path / 'r.py').write_text("def held(prompt, completion):\n    return float('HELD' in prompt)\n")
    (tmp_path / 'train.jsonl').write_text('{"prompt": "Say hi."}\n{"prompt": "Say yo."}\n')
    (tmp_path / 'held.jsonl').write_text('{"prompt": "HELD: say hi."}\n{"prompt": "HELD: say yo."}\n')
    config = make_config(tmp_path, '++n_eval_examples=2', '++model.eval_batch_size=2', '++max_new_tokens=2',
                         f'++online.reward_function={tmp_path}/r.py:held', f'++online.eval_prompts=[{tmp_path}/held.jsonl]',
                         '++saved_policy=null', loss='grpo-online', datasets=f'[{tmp_path}/train.jsonl]')
    assert eval_script.evaluate(config)['results']['reward_eval/mean'] == 1.0


def test_eval_mode_of_a_reward_model_refuses_a_saved_policy_without_a_score_head(tmp_path):
    import dataclasses

    from halos.checkpoint import save_policy_file
    from helpers import tiny_reward_model
    run = make_config(tmp_path, loss='bradley-terry')
    reward_model = trainers.get_trainer_class(run.loss.trainer)
    weights = {'model.norm.weight': torch.ones(2)}
    save_policy_file(str(tmp_path / 'policy.pt'), 1, {**weights, 'lm_head.weight': torch.ones(2, 2)}, {})
    save_policy_file(str(tmp_path / 'rm.pt'), 1, {**weights, 'score.weight': torch.ones(1, 2)}, {})
    save_policy_file(str(tmp_path / 'lora.pt'), 1, {'base_model.model.score.modules_to_save.default.weight':
                                                    torch.ones(1, 2)}, {})
    for held in ('rm.pt', 'lora.pt', os.path.basename(tiny_reward_model(tmp_path / 'rm'))):
        eval_script.check_trained_head(dataclasses.replace(run, saved_policy=str(tmp_path / held)), reward_model)
    with pytest.raises(ConfigError) as error:
        eval_script.check_trained_head(dataclasses.replace(run, saved_policy=str(tmp_path / 'policy.pt')), reward_model)
    assert str(error.value) == (f"saved_policy={tmp_path}/policy.pt has no score head (a policy's checkpoint, not a "
                                f"reward model's): test is a reward model (loss=bradley-terry), evaluated by the head "
                                f"it trained; give its checkpoint, <its run>/LATEST/policy.pt or <its run>/LATEST/hf")


def test_eval_mode_of_ppo_warns_of_a_saved_policy_without_a_value_head(tmp_path, capsys):
    import dataclasses

    from halos.checkpoint import save_policy_file
    run = make_config(tmp_path, loss='ppo')
    ppo = trainers.get_trainer_class(run.loss.trainer)
    weights = {'model.norm.weight': torch.ones(2), 'lm_head.weight': torch.ones(2, 2)}
    save_policy_file(str(tmp_path / 'ppo.pt'), 1, {**weights, 'v_head.mlp.0.weight': torch.ones(2, 2)}, {})
    save_policy_file(str(tmp_path / 'sft.pt'), 1, weights, {})
    eval_script.check_trained_head(dataclasses.replace(run, saved_policy=str(tmp_path / 'ppo.pt')), ppo)
    assert capsys.readouterr().out == ''
    eval_script.check_trained_head(dataclasses.replace(run, saved_policy=str(tmp_path / 'sft.pt')), ppo)
    assert capsys.readouterr().out == (
        f"warning: saved_policy={tmp_path}/sft.pt holds no value head (it is not a PPO run's policy.pt), so its "
        f"evaluation's values, and the advantages and losses made from them, come from a freshly initialised head\n")


def test_a_saved_policy_of_another_shape_is_refused_by_its_own_name(tmp_path):
    import dataclasses

    from transformers import LlamaConfig
    wider = tmp_path / 'wider'
    LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2).save_pretrained(wider)
    with pytest.raises(ConfigError) as error:
        eval_script.check_saved_policy(dataclasses.replace(make_config(tmp_path, loss='sft'), saved_policy=str(wider)))
    assert str(error.value) == (f"saved_policy={wider} is not a checkpoint of model.name_or_path=embedded:tiny-smollm2: "
                                f"its hidden_size 64, not 32 (give the model it was trained from)")


def test_a_samples_file_that_the_other_mode_wrote_is_kept_beside_it(tmp_path, capsys):
    import dataclasses
    run = dataclasses.replace(make_config(tmp_path), samples_dir=str(tmp_path / 'out'), mode='sample')
    os.makedirs(run.samples_dir)
    path = eval_script.write_samples_file(run, [{'prompt': 'p', 'policy': 'a', 'chosen': 'b'}], 'then')
    eval_script.write_samples_file(run, [{'prompt': 'p', 'policy': 'c', 'chosen': 'b'}], 'now')  # its own: replaced
    assert path == f'{tmp_path}/out/{run.exp_name}.json' and capsys.readouterr().out == ''
    eval_script.write_samples_file(dataclasses.replace(run, mode='reward'), [{'prompt': 'p', 'policy': 'd'}], 'later')
    kept = f'{tmp_path}/out/{run.exp_name}.sample.json'
    assert capsys.readouterr().out == f'kept the samples that mode=sample wrote to {path} as {kept}\n'
    assert [json.load(open(name))['samples'][0]['policy'] for name in (kept, path)] == ['c', 'd']
