"""Where reference log-probs come from: a live frozen model (one no-grad forward per batch), or a cache of
every sequence's reference log-prob, computed once and kept next to the run.

A cache file is named by the identity of the reference model: everything that decides its numbers (the
weights it loads, their dtype, autocast, the attention kernel, packing, shared prompts, FSDP mixed precision, the
vocabulary size). Its entries are keyed by the tokens and label mask of each sequence, so a run on other
data or another tokenization computes only the sequences it lacks, and a different reference model
never reuses another's numbers.
"""
import hashlib
import json
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from tqdm import tqdm

from halos import batch as schema
from utils import all_reduce_sum, get_world_size, is_distributed, on_rank0, rank0_print

CACHE_FORMAT = 'halos-reference-logps-v2'
Logps = Callable[[torch.nn.Module, Dict, Sequence[str]], List[torch.Tensor]]  # (model, batch, kinds) -> [rows] per kind


def file_identity(path: str) -> Dict:
    """A file or directory of weights as (path, size, modification time) of each file in it."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, name) for name in os.listdir(path) if name.endswith(('.safetensors', '.bin', '.json', '.pt')))
    return {os.path.abspath(f): [os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files}


def model_identity(weights: str, load_from: Optional[str], dtype: str, autocast_dtype: Optional[str],
                   attention: str, padding_free: bool, share_prompts: bool, mixed_precision: Optional[str],
                   vocab_size: int) -> Dict:
    """What decides a reference model's log-probs. `weights` is the model directory (or hub id), `load_from`
    the resolved checkpoint it is initialised from; `mixed_precision` counts only when sharded."""
    return {'format': CACHE_FORMAT, 'torch': torch.__version__,
            'weights': file_identity(weights) if os.path.exists(weights) else weights,
            'load_from': file_identity(load_from) if load_from else None, 'dtype': dtype,
            'autocast_dtype': autocast_dtype, 'attention': attention, 'padding_free': padding_free,
            'share_prompts': share_prompts,
            'mixed_precision': mixed_precision, 'vocab_size': vocab_size}


def cache_path(run_dir: str, identity: Dict) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(run_dir, f'reference_logps_{digest}.pt')


def sequence_digests(batch: Dict, kind: str) -> List[bytes]:
    """A key per sequence of `kind`: a digest of its tokens and label mask."""
    sequences = schema.Sequences.of(batch, kind)
    keys = []
    for ids, labels, mask in zip(sequences.input_ids, sequences.labels, sequences.attention_mask):
        n = int(mask.sum())
        keys.append(hashlib.sha1(ids[:n].numpy().tobytes() + labels[:n].numpy().tobytes()).digest())
    return keys


class LiveReference:
    """Reference log-probs from a frozen model: one no-grad forward per batch over every kind."""

    def __init__(self, model: torch.nn.Module, logps: Logps):
        self.model, self.logps = model, logps

    def __call__(self, batch: Dict, kinds: Sequence[str]) -> List[torch.Tensor]:
        with torch.no_grad():
            return self.logps(self.model, batch, kinds)


class CachedReference:
    """Reference log-probs looked up per sequence in a cache built by `CachedReference.build`."""

    def __init__(self, entries: Dict[bytes, float], device: torch.device):
        self.entries, self.device = entries, device

    def __call__(self, batch: Dict, kinds: Sequence[str]) -> List[torch.Tensor]:
        return [torch.tensor([self.entries[key] for key in sequence_digests(batch, kind)], device=self.device)
                for kind in kinds]

    @classmethod
    def build(cls, path: str, live: LiveReference, batches: Iterable[Dict], n_batches: int, kinds: Sequence[str],
              device: torch.device) -> 'CachedReference':
        """The cache at `path`, completed with the log-probs of every sequence of `batches` it lacks (one pass;
        all ranks run the same forwards, as FSDP needs) and saved again if anything was added."""
        entries: Dict[bytes, float] = torch.load(path, weights_only=True) if os.path.exists(path) else {}
        known, added = len(entries), {}
        for batch in tqdm(batches, desc='reference log-probs', total=n_batches, disable=not on_rank0()):
            digests = [sequence_digests(batch, kind) for kind in kinds]
            missing = any(key not in entries for keys in digests for key in keys)
            if all_reduce_sum(torch.tensor(float(missing))).item() == 0:
                continue
            for keys, values in zip(digests, live(batch, kinds)):
                added.update(zip(keys, values.tolist()))
        if is_distributed():
            gathered = [None] * get_world_size()
            torch.distributed.all_gather_object(gathered, added)
            added = {k: v for part in gathered for k, v in part.items()}
        entries.update(added)
        if added and on_rank0():
            torch.save(entries, path + '.tmp')
            os.replace(path + '.tmp', path)
        rank0_print(f'reference log-probs: {known} cached in {path}, {len(added)} computed')
        return cls(entries, device)
