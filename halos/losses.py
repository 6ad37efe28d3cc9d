"""Every loss and advantage function of halos, pure: tensors in, tensors out, hyperparameters as arguments.

Sequence-level losses take summed (or, where the docstring says, per-token mean) completion log-probs of
shape [batch] and return per-example losses plus detached rewards for logging. Token-level functions take
[batch, T-1] tensors where position t holds the prediction of token t+1 and `mask` is 1 on completion tokens.
trainers.py re-exports them all, so `from trainers import dpo_loss` keeps working.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from utils import all_reduce_sum


# ---------------------------------------------------------------- loss functions
# Inputs are summed completion log-probs, shape [batch]. Rewards are detached, for logging.

def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """L_i = -log pi(y_i | x_i), the summed NLL of the target completion."""
    return -policy_logps


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7), with conservative label smoothing epsilon:

        h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
        L = -(1 - epsilon) log sigmoid(beta h) - epsilon log sigmoid(-beta h)
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             tau: float):
    """IPO (Azar et al. 2023, eq. 17) on summed log-probs: L = (h - 1 / (2 tau))^2, h as in DPO."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * tau)) ** 2
    return losses, tau * chosen_logratios.detach(), tau * rejected_logratios.detach()


def slic_loss(policy_chosen_logps, policy_rejected_logps, delta: float, lambda_coef: float):
    """SLiC-HF (Zhao et al. 2023): L = max(0, delta - log pi(y_w) + log pi(y_l)) - lambda log pi(y_w).

    Rewards are the raw summed log-probs (there is no reference model).
    """
    losses = torch.clamp(delta - policy_chosen_logps + policy_rejected_logps, min=0) \
        - lambda_coef * policy_chosen_logps
    return losses, policy_chosen_logps.detach(), policy_rejected_logps.detach()


def kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             reference_point, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024), with r = log pi(y|x) - log pi_ref(y|x) and reference point z0:

        desirable:   L = lambda_D (1 - sigmoid(beta (r - z0)))
        undesirable: L = lambda_U (1 - sigmoid(beta (z0 - r)))

    Returns the desirable losses followed by the undesirable ones.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (chosen_logratios - reference_point)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - rejected_logratios)))
    return (torch.cat((chosen_losses, rejected_losses)), beta * chosen_logratios.detach(),
            beta * rejected_logratios.detach())


