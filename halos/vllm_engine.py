"""Sampling during training through one colocated vLLM engine whose weights follow the policy.

Online rounds, online PPO and step-level RL sample from the policy as it trains. Where vLLM is installed and a
GPU is present (`online.sampler=auto`, or `vllm`), each process keeps one vLLM engine for the whole run, on its
own GPU beside the trainer (its share of the GPU's memory: `online.vllm_gpu_memory_utilization`). The engine
is built once from the policy's config with placeholder weights; before it samples after an optimizer step (or
a resume) it takes the policy's current weights in place through vLLM's `load_weights`, streamed one tensor at
a time: LoRA adapters merged into their base weights (the live policy keeps its adapters), FSDP2's shards
gathered into full tensors (every rank gathers together; each rank's engine samples that rank's prompts).
Elsewhere halos' own decoding loop samples (halos/sampling.py). Both give the same Samples: tokens, text,
whether EOS ended them, and each token's log-prob at temperature 1.
"""
import dataclasses
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from halos import batch as schema
from halos import lora
from halos.errors import ConfigError
from halos.sampling import Sample, Sampler, SamplingOptions, halos_sampler, resolved
from utils import get_rank, get_world_size, rank0_print


@dataclass(frozen=True)
class EngineChoice:
    """Who samples as the policy trains (the online section's sampler keys)."""
    sampler: str = 'halos'               # auto (vLLM where it runs, else halos' loop), halos or vllm
    gpu_memory_utilization: float = 0.3  # the vLLM engine's share of its GPU: its weights and its KV cache


def vllm_unavailable() -> Optional[str]:
    """Why vLLM cannot sample here, or None when it can."""
    if importlib.util.find_spec('vllm') is None:
        return 'vllm is not installed'
    if not torch.cuda.is_available():
        return 'no CUDA GPU is present'
    return None


def chosen_sampler(choice: EngineChoice) -> str:
    """'vllm' or 'halos' for this machine; `auto` says in one line why it falls back to halos' loop."""
    if choice.sampler == 'halos':
        return 'halos'
    reason = vllm_unavailable()
    if reason is None:
        return 'vllm'
    if choice.sampler == 'vllm':
        raise ConfigError(f"online.sampler=vllm but {reason}: install requirements-gpu.txt on a GPU machine, or set "
                          f"online.sampler=auto (halos' loop where vLLM cannot run)")
    rank0_print(f"sampling with halos' decoding loop: {reason} (online.sampler=auto uses vLLM where it runs)")
    return 'halos'


# ---------------------------------------------------------------- the policy's weights, as vLLM loads them

