"""Sampling completions from a policy: halos' own decoding loop on any HF causal LM, or vLLM when it is
installed and a GPU is present.

A sampler takes a batch of an SFT-style loader (left-padded `prompt_input_ids`) and k, and returns k
completions per prompt. halos' loop runs each prompt once (one prefill over the batch), then repeats its
KV cache k times and decodes the k samples together, so the prompt is never recomputed per sample. Its
choice of each token follows transformers' generate: temperature, then top-k, then top-p (nucleus);
temperature 0 decodes greedily. eval.py, the online rounds and online PPO all sample through it.
"""
import dataclasses
import importlib.util
import inspect
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from halos import batch as schema
from halos.errors import TrainingDiverged
from halos.packing import label_logps
from utils import all_reduce_sum, autocast


@dataclass(frozen=True)
class SamplingOptions:
    max_length: int                      # prompt + completion tokens
    top_p: float = 0.95
    temperature: Optional[float] = None  # None: the model's generation config; 0: greedy decoding
    top_k: Optional[int] = None          # None: the model's generation config; 0: no top-k
    max_new_tokens: Optional[int] = None  # also stop after this many new tokens
    seed: int = 0
    autocast_dtype: Optional[str] = None  # decode under torch.autocast in this dtype (None: as the weights are)


@dataclass(frozen=True)
class Sample:
    text: str            # the completion, special tokens removed
    token_ids: List[int]  # the completion's tokens, ending in EOS when it ended there
    finished: bool       # it ended with EOS (else it ran out of length)
    logp: Optional[float] = None  # log pi(completion | prompt) at temperature 1 from the decoding forwards
                                  # (None where the sampler does not record it, as with vLLM)
    token_logps: Optional[List[float]] = None  # log pi(token | prefix) of each of token_ids, likewise


Sampler = Callable[[Dict, int], List[List[Sample]]]  # (batch, k) -> k samples per prompt


@dataclass(frozen=True)
class Decoded:
    tokens: torch.Tensor       # [B * k, N] new tokens, pad after a sample's end
    token_logps: torch.Tensor  # [B * k, N] float32 log pi(token | prefix) at temperature 1, 0 after the end
    lengths: torch.Tensor      # [B * k] each sample's number of tokens, its EOS included (pad may equal EOS)

    def cpu(self) -> 'Decoded':
        return Decoded(self.tokens.cpu(), self.token_logps.cpu(), self.lengths.cpu())


def use_vllm() -> bool:
    """vLLM generates when it is installed and a GPU is present."""
    return importlib.util.find_spec('vllm') is not None and torch.cuda.is_available()


def resolved(options: SamplingOptions, generation_config) -> SamplingOptions:
    """The options with the model's generation config filling what is left unset."""
    temperature = options.temperature if options.temperature is not None else (generation_config.temperature or 1.0)
    top_k = options.top_k if options.top_k is not None else (generation_config.top_k or 0)
    return dataclasses.replace(options, temperature=temperature, top_k=top_k)


NUCLEUS_WIDTHS = (64, 1024)  # the candidate sets tried before a full sort of the vocabulary


