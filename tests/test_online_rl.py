"""Step-level online RL (halos/online_rl.py; loss=grpo-online, dr-grpo, dapo, gspo, rloo, reinforce-pp): the
advantages and losses against hand-computed values and TRL's formulas, the first pass's ratio exactly 1 and the
clip on later ones, dynamic sampling, the monitors, resume, and the warning on a deliberately hackable task."""
import dataclasses
import json
import math
import os

import pytest
import torch

from halos import batch as schema
from halos.build import build_trainer
from halos.errors import ConfigError, DataError
from halos.labelers import LabelError
from halos.losses import (group_advantages, grpo_loss, grpo_token_losses, reinforce_pp_returns, rloo_advantages,
                          sequence_clipped_losses, whiten_advantages)
from halos.monitors import (HackingMonitor, MonitorSettings, Observation, RewardHackingStop, distinct_ngrams,
                            repeated_ngram_share, sample_stats)
from helpers import DATA, ROOT, make_config, run_in_process, whole_and_killed

REWARD = os.path.join(ROOT, 'tests', 'rewards.py')
PROMPTS = os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')
METHODS = ['grpo-online', 'dr-grpo', 'dapo', 'gspo', 'rloo', 'reinforce-pp']


# ---------------------------------------------------------------- advantages and losses by hand

def test_group_advantages_with_and_without_the_std():
    scores, groups = torch.tensor([1., 2., 3., 5., 5.]), ['a', 'a', 'a', 'b', 'b']
    # group a: mean 2, unbiased std 1 -> (s - 2) / (1 + 1e-4); group b ties: 0
    assert torch.allclose(group_advantages(scores, groups, 1e-4, unbiased=True),
                          torch.tensor([-1 / 1.0001, 0., 1 / 1.0001, 0., 0.]))
    assert torch.equal(group_advantages(scores, groups, 1e-4, unbiased=True, scale=False),
                       torch.tensor([-1., 0., 1., 0., 0.]))  # Dr. GRPO: s - mean


def test_rloo_leaves_each_sample_out_of_its_own_baseline():
    # a: 1 - (2 + 3) / 2 = -1.5, 2 - (1 + 3) / 2 = 0, 3 - (1 + 2) / 2 = 1.5; a group of one: 0
    advantages = rloo_advantages(torch.tensor([1., 2., 3., 7.]), ['a', 'a', 'a', 'b'])
    assert torch.equal(advantages, torch.tensor([-1.5, 0., 1.5, 0.]))
    # = k / (k - 1) (s - mean), TRL's form
    assert torch.allclose(advantages[:3], 3 / 2 * (torch.tensor([1., 2., 3.]) - 2))


def test_reinforce_pp_returns_sum_the_kl_penalised_rewards_to_go():
    # r = -0.5 * KL + score on the last token: [-0.05, -0.1, -0.15 + 1]; G_t = sum of r from t on
    returns = reinforce_pp_returns(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 0.3, 9.0]]),
                                   torch.tensor([[1., 1., 1., 0.]]), beta=0.5)
    assert torch.allclose(returns, torch.tensor([[0.7, 0.75, 0.85, 0.0]]))
    whitened, = whiten_advantages([returns], [torch.tensor([[1., 1., 1., 0.]])])
    assert whitened[0, :3].mean().abs() < 1e-6 and whitened[0, 3] == 0


def test_the_sequence_ratio_of_gspo_and_rloo_by_hand():
    log_ratios, mask = torch.tensor([[0.2, 0.4, 5.0]]), torch.tensor([[1., 1., 0.]])
    # GSPO: s = e^mean(0.2, 0.4) = e^0.3 = 1.349859; A = 1 clipped at 1.2: L = -1.2 on each token
    losses, stats = sequence_clipped_losses(log_ratios, mask, torch.tensor([1.0]), 0.2, 0.2, length_normalised=True)
    assert torch.allclose(losses, torch.tensor([[-1.2, -1.2, 0.]])) and stats['clipped'].tolist() == [[1., 1., 0.]]
    # A = -1: min(-1.349859, -1.2) is the unclipped term, L = 1.349859
    losses, stats = sequence_clipped_losses(log_ratios, mask, torch.tensor([-1.0]), 0.2, 0.2, length_normalised=True)
    assert torch.allclose(losses[0, :2], torch.full((2,), math.exp(0.3))) and stats['clipped'].sum() == 0
    # RLOO: s = e^(0.2 + 0.4) = 1.822119
    losses, _ = sequence_clipped_losses(log_ratios, mask, torch.tensor([-1.0]), 0.2, 0.2, length_normalised=False)
    assert torch.allclose(losses[0, :2], torch.full((2,), math.exp(0.6)))


