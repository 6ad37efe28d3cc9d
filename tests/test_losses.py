"""Each loss on fixed inputs against values worked out by hand from its formula.

Inputs (spec §4.12): summed log-probs of 4 pairs
    pc = [-10, -12, -8, -15]   (policy, chosen)      pr = [-11, -9, -14, -13]  (policy, rejected)
    rc = [-10.5, -11, -9, -14] (reference, chosen)   rr = [-10, -10, -13, -14.5]
so the chosen log-ratios are r_c = [0.5, -1, 1, -1], the rejected r_u = [-1, 1, -1, 1.5],
and h = r_c - r_u = [1.5, -2, 2, -2.5]. beta = 0.1.
"""
import math
import types

import pytest
import torch

import trainers

pc = torch.tensor([-10., -12., -8., -15.])
pr = torch.tensor([-11., -9., -14., -13.])
rc = torch.tensor([-10.5, -11., -9., -14.])
rr = torch.tensor([-10., -10., -13., -14.5])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def approx(values, expected, tol=1e-6):
    return torch.allclose(values, torch.tensor(expected, dtype=values.dtype), atol=tol)


def trainer_with(cls, **loss_config):
    """A trainer object with only a config, enough to call its loss()."""
    trainer = cls.__new__(cls)
    trainer.config = types.SimpleNamespace(loss=types.SimpleNamespace(**loss_config))
    return trainer


def test_sft_is_the_summed_nll():
    losses = trainers.SFTTrainer.loss(None, pc)
    assert approx(losses, [10., 12., 8., 15.]) and losses.mean().item() == pytest.approx(11.25)


def test_dpo_values_and_rewards():
    # -log sigmoid(0.1 * 1.5) = log(1 + e^-0.15) = 0.620957
    losses, chosen_rewards, rejected_rewards = trainer_with(trainers.DPOTrainer, beta=0.1).loss(pc, pr, rc, rr)
    assert approx(losses, [0.620957, 0.798139, 0.598139, 0.825939])
    assert losses.mean().item() == pytest.approx(0.710794, abs=1e-6)
    assert approx(chosen_rewards, [0.05, -0.1, 0.1, -0.1]) and approx(rejected_rewards, [-0.1, 0.1, -0.1, 0.15])


def test_dpo_gradient_matches_the_derivative():
    # dL/dpc_i = -beta * sigmoid(-beta h_i); dL/dpr_i = +beta * sigmoid(-beta h_i)
    policy_chosen = pc.clone().requires_grad_()
    policy_rejected = pr.clone().requires_grad_()
    losses, _, _ = trainer_with(trainers.DPOTrainer, beta=0.1).loss(policy_chosen, policy_rejected, rc, rr)
    losses.sum().backward()
    expected = [-0.1 * sigmoid(-0.1 * h) for h in (1.5, -2., 2., -2.5)]
    assert approx(policy_chosen.grad, expected) and approx(policy_rejected.grad, [-g for g in expected])


def test_cdpo_mixes_both_directions():
    # 0.8 * -log sigmoid(0.15) + 0.2 * -log sigmoid(-0.15) = 0.8 * 0.620957 + 0.2 * 0.770957 = 0.650957
    losses, _, _ = trainer_with(trainers.CDPOTrainer, beta=0.1, epsilon=0.2).loss(pc, pr, rc, rr)
    assert approx(losses, [0.650957, 0.758139, 0.638139, 0.775939])
    assert losses.mean().item() == pytest.approx(0.705794, abs=1e-6)


def test_ipo_on_sums():
    # (1.5 - 1 / (2 * 0.1))^2 = (1.5 - 5)^2 = 12.25
    losses, _, _ = trainer_with(trainers.IPOTrainer, beta=0.1).loss(pc, pr, rc, rr)
    assert approx(losses, [12.25, 49., 9., 56.25]) and losses.mean().item() == pytest.approx(31.625)


@pytest.mark.parametrize('delta,expected,mean', [(1.0, [1.0, 5.2, 0.8, 4.5], 2.875), (0.1, [1.0, 4.3, 0.8, 3.6], 2.425)])
def test_slic_hinge_plus_nll(delta, expected, mean):
    # pair 0: max(0, 1 + 10 - 11) + 0.1 * 10 = 0 + 1.0;  pair 1: max(0, 1 + 12 - 9) + 1.2 = 5.2
    losses, chosen_rewards, _ = trainer_with(trainers.SLiCTrainer, beta=delta, lambda_coef=0.1).loss(pc, pr)
    assert approx(losses, expected, 1e-5) and losses.mean().item() == pytest.approx(mean)
    assert approx(chosen_rewards, pc.tolist())


