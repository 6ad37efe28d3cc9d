"""BasicTrainer: the training loop shared by every loss.

It owns the loop (evaluate and checkpoint every `eval_every` examples, then one optimizer step on the next
`gradient_accumulation_steps` microbatches), the forwards of policy and reference, logging, clipping,
FSDP2 sharding and the checkpoint files. Subclasses (trainers.py) provide
`get_batch_metrics(batch, mode) -> (scalar loss, {name: per-example values})`; class attributes say what a
trainer needs (`use_reference_model`, or `uses_reference(params)` where its parameters decide; `prefixes`: the
sequence kinds it reads), so nothing outside asks for a loss by name. The loop gets its settings typed
(LoopSettings, built by halos/build.py) and each trainer its loss's `Params` (`self.params`, which its `loss()`
reads).
"""
import inspect
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

import models
from halos import batch as schema
from halos import checkpoint, lora
from halos.errors import ConfigError, ContractError, StoppedBySignal, TrainingDiverged
from halos.examples import Formatting
from halos.jsonl import append_json_lines, keep_json_lines
from halos.losses import humanline_logratios
from halos.reference import CachedReference, LiveReference, cache_path, model_identity
from halos.packing import segment_attention_supported, sequence_logps, token_level_logps
from halos.sampling import Sampler, SamplingOptions
from halos.settings import ModelSettings, setting
from halos.vllm_engine import EngineChoice, PolicySampler
from utils import (MetricAccumulator, add_margins, all_gather_list, all_reduce_sum, autocast, barrier, chunked,
                   clip_gradient_norm, completion_lengths, find_class, formatted_dict, on_rank0, rank0_print,
                   weighted_mean)


def build_optimizer(name: str, parameters: List[torch.nn.Parameter], lr: float, sharded: bool) -> torch.optim.Optimizer:
    """`torch.optim.<name>`; unsharded with its fused kernel where it has one, else its foreach kernel (on CPU the
    default per-tensor loop is several times slower).
    FSDP2's sharded parameters keep torch's default: the fused kernels have no sharding rule."""
    optimizer_class = find_class(vars(torch.optim), torch.optim.Optimizer, name, 'optimizer', 'a torch.optim optimizer')
    options = inspect.signature(optimizer_class).parameters
    kernel = {} if sharded else {'fused': True} if 'fused' in options else {'foreach': True} if 'foreach' in options else {}
    return optimizer_class(parameters, lr=lr, **kernel)


def shard_model(model: torch.nn.Module, block_name: str, mesh, mixed_precision: Optional[str] = None) -> None:
    """FSDP2 over `mesh`: each block named `block_name` is its own unit (gathered for its forward and backward
    only), then the rest of the model (embeddings, final norm, LM head) one unit around them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp_policy = MixedPrecisionPolicy(param_dtype=getattr(torch, mixed_precision)) if mixed_precision \
        else MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if type(m).__name__ == block_name]
    if not blocks:
        raise ConfigError(f"model.block_name={block_name} matches no module of {type(model).__name__}")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)


METRICS = 'metrics.jsonl'  # <run_dir>/metrics.jsonl: one line per logged step, keyed by the example count


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads, built once from the run's settings by halos/build.py."""
    run_dir: str
    cache_dir: str                # where model.load_from resolves
    seed: int
    model: ModelSettings
    optimizer: str
    lr: float
    warmup_steps: int
    eval_every: int
    do_first_eval: bool
    minimum_log_interval_secs: float
    keep_intermediate_checkpoints: bool
    cache_reference_logprobs: bool
    sampling: SamplingOptions     # for trainers that sample (online PPO)
    formatting: Formatting        # how prompts were rendered (a reward model's export records it)
    use_chat_template: bool
    checkpoint_minutes: Optional[float] = None  # also checkpoint when this long passed since the last one
    engine: EngineChoice = EngineChoice()  # who samples the policy as it trains: halos' loop or a vLLM engine