def trl_sequence_loss(log_ratio, mask, advantages, epsilon_low, epsilon_high):
    """TRL's GRPOTrainer with importance_sampling_level='sequence' (GSPO) and loss_type='grpo', restated."""
    log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def trl_token_loss(log_ratio, reference_minus_policy, mask, advantages, epsilon_low, epsilon_high, beta):
    """TRL's GRPOTrainer, token-level ratio, k3 KL, loss_type='grpo', restated."""
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_kl = torch.exp(reference_minus_policy) - reference_minus_policy - 1
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1)) + beta * per_token_kl
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def test_the_losses_equal_trls_formulas():
    generator = torch.Generator().manual_seed(0)
    log_ratio = torch.randn(6, 9, generator=generator) * 0.3
    reference = torch.randn(6, 9, generator=generator) * 0.3
    mask = (torch.rand(6, 9, generator=generator) > 0.3).float()
    advantages = torch.randn(6, generator=generator)
    ours, _ = sequence_clipped_losses(log_ratio, mask, advantages, 3e-4, 4e-4, length_normalised=True)
    assert torch.allclose(grpo_loss(ours, mask, 'grpo', None, 6, 9), trl_sequence_loss(log_ratio, mask, advantages,
                                                                                        3e-4, 4e-4))
    ours, _ = grpo_token_losses(log_ratio, reference, advantages, 0.2, 0.28, 0.04)
    assert torch.allclose(grpo_loss(ours, mask, 'grpo', None, 6, 9),
                          trl_token_loss(log_ratio, reference, mask, advantages, 0.2, 0.28, 0.04))


def test_the_entropy_monitor_is_the_entropy_of_each_next_token_distribution():
    from halos.packing import entropies
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(1)) * 3
    expected = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(entropies(logits, torch.logsumexp(logits, -1)), expected, atol=1e-5)
    assert torch.allclose(entropies(torch.zeros(2, 8), torch.logsumexp(torch.zeros(2, 8), -1)),
                          torch.full((2,), math.log(8)))  # uniform: log V


# ---------------------------------------------------------------- monitors by hand

def test_repetition_and_diversity_of_token_lists():
    # 4-grams of 1 2 3 4 1 2 3 4: 1234 2341 3412 4123 1234 -> 1 of 5 seen before
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(0.2)
    assert repeated_ngram_share([1, 2, 3]) == 0.0
    assert distinct_ngrams([[1, 2, 1, 2], [7]]) == pytest.approx(2 / 3)  # bigrams 12 21 12
    stats = sample_stats([1.0, 1.0, 0.0, 2.0], ['a', 'a', 'b', 'b'], [[1, 2], [1, 2, 3], [4], [5]],
                         [True, False, True, True])
    assert stats == {'reward/mean': 1.0, 'reward/std': pytest.approx(math.sqrt(0.5)), 'groups/degenerate': 0.5,
                     'completions/length': 1.75, 'completions/truncated': 0.25, 'completions/repetition': 0.0,
                     'completions/distinct2': pytest.approx(2 / 3)}


def observation(step, train, held_out, se=0.05, length=10.0, repetition=0.0):
    return Observation(f'step {step}', train, held_out, se, length, repetition)


def test_the_monitor_warns_on_each_sign_and_stops_when_asked(capsys):
    monitor = HackingMonitor(MonitorSettings(window=2, max_length_growth=2.0, max_repetition=0.5, stop_on_hacking=False))
    assert monitor.observe(observation(0, 1.0, 0.80), 'LATEST') == {'monitor/warnings': 0.0}
    assert monitor.observe(observation(1, 1.5, 0.78), 'LATEST') == {'monitor/warnings': 0.0}
    # two evaluations on: the training reward rose, the held-out one fell by 0.2 > hypot(0.05, 0.05)
    assert monitor.observe(observation(2, 2.0, 0.60), 'LATEST') == {'monitor/warnings': 1.0}
    assert 'the training reward rose (1.000 -> 2.000) while the held-out reward fell (0.800 -> 0.600) since step 0' \
        in capsys.readouterr().out
    assert monitor.observe(observation(3, 2.1, 0.77, se=0.2), 'LATEST') == {'monitor/warnings': 0.0}  # within noise
    assert monitor.observe(observation(4, 2.2, 0.8, length=20.5, repetition=0.6), 'LATEST') == {'monitor/warnings': 2.0}
    restored = HackingMonitor(monitor.settings)
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history
    stopping = HackingMonitor(MonitorSettings(2, 2.0, 0.5, stop_on_hacking=True))
    stopping.observe(observation(0, 1.0, 0.8), 'runs/x/LATEST')
    with pytest.raises(RewardHackingStop, match=r"^stopped at step 1 \(online.stop_on_hacking=true\): completions grew "
                                                r"from 10.0 to 25.0 tokens .*the last good checkpoint is runs/x/LATEST"):
        stopping.observe(observation(1, 1.0, 0.8, length=25.0), 'runs/x/LATEST')


