"""Each loss on fixed inputs against values worked out by hand from its formula.

Inputs (spec §4.12): summed log-probs of 4 pairs
    pc = [-10, -12, -8, -15]   (policy, chosen)      pr = [-11, -9, -14, -13]  (policy, rejected)
    rc = [-10.5, -11, -9, -14] (reference, chosen)   rr = [-10, -10, -13, -14.5]
so the chosen log-ratios are r_c = [0.5, -1, 1, -1], the rejected r_u = [-1, 1, -1, 1.5],
and h = r_c - r_u = [1.5, -2, 2, -2.5]. beta = 0.1.
"""
import math

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


def trainer_with(cls, **params):
    """A trainer object with only its Params, enough to call its loss()."""
    trainer = cls.__new__(cls)
    trainer.params = cls.Params(**params)
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


# Per-token mean log-probs for the length-normalised losses (SimPO, ORPO).
mc = torch.tensor([-1.0, -1.5, -0.8, -2.0])
mr = torch.tensor([-1.2, -1.1, -1.4, -1.9])


def test_simpo_values_and_gradient():
    # margins r_w - r_l - 0.3 = [-0.1, -0.7, 0.3, -0.4]; L = log(1 + e^{-10 m}): log(1 + e) = 1.313262, ...
    chosen = mc.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = trainer_with(trainers.SimPOTrainer, beta=10.0,
                                                            gamma_beta_ratio=0.3).loss(chosen, mr)
    assert approx(losses.detach(), [1.313262, 7.000911, 0.048587, 4.018150])
    assert approx(chosen_rewards, mc.tolist()) and approx(rejected_rewards, mr.tolist())  # r, without beta (HALOs)
    losses.sum().backward()
    # dL/dr_w = -beta sigmoid(-beta m)
    assert approx(chosen.grad, [-10 * sigmoid(-10 * m) for m in (-0.1, -0.7, 0.3, -0.4)], 1e-5)


def test_orpo_values_and_gradient():
    # odds(l) = l - log(1 - e^l): odds(-1) = -1 + 0.458675 = -0.541325; L = -l_w + 0.25 (-log sigmoid(odds_w - odds_l))
    chosen = mc.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = trainer_with(trainers.ORPOTrainer, lambda_coef=0.25).loss(chosen, mr)
    assert approx(losses.detach(), [1.138558, 1.751736, 0.884320, 2.188286])
    assert losses.mean().item() == pytest.approx(1.490725, abs=1e-6)
    assert approx(chosen_rewards, [-0.541325, -1.247518, -0.203382, -1.854587])
    assert approx(rejected_rewards, [-0.841618, -0.695228, -1.116845, -1.737988])
    losses.sum().backward()
    # d odds / dl = 1 + e^l / (1 - e^l) = 1 / (1 - e^l); dL/dl_w = -1 - 0.25 sigmoid(-(odds_w - odds_l)) / (1 - e^l_w)
    odds = lambda l: l - math.log(1 - math.exp(l))
    expected = [-1 - 0.25 * sigmoid(-(odds(w) - odds(l))) / (1 - math.exp(w)) for w, l in zip(mc.tolist(), mr.tolist())]
    assert approx(chosen.grad, expected, 1e-5)


def test_log1mexp_is_stable_near_zero_and_far_below():
    from halos.losses import log1mexp
    x = torch.tensor([-0.5, -0.7, -3.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-12)
    assert log1mexp(torch.tensor([-1e-7])).item() == pytest.approx(math.log(1e-7), rel=1e-4)
    assert log1mexp(torch.tensor([-50.0])).item() == pytest.approx(-math.exp(-50), rel=1e-3)


def test_bradley_terry_loss_and_strict_accuracy():
    # L = log(1 + e^{-(s_w - s_l)}): differences [1, -1, 0] -> 0.313262, 1.313262, log 2; a tie is not correct
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0], requires_grad=True), torch.tensor([0.0, 1.0, 2.0])
    losses, chosen_rewards, rejected_rewards = trainer_with(trainers.BradleyTerryTrainer, margin=0.0).loss(chosen, rejected)
    assert approx(losses.detach(), [0.313262, 1.313262, 0.693147])
    assert (chosen_rewards > rejected_rewards).tolist() == [True, False, False]
    losses.sum().backward()
    assert approx(chosen.grad, [-sigmoid(-1.0), -sigmoid(1.0), -0.5])
    with_margin, _, _ = trainer_with(trainers.BradleyTerryTrainer, margin=0.5).loss(chosen.detach(), rejected)
    assert approx(with_margin, [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.5)), math.log(1 + math.exp(0.5))])


def test_group_advantages_by_hand():
    """Group a = [1, 2, 3]: mean 2, population std sqrt(2/3) = 0.816497, so A = -+1 / 0.826497 = -+1.209927;
    with the unbiased std (1): -+1 / 1.01 = -+0.990099. Group b has equal scores and c one: A = 0."""
    scores = torch.tensor([1.0, 5.0, 2.0, 5.0, 3.0, 7.0])
    groups = ['a', 'b', 'a', 'b', 'a', 'c']
    population = trainers.group_advantages(scores, groups, eps=0.01)
    assert approx(population, [-1.209927, 0, 0, 0, 1.209927, 0])
    unbiased = trainers.group_advantages(scores, groups, eps=0.01, unbiased=True)
    assert approx(unbiased, [-0.990099, 0, 0, 0, 0.990099, 0])


