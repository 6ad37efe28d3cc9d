"""What both sides of the benchmark share: the halos config of a run, its data, and the result file.

A run is described by a spec (a JSON file the parent writes): the trainer name ('sft', 'dpo' or
'kto'), the number of steps and the halos command-line overrides. Both sides compose the very same
halos config from those overrides, so they read the same batch size, lengths, dtype, optimizer,
learning rate, warmup, clipping norm and beta, and both take their examples, in the same order,
from halos' own data loader.
"""
import json
import os
import resource
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils import RETAINED_MMAP_MAX, RETAINED_TRIM_THRESHOLD  # noqa: E402 (after ROOT is on the path)

# glibc's environment settings for what utils.retain_freed_memory sets in halos' processes (no mmap per large
# block, no heap trimming): --trl-retains-memory gives them to TRL's processes
RETAIN_FREED_MEMORY_ENV = {'MALLOC_MMAP_MAX_': str(RETAINED_MMAP_MAX), 'MALLOC_TRIM_THRESHOLD_': str(RETAINED_TRIM_THRESHOLD)}

# the sequences of a halos batch that go through the policy with a gradient, per trainer
GRAD_PREFIXES = {'sft': ('target',), 'dpo': ('chosen', 'rejected'), 'kto': ('target',)}


RESULTS_DIR = os.path.join(ROOT, 'bench', 'results')
SMOKE_RESULTS_DIR = os.path.join(ROOT, 'runs', 'bench-smoke')  # a quick check never replaces the published results


def with_defaults(args, full: Dict, smoke: Dict):
    """The parsed arguments with the settings left unset taken from `smoke` (under --smoke) or `full`, and the
    report's directory, where unset: bench/results, or runs/bench-smoke under --smoke."""
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out_dir = args.out_dir or (SMOKE_RESULTS_DIR if args.smoke else RESULTS_DIR)
    return args


def read_spec(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def compose_config(overrides: List[str]):
    """The checked halos settings that `python train.py <overrides>` would run with."""
    from hydra import compose, initialize_config_dir
    from halos.build import run_settings
    with initialize_config_dir(config_dir=os.path.join(ROOT, 'config'), version_base=None):
        config = compose('config', overrides=list(overrides))
    return run_settings(config, overrides)


def halos_train_batches(config, tokenizer) -> List[Dict]:
    """The collated training batches of the run, in the order halos trains on them."""
    from halos.build import build_loader
    return list(build_loader(config, tokenizer, 'train'))


def unpadded_sequences(batch: Dict, prefix: str) -> List[List[int]]:
    """The token ids of each `<prefix>_combined` sequence of a halos batch, without padding."""
    ids, mask = batch[f'{prefix}_combined_input_ids'], batch[f'{prefix}_combined_attention_mask']
    return [row[:int(m.sum())].tolist() for row, m in zip(ids, mask)]


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib():
    """The most GPU memory PyTorch's allocator held at once in this process (None without CUDA)."""
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def write_result(path: str, result: Dict) -> None:
    with open(path, 'w') as f:
        json.dump(result, f, indent=1)