def test_kto_with_reference_point():
    # KL rows: policy [-11, -13, -9.5, -14], reference [-11.5, -12, -10, -14.5]: differences
    # [0.5, -1, 0.5, 0.5], mean 0.125 = z0. Desirable: 1 - sigmoid(0.1 (0.5 - 0.125)) = 0.490626.
    policy_kl = torch.tensor([-11., -13., -9.5, -14.])
    reference_kl = torch.tensor([-11.5, -12., -10., -14.5])
    trainer = trainer_with(trainers.KTOTrainer, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    losses, chosen_rewards, rejected_rewards, kl = trainer.loss(pc, pr, policy_kl, rc, rr, reference_kl)
    assert kl.item() == pytest.approx(0.125)
    assert approx(losses, [0.490626, 0.528095, 0.478139, 0.528095, 0.471905, 0.521861, 0.471905, 0.534321])
    assert losses.mean().item() == pytest.approx(0.503118, abs=1e-6)
    weighted = trainer_with(trainers.KTOTrainer, beta=0.1, desirable_weight=1.33, undesirable_weight=1.0)
    losses, *_ = weighted.loss(pc, pr, policy_kl, rc, rr, reference_kl)
    assert approx(losses[:4], [0.652533, 0.702367, 0.635925, 0.702367])
    assert losses.mean().item() == pytest.approx(0.586648, abs=1e-6)


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    # KL differences [-1, -1, -0.5, 0]: mean -0.625 -> z0 = 0, so KTO equals KTO-zero.
    policy_kl = torch.tensor([-12., -13., -10.5, -14.5], requires_grad=True)
    reference_kl = torch.tensor([-11., -12., -10., -14.5])
    policy_chosen = pc.clone().requires_grad_()
    trainer = trainer_with(trainers.KTOTrainer, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    losses, _, _, kl = trainer.loss(policy_chosen, pr, policy_kl, rc, rr, reference_kl)
    assert kl.item() == 0.0
    zero_losses, _, _ = trainer_with(trainers.KTOZeroTrainer, beta=0.1).loss(pc, pr, rc, rr)
    assert approx(losses.detach(), zero_losses.tolist())
    losses.sum().backward()
    assert policy_kl.grad is None
    # d/dpc [1 - sigmoid(0.1 r)] = -0.1 sigmoid(0.1 r) (1 - sigmoid(0.1 r))
    expected = [-0.1 * sigmoid(0.1 * r) * (1 - sigmoid(0.1 * r)) for r in (0.5, -1., 1., -1.)]
    assert approx(policy_chosen.grad, expected)


def test_kto_zero():
    losses, _, _ = trainer_with(trainers.KTOZeroTrainer, beta=0.1).loss(pc, pr, rc, rr)
    assert approx(losses, [0.487503, 0.524979, 0.475021, 0.524979, 0.475021, 0.524979, 0.475021, 0.537430])
    assert losses.mean().item() == pytest.approx(0.503117, abs=1e-6)


def test_simple_kto_takes_each_reference_point_from_the_other_half():
    # KL_c = max(0, mean r_c = -0.125) = 0; KL_u = max(0, mean r_u = 0.125) = 0.125
    policy_chosen = pc.clone().requires_grad_()
    losses, _, _ = trainer_with(trainers.SimpleKTOTrainer, beta=0.1).loss(policy_chosen, pr, rc, rr)
    assert approx(losses.detach(), [0.490626, 0.528095, 0.478139, 0.528095, 0.475021, 0.524979, 0.475021, 0.537430])
    assert losses.mean().item() == pytest.approx(0.504676, abs=1e-6)
    # KL_u is not detached, but it depends on the rejected half only; KL_c is clamped to 0 here,
    # so the chosen gradient is the direct term: -0.1 s (1 - s), s = sigmoid(0.1 (r_c - 0.125)).
    losses.sum().backward()
    expected = [-0.1 * sigmoid(0.1 * (r - 0.125)) * (1 - sigmoid(0.1 * (r - 0.125))) for r in (0.5, -1., 1., -1.)]
    assert approx(policy_chosen.grad, expected)


def test_get_batch_logps_masks_prompt_and_padding():
    # Vocabulary of 3, uniform logits except where set: log p = logit - logsumexp.
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = math.log(2.0)       # position 1 predicts token 2 with p = 2/4
    logits[0, 2, 0] = math.log(3.0)       # position 2 predicts token 0 with p = 3/5
    labels = torch.tensor([[-100, -100, 2, 0]])   # the prompt is 2 tokens; completion tokens at 2 and 3
    import utils
    logps = utils.get_batch_logps(logits, labels)
    assert logps.item() == pytest.approx(math.log(0.5) + math.log(0.6), abs=1e-6)
    padded = torch.tensor([[-100, -100, 2, -100]])
    assert utils.get_batch_logps(logits, padded).item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert utils.get_batch_logps(logits, labels, average_log_prob=True).item() == \
        pytest.approx((math.log(0.5) + math.log(0.6)) / 2, abs=1e-6)
