"""Trainers: the catalogue of losses, one short subclass per human-aware loss.

To add a loss, subclass PairedPreferenceTrainer (chosen/rejected pairs) or UnpairedPreferenceTrainer
(desirable/undesirable examples), override `loss`, and add a YAML file to config/loss naming the trainer and
the dataloader. `loss` receives summed log-probs of the completions, shape [batch], and returns per-example
(losses, chosen_rewards, rejected_rewards); each trainer's `loss` calls one pure function of halos/losses.py
with its hyperparameters from `self.config.loss`. The loop, evaluation, logging, clipping and checkpoints
are BasicTrainer's (halos/loop.py); the token-level RL machinery is halos/rl.py.
"""
import zlib
from typing import Dict, List, Tuple

import torch

import models
from halos import batch as schema
from halos import rl
from halos.errors import ConfigError
from halos.labelers import RewardFunctionLabeler, classifier_scores, reward_model_scores, write_reward_model_format
from halos.loop import BasicTrainer
from halos.losses import (GRPO_LOSS_TYPES, adaptive_kl_coef, bradley_terry_loss, dpo_loss, entropy_from_logits,  # noqa: F401
                          generalized_advantages, group_advantages, grpo_loss, grpo_token_losses, humanline_logratios,
                          ipo_loss, kl_penalised_rewards, kto_loss, orpo_loss, ppo_loss, sft_loss, simple_kto_loss,
                          simpo_loss, slic_loss, whiten_advantages)
from halos.packing import classifier_logits
from halos.sampling import SamplingOptions, halos_sampler
from utils import all_reduce_mean, all_reduce_sum, clip_gradient_norm, find_class, get_batch_logps, weighted_mean


class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning on the target completion (also CSFT, with the conditional loader)."""

    def loss(self, policy_chosen_logps: torch.Tensor) -> torch.Tensor:
        return sft_loss(policy_chosen_logps)

    def get_batch_metrics(self, batch, mode):
        policy_logps, = self.concatenated_logps(self.policy, batch, (schema.TARGET,))
        losses = self.loss(policy_logps)
        return weighted_mean(losses, batch[schema.WEIGHT]), {f'logps_{mode}/chosen': policy_logps, f'loss/{mode}': losses}


class PreferenceTrainer(BasicTrainer):
    """Shared metrics of the preference trainers; subclasses provide `compute_losses`.

    Under humanline (loss.humanline) the policy's summed log-probs are replaced by the sums of its clamped
    per-token log-ratios to the reference, and the reference's by 0, so every loss() sees clamped log-ratios.
    """
    abstract = True

    def policy_logps(self, batch: Dict, kinds: Tuple[str, ...]) -> List[torch.Tensor]:
        """Summed policy log-probs per kind, [rows] each; under humanline the summed clamped log-ratios (and
        `self.unclamped` the fraction of each row's tokens inside the band)."""
        if not self.humanline:
            return self.concatenated_logps(self.policy, batch, kinds)
        policy, mask = self.concatenated_token_logps(self.policy, batch, kinds)
        with torch.no_grad():
            reference, _ = self.concatenated_token_logps(self.reference_model, batch, kinds)
        logratios, inside = humanline_logratios(policy, reference, mask, *self.humanline_band)
        self.unclamped = inside / mask.sum(-1).clamp(min=1)
        return list(logratios.sum(-1).split(schema.rows_per_kind(batch, kinds)))

    def reference_logps(self, batch: Dict) -> List[torch.Tensor]:
        if not self.humanline:
            return super().reference_logps(batch)
        return [torch.zeros(rows, device=self.device) for rows in schema.rows_per_kind(batch, self.prefixes)]

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
        return weighted_mean(losses, self.loss_weights(batch)), metrics

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
            losses, chosen_rewards, rejected_rewards = self.loss(
                policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        else:
            losses, chosen_rewards, rejected_rewards = self.loss(policy_chosen_logps, policy_rejected_logps)
        accuracies = (chosen_rewards > rejected_rewards).float()  # each chosen against its own rejected
        extra = {'logps_{mode}/chosen': policy_chosen_logps.detach(), 'logps_{mode}/rejected': policy_rejected_logps.detach()}
        return losses, chosen_rewards, rejected_rewards, accuracies, extra


class DPOTrainer(PairedPreferenceTrainer):
    use_reference_model = True
    supports_humanline = True

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """L = -log sigmoid(beta h), h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]."""
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta=self.config.loss.beta)


class CDPOTrainer(PairedPreferenceTrainer):
    use_reference_model = True
    supports_humanline = True

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """L = -(1 - epsilon) log sigmoid(beta h) - epsilon log sigmoid(-beta h)."""
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta=self.config.loss.beta, label_smoothing=self.config.loss.epsilon)


