"""Three conventions where halos (like HALOs 406ed27) and HALOs main (4831988) compute a loss differently, each
on small hand-made inputs: halos' own loss functions against a transcription of HALOs main's formula, both
checked against numbers worked out by hand. docs/differences.md quotes these numbers.

HALOs main's trainers get token-level log-probs [batch, T-1] (0 on the prompt and on padding) and count a
sequence's tokens as the positions where a value is not exactly 0; halos' `loss()` gets the summed log-probs of
each completion.
"""
import math

import pytest
import torch

import trainers
from utils import weighted_mean


def halos_trainer(trainer_class, **params):
    trainer = trainer_class.__new__(trainer_class)  # the loss needs only its Params, not a model
    trainer.params = trainer_class.Params(**params)
    return trainer


# ---------------------------------------------------------------- SFT

def halos_main_sft(token_logps: torch.Tensor) -> torch.Tensor:
    """HALOs main SFTTrainer.get_batch_metrics: -logps / token_mask.sum(), summed: the token mean of the NLL over
    the microbatch."""
    token_mask = (token_logps != 0).float()
    return (-token_logps / token_mask.sum()).sum()


def test_sft_averages_each_examples_summed_nll_where_halos_main_averages_tokens():
    # example A: 2 completion tokens (NLL 1 + 3 = 4); example B: 6 tokens of NLL 0.5 (= 3); zeros are padding
    token_logps = torch.tensor([[-1.0, -3.0, 0.0, 0.0, 0.0, 0.0], [-0.5] * 6], dtype=torch.float64)
    halos = weighted_mean(trainers.sft_loss(token_logps.sum(-1)), torch.ones(2, dtype=torch.float64))  # SFTTrainer
    assert halos.item() == pytest.approx(3.5)                       # (4 + 3) / 2 examples
    assert halos_main_sft(token_logps).item() == pytest.approx(0.875)  # (4 + 3) / 8 tokens
    # so each token's gradient weight is 1 / examples in halos (0.5) and 1 / tokens in HALOs main (0.125)
    logps = token_logps.clone().requires_grad_()
    weighted_mean(trainers.sft_loss(logps.sum(-1)), torch.ones(2, dtype=torch.float64)).backward()
    assert logps.grad[0, 0].item() == pytest.approx(-0.5) and logps.grad[0, 2].item() == pytest.approx(-0.5)
    logps.grad = None
    halos_main_sft(logps).backward()
    assert logps.grad[0, 0].item() == pytest.approx(-0.125)


# ---------------------------------------------------------------- IPO

def halos_main_ipo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, tau: float) -> torch.Tensor:
    """HALOs main IPOTrainer.loss: each side's token log-ratios summed and divided by the number of tokens whose
    log-ratio is not 0 (get_sequence_rewards with length_normalized=True), tau = loss.tau."""
    def reward(policy, reference):
        token_rewards = policy - reference
        return token_rewards.sum(-1) / (token_rewards.abs() != 0).float().sum(-1)
    return (reward(policy_chosen, reference_chosen) - reward(policy_rejected, reference_rejected) - 1 / (2 * tau)) ** 2


def rows(*values):
    return torch.tensor([values], dtype=torch.float64)


# (policy, reference) token log-probs of one chosen and one rejected completion; 0 is padding
CHOSEN = rows(-1.0, -2.0, -0.5), rows(-1.5, -2.0, -1.0)
REJECTED = rows(-2.0, -1.0, 0.0), rows(-1.0, -1.0, 0.0)


def test_ipo_sums_log_ratios_with_tau_beta_where_halos_main_averages_over_tokens_that_moved():
    (policy_chosen, reference_chosen), (policy_rejected, reference_rejected) = CHOSEN, REJECTED
    ipo = halos_trainer(trainers.IPOTrainer, beta=0.1)  # tau = loss.beta = 0.1: the target margin 1 / (2 tau) = 5
    losses, _, _ = ipo.loss(policy_chosen.sum(-1), policy_rejected.sum(-1), reference_chosen.sum(-1),
                            reference_rejected.sum(-1))
    # chosen log-ratios [0.5, 0, 0.5] sum to 1; rejected [-1, 0] to -1: h = 2, (2 - 5)^2 = 9
    assert losses.item() == pytest.approx(9.0)
    # HALOs main: chosen 1 / 2 (the middle token's ratio is 0, so it is not counted: not 1 / 3), rejected -1 / 1;
    # h = 1.5, (1.5 - 5)^2 = 12.25
    main = halos_main_ipo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, tau=0.1)
    assert main.item() == pytest.approx(12.25)


