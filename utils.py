"""Shared helpers: distributed no-ops at world size 1, seeding, class registries, log-probs of logits and
metric accumulation.

Every distributed helper works without a process group (one process), so single-process
runs and unit tests need no `torch.distributed` setup.
"""
import contextlib
import ctypes
import ctypes.util
import itertools
import os
import random
import socket
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------- distributed

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def on_rank0() -> bool:
    """Rank 0 of the process group; before torchrun's processes join it (while the settings are read), the one
    torchrun named rank 0."""
    return get_rank() == 0 if is_distributed() else os.environ.get('RANK', '0') == '0'


def rank0_print(*args, **kwargs) -> None:
    if on_rank0():
        print(*args, **kwargs, flush=True)


def init_distributed_from_env() -> bool:
    """Join the process group that `torchrun` describes in RANK/WORLD_SIZE/MASTER_ADDR; True if one was joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    # metrics and flags are reduced as CPU tensors, so GPU runs need gloo beside nccl
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over ranks (the value itself in one process). Not differentiable."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / get_world_size()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous or a local server)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def all_gather_list(items: List) -> List:
    """Every rank's items, in rank order (the items themselves in one process)."""
    if not is_distributed():
        return items
    parts = [None] * get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def all_gather_rows(tensor: torch.Tensor, pad_value) -> torch.Tensor:
    """Every rank's [rows, T] tensor concatenated along rows, in rank order (T padded to the longest on the right).

    Ranks may hold different numbers of rows and lengths. One process: the tensor itself.
    """
    if not is_distributed():
        return tensor
    shape = torch.tensor(tensor.shape, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(get_world_size())]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    length = max(int(s[1]) for s in shapes)
    padded = pad_to_length(pad_to_length(tensor, length, pad_value), max(rows), pad_value, dim=0)
    gathered = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(gathered, rows)])


