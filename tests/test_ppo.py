"""Offline PPO: GAE, whitening and the clipped surrogate against hand-computed values, the value head,
and train.py -> checkpoint -> resume -> eval.py / AutoModelForCausalLM end to end."""
import math

import pytest
import torch

import models
from halos.batch import LabelledCompletions
from halos.build import build_trainer
from halos.checkpoint import load_policy_file
from helpers import eval_in_process, make_config, tiny_reward_model, train_in_process
from trainers import generalized_advantages, ppo_loss, whiten_advantages

def assert_close(actual: torch.Tensor, expected, atol: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# A 5-token row: the prompt's last position, then 4 completion tokens; reward +1 on the last one.
FIVE_VALUES = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1]])
FIVE_MASK = torch.tensor([[0.0, 1, 1, 1, 1]])
FIVE_REWARDS = torch.tensor([[0.0, 0, 0, 0, 1]])


def test_gae_on_a_hand_worked_five_token_row():
    """gamma 0.9, lambda 0.5, by hand (V masked to [0, .4, .3, .2, .1], V after the end = 0):
    t=4: delta = 1 - .1 = .9                     A = .9
    t=3: delta = .9*.1 - .2 = -.11               A = -.11 + .45*.9 = .295
    t=2: delta = .9*.2 - .3 = -.12               A = -.12 + .45*.295 = .01275
    t=1: delta = .9*.3 - .4 = -.13               A = -.13 + .45*.01275 = -.1242625
    t=0: prompt position, masked                 A = 0
    """
    advantages, returns, targets = generalized_advantages(FIVE_VALUES, FIVE_REWARDS, FIVE_MASK, gamma=0.9, lam=0.5)
    assert_close(advantages, [[0, -0.1242625, 0.01275, 0.295, 0.9]], 1e-6)
    assert_close(returns, [[0, 0.2757375, 0.31275, 0.495, 1.0]], 1e-6)
    # value target with the reward at t: 1 at the last token, discounted by 0.9 per step before it
    assert_close(targets, [[0, 0.729, 0.81, 0.9, 1.0]], 1e-6)
    # HALOs 406ed27: the rewards strictly after t, so 0 at the last token
    _, _, archangel_targets = generalized_advantages(FIVE_VALUES, FIVE_REWARDS, FIVE_MASK, gamma=0.9, lam=0.5,
                                                     target_includes_reward=False)
    assert_close(archangel_targets, [[0, 0.81, 0.9, 1.0, 0]], 1e-6)


# The PPO toy check of the spec (halos_reference.md section 4.12), computed by its Appendix A script.
TOY_MASK = torch.tensor([[0.0, 1, 1, 1], [0, 1, 1, 0]])
TOY_VALUES = torch.tensor([[0.2, 0.1, 0.3, 0.5], [0.1, -0.2, -0.4, 0.3]])
TOY_REFERENCE = torch.tensor([[0.0, -1, -2, -0.5], [0, -1.5, -0.7, 0]])
TOY_POLICY = torch.tensor([[0.0, -0.9, -2.2, -0.4], [0, -1.6, -0.5, 0]])
TOY_REWARDS = torch.tensor([[0.0, 0, 0, 1], [0, 0, -1, 0]])


def toy_check(archangel: bool):
    advantages, _, targets = generalized_advantages(TOY_VALUES, TOY_REWARDS, TOY_MASK, gamma=0.99, lam=0.95,
                                                    target_includes_reward=not archangel)
    whitened, = whiten_advantages([advantages], [TOY_MASK])
    loss, stats = ppo_loss(TOY_POLICY, TOY_REFERENCE, whitened, TOY_VALUES, targets, TOY_MASK, cliprange=0.5,
                           critic_coef=0.01, KL_coef=0.1, archangel=archangel)
    return advantages, whitened, targets, loss, stats


