"""GPU memory per rank of FSDP2 training, on paper: what `python -m halos.memory_plan` prints (docs/gpu.md quotes it).

FSDP2 (halos.loop.shard_model) splits every parameter across the ranks, and with it its gradient and its optimizer
state, so each rank holds 1/world of them. The rest of a rank's memory is its own: the activations its share of the
microbatch keeps for the backward pass, the logits, and FSDP2's working set (the units gathered whole around their
forward and backward). tests/test_fsdp_memory.py checks the sharded part against halos' own wrapping of a
Llama-7B-shaped model in a simulated world of 8 ranks, and the activation formula against a measurement.
"""
import argparse
import math
import os
from dataclasses import dataclass
from typing import List, Optional

GIB = 2 ** 30
DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2, 'float64': 8}
# state tensors per parameter of torch's optimizers at their defaults (RMSprop and SGD without momentum); each in the
# parameter's dtype, as torch.optim keeps them
OPTIMIZER_STATES = {'AdamW': 2, 'Adam': 2, 'RMSprop': 1, 'SGD': 0}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-architecture decoder."""
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    @classmethod
    def of(cls, config) -> 'Architecture':
        """From a transformers LlamaConfig (or any config with its field names)."""
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size,
                   config.num_attention_heads, config.num_key_value_heads, bool(config.tie_word_embeddings))

    def block_params(self) -> int:
        """One decoder layer: q and o (h x h), k and v (h x kv width), gate, up and down (h x i), two RMSNorms."""
        kv_width = self.hidden // self.heads * self.kv_heads
        return 2 * self.hidden ** 2 + 2 * self.hidden * kv_width + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def root_params(self) -> int:
        """What is outside the layers: embeddings, the LM head (unless tied to them), the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def n_params(self) -> int:
        return self.layers * self.block_params() + self.root_params()

    def layer_activation_bytes(self) -> int:
        """Bytes one decoder layer keeps per token for its backward pass in bf16 under SDPA or flash-attention (no
        attention matrix), as saved-tensor hooks measure it on transformers' LlamaDecoderLayer: 24 per hidden unit
        (each RMSNorm's float32 input and bf16 output, q, k and v after rotation, the attention output and the
        inputs of the projections), 8 per MLP unit (gate, up, the activated gate, their product), a float32
        log-sum-exp per head and each RMSNorm's float32 inverse norm."""
        return 24 * self.hidden + 8 * self.intermediate + 4 * self.heads + 8


LLAMA_7B = Architecture(hidden=4096, intermediate=11008, layers=32, vocab=32000, heads=32, kv_heads=32)


@dataclass(frozen=True)
class ShardedState:
    """Bytes one rank holds of the policy's parameters, gradients and optimizer state under FSDP2."""
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def fsdp_memory_per_rank(n_params: int, world: int, param_bytes: int, optimizer_states: int = 2,
                         state_bytes: Optional[int] = None) -> ShardedState:
    """Each rank's 1/world of the parameters, of their gradients (same dtype) and of the optimizer's
    `optimizer_states` tensors per parameter (`state_bytes` each; torch.optim's: the parameter's dtype). FSDP2 pads
    each tensor's first dimension to a multiple of `world`; here it is left out (none for Llama-7B's shapes)."""
    shard = math.ceil(n_params / world)
    return ShardedState(shard * param_bytes, shard * param_bytes,
                        optimizer_states * shard * (param_bytes if state_bytes is None else state_bytes))


@dataclass(frozen=True)
class Workload:
    """A training run's shape on one rank."""
    name: str
    grad_sequences: int        # sequences per example through the policy with a gradient (DPO: chosen, rejected)
    reference_held: bool       # a reference model stays in memory (not under cache_reference_logprobs, or SFT)


WORKLOADS = (Workload('SFT', 1, False), Workload('DPO', 2, True), Workload('DPO, reference cache', 2, False),
             Workload('KTO', 1, True))
LOGIT_BYTES = 14  # per predicting position and vocabulary entry: float32 logits kept for the backward pass, then
# float32 softmax, float32 and bf16 gradients while it runs


@dataclass(frozen=True)
class Estimate:
    workload: Workload
    checkpointing: bool
    sharded: ShardedState      # the policy's parameters, gradients, optimizer state
    reference: int             # the reference model's shard
    activations: int           # kept for the backward pass (and, with checkpointing, one layer recomputed)
    logits: int
    working_set: int           # FSDP2: the root unit and two layers gathered whole, one layer's full gradients

    @property
    def total(self) -> int:
        return self.sharded.total + self.reference + self.activations + self.logits + self.working_set