def simple_kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta: float):
    """The first KTO of HALOs: each half's reference point is the other half's mean log-ratio.

        KL_c = max(0, mean r_c),  KL_u = max(0, mean r_u)      (not detached)
        desirable:   L = 1 - sigmoid(beta (r_c - KL_u))
        undesirable: L = 1 - sigmoid(beta (KL_c - r_u))
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    chosen_kl = chosen_logratios.mean().clamp(min=0)
    rejected_kl = rejected_logratios.mean().clamp(min=0)
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - rejected_kl))
    rejected_losses = 1 - torch.sigmoid(beta * (chosen_kl - rejected_logratios))
    return (torch.cat((chosen_losses, rejected_losses)), beta * chosen_logratios.detach(),
            beta * rejected_logratios.detach())


# ---------------------------------------------------------------- offline PPO
# Token-level tensors are [batch, T-1]: position t holds the prediction of token t+1, `mask` is 1 on
# completion tokens.

def generalized_advantages(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float, target_includes_reward: bool = True) -> Tuple[torch.Tensor, ...]:
    """GAE (Schulman et al. 2016) backwards over the tokens, with V = 0 after the last one:

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1}
        value target G_t = r_t + gamma G_{t+1}            (target_includes_reward, as in later HALOs)
                  or G_t = r_{t+1} + gamma G_{t+1}        (the rewards strictly after t, HALOs 406ed27)

    Returns (advantages, returns = A + V, value targets), all masked.
    """
    values, rewards = values * mask, rewards * mask
    advantages, targets = torch.zeros_like(values), torch.zeros_like(values)
    gae = future_return = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(gae)
        gae = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * gae
        advantages[:, t] = gae
        if target_includes_reward:
            future_return = rewards[:, t] + gamma * future_return
            targets[:, t] = future_return
        else:
            targets[:, t] = future_return
            future_return = rewards[:, t] + gamma * future_return
    advantages = advantages * mask
    return advantages, advantages + values, targets * mask


def whiten_advantages(advantages: List[torch.Tensor], masks: List[torch.Tensor]) -> List[torch.Tensor]:
    """A_hat = (A - mean) / sqrt(var + 1e-8), with the mean and (population) variance over the completion
    tokens of every given microbatch on every rank."""
    sums = torch.stack([sum((a * m).sum() for a, m in zip(advantages, masks)),
                        sum((a ** 2 * m).sum() for a, m in zip(advantages, masks)),
                        sum(m.sum() for m in masks)]).double()
    total, total_of_squares, count = all_reduce_sum(sums).tolist()
    mean = total / count
    std = (total_of_squares / count - mean ** 2 + 1e-8) ** 0.5
    return [((a - mean) / std * m).detach() for a, m in zip(advantages, masks)]


def ppo_loss(policy_logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             value_targets: torch.Tensor, mask: torch.Tensor, cliprange: float, critic_coef: float, KL_coef: float,
             archangel: bool = False, n_tokens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict]:
    """The clipped surrogate with a critic and a KL term, as token means over the completion tokens:

        ratio = exp(log pi - log pi_old),  pi_old = the reference model (offline data)
        L_policy = mean(max(-A ratio, -A clip(ratio, 1 - c, 1 + c)))
        L_critic = 0.5 mean((V - G)^2)
        L_KL     = mean(log pi - log pi_old)                       (a penalty on drifting from pi_old)
        L = L_policy + critic_coef L_critic + KL_coef L_KL

    archangel=True reproduces HALOs 406ed27 (the Archangel models): clip(ratio, c, 1/c) and
    L_KL = mean(log pi_old - log pi). `n_tokens` overrides the token count of the means (for a global mean).
    Returns (loss, {policy, critic, KL, clipfrac} as detached scalars).
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    mean = lambda x: (x * mask).sum() / n_tokens
    log_ratio = policy_logps - old_logps
    ratio = torch.exp(log_ratio)
    low, high = (cliprange, 1 / cliprange) if archangel else (1 - cliprange, 1 + cliprange)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, low, high)
    policy_loss = mean(torch.max(unclipped, clipped))
    critic_loss = 0.5 * mean((values - value_targets) ** 2)
    KL_term = mean(-log_ratio if archangel else log_ratio)
    loss = policy_loss + critic_coef * critic_loss + KL_coef * KL_term
    stats = {'policy': policy_loss, 'critic': critic_loss, 'KL': KL_term, 'clipfrac': mean((clipped > unclipped).float())}
    return loss, {name: value.detach() for name, value in stats.items()}


def kl_penalised_rewards(score_rewards: torch.Tensor, old_logps: torch.Tensor, reference_logps: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Online PPO's per-token reward (Ziegler et al. 2019; TRL's classic PPOTrainer), all [rows, T]:

        KL_t = log pi_old(y_t) - log pi_ref(y_t)
        r_t  = -kl_coef KL_t + s_t      (s_t: the sequence's score on its last completion token, else 0)

    Returns (rewards, KL_t), both masked."""
    kl = (old_logps - reference_logps) * mask
    return (score_rewards - kl_coef * kl) * mask, kl


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_rows: int) -> float:
    """The adaptive KL controller (Ziegler et al. 2019): with KL the mean over the step's sequences of their
    summed KL_t and n the step's sequence count (every rank),

        kl_coef <- kl_coef (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_rows / horizon)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z per position: [B, T, V] -> [B, T]."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, beta: float, gamma_beta_ratio: float):
    """SimPO (Meng et al. 2024), reference-free, on per-token mean log-probs r(y) = log pi(y|x) / |y|:

        L = -log sigmoid(beta (r(y_w) - r(y_l) - gamma / beta))

    with gamma / beta = gamma_beta_ratio (HALOs-2025: beta 10, ratio 0.3). Rewards are r(y), as in HALOs.
    """
    margins = policy_chosen_logps - policy_rejected_logps - gamma_beta_ratio
    losses = -F.logsigmoid(beta * margins)
    return losses, policy_chosen_logps.detach(), policy_rejected_logps.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, computed stably on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, lambda_coef: float):
    """ORPO (Hong et al. 2024), reference-free, on per-token mean log-probs l(y) = log pi(y|x) / |y|:

        odds(y) = l(y) - log(1 - e^{l(y)})          (the log-odds of the mean token probability)
        L = -l(y_w) + lambda (-log sigmoid(odds(y_w) - odds(y_l)))

    Rewards are the log-odds (HALOs' legacy branch: lambda = OR_scale = 0.25).
    """
    chosen_odds = policy_chosen_logps - log1mexp(policy_chosen_logps)
    rejected_odds = policy_rejected_logps - log1mexp(policy_rejected_logps)
    losses = -policy_chosen_logps - lambda_coef * F.logsigmoid(chosen_odds - rejected_odds)
    return losses, chosen_odds.detach(), rejected_odds.detach()