# ---------------------------------------------------------------- the trainers

def online_overrides(*extra):
    return [f'++online.prompts={PROMPTS}', '++online.samples_per_prompt=3', f'++online.reward_function={REWARD}:vowels',
            '++max_new_tokens=8', '++model.batch_size=2', '++n_epochs=null', '++n_examples=4', '++n_eval_examples=2',
            '++temperature=1.0', '++top_k=0', '++top_p=1.0', '++optimizer=AdamW', '++warmup_steps=0', *extra]


def test_held_out_prompts_that_are_training_prompts_warn(tmp_path, capsys):
    held_out = tmp_path / 'held_out.jsonl'
    lines = open(PROMPTS).readlines()
    held_out.write_text(''.join(lines[:2]) + json.dumps({'prompt': 'A prompt of its own.'}) + '\n')
    build_trainer(make_config(tmp_path, *online_overrides(f'++online.eval_prompts={held_out}'), loss='grpo-online'))
    assert ("warning: 2 of the 3 held-out prompts are also training prompts, so the held-out reward is not held out "
            "there: give online.eval_prompts a file of other prompts") in capsys.readouterr().out
    other = tmp_path / 'other.jsonl'
    other.write_text(json.dumps({'prompt': 'A prompt of its own.'}) + '\n')
    build_trainer(make_config(tmp_path, *online_overrides(f'++online.eval_prompts={other}'), loss='grpo-online'))
    assert 'held-out prompts are also training prompts' not in capsys.readouterr().out


def test_the_first_pass_is_at_ratio_1_and_the_clip_acts_on_the_next(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *online_overrides('++loss.mu=2', '++loss.epsilon=1e-3',
                                                                    '++lr=1e-2'), loss='grpo-online'))
    seen = []
    loss = trainer.loss

    def recorded(log_ratios, reference_log_ratios, advantages, mask):
        losses, stats = loss(log_ratios, reference_log_ratios, advantages, mask)
        seen.append((log_ratios.detach().clone(), (stats['clipped'] * mask).sum() / mask.sum()))
        return losses, stats
    trainer.loss = recorded
    batch = next(iter(trainer.train_iterator))
    trainer.train_step([batch])
    (first, first_clipped), (second, second_clipped) = seen
    assert torch.equal(torch.exp(first), torch.ones_like(first))  # exactly 1: the sampler is the first pass's policy
    assert first_clipped == 0 and trainer.batch_counter == 2  # mu optimizer steps on one sampled batch
    assert second.abs().max() > 1e-3 and second_clipped > 0


@pytest.mark.parametrize('loss', METHODS)
def test_every_method_trains_a_step_and_logs_its_monitors(tmp_path, loss):
    trainer = build_trainer(make_config(tmp_path, *online_overrides('++lr=1e-3'), loss=loss))
    before = {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}
    trainer.train_step([next(iter(trainer.train_iterator))])
    assert any(not torch.equal(before[name], p) for name, p in trainer.policy.named_parameters())
    assert trainer.steps_with_advantage == 1 and trainer.nothing_learned() is None
    metrics = trainer.train_metrics.means()
    for name in ('reward_train/mean', 'reward_train/std', 'groups_train/degenerate', 'completions_train/length',
                 'completions_train/truncated', 'completions_train/repetition', 'completions_train/distinct2',
                 'entropy_train', 'clipfrac_train/policy', 'loss/train'):
        assert math.isfinite(metrics[name]), name
    if trainer.params.beta > 0:
        assert metrics['kl_train/start'] == pytest.approx(0.0, abs=1e-4)  # the first pass's policy is the start
    else:  # nothing reads the reference at beta 0: it is not loaded
        assert trainer.reference_model is None and 'kl_train/start' not in metrics
    line = json.loads(open(tmp_path / 'test' / 'rollouts.jsonl').readline())
    assert line['step'] == 0 and len(line['completions']) == len(line['scores']) == 3
    results = trainer.evaluate()
    assert 'reward_eval/mean' in results and 'completions_eval/length' in results


