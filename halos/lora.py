"""LoRA through peft: wrapping the policy, the reference model as the policy with its adapters off, and the
adapter files of a checkpoint.

With `model.use_peft=true` the policy is the base model (from `model.name_or_path`, initialised from
`model.load_from` when given) with LoRA adapters on `model.peft.target_modules`; only the adapters train
(and a trainer's heads, such as PPO's value head, which train whole). A loss that needs a reference model
gets `AdaptersOff(policy)`: the same weights run with the adapters disabled, so no second copy is loaded.
Checkpoints hold the trainable state (policy.pt), the adapter as peft writes it (`adapter/`, loadable with
PeftModel.from_pretrained) and, at the end, the merged model (`hf/`).
"""
import json
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import models
from halos.errors import ConfigError, MissingFileError
from halos.settings import PeftSettings

ADAPTER_WEIGHTS = 'adapter_model.safetensors'


def lora_config(settings: PeftSettings, task_type: str, heads: Sequence[str]):
    """peft's LoraConfig from model.peft; `heads` (a trainer's own output modules) train whole and get no adapter."""
    from peft import LoraConfig
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=settings.target_modules, bias='none', task_type=task_type,
                      modules_to_save=list(heads) or None,
                      exclude_modules=rf".*\b({'|'.join(heads)})\b.*" if heads else None)


def four_bit_options(compute_dtype: str) -> Dict:
    """from_pretrained options for 4-bit NF4 base weights (QLoRA), when a GPU and bitsandbytes are present."""
    import importlib.util
    if not torch.cuda.is_available() or importlib.util.find_spec('bitsandbytes') is None:
        raise ConfigError("model.peft.load_in_4bit=true needs a GPU and bitsandbytes (pip install -r "
                          "requirements-gpu.txt); set it to false to train LoRA on full-precision base weights")
    from transformers import BitsAndBytesConfig
    return {'quantization_config': BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                                      bnb_4bit_compute_dtype=getattr(torch, compute_dtype))}


def with_lora(model: torch.nn.Module, config, adapter_dir: Optional[str] = None,
              key: str = 'model.load_lora_from') -> torch.nn.Module:
    """`model` with fresh adapters (in the base weights' dtype), or with those saved in `adapter_dir` (named in
    errors as the setting `key`)."""
    from peft import get_peft_model
    if adapter_dir is not None:
        if not os.path.exists(os.path.join(adapter_dir, 'adapter_config.json')):
            what = 'holds no adapter_config.json' if os.path.isdir(adapter_dir) else 'is no directory'
            raise MissingFileError(f"{key}={adapter_dir!r} {what} (give a run's LATEST/adapter directory, or any "
                                   f"directory PeftModel.save_pretrained wrote)")
        check_adapter_task(adapter_dir, config.task_type if config is not None else 'CAUSAL_LM', key)
        return saved_adapters_on(model, adapter_dir, key)
    unmatched = unmatched_targets(model, config.target_modules)
    if unmatched:
        names = linear_layer_names(model)
        a_name = f" (a lone string is a regular expression of the whole module path: [{unmatched[0]}] names the " \
                 f"modules {unmatched[0]})" if isinstance(config.target_modules, str) and unmatched[0] in names else ''
        raise ConfigError(f"model.peft.target_modules: no module of the model that LoRA adapts (a linear, embedding or "
                          f"convolution layer) is named {' or '.join(unmatched)}{a_name}; its linear layers are "
                          f"{', '.join(names)} (or give all-linear)")
    tied = tied_targets(model, config.target_modules)
    if tied:
        shared = {name.rsplit('.', 1)[-1] for name in tied_modules(model)}
        others = [name for name in linear_layer_names(model) if name not in shared]
        raise ConfigError(f"model.peft.target_modules names {tied[0]}, whose weight the model shares between its input "
                          f"embeddings and its output layer (tie_word_embeddings): merged into the export, its adapter "
                          f"would change both; adapt other modules (its other linear layers are {', '.join(others)}, "
                          f"or give all-linear)")
    return get_peft_model(model, config, autocast_adapter_dtype=False)