@dataclass(frozen=True)
class Humanline:
    """The humanline block of a loss's Params (HALOs-2025), for losses with per-token log-ratios to a reference."""
    humanline: bool = setting(False, "clamp each token's log-ratio to [log_epsilon_P, log_epsilon_R]; the reference "
                                     "becomes the policy at every optimizer step")
    log_epsilon_P: float = setting(-1.0, 'lower bound of the clamped per-token log-ratio')
    log_epsilon_R: float = setting(1.5, 'upper bound of the clamped per-token log-ratio')

    def __post_init__(self):
        if not self.log_epsilon_P <= 0 <= self.log_epsilon_R:
            raise ConfigError(f"loss.log_epsilon_P={self.log_epsilon_P}, loss.log_epsilon_R={self.log_epsilon_R}: the "
                              f"band must hold 0 (log_epsilon_P <= 0 <= log_epsilon_R), or the reference itself is "
                              f"clamped")
        if self.log_epsilon_P == self.log_epsilon_R:
            raise ConfigError(f"loss.log_epsilon_P=loss.log_epsilon_R={self.log_epsilon_R}: a band of no width clamps "
                              f"every token's log-ratio to 0 and leaves no gradient, so nothing would train")


class BasicTrainer:
    """The training loop, evaluation, logging, clipping, sharding and checkpoints."""
    use_reference_model = False
    prefixes: Tuple[str, ...] = (schema.TARGET,)  # the sequence kinds of a batch that go through the models
    average_log_prob = False    # loss() gets per-token mean log-probs instead of sums (SimPO, ORPO)
    reference_logps_cacheable = True  # cache_reference_logprobs may replace the reference (summed log-probs)
    samples_online = False      # samples and scores its own completions every step (halos/online_rl.py)
    trains_on_prompts = False   # its loader gives prompts alone (PromptDataLoader): it samples the completions
    labels_read: Tuple[str, ...] = ()  # the label fields of a batch its loss reads (is_desirable, score)
    lora_task_type = 'CAUSAL_LM'             # under model.use_peft: peft's task type of the policy
    lora_heads: Tuple[str, ...] = ()         # and its modules that train whole (no adapter)
    loss_returns: Tuple[str, ...] = ()       # what loss() returns, in order, where it returns a tuple

    @classmethod
    def fits_loader(cls, loader: type) -> bool:
        """Whether the batches of `loader` (a DataLoader class that declares its kinds) hold what this trainer reads:
        prompts alone for one that samples its completions, else every sequence kind it reads and every label."""
        if cls.trains_on_prompts:
            return loader.kinds == ()
        return set(cls.prefixes) <= set(loader.kinds) and set(cls.labels_read) <= set(loader.labels)

    @classmethod
    def uses_reference(cls, params) -> bool:
        """Whether a run with these loss parameters loads a reference model."""
        return cls.use_reference_model

    @dataclass(frozen=True)
    class Params:
        """The loss's hyperparameters (config/loss/<name>.yaml); each trainer declares its own."""

    def __init__(self, tokenizer, settings: LoopSettings, params, train_iterator, eval_iterator,
                 policy: torch.nn.Module, reference_model: Optional[torch.nn.Module] = None, rank: int = 0,
                 world_size: int = 1):
        self.tokenizer, self.settings, self.params = tokenizer, settings, params
        self.policy, self.reference_model = policy, reference_model
        self.rank, self.world_size = rank, world_size
        self.run_dir = settings.run_dir
        model = settings.model
        self.padding_free, self.autocast_dtype = model.padding_free, model.autocast_dtype
        # model.share_prompts where it applies: packed rows, and halos' attention, which reads each segment's mask
        # (under flash-attention 2 each sequence is packed with its own prompt)
        self.share_prompts = model.share_prompts and self.padding_free and segment_attention_supported(policy)
        self.max_grad_norm, self.accumulation_steps = model.max_grad_norm, model.gradient_accumulation_steps
        self.eval_every, self.do_first_eval = settings.eval_every, settings.do_first_eval
        self.minimum_log_interval_secs = settings.minimum_log_interval_secs
        self.keep_intermediate_checkpoints = settings.keep_intermediate_checkpoints
        self.humanline = isinstance(params, Humanline) and params.humanline
        self.humanline_band = (params.log_epsilon_P, params.log_epsilon_R) if self.humanline else None
        os.makedirs(self.run_dir, exist_ok=True)
        self.device = torch.device(f'cuda:{torch.cuda.current_device()}' if torch.cuda.is_available() else 'cpu')
        if self.reference_model is not None:
            self.reference_model.eval().requires_grad_(False)
        if world_size > 1:
            self.shard(model.block_name, model.fsdp_policy_mp)  # each shard moves to the device
        else:
            self.policy.to(self.device)
            if self.reference_model is not None:
                self.reference_model.to(self.device)
        if model.activation_checkpointing and hasattr(self.policy, 'gradient_checkpointing_enable'):
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        self.reference = LiveReference(self.reference_model, self.concatenated_logps) \
            if self.reference_model is not None else None
        self.reference_cache = cache_path(self.run_dir, self.reference_identity()) \
            if settings.cache_reference_logprobs and self.use_reference_model else None

        self.optimizer = self.build_optimizer(settings.optimizer, settings.lr)
        warmup = settings.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        # the items a data position counts batches of (online rounds build a loader per round: none here)
        self.data_digest = train_iterator.digest() if hasattr(train_iterator, 'digest') else None
        # and the fields its prompts give a reward function (an answer), where it samples online
        self.fields_digest = train_iterator.fields_digest() if hasattr(train_iterator, 'fields_digest') else None
        self.example_counter = 0   # training examples seen (global)
        self.batch_counter = 0     # optimizer steps taken
        self.batches_seen = 0      # global microbatches consumed: the data position
        self.grad_norm = float('nan')
        self.last_checkpoint_time = time.time()
        self.stop_signal: Optional[int] = None  # a signal that asked the run to stop after its current step
        self.next_eval: Optional[int] = None    # while train() runs: the example count of its next evaluation
        self.last_eval_metrics: Dict[str, float] = {}
        self.train_metrics = MetricAccumulator()
        self.completed_rounds = 0  # online rounds trained (halos/online.py)
        self.finished = False      # the final checkpoint is saved
        self.reference_moves = self.humanline  # its weights are then part of the checkpoint
        self.reference_is_policy = False  # the reference holds the policy's very weights (no update since a sync)
        self.policy_updates = 0    # changes to the policy's weights (steps, resumes): a vLLM engine reloads on a new one
        self.policy_sampler = PolicySampler(self.policy, tokenizer, settings.sampling, settings.engine, model.policy_dtype)
        self.set_data(train_iterator, eval_iterator)

    def set_data(self, train_iterator, eval_iterator) -> None:
        """The loaders to train and evaluate on (an online round gives each round's own); the eval batches are
        tokenized once, here."""
        self.train_iterator, self.eval_iterator = train_iterator, eval_iterator
        self.eval_batches = [] if eval_iterator is None else \
            list(tqdm(eval_iterator, desc='tokenizing eval data', disable=not on_rank0(), leave=False))

    # --- setup
    @classmethod
    def load_policy(cls, name_or_path: str, dtype: str, **kwargs) -> torch.nn.Module:
        """The policy model; PPO overrides this to add a value head."""
        return models.load_causal_lm(name_or_path, dtype, **kwargs)

    def build_optimizer(self, name: str, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(name, [p for p in self.policy.parameters() if p.requires_grad], lr,
                               sharded=self.world_size > 1)

    def shard(self, block_name: str, mixed_precision: Optional[str]) -> None:
        """FSDP2: shard every transformer block, then the whole model, of the policy and the reference."""
        for model in (self.policy, self.reference_model):
            if model is None or isinstance(model, lora.AdaptersOff):  # the policy's own weights
                continue
            shard_model(model, block_name, self.device_mesh(), mixed_precision)

    def device_mesh(self):
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(self.device.type, (self.world_size,))

    def sampler(self) -> Sampler:
        """What samples the policy as it is now (online rounds, online PPO, step-level RL): halos' loop, or the run's
        one vLLM engine with the policy's latest weights (halos/vllm_engine.py)."""
        return self.policy_sampler.current(self.policy_updates)

    def reference_identity(self) -> Dict:
        """What decides the reference model's log-probs (it names the reference cache file)."""
        model = self.settings.model
        load_from = models.resolve_load_from(model.load_from, self.settings.cache_dir) if model.load_from else None
        return model_identity(models.resolve_model_path(model.name_or_path), load_from, model.reference_dtype,
                              model.autocast_dtype, models.attention_implementation(model.use_flash_attention),
                              model.padding_free, self.share_prompts, model.fsdp_policy_mp if self.world_size > 1 else None,
                              len(self.tokenizer))

    # --- forward passes
    def concatenated_logps(self, model: torch.nn.Module, batch: Dict, prefixes: Tuple[str, ...]) -> List[torch.Tensor]:
        """Summed completion log-probs of the batch's sequences of each kind in `prefixes`.

        All rows go through one forward (packed without padding when model.padding_free, each prompt once
        for all its completions when model.share_prompts), which is faster than one forward per kind and keeps
        FSDP's collectives in step across ranks.
        Returns one [rows] tensor per kind, in fp32 (per-token means with `average_log_prob`).
        """
        sequences = schema.Sequences.stacked(batch, prefixes, self.tokenizer.pad_token_id, self.device)
        with self.autocast():
            logps = sequence_logps(model, sequences.input_ids, sequences.attention_mask, sequences.labels,
                                   padding_free=self.padding_free, share_prompts=self.share_prompts)
        if self.average_log_prob:
            logps = logps / completion_lengths(sequences.labels).clamp(min=1)
        return list(logps.split(schema.rows_per_kind(batch, prefixes)))

    def concatenated_token_logps(self, model: torch.nn.Module, batch: Dict,
                                 prefixes: Tuple[str, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs [rows, T-1] of the kinds' sequences (one forward, like concatenated_logps) and the
        mask [rows, T-1] of the positions that predict a completion token."""
        sequences = schema.Sequences.stacked(batch, prefixes, self.tokenizer.pad_token_id, self.device)
        with self.autocast():
            logps = token_level_logps(model, sequences.input_ids, sequences.attention_mask, sequences.labels,
                                      padding_free=self.padding_free, share_prompts=self.share_prompts)
        return logps, (sequences.labels[:, 1:] != schema.IGNORE_INDEX).float()

    def autocast(self):
        """torch.autocast in model.autocast_dtype around forwards (nothing when it is null)."""
        return autocast(self.device.type, self.autocast_dtype)

    def stack_sequences(self, batch: Dict, prefixes: Tuple[str, ...]) -> Tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask, labels) of every kind's sequences, stacked and right-padded, on the device."""
        sequences = schema.Sequences.stacked(batch, prefixes, self.tokenizer.pad_token_id, self.device)
        return sequences.input_ids, sequences.attention_mask, sequences.labels

    def policy_logps(self, batch: Dict, kinds: Tuple[str, ...]) -> List[torch.Tensor]:
        """Summed policy log-probs per kind, [rows] each. Under humanline the sums of the policy's per-token
        log-ratios to the reference, clamped to the band (and `self.unclamped` the share of each row's tokens
        inside it), while reference_logps gives 0: every loss() then sees clamped log-ratios."""
        if not self.humanline:
            return self.concatenated_logps(self.policy, batch, kinds)
        policy, mask = self.concatenated_token_logps(self.policy, batch, kinds)
        with torch.no_grad():
            reference, _ = self.concatenated_token_logps(self.reference_model, batch, kinds)
        logratios, inside = humanline_logratios(policy, reference, mask, *self.humanline_band)
        self.unclamped = inside / mask.sum(-1).clamp(min=1)
        return list(logratios.sum(-1).split(schema.rows_per_kind(batch, kinds)))

    def reference_logps(self, batch: Dict) -> List[torch.Tensor]:
        """Reference log-probs of every kind of the batch the trainer reads (`prefixes`); 0 under humanline."""
        if self.humanline:
            return [torch.zeros(rows, device=self.device) for rows in schema.rows_per_kind(batch, self.prefixes)]
        return self.reference(batch, self.prefixes)

    def cache_reference_logprobs(self) -> None:
        """Compute every reference log-prob of the run (train and eval) in one pass, then free the reference model."""
        batches = (batch for part in (self.train_iterator, self.eval_batches) for batch in part)
        self.reference = CachedReference.build(self.reference_cache, self.reference, batches,
                                               len(self.train_iterator) + len(self.eval_batches), self.prefixes,
                                               self.device)
        self.reference_model = None

    # --- the loop
    def get_batch_metrics(self, batch: Dict, mode: str) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def checked_loss(self, *inputs) -> tuple:
        """self.loss(*inputs), which must return the tuple `loss_returns`: unpacked where it returns anything else,
        a tensor would be split along its examples, or stop in a bare unpacking error."""
        returned = self.loss(*inputs)
        listed = isinstance(returned, (tuple, list))  # a list unpacks as well
        if not listed or len(returned) != len(self.loss_returns):
            what = f'{len(returned)} values' if listed else f'a {type(returned).__name__}'
            raise ContractError(f"{type(self).__name__}.loss returned {what}: it must return the tuple "
                                f"({', '.join(self.loss_returns)})")
        return returned

    def example_mean(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The weighted mean of loss()'s per-example losses. A loss() that returns another shape stops here: broadcast
        or summed, its losses would train on another objective without a word; and so does one whose losses
        carry no gradient (detached), which would train nothing."""
        if not isinstance(losses, torch.Tensor) or losses.shape != weights.shape:
            shape = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ContractError(f"{type(self).__name__}.loss returned losses of shape {shape}: it must return one loss "
                                f"per example of the batch, shape {list(weights.shape)}")
        if torch.is_grad_enabled() and not losses.requires_grad:
            raise ContractError(f"{type(self).__name__}.loss returned losses without a gradient (detached, or not "
                                f"computed from the policy's log-probs), which would train nothing")
        return weighted_mean(losses, weights)

    def global_batch_size(self, batch: Dict) -> int:
        return schema.batch_size(batch) * self.world_size

    def check_finite(self, loss: torch.Tensor, first_prompt: str) -> None:
        """Stop, naming the step and the batch's first prompt, when the loss is NaN or infinite on any rank."""
        finite = bool(torch.isfinite(loss))
        if all_reduce_sum(torch.tensor(0.0 if finite else 1.0)).item() == 0:
            return
        latest = os.path.join(self.run_dir, checkpoint.LATEST)
        saved = f"the last checkpoint in {latest} is intact (resume with ++resume=true)" \
            if checkpoint.resolve_checkpoint_dir(latest) else "no checkpoint had been written yet"
        where = f"on this rank ({self.rank}), first prompt {first_prompt[:80]!r}" if not finite else "on another rank"
        check = f"before any update, so not from the learning rate: check that example, the starting model and " \
                f"{type(self).__name__}.loss" if self.policy_updates == 0 else \
            "lower lr (or raise warmup_steps), or check that example"
        raise TrainingDiverged(
            f"non-finite training loss at optimizer step {self.batch_counter}, after microbatch {self.batches_seen} "
            f"({self.example_counter} examples) {where}: {check}. Nothing was saved: {saved}.")

    def accumulate(self, loss: torch.Tensor, metrics: Dict[str, torch.Tensor], first_prompt: str,
                   n_microbatches: int) -> None:
        """Check the loss, backpropagate loss / G (the mean over G microbatches = the mean over one big batch)
        and record the metrics."""
        self.check_finite(loss, first_prompt)
        (loss / n_microbatches).backward()
        for name, values in metrics.items():
            self.train_metrics.add(name, values)

    def steps_per_batch(self) -> int:
        """The optimizer steps of one train_step (PPO's epochs and GRPO's mu take several)."""
        return 1

    def train_step(self, microbatches: List[Dict]) -> float:
        """One optimizer step on G microbatches (fewer at the very end); returns the last microbatch's loss."""
        for batch in microbatches:
            loss, metrics = self.get_batch_metrics(batch, 'train')
            self.accumulate(loss, metrics, batch[schema.PROMPT_TEXT][0], len(microbatches))
        self.optimizer_step()
        return loss.item()

    def train(self) -> None:
        """Optimizer-step loop: evaluate (and checkpoint) every eval_every examples, then `train_step` on the
        next G = gradient_accumulation_steps microbatches."""
        if self.reference_cache and not isinstance(self.reference, CachedReference):
            self.cache_reference_logprobs()
        self.train_iterator.skip_batches = self.batches_seen
        with tqdm(total=len(self.train_iterator), initial=self.batches_seen, desc='training',
                  disable=not on_rank0()) as progress:  # closed before an error's line is printed
            last_log = time.time()
            if self.next_eval is None:  # else resumed: the evaluation that was due when it stopped runs first
                self.next_eval = 0 if self.do_first_eval and not self.batches_seen else \
                    (self.example_counter // self.eval_every + 1) * self.eval_every
            self.policy.train()
            stop = False
            for microbatches in chunked(self.train_iterator, self.accumulation_steps):
                if self.example_counter >= self.next_eval:
                    self.evaluate()
                    self.next_eval = (self.example_counter // self.eval_every + 1) * self.eval_every
                    if self.example_counter > 0:
                        self.save_checkpoint()

                start = time.time()
                loss = self.train_step(microbatches)
                examples = sum(self.global_batch_size(batch) for batch in microbatches)
                self.batches_seen += len(microbatches)
                self.example_counter += examples
                examples_per_second = examples / (time.time() - start)
                due = time.time() - last_log >= self.minimum_log_interval_secs
                loss_sum, due_count = all_reduce_sum(torch.tensor([loss, float(due)])).tolist()
                progress.update(len(microbatches))
                progress.set_postfix(loss=f'{loss_sum / self.world_size:.4g}',
                                     examples_per_s=f'{examples_per_second:.3g}')
                if due_count > 0:  # all ranks log together
                    self.log_train_metrics(examples_per_second)
                    last_log = time.time()
                stop = self.stop_asked()
                if stop or self.checkpoint_due():
                    self.save_checkpoint()
                if stop:
                    break
        self.next_eval = None  # the next train() (an online round's) schedules its own
        if self.train_metrics.counts:
            self.log_train_metrics(None)
        if stop:
            raise self.stopped()

    def checkpoint_due(self) -> bool:
        """checkpoint_minutes have passed since the last checkpoint (on some rank: all ranks save together)."""
        minutes = self.settings.checkpoint_minutes
        if minutes is None:
            return False
        due = time.time() - self.last_checkpoint_time >= 60 * minutes
        return all_reduce_sum(torch.tensor(float(due))).item() > 0

    def stop_asked(self) -> bool:
        """A signal asked some rank to stop (all ranks stop together)."""
        return all_reduce_sum(torch.tensor(float(self.stop_signal is not None))).item() > 0

    def stopped(self) -> StoppedBySignal:
        """What ends a run stopped by a signal, once its checkpoint is saved."""
        signum = self.stop_signal or signal.SIGTERM  # None here: another rank's signal
        return StoppedBySignal(f"stopped by {signal.Signals(signum).name} after {self.example_counter} examples, saved "
                               f"in {self.run_dir}/{checkpoint.LATEST}: continue with ++resume=true", signum)

    def optimizer_step(self) -> None:
        self.grad_norm = self.clip_gradient()
        if self.humanline:
            self.sync_reference()
        self.optimizer.step()
        self.policy_updates += 1
        self.reference_is_policy = False
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.batch_counter += 1

    def clip_gradient(self) -> float:
        return clip_gradient_norm(self.policy.parameters(), self.max_grad_norm)

    @torch.no_grad()
    def sync_reference(self) -> None:
        """The reference becomes the policy: before each step under humanline (so always the previous iterate),
        at the start of each online round with online.reference=previous."""
        for reference_parameter, parameter in zip(self.reference_model.parameters(), self.policy.parameters()):
            reference_parameter.copy_(parameter)
        model = self.settings.model
        self.reference_is_policy = model.reference_dtype == model.policy_dtype and not lora.is_lora(self.policy)

    def evaluate(self) -> Dict[str, float]:
        """Mean eval metrics over the whole test set (all ranks' slices)."""
        if not self.eval_batches:
            return {}
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
        metrics.update({'grad_norm': self.grad_norm, 'lr': self.scheduler.get_last_lr()[0],
                        'counters/examples': self.example_counter, 'counters/updates': self.batch_counter})
        if examples_per_second is not None:
            metrics['examples_per_second'] = examples_per_second
        self.train_metrics.reset()
        self.log(metrics)

    def log(self, metrics: Dict[str, float]) -> None:
        """To wandb (when a run is active) and to <run_dir>/metrics.jsonl, keyed by the example counter."""
        if not on_rank0():
            return
        wandb = sys.modules.get('wandb')  # imported (by train.py) only when a wandb run is wanted
        if wandb is not None and wandb.run is not None:
            wandb.log(metrics, step=self.example_counter)
        append_json_lines(os.path.join(self.run_dir, METRICS), [{'step': self.example_counter, **metrics}])

    # --- checkpoints (the format: halos/checkpoint.py)
    def policy_state_dict(self) -> Dict[str, torch.Tensor]:
        """The policy's full state dict; under LoRA only what trains (the adapters and any head)."""
        state = self.full_state_dict(self.policy)
        return lora.trainable_state(self.policy, state) if lora.is_lora(self.policy) else state

    @staticmethod
    def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """A model's full state dict (gathered from the shards under FSDP2) on CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self) -> Dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.policy, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def trainer_state(self) -> Dict:
        """Counters, data position and RNG: what resuming needs beyond the weights and the optimizer."""
        return {'example_counter': self.example_counter, 'batch_counter': self.batch_counter,
                'batches_seen': self.batches_seen, 'completed_rounds': self.completed_rounds,
                'finished': self.finished, 'rng': checkpoint.get_rng_state(), 'data_digest': self.data_digest,
                'fields_digest': self.fields_digest, 'next_eval': self.next_eval}

    def restore_trainer_state(self, state: Dict) -> None:
        for key, changed in (('data_digest', "the training data is not the data the checkpoint was trained on (its "
                                              "records changed), so its data position would point into other data"),
                             ('fields_digest', "the prompts' own fields (what a reward function is given beside each "
                                               "prompt, such as its answer) are not those the checkpoint was trained "
                                               "with")):
            if None not in (state.get(key), getattr(self, key)) and state[key] != getattr(self, key):
                raise ConfigError(f"resume=true: {changed}: resume with that data, or start a new exp_name from the "
                                  f"checkpoint (++model.load_from=...)")
        self.example_counter, self.batch_counter = state['example_counter'], state['batch_counter']
        self.batches_seen, self.completed_rounds = state['batches_seen'], state.get('completed_rounds', 0)
        self.finished, self.next_eval = state.get('finished', False), state.get('next_eval')
        rank_rngs = state.get('rank_rngs', [])  # a checkpoint of another world size: rank 0's for all
        checkpoint.set_rng_state(rank_rngs[self.rank] if len(rank_rngs) == self.world_size else state['rng'])
        if on_rank0():  # the steps after the checkpoint are trained, and logged, again
            keep_json_lines(os.path.join(self.run_dir, METRICS), lambda line: line['step'] <= self.example_counter)

    def save_checkpoint(self, final: bool = False) -> None:
        """Write LATEST/ (and step-<examples>/ with intermediate_checkpoints; LATEST/hf when final), atomically."""
        self.last_checkpoint_time = time.time()
        self.finished = final
        policy_state, optimizer_state = self.policy_state_dict(), self.optimizer_state_dict()
        reference_state = self.full_state_dict(self.reference_model) if self.reference_moves else None
        rank_rngs = all_gather_list([checkpoint.get_rng_state()])  # each rank's own dropout and sampling noise
        if on_rank0():
            saved = checkpoint.Checkpoint(policy_state, optimizer_state, self.scheduler.state_dict(),
                                          {**self.trainer_state(), 'rank_rngs': rank_rngs}, self.last_eval_metrics,
                                          reference_state=reference_state)
            exports = {}
            if lora.is_lora(self.policy):
                exports[checkpoint.ADAPTER] = lambda directory: lora.save_adapter(self.policy, policy_state, directory)
            if final:
                exports[checkpoint.HF_EXPORT] = lambda directory: self.export_hf(directory, self.exported_state(policy_state))
            checkpoint.save(os.path.join(self.run_dir, checkpoint.LATEST), saved, exports)
            if self.keep_intermediate_checkpoints and not final:
                checkpoint.save(os.path.join(self.run_dir, f'step-{self.example_counter}'), saved, exports)
            self.tokenizer.save_pretrained(self.run_dir)
            rank0_print(f'saved checkpoint after {self.example_counter} examples to {self.run_dir}/{checkpoint.LATEST}')
        barrier()

    def exported_state(self, policy_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """What the HF export holds: the policy's state, or under LoRA the base model with the adapters merged
        (into a fresh copy of the base, built here, so the live policy keeps its adapters)."""
        if not lora.is_lora(self.policy):
            return policy_state
        model = self.settings.model
        base = self.load_policy(model.name_or_path, model.policy_dtype, use_flash_attention=model.use_flash_attention,
                                load_from=model.load_from, cache_dir=self.settings.cache_dir, vocab_size=len(self.tokenizer))
        return lora.merged_state_dict(base, self.policy, policy_state)

    def export_hf(self, directory: str, policy_state: Dict[str, torch.Tensor]) -> None:
        checkpoint.export_hf(lora.unwrapped(self.policy), self.tokenizer, policy_state, directory)

    def load_checkpoint(self, directory: str) -> None:
        """Restore policy, optimizer, scheduler, counters, data position and RNG from a checkpoint directory."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        saved = checkpoint.load(directory)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.policy, saved.policy_state,  # under LoRA the trainable part only
                             options=StateDictOptions(full_state_dict=True, strict=not lora.is_lora(self.policy)))
        set_optimizer_state_dict(self.policy, self.optimizer, saved.optimizer_state, options=options)
        self.scheduler.load_state_dict(saved.scheduler_state)
        if saved.reference_state is not None:
            set_model_state_dict(self.reference_model, saved.reference_state, options=options)
        self.restore_trainer_state(saved.trainer_state)
        self.policy_updates += 1
        self.last_eval_metrics = saved.metrics
        rank0_print(f'resumed from {saved.directory} after {self.example_counter} examples ({self.batch_counter} steps)')