def test_dynamic_sampling_replaces_the_groups_that_tie(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *online_overrides(f'++online.reward_function={REWARD}:on_some_prompts',
                                                                    '++model.batch_size=4'), loss='dapo'))
    parts = trainer.experience([next(iter(trainer.train_iterator))])
    metrics = trainer.train_metrics.means()
    assert metrics['groups_train/dropped'] > 0 and metrics['groups_train/refills'] >= 1
    assert len(parts[0].groups) == 4 and not any(group.degenerate() for group in parts[0].groups)


@pytest.mark.parametrize('loss', ['grpo-online', 'rloo', 'reinforce-pp'])
def test_at_beta_0_no_reference_is_loaded_and_the_step_is_the_one_with_a_reference(tmp_path, loss):
    import models
    steps = []
    for with_reference in (False, True):
        trainer = build_trainer(make_config(tmp_path, *online_overrides('++lr=1e-3', '++loss.beta=0',
                                                                         '++loss.mu=2'), loss=loss))
        assert trainer.reference_model is None
        if with_reference:  # the reference's forward computed, and its KL multiplied by 0
            trainer.reference_model = models.load_causal_lm('embedded:tiny-smollm2', 'float32').eval()
        trainer.train_step([next(iter(trainer.train_iterator))])
        steps.append({name: p.detach().clone() for name, p in trainer.policy.named_parameters()})
    assert all(torch.equal(steps[0][name], steps[1][name]) for name in steps[0])


def test_under_lora_at_beta_0_no_adapters_off_reference_is_built(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *online_overrides('++model.use_peft=true', '++model.peft.lora_r=4'),
                                        loss='dapo'))
    assert trainer.reference_model is None
    assert math.isfinite(trainer.train_step([next(iter(trainer.train_iterator))]))


class Abstaining:
    """A judge that gives no score to the samples `abstains(i)` picks (by position in the call), vowels to the rest."""
    name, may_abstain, last_error = 'an abstaining judge', True, 'ValueError: no score in the answer'

    def __init__(self, abstains):
        self.abstains = abstains

    def __call__(self, prompts, completions, extras):
        return [None if self.abstains(i) else float(sum(c in 'aeiou' for c in completion))
                for i, completion in enumerate(completions)]


def test_each_prompt_is_scored_with_its_own_answer_from_the_prompts_file(tmp_path):
    prompts = tmp_path / 'questions.jsonl'
    answers = {'Name a vowel.': 'e', 'Name a consonant.': 't'}
    prompts.write_text(''.join(json.dumps({'prompt': prompt, 'answer': answer}) + '\n'
                               for prompt, answer in answers.items()))
    trainer = build_trainer(make_config(tmp_path, *online_overrides(
        f'++online.prompts={prompts}', f'++online.reward_function={REWARD}:answer_count',
        f'++online.eval_prompts={prompts}'), loss='grpo-online'))
    part, = trainer.experience([next(iter(trainer.train_iterator))])
    by_prompt = {trainer.tokenizer.decode(group.prompt_ids, skip_special_tokens=True): group for group in part.groups}
    for prompt, answer in answers.items():
        group = next(group for text, group in by_prompt.items() if prompt in text)
        assert group.scores == [float(sample.text.count(answer)) for sample in group.samples]
    assert len({score for group in part.groups for score in group.scores}) > 1


def test_a_trl_reward_function_is_given_the_batch_in_the_form_its_prompts_file_gave(tmp_path):
    from halos.labelers import load_reward_function
    prompts = tmp_path / 'questions.jsonl'
    turns = [{'role': 'system', 'content': 'Answer in one word.'}, {'role': 'user', 'content': 'Name a consonant.'}]
    prompts.write_text(json.dumps({'prompt': 'Name a vowel.', 'answer': 'e', 'level': 1}) + '\n' +
                       json.dumps({'prompt': turns, 'answer': 't', 'level': 2}) + '\n')
    trainer = build_trainer(make_config(tmp_path, *online_overrides(
        f'++online.prompts={prompts}', f'++online.reward_function={REWARD}:trl_answer_count',
        f'++online.eval_prompts={prompts}'), loss='grpo-online'))
    calls = load_reward_function(f'{REWARD}:trl_answer_count').__globals__['CALLS']
    calls.clear()
    part, = trainer.experience([next(iter(trainer.train_iterator))])
    call, = calls  # one call for the step's 6 completions
    assert sorted(call) == ['answer', 'completions', 'level', 'prompts']
    by_form = {isinstance(prompt, str): i for i, prompt in enumerate(call['prompts'])}
    text, chat = by_form[True], by_form[False]
    assert call['prompts'][text] == 'Name a vowel.' and call['prompts'][chat] == turns
    assert isinstance(call['completions'][text], str) and call['completions'][chat][0]['role'] == 'assistant'
    assert len(call['prompts']) == len(call['answer']) == len(call['level']) == 6
    assert sorted(zip(call['answer'], call['level'])) == [('e', 1)] * 3 + [('t', 2)] * 3
    for group in part.groups:
        answer = 'e' if 'vowel' in trainer.tokenizer.decode(group.prompt_ids) else 't'
        assert group.scores == [float(sample.text.count(answer)) for sample in group.samples]


