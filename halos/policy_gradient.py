"""The machinery of group policy gradients on scored data (GRPO in its HALOs-2025 form): per-token log-probs
of the policy and of the reference (the old policy), advantages over each prompt's group of completions, and
the reduction of the per-token losses over a microbatch or a whole optimizer step (`PolicyGradientTrainer`,
which the step-level online trainers of halos/online_rl.py share).

A trainer on it (trainers.py) gives the advantages of a microbatch's scores (`advantages`) and the per-token
loss (`loss`); its Params carry `Reduction` and its own coefficients.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from halos import batch as schema
from halos import rl
from halos.losses import GRPO_LOSS_TYPES, grpo_loss, humanline_logratios
from halos.loop import BasicTrainer, Humanline
from halos.settings import at_least, one_of, setting
from utils import all_reduce_mean, all_reduce_sum


@dataclass(frozen=True)
class Reduction:
    """The Params block of how per-token losses are reduced to a loss."""
    loss_type: str = setting('halos', 'the reduction of the per-token losses (see losses.grpo_loss)',
                             one_of(*GRPO_LOSS_TYPES))
    max_completion_length: Optional[int] = setting(None, "dr_grpo's constant length (null: max_length - "
                                                         "max_prompt_length)", at_least(1))


class PolicyGradientTrainer(BasicTrainer):
    """Per-token policy-gradient losses reduced by loss.loss_type (halos, grpo, dr_grpo, dapo)."""
    abstract = True
    reference_logps_cacheable = False  # its per-token log-probs are read

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.settings.model
        self.max_completion_length = self.params.max_completion_length or model.max_length - model.max_prompt_length

    def reduced(self, token_losses: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                n_step_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of one microbatch's [rows, T-1] per-token losses (dapo: its share of the step's token mean)."""
        loss_type = self.params.loss_type
        n_tokens = n_step_tokens if loss_type == 'dapo' and n_step_tokens is not None else \
            all_reduce_mean((mask * weights.unsqueeze(1)).sum())
        return grpo_loss(token_losses, mask, loss_type, n_tokens, all_reduce_mean(weights.sum()),
                         self.max_completion_length, weights)

    def step_tokens(self, masks: List[torch.Tensor], weights: List[torch.Tensor]) -> torch.Tensor:
        """The weighted completion tokens of an optimizer step's microbatches on every rank, per microbatch and
        rank: dapo's token mean over the whole step."""
        local = sum(float((mask * weight.unsqueeze(1)).sum()) for mask, weight in zip(masks, weights))
        return (all_reduce_sum(torch.tensor(local)) / (len(masks) * self.world_size)).to(self.device)


class GroupTrainer(PolicyGradientTrainer):
    """Scored completions grouped by prompt (GroupUnpairedPreferenceDataLoader keeps each group whole within a
    global microbatch); the reference model is the old policy."""
    abstract = True
    labels_read = (schema.SCORE, schema.PROMPT_ID)
    loss_returns = ('token_losses', 'stats')

    @dataclass(frozen=True)
    class Params(Humanline, Reduction):
        pass

    def advantages(self, scores: torch.Tensor, prompt_ids) -> Tuple[torch.Tensor, torch.Tensor]:
        """[rows] scores -> ([rows] advantages, [rows] whether the row's group is degenerate)."""
        raise NotImplementedError

    def loss(self, log_ratios, reference_log_ratios, advantages) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """[rows, T-1] per-token losses and their stats ('KL', 'clipped')."""
        raise NotImplementedError

    def global_batch_size(self, batch):
        return int(all_reduce_sum(torch.tensor(schema.batch_size(batch))))  # ranks may hold unequal parts

    def group_metrics(self, batch: Dict, mode: str, n_step_tokens=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of one microbatch (dapo: its share of the whole step's token mean) and its metrics."""
        policy_logps, mask = self.concatenated_token_logps(self.policy, batch, (schema.TARGET,))
        if self.reference_is_policy:  # the round's first step: the old policy is the policy, its forward the same
            reference_logps = policy_logps.detach()
        else:
            with torch.no_grad():
                reference_logps, _ = self.concatenated_token_logps(self.reference_model, batch, (schema.TARGET,))
        scores = batch[schema.SCORE].to(self.device)
        advantages, degenerate = self.advantages(scores, batch[schema.PROMPT_ID])
        log_ratios = policy_logps - reference_logps  # the reference is the old policy
        if self.humanline:
            log_ratios, inside = humanline_logratios(policy_logps, reference_logps, mask, *self.humanline_band)
        token_losses, stats = self.checked_loss(log_ratios, reference_logps - policy_logps, advantages)
        loss = self.reduced(token_losses, mask, batch[schema.WEIGHT].to(self.device), n_step_tokens)
        token_mean = lambda values: (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        metrics = {f'loss/{mode}': loss.detach().reshape(1), f'rewards_{mode}/scores': scores,
                   f'rewards_{mode}/advantages': advantages, f'rewards_{mode}/KL': token_mean(stats['KL']),
                   f'clipfrac_{mode}/policy': token_mean(stats['clipped']),
                   f'groups_{mode}/degenerate': degenerate.float()}
        if self.humanline:
            metrics[f'rewards_{mode}/unclamped'] = inside / mask.sum(-1).clamp(min=1)
        return loss, metrics

    def get_batch_metrics(self, batch, mode):
        return self.group_metrics(batch, mode)

    def train_step(self, microbatches):
        """One optimizer step; for dapo the token mean runs over every microbatch of the step on every rank."""
        step_tokens = self.step_tokens([rl.completion_mask(batch[schema.key(schema.TARGET, schema.LABELS)])
                                        for batch in microbatches], [batch[schema.WEIGHT] for batch in microbatches])
        for batch in microbatches:
            loss, metrics = self.group_metrics(batch, 'train', step_tokens)
            self.accumulate(loss, metrics, batch[schema.PROMPT_TEXT][0], len(microbatches))
        self.optimizer_step()
        return loss.item()