class IPOTrainer(PairedPreferenceTrainer):
    use_reference_model = True
    supports_humanline = True

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """L = (h - 1 / (2 tau))^2 with tau = loss.beta."""
        return ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, tau=self.config.loss.beta)


class SLiCTrainer(PairedPreferenceTrainer):
    use_reference_model = False

    def loss(self, policy_chosen_logps, policy_rejected_logps):
        """L = max(0, delta - log pi(y_w) + log pi(y_l)) - lambda log pi(y_w), delta = loss.beta."""
        return slic_loss(policy_chosen_logps, policy_rejected_logps, delta=self.config.loss.beta,
                         lambda_coef=self.config.loss.lambda_coef)


class SimPOTrainer(PairedPreferenceTrainer):
    use_reference_model = False
    average_log_prob = True  # loss() gets per-token mean log-probs

    def loss(self, policy_chosen_logps, policy_rejected_logps):
        """L = -log sigmoid(beta (r(y_w) - r(y_l) - gamma / beta)), r = mean token log-prob."""
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, beta=self.config.loss.beta,
                          gamma_beta_ratio=self.config.loss.gamma_beta_ratio)


class ORPOTrainer(PairedPreferenceTrainer):
    use_reference_model = False
    average_log_prob = True  # loss() gets per-token mean log-probs

    def loss(self, policy_chosen_logps, policy_rejected_logps):
        """L = -l(y_w) + lambda (-log sigmoid(odds(y_w) - odds(y_l))), odds(y) = l(y) - log(1 - e^l(y))."""
        return orpo_loss(policy_chosen_logps, policy_rejected_logps, lambda_coef=self.config.loss.lambda_coef)


class BradleyTerryTrainer(PairedPreferenceTrainer):
    """A reward model: a one-logit sequence-classification head on the policy's architecture scores each
    prompt + completion; exported as an AutoModelForSequenceClassification directory (LATEST/hf) that the
    reward-model labeler and loss=ppo's loss.reward_model load."""
    use_reference_model = False
    lora_task_type, lora_heads = 'SEQ_CLS', ('score',)

    @classmethod
    def load_policy(cls, name_or_path: str, dtype: str, **kwargs) -> torch.nn.Module:
        return models.load_sequence_classifier(name_or_path, dtype, **kwargs)

    def loss(self, chosen_scores, rejected_scores):
        """L = -log sigmoid(s(y_w) - s(y_l) - margin)."""
        return bradley_terry_loss(chosen_scores, rejected_scores, margin=self.config.loss.margin)

    def compute_losses(self, batch):
        sequences = schema.Sequences.stacked(batch, self.prefixes, self.tokenizer.pad_token_id, self.device)
        with self.autocast():  # a pair's prompt once under model.share_prompts
            logits = classifier_logits(self.policy, sequences.input_ids, sequences.attention_mask, sequences.labels,
                                       share_prompts=self.share_prompts)
        chosen_scores, rejected_scores = classifier_scores(logits.float()).split(schema.rows_per_kind(batch, self.prefixes))
        losses, chosen_rewards, rejected_rewards = self.loss(chosen_scores, rejected_scores)
        accuracies = (chosen_rewards > rejected_rewards).float()  # a tie is wrong
        return losses, chosen_rewards, rejected_rewards, accuracies, {}

    def export_hf(self, directory, policy_state):
        """The reward model, with how its inputs were formatted (the labeler formats the same way)."""
        super().export_hf(directory, policy_state)
        write_reward_model_format(directory, self.config)


class UnpairedPreferenceTrainer(PreferenceTrainer):
    """Trainers on desirable ('chosen') and undesirable ('rejected') examples, in any mix per batch."""
    abstract = True
    use_reference_model = True
    supports_humanline = True
    prefixes = (schema.TARGET,)

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
        losses, chosen_rewards, rejected_rewards = self.loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
        return losses, chosen_rewards, rejected_rewards, unpaired_accuracies(chosen_rewards, rejected_rewards), {}