def test_several_reward_functions_score_each_sample_with_their_weighted_sum(tmp_path):
    import rewards
    trainer = build_trainer(make_config(tmp_path, *online_overrides(
        f'++online.reward_function=[{REWARD}:vowels,{REWARD}:letter_e]', '++online.reward_weights=[0.5,10]'),
        loss='grpo-online'))
    part, = trainer.experience([next(iter(trainer.train_iterator))])
    for group in part.groups:
        texts = [sample.text for sample in group.samples]
        assert group.scores == pytest.approx([0.5 * rewards.vowels('', t) + 10 * rewards.letter_e('', t) for t in texts])
        assert [score.parts for score in group.scores] == [
            {'vowels': rewards.vowels('', t), 'letter_e': rewards.letter_e('', t)} for t in texts]
    with pytest.raises(ConfigError, match=r'^online.reward_weights weighs the functions of online.reward_function, '
                                          r'and online.labeler=judge scores with none: leave it null$'):
        make_config(tmp_path, *online_overrides('++online.labeler=judge', '++online.judge=j',
                                                '++online.reward_weights=[1]'), loss='grpo-online')
    with pytest.raises(ConfigError, match=r'^online.reward_weights weighs the functions of online.reward_function, '
                                          r'which loss=dpo does not score with \(online rounds and online RL do\): '
                                          r'leave it null$'):
        make_config(tmp_path, '++online.reward_weights=0.5')


def test_a_prompt_without_the_field_its_reward_function_takes_stops_the_run_before_the_models_load(tmp_path,
                                                                                                  monkeypatch):
    import halos.build
    prompts = tmp_path / 'questions.jsonl'
    monkeypatch.setattr(halos.build, 'load_models', lambda *args: pytest.fail('the models loaded'))
    refusal = f"reward function {REWARD}:answer_count cannot score the training prompts: {prompts}: record {{}}: it " \
              f"takes answer, which its prompt's record lacks (a field given as null counts as absent; the prompt's " \
              f"own fields: {{}})"
    records = [{'prompt': 'What is 2+2?', 'answer': '4'}, {'prompt': 'What is 3+3?', 'level': 1}]
    many = [{'prompt': f'What is {n}+{n}?'} for n in range(12)]  # the first in the file, however the loader orders them
    for lines, expected in ((records, refusal.format(2, 'level')),
                            (many, refusal.format(1, 'none') + ' (and so do 11 more of its 12 prompts)')):
        prompts.write_text(''.join(json.dumps(record) + '\n' for record in lines))
        with pytest.raises(LabelError) as error:
            build_trainer(make_config(tmp_path, *online_overrides(f'++online.prompts={prompts}',
                                                                  f'++online.reward_function={REWARD}:answer_count'),
                                      loss='grpo-online'))
        assert str(error.value) == expected


def test_a_score_in_named_parts_logs_each_parts_mean_over_the_steps_samples(tmp_path):
    import sys
    sys.path.insert(0, os.path.dirname(REWARD))
    from rewards import vowels
    trainer = build_trainer(make_config(tmp_path, *online_overrides(
        f'++online.reward_function={REWARD}:vowels_and_brevity'), loss='grpo-online'))
    part, = trainer.experience([next(iter(trainer.train_iterator))])
    texts = [sample.text for group in part.groups for sample in group.samples]
    logged = trainer.train_metrics.means()
    assert logged['reward_parts_train/vowels'] == pytest.approx(sum(vowels(None, t) for t in texts) / len(texts))
    assert logged['reward_parts_train/brevity'] == pytest.approx(-sum(len(t) for t in texts) / 100 / len(texts))
    assert logged['reward_train/mean'] == pytest.approx(logged['reward_parts_train/vowels']
                                                        + logged['reward_parts_train/brevity'])
    line = json.loads(open(tmp_path / 'test' / 'rollouts.jsonl').readline())
    assert [sum(parts.values()) for parts in line['score_parts']] == pytest.approx(line['scores'])
    trainer.evaluate()
    held_out = {}
    for line in open(tmp_path / 'test' / 'metrics.jsonl'):  # the evaluation's metrics, then its held-out summary
        held_out.update(json.loads(line))
    assert held_out['reward_parts_eval/vowels'] + held_out['reward_parts_eval/brevity'] == \
        pytest.approx(held_out['reward_eval/mean'])