def estimate(workload: Workload, architecture: Architecture, world: int, batch_size: int, max_length: int,
             param_bytes: int, optimizer_states: int, checkpointing: bool) -> Estimate:
    """Peak memory of one rank for one microbatch of `batch_size` examples (global, split across `world` ranks),
    every sequence `max_length` tokens long and every position predicting a label (an upper bound)."""
    tokens = batch_size // world * workload.grad_sequences * max_length
    per_layer = architecture.layer_activation_bytes()
    if checkpointing:  # each layer keeps its input; the backward recomputes one layer at a time
        activations = tokens * (architecture.layers * param_bytes * architecture.hidden + per_layer)
    else:
        activations = tokens * architecture.layers * per_layer
    n_params = architecture.n_params()
    block = architecture.block_params() * param_bytes
    return Estimate(workload, checkpointing, fsdp_memory_per_rank(n_params, world, param_bytes, optimizer_states),
                    reference=math.ceil(n_params / world) * param_bytes if workload.reference_held else 0,
                    activations=activations, logits=tokens * architecture.vocab * LOGIT_BYTES,
                    working_set=architecture.root_params() * param_bytes + 3 * block)


def gib(n_bytes: int) -> str:
    return f'{n_bytes / GIB:.1f}'


def markdown(estimates: List[Estimate], budget_gib: float) -> str:
    """The table docs/gpu.md quotes."""
    lines = ['| run | activation checkpointing | params + grads + optimizer | reference | activations | logits | '
             'FSDP2 working set | total (GiB) | fits |',
             '|---|---|---|---|---|---|---|---|---|']
    for e in estimates:
        lines.append(f"| {e.workload.name} | {'on' if e.checkpointing else 'off'} | {gib(e.sharded.total)} | "
                     f"{gib(e.reference)} | {gib(e.activations)} | {gib(e.logits)} | {gib(e.working_set)} | "
                     f"**{gib(e.total)}** | {'yes' if e.total / GIB <= budget_gib else 'no'} |")
    return '\n'.join(lines)


def model_settings(model: str) -> dict:
    """config/model/<model>.yaml over base_model.yaml, as Hydra composes them."""
    from omegaconf import OmegaConf
    directory = os.path.join(ROOT, 'config', 'model')
    merged = OmegaConf.merge(OmegaConf.load(os.path.join(directory, 'base_model.yaml')),
                             OmegaConf.load(os.path.join(directory, f'{model}.yaml')))
    merged.pop('defaults', None)
    return OmegaConf.to_container(merged)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--world', type=int, default=8, help='ranks (GPUs)')
    parser.add_argument('--gpu-gib', type=float, default=79.6, help="a GPU's memory (an H100 80GB: 81,559 MiB)")
    parser.add_argument('--headroom', type=float, default=0.1,
                        help='share kept free for the CUDA context and the allocator\'s fragmentation')
    parser.add_argument('--optimizer', default='AdamW', choices=sorted(OPTIMIZER_STATES))
    parser.add_argument('--batch-size', type=int, help='model.batch_size (default: config/model/llama7b.yaml\'s)')
    parser.add_argument('--max-length', type=int, help='model.max_length (default: config/model/llama7b.yaml\'s)')
    args = parser.parse_args(argv)
    settings = model_settings('llama7b')
    settings.update({key: value for key, value in (('batch_size', args.batch_size), ('max_length', args.max_length))
                     if value is not None})
    param_bytes = DTYPE_BYTES[settings['policy_dtype']]
    states = OPTIMIZER_STATES[args.optimizer]
    estimates = [estimate(w, LLAMA_7B, args.world, settings['batch_size'], settings['max_length'], param_bytes,
                          states, checkpointing) for w in WORKLOADS for checkpointing in (True, False)]
    budget = args.gpu_gib * (1 - args.headroom)
    print(f"llama7b ({LLAMA_7B.n_params():,} parameters), {args.world} ranks, batch_size {settings['batch_size']} "
          f"({settings['batch_size'] // args.world} examples per rank), max_length {settings['max_length']}, "
          f"policy and reference {settings['policy_dtype']}, {args.optimizer} ({states} states per parameter); "
          f"fits: at most {budget:.1f} GiB ({1 - args.headroom:.0%} of {args.gpu_gib} GiB)\n")
    print(markdown(estimates, budget))


if __name__ == '__main__':
    main()