def clip_gradient_norm(parameters, max_norm: float) -> float:
    """Clip the gradients of `parameters` to `max_norm` by their global norm (under FSDP2 the norm of the
    sharded DTensors is the norm over all shards); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return (norm.full_tensor() if hasattr(norm, 'full_tensor') else norm).item()


def chunked(iterable: Iterable, size: int) -> Iterator[List]:
    """Consecutive lists of `size` items (the last one may be shorter)."""
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# ---------------------------------------------------------------- seeding and registries

def autocast(device_type: str, dtype: Optional[str]):
    """torch.autocast in `dtype` (a torch dtype name such as 'bfloat16'); nothing when it is None."""
    return torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
RETAINED_MMAP_MAX, RETAINED_TRIM_THRESHOLD = 0, 2 ** 31 - 1  # their values under retain_freed_memory


def retain_freed_memory() -> bool:
    """Keep memory the process frees for its next allocations instead of returning it to the system
    (glibc malloc: no mmap per large block, no trimming of the heap). Each training step then reuses the
    pages of the last one (activations, logits) rather than faulting fresh zeroed pages in, which is slow on a
    virtual machine; the process's peak memory stays about the same (docs/benchmarks.md) but is not given back
    until it exits. The role jemalloc or tcmalloc play in PyTorch's
    CPU tuning guide, without a dependency. Returns whether it applied (False off glibc)."""
    libc_path = ctypes.util.find_library('c')
    if not libc_path:
        return False
    libc = ctypes.CDLL(libc_path)
    if not hasattr(libc, 'mallopt'):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, RETAINED_MMAP_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, RETAINED_TRIM_THRESHOLD))


def start_process(seed: int, retain_memory: bool) -> None:
    """The process-wide settings a run starts with (train.py's build_trainer, eval.py): the seeds of every RNG
    and, with `retain_memory` (config retain_freed_memory), `retain_freed_memory`."""
    if retain_memory:
        retain_freed_memory()
    set_seed(seed)


def is_concrete(found, base: type) -> bool:
    """Whether `found` is a concrete subclass of `base`: not `base` itself, nor a class that sets `abstract = True`
    in its own body."""
    return (isinstance(found, type) and issubclass(found, base) and found is not base
            and not found.__dict__.get('abstract'))


def concrete_classes(namespace: Dict, base: type) -> Dict[str, type]:
    """The concrete subclasses of `base` that `namespace` (a module's globals) defines, by name."""
    return {name: found for name, found in namespace.items() if is_concrete(found, base) and name == found.__name__}


def find_class(namespace: Dict, base: type, name: str, key: str, description: str) -> type:
    """The concrete subclass of `base` called `name` in `namespace`, else a ConfigError naming the config `key` and
    the valid names."""
    from halos.errors import ConfigError
    found = namespace.get(name)
    if not is_concrete(found, base):
        raise ConfigError(f"{key}={name} is not {description}; valid: "
                          f"{', '.join(sorted(concrete_classes(namespace, base)))}")
    return found


# ---------------------------------------------------------------- log-probs

def get_batch_logps(logits: torch.Tensor, labels: torch.Tensor, average_log_prob: bool = False,
                    token_level: bool = False) -> torch.Tensor:
    """Log-probs of the label tokens under the logits, in fp32.

    logits: [B, T, V]; labels: [B, T] with -100 on prompt and padding positions.
    Token t+1 is predicted from position t, so labels are shifted left by one.
    Returns [B] sums over completion tokens (or their mean with `average_log_prob`),
    or the masked per-token values [B, T-1] with `token_level`.

    log p(y_t) = logit[y_t] - logsumexp(logits): a gather after one logsumexp, so no
    [B, T, V] log-softmax tensor is ever materialised.
    """
    labels = labels[:, 1:]
    logits = logits[:, :-1, :]
    mask = labels != -100
    safe_labels = labels.masked_fill(~mask, 0)
    label_logits = torch.gather(logits, 2, safe_labels.unsqueeze(2)).squeeze(2).float()
    token_logps = (label_logits - torch.logsumexp(logits.float(), dim=-1)) * mask
    if token_level:
        return token_logps
    if average_log_prob:
        return token_logps.sum(-1) / mask.sum(-1).clamp(min=1)
    return token_logps.sum(-1)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i over the global microbatch: this rank's weighted sum over the ranks' mean weight
    sum, so that the mean over ranks (FSDP's gradient average) is the global weighted mean. Unit weights give
    values.mean() exactly; all-zero weights give 0."""
    weights = weights.to(values.device, values.dtype)
    total = all_reduce_mean(weights.sum())
    return (values * weights).sum() / total.clamp(min=torch.finfo(values.dtype).tiny)


def completion_lengths(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B] number of completion tokens of each row."""
    return (labels[:, 1:] != -100).sum(1)


def pad_to_length(tensor: torch.Tensor, length: int, pad_value, dim: int = -1) -> torch.Tensor:
    """Right-pad `tensor` along `dim` to `length`."""
    if tensor.size(dim) >= length:
        return tensor
    pad_size = list(tensor.shape)
    pad_size[dim] = length - tensor.size(dim)
    return torch.cat([tensor, pad_value * torch.ones(*pad_size, dtype=tensor.dtype, device=tensor.device)], dim=dim)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0


# ---------------------------------------------------------------- metrics

class MetricAccumulator:
    """Per-key running sums and counts of per-example values, reduced over ranks at read time.

    Every rank must `add` the same keys (an empty tensor is fine), so that the all-reduce
    in `means` lines up across ranks.
    """

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}

    def add(self, name: str, values) -> None:
        values = torch.as_tensor(values).detach().float().flatten().cpu()
        self.sums[name] = self.sums.get(name, 0.0) + values.sum().item()
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def means(self) -> Dict[str, float]:
        names = sorted(self.sums)
        totals = torch.tensor([[self.sums[n], self.counts[n]] for n in names], dtype=torch.float64).reshape(-1, 2)
        totals = all_reduce_sum(totals)
        return {n: (s / c) for n, (s, c) in zip(names, totals.tolist()) if c > 0}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def add_margins(metrics: Dict[str, float]) -> Dict[str, float]:
    """Adds rewards_<mode>/margins = mean chosen reward - mean rejected reward, where both exist."""
    for name in list(metrics):
        if name.endswith("/chosen") and name.startswith("rewards_"):
            rejected = name[: -len("chosen")] + "rejected"
            if rejected in metrics:
                metrics[name[: -len("chosen")] + "margins"] = metrics[name] - metrics[rejected]
    return metrics


def formatted_dict(d: Dict) -> Dict:
    return {k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in d.items()}
