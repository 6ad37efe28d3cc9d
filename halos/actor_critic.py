"""The actor-critic machinery of PPO (offline and online): a policy with a value head, the experience of an
optimizer step (old log-probs, values, GAE advantages whitened over the step, value targets), `ppo_epochs`
epochs over it, each freshly reshuffled across microbatches and ranks, and the value head's own clipping.

A trainer on it (trainers.py) says where its completions and their scores come from (`rollout`), who the
behaviour policy is (`behaviour`), the per-token rewards (`token_rewards`), the critic's targets
(`value_targets`) and its `loss`; its Params carry the keys of `ActorCriticTrainer.Params`.
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

import models
from halos import batch as schema
from halos import rl
from halos.losses import entropy_from_logits, generalized_advantages, whiten_advantages
from halos.loop import BasicTrainer
from halos.settings import at_least, between, greater_than, setting
from utils import all_gather_list, all_reduce_mean, clip_gradient_norm, get_batch_logps


class ActorCriticTrainer(BasicTrainer):
    """PPO's loop on a policy with a value head (models.ValueHead)."""
    abstract = True
    reference_logps_cacheable = False  # the behaviour policy's per-token log-probs
    lora_heads = ('v_head',)
    loss_returns = ('loss', 'stats')

    @dataclass(frozen=True)
    class Params:
        ppo_epochs: int = setting(1, "optimizer steps on each step's experience, each freshly reshuffled", at_least(1))
        cliprange: float = setting(0.5, 'the ratio clip c: clip(ratio, 1 - c, 1 + c)', greater_than(0))
        lam: float = setting(0.95, 'GAE lambda', between(0, 1))
        gamma: float = setting(0.99, 'the discount gamma', between(0, 1))
        critic_coef: float = setting(0.01, 'weight of the value loss', at_least(0))
        KL_coef: float = setting(0.1, 'weight of the KL term', at_least(0))
        archangel: bool = setting(False, "the formulas that trained the Archangel models (HALOs 406ed27)")

    def steps_per_batch(self) -> int:
        return self.params.ppo_epochs

    def rollout(self, batch: Dict) -> rl.Rollout:
        """The microbatch's completions with their scores."""
        raise NotImplementedError

    def behaviour(self, rows: schema.Sequences) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token log-probs of the behaviour policy and the policy's values, [rows, T-1] each."""
        raise NotImplementedError

    def token_rewards(self, scores, old_logps, rows, mask) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Per-token rewards [rows, T-1] and their metrics."""
        raise NotImplementedError

    def value_targets(self, returns: torch.Tensor, monte_carlo: torch.Tensor) -> torch.Tensor:
        """The critic's targets from the GAE returns (A + V) or the Monte-Carlo returns."""
        raise NotImplementedError

    def loss(self, policy_logps, values, part: rl.Experience, n_tokens) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The PPO loss of one microbatch of experience and its parts (policy, critic, KL, clipfrac)."""
        raise NotImplementedError

    @classmethod
    def load_policy(cls, name_or_path: str, dtype: str, **kwargs) -> torch.nn.Module:
        return models.load_causal_lm(name_or_path, dtype, value_head=True, **kwargs)

    def shard(self, block_name, mixed_precision) -> None:
        """The float32 value head is its own FSDP2 unit, so the LM's units keep one dtype."""
        from torch.distributed.fsdp import fully_shard
        fully_shard(self.policy.v_head, mesh=self.device_mesh())
        super().shard(block_name, mixed_precision)

    def policy_outputs(self, input_ids, attention_mask, logits_to_keep: int = 0):
        """The policy's outputs (logits of the last `logits_to_keep` positions; 0 = all) and values [B, T-1]."""
        with self.autocast():
            outputs = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  output_hidden_states=True, logits_to_keep=logits_to_keep)
        return outputs, self.policy.v_head(outputs.hidden_states[-1])[:, :-1]

    @torch.no_grad()
    def experience(self, microbatches: List[Dict]) -> Tuple[List[rl.Experience], Dict[str, torch.Tensor]]:
        """Each microbatch's experience (advantages whitened over all of them), and its metrics."""
        params = self.params
        experience, raw_advantages, metrics = [], [], {}
        for batch in microbatches:
            rollout = self.rollout(batch)
            rows = rollout.sequences
            mask = rl.completion_mask(rows.labels)
            old_logps, values = self.behaviour(rows)
            rewards, reward_metrics = self.token_rewards(rollout.scores, old_logps, rows, mask)
            reward_metrics.update(rollout.metrics)
            advantages, returns, monte_carlo = generalized_advantages(
                values, rewards, mask, params.gamma, params.lam, target_includes_reward=not params.archangel)
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
        metrics = {name: torch.cat(v) for name, v in metrics.items()}
        # a part of the score that this rank's samples lack is added empty: every rank adds the same keys
        for name in all_gather_list([name for name in metrics if name.startswith('reward_parts/')]):
            metrics.setdefault(name, torch.tensor([]))
        return rl.with_advantages(experience, whitened), metrics

    def ppo_metrics(self, part: rl.Experience) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The PPO loss of one microbatch of experience (token means over the global microbatch) and its metrics."""
        outputs, values = self.policy_outputs(part.input_ids, part.attention_mask)
        policy_logps = get_batch_logps(outputs.logits, part.labels, token_level=True)
        # gradients are averaged over ranks: dividing by the mean count makes a global (weighted) token mean
        n_tokens = all_reduce_mean(part.token_weights.sum())
        loss, stats = self.checked_loss(policy_logps, values, part, n_tokens)
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
        for _ in range(self.params.ppo_epochs):
            seed = self.settings.seed * 1_000_003 + self.batch_counter  # a fresh permutation at each optimizer step
            for part in rl.reshuffled(experience, seed, self.rank, self.world_size, self.tokenizer.pad_token_id):
                loss, metrics = self.ppo_metrics(part)
                self.accumulate(loss, metrics, first_prompt, len(experience))
            self.optimizer_step()
        return loss.item()

    def clip_gradient(self) -> float:
        """The value head at v_head_max_grad_norm and the LM at max_grad_norm; the sum of both norms."""
        value_head = set(self.policy.v_head.parameters())
        language_model = [p for p in self.policy.parameters() if p not in value_head]
        return (clip_gradient_norm(value_head, self.settings.model.v_head_max_grad_norm)
                + clip_gradient_norm(language_model, self.max_grad_norm))

    def export_hf(self, directory, policy_state):
        """The LM alone, loadable with AutoModelForCausalLM (the value head stays in policy.pt)."""
        super().export_hf(directory, {k: v for k, v in policy_state.items() if not k.startswith('v_head.')})
