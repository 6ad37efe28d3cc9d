"""The preference trainers' families: the metrics every preference loss logs, the forward over (chosen,
rejected) pairs, the forward over desirable and undesirable examples, and a reward model's scores of pairs. A
loss in trainers.py subclasses one of them and gives its `loss()`.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

import models
from halos import batch as schema
from halos.labelers import classifier_scores, write_reward_model_format
from halos.loop import BasicTrainer, Humanline
from halos.packing import classifier_logits
from halos.settings import greater_than, setting


class PreferenceTrainer(BasicTrainer):
    """Shared metrics of the preference trainers; subclasses provide `compute_losses`. Under humanline every
    loss() sees clamped log-ratios (BasicTrainer.policy_logps)."""
    abstract = True
    loss_returns = ('losses', 'chosen_rewards', 'rejected_rewards')

    def compute_losses(self, batch: Dict):
        """-> (losses [n], chosen_rewards, rejected_rewards, accuracies [n], extra metrics {name: value})."""
        raise NotImplementedError

    def get_batch_metrics(self, batch, mode):
        losses, chosen_rewards, rejected_rewards, accuracies, extra = self.compute_losses(batch)
        metrics = {f'rewards_{mode}/chosen': chosen_rewards, f'rewards_{mode}/rejected': rejected_rewards,
                   f'rewards_{mode}/accuracies': accuracies, f'loss/{mode}': losses.detach()}
        metrics.update({name.format(mode=mode): value for name, value in extra.items()})
        if self.humanline:
            metrics[f'rewards_{mode}/unclamped'] = self.unclamped
        return self.example_mean(losses, self.loss_weights(batch)), metrics

    def loss_weights(self, batch: Dict) -> torch.Tensor:
        """The weight of each of compute_losses' losses (the batch's items, in order)."""
        return batch[schema.WEIGHT]


class PairedPreferenceTrainer(PreferenceTrainer):
    """Trainers on (chosen, rejected) pairs: one forward per model over [chosen; rejected]."""
    abstract = True
    prefixes = (schema.CHOSEN, schema.REJECTED)

    def compute_losses(self, batch):
        policy_chosen_logps, policy_rejected_logps = self.policy_logps(batch, self.prefixes)
        if self.use_reference_model:
            reference_chosen_logps, reference_rejected_logps = self.reference_logps(batch)
            losses, chosen_rewards, rejected_rewards = self.checked_loss(
                policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        else:
            losses, chosen_rewards, rejected_rewards = self.checked_loss(policy_chosen_logps, policy_rejected_logps)
        accuracies = (chosen_rewards > rejected_rewards).float()  # each chosen against its own rejected
        extra = {'logps_{mode}/chosen': policy_chosen_logps.detach(), 'logps_{mode}/rejected': policy_rejected_logps.detach()}
        return losses, chosen_rewards, rejected_rewards, accuracies, extra


class UnpairedPreferenceTrainer(PreferenceTrainer):
    """Trainers on desirable ('chosen') and undesirable ('rejected') examples, in any mix per batch."""
    abstract = True
    use_reference_model = True
    prefixes = (schema.TARGET,)
    labels_read = (schema.IS_DESIRABLE,)

    @dataclass(frozen=True)
    class Params(Humanline):
        beta: float = setting(0.1, 'temperature of the implied reward beta * log(pi / pi_ref)', greater_than(0))

    @staticmethod
    def split_by_status(batch, logps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(desirable, undesirable) entries of a [rows] tensor of the batch's targets."""
        is_desirable = batch[schema.IS_DESIRABLE].to(logps.device)
        return logps[is_desirable], logps[~is_desirable]

    def loss_weights(self, batch):
        """The losses come desirable first, then undesirable: so do their weights."""
        return torch.cat(self.split_by_status(batch, batch[schema.WEIGHT]))

    def compute_losses(self, batch):
        policy_chosen_logps, policy_rejected_logps = self.split_by_status(batch, self.policy_logps(batch, self.prefixes)[0])
        reference_chosen_logps, reference_rejected_logps = self.split_by_status(batch, self.reference_logps(batch)[0])
        losses, chosen_rewards, rejected_rewards = self.checked_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        return losses, chosen_rewards, rejected_rewards, unpaired_accuracies(chosen_rewards, rejected_rewards), {}


def unpaired_accuracies(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per example: does the implied reward have the sign of its label (> 0 desirable, < 0 undesirable)?"""
    return torch.cat(((chosen_rewards > 0).float(), (rejected_rewards < 0).float()))


class RewardModelTrainer(PairedPreferenceTrainer):
    """A sequence classifier trained on pairs: `loss(chosen_scores, rejected_scores)` on its scores of each
    prompt + completion; exported with how its inputs were formatted (the reward-model labeler reads it)."""
    abstract = True
    use_reference_model = False
    lora_task_type, lora_heads = 'SEQ_CLS', ('score',)

    @classmethod
    def load_policy(cls, name_or_path: str, dtype: str, **kwargs) -> torch.nn.Module:
        return models.load_sequence_classifier(name_or_path, dtype, **kwargs)

    def compute_losses(self, batch):
        sequences = schema.Sequences.stacked(batch, self.prefixes, self.tokenizer.pad_token_id, self.device)
        with self.autocast():  # a pair's prompt once under model.share_prompts
            logits = classifier_logits(self.policy, sequences.input_ids, sequences.attention_mask, sequences.labels,
                                       share_prompts=self.share_prompts)
        chosen_scores, rejected_scores = classifier_scores(logits.float()).split(schema.rows_per_kind(batch, self.prefixes))
        losses, chosen_rewards, rejected_rewards = self.checked_loss(chosen_scores, rejected_scores)
        accuracies = (chosen_rewards > rejected_rewards).float()  # a tie is wrong
        return losses, chosen_rewards, rejected_rewards, accuracies, {}

    def export_hf(self, directory, policy_state):
        super().export_hf(directory, policy_state)
        write_reward_model_format(directory, self.settings.formatting, self.settings.use_chat_template,
                                  self.settings.model.max_length)
