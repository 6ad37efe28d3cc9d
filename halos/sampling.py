"""Sampling completions from a policy: HF `generate`, or vLLM when it is installed and a GPU is present.

A sampler is a function batch -> completions (strings, the prompt removed by tokens), for the batches of an
SFT-style loader (left-padded `prompt_input_ids`). eval.py samples through it, and so can training.
"""
import importlib.util
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from halos import batch as schema

Sampler = Callable[[Dict], List[str]]


@dataclass(frozen=True)
class SamplingOptions:
    max_length: int               # prompt + completion tokens
    top_p: float = 0.95
    temperature: Optional[float] = None  # None: the model's generation config; 0: greedy decoding
    seed: int = 0


def use_vllm() -> bool:
    """vLLM generates when it is installed and a GPU is present."""
    return importlib.util.find_spec('vllm') is not None and torch.cuda.is_available()


def hf_sampler(policy, tokenizer, options: SamplingOptions) -> Sampler:
    """Completions of a batch's (left-padded) prompts with transformers' generate."""
    generate_options = dict(max_length=options.max_length, do_sample=True, top_p=options.top_p,
                            pad_token_id=tokenizer.pad_token_id)
    if options.temperature == 0:
        generate_options.update(do_sample=False, top_p=None, top_k=None, temperature=None)  # greedy decoding
    elif options.temperature is not None:
        generate_options['temperature'] = options.temperature

    def sample(batch: Dict) -> List[str]:
        prompt_ids = batch[schema.PROMPT_INPUT_IDS]
        with torch.no_grad():
            output = policy.generate(input_ids=prompt_ids.to(policy.device),
                                     attention_mask=batch[schema.PROMPT_ATTENTION_MASK].to(policy.device),
                                     **generate_options)
        return tokenizer.batch_decode(output[:, prompt_ids.shape[1]:], skip_special_tokens=True)
    return sample


def vllm_sampler(policy, tokenizer, options: SamplingOptions, dtype: str) -> Sampler:
    """A sampler like `hf_sampler`, backed by vLLM (the policy is exported for it first)."""
    import vllm
    with tempfile.TemporaryDirectory(prefix='halos_vllm_') as export_dir:
        policy.save_pretrained(export_dir)
        tokenizer.save_pretrained(export_dir)
        engine = vllm.LLM(model=export_dir, dtype=dtype, seed=options.seed)
    temperature = options.temperature if options.temperature is not None else \
        (policy.generation_config.temperature or 1.0)
    top_k = policy.generation_config.top_k or -1  # as generate() samples (vLLM's default is no top-k)

    def sample(batch: Dict) -> List[str]:
        prompts = [ids[mask.bool()].tolist() for ids, mask in
                   zip(batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK])]
        params = [vllm.SamplingParams(temperature=temperature, top_p=options.top_p, top_k=top_k,
                                      max_tokens=options.max_length - len(ids)) for ids in prompts]
        outputs = engine.generate([{'prompt_token_ids': ids} for ids in prompts], params, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]
    return sample


def make_sampler(policy, tokenizer, options: SamplingOptions, dtype: str) -> Sampler:
    return vllm_sampler(policy, tokenizer, options, dtype) if use_vllm() else hf_sampler(policy, tokenizer, options)