def weights_for_vllm(policy: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """lora.merged_weights as one dict (all tensors at once: for tests and small models)."""
    return dict(lora.merged_weights(policy))


# ---------------------------------------------------------------- the engine

def architecture_dir(policy: torch.nn.Module, tokenizer, directory: str) -> str:
    """An HF directory with the policy's config and the tokenizer but no weights: what the engine is built from."""
    model = lora.unwrapped(policy)
    config = model.config
    if not config.architectures:
        config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, 'generation_config', None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def engine_model(llm) -> Optional[torch.nn.Module]:
    """The torch module inside a vLLM engine running in this process (its path differs between vLLM versions), or
    None where none of the known paths leads to it."""
    paths = (('llm_engine', 'model_executor', 'driver_worker', 'worker', 'model_runner', 'model'),
             ('llm_engine', 'model_executor', 'driver_worker', 'model_runner', 'model'),
             ('llm_engine', 'engine_core', 'engine_core', 'model_executor', 'driver_worker', 'worker', 'model_runner',
              'model'))
    for path in paths:
        found = llm
        for name in path:
            found = getattr(found, name, None)
            if found is None:
                break
        if found is not None:
            return found
    return None


class VLLMEngine:
    """One colocated vLLM engine, built once; `load` puts the policy's current weights into it in place."""

    def __init__(self, policy: torch.nn.Module, tokenizer, options: SamplingOptions, dtype: str,
                 gpu_memory_utilization: float):
        os.environ.setdefault('VLLM_ENABLE_V1_MULTIPROCESSING', '0')  # the model must live in this process
        import vllm
        self.vllm, self.tokenizer = vllm, tokenizer
        self.options = resolved(options, lora.unwrapped(policy).generation_config)
        extra = {'distributed_executor_backend': 'external_launcher'} if get_world_size() > 1 else {}
        if 'logprobs_mode' in {field.name for field in dataclasses.fields(vllm.EngineArgs)}:
            extra['logprobs_mode'] = 'raw_logprobs'  # the model's own log-probs, before temperature, as halos records
        with tempfile.TemporaryDirectory(prefix='halos_vllm_') as directory:
            self.llm = vllm.LLM(model=architecture_dir(policy, tokenizer, directory), load_format='dummy', dtype=dtype,
                                seed=options.seed + get_rank(), max_model_len=options.max_length,
                                gpu_memory_utilization=gpu_memory_utilization, **extra)

    @torch.no_grad()
    def load(self, policy: torch.nn.Module) -> None:
        """The policy's current weights into the engine, in place."""
        model = engine_model(self.llm)
        if model is not None:
            model.load_weights(lora.merged_weights(policy))
        elif hasattr(self.llm, 'apply_model'):  # vLLM's own way to reach its model, where the paths above changed
            weights = lora.merged_weights(policy)
            self.llm.apply_model(lambda engine_module: engine_module.load_weights(weights))
        else:
            raise RuntimeError("cannot reach the model inside this vLLM engine to load weights into it")
        if hasattr(self.llm, 'reset_prefix_cache'):  # cached prompts were computed with the old weights
            self.llm.reset_prefix_cache()

    def sample(self, batch: Dict, k: int = 1) -> List[List[Sample]]:
        """k Samples of every prompt of the batch. Each prompt's seed is drawn from torch's generator, so a run seeded
        as halos seeds its sampling draws the same samples again."""
        options, eos = self.options, self.tokenizer.eos_token_id
        prompts = [ids[mask.bool()].tolist() for ids, mask in
                   zip(batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK])]
        params = [self.vllm.SamplingParams(
            n=k, temperature=options.temperature, top_p=options.top_p, top_k=options.top_k or -1, logprobs=0,
            max_tokens=max(1, min(options.max_length - len(ids), options.max_new_tokens or options.max_length)),
            stop_token_ids=[eos], seed=int(torch.randint(2 ** 31 - 1, ())))
            for ids in prompts]
        outputs = self.llm.generate([{'prompt_token_ids': ids} for ids in prompts], params, use_tqdm=False)
        return [[self.as_sample(choice) for choice in output.outputs] for output in outputs]

    def as_sample(self, choice) -> Sample:
        """A vLLM completion as halos' Sample: its tokens end with the EOS that stopped it, as halos' loop's do, and the
        log-probs vLLM reports are the model's own, before temperature (halos' loop records the same)."""
        ids = list(choice.token_ids)
        token_logps = [step[token].logprob for step, token in zip(choice.logprobs, ids)] if choice.logprobs else None
        return Sample(self.tokenizer.decode(ids, skip_special_tokens=True), ids, choice.finish_reason == 'stop',
                      sum(token_logps) if token_logps is not None else None, token_logps)


class PolicySampler:
    """The sampler of a policy that trains as it samples, built on first use: halos' loop, or one VLLMEngine whose
    weights are brought up to date when the policy has changed since they were loaded (`version`)."""

    def __init__(self, policy: torch.nn.Module, tokenizer, options: SamplingOptions, choice: EngineChoice,
                 dtype: str):
        self.policy, self.tokenizer, self.options, self.choice, self.dtype = policy, tokenizer, options, choice, dtype
        self.kind: Optional[str] = None
        self.engine: Optional[VLLMEngine] = None
        self.loaded_version: Optional[int] = None

    def current(self, version: int) -> Sampler:
        """A sampler of the policy as it is now; `version` counts the changes to its weights."""
        if self.kind is None:
            self.kind = chosen_sampler(self.choice)
        if self.kind == 'halos':
            return halos_sampler(self.policy, self.tokenizer, self.options)
        if self.engine is None:
            self.engine = VLLMEngine(self.policy, self.tokenizer, self.options, self.options.autocast_dtype or self.dtype,
                                     self.choice.gpu_memory_utilization)
        if self.loaded_version != version:
            self.engine.load(self.policy)
            self.loaded_version = version
        return self.engine.sample
