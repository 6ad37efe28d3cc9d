"""The machinery of group policy gradients (GRPO and its kin): per-token log-probs of the policy, the old
policy and the reference, advantages over each prompt's group of completions, and the reduction of the
per-token losses over a microbatch or a whole optimizer step.

A trainer on it (trainers.py) gives the advantages of a microbatch's scores (`advantages`) and the per-token
loss (`loss`); its Params carry `GroupTrainer.Params` (the reduction) and its own coefficients.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from halos import batch as schema
from halos import rl
from halos.losses import GRPO_LOSS_TYPES, grpo_loss, humanline_logratios
from halos.loop import BasicTrainer, Humanline
from halos.settings import at_least, one_of, setting
from utils import all_reduce_mean, all_reduce_sum


class GroupTrainer(BasicTrainer):
    """Scored completions grouped by prompt (GroupUnpairedPreferenceDataLoader keeps each group whole within a
    global microbatch); the reference model is the old policy."""
    abstract = True
    reference_logps_cacheable = False  # its per-token log-probs are read

    @dataclass(frozen=True)
    class Params(Humanline):
        loss_type: str = setting('halos', 'the reduction of the per-token losses (see losses.grpo_loss)',
                                 one_of(*GRPO_LOSS_TYPES))
        max_completion_length: Optional[int] = setting(None, "dr_grpo's constant length (null: max_length - "
                                                             "max_prompt_length)", at_least(1))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.settings.model
        self.max_completion_length = self.params.max_completion_length or model.max_length - model.max_prompt_length

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
        token_losses, stats = self.loss(log_ratios, reference_logps - policy_logps, advantages)
        weights = batch[schema.WEIGHT].to(self.device)
        loss_type = self.params.loss_type
        n_tokens = n_step_tokens if loss_type == 'dapo' and n_step_tokens else \
            all_reduce_mean((mask * weights.unsqueeze(1)).sum())
        loss = grpo_loss(token_losses, mask, loss_type, n_tokens, all_reduce_mean(weights.sum()),
                         self.max_completion_length, weights)
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
        local_tokens = sum(float((rl.completion_mask(batch[schema.key(schema.TARGET, schema.LABELS)])
                                  * batch[schema.WEIGHT].unsqueeze(1)).sum()) for batch in microbatches)
        step_tokens = all_reduce_sum(torch.tensor(float(local_tokens))) / (len(microbatches) * self.world_size)
        for batch in microbatches:
            loss, metrics = self.group_metrics(batch, 'train', step_tokens.to(self.device))
            self.accumulate(loss, metrics, batch[schema.PROMPT_TEXT][0], len(microbatches))
        self.optimizer_step()
        return loss.item()
