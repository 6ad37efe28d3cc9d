"""Trainers: the catalogue of losses, one short subclass per human-aware loss.

To add a loss, subclass PairedPreferenceTrainer (chosen/rejected pairs) or UnpairedPreferenceTrainer
(desirable/undesirable examples; both in halos/preference.py), override `loss`, and add a YAML file to
config/loss naming the trainer and the dataloader. `loss` receives summed log-probs of the completions, shape [batch], and returns per-example
(losses, chosen_rewards, rejected_rewards); each trainer's `loss` calls one pure function of halos/losses.py
with its hyperparameters from `self.params`, an instance of its `Params`: a frozen dataclass declaring each
key of its config/loss YAML with its type, default, doc and constraint (checked before anything loads).
The loop, evaluation, logging, clipping and checkpoints are BasicTrainer's (halos/loop.py); PPO's machinery is
halos/actor_critic.py, GRPO's on scored data halos/policy_gradient.py, the step-level online RL methods'
(sampling, scoring, mu passes, monitors) halos/online_rl.py, the token-level RL helpers halos/rl.py.
"""
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from halos import batch as schema
from halos import rl
from halos.actor_critic import ActorCriticTrainer
from halos.errors import ConfigError
from halos.labelers import RewardModelLabeler, checked_scores, reward_function_labeler
from halos.loop import BasicTrainer, Humanline
from halos.losses import (GRPO_LOSS_TYPES, adaptive_kl_coef, bradley_terry_loss, dpo_loss, entropy_from_logits,  # noqa: F401
                          generalized_advantages, group_advantages, grpo_loss, grpo_token_losses, humanline_logratios,
                          ipo_loss, kl_penalised_rewards, kto_loss, orpo_loss, ppo_loss, reinforce_pp_returns,
                          rloo_advantages, sequence_clipped_losses, sft_loss, simple_kto_loss, simpo_loss, slic_loss,
                          whiten_advantages)
from halos.monitors import part_values
from halos.online_rl import OnlineGroupTrainer
from halos.policy_gradient import GroupTrainer
from halos.preference import (PairedPreferenceTrainer, PreferenceTrainer, RewardModelTrainer,  # noqa: F401
                              UnpairedPreferenceTrainer, unpaired_accuracies)
from halos.settings import REWARD_FUNCTIONS, at_least, between, greater_than, one_of, setting
from utils import all_gather_list, all_reduce_mean, all_reduce_sum, find_class, get_batch_logps


