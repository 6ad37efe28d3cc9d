"""The checkpoint format: one save and one load of a checkpoint directory (`LATEST/`, `step-<n>/`), and the
HF export.

    policy.pt         HALOs' {'step_idx', 'state', 'metrics'}: the policy's full state dict
    optimizer.pt      the optimizer's full state dict
    scheduler.pt      the LR scheduler's state dict
    trainer_state.pt  counters, the data position, online rounds done and every RNG's state (tensors, numbers)
    reference.pt      the reference model's state, when it moves (humanline; online rounds re-anchored to
                      the previous round's policy)
    hf/               (final checkpoint) an HF directory that AutoModelForCausalLM.from_pretrained loads
    adapter/          (LoRA) the adapter, as PeftModel.save_pretrained writes it; policy.pt then holds only
                      the trainable state (adapters and heads), hf/ the merged model

Every file loads with torch.load(weights_only=True). A directory is written into a temporary sibling and
swapped in with renames, so a crash at any moment leaves the previous checkpoint complete.
"""
import os
import random
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from halos.errors import ConfigError, DataError, MissingFileError

POLICY, OPTIMIZER, SCHEDULER, TRAINER_STATE, HF_EXPORT = 'policy.pt', 'optimizer.pt', 'scheduler.pt', 'trainer_state.pt', 'hf'
REFERENCE = 'reference.pt'
ADAPTER = 'adapter'
LATEST = 'LATEST'