def unpaired_accuracies(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per example: does the implied reward have the sign of its label (> 0 desirable, < 0 undesirable)?"""
    return torch.cat(((chosen_rewards > 0).float(), (rejected_rewards < 0).float()))


class SimpleKTOTrainer(UnpairedPreferenceTrainer):
    """The first KTO of HALOs; needs SimpleKTODataLoader's batches of half desirable, half undesirable."""

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """desirable: 1 - sigmoid(beta (r_c - KL_u)); undesirable: 1 - sigmoid(beta (KL_c - r_u)); KL = max(0, mean r)."""
        return simple_kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, beta=self.config.loss.beta)


class KTOZeroTrainer(UnpairedPreferenceTrainer):
    """Ablation: KTO with the reference point fixed at 0 and unit weights."""

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """desirable: 1 - sigmoid(beta r); undesirable: 1 - sigmoid(-beta r)."""
        return kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, reference_point=0.0, beta=self.config.loss.beta)


class KTOTrainer(UnpairedPreferenceTrainer):
    """KTO with the reference point z0 estimated from mismatched (x_i, y_{i+1}) 'KL' examples."""
    prefixes = (schema.TARGET, schema.KL)

    def policy_logps_with_kl(self, batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen and rejected log-probs with gradient; the KL rows without (z0 is a constant)."""
        with torch.no_grad():
            KL_logps, = self.policy_logps(batch, (schema.KL,))
        chosen_logps, rejected_logps = self.split_by_status(batch, self.policy_logps(batch, (schema.TARGET,))[0])
        return chosen_logps, rejected_logps, KL_logps

    def reference_point(self, policy_KL_logps: torch.Tensor, reference_KL_logps: torch.Tensor) -> torch.Tensor:
        """z0 = max(0, mean over the global batch of log pi(y'|x) - log pi_ref(y'|x)), detached."""
        local_mean = (policy_KL_logps - reference_KL_logps).detach().mean()
        return all_reduce_mean(local_mean).clamp(min=0)

    def loss(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps,
             reference_chosen_logps, reference_rejected_logps, reference_KL_logps):
        """desirable: lambda_D (1 - sigmoid(beta (r - z0))); undesirable: lambda_U (1 - sigmoid(beta (z0 - r))).

        Returns (losses, chosen_rewards, rejected_rewards, z0).
        """
        KL = self.reference_point(policy_KL_logps, reference_KL_logps)
        losses, chosen_rewards, rejected_rewards = kto_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            reference_point=KL, beta=self.config.loss.beta, desirable_weight=self.config.loss.desirable_weight,
            undesirable_weight=self.config.loss.undesirable_weight)
        return losses, chosen_rewards, rejected_rewards, KL

    def compute_losses(self, batch):
        policy_chosen_logps, policy_rejected_logps, policy_KL_logps = self.policy_logps_with_kl(batch)
        reference_target_logps, reference_KL_logps = self.reference_logps(batch)
        reference_chosen_logps, reference_rejected_logps = self.split_by_status(batch, reference_target_logps)
        losses, chosen_rewards, rejected_rewards, KL = self.loss(
            policy_chosen_logps, policy_rejected_logps, policy_KL_logps,
            reference_chosen_logps, reference_rejected_logps, reference_KL_logps)
        accuracies = unpaired_accuracies(chosen_rewards - self.config.loss.beta * KL,
                                         rejected_rewards - self.config.loss.beta * KL)
        return losses, chosen_rewards, rejected_rewards, accuracies, {'rewards_{mode}/KL_estimate': KL.reshape(1)}


class PPOTrainer(BasicTrainer):
    """Offline PPO on labelled data: reward +1 (desirable/chosen) or -1 (undesirable/rejected), or a reward
    model's score, on the last completion token; the reference model is the behaviour ("old") policy.

    Each optimizer step's microbatches are the experience: under no_grad their old log-probs, values,
    GAE advantages (whitened over the whole experience on every rank) and value targets are computed
    once, then `ppo_epochs` epochs each reshuffle the experience across microbatches and ranks,
    backpropagate every microbatch and step the optimizer.
    """
    use_reference_model = True
    lora_heads = ('v_head',)

    def __init__(self, tokenizer, config, *args, **kwargs):
        if config.cache_reference_logprobs:
            raise ConfigError("loss=ppo needs per-token reference log-probs: set cache_reference_logprobs=false")
        super().__init__(tokenizer, config, *args, **kwargs)
        self.reward_model = None
        if config.loss.reward_model:
            self.reward_model, self.reward_tokenizer = models.load_reward_model(config.loss.reward_model,
                                                                                config.model.reference_dtype)
            self.reward_model.to(self.device)

    @classmethod
    def load_policy(cls, name_or_path: str, dtype: str, **kwargs) -> torch.nn.Module:
        return models.load_causal_lm(name_or_path, dtype, value_head=True, **kwargs)

    def shard(self, block_name, mixed_precision) -> None:
        """The float32 value head is its own FSDP2 unit, so the LM's units keep one dtype."""
        from torch.distributed.fsdp import fully_shard
        fully_shard(self.policy.v_head, mesh=self.device_mesh())
        super().shard(block_name, mixed_precision)

    def scores(self, completions: schema.LabelledCompletions) -> torch.Tensor:
        """+1 / -1 by label, or the reward model's score of each prompt + completion."""
        if self.reward_model is None:
            return completions.is_desirable.float() * 2 - 1
        return reward_model_scores(self.reward_model, self.reward_tokenizer, completions.texts,
                                   self.config.model.max_length, self.device)

    def policy_outputs(self, input_ids, attention_mask, logits_to_keep: int = 0):
        """The policy's outputs (logits of the last `logits_to_keep` positions; 0 = all) and values [B, T-1]."""
        with self.autocast():
            outputs = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  output_hidden_states=True, logits_to_keep=logits_to_keep)
        return outputs, self.policy.v_head(outputs.hidden_states[-1])[:, :-1]

    def rollout(self, batch: Dict) -> rl.Rollout:
        """The batch's scored completions: offline, its labelled completions."""
        completions = schema.LabelledCompletions.of(batch, self.tokenizer.pad_token_id, self.device)
        return rl.Rollout(completions.sequences, completions.weights, self.scores(completions))

    def behaviour(self, rows: schema.Sequences) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token log-probs of the behaviour policy (offline: the reference model) and values, [rows, T-1] each."""
        old_logps = rl.token_logps(self.reference_model, rows.input_ids, rows.attention_mask, rows.labels, self.autocast)
        _, values = self.policy_outputs(rows.input_ids, rows.attention_mask, logits_to_keep=1)  # values only
        return old_logps, values

    def token_rewards(self, scores, old_logps, rows, mask) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Per-token rewards [rows, T-1] (offline: the score on the last completion token) and their metrics."""
        return rl.rewards_on_last_token(scores, mask), {}

    def value_targets(self, returns: torch.Tensor, monte_carlo: torch.Tensor) -> torch.Tensor:
        """The critic's targets: offline, HALOs' Monte-Carlo returns."""
        return monte_carlo

    @torch.no_grad()
    def experience(self, microbatches: List[Dict]) -> Tuple[List[rl.Experience], Dict[str, torch.Tensor]]:
        """Each microbatch's experience (advantages whitened over all of them), and its metrics."""
        loss_config = self.config.loss
        experience, raw_advantages, metrics = [], [], {}
        for batch in microbatches:
            rollout = self.rollout(batch)
            rows = rollout.sequences
            mask = rl.completion_mask(rows.labels)
            old_logps, values = self.behaviour(rows)
            rewards, reward_metrics = self.token_rewards(rollout.scores, old_logps, rows, mask)
            reward_metrics.update(rollout.metrics)
            advantages, returns, monte_carlo = generalized_advantages(
                values, rewards, mask, loss_config.gamma, loss_config.lam, target_includes_reward=not loss_config.archangel)
            length = rows.input_ids.shape[1]
            raw_advantages.append(rl.full_length(advantages, length))
            experience.append(rl.Experience(rows.input_ids, rows.attention_mask, rows.labels,
                                            rl.full_length(old_logps, length), rl.full_length(mask, length),
                                            advantages=None,
                                            value_targets=rl.full_length(self.value_targets(returns, monte_carlo), length),
                                            token_weights=rl.full_length(mask * rollout.weights.unsqueeze(1), length)))
            for name, tokens in (('returns', returns), ('val', values)):
                mean, variance = rl.masked_stats(tokens, mask)
                reward_metrics.update({f'{name}/mean': mean, f'{name}/var': variance})
            for name, values in reward_metrics.items():
                metrics.setdefault(name, []).append(values.reshape(-1))
        whitened = whiten_advantages(raw_advantages, [part.mask for part in experience])
        return rl.with_advantages(experience, whitened), {name: torch.cat(v) for name, v in metrics.items()}

    def ppo_metrics(self, part: rl.Experience) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The PPO loss of one microbatch of experience (token means over the global microbatch) and its metrics."""
        loss_config = self.config.loss
        outputs, values = self.policy_outputs(part.input_ids, part.attention_mask)
        policy_logps = get_batch_logps(outputs.logits, part.labels, token_level=True)
        # gradients are averaged over ranks: dividing by the mean count makes a global (weighted) token mean
        n_tokens = all_reduce_mean(part.token_weights.sum())
        loss, stats = ppo_loss(policy_logps, part.old_logps, part.advantages, values, part.value_targets,
                               part.token_weights, cliprange=loss_config.cliprange, critic_coef=loss_config.critic_coef,
                               KL_coef=loss_config.KL_coef, archangel=loss_config.archangel, n_tokens=n_tokens)
        with torch.no_grad():
            entropy = (entropy_from_logits(outputs.logits[:, :-1]) * part.mask).sum() / all_reduce_mean(part.mask.sum())
            sequence_ratios = torch.exp(((policy_logps - part.old_logps) * part.mask).sum(-1))
        return loss, {'loss/total': loss.detach(), 'loss/policy': stats['policy'], 'loss/critic': stats['critic'],
                      'loss/policykl': stats['KL'], 'loss/entropy': entropy, 'loss/seqratio': sequence_ratios,
                      'clipfrac/policy': stats['clipfrac']}

    @staticmethod
    def named_for(mode: str, metrics: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """HALOs' PPO names ('loss/policy') in training; 'loss_eval/policy' and so on in evaluation."""
        return metrics if mode == 'train' else {name.replace('/', f'_{mode}/', 1): v for name, v in metrics.items()}

    def get_batch_metrics(self, batch, mode):
        """Evaluation: one batch as its own experience, not reshuffled."""
        experience, experience_metrics = self.experience([batch])
        loss, metrics = self.ppo_metrics(experience[0].trimmed())
        return loss, self.named_for(mode, {**metrics, **experience_metrics})

    def train_step(self, microbatches):
        experience, experience_metrics = self.experience(microbatches)
        return self.optimize(experience, experience_metrics, microbatches[0][schema.PROMPT_TEXT][0])

    def optimize(self, experience: List[rl.Experience], experience_metrics: Dict[str, torch.Tensor],
                 first_prompt: str) -> float:
        """ppo_epochs optimizer steps on the experience, each epoch freshly reshuffled across microbatches and ranks."""
        for name, values in experience_metrics.items():
            self.train_metrics.add(name, values)
        for _ in range(self.config.loss.ppo_epochs):
            seed = self.config.seed * 1_000_003 + self.batch_counter  # a fresh permutation at each optimizer step
            for part in rl.reshuffled(experience, seed, self.rank, self.world_size, self.tokenizer.pad_token_id):
                loss, metrics = self.ppo_metrics(part)
                self.accumulate(loss, metrics, first_prompt, len(experience))
            self.optimizer_step()
        return loss.item()

    def clip_gradient(self) -> float:
        """The value head at v_head_max_grad_norm and the LM at max_grad_norm; the sum of both norms."""
        value_head = set(self.policy.v_head.parameters())
        language_model = [p for p in self.policy.parameters() if p not in value_head]
        return (clip_gradient_norm(value_head, self.config.model.v_head_max_grad_norm)
                + clip_gradient_norm(language_model, self.max_grad_norm))

    def export_hf(self, directory, policy_state):
        """The LM alone, loadable with AutoModelForCausalLM (the value head stays in policy.pt)."""
        super().export_hf(directory, {k: v for k, v in policy_state.items() if not k.startswith('v_head.')})