class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning on the target completion (also CSFT, with the conditional loader)."""

    def loss(self, policy_chosen_logps: torch.Tensor) -> torch.Tensor:
        return sft_loss(policy_chosen_logps)

    def get_batch_metrics(self, batch, mode):
        policy_logps, = self.concatenated_logps(self.policy, batch, (schema.TARGET,))
        losses = self.loss(policy_logps)
        return self.example_mean(losses, batch[schema.WEIGHT]), {f'logps_{mode}/chosen': policy_logps, f'loss/{mode}': losses}


class DPOTrainer(PairedPreferenceTrainer):
    use_reference_model = True

    @dataclass(frozen=True)
    class Params(Humanline):
        beta: float = setting(0.1, 'temperature of the implied reward beta * log(pi / pi_ref)', greater_than(0))

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """L = -log sigmoid(beta h), h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]."""
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta=self.params.beta)


class CDPOTrainer(PairedPreferenceTrainer):
    use_reference_model = True

    @dataclass(frozen=True)
    class Params(Humanline):
        beta: float = setting(0.1, 'temperature of the implied reward', greater_than(0))
        epsilon: float = setting(0.2, 'share of preference labels assumed flipped (label smoothing)', between(0, 0.5))

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """L = -(1 - epsilon) log sigmoid(beta h) - epsilon log sigmoid(-beta h)."""
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta=self.params.beta, label_smoothing=self.params.epsilon)


class IPOTrainer(PairedPreferenceTrainer):
    use_reference_model = True

    @dataclass(frozen=True)
    class Params(Humanline):
        beta: float = setting(0.1, 'the regularisation tau of IPO (the target margin is 1 / (2 tau))', greater_than(0))

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """L = (h - 1 / (2 tau))^2 with tau = loss.beta."""
        return ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, tau=self.params.beta)


class SLiCTrainer(PairedPreferenceTrainer):
    use_reference_model = False

    @dataclass(frozen=True)
    class Params:
        beta: float = setting(1.0, 'the margin delta of the hinge, in nats per sequence', at_least(0))
        lambda_coef: float = setting(0.1, 'weight of the NLL regulariser on the chosen completion', at_least(0))

    def loss(self, policy_chosen_logps, policy_rejected_logps):
        """L = max(0, delta - log pi(y_w) + log pi(y_l)) - lambda log pi(y_w), delta = loss.beta."""
        return slic_loss(policy_chosen_logps, policy_rejected_logps, delta=self.params.beta,
                         lambda_coef=self.params.lambda_coef)


class SimPOTrainer(PairedPreferenceTrainer):
    use_reference_model = False
    average_log_prob = True  # loss() gets per-token mean log-probs

    @dataclass(frozen=True)
    class Params:
        beta: float = setting(10.0, 'the reward scale beta', greater_than(0))
        gamma_beta_ratio: float = setting(0.3, 'the target margin, as gamma / beta', at_least(0))

    def loss(self, policy_chosen_logps, policy_rejected_logps):
        """L = -log sigmoid(beta (r(y_w) - r(y_l) - gamma / beta)), r = mean token log-prob."""
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, beta=self.params.beta,
                          gamma_beta_ratio=self.params.gamma_beta_ratio)


class ORPOTrainer(PairedPreferenceTrainer):
    use_reference_model = False
    average_log_prob = True  # loss() gets per-token mean log-probs

    @dataclass(frozen=True)
    class Params:
        lambda_coef: float = setting(0.25, 'weight of the odds-ratio term', at_least(0))

    def loss(self, policy_chosen_logps, policy_rejected_logps):
        """L = -l(y_w) + lambda (-log sigmoid(odds(y_w) - odds(y_l))), odds(y) = l(y) - log(1 - e^l(y))."""
        return orpo_loss(policy_chosen_logps, policy_rejected_logps, lambda_coef=self.params.lambda_coef)


class BradleyTerryTrainer(RewardModelTrainer):
    """A reward model: a one-logit sequence-classification head on the policy's architecture scores each
    prompt + completion; exported as an AutoModelForSequenceClassification directory (LATEST/hf) that the
    reward-model labeler and loss=ppo's loss.reward_model load."""

    @dataclass(frozen=True)
    class Params:
        margin: float = setting(0.0, 'the least score gap a pair is pushed to')

    def loss(self, chosen_scores, rejected_scores):
        """L = -log sigmoid(s(y_w) - s(y_l) - margin)."""
        return bradley_terry_loss(chosen_scores, rejected_scores, margin=self.params.margin)


class SimpleKTOTrainer(UnpairedPreferenceTrainer):
    """The first KTO of HALOs; needs SimpleKTODataLoader's batches of half desirable, half undesirable."""

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """desirable: 1 - sigmoid(beta (r_c - KL_u)); undesirable: 1 - sigmoid(beta (KL_c - r_u)); KL = max(0, mean r)."""
        return simple_kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                               reference_rejected_logps, beta=self.params.beta)


class KTOZeroTrainer(UnpairedPreferenceTrainer):
    """Ablation: KTO with the reference point fixed at 0 and unit weights."""

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """desirable: 1 - sigmoid(beta r); undesirable: 1 - sigmoid(-beta r)."""
        return kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, reference_point=0.0, beta=self.params.beta)