def test_ipo_is_finite_when_the_policy_equals_the_reference_where_halos_main_gives_nan():
    (policy_chosen, _), (policy_rejected, _) = CHOSEN, REJECTED
    ipo = halos_trainer(trainers.IPOTrainer, beta=0.1)
    losses, _, _ = ipo.loss(policy_chosen.sum(-1), policy_rejected.sum(-1), policy_chosen.sum(-1),
                            policy_rejected.sum(-1))
    assert losses.item() == pytest.approx(25.0)  # h = 0: (0 - 5)^2, the first step of every run
    main = halos_main_ipo(policy_chosen, policy_rejected, policy_chosen, policy_rejected, tau=0.1)
    assert math.isnan(main.item())  # 0 / 0 tokens that moved


# ---------------------------------------------------------------- KTO's reference point z0

def halos_main_kto_reference_point(policy_KL_logps, reference_KL_logps) -> torch.Tensor:
    """HALOs main KTOTrainer.loss (one process): the KL rows' log-ratios summed, divided by the number of rows
    whose log-ratio is not 0 (the sum and the count are each summed over ranks), clamped at 0."""
    KL_rewards = policy_KL_logps - reference_KL_logps
    return (KL_rewards.sum() / (KL_rewards.abs() != 0).float().sum().clamp(min=1)).clamp(min=0)


def test_kto_reference_point_is_the_mean_of_all_kl_rows_where_halos_main_skips_rows_of_log_ratio_zero():
    policy_KL = torch.tensor([-1.4, -2.0, -0.7, -1.5], dtype=torch.float64)
    reference_KL = torch.tensor([-2.0, -2.0, -1.0, -1.5], dtype=torch.float64)  # log-ratios [0.6, 0, 0.3, 0]
    kto = halos_trainer(trainers.KTOTrainer, beta=0.1)
    z0 = kto.reference_point(policy_KL, reference_KL)
    assert z0.item() == pytest.approx(0.225)  # 0.9 / 4 rows
    main_z0 = halos_main_kto_reference_point(policy_KL, reference_KL)
    assert main_z0.item() == pytest.approx(0.45)  # 0.9 / 2 rows
    # the same desirable and undesirable examples (log-ratios 0.5 and -1) on either reference point, beta 0.1
    policy_chosen, reference_chosen = (torch.tensor([-10.0], dtype=torch.float64),
                                       torch.tensor([-10.5], dtype=torch.float64))
    policy_rejected, reference_rejected = (torch.tensor([-11.0], dtype=torch.float64),
                                           torch.tensor([-10.0], dtype=torch.float64))
    losses, _, _, _ = kto.loss(policy_chosen, policy_rejected, policy_KL, reference_chosen, reference_rejected,
                               reference_KL)
    # 1 - sigmoid(0.1 (0.5 - 0.225)) and 1 - sigmoid(0.1 (0.225 + 1))
    assert losses.tolist() == pytest.approx([0.493125, 0.469413], abs=1e-6)
    # HALOs main's desirable and undesirable losses, lambda_D = lambda_U = 1, with its z0 = 0.45
    main = torch.stack((1 - torch.sigmoid(0.1 * (0.5 - main_z0)), 1 - torch.sigmoid(0.1 * (main_z0 + 1.0))))
    assert main.tolist() == pytest.approx([0.498750, 0.463813], abs=1e-6)


def test_the_conventions_agree_when_no_log_ratio_is_exactly_zero():
    """Outside those cases the two KTO reference points are the same number (what the reference table of the
    spec checks: KL log-ratios [0.5, -1, 0.5, 0.5] give z0 = 0.125 both ways)."""
    policy_KL = torch.tensor([-11.0, -13.0, -9.5, -14.0], dtype=torch.float64)
    reference_KL = torch.tensor([-11.5, -12.0, -10.0, -14.5], dtype=torch.float64)
    kto = halos_trainer(trainers.KTOTrainer, beta=0.1)
    assert kto.reference_point(policy_KL, reference_KL).item() == pytest.approx(0.125)
    assert halos_main_kto_reference_point(policy_KL, reference_KL).item() == pytest.approx(0.125)