class OnlinePPOTrainer(PPOTrainer):
    """Online PPO with a KL-penalised reward (Ziegler et al. 2019; the StackLLaMA recipe): each optimizer step
    samples one completion per prompt from the current policy (the behaviour policy), scores it with
    loss.reward_function or loss.reward_model, and rewards every token with -kl_coef (log pi_old - log pi_ref),
    plus the score (minus loss.reward_baseline, optionally whitened, clipped to +-loss.score_clip) on its last
    token; GAE with
    value targets A + V; then PPOTrainer's epochs. kl_coef adapts towards loss.target_kl (saved with the state)."""

    def __init__(self, tokenizer, config, *args, **kwargs):
        loss_config = config.loss
        if bool(loss_config.reward_function) == bool(loss_config.reward_model):
            raise ConfigError("loss=ppo-online scores its samples with one of loss.reward_function=file.py:function "
                              "or loss.reward_model=<sequence classifier>: give exactly one")
        super().__init__(tokenizer, config, *args, **kwargs)
        self.reward_function = RewardFunctionLabeler(loss_config.reward_function) if loss_config.reward_function else None
        self.sampling_options = SamplingOptions.of(config)
        self.kl_coef = loss_config.init_kl_coef

    def rollout(self, batch):
        """One sample per prompt from the current policy, scored. Its seed comes from the run's seed, the data
        position and the batch's first prompt, so a resumed run draws what it would have drawn."""
        with torch.random.fork_rng():
            torch.manual_seed(zlib.crc32(f'{self.config.seed}/{self.batches_seen}/{batch[schema.PROMPT_ID][0]}'.encode()))
            samples = [group[0] for group in halos_sampler(self.policy, self.tokenizer, self.sampling_options)(batch, 1)]
        rows = rl.rollout_sequences(batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK],
                                    [sample.token_ids for sample in samples], self.tokenizer.pad_token_id)
        completions = [sample.text for sample in samples]
        if self.reward_function is not None:
            scores = torch.tensor(self.reward_function(batch[schema.PROMPT_TURNS], completions))
        else:
            texts = [prompt + completion for prompt, completion in zip(batch[schema.PROMPT_TEXT], completions)]
            scores = reward_model_scores(self.reward_model, self.reward_tokenizer, texts, self.config.model.max_length,
                                         self.device)
        raw_scores = scores.float().to(self.device)
        scores = raw_scores - self.config.loss.reward_baseline
        if self.config.loss.whiten_scores:  # over the microbatch's rows on every rank
            scores, = whiten_advantages([scores], [torch.ones_like(scores)])
        if self.config.loss.score_clip:
            scores = scores.clamp(-self.config.loss.score_clip, self.config.loss.score_clip)
        return rl.Rollout(rows.to(self.device), torch.ones(len(samples), device=self.device), scores,
                          {'rewards/score': raw_scores, 'completions/length': rows.labels.ne(schema.IGNORE_INDEX).sum(-1)})

    def behaviour(self, rows):
        """The current policy is the behaviour policy: its token log-probs and values from one forward."""
        outputs, values = self.policy_outputs(rows.input_ids, rows.attention_mask)
        return get_batch_logps(outputs.logits, rows.labels, token_level=True), values

    def token_rewards(self, scores, old_logps, rows, mask):
        reference_logps = rl.token_logps(self.reference_model, rows.input_ids, rows.attention_mask, rows.labels,
                                         self.autocast)
        rewards, kl = kl_penalised_rewards(rl.rewards_on_last_token(scores, mask), old_logps, reference_logps, mask,
                                           self.kl_coef)
        return rewards, {'objective/kl': kl.sum(-1), 'objective/kl_coef': torch.tensor(self.kl_coef)}

    def value_targets(self, returns, monte_carlo):
        """TRL's critic targets: the GAE returns A + V."""
        return returns

    def train_step(self, microbatches):
        """Sample, score and build the experience, optimize on it, then adapt kl_coef to the step's KL."""
        experience, experience_metrics = self.experience(microbatches)
        loss = self.optimize(experience, experience_metrics, microbatches[0][schema.PROMPT_TEXT][0])
        if self.config.loss.adaptive_kl:
            kl = experience_metrics['objective/kl']
            total_kl, n_rows = all_reduce_sum(torch.stack([kl.sum(), torch.tensor(float(len(kl)), device=kl.device)])).tolist()
            self.kl_coef = adaptive_kl_coef(self.kl_coef, total_kl / n_rows, self.config.loss.target_kl,
                                            self.config.loss.horizon, int(n_rows))
        return loss

    def trainer_state(self):
        return {**super().trainer_state(), 'kl_coef': self.kl_coef}

    def restore_trainer_state(self, state):
        super().restore_trainer_state(state)
        self.kl_coef = state['kl_coef']