ADAPTED_MODELS = {'CAUSAL_LM': 'a policy', 'SEQ_CLS': 'a reward model (loss=bradley-terry)'}


def check_adapter_task(adapter_dir: str, task_type: str, key: str) -> None:
    """Saved adapters are of the kind of model they are loaded into: a reward model's adapters (and its score
    head) on a policy would load as a policy that lost its head, and generate."""
    with open(os.path.join(adapter_dir, 'adapter_config.json')) as f:
        saved = json.load(f).get('task_type') or 'CAUSAL_LM'
    if saved != task_type and {saved, task_type} <= set(ADAPTED_MODELS):
        scorer = '; label.py --reward-model <its run>/LATEST/hf scores samples with it' if saved == 'SEQ_CLS' else ''
        raise ConfigError(f"{key}={adapter_dir!r} holds the adapters of {ADAPTED_MODELS[saved]}, not of "
                          f"{ADAPTED_MODELS[task_type]} (their adapter_config.json's task_type is {saved}){scorer}")


def saved_adapters_on(model: torch.nn.Module, adapter_dir: str, key: str) -> torch.nn.Module:
    """`model` with the trainable adapters saved in `adapter_dir`; adapters of another model stop in one line."""
    from peft import PeftModel
    from peft.utils.error import NoMatchingPeftModuleError
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True, autocast_adapter_dtype=False)
    except (RuntimeError, NoMatchingPeftModuleError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if isinstance(error, RuntimeError) and not lines[0].startswith('Error(s) in loading state_dict'):
            raise  # not a mismatch (out of memory, a CUDA error)
        first = lines[1] if isinstance(error, RuntimeError) and len(lines) > 1 else lines[0]
        raise ConfigError(f"{key}={adapter_dir!r}: its adapters do not fit the model {model.config._name_or_path}: "
                          f"{first} (adapters of another model or size?)") from None


def unmatched_targets(model: torch.nn.Module, targets) -> List[str]:
    """The target_modules that name no module of `model` that peft adapts (all-linear matches always)."""
    from transformers.pytorch_utils import Conv1D
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                 torch.nn.MultiheadAttention, Conv1D)
    names = [name for name, module in model.named_modules() if isinstance(module, adaptable)]
    if isinstance(targets, str):
        matched = targets.lower() == 'all-linear' or any(named_by(targets, name) for name in names)
        return [] if matched else [targets]
    return sorted(target for target in targets if not any(named_by([target], name) for name in names))


def named_by(targets, name: str) -> bool:
    """Whether target_modules name the module `name`, as peft matches them: a string as a regular expression of
    the whole name, a list entry by the name's last parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith('.' + target) for target in targets)


def tied_modules(model: torch.nn.Module) -> List[str]:
    """The input embeddings and the output layer, where the model ties their weight (tie_word_embeddings)."""
    embeddings = getattr(model, 'get_input_embeddings', lambda: None)()
    head = getattr(model, 'get_output_embeddings', lambda: None)()
    if embeddings is None or head is None or embeddings.weight is not head.weight:
        return []
    return [name for name, module in model.named_modules() if module is embeddings or module is head]


def tied_targets(model: torch.nn.Module, targets) -> List[str]:
    """The targeted modules that hold the weight a model ties between its input embeddings and its output layer
    (all-linear leaves the output layer out)."""
    if isinstance(targets, str) and targets.lower() == 'all-linear':
        return []
    return [name for name in tied_modules(model) if named_by(targets, name)]


def linear_layer_names(model: torch.nn.Module) -> List[str]:
    """The last name of each kind of linear layer in a model (q_proj, ...): what target_modules entries name."""
    return sorted({name.rsplit('.', 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def is_lora(model: Optional[torch.nn.Module]) -> bool:
    return model is not None and hasattr(model, 'peft_config')


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under the adapters (the model itself without LoRA)."""
    return model.get_base_model() if is_lora(model) else model