class KTOTrainer(UnpairedPreferenceTrainer):
    """KTO with the reference point z0 estimated from mismatched (x_i, y_{i+1}) 'KL' examples."""
    prefixes = (schema.TARGET, schema.KL)
    loss_returns = ('losses', 'chosen_rewards', 'rejected_rewards', 'KL')

    @dataclass(frozen=True)
    class Params(UnpairedPreferenceTrainer.Params):
        desirable_weight: float = setting(1.0, 'lambda_D (keep lambda_D n_D / (lambda_U n_U) in [1, 4/3])',
                                          greater_than(0))
        undesirable_weight: float = setting(1.0, 'lambda_U', greater_than(0))

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
            reference_point=KL, beta=self.params.beta, desirable_weight=self.params.desirable_weight,
            undesirable_weight=self.params.undesirable_weight)
        return losses, chosen_rewards, rejected_rewards, KL

    def compute_losses(self, batch):
        policy_chosen_logps, policy_rejected_logps, policy_KL_logps = self.policy_logps_with_kl(batch)
        reference_target_logps, reference_KL_logps = self.reference_logps(batch)
        reference_chosen_logps, reference_rejected_logps = self.split_by_status(batch, reference_target_logps)
        losses, chosen_rewards, rejected_rewards, KL = self.checked_loss(
            policy_chosen_logps, policy_rejected_logps, policy_KL_logps,
            reference_chosen_logps, reference_rejected_logps, reference_KL_logps)
        accuracies = unpaired_accuracies(chosen_rewards - self.params.beta * KL, rejected_rewards - self.params.beta * KL)
        return losses, chosen_rewards, rejected_rewards, accuracies, {'rewards_{mode}/KL_estimate': KL.reshape(1)}


class PPOTrainer(ActorCriticTrainer):
    """Offline PPO on labelled data: reward +1 (desirable/chosen) or -1 (undesirable/rejected), or a reward
    model's score, on the last completion token; the reference model is the behaviour ("old") policy.

    Each optimizer step's microbatches are the experience: under no_grad their old log-probs, values,
    GAE advantages (whitened over the whole experience on every rank) and value targets are computed
    once, then `ppo_epochs` epochs each reshuffle the experience across microbatches and ranks,
    backpropagate every microbatch and step the optimizer (halos/actor_critic.py).
    """
    use_reference_model = True
    labels_read = (schema.IS_DESIRABLE,)

    @classmethod
    def fits_loader(cls, loader):
        """Pairs too: a pair's chosen completion scores +1, its rejected -1 (LabelledCompletions)."""
        pairs = not cls.trains_on_prompts and {schema.CHOSEN, schema.REJECTED} <= set(loader.kinds)
        return pairs or super().fits_loader(loader)

    @dataclass(frozen=True)
    class Params(ActorCriticTrainer.Params):
        reward_model: Optional[str] = setting(None, "an HF sequence classifier whose score replaces the +1/-1 labels")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.settings.model
        self.reward_model = RewardModelLabeler(self.params.reward_model, model.reference_dtype,
                                               device=self.device) if self.params.reward_model else None

    def loss(self, policy_logps, values, part, n_tokens):
        """L = mean(max(-A r, -A clip(r, 1 - c, 1 + c))) + critic_coef 1/2 mean((V - G)^2)
             + KL_coef mean(log pi - log pi_ref), r = pi / pi_old per token; token means weighted by row over n_tokens."""
        params = self.params
        return ppo_loss(policy_logps, part.old_logps, part.advantages, values, part.value_targets, part.token_weights,
                        cliprange=params.cliprange, critic_coef=params.critic_coef, KL_coef=params.KL_coef,
                        archangel=params.archangel, n_tokens=n_tokens)

    def scores(self, completions: schema.LabelledCompletions) -> torch.Tensor:
        """+1 / -1 by label, or the reward model's score of each prompt and completion (read as label.py reads
        them: the data's completions lose the assistant suffix that the reward model's format adds)."""
        if self.reward_model is None:
            return completions.is_desirable.float() * 2 - 1
        suffix = self.settings.formatting.assistant_suffix
        texts = [text[:-len(suffix)] if suffix and text.endswith(suffix) else text for text in completions.completions]
        names = [f'step {self.batch_counter} row {row}' for row in range(len(texts))]
        return torch.tensor(checked_scores(self.reward_model, completions.prompts, texts, names), device=self.device)

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