def nucleus_sample(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[rows, V] probabilities -> [rows] tokens drawn from each row's nucleus: the most likely tokens, in
    order, while the mass before them is below top_p (transformers' top-p, which drops the tokens whose
    ascending cumulative mass is at most 1 - top_p). Exact without sorting the vocabulary: a row's nucleus
    lies inside its `width` most likely tokens once they hold top_p of the mass, so only the rows where
    they do not try the next width (and, last, the whole vocabulary)."""
    tokens = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    pending = torch.arange(len(probs), device=probs.device)
    for width in NUCLEUS_WIDTHS + (probs.shape[-1],):
        rows = probs if len(pending) == len(probs) else probs[pending]  # no copy of the whole batch's rows
        top, index = rows.topk(min(width, probs.shape[-1]), dim=-1)  # descending
        mass_before = top.cumsum(-1) - top
        covered = (top.sum(-1) >= top_p) | (width >= probs.shape[-1])
        weights = top.masked_fill(mass_before >= top_p, 0)
        weights[:, 0] = top[:, 0]                                   # the most likely token always stays
        draws = torch.multinomial(weights[covered], 1)
        tokens[pending[covered]] = index[covered].gather(1, draws).squeeze(1)
        pending = pending[~covered]
        if len(pending) == 0:
            break
    return tokens


def next_tokens(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """[rows, V] logits -> [rows] tokens: greedy at temperature 0, else sampled after temperature, top-k, top-p."""
    if options.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / options.temperature
    if options.top_k:
        kth_largest = torch.topk(logits, min(options.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float('-inf'))
    try:
        if options.top_p < 1.0:
            return nucleus_sample(logits.softmax(-1), options.top_p)
        return torch.multinomial(logits.softmax(-1), 1).squeeze(1)
    except RuntimeError as error:  # torch.multinomial's refusal of NaN or inf, checked there at no cost here
        if 'probability tensor contains' not in str(error):
            raise
        raise TrainingDiverged("sampling: the policy's next-token probabilities are NaN or inf, so its weights are "
                               "(an optimizer step that diverged, as float16 weights do, or a checkpoint saved so): "
                               "lower lr, or train with model.policy_dtype=bfloat16 or float32") from None


def cache_keyword(model) -> str:
    """The name of the forward's KV-cache argument (`cache` in recent transformers, `past_key_values` before)."""
    model = model.get_base_model() if hasattr(model, 'get_base_model') else model  # under peft's wrapper
    return 'cache' if 'cache' in inspect.signature(model.forward).parameters else 'past_key_values'


class PreallocatedLayer(DynamicLayer):
    """One attention layer's keys and values in buffers of `capacity` positions ([B, heads, capacity, head_dim]):
    each forward writes its positions in place and attends to a view of the filled ones, where DynamicLayer
    concatenates and so copies the whole cache at every decoding step. A buffer that fills up doubles (a rank
    of a multi-process decode goes on past its own budget until every rank is done)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True
        batch, heads, _, _ = key_states.shape
        dtype = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) \
            else key_states.dtype  # under autocast attention reads the cache in the autocast dtype: store it so
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1], dtype=dtype)
        self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1], dtype=dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[2]:
            self.key_buffer, self.value_buffer = (torch.cat([buffer, torch.empty_like(buffer)], dim=2)
                                                  for buffer in (self.key_buffer, self.value_buffer))
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        prefill, self.length = self.length == 0, end
        filled = self.filled()
        # the prefill attends to its keys and values as computed (as the dynamic cache's does; halos' float32
        # attention under CPU autocast reads them so), later forwards to the stored ones
        return (key_states, value_states) if prefill else filled

    def filled(self):
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self.filled()


def decoding_cache(model_config, capacity: int) -> DynamicCache:
    """The KV cache of one decode: preallocated layers of `capacity` positions where every layer attends to the
    whole sequence (transformers' dynamic layers where some slide or are not attention)."""
    cache = DynamicCache(config=model_config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, k: int, options: SamplingOptions,
           eos_token_id: int, pad_token_id: int) -> Decoded:
    """[B, P] left-padded prompts -> [B * k, N] new tokens (prompt i's samples are rows i*k .. i*k + k-1),
    pad after a sample's end, with each token's log-prob under the model at temperature 1 (what a forward of
    prompt + completion gives it), under autocast in options.autocast_dtype when set. One prefill per prompt;
    its KV cache is repeated for the k samples. Each prompt has its own length budget (max_length less its own
    length, as vLLM gives it), so a sample does not depend on the prompts batched with it. In several
    processes each decodes until every rank's samples are done."""
    device = next(model.parameters()).device
    with autocast(device.type, options.autocast_dtype):
        return decode_tokens(model, prompt_ids.to(device), prompt_mask.to(device), k, options, eos_token_id,
                             pad_token_id)


def decode_tokens(model, prompt_ids: torch.Tensor, mask: torch.Tensor, k: int, options: SamplingOptions,
                  eos_token_id: int, pad_token_id: int) -> Decoded:
    """decode's loop, for prompts on the model's device."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    budgets = options.max_length - mask.sum(-1)
    if options.max_new_tokens is not None:
        budgets = budgets.clamp(max=options.max_new_tokens)
    capacity = prompt_ids.shape[1] + max(int(budgets.max()), 1)
    cache = decoding_cache(model.config, capacity)  # filled in place by every forward
    cache_argument = {cache_keyword(model): cache}
    logits = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **cache_argument).logits[:, -1]
    if k > 1:
        cache.batch_repeat_interleave(k)
        mask, logits = mask.repeat_interleave(k, 0), logits.repeat_interleave(k, 0)
        positions, budgets = positions.repeat_interleave(k, 0), budgets.repeat_interleave(k, 0)
    position = positions[:, -1:]
    tokens, token_logps = [], []
    lengths, finished = torch.zeros_like(budgets), budgets <= 0
    while True:
        token = next_tokens(logits, options).masked_fill(finished, pad_token_id)
        tokens.append(token)
        token_logps.append(label_logps(logits, token).masked_fill(finished, 0))  # at temperature 1
        lengths += ~finished
        finished |= (token == eos_token_id) | (lengths >= budgets)
        if all_reduce_sum((~finished).sum()).item() == 0:  # under FSDP every rank runs the same forwards
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        logits = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position, use_cache=True,
                       **cache_argument).logits[:, -1]
    kept = int(lengths.max())
    return Decoded(torch.stack(tokens, 1)[:, :kept], torch.stack(token_logps, 1)[:, :kept], lengths)


def samples_from_tokens(decoded: Decoded, tokenizer, k: int) -> List[List[Sample]]:
    """Decoded rows -> k Samples per prompt."""
    samples = []
    for row, logps, length in zip(decoded.tokens.tolist(), decoded.token_logps.tolist(), decoded.lengths.tolist()):
        ids = row[:length]
        finished = bool(ids) and ids[-1] == tokenizer.eos_token_id
        samples.append(Sample(tokenizer.decode(ids, skip_special_tokens=True), ids, finished, sum(logps[:length]),
                              logps[:length]))
    return [samples[i:i + k] for i in range(0, len(samples), k)]


def halos_sampler(policy, tokenizer, options: SamplingOptions) -> Sampler:
    """halos' decoding loop (see `decode`)."""
    options = resolved(options, policy.generation_config)

    def sample(batch: Dict, k: int = 1) -> List[List[Sample]]:
        decoded = decode(policy, batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK], k, options,
                         tokenizer.eos_token_id, tokenizer.pad_token_id)
        return samples_from_tokens(decoded.cpu(), tokenizer, k)
    return sample


def vllm_sampler(policy, tokenizer, options: SamplingOptions, dtype: str) -> Sampler:
    """A sampler like `halos_sampler`, backed by vLLM (the policy is exported for it first; its n samples of a
    prompt share the prompt's prefill)."""
    import vllm
    with tempfile.TemporaryDirectory(prefix='halos_vllm_') as export_dir:
        policy.save_pretrained(export_dir)
        tokenizer.save_pretrained(export_dir)
        engine = vllm.LLM(model=export_dir, dtype=dtype, seed=options.seed)
    options = resolved(options, policy.generation_config)

    def sample(batch: Dict, k: int = 1) -> List[List[Sample]]:
        prompts = [ids[mask.bool()].tolist() for ids, mask in
                   zip(batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK])]
        params = [vllm.SamplingParams(n=k, temperature=options.temperature, top_p=options.top_p,
                                      top_k=options.top_k or -1,
                                      max_tokens=min(options.max_length - len(ids), options.max_new_tokens or 10 ** 9))
                  for ids in prompts]
        outputs = engine.generate([{'prompt_token_ids': ids} for ids in prompts], params, use_tqdm=False)
        return [[Sample(choice.text, list(choice.token_ids), choice.finish_reason == 'stop') for choice in output.outputs]
                for output in outputs]
    return sample


