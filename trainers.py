"""Trainers: one shared training loop and one small subclass per human-aware loss.

To add a loss, subclass PairedPreferenceTrainer (chosen/rejected pairs) or
UnpairedPreferenceTrainer (desirable/undesirable examples), override `loss`, and add a YAML file to
config/loss naming the trainer and the dataloader. `loss` receives summed log-probs of the
completions, shape [batch], and returns per-example (losses, chosen_rewards, rejected_rewards).

The pure loss functions come first; each trainer's `loss` calls one with its hyperparameters from
`self.config.loss`. BasicTrainer owns the loop, evaluation, logging, clipping and checkpoints.
"""
import contextlib
import hashlib
import itertools
import json
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import models

from utils import (MetricAccumulator, add_margins, all_gather_rows, all_reduce_mean, all_reduce_sum, barrier,
                   chunked, clip_gradient_norm, formatted_dict, get_batch_logps, get_rng_state, is_distributed,
                   load_policy_file, on_rank0, pad_to_length, rank0_print, resolve_checkpoint_dir, save_policy_file,
                   sequence_logps, set_rng_state, write_checkpoint_dir)


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


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z per position: [B, T, V] -> [B, T]."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


# ---------------------------------------------------------------- the shared loop

class BasicTrainer:
    """The training loop, evaluation, logging, clipping, sharding and checkpoints.

    Subclasses provide `get_batch_metrics(batch, mode) -> (scalar loss, {name: per-example values})`.
    Class attributes say what a trainer needs, so nothing outside asks for a loss by name.
    """
    use_reference_model = False
    prefixes: Tuple[str, ...] = ('target',)  # the sequences of a batch that go through the models

    def __init__(self, tokenizer, config, train_iterator, eval_iterator, policy: torch.nn.Module,
                 reference_model: Optional[torch.nn.Module] = None, rank: int = 0, world_size: int = 1):
        self.tokenizer, self.config = tokenizer, config
        self.train_iterator, self.eval_iterator = train_iterator, eval_iterator
        self.policy, self.reference_model = policy, reference_model
        self.rank, self.world_size = rank, world_size
        self.run_dir = config.local_run_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self.device = torch.device(f'cuda:{torch.cuda.current_device()}' if torch.cuda.is_available() else 'cpu')
        if self.reference_model is not None:
            self.reference_model.eval().requires_grad_(False)
        if world_size > 1:
            self.shard()  # fully_shard moves each shard to the device: the whole model never is
        else:
            self.policy.to(self.device)
            if self.reference_model is not None:
                self.reference_model.to(self.device)
        if config.model.activation_checkpointing and hasattr(self.policy, 'gradient_checkpointing_enable'):
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})

        self.optimizer = self.build_optimizer()
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        self.example_counter = 0   # training examples seen (global)
        self.batch_counter = 0     # optimizer steps taken
        self.batches_seen = 0      # global microbatches consumed: the data position
        self.train_metrics = MetricAccumulator()
        self.reference_logps_cache: Optional[Dict[bytes, float]] = None
        self.eval_batches = list(tqdm(eval_iterator, desc='tokenizing eval data', disable=not on_rank0(), leave=False))

    # --- setup
    @classmethod
    def load_policy(cls, name_or_path: str, dtype: str, **kwargs) -> torch.nn.Module:
        """The policy model; PPO overrides this to add a value head."""
        return models.load_causal_lm(name_or_path, dtype, **kwargs)

    def build_optimizer(self) -> torch.optim.Optimizer:
        name = self.config.optimizer
        optimizer_class = getattr(torch.optim, name, None)
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            valid = sorted(n for n, c in vars(torch.optim).items()
                           if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and n != 'Optimizer')
            raise ValueError(f"optimizer={name} is not a torch.optim optimizer; valid: {', '.join(valid)}")
        return optimizer_class(self.policy.parameters(), lr=self.config.lr)

    def shard(self) -> None:
        """FSDP2: shard every transformer block, then the whole model, of the policy and the reference."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp_dtype = self.config.model.fsdp_policy_mp
        mp_policy = MixedPrecisionPolicy(param_dtype=getattr(torch, mp_dtype)) if mp_dtype else MixedPrecisionPolicy()
        block_name = self.config.model.block_name
        for model in (self.policy, self.reference_model):
            if model is None:
                continue
            blocks = [m for m in model.modules() if type(m).__name__ == block_name]
            if not blocks:
                raise ValueError(f"model.block_name={block_name} matches no module of {type(model).__name__}")
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp_policy)
            fully_shard(model, mesh=mesh, mp_policy=mp_policy)

    # --- forward passes
    def concatenated_logps(self, model: torch.nn.Module, batch: Dict, prefixes: Tuple[str, ...]) -> List[torch.Tensor]:
        """Summed completion log-probs of the sequences `<prefix>_combined_input_ids` of each prefix.

        All rows go through one forward (packed without padding when model.padding_free), which is
        faster than one forward per prefix and keeps FSDP's collectives in step across ranks.
        Returns one [rows] tensor per prefix, in fp32.
        """
        input_ids, attention_mask, labels = self.stack_sequences(batch, prefixes)
        with self.autocast():
            logps = sequence_logps(model, input_ids, attention_mask, labels, padding_free=self.config.model.padding_free)
        return list(logps.split([batch[f'{p}_combined_input_ids'].shape[0] for p in prefixes]))

    def autocast(self):
        """torch.autocast in model.autocast_dtype around forwards (nothing when it is null)."""
        dtype = self.config.model.autocast_dtype
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()

    def stack_sequences(self, batch: Dict, prefixes: Tuple[str, ...]) -> Tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask, labels) of every prefix's sequences, stacked and right-padded, on the device."""
        length = max(batch[f'{p}_combined_input_ids'].shape[1] for p in prefixes)
        stack = lambda suffix, pad: torch.cat(
            [pad_to_length(batch[f'{p}{suffix}'], length, pad) for p in prefixes]).to(self.device)
        return (stack('_combined_input_ids', self.tokenizer.pad_token_id), stack('_combined_attention_mask', 0),
                stack('_labels', -100))

    def reference_logps(self, batch: Dict) -> List[torch.Tensor]:
        """Reference log-probs of every prefix of the batch, from the cache or one no-grad forward."""
        if self.reference_logps_cache is not None:
            return [torch.tensor([self.reference_logps_cache[key] for key in self.sequence_keys(batch, p)],
                                 device=self.device) for p in self.prefixes]
        with torch.no_grad():
            return self.concatenated_logps(self.reference_model, batch, self.prefixes)

    @staticmethod
    def sequence_keys(batch: Dict, prefix: str) -> List[bytes]:
        """A key per sequence: a digest of its tokens and label mask."""
        keys = []
        for ids, labels, mask in zip(batch[f'{prefix}_combined_input_ids'], batch[f'{prefix}_labels'],
                                     batch[f'{prefix}_combined_attention_mask']):
            n = int(mask.sum())
            keys.append(hashlib.sha1(ids[:n].numpy().tobytes() + labels[:n].numpy().tobytes()).digest())
        return keys

    def cache_reference_logprobs(self) -> None:
        """Compute every reference log-prob of the run (train and eval) in one pass, then free the reference model.

        The cache is saved next to the run, named by a digest of everything that decides the
        sequences and the reference model, and reused by a later run with the same digest.
        """
        path = os.path.join(self.run_dir, f'reference_logps_{self.reference_cache_digest()}.pt')
        if os.path.exists(path):
            self.reference_logps_cache = torch.load(path, weights_only=True)
            rank0_print(f'reusing cached reference log-probs from {path}')
        else:
            cache: Dict[bytes, float] = {}
            batches = tqdm(itertools.chain(self.train_iterator, self.eval_batches), desc='reference log-probs',
                           total=len(self.train_iterator) + len(self.eval_batches), disable=not on_rank0())
            with torch.no_grad():
                for batch in batches:
                    logps = self.concatenated_logps(self.reference_model, batch, self.prefixes)
                    for prefix, values in zip(self.prefixes, logps):
                        cache.update(zip(self.sequence_keys(batch, prefix), values.tolist()))
            if is_distributed():
                gathered = [None] * self.world_size
                torch.distributed.all_gather_object(gathered, cache)
                cache = {k: v for part in gathered for k, v in part.items()}
            if on_rank0():
                torch.save(cache, path + '.tmp')
                os.replace(path + '.tmp', path)
            self.reference_logps_cache = cache
        self.reference_model = None

    def reference_cache_digest(self) -> str:
        c = self.config
        parts = [c.model.name_or_path, c.model.load_from, c.model.reference_dtype, c.model.autocast_dtype,
                 c.model.padding_free, list(c.datasets), c.data_dir, c.seed,
                 c.model.max_length, c.model.max_prompt_length, c.model.batch_size, c.model.eval_batch_size,
                 c.n_epochs, c.n_examples, c.n_eval_examples, c.loss.dataloader, c.use_chat_template,
                 c.human_prefix, c.human_suffix, c.assistant_prefix, c.assistant_suffix,
                 c.frac_unique_desirable, c.frac_unique_undesirable, len(self.tokenizer), self.world_size]
        return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    # --- the loop
    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def global_batch_size(self, batch: Dict) -> int:
        return len(batch['prompt_text']) * self.world_size

    def check_finite(self, loss: torch.Tensor, first_prompt: str) -> None:
        """Stop, naming the step and the batch's first prompt, when the loss is NaN or infinite on any rank."""
        finite = bool(torch.isfinite(loss))
        if all_reduce_sum(torch.tensor(0.0 if finite else 1.0)).item() == 0:
            return
        latest = os.path.join(self.run_dir, 'LATEST')
        saved = f"the last checkpoint in {latest} is intact (resume with ++resume=true)" \
            if resolve_checkpoint_dir(latest) else "no checkpoint had been written yet"
        where = f"on this rank ({self.rank}), first prompt {first_prompt[:80]!r}" if not finite else "on another rank"
        raise FloatingPointError(
            f"non-finite training loss at optimizer step {self.batch_counter}, after microbatch {self.batches_seen} "
            f"({self.example_counter} examples) {where}. Nothing was saved: {saved}.")

    def accumulate(self, loss: torch.Tensor, metrics: Dict[str, torch.Tensor], first_prompt: str,
                   n_microbatches: int) -> None:
        """Check the loss, backpropagate loss / G (the mean over G microbatches = the mean over one big batch)
        and record the metrics."""
        self.check_finite(loss, first_prompt)
        (loss / n_microbatches).backward()
        for name, values in metrics.items():
            self.train_metrics.add(name, values)

    def train_step(self, microbatches: List[Dict]) -> float:
        """One optimizer step on G microbatches (fewer at the very end); returns the last microbatch's loss."""
        for batch in microbatches:
            loss, metrics = self.get_batch_metrics(batch, 'train')
            self.accumulate(loss, metrics, batch['prompt_text'][0], len(microbatches))
        self.optimizer_step()
        return loss.item()

    def train(self) -> None:
        """Optimizer-step loop: evaluate (and checkpoint) every eval_every examples, then `train_step` on the
        next G = gradient_accumulation_steps microbatches."""
        config = self.config
        if config.cache_reference_logprobs and self.use_reference_model and self.reference_logps_cache is None:
            self.cache_reference_logprobs()
        self.train_iterator.skip_batches = self.batches_seen
        progress = tqdm(total=len(self.train_iterator), initial=self.batches_seen, desc='training',
                        disable=not on_rank0())
        last_log = time.time()
        next_eval = 0 if config.do_first_eval and not self.batches_seen else \
            (self.example_counter // config.eval_every + 1) * config.eval_every
        self.policy.train()
        for microbatches in chunked(self.train_iterator, config.model.gradient_accumulation_steps):
            if self.example_counter >= next_eval:
                self.evaluate()
                next_eval = (self.example_counter // config.eval_every + 1) * config.eval_every
                if self.example_counter > 0:
                    self.save_checkpoint()

            start = time.time()
            loss = self.train_step(microbatches)
            examples = sum(self.global_batch_size(batch) for batch in microbatches)
            self.batches_seen += len(microbatches)
            self.example_counter += examples
            examples_per_second = examples / (time.time() - start)
            progress.update(len(microbatches))
            progress.set_postfix(loss=f'{loss:.4g}', examples_per_s=f'{examples_per_second:.3g}')
            due = time.time() - last_log >= config.minimum_log_interval_secs
            if all_reduce_sum(torch.tensor(float(due))).item() > 0:  # all ranks log together
                self.log_train_metrics(examples_per_second)
                last_log = time.time()
        if self.train_metrics.counts:
            self.log_train_metrics(None)
        progress.close()

    def optimizer_step(self) -> None:
        self.grad_norm = self.clip_gradient()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.batch_counter += 1

    def clip_gradient(self) -> float:
        return clip_gradient_norm(self.policy.parameters(), self.config.model.max_grad_norm)

    def evaluate(self) -> Dict[str, float]:
        """Mean eval metrics over the whole test set (all ranks' slices)."""
        self.policy.eval()
        accumulator = MetricAccumulator()
        with torch.no_grad():
            for batch in tqdm(self.eval_batches, desc='evaluating', disable=not on_rank0(), leave=False):
                _, metrics = self.get_batch_metrics(batch, 'eval')
                for name, values in metrics.items():
                    accumulator.add(name, values)
        results = add_margins(accumulator.means())
        self.policy.train()
        self.log(results)
        rank0_print(f'eval after {self.example_counter} examples: {formatted_dict(results)}')
        self.last_eval_metrics = results
        return results

    def log_train_metrics(self, examples_per_second: Optional[float]) -> None:
        metrics = add_margins(self.train_metrics.means())
        metrics.update({'grad_norm': getattr(self, 'grad_norm', float('nan')), 'lr': self.scheduler.get_last_lr()[0],
                        'counters/examples': self.example_counter, 'counters/updates': self.batch_counter})
        if examples_per_second is not None:
            metrics['examples_per_second'] = examples_per_second
        self.train_metrics.reset()
        self.log(metrics)

    def log(self, metrics: Dict[str, float]) -> None:
        """To wandb (when a run is active) and to <run_dir>/metrics.jsonl, keyed by the example counter."""
        if not on_rank0():
            return
        import wandb
        if wandb.run is not None:
            wandb.log(metrics, step=self.example_counter)
        with open(os.path.join(self.run_dir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps({'step': self.example_counter, **metrics}) + '\n')

    # --- checkpoints
    def policy_state_dict(self) -> Dict[str, torch.Tensor]:
        """The full policy state dict (gathered from the shards under FSDP2) on CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self) -> Dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.policy, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self, final: bool = False) -> None:
        """Write LATEST/ (and step-<examples>/ with intermediate_checkpoints) atomically.

        policy.pt holds HALOs' {'step_idx', 'state', 'metrics'}; optimizer.pt, scheduler.pt and
        trainer_state.pt (counters, data position, RNG) make the run resumable exactly.
        """
        metrics = getattr(self, 'last_eval_metrics', {})
        policy_state, optimizer_state = self.policy_state_dict(), self.optimizer_state_dict()
        if on_rank0():
            def write_files(directory: str) -> None:
                save_policy_file(os.path.join(directory, 'policy.pt'), self.example_counter, policy_state, metrics)
                torch.save(optimizer_state, os.path.join(directory, 'optimizer.pt'))
                torch.save(self.scheduler.state_dict(), os.path.join(directory, 'scheduler.pt'))
                torch.save({'example_counter': self.example_counter, 'batch_counter': self.batch_counter,
                            'batches_seen': self.batches_seen, 'rng': get_rng_state()},
                           os.path.join(directory, 'trainer_state.pt'))
                if final:
                    self.export_hf(os.path.join(directory, 'hf'), policy_state)

            write_checkpoint_dir(os.path.join(self.run_dir, 'LATEST'), write_files)
            if self.config.intermediate_checkpoints and not self.config.debug and not final:
                write_checkpoint_dir(os.path.join(self.run_dir, f'step-{self.example_counter}'), write_files)
            self.tokenizer.save_pretrained(self.run_dir)
            rank0_print(f'saved checkpoint after {self.example_counter} examples to {self.run_dir}/LATEST')
        barrier()

    def export_hf(self, directory: str, policy_state: Dict[str, torch.Tensor]) -> None:
        """An HF directory (safetensors, config, tokenizer with chat template) for from_pretrained."""
        self.policy.save_pretrained(directory, state_dict=policy_state)
        self.tokenizer.save_pretrained(directory)

    def load_checkpoint(self, directory: str) -> None:
        """Restore policy, optimizer, scheduler, counters, data position and RNG from a LATEST/ directory."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        resolved = resolve_checkpoint_dir(directory)
        if resolved is None or not os.path.exists(os.path.join(resolved, 'trainer_state.pt')):
            raise FileNotFoundError(f"resume=true but there is no complete checkpoint in {directory}")
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.policy, load_policy_file(os.path.join(resolved, 'policy.pt'))['state'], options=options)
        set_optimizer_state_dict(self.policy, self.optimizer,
                                 torch.load(os.path.join(resolved, 'optimizer.pt'), weights_only=True), options=options)
        self.scheduler.load_state_dict(torch.load(os.path.join(resolved, 'scheduler.pt'), weights_only=True))
        state = torch.load(os.path.join(resolved, 'trainer_state.pt'), weights_only=True)
        self.example_counter, self.batch_counter = state['example_counter'], state['batch_counter']
        self.batches_seen = state['batches_seen']
        set_rng_state(state['rng'])
        rank0_print(f'resumed from {resolved} after {self.example_counter} examples ({self.batch_counter} steps)')


# ---------------------------------------------------------------- families

class SFTTrainer(BasicTrainer):
    """Supervised fine-tuning on the target completion (also CSFT, with the conditional loader)."""

    def loss(self, policy_chosen_logps: torch.Tensor) -> torch.Tensor:
        return sft_loss(policy_chosen_logps)

    def get_batch_metrics(self, batch, mode):
        policy_logps, = self.concatenated_logps(self.policy, batch, ('target',))
        losses = self.loss(policy_logps)
        return losses.mean(), {f'logps_{mode}/chosen': policy_logps, f'loss/{mode}': losses}


class PreferenceTrainer(BasicTrainer):
    """Shared metrics of the preference trainers; subclasses provide `compute_losses`."""

    def compute_losses(self, batch: Dict):
        """-> (losses [n], chosen_rewards, rejected_rewards, accuracies [n], extra metrics {name: value})."""
        raise NotImplementedError

    def get_batch_metrics(self, batch, mode):
        losses, chosen_rewards, rejected_rewards, accuracies, extra = self.compute_losses(batch)
        metrics = {f'rewards_{mode}/chosen': chosen_rewards, f'rewards_{mode}/rejected': rejected_rewards,
                   f'rewards_{mode}/accuracies': accuracies, f'loss/{mode}': losses.detach()}
        metrics.update({name.format(mode=mode): value for name, value in extra.items()})
        return losses.mean(), metrics


class PairedPreferenceTrainer(PreferenceTrainer):
    """Trainers on (chosen, rejected) pairs: one forward per model over [chosen; rejected]."""
    prefixes = ('chosen', 'rejected')

    def forward(self, model, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        chosen_logps, rejected_logps = self.concatenated_logps(model, batch, self.prefixes)
        return chosen_logps, rejected_logps

    def compute_losses(self, batch):
        policy_chosen_logps, policy_rejected_logps = self.forward(self.policy, batch)
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

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """L = -log sigmoid(beta h), h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]."""
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta=self.config.loss.beta)


class CDPOTrainer(PairedPreferenceTrainer):
    use_reference_model = True

    def loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        """L = -(1 - epsilon) log sigmoid(beta h) - epsilon log sigmoid(-beta h)."""
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, beta=self.config.loss.beta, label_smoothing=self.config.loss.epsilon)


class IPOTrainer(PairedPreferenceTrainer):
    use_reference_model = True

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


class UnpairedPreferenceTrainer(PreferenceTrainer):
    """Trainers on desirable ('chosen') and undesirable ('rejected') examples, in any mix per batch."""
    use_reference_model = True
    prefixes = ('target',)

    @staticmethod
    def split_by_status(batch, logps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        is_chosen = torch.tensor([status == 'chosen' for status in batch['status']], device=logps.device)
        return logps[is_chosen], logps[~is_chosen]

    def forward(self, model, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        logps, = self.concatenated_logps(model, batch, ('target',))
        return self.split_by_status(batch, logps)

    def compute_losses(self, batch):
        policy_chosen_logps, policy_rejected_logps = self.forward(self.policy, batch)
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
    prefixes = ('target', 'KL')

    def forward(self, model, batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen and rejected log-probs with gradient; the KL rows without (z0 is a constant)."""
        chosen_logps, rejected_logps = super().forward(model, batch)
        with torch.no_grad():
            KL_logps, = self.concatenated_logps(model, batch, ('KL',))
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
        policy_chosen_logps, policy_rejected_logps, policy_KL_logps = self.forward(self.policy, batch)
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
    SEQUENCE_KEYS = ('input_ids', 'attention_mask', 'labels')  # the others of an experience are token-level

    def __init__(self, tokenizer, config, *args, **kwargs):
        if config.cache_reference_logprobs:
            raise ValueError("loss=ppo needs per-token reference log-probs: set cache_reference_logprobs=false")
        super().__init__(tokenizer, config, *args, **kwargs)
        self.reward_model = None
        if config.loss.reward_model:
            self.reward_model, self.reward_tokenizer = models.load_reward_model(config.loss.reward_model,
                                                                                config.model.reference_dtype)
            self.reward_model.to(self.device)

    @classmethod
    def load_policy(cls, name_or_path: str, dtype: str, **kwargs) -> torch.nn.Module:
        return models.load_causal_lm(name_or_path, dtype, value_head=True, **kwargs)

    def shard(self) -> None:
        """The float32 value head is its own FSDP2 unit, so the LM's units keep one dtype."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(self.policy.v_head, mesh=init_device_mesh(self.device.type, (self.world_size,)))
        super().shard()

    # --- experience
    def rows(self, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels, scores) of a batch's completions: unpaired targets with their
        status, or each pair's chosen then rejected completion (pairs stay in data order, so the rows of all
        ranks gathered are the rows of one process). Scores are +1/-1 or the reward model's."""
        if 'target_combined_input_ids' in batch:
            prefixes, signs = ('target',), [1.0 if status == 'chosen' else -1.0 for status in batch['status']]
            order = torch.arange(len(signs))
        else:
            prefixes, n = ('chosen', 'rejected'), len(batch['prompt_text'])
            signs = [1.0] * n + [-1.0] * n
            order = torch.arange(2 * n).view(2, n).t().flatten()  # [c0, r0, c1, r1, ...] of [c0, c1, ..., r0, r1, ...]
        input_ids, attention_mask, labels = (t[order] for t in self.stack_sequences(batch, prefixes))
        if self.reward_model is None:
            scores = torch.tensor(signs, device=self.device)
        else:
            scores = self.reward_model_scores([text for p in prefixes for text in batch[f'{p}_combined_text']])
        return input_ids, attention_mask, labels, scores[order.to(scores.device)]

    @torch.no_grad()
    def reward_model_scores(self, texts: List[str]) -> torch.Tensor:
        """The reward model's score of each text: its class-1 logit when it has two classes, else its first."""
        self.reward_tokenizer.truncation_side = 'left'  # a long text loses its prompt's start, not the completion
        inputs = self.reward_tokenizer(texts, return_tensors='pt', padding=True, truncation=True,
                                       max_length=self.config.model.max_length).to(self.device)
        logits = self.reward_model(**inputs).logits.float()
        return logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]

    def policy_forward(self, input_ids, attention_mask, labels) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, T, V], token log-probs [B, T-1], values [B, T-1]) of the policy."""
        outputs, values = self.policy_outputs(input_ids, attention_mask)
        return outputs.logits, get_batch_logps(outputs.logits, labels, token_level=True), values

    def policy_outputs(self, input_ids, attention_mask, logits_to_keep: int = 0):
        """The policy's outputs (logits of the last `logits_to_keep` positions; 0 = all) and values [B, T-1]."""
        with self.autocast():
            outputs = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  output_hidden_states=True, logits_to_keep=logits_to_keep)
        return outputs, self.policy.v_head(outputs.hidden_states[-1])[:, :-1]

    @torch.no_grad()
    def experience(self, microbatches: List[Dict]) -> Tuple[List[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """Per microbatch, [rows, T] tensors: ids, attention mask, labels, and the token-level old log-probs,
        completion mask, whitened advantages and value targets (zero in the last column). Also the
        returns and values metrics."""
        loss_config = self.config.loss
        experience, raw_advantages, metrics = [], [], {}
        for batch in microbatches:
            input_ids, attention_mask, labels, scores = self.rows(batch)
            with self.autocast():
                reference_logits = self.reference_model(input_ids=input_ids, attention_mask=attention_mask,
                                                        use_cache=False).logits
            old_logps = get_batch_logps(reference_logits, labels, token_level=True)
            _, values = self.policy_outputs(input_ids, attention_mask, logits_to_keep=1)  # values only
            mask = (labels[:, 1:] != -100).float()
            rewards = torch.zeros_like(mask)
            rewards[torch.arange(len(scores)), mask.cumsum(1).argmax(1)] = scores.float()  # on the last completion token
            advantages, returns, targets = generalized_advantages(
                values, rewards, mask, loss_config.gamma, loss_config.lam,
                target_includes_reward=not loss_config.archangel)
            full_length = lambda tokens: pad_to_length(tokens, input_ids.shape[1], 0)
            raw_advantages.append(full_length(advantages))
            experience.append({'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels,
                               'old_logps': full_length(old_logps), 'mask': full_length(mask),
                               'targets': full_length(targets)})
            for name, tokens in (('returns', returns[mask.bool()]), ('val', values[mask.bool()])):
                metrics.setdefault(f'{name}/mean', []).append(tokens.mean())
                metrics.setdefault(f'{name}/var', []).append(tokens.var(unbiased=False))
        for part, advantages in zip(experience, whiten_advantages(raw_advantages, [p['mask'] for p in experience])):
            part['advantages'] = advantages
        return experience, {name: torch.stack(values) for name, values in metrics.items()}

    def reshuffled(self, experience: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
        """The experience's rows gathered from every rank, permuted (the same seeded permutation on every
        rank, fresh at each optimizer step) and cut back into microbatches of the same sizes: this rank's
        slice of each, trimmed."""
        padding = {key: 0 for key in experience[0]}
        padding.update(input_ids=self.tokenizer.pad_token_id, labels=-100)
        gathered = {key: [all_gather_rows(part[key], pad) for part in experience] for key, pad in padding.items()}
        length = max(t.shape[1] for t in gathered['input_ids'])
        rows = {key: torch.cat([pad_to_length(t, length, padding[key]) for t in parts]) for key, parts in gathered.items()}
        sizes = [t.shape[0] for t in gathered['input_ids']]
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.batch_counter)
        permutation = torch.randperm(sum(sizes), generator=generator).to(self.device)
        return [self.trimmed({key: values[indices.tensor_split(self.world_size)[self.rank]]
                              for key, values in rows.items()}) for indices in permutation.split(sizes)]

    @classmethod
    def trimmed(cls, part: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A microbatch of experience cut to its longest sequence, its token-level tensors to one column less."""
        longest = int(part['attention_mask'].sum(1).max())
        return {key: values[:, :longest if key in cls.SEQUENCE_KEYS else longest - 1] for key, values in part.items()}

    # --- loss
    def ppo_metrics(self, part: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The PPO loss of one microbatch of experience (token means over the global microbatch) and its metrics."""
        loss_config = self.config.loss
        logits, policy_logps, values = self.policy_forward(part['input_ids'], part['attention_mask'], part['labels'])
        mask = part['mask']
        n_tokens = all_reduce_mean(mask.sum())  # gradients are averaged over ranks: this makes a global token mean
        loss, stats = ppo_loss(policy_logps, part['old_logps'], part['advantages'], values, part['targets'], mask,
                               cliprange=loss_config.cliprange, critic_coef=loss_config.critic_coef,
                               KL_coef=loss_config.KL_coef, archangel=loss_config.archangel, n_tokens=n_tokens)
        with torch.no_grad():
            entropy = (entropy_from_logits(logits[:, :-1]) * mask).sum() / n_tokens
            sequence_ratios = torch.exp(((policy_logps - part['old_logps']) * mask).sum(-1))
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
        loss, metrics = self.ppo_metrics(self.trimmed(experience[0]))
        return loss, self.named_for(mode, {**metrics, **experience_metrics})

    def train_step(self, microbatches):
        """ppo_epochs optimizer steps on the experience of G microbatches, each epoch freshly reshuffled."""
        experience, experience_metrics = self.experience(microbatches)
        for name, values in experience_metrics.items():
            self.train_metrics.add(name, values)
        for _ in range(self.config.loss.ppo_epochs):
            for part in self.reshuffled(experience):
                loss, metrics = self.ppo_metrics(part)
                first_prompt = self.tokenizer.decode(part['input_ids'][0][part['labels'][0] == -100],
                                                     skip_special_tokens=True)
                self.accumulate(loss, metrics, first_prompt, len(microbatches))
            self.optimizer_step()
        return loss.item()

    def clip_gradient(self) -> float:
        """The value head at v_head_max_grad_norm and the LM at max_grad_norm; the sum of both norms."""
        value_head = set(self.policy.v_head.parameters())
        language_model = [p for p in self.policy.parameters() if p not in value_head]
        return (clip_gradient_norm(value_head, self.config.model.v_head_max_grad_norm)
                + clip_gradient_norm(language_model, self.config.model.max_grad_norm))

    def export_hf(self, directory, policy_state):
        """The LM alone, loadable with AutoModelForCausalLM (the value head stays in policy.pt)."""
        super().export_hf(directory, {k: v for k, v in policy_state.items() if not k.startswith('v_head.')})


def get_trainer_class(name: str) -> type:
    """The trainer class called `name` in this module (so a subclass added here is found by its YAML)."""
    trainer_class = globals().get(name)
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, BasicTrainer)
            and name not in ABSTRACT_TRAINERS):
        valid = sorted(n for n, c in globals().items() if isinstance(c, type) and issubclass(c, BasicTrainer)
                       and n not in ABSTRACT_TRAINERS)
        raise ValueError(f"loss.trainer={name} is not a trainer; valid: {', '.join(valid)}")
    return trainer_class


ABSTRACT_TRAINERS = {'BasicTrainer', 'PreferenceTrainer', 'PairedPreferenceTrainer', 'UnpairedPreferenceTrainer'}