class OnlinePPOTrainer(PPOTrainer):
    """Online PPO with a KL-penalised reward (Ziegler et al. 2019; the StackLLaMA recipe): each optimizer step
    samples one completion per prompt from the current policy (the behaviour policy), scores it with
    loss.reward_function or loss.reward_model, and rewards every token with -kl_coef (log pi_old - log pi_ref),
    plus the score (minus loss.reward_baseline, optionally whitened, clipped to +-loss.score_clip) on its last
    token; GAE with value targets A + V; then PPOTrainer's epochs. kl_coef adapts towards loss.target_kl (saved
    with the state). config/loss/ppo-online.yaml holds the recipe's values of PPO's keys (ppo_epochs 4, ...)."""

    trains_on_prompts = True

    @dataclass(frozen=True)
    class Params(PPOTrainer.Params):
        reward_function: Union[str, List[str], None] = setting(
            None, 'path/to/file.py:function (or module:function) -> float, or a list of them (their sum)',
            REWARD_FUNCTIONS)
        reward_baseline: float = setting(0.0, 'subtracted from every score')
        whiten_scores: bool = setting(False, "whiten the scores over each microbatch (all ranks)")
        score_clip: Optional[float] = setting(None, 'clip the scores to [-score_clip, score_clip]', greater_than(0))
        init_kl_coef: float = setting(0.2, "the KL penalty's first coefficient", at_least(0))
        adaptive_kl: bool = setting(True, 'adapt the coefficient after every step towards target_kl')
        target_kl: float = setting(6.0, 'the summed per-sequence KL the coefficient aims at', greater_than(0))
        horizon: int = setting(10000, 'the adaptation horizon, in sequences', at_least(1))

        def __post_init__(self):
            if bool(self.reward_function) == bool(self.reward_model):
                raise ConfigError("loss=ppo-online scores its samples with one of loss.reward_function=file.py:function "
                                  "or loss.reward_model=<sequence classifier>: give exactly one (online.reward_function "
                                  "and online.reward_model are the labellers of online rounds, which it does not read)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward_function = reward_function_labeler(self.params.reward_function) if self.params.reward_function \
            else None
        self.kl_coef = self.params.init_kl_coef

    def rollout(self, batch):
        """One sample per prompt from the current policy, scored. Its seed comes from the run's seed, the data
        position and the batch's first prompt, so a resumed run draws what it would have drawn."""
        with torch.random.fork_rng():
            torch.manual_seed(zlib.crc32(f'{self.settings.seed}/{self.batches_seen}/{batch[schema.PROMPT_ID][0]}'.encode()))
            samples = [group[0] for group in self.sampler()(batch, 1)]
        rows = rl.rollout_sequences(batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK],
                                    [sample.token_ids for sample in samples], self.tokenizer.pad_token_id)
        completions = [sample.text for sample in samples]
        names = [f'held-out prompt {prompt_id} after step {self.batch_counter}' if not self.policy.training  # evaluation
                 else f'step {self.batch_counter} prompt {prompt_id}' for prompt_id in batch[schema.PROMPT_ID]]
        scores = checked_scores(self.reward_function or self.reward_model, batch[schema.PROMPT_AS_GIVEN], completions,
                                names, batch[schema.PROMPT_EXTRA])
        parts = {name: torch.tensor(values) for name, values in part_values(scores, 'reward_parts/').items()}
        raw_scores = torch.tensor(scores, device=self.device)
        scores = raw_scores - self.params.reward_baseline
        if self.params.whiten_scores:  # over the microbatch's rows on every rank
            scores, = whiten_advantages([scores], [torch.ones_like(scores)])
        if self.params.score_clip:
            scores = scores.clamp(-self.params.score_clip, self.params.score_clip)
        return rl.Rollout(rows.to(self.device), torch.ones(len(samples), device=self.device), scores,
                          {'rewards/score': raw_scores, 'completions/length': rows.labels.ne(schema.IGNORE_INDEX).sum(-1),
                           **parts})

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
        if self.params.adaptive_kl:
            kl = experience_metrics['objective/kl']
            total_kl, n_rows = all_reduce_sum(torch.stack([kl.sum(), torch.tensor(float(len(kl)), device=kl.device)])).tolist()
            self.kl_coef = adaptive_kl_coef(self.kl_coef, total_kl / n_rows, self.params.target_kl,
                                            self.params.horizon, int(n_rows))
        return loss

    def trainer_state(self):
        return {**super().trainer_state(), 'kl_coef': self.kl_coef}

    def restore_trainer_state(self, state):
        super().restore_trainer_state(state)
        self.kl_coef = state['kl_coef']