def make_sampler(policy, tokenizer, options: SamplingOptions, dtype: str) -> Sampler:
    """vLLM where it runs (see use_vllm), except for a policy with LoRA adapters (halos' loop samples it
    as it is, without exporting a merged copy every round)."""
    if use_vllm() and not hasattr(policy, 'peft_config'):
        return vllm_sampler(policy, tokenizer, options, dtype)
    return halos_sampler(policy, tokenizer, options)


def sample_records(sample: Sampler, loader, k: int, generator: str, limit: Optional[int] = None) -> List[Dict]:
    """k samples of every prompt of a PromptDataLoader, as HALOs' sample records: {output, prompt (as its record
    gave it: a string or turns), prompt_id (a digest of the prompt, stable across runs and rounds), sample_id,
    generator, dataset, type: 'sample'}, whether it ended with EOS (`finished`) and the prompt's own fields,
    prompt by prompt (a prompt repeated to fill a batch up once: schema.REPEATED). `limit` stops after that many
    prompts."""
    records, n_prompts = [], 0
    for batch in loader:
        repeated = batch.get(schema.REPEATED) or [False] * schema.batch_size(batch)
        for i, samples in enumerate(sample(batch, k)):
            if repeated[i]:  # it fills the batch up; its own item is sampled
                continue
            if limit is not None and n_prompts >= limit:
                return records
            records += [{**batch[schema.PROMPT_EXTRA][i], 'output': s.text, 'prompt': batch[schema.PROMPT_AS_GIVEN][i],
                         'prompt_id': batch[schema.PROMPT_ID][i], 'sample_id': sample_id, 'generator': generator,
                         'dataset': f'{batch[schema.DATASET][i]}_{loader.split}', 'type': 'sample',
                         'finished': s.finished}
                        for sample_id, s in enumerate(samples)]
            n_prompts += 1
    return records