def bradley_terry_loss(chosen_scores, rejected_scores, margin: float = 0.0):
    """The Bradley-Terry reward-model loss on the scores s of a sequence-classification head:

        L = -log sigmoid(s(y_w) - s(y_l) - margin)
    """
    losses = -F.logsigmoid(chosen_scores - rejected_scores - margin)
    return losses, chosen_scores.detach(), rejected_scores.detach()


# ---------------------------------------------------------------- GRPO

def groups_of(group_ids: List) -> List[List[int]]:
    """The indices of each group, in order of first appearance."""
    members: Dict = {}
    for index, group in enumerate(group_ids):
        members.setdefault(group, []).append(index)
    return list(members.values())


def group_advantages(scores: torch.Tensor, group_ids: List, eps: float = 0.01, unbiased: bool = False,
                     scale: bool = True) -> torch.Tensor:
    """GRPO's advantage of each completion within its group g (the completions of one prompt):

        A_i = (s_i - mean_g s) / (std_g s + eps)          (scale=False, Dr. GRPO: A_i = s_i - mean_g s)

    with the population std (HALOs-2025) or the unbiased one (TRL). A group of one, or whose scores are all
    equal, gets A = 0. scores: [N]; group_ids: N hashable ids.
    """
    advantages = torch.zeros_like(scores, dtype=torch.float64)
    for indices in groups_of(group_ids):
        group_scores = scores[indices].double()
        if len(indices) < 2 or bool((group_scores == group_scores[0]).all()):
            continue
        centred = group_scores - group_scores.mean()
        advantages[indices] = centred / (group_scores.std(unbiased=unbiased) + eps) if scale else centred
    return advantages.to(scores.dtype)