def check_run_dir(run_dir: str) -> None:
    """Stop before a run writes into another run's checkpoint, which that run's next save replaces, or into an HF
    model directory, whose files it would overwrite."""
    path = os.path.abspath(run_dir)
    while os.path.dirname(path) != path:
        parent, name = os.path.split(path)
        if (name == LATEST or re.fullmatch(r'step-\d+', name)) and os.path.isfile(os.path.join(parent, 'config.yaml')):
            where = 'is' if path == os.path.abspath(run_dir) else 'lies in'
            raise ConfigError(f"{run_dir} {where} {path}, a checkpoint of the run in {parent}: give the new run a "
                              f"directory of its own (exp_name, cache_dir)")
        path = parent
    is_run = os.path.isfile(os.path.join(run_dir, 'config.yaml'))
    if os.path.isfile(os.path.join(run_dir, 'config.json')) and not is_run:
        raise ConfigError(f"{run_dir} is an HF model directory (it holds config.json), not a run's: give the new run a "
                          f"directory of its own (exp_name, cache_dir)")


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, as loaded (everything on CPU)."""
    policy_state: Dict[str, torch.Tensor]
    optimizer_state: Dict
    scheduler_state: Dict
    trainer_state: Dict     # example_counter, batch_counter, batches_seen, rng (and what a trainer adds)
    metrics: Dict
    directory: str = ''      # where it was loaded from
    reference_state: Optional[Dict[str, torch.Tensor]] = None  # when the reference moves (humanline, online rounds)


def save(directory: str, checkpoint: Checkpoint, exports: Optional[Dict[str, Callable[[str], None]]] = None) -> None:
    """Write `checkpoint` to `directory` atomically; each of `exports` ({name: write(dir)}, e.g. the HF export
    and a LoRA adapter) writes its own subdirectory."""
    def write_files(tmp_dir: str) -> None:
        save_policy_file(os.path.join(tmp_dir, POLICY), checkpoint.trainer_state['example_counter'],
                         checkpoint.policy_state, checkpoint.metrics)
        torch.save(checkpoint.optimizer_state, os.path.join(tmp_dir, OPTIMIZER))
        torch.save(checkpoint.scheduler_state, os.path.join(tmp_dir, SCHEDULER))
        torch.save(checkpoint.trainer_state, os.path.join(tmp_dir, TRAINER_STATE))
        if checkpoint.reference_state is not None:
            torch.save(checkpoint.reference_state, os.path.join(tmp_dir, REFERENCE))
        for name, write in (exports or {}).items():
            write(os.path.join(tmp_dir, name))
    write_checkpoint_dir(directory, write_files)


def complete_checkpoint_dir(directory: str) -> str:
    """`directory`, or its `.old` copy after a crash between the two renames of a save; an error if neither
    holds a complete checkpoint."""
    resolved = resolve_checkpoint_dir(directory)
    if resolved is None or not os.path.exists(os.path.join(resolved, TRAINER_STATE)):
        raise MissingFileError(f"resume=true but there is no complete checkpoint in {directory} (to start afresh, "
                               f"give ++resume=false)")
    missing = [name for name in (POLICY, OPTIMIZER, SCHEDULER) if not os.path.exists(os.path.join(resolved, name))]
    if missing:
        weights = '' if POLICY in missing else \
            f"; ++model.load_from={os.path.join(resolved, POLICY)} starts a new run from its weights"
        raise MissingFileError(f"resume=true but the checkpoint in {resolved} lacks {', '.join(missing)}, so it "
                               f"cannot be resumed{weights}")
    return resolved


def load(directory: str) -> Checkpoint:
    """The checkpoint in `directory` (see complete_checkpoint_dir)."""
    resolved = complete_checkpoint_dir(directory)
    policy = load_policy_file(os.path.join(resolved, POLICY))
    read = lambda name: read_torch_file(os.path.join(resolved, name))
    reference = read(REFERENCE) if os.path.exists(os.path.join(resolved, REFERENCE)) else None
    return Checkpoint(policy['state'], read(OPTIMIZER), read(SCHEDULER), read(TRAINER_STATE), policy['metrics'],
                      resolved, reference)


def export_hf(model, tokenizer, state: Dict[str, torch.Tensor], directory: str) -> None:
    """An HF directory (safetensors, config, tokenizer with its chat template) for from_pretrained."""
    model.save_pretrained(directory, state_dict=state)
    tokenizer.save_pretrained(directory)


def write_checkpoint_dir(directory: str, write_files: Callable[[str], None]) -> None:
    """Write a checkpoint directory atomically.

    `write_files(tmp_dir)` writes everything into a fresh temporary directory; only when it has
    returned is the old directory swapped out. A crash at any point leaves either the old or the
    new directory complete (see `resolve_checkpoint_dir` for the one window between two renames);
    a write that fails (a full disk, Ctrl-C) removes what it wrote, which a full disk needs back.
    """
    directory = directory.rstrip("/")
    tmp_dir, old_dir = directory + ".tmp", directory + ".old"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        write_files(tmp_dir)
        for parent, _, names in os.walk(tmp_dir):  # make the data durable before the rename publishes it
            for name in names:
                with open(os.path.join(parent, name), "rb") as f:
                    os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if os.path.exists(directory):  # else .old may be the only complete copy (a crash between the renames)
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(directory, old_dir)
    os.replace(tmp_dir, directory)
    shutil.rmtree(old_dir, ignore_errors=True)


def resolve_checkpoint_dir(directory: str) -> Optional[str]:
    """The complete checkpoint directory for `directory`, recovering from a crash between renames."""
    directory = directory.rstrip("/")
    if os.path.isdir(directory):
        return directory
    if os.path.isdir(directory + ".old"):
        return directory + ".old"
    return None


def save_policy_file(path: str, step_idx: int, state: Dict[str, torch.Tensor], metrics: Dict) -> None:
    """Writes the HALOs checkpoint format: {'step_idx', 'state', 'metrics'}."""
    torch.save({"step_idx": step_idx, "state": state, "metrics": metrics}, path)


def load_policy_file(path: str) -> Dict:
    """Reads a file written by `save_policy_file` (plain tensors, so weights_only=True works)."""
    policy = read_torch_file(path)
    state = policy.get("state") if isinstance(policy, dict) else None
    if not isinstance(state, dict):
        held = f"a dict of {', '.join(map(repr, list(policy)[:4]))}" if isinstance(policy, dict) \
            else type(policy).__name__
        raise DataError(f"{path}: not a policy checkpoint {{'step_idx', 'state', 'metrics'}}: it holds {held}")
    wrong = next(((k, v) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))), None)
    if wrong is not None or not state:
        what = f"maps {wrong[0]!r} to a {type(wrong[1]).__name__}" if wrong else "is empty"
        raise DataError(f"{path}: not a policy checkpoint: its 'state' {what}, where a policy's maps each parameter's "
                        f"name to its tensor")
    return policy


def state_keys(path: str) -> List[str]:
    """The parameter names of the policy checkpoint at `path`, its tensors mapped from the file, not read (a file
    that is no policy checkpoint: load_policy_file's error)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("state")
    except Exception:
        state = None
    return list(state) if isinstance(state, dict) else list(load_policy_file(path)["state"])


def read_torch_file(path: str):
    """torch.load(weights_only=True) of a checkpoint file; a DataError naming the file and what it holds when it
    is not one torch can read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises any of several types (UnpicklingError, RuntimeError, EOFError, ...)
        raise DataError(f"{path}: not a checkpoint torch can read: it holds {file_contents(path)}") from None


def check_policy_file(path: str, key: str) -> None:
    """Stop at once, naming `key` and what the file holds, unless `path` is a torch-saved file or an HF model
    directory (the two things a policy loads from); cheap: only the file's start or zip index is read."""
    if os.path.isdir(path):
        latest = os.path.join(path, LATEST, POLICY)
        if os.path.exists(latest):
            if os.path.isdir(os.path.join(path, LATEST, ADAPTER)):  # a LoRA run's policy.pt holds its adapters alone
                latest = f"{os.path.join(path, LATEST, HF_EXPORT)} (its merged model, which its final save writes)"
            raise DataError(f"{key}={path}: a run directory; give its checkpoint, {key}={latest}")
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            merged = merged_model_beside(path)
            instead = f"the merged model that their run saves beside them, {key}={merged}" if merged else \
                "a whole model (an HF directory or a policy.pt)"
            raise DataError(f"{key}={path}: LoRA adapters, not a whole model; give {instead}")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise DataError(f"{key}={path}: a directory with neither {POLICY} nor config.json, so not a run's "
                            f"checkpoint nor an HF model directory")
        return
    if zipfile.is_zipfile(path) and any(name.endswith("/data.pkl") for name in zip_names(path)):
        return
    raise DataError(f"{key}={path}: not a checkpoint (a {POLICY} that torch.save wrote): "
                    f"it holds {file_contents(path)}")


def start_from_lora_run(run_dir: str) -> str:
    """The overrides that start a new run from a LoRA run: its merged model, which its final save writes, else
    (a run stopped before its end) its adapters, continued."""
    merged = os.path.join(run_dir, LATEST, HF_EXPORT)
    if os.path.isdir(merged):
        return f'++model.load_from={merged}'
    return f'++model.use_peft=true ++model.load_lora_from={os.path.join(run_dir, LATEST, ADAPTER)}'


def merged_model_beside(adapter_dir: str) -> Optional[str]:
    """The merged model a run saves beside its adapters (LATEST/adapter -> LATEST/hf); None for adapters that
    are not a run's."""
    directory = os.path.normpath(adapter_dir)
    return os.path.join(os.path.dirname(directory), HF_EXPORT) if os.path.basename(directory) == ADAPTER else None


def zip_names(path: str) -> List[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def file_contents(path: str) -> str:
    """What a file that is no checkpoint holds, in a few words."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if size == 0:
        return "nothing (an empty file)"
    if zipfile.is_zipfile(path):
        names = zip_names(path)
        return f"a zip archive of {len(names)} files ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors weights (give their directory, with its config.json, to load an HF model)"
    if b"\x00" not in head:
        lines = head.decode("utf-8", errors="replace").strip().splitlines() or [""]
        return f"text ({lines[0][:60]!r}{'...' if len(lines[0]) > 60 else ''})"
    return f"{size} bytes of binary data in no format halos reads"


def get_rng_state() -> Dict:
    """Every RNG's state as tensors and plain numbers, so that it loads with torch.load(weights_only=True)."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {"python": {"version": python_version, "state": torch.tensor(python_state, dtype=torch.int64),
                        "gauss": python_gauss},
             "numpy": {"name": numpy_name, "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
                       "position": int(numpy_position), "has_gauss": int(numpy_has_gauss), "gauss": float(numpy_gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