class GRPOTrainer(GroupTrainer):
    """GRPO (Shao et al., 2024) on scored completions grouped by prompt: group-normalised advantages, the
    per-token clipped ratio to the "old" policy and the k3 KL to the reference. As in HALOs-2025 the reference
    model is the old policy: offline it is the starting model; in online rounds with online.reference=previous
    it is the policy that sampled the round. loss.loss_type picks the reduction (halos/policy_gradient.py)."""
    use_reference_model = True

    @dataclass(frozen=True)
    class Params(GroupTrainer.Params):
        beta: float = setting(0.01, 'weight of the k3 KL to the reference', at_least(0))
        epsilon: float = setting(0.01, 'the clip range [1 - epsilon, 1 + epsilon_high]', greater_than(0))
        epsilon_high: Optional[float] = setting(None, "the clip range's upper side (null: epsilon)", greater_than(0))
        std_epsilon: float = setting(0.01, 'the advantage is (s - mean) / (std + std_epsilon)', at_least(0))
        unbiased_std: bool = setting(False, "the sample std (TRL) instead of the population std (HALOs)")

    def advantages(self, scores, prompt_ids):
        """A = (s - mean_g) / (std_g + std_epsilon) over each prompt's group g (all ranks)."""
        return rl.group_advantages_across_ranks(scores, prompt_ids, self.params.std_epsilon, self.params.unbiased_std)

    def loss(self, log_ratios, reference_log_ratios, advantages):
        """Per token: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta (e^d - d - 1),
        r = pi / pi_old = e^log_ratios, d = log pi_ref - log pi."""
        params = self.params
        return grpo_token_losses(log_ratios, reference_log_ratios, advantages, params.epsilon,
                                 params.epsilon_high or params.epsilon, params.beta)


class GRPOOnlineTrainer(OnlineGroupTrainer):
    """GRPO as DeepSeekMath (Shao et al., 2024) and TRL define it, online step by step (halos/online_rl.py); Dr.
    GRPO and DAPO are its presets (config/loss)."""

    @dataclass(frozen=True)
    class Params(OnlineGroupTrainer.Params):
        beta: float = setting(0.04, 'weight of the k3 KL to the starting model', at_least(0))
        loss_type: str = setting('grpo', 'the reduction of the per-token losses (see losses.grpo_loss)',
                                 one_of(*GRPO_LOSS_TYPES))
        scale_rewards: bool = setting(True, "divide by the group's std (false: Dr. GRPO)")
        std_epsilon: float = setting(1e-4, 'the advantage is (s - mean) / (std + std_epsilon)', at_least(0))

    def advantages(self, parts):
        """A_i = (s_i - mean_g s) / (std_g s + std_epsilon) over each prompt's k samples (unbiased std, as TRL);
        without scale_rewards A_i = s_i - mean_g s."""
        return [group_advantages(part.scores, part.group_ids, self.params.std_epsilon, unbiased=True,
                                 scale=self.params.scale_rewards) for part in parts]

    def loss(self, log_ratios, reference_log_ratios, advantages, mask):
        """Per token: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta (e^d - d - 1),
        r = pi / pi_old, d = log pi_ref - log pi."""
        params = self.params
        return grpo_token_losses(log_ratios, reference_log_ratios, advantages, params.epsilon,
                                 params.epsilon_high or params.epsilon, params.beta)


class GSPOTrainer(GRPOOnlineTrainer):
    """GSPO (Zheng et al., 2025): GRPO's advantages, a length-normalised sequence ratio clipped per sequence."""

    @dataclass(frozen=True)
    class Params(GRPOOnlineTrainer.Params):
        epsilon: float = setting(3e-4, 'the clip range [1 - epsilon, 1 + epsilon_high] of the sequence ratio',
                                 greater_than(0))
        epsilon_high: Optional[float] = setting(4e-4, "the clip range's upper side (null: epsilon)", greater_than(0))
        beta: float = setting(0.0, 'weight of the k3 KL to the starting model', at_least(0))

    def loss(self, log_ratios, reference_log_ratios, advantages, mask):
        """L_i = -min(s_i A_i, clip(s_i, 1 - epsilon, 1 + epsilon_high) A_i), s_i = exp(mean_t log pi / pi_old),
        on each of its tokens; plus beta k3 per token."""
        params = self.params
        losses, stats = sequence_clipped_losses(log_ratios, mask, advantages, params.epsilon,
                                                params.epsilon_high or params.epsilon, length_normalised=True)
        kl = torch.exp(reference_log_ratios) - reference_log_ratios - 1
        return losses + params.beta * kl, {**stats, 'KL': kl.detach()}