def rloo_advantages(scores: torch.Tensor, group_ids: List) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): each completion's baseline is the mean score of the
    other completions of its prompt,

        A_i = s_i - (sum_{j in g} s_j - s_i) / (|g| - 1)  =  |g| / (|g| - 1) (s_i - mean_g s)

    A group of one gets A = 0. scores: [N] (the KL penalty already in them, as TRL's RLOO has it)."""
    advantages = torch.zeros_like(scores, dtype=torch.float64)
    for indices in groups_of(group_ids):
        if len(indices) > 1:
            group_scores = scores[indices].double()
            advantages[indices] = group_scores - (group_scores.sum() - group_scores) / (len(indices) - 1)
    return advantages.to(scores.dtype)


def reinforce_pp_returns(scores: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025) per-token returns before their normalisation over the global batch, with the
    KL penalty in the reward and gamma = 1, inputs [rows, T] (scores [rows]):

        r_t = -beta KL_t (+ s on the last completion token),   G_t = sum_{u >= t} r_u

    KL_t = log pi_old(y_t) - log pi_ref(y_t) (k1). The advantage is G normalised over every completion token
    of the step (whiten_advantages)."""
    last = mask.cumsum(1).argmax(1)
    rewards = -beta * token_kl * mask
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards.flip(1).cumsum(1).flip(1) * mask


def sequence_clipped_losses(log_ratios: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                            epsilon_high: float, length_normalised: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The clipped surrogate on a sequence-level importance ratio, inputs [rows, T] (advantages [rows]):

        GSPO (Zheng et al. 2025; length_normalised):  s_i = exp(mean_t (log pi_t - log pi_old_t))
        RLOO (TRL's RLOOTrainer):                      s_i = exp(sum_t (log pi_t - log pi_old_t))
        L_i = -min(s_i A_i, clip(s_i, 1 - epsilon, 1 + epsilon_high) A_i)

    Returns L_i on each of row i's tokens [rows, T] (a `grpo` reduction is then the mean over sequences, a
    token mean weighs each sequence by its length, as TRL does) and, per token, whether the clipped term won."""
    summed = (log_ratios * mask).sum(1)
    log_ratio = summed / mask.sum(1).clamp(min=1) if length_normalised else summed
    ratio = torch.exp(log_ratio)
    unclipped = advantages * ratio
    clipped = advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    losses = -torch.min(unclipped, clipped)
    on_tokens = lambda values: values.unsqueeze(1).expand_as(mask) * mask
    return on_tokens(losses), {'clipped': on_tokens((clipped < unclipped).float()).detach()}


def grpo_token_losses(log_ratios, reference_log_ratios, advantages, epsilon: float, epsilon_high: float,
                      beta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO per token (Shao et al. 2024), inputs [rows, T] (advantages [rows]):

        rho_t = exp(log pi_t - log pi_old_t)                                     (log_ratios)
        L_t = -min(A rho_t, A clip(rho_t, 1 - epsilon, 1 + epsilon_high)) + beta KL_t
        KL_t = exp(log pi_ref_t - log pi_t) - (log pi_ref_t - log pi_t) - 1      (the k3 estimator;
                                                                                   reference_log_ratios = log pi_ref - log pi)
    Advantages may also be per token [rows, T] (REINFORCE++). Returns L [rows, T] and, detached, the per-token KL
    and whether the clipped term was taken.
    """
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(log_ratios)
    unclipped = advantages * ratio
    clipped = advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    kl = torch.exp(reference_log_ratios) - reference_log_ratios - 1
    losses = -torch.min(unclipped, clipped) + beta * kl
    return losses, {'KL': kl.detach(), 'clipped': (clipped < unclipped).float().detach()}


GRPO_LOSS_TYPES = ('halos', 'grpo', 'dr_grpo', 'dapo')


def grpo_loss(token_losses: torch.Tensor, mask: torch.Tensor, loss_type: str, n_tokens, n_sequences,
              max_completion_length: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reduction of GRPO's per-token losses [rows, T] over the completion tokens (`mask`), by loss_type:

        halos    sum_t L_t / n_tokens                       HALOs-2025 (TRL's bnpo): a token mean
        grpo     sum_i (sum_t L_it / |y_i|) / n_sequences   TRL's grpo: the mean of each sequence's token mean
        dr_grpo  sum_t L_t / (n_sequences * max_completion_length)      Dr. GRPO: no length normalisation
        dapo     sum_t L_t / n_tokens                       DAPO: a token mean over the whole optimizer step

    `n_tokens` and `n_sequences` are the counts the mean is over (the trainer passes this rank's share of
    the global microbatch, or for dapo of the whole optimizer step, so that averaging gradients over ranks
    and microbatches gives the global mean). Per-sequence `weights` [rows] multiply each sequence's terms
    (the counts are then weighted counts; where every weight is 0 the loss is 0, not 0 / 0).
    """
    weights = torch.ones(len(token_losses), device=token_losses.device) if weights is None else weights
    masked = token_losses * mask * weights.unsqueeze(1)
    nonzero = lambda count: torch.as_tensor(count, dtype=masked.dtype, device=masked.device).clamp(
        min=torch.finfo(masked.dtype).tiny)
    if loss_type in ('halos', 'dapo'):
        return masked.sum() / nonzero(n_tokens)
    if loss_type == 'grpo':
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / nonzero(n_sequences)
    if loss_type == 'dr_grpo':
        return masked.sum() / nonzero(n_sequences * max_completion_length)
    raise ValueError(f"loss.loss_type={loss_type}: GRPO takes {', '.join(GRPO_LOSS_TYPES)}")


def humanline_logratios(policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor,
                        log_epsilon_P: float, log_epsilon_R: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Humanline (HALOs-2025): per-token log-ratios clamped to [log_epsilon_P, log_epsilon_R], inputs [rows, T]:

        delta_t = clamp(log pi_t - log pi_ref_t, P, R)

    A token outside the band contributes its boundary value and no gradient. Returns delta [rows, T]
    (0 off the mask) and, per row, the number of completion tokens strictly inside the band (for the
    unclamped fraction).
    """
    logratios = (policy_logps - reference_logps) * mask
    inside = ((logratios > log_epsilon_P) & (logratios < log_epsilon_R) & mask.bool()).sum(-1)
    return torch.clamp(logratios, log_epsilon_P, log_epsilon_R) * mask, inside