class AdaptersOff(torch.nn.Module):
    """The reference model under LoRA: the policy's forward with its adapters disabled. The policy is held
    outside the module tree, so this module has no parameters of its own (nothing is copied, moved, frozen
    or sharded through it)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.__dict__['policy'] = policy

    @property
    def config(self):
        """The policy's model config: the forward is the policy's."""
        return self.policy.config

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def trainable_state(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The entries of a full state dict that training changes (the adapters and the heads)."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: value for name, value in state.items() if name in trainable}


def save_adapter(model: torch.nn.Module, state: Dict[str, torch.Tensor], directory: str) -> None:
    """The adapter as PeftModel.save_pretrained writes it (safetensors and adapter_config.json), from a
    gathered state dict (so it works under FSDP2, where the live model holds shards)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    adapter = get_peft_model_state_dict(model, state_dict=state)
    save_file({name: tensor.contiguous() for name, tensor in adapter.items()}, os.path.join(directory, ADAPTER_WEIGHTS))
    model.peft_config['default'].save_pretrained(directory)


def merged_state_dict(base: torch.nn.Module, model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Dict:
    """The state dict of `base` with the adapters of `state` merged in: W + (alpha / r) B A, by peft. The HF export
    merges so, into a fresh full-precision base (under QLoRA too, whose live base weights are 4-bit)."""
    from peft import get_peft_model
    copy = get_peft_model(base, model.peft_config['default'], autocast_adapter_dtype=False)
    unexpected = copy.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"adapter weights that the model does not have: {unexpected[:3]}")
    return copy.merge_and_unload().state_dict()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (a DTensor) gathered from every rank, anything else as it is."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def lora_layers(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The modules of a model that carry LoRA adapters, by name."""
    from peft.tuners.lora import LoraLayer
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def lora_delta(layer, adapter: str) -> torch.Tensor:
    """(alpha / r) B A of one adapted linear layer, as peft's merge adds it to the base weight: on CPU a
    half-precision product runs in float32 and is cast back (peft does the same, so the merged values are equal)."""
    if adapter in getattr(layer, 'lora_variant', {}) or getattr(layer, 'lora_bias', {}).get(adapter):
        raise ConfigError("vLLM sampling merges plain LoRA adapters only (no DoRA or other variant, no LoRA bias)")
    a, b = full(layer.lora_A[adapter].weight), full(layer.lora_B[adapter].weight)
    upcast = b.device.type == 'cpu' and b.dtype in (torch.float16, torch.bfloat16)
    product = b.float() @ a.float() if upcast else b @ a
    delta = (product.T if layer.fan_in_fan_out else product) * layer.scaling[adapter]
    return delta.to(b.dtype) if upcast else delta


def merged_weight(layer, base: torch.Tensor) -> torch.Tensor:
    """A base weight with its layer's active adapters added (a new tensor: the live base weight is left as it is)."""
    if layer.merged:  # peft already added them to the base weight
        return base
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            base = base + lora_delta(layer, adapter)
    return base


def merged_weights(policy: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """The policy's weights under the names of its model's HF state dict, one at a time (what vLLM's `load_weights`
    takes), merged from the live policy without a copy of the model: under LoRA `<module>.base_layer.<name>`
    becomes `<module>.<name>` with the adapters merged in and the adapters' own tensors left out; a trainer's heads
    (PPO's value head) are left out; under FSDP2 each tensor is gathered whole (every rank must iterate together).
    Tied embeddings appear under both names, as in the HF model's state_dict. Tensors not merged share storage
    with the policy: read them, never write them."""
    model = unwrapped(policy)
    adapted = lora_layers(model)
    for key, value in model.state_dict().items():
        if key.startswith(models.HEADS_A_CHECKPOINT_MAY_LACK):
            continue
        owner = next((name for name in adapted if key.startswith(name + '.')), None)
        if owner is None:
            yield key, full(value)
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith('base_layer.'):  # lora_A, lora_B, ...: merged into the base weight
            continue
        tensor = full(value)
        if rest == 'base_layer.weight':
            tensor = merged_weight(adapted[owner], tensor)
        yield f"{owner}.{rest[len('base_layer.'):]}", tensor