@pytest.mark.parametrize('mask_truncated', [False, True])
def test_a_truncated_completion_carries_no_loss_with_mask_truncated(tmp_path, mask_truncated):
    from halos.sampling import Sample
    trainer = build_trainer(make_config(tmp_path, *online_overrides(f'++loss.mask_truncated={mask_truncated}'),
                                        loss='dapo'))
    eos = trainer.tokenizer.eos_token_id
    texts = ['a', 'ee', 'iii']  # vowels scores 1, 2, 3: every group has advantages

    def sampler(cut):  # the samples `cut` picks ran out of length
        return lambda batch, k: [[Sample(text, [100 + j, 101, 102 if cut(j) else eos], finished=not cut(j),
                                         token_logps=[-1.0] * 3) for j, text in enumerate(texts[:k])]
                                 for _ in batch[schema.PROMPT_ID]]
    batch = next(iter(trainer.train_iterator))
    trainer.sampler = lambda: sampler(lambda j: j == 1)
    part, = trainer.experience([batch])
    cut = [not sample.finished for group in part.groups for sample in group.samples]
    assert part.weights.tolist() == [0.0 if c and mask_truncated else 1.0 for c in cut] and any(cut)
    unit = 1 / (1 + 1e-4)  # scores 1, 2, 3: mean 2, unbiased std 1, std_epsilon 1e-4
    assert part.advantages.tolist() == pytest.approx([-unit, 0.0, unit] * 2)  # its score still counts in its group
    trainer.sampler = lambda: sampler(lambda j: True)
    loss = trainer.train_step([batch])  # every completion cut: no token carries loss, and the loss is 0, not 0 / 0
    assert loss == 0.0 if mask_truncated else math.isfinite(loss)
    assert trainer.steps_with_advantage == (1 if mask_truncated else 2)  # a step whose loss is all masked teaches nothing
    trainer.steps_with_advantage, trainer.steps_all_cut = 0, trainer.batch_counter
    assert trainer.nothing_learned().endswith(
        "(every completion was cut at the length budget (max_new_tokens, or model.max_length less the prompt), and "
        "loss.mask_truncated=true leaves a cut completion out of the loss)" if mask_truncated else
        "so maybe too short to tell apart)")
    assert trainer.what_to_change() == ("raise max_new_tokens (or model.max_length)" if mask_truncated else
                                        "sample more completions per prompt (online.samples_per_prompt) or at a "
                                        "higher temperature")


def test_a_sample_the_judge_could_not_score_is_left_out_of_its_step(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *online_overrides(), loss='grpo-online'))
    trainer.rollouts = dataclasses.replace(trainer.rollouts, labeler=Abstaining(lambda i: i % 3 == 0 or i == 4))
    part, = trainer.experience([next(iter(trainer.train_iterator))])  # 2 prompts x 3 samples: 0, 3 and 4 unscored
    assert [len(group.samples) for group in part.groups] == [2, 1] and part.rows.input_ids.shape[0] == 3
    assert part.advantages[2] == 0  # a group of one sample has no advantage
    assert [len(json.loads(line)['scores']) for line in open(tmp_path / 'test' / 'rollouts.jsonl')] == [2, 1]


def test_a_step_or_evaluation_the_judge_mostly_could_not_score_stops_the_run(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *online_overrides(), loss='grpo-online'))
    trainer.rollouts = dataclasses.replace(trainer.rollouts, labeler=Abstaining(lambda i: i > 1),
                                           held_out_labeler=Abstaining(lambda i: True))
    with pytest.raises(LabelError) as error:
        trainer.experience([next(iter(trainer.train_iterator))])
    assert str(error.value) == ("step 0: an abstaining judge scored 2 of 6 samples (fewer than 50%); last error: "
                                "ValueError: no score in the answer")
    with pytest.raises(LabelError, match=r"^the held-out reward after step 0: an abstaining judge scored 0 of 4 samples; "
                                         r"last error: ValueError: no score in the answer$"):
        trainer.evaluate()