def test_grpo_token_losses_clip_both_ways_and_add_the_k3_kl():
    """rho = [1.5, 0.5], clip to [0.8, 1.2]. A = +1: -min(rho, clip) = [-1.2, -0.5]; A = -1: [1.5, 0.8].
    KL3 of log pi_ref - log pi = [-0.1, 0.2]: e^-0.1 + 0.1 - 1 = 0.004837, e^0.2 - 0.2 - 1 = 0.021403."""
    log_ratios = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    reference_log_ratios = torch.tensor([[-0.1, 0.2], [-0.1, 0.2]])
    losses, stats = trainers.grpo_token_losses(log_ratios, reference_log_ratios, torch.tensor([1.0, -1.0]),
                                               epsilon=0.2, epsilon_high=0.2, beta=0.1)
    assert approx(stats['KL'], [[0.004837, 0.021403]] * 2)
    assert approx(losses, [[-1.2 + 0.0004837, -0.5 + 0.0021403], [1.5 + 0.0004837, 0.8 + 0.0021403]])
    assert stats['clipped'].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    asymmetric, _ = trainers.grpo_token_losses(log_ratios, reference_log_ratios, torch.tensor([1.0, -1.0]),
                                               epsilon=0.2, epsilon_high=0.28, beta=0.0)
    assert approx(asymmetric, [[-1.28, -0.5], [1.5, 0.8]])


@pytest.mark.parametrize('loss_type, expected', [('halos', 6 / 3), ('grpo', (1.5 + 3) / 2), ('dr_grpo', 6 / (2 * 4)),
                                                 ('dapo', 6 / 6)])
def test_grpo_reductions(loss_type, expected):
    """Token losses [[1, 2, .], [3, ., .]]: halos = token mean (3 tokens); grpo = mean of the sequence means
    (1.5, 3); dr_grpo = sum / (2 sequences x 4); dapo = sum / the step's 6 tokens."""
    token_losses = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    n_tokens = 6.0 if loss_type == 'dapo' else 3.0
    assert trainers.grpo_loss(token_losses, mask, loss_type, n_tokens, 2.0, 4).item() == pytest.approx(expected)


@pytest.mark.parametrize('loss_type', ['halos', 'grpo', 'dr_grpo', 'dapo'])
def test_grpo_reductions_of_rows_that_all_weigh_zero_are_zero_not_nan(loss_type):
    token_losses = torch.tensor([[1.0, 2.0], [3.0, 9.0]], requires_grad=True)
    loss = trainers.grpo_loss(token_losses, torch.ones(2, 2), loss_type, 0.0, 0.0, 4, weights=torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and token_losses.grad.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_humanline_clamps_each_token_log_ratio_and_stops_its_gradient_outside_the_band():
    # log-ratios [1, -2, -0.1] clamped to [-1, 1.5]: [1, -1, -0.1]; two tokens inside the band
    policy = torch.tensor([[-1.0, -3.0, -0.5]], requires_grad=True)
    reference = torch.tensor([[-2.0, -1.0, -0.4]])
    clamped, inside = trainers.humanline_logratios(policy, reference, torch.ones(1, 3), -1.0, 1.5)
    assert approx(clamped.detach(), [[1.0, -1.0, -0.1]]) and inside.tolist() == [2]
    clamped.sum().backward()
    assert policy.grad.tolist() == [[1.0, 0.0, 1.0]]


def group_advantages_on_rank(rank, port, scores, groups, results):
    import os
    import torch.distributed as dist
    from halos import rl
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    half = len(scores) // 2 + rank  # unequal parts: 4 rows on rank 0, 5 on rank 1
    start, end = (0, half) if rank == 0 else (len(scores) // 2, len(scores))
    advantages, degenerate = rl.group_advantages_across_ranks(torch.tensor(scores[start:end]), groups[start:end],
                                                              eps=0.01, unbiased=False)
    results[rank] = (advantages.tolist(), degenerate.tolist())
    dist.destroy_process_group()


def test_group_statistics_across_two_ranks_equal_one_process_on_the_whole_batch():
    import torch.multiprocessing as mp
    from halos import rl
    from utils import free_port
    scores = [1.0, 4.0, 2.0, 0.5, 3.0, 4.0, 7.0, 0.5, 9.0]
    groups = ['a', 'b', 'a', 'c', 'a', 'b', 'b', 'c', 'd']  # groups a and b span both ranks
    results = mp.Manager().dict()
    mp.spawn(group_advantages_on_rank, args=(free_port(), scores, groups, results), nprocs=2, join=True)
    whole, whole_degenerate = rl.group_advantages_across_ranks(torch.tensor(scores), groups, eps=0.01, unbiased=False)
    assert results[0][0] + results[1][0] == pytest.approx(whole.tolist(), abs=1e-6)
    assert results[0][1] + results[1][1] == whole_degenerate.tolist() == [False] * 3 + [True] + [False] * 3 + [True] * 2
    assert whole[3] == whole[8] == 0  # group c has equal scores, d one completion