def test_toy_advantages_and_their_global_whitening():
    advantages, whitened, _, _, _ = toy_check(archangel=False)
    assert_close(advantages, [[0, 0.822668, 0.66525, 0.5], [0, -0.7603, -0.6, 0]], 1e-6)
    # masked mean 0.125524, population variance 0.445723
    assert_close(whitened, [[0, 1.044215, 0.808428, 0.560909], [0, -1.326828, -1.086723, 0]], 1e-5)
    # whitening over two microbatches is whitening over their union
    first, second = whiten_advantages([advantages[:1], advantages[1:]], [TOY_MASK[:1], TOY_MASK[1:]])
    assert torch.allclose(torch.cat([first, second]), whitened)


def test_later_halos_formulas_by_default():
    _, _, targets, loss, stats = toy_check(archangel=False)
    assert_close(targets, [[0, 0.9801, 0.99, 1.0], [0, -0.99, -1.0, 0]], 1e-6)
    assert stats['policy'].item() == pytest.approx(0.018414, abs=1e-6)
    assert stats['critic'].item() == pytest.approx(0.248478, abs=1e-6)
    assert stats['KL'].item() == pytest.approx(0.02, abs=1e-6)  # mean(policy - reference): a penalty
    assert loss.item() == pytest.approx(0.022899, abs=1e-6)


def test_archangel_flag_reproduces_halos_406ed27():
    _, _, targets, loss, stats = toy_check(archangel=True)
    assert_close(targets, [[0, 0.99, 1.0, 0], [0, -1.0, 0, 0]], 1e-6)
    assert stats['policy'].item() == pytest.approx(0.018414, abs=1e-6)
    assert stats['critic'].item() == pytest.approx(0.233210, abs=1e-6)
    assert stats['KL'].item() == pytest.approx(-0.02, abs=1e-6)  # mean(reference - policy)
    assert loss.item() == pytest.approx(0.018746, abs=1e-6)


def test_clipped_surrogate_and_clip_fraction():
    """A = [1, -1, 1, -1], ratio = [2, 2, 1/4, 1/4], c = 0.5. Per token max(-A r, -A clip(r)):
    clip to [0.5, 1.5]: -1.5 (clipped), 2, -0.25, 0.5 (clipped) -> mean 0.1875, clip fraction 1/2;
    clip to [0.5, 2] (archangel): -2, 2, -0.25, 0.5 (clipped) -> mean 0.0625, clip fraction 1/4."""
    advantages = torch.tensor([[1.0, -1, 1, -1]])
    old_logps = torch.zeros(1, 4)
    policy_logps = torch.log(torch.tensor([[2.0, 2, 0.25, 0.25]]))
    mask, values = torch.ones(1, 4), torch.zeros(1, 4)
    for archangel, expected_loss, expected_clipfrac in ((False, 0.1875, 0.5), (True, 0.0625, 0.25)):
        loss, stats = ppo_loss(policy_logps, old_logps, advantages, values, values, mask, cliprange=0.5,
                               critic_coef=0.0, KL_coef=0.0, archangel=archangel)
        assert loss.item() == pytest.approx(expected_loss)
        assert stats['clipfrac'].item() == pytest.approx(expected_clipfrac)
        # mean log-ratio = (2 ln 2 - 4 ln 2) / 4 = -ln(2) / 2; archangel's KL term has the opposite sign
        assert stats['KL'].item() == pytest.approx((-1 if archangel else 1) * -math.log(2) / 2)


def test_value_head_gradient_does_not_reach_the_language_model():
    model = models.load_causal_lm('embedded:tiny-smollm2', 'float32', value_head=True)
    input_ids = torch.tensor([[1, 2, 3, 4]])
    hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
    values = model.v_head(hidden)
    assert values.shape == (1, 4) and values.dtype == torch.float32
    values.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.v_head.parameters())
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith('v_head.'))
    assert {k for k in model.state_dict() if k.startswith('v_head.')} == {
        f'v_head.mlp.{i}.{kind}' for i in (0, 3, 6) for kind in ('weight', 'bias')}