def test_a_process_whose_judge_scored_none_of_its_samples_stops_every_process(tmp_path, monkeypatch):
    """Two processes simulated: the other scored all 6 of its samples, so half of all are scored (enough), but
    this one has nothing to train on."""
    import halos.online_rl
    trainer = build_trainer(make_config(tmp_path, *online_overrides(), loss='grpo-online'))
    trainer.rollouts = dataclasses.replace(trainer.rollouts, labeler=Abstaining(lambda i: True))
    other_rank = torch.tensor([6.0, 6.0, 0.0])  # scored, samples, processes with none scored
    monkeypatch.setattr(halos.online_rl, 'all_reduce_sum',
                        lambda value: value + other_rank if value.shape == other_rank.shape else value)
    monkeypatch.setattr(halos.online_rl, 'get_world_size', lambda: 2)
    with pytest.raises(LabelError) as error:
        trainer.experience([next(iter(trainer.train_iterator))])
    assert str(error.value) == ("step 0: an abstaining judge scored none of the samples of 1 of 2 processes, which "
                                "have nothing to train on; last error: ValueError: no score in the answer")


@pytest.mark.parametrize('loss, alike', [('grpo-online', 'prompt'), ('rloo', 'prompt'), ('reinforce-pp', 'step')])
def test_a_run_whose_samples_all_score_alike_warns_and_stops_with_what_to_check(tmp_path, capsys, loss, alike):
    """RLOO and REINFORCE++ fold a KL into the reward by default: its advantages are no signal of the scores."""
    trainer = build_trainer(make_config(tmp_path, *online_overrides(f'++online.reward_function={REWARD}:constant',
                                                                    '++eval_every=2'), loss=loss))
    with pytest.raises(DataError) as error:
        trainer.train()  # 4 examples, 2 a step
    # the tiny random model never ends a completion within its 8 tokens
    cut = ("; every completion was cut at the length budget (max_new_tokens, or model.max_length less the prompt), so "
           "maybe too short to tell apart")
    assert (f"warning: after 1 optimizer step, no sample has had an advantage other than 0 (reward function "
            f"{REWARD}:constant scored the samples of each {alike} alike{cut}): nothing is learned until one has\n"
            in capsys.readouterr().out)
    rollouts = tmp_path / 'test' / 'rollouts.jsonl'
    assert str(error.value) == (
        f"after 2 optimizer steps, no sample has had an advantage other than 0 (reward function {REWARD}:constant "
        f"scored the samples of each {alike} alike{cut}), so nothing was learned: check it, or sample more "
        f"completions per prompt (online.samples_per_prompt) or at a higher temperature; the samples and scores are "
        f"in {rollouts}")
    assert [json.loads(line)['scores'] for line in open(rollouts)] == [[1.0] * 3] * 4
    assert trainer.trainer_state()['steps_with_advantage'] == 0 and trainer.trainer_state()['steps_all_cut'] == 2
    trainer.steps_all_cut = 1  # a step with a completion that ended: no note of the length budget
    assert cut not in trainer.nothing_learned()


def test_a_step_level_run_killed_and_resumed_ends_as_the_uninterrupted_one(tmp_path):
    overrides = online_overrides('++n_examples=12', '++eval_every=4', '++lr=1e-3', '++loss.mu=2')
    whole_and_killed(tmp_path, *overrides, loss='grpo-online', max_delay=1.5)
    from helpers import run_train
    run_train(tmp_path, *overrides, '++resume=true', loss='grpo-online', exp_name='killed')
    policies = [torch.load(tmp_path / name / 'LATEST' / 'policy.pt', weights_only=True) for name in ('whole', 'killed')]
    assert policies[0]['step_idx'] == policies[1]['step_idx'] == 12
    for name, tensor in policies[0]['state'].items():
        assert torch.allclose(tensor, policies[1]['state'][name], atol=1e-6), name
    rollouts = [open(tmp_path / name / 'rollouts.jsonl').read() for name in ('whole', 'killed')]
    assert rollouts[0] == rollouts[1] and len(rollouts[0].splitlines()) == 6 * 2  # 6 steps of 2 prompts


def test_a_fresh_run_replaces_the_rollouts_of_an_earlier_run_of_its_name(tmp_path):
    from helpers import train_in_process
    for seed in (1, 2):
        train_in_process(tmp_path, *online_overrides(f'++seed={seed}'), loss='grpo-online', exp_name='again')
    steps = [json.loads(line)['step'] for line in open(tmp_path / 'again' / 'rollouts.jsonl')]
    assert steps == [0, 0, 1, 1]  # the second run's 2 steps of 2 prompts, not the first's before them


def test_checkpoint_minutes_checkpoint_between_evaluations(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *online_overrides('++eval_every=1000', '++checkpoint_minutes=1e-6'),
                                        loss='grpo-online'))
    trainer.train()
    state = torch.load(tmp_path / 'test' / 'LATEST' / 'trainer_state.pt', weights_only=True)
    assert state['example_counter'] == 4


# ---------------------------------------------------------------- the warning on a hackable task