class RLOOTrainer(OnlineGroupTrainer):
    """RLOO (Ahmadian et al., 2024) as TRL's RLOOTrainer: the KL in the reward, a leave-one-out baseline."""

    @dataclass(frozen=True)
    class Params(OnlineGroupTrainer.Params):
        beta: float = setting(0.05, 'weight of the sequence KL subtracted from each score', at_least(0))
        loss_type: str = setting('grpo', 'the reduction (grpo: the mean over sequences)', one_of(*GRPO_LOSS_TYPES))

    def advantages(self, parts):
        """A_i = r_i - mean of r over the other samples of its prompt, r_i = s_i - beta sum_t (log pi_old -
        log pi_ref) (the log-probs the sampler recorded)."""
        return [rloo_advantages(part.scores - self.params.beta * part.sampled_kl().sum(-1), part.group_ids)
                for part in parts]

    def score_advantages(self, parts):
        return [rloo_advantages(part.scores, part.group_ids) for part in parts]

    def loss(self, log_ratios, reference_log_ratios, advantages, mask):
        """L_i = -min(s_i A_i, clip(s_i, 1 - epsilon, 1 + epsilon_high) A_i), s_i = exp(sum_t log pi / pi_old)."""
        params = self.params
        return sequence_clipped_losses(log_ratios, mask, advantages, params.epsilon,
                                       params.epsilon_high or params.epsilon, length_normalised=False)


class ReinforcePPTrainer(OnlineGroupTrainer):
    """REINFORCE++ (Hu et al., 2025) as OpenRLHF runs it: no critic, no group baseline, PPO's clip."""
    baseline_of = 'step'

    @dataclass(frozen=True)
    class Params(OnlineGroupTrainer.Params):
        beta: float = setting(0.01, 'weight of the KL to the starting model', at_least(0))
        kl_in_reward: bool = setting(True, 'the k1 KL in each token\'s reward (false: the k3 KL in the loss)')

    def advantages(self, parts):
        """G_t = sum_{u >= t} r_u, r_u = -beta KL_u (+ s on the last token), KL_u = log pi_old - log pi_ref as
        sampled; A = G normalised over every completion token of the step (all ranks)."""
        beta = self.params.beta if self.params.kl_in_reward else 0.0
        returns = [reinforce_pp_returns(part.scores, part.sampled_kl(), part.mask, beta) for part in parts]
        return whiten_advantages(returns, [part.mask for part in parts])

    def scores_teach(self, parts):
        """The baseline is the step's (every rank's): the scores teach where two samples that carry loss differ."""
        carried = [score for part in parts for score, weight in zip(part.scores.tolist(), part.weights.tolist())
                   if weight > 0]
        return len(set(all_gather_list(carried))) > 1

    def loss(self, log_ratios, reference_log_ratios, advantages, mask):
        """Per token: -min(r A_t, clip(r, 1 - epsilon, 1 + epsilon_high) A_t) (+ beta k3 with kl_in_reward=false)."""
        params = self.params
        return grpo_token_losses(log_ratios, reference_log_ratios, advantages, params.epsilon,
                                 params.epsilon_high or params.epsilon, 0.0 if params.kl_in_reward else params.beta)


def get_trainer_class(name: str) -> type:
    """The trainer class called `name` in this module (so a subclass added here is found by its YAML), once it
    has what its family calls: a loss, and a family that computes it (BasicTrainer alone computes none)."""
    trainer_class = find_class(globals(), BasicTrainer, name, 'loss.trainer', 'a trainer')
    if trainer_class.get_batch_metrics is BasicTrainer.get_batch_metrics:
        raise ConfigError(f"loss.trainer={name}: it subclasses BasicTrainer, which computes no loss; subclass the "
                          f"family of its data instead (SFTTrainer, PairedPreferenceTrainer, UnpairedPreferenceTrainer, "
                          f"...; docs/extending.md) and write its loss()")
    if not callable(getattr(trainer_class, 'loss', None)):
        raise ConfigError(f"loss.trainer={name}: it has no loss() method, which its family calls with the batch's "
                          f"log-probs (docs/extending.md)")
    return trainer_class