class GRPOTrainer(BasicTrainer):
    """GRPO on scored completions grouped by prompt (GroupUnpairedPreferenceDataLoader keeps each group whole
    within a global microbatch): group-normalised advantages, the per-token clipped ratio to the "old" policy
    and the k3 KL to the reference. As in HALOs-2025 the reference model is the old policy: offline it is the
    starting model; in online rounds with online.reference=previous it is the policy that sampled the round.
    loss.loss_type picks the reduction (halos, grpo, dr_grpo, dapo; see grpo_loss)."""
    use_reference_model = True
    supports_humanline = True

    def __init__(self, tokenizer, config, *args, **kwargs):
        if config.loss.loss_type not in GRPO_LOSS_TYPES:
            raise ConfigError(f"loss.loss_type={config.loss.loss_type}: GRPO takes {', '.join(GRPO_LOSS_TYPES)}")
        super().__init__(tokenizer, config, *args, **kwargs)
        self.max_completion_length = config.loss.max_completion_length or \
            config.model.max_length - config.model.max_prompt_length

    def global_batch_size(self, batch):
        return int(all_reduce_sum(torch.tensor(schema.batch_size(batch))))  # ranks may hold unequal parts

    def grpo_metrics(self, batch: Dict, mode: str, n_step_tokens=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of one microbatch (dapo: its share of the whole step's token mean) and its metrics."""
        loss_config = self.config.loss
        policy_logps, mask = self.concatenated_token_logps(self.policy, batch, (schema.TARGET,))
        if self.reference_is_policy:  # the round's first step: the old policy is the policy, its forward the same
            reference_logps = policy_logps.detach()
        else:
            with torch.no_grad():
                reference_logps, _ = self.concatenated_token_logps(self.reference_model, batch, (schema.TARGET,))
        scores = batch[schema.SCORE].to(self.device)
        advantages, degenerate = rl.group_advantages_across_ranks(scores, batch[schema.PROMPT_ID],
                                                                  loss_config.std_epsilon, loss_config.unbiased_std)
        log_ratios = policy_logps - reference_logps  # the reference is the old policy
        if self.humanline:
            log_ratios, inside = humanline_logratios(policy_logps, reference_logps, mask, *self.humanline_band)
        token_losses, stats = grpo_token_losses(log_ratios, reference_logps - policy_logps, advantages,
                                                loss_config.epsilon, loss_config.epsilon_high or loss_config.epsilon,
                                                loss_config.beta)
        weights = batch[schema.WEIGHT].to(self.device)
        n_tokens = n_step_tokens if loss_config.loss_type == 'dapo' and n_step_tokens else \
            all_reduce_mean((mask * weights.unsqueeze(1)).sum())
        loss = grpo_loss(token_losses, mask, loss_config.loss_type, n_tokens, all_reduce_mean(weights.sum()),
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
        return self.grpo_metrics(batch, mode)

    def train_step(self, microbatches):
        """One optimizer step; for dapo the token mean runs over every microbatch of the step on every rank."""
        local_tokens = sum(float((rl.completion_mask(batch[schema.key(schema.TARGET, schema.LABELS)])
                                  * batch[schema.WEIGHT].unsqueeze(1)).sum()) for batch in microbatches)
        step_tokens = all_reduce_sum(torch.tensor(float(local_tokens))) / (len(microbatches) * self.world_size)
        for batch in microbatches:
            loss, metrics = self.grpo_metrics(batch, 'train', step_tokens.to(self.device))
            self.accumulate(loss, metrics, batch[schema.PROMPT_TEXT][0], len(microbatches))
        self.optimizer_step()
        return loss.item()


def get_trainer_class(name: str) -> type:
    """The trainer class called `name` in this module (so a subclass added here is found by its YAML)."""
    return find_class(globals(), BasicTrainer, name, 'loss.trainer', 'a trainer')