@pytest.mark.slow
def test_the_length_warning_fires_before_the_held_out_reward_falls_on_a_hackable_task(tmp_path, capsys):
    """The proxy reward is the completion's length in characters; the gold reward, on held-out prompts, is 1 for
    at most 150 characters. Starting from a model tuned to answer 'Ok.', GRPO learns to write longer: the
    length warning (growth past 1.2x) fires at an evaluation where the gold reward has not fallen yet, and later
    it falls. With online.stop_on_hacking the run stops at that evaluation, the checkpoint before it kept."""
    lines = open(PROMPTS).readlines()[:32]
    short = tmp_path / 'short.jsonl'
    short.write_text(''.join(json.dumps({'prompt': json.loads(line)['prompt'], 'output': 'Ok.', 'label': 1}) + '\n'
                             for line in lines))
    held_out = tmp_path / 'held_out.jsonl'
    held_out.write_text(''.join(open(os.path.join(DATA, 'upbeat', 'test_prompts.jsonl')).readlines()[:8]))
    common = ['model=tiny', 'mode=train', f'++cache_dir={tmp_path}', '++wandb.enabled=false', '++optimizer=AdamW',
              '++warmup_steps=0', '++minimum_log_interval_secs=0']
    run_in_process('train.py', ['loss=sft', 'exp_name=short', f'datasets=[{short}]', '++n_epochs=30', '++lr=3e-3',
                                '++model.batch_size=8', '++n_eval_examples=8', '++eval_every=100000',
                                '++do_first_eval=false', *common], tmp_path / 'hydra')
    hacked = ['loss=grpo-online', f'datasets=[{tmp_path}/short.jsonl]', '++model.load_from=short/LATEST/policy.pt',
              '++online.samples_per_prompt=4', f'++online.reward_function={REWARD}:characters',
              f'++online.eval_reward_function={REWARD}:brief', f'++online.eval_prompts={held_out}',
              '++online.max_length_growth=1.2', '++max_new_tokens=24', '++model.batch_size=4', '++lr=1e-3',
              '++loss.beta=0.0', '++temperature=0.7', '++top_p=1.0', '++top_k=0', '++n_eval_examples=8',
              '++eval_every=4', '++n_epochs=null', *common]
    printed = run_in_process('train.py', [*hacked, 'exp_name=watched', '++n_examples=48'], tmp_path / 'hydra')
    records = [json.loads(line) for line in open(tmp_path / 'watched' / 'metrics.jsonl')]
    gold = {r['step']: r['reward_eval/mean'] for r in records if 'reward_eval/mean' in r}
    se = {r['step']: r['reward_eval/se'] for r in records if 'reward_eval/se' in r}
    warned = [r['step'] for r in records if r.get('monitor/warnings')]
    fell = [step for step in sorted(gold) if gold[0] - gold[step] > math.hypot(se[0], se[step])]
    assert warned and fell and warned[0] < fell[0]
    assert 'warning: possible reward hacking at step' in printed and 'completions grew from' in printed

    with pytest.raises(SystemExit) as exit_:
        run_in_process('train.py', [*hacked, 'exp_name=stopped', '++n_examples=48', '++online.stop_on_hacking=true'],
                       tmp_path / 'hydra')
    assert exit_.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after a progress bar's erasing escape codes
    assert f"train.py: stopped at step {warned[0] // 4} ({warned[0]} examples) (online.stop_on_hacking=true): " \
        f"completions grew from" \
        in last_line and last_line.endswith(f"the last good checkpoint is {tmp_path}/stopped/LATEST, written before "
                                            f"this evaluation")
    kept = torch.load(tmp_path / 'stopped' / 'LATEST' / 'trainer_state.pt', weights_only=True)
    assert kept['example_counter'] == warned[0] - 4  # the evaluation before: its checkpoint is the last good one


def test_one_sample_per_prompt_is_refused_where_a_baseline_compares_a_prompts_samples_and_not_for_reinforce_pp(tmp_path):
    for loss in ('grpo-online', 'rloo'):
        with pytest.raises(ConfigError) as error:
            make_config(tmp_path, *online_overrides('++online.samples_per_prompt=1'), loss=loss)
        assert str(error.value) == (f"online.samples_per_prompt=1: loss={loss} compares the samples of a prompt, so it "
                                    f"needs at least 2")
    trainer = build_trainer(make_config(tmp_path, *online_overrides('++online.samples_per_prompt=1', '++lr=1e-3'),
                                        loss='reinforce-pp'))  # its baseline is the step's: one sample a prompt trains
    trainer.train_step([next(iter(trainer.train_iterator))])
    assert trainer.steps_with_advantage == 1