def test_ppo_rewards_from_a_reward_model(tmp_path):
    """With loss.reward_model the score of each completion is the model's logit, not +1/-1, on the conversation
    as the reward-model labeller reads it."""
    import transformers
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    trainer = build_trainer(make_config(tmp_path, f'++loss.reward_model={tiny_reward_model(tmp_path / "rm")}',
                                        loss='ppo'))
    batch = trainer.eval_batches[0]
    scores = trainer.scores(LabelledCompletions.of(batch, trainer.tokenizer.pad_token_id))
    reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / 'rm')
    conversations = [turns + [{'role': 'assistant', 'content': text}]  # the chat template reads them, as in label.py
                     for turns, text in zip(batch['prompt_turns'], batch['target_text'])]
    expected = [reward_model(input_ids=torch.tensor([tokenizer.apply_chat_template(conversation, tokenize=True,
                                                                                   return_dict=False)]))
                .logits[0, 0].item() for conversation in conversations]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in expected)) > 1  # real scores, not labels


def test_ppo_on_paired_data_scores_chosen_plus_and_rejected_minus(tmp_path):
    trainer = build_trainer(make_config(tmp_path, '++loss.dataloader=PairedPreferenceDataLoader', loss='ppo'))
    batch = trainer.eval_batches[0]
    completions = LabelledCompletions.of(batch, trainer.tokenizer.pad_token_id)
    labels, scores = completions.sequences.labels, trainer.scores(completions)
    n = len(batch['prompt_text'])
    assert scores.tolist() == [1.0, -1.0] * n  # each pair's chosen, then its rejected
    assert torch.equal(labels[0::2, :batch['chosen_labels'].shape[1]], batch['chosen_labels'])
    assert torch.equal(labels[1::2, :batch['rejected_labels'].shape[1]], batch['rejected_labels'])


def test_ppo_refuses_the_reference_cache(tmp_path):
    with pytest.raises(ValueError, match='per-token reference log-probs: set cache_reference_logprobs=false'):
        build_trainer(make_config(tmp_path, '++cache_reference_logprobs=true', loss='ppo'))


@pytest.mark.slow
def test_ppo_trains_evaluates_checkpoints_and_exports(tmp_path):
    train_in_process(tmp_path, '++n_examples=16', '++eval_every=8', '++lr=1e-3', '++optimizer=AdamW',
                     '++warmup_steps=0', '++loss.ppo_epochs=2', loss='ppo', exp_name='ppo')
    run_dir = tmp_path / 'ppo'
    saved = load_policy_file(run_dir / 'LATEST' / 'policy.pt')
    assert saved['step_idx'] == 16
    assert any(k.startswith('v_head.') for k in saved['state'])
    assert {'loss_eval/total', 'loss_eval/critic', 'clipfrac_eval/policy', 'returns_eval/mean'} <= set(saved['metrics'])
    import json
    lines = [json.loads(line) for line in open(run_dir / 'metrics.jsonl')]
    train_lines = [line for line in lines if 'loss/total' in line]
    assert train_lines[-1]['counters/updates'] == 8  # 4 experiences x ppo_epochs 2
    assert {'loss/policy', 'loss/critic', 'clipfrac/policy', 'loss/entropy', 'loss/policykl', 'loss/seqratio',
            'returns/mean', 'returns/var', 'val/mean', 'val/var', 'grad_norm'} <= set(train_lines[-1])
    assert sum('loss_eval/total' in line for line in lines) == 3  # before training, at 8 and at 16 examples

    # The HF export is the LM alone, equal to policy.pt without the value head.
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(run_dir / 'LATEST' / 'hf')
    lm_state = {k: v for k, v in saved['state'].items() if not k.startswith('v_head.')}
    assert set(exported.state_dict()) == set(lm_state)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, lm_state[name]), name

    # eval.py samples from policy.pt (dropping the value head) and evaluates it (with the value head).
    run_eval = lambda *overrides: eval_in_process(run_dir, f'++samples_dir={tmp_path / "samples"}', *overrides)
    run_eval('++mode=sample', '++n_samples=2', '++model.max_length=80')
    assert len(json.load(open(tmp_path / 'samples' / 'ppo.json'))['samples']) == 2
    output = run_eval('++mode=eval')
    metrics = json.loads(output[output.index('{\n'):])
    assert metrics['loss_eval/total'] == pytest.approx(saved['metrics']['loss_eval/total'], abs=1e-5)
