"""The schema of every setting: each key's type, default, one-line doc and constraint, declared once.

Hydra composes config/config.yaml with one config/model/ and one config/loss/ file and the command line's
overrides (the YAML files are the user-facing defaults, and match these dataclasses). `typed` then turns the
composed config into these frozen dataclasses before anything loads: a value of the wrong type, a value
outside its constraint or a key no schema defines ends the run with one line naming the key and what it
takes. The loss section's keys are its trainer's `Params` and its loader's `Params` (trainers.py,
dataloader.py), declared where the loss reads them; halos/build.py checks that section and what spans keys.
"""
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from halos.errors import ConfigError

REQUIRED = '???'  # Hydra's mark of a value the user must give
DTYPES = ('float32', 'bfloat16', 'float16', 'float64')


@dataclass(frozen=True)
class Rule:
    """A constraint on a value, and how it reads after 'must be' (`names_values`: it says the whole type; `choices`:
    the values it allows, where it lists them)."""
    holds: Callable[[Any], bool]
    reads: str
    names_values: bool = False
    choices: Tuple[str, ...] = ()


def greater_than(bound: float) -> Rule:
    return Rule(lambda value: value > bound, f'> {bound}')


def at_least(bound: float) -> Rule:
    return Rule(lambda value: value >= bound, f'>= {bound}')


def between(low: float, high: float) -> Rule:
    return Rule(lambda value: low <= value <= high, f'in [{low}, {high}]')


def half_open(low: float, high: float) -> Rule:
    return Rule(lambda value: low <= value < high, f'in [{low}, {high})')


def one_of(*choices: str) -> Rule:
    return Rule(lambda value: value in choices, 'one of ' + ', '.join(choices), names_values=True, choices=choices)


def setting(default: Any = REQUIRED, doc: str = '', rule: Optional[Rule] = None):
    """A key of the schema: its default, a one-line doc and the rule its value must meet."""
    metadata = {'doc': doc, 'rule': rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(schema: type, doc: str):
    """A nested group of keys (model, online, ...)."""
    return field(default_factory=schema, metadata={'doc': doc, 'rule': None})


RUN_NAME = Rule(lambda value: all(part not in ('', '.', '..') for part in value.split('/')),
                "a directory name under cache_dir, or a path of them (no empty, '.' or '..' part)",
                names_values=True)
REWARD_FUNCTIONS = Rule(bool, 'path/to/file.py:function (or module:function), or a list of them', names_values=True)
NUMBER_OR_MEAN_OR_MEDIAN = Rule(lambda value: value in ('mean', 'median') or isinstance(value, float),
                                'mean, median or a number', names_values=True)


# torch.optim classes that cannot step a whole language model: LBFGS steps through a closure, SparseAdam takes
# sparse gradients only, Muon takes matrices only (a model has vectors: norms, biases)
UNUSABLE_OPTIMIZERS = ('LBFGS', 'SparseAdam', 'Muon')


def torch_optimizers() -> List[str]:
    import torch
    return sorted(name for name, found in vars(torch.optim).items() if isinstance(found, type)
                  and issubclass(found, torch.optim.Optimizer) and found is not torch.optim.Optimizer
                  and name not in UNUSABLE_OPTIMIZERS)


@dataclass(frozen=True)
class WandbSettings:
    enabled: bool = setting(True, 'log to Weights & Biases (never in debug mode)')
    entity: Optional[str] = setting(None, 'the wandb entity (team or user)')
    project: str = setting('archangel', 'the wandb project')
    mode: str = setting('offline', 'offline writes a local run; online needs WANDB_API_KEY (WANDB_MODE wins)',
                        one_of('online', 'offline', 'disabled'))


@dataclass(frozen=True)
class PeftSettings:
    lora_r: int = setting(64, 'rank of the LoRA adapters', at_least(1))
    lora_alpha: float = setting(256.0, 'LoRA scale alpha (the update is alpha / r times the adapter product)',
                                greater_than(0))
    lora_dropout: float = setting(0.05, 'dropout on the adapters (1 would drop every input, so nothing trains)',
                                  half_open(0, 1))
    target_modules: Union[str, List[str]] = setting(
        'all-linear', "'all-linear', or a list of module names",
        Rule(bool, 'all-linear or a list of module names', names_values=True))
    load_in_4bit: bool = setting(False, 'QLoRA: 4-bit NF4 base weights (needs a GPU and bitsandbytes)')

    def __post_init__(self):
        if self.target_modules == []:
            raise ConfigError("model.peft.target_modules=[]: give all-linear, or the names of the modules LoRA adapts")


@dataclass(frozen=True)
class ModelSettings:
    name_or_path: str = setting(REQUIRED, 'the model: a hub id, a local HF directory or embedded:<name>')
    tokenizer_name_or_path: Optional[str] = setting(None, 'the tokenizer; null uses name_or_path')
    load_from: Optional[str] = setting(None, 'initialise the policy (and reference) from a policy.pt or HF directory')
    block_name: Optional[str] = setting(None, 'the transformer block class (FSDP2 shards each one)')
    policy_dtype: str = setting('bfloat16', 'dtype of the policy weights and optimizer state', one_of(*DTYPES))
    fsdp_policy_mp: Optional[str] = setting(None, 'FSDP2 compute dtype of the sharded policy (null: no casting)',
                                            one_of(*DTYPES))
    reference_dtype: str = setting('bfloat16', 'dtype of the reference model', one_of(*DTYPES))
    max_grad_norm: float = setting(10.0, 'gradient clipping norm (global over all shards)', greater_than(0))
    v_head_max_grad_norm: float = setting(0.1, "PPO: clipping norm of the value head", greater_than(0))
    max_length: int = setting(2048, 'most tokens of prompt + completion', at_least(2))
    max_prompt_length: int = setting(1024, 'most prompt tokens when prompt + completion exceed max_length', at_least(1))
    activation_checkpointing: bool = setting(True, 'recompute each block of the policy in the backward pass')
    batch_size: int = setting(32, 'global microbatch: examples of one forward/backward, split across processes',
                              at_least(1))
    gradient_accumulation_steps: int = setting(1, 'microbatches per optimizer step', at_least(1))
    eval_batch_size: int = setting(16, 'batch size of evaluation and sampling', at_least(1))
    use_flash_attention: bool = setting(False, 'flash-attention 2 when installed and on a GPU')
    padding_free: bool = setting(True, "pack each forward's sequences into one row without padding")
    share_prompts: bool = setting(True, "with padding_free: a prompt's rows share its forward (halos' attention)")
    autocast_dtype: Optional[str] = setting(None, "run forwards under torch.autocast in this dtype (null: none)",
                                            one_of(*DTYPES))
    use_peft: bool = setting(False, 'train LoRA adapters through peft (the reference is the adapters switched off)')
    load_lora_from: Optional[str] = setting(None, 'continue from saved adapters (a LATEST/adapter directory)')
    peft: PeftSettings = section(PeftSettings, 'LoRA: rank, scale, dropout, target modules, 4-bit base weights')


@dataclass(frozen=True)
class OnlineSettings:
    rounds: int = setting(0, 'rounds of sample -> label -> train; 0 trains offline on datasets', at_least(0))
    prompts: Optional[List[str]] = setting(None, 'the prompt pool: prompts files and/or dataset names (null: datasets)')
    prompts_per_round: int = setting(16, 'prompts sampled each round', at_least(1))
    samples_per_prompt: int = setting(4, 'completions sampled per prompt', at_least(1))
    labeler: str = setting('function', 'who scores a sample', one_of('function', 'reward_model', 'judge'))
    reward_function: Union[str, List[str], None] = setting(
        None, 'path/to/file.py:function or module:function -> float; a list: the (weighted) sum of their scores',
        REWARD_FUNCTIONS)
    reward_weights: Optional[List[float]] = setting(None, "one weight per reward function of a list (TRL's "
                                                          "reward_weights); null: all 1")
    reward_model: Optional[str] = setting(None, 'an HF sequence classifier (a halos bradley-terry export or any RM)')
    judge: Optional[str] = setting(None, "the judge model's name on its OpenAI-compatible server")
    base_url: Optional[str] = setting(None, "the judge's server (null: OPENAI_BASE_URL, else OpenAI)")
    feedback: str = setting('pairwise', 'what the scores become', one_of('binary', 'pairwise', 'scalar', 'best'))
    pair_mode: Optional[str] = setting(None, 'pairwise: best vs worst, the closest pair, or random pairs (null: max)',
                                       one_of('max', 'min', 'random'))
    threshold: Optional[Union[float, str]] = setting(
        None, 'binary: the desirable cut (null: median); pairwise: the least reward gap (null: 0)',
        NUMBER_OR_MEAN_OR_MEDIAN)
    per_prompt: bool = setting(False, "binary: each prompt's own mean or median")
    reference: str = setting('fixed', 'the starting model, or the policy at the start of each round',
                             one_of('fixed', 'previous'))
    eval_prompts: Optional[List[str]] = setting(None, 'held-out prompts: the mean reward before and after every round')
    min_scored: float = setting(0.5, "stop when the labeller scores fewer than this share of a round's samples "
                                     "(loss=grpo-online and its kin: of a step's)", between(0, 1))
    eval_reward_function: Union[str, List[str], None] = setting(
        None, 'scores the held-out samples (a gold reward; a list: the sum of their scores); null: the labeler',
        REWARD_FUNCTIONS)
    monitor_window: int = setting(2, 'evaluations over which a rising training reward and a falling held-out one '
                                     'warn', at_least(1))
    max_length_growth: float = setting(2.0, 'warn when completions grow past this many times their first length',
                                       greater_than(1))
    max_repetition: float = setting(0.5, "warn when this share of the completions' 4-grams repeat", between(0, 1))
    stop_on_hacking: bool = setting(False, 'stop when a monitor warns, keeping the last checkpoint before it')
    sampler: str = setting('auto', "who samples as the policy trains: vLLM where it is installed with a GPU, else "
                                   "halos' loop (auto); or always one of them", one_of('auto', 'halos', 'vllm'))
    vllm_gpu_memory_utilization: float = setting(0.3, "the colocated vLLM engine's share of each GPU's memory (its "
                                                      "weights and KV cache)", between(0.05, 0.95))


@dataclass(frozen=True)
class LmEvalSettings:
    tasks: List[str] = setting([], 'eval.py mode=lm_eval: lm-eval-harness task names (halos_basics ships here)')
    num_fewshot: Optional[int] = setting(None, "few-shot examples (null: each task's own)", at_least(0))
    limit: Optional[int] = setting(None, 'evaluate at most this many examples of each task', at_least(1))
    batch_size: int = setting(8, 'batch size of the harness', at_least(1))
    include_path: Optional[str] = setting(None, 'a directory of task YAMLs of your own (data/lm_eval always)')


@dataclass(frozen=True)
class LossSettings:
    """The loss section's fixed keys; `params` and `loader_params` are its trainer's and loader's Params."""
    name: str = setting(REQUIRED, 'the loss (the file name in config/loss)')
    trainer: str = setting(REQUIRED, 'the trainer class in trainers.py')
    dataloader: str = setting(REQUIRED, 'the loader class in dataloader.py')
    use_reference_model: Optional[bool] = setting(None, "HALOs' key, checked against the trainer (null: the trainer's)")
    params: Any = field(default=None, metadata={'params': True})         # the trainer's Params
    loader_params: Any = field(default=None, metadata={'params': True})  # the loader's Params


def is_params(spec: dataclasses.Field) -> bool:
    """A field filled from a trainer's or a loader's Params (whose keys sit flat in the loss section)."""
    return spec.metadata.get('params', False)


@dataclass(frozen=True)
class RunSettings:
    seed: int = setting(1, 'random seed of data order, sampling and initialisation', at_least(0))
    exp_name: str = setting(REQUIRED, 'name of the run: its directory under cache_dir and its wandb name', RUN_NAME)
    datasets: List[str] = setting(REQUIRED, 'registered dataset names and/or .json/.jsonl/.parquet feedback files')
    mode: str = setting(REQUIRED, 'train (train.py), or what eval.py does',
                        one_of('train', 'sample', 'eval', 'alpacaeval', 'reward', 'lm_eval'))
    data_dir: Optional[str] = setting(None, 'read registered datasets from DIR/<name>/<split>.jsonl, not the hub')
    use_chat_template: bool = setting(False, "render prompts with the tokenizer's chat template")
    debug: bool = setting(False, 'no wandb and no intermediate checkpoints')
    use_fsdp: bool = setting(True, 'shard the models with FSDP2 when several processes run')
    fsdp_port: Optional[int] = setting(None, 'rendezvous port when halos starts one process per GPU (null: free)',
                                       between(1, 65535))
    wandb: WandbSettings = section(WandbSettings, 'Weights & Biases')
    cache_dir: str = setting('.cache/', 'where runs are saved; load_from and saved_policy resolve against it')
    local_run_dir: str = setting('${cache_dir}/${exp_name}', 'the run directory')
    do_first_eval: bool = setting(True, 'evaluate before the first training step')
    retain_freed_memory: bool = setting(True, 'keep freed memory in the process for the next step (glibc)')
    minimum_log_interval_secs: float = setting(1.0, 'least seconds between two training logs', at_least(0))
    intermediate_checkpoints: bool = setting(False, 'also keep a step-<examples>/ checkpoint at every evaluation')
    resume: bool = setting(False, 'continue an interrupted run from <local_run_dir>/LATEST, exactly')
    checkpoint_minutes: Optional[float] = setting(None, 'also checkpoint when this many minutes passed since the '
                                                        'last checkpoint', greater_than(0))
    cache_reference_logprobs: bool = setting(False, 'compute every reference log-prob once, then free the reference')
    trainer: str = setting('BasicTrainer', "HALOs' key, unused (the trainer is loss.trainer)")
    lr: float = setting(5e-7, 'peak learning rate', greater_than(0))
    n_epochs: Optional[int] = setting(1, 'epochs; null: n_examples decides', at_least(1))
    n_examples: Optional[int] = setting(None, 'stop after this many training examples (whole batches)', at_least(1))
    optimizer: str = setting('RMSprop', 'the torch.optim optimizer class', one_of(*torch_optimizers()))
    warmup_steps: int = setting(150, 'optimizer steps of linear warmup', at_least(0))
    eval_every: int = setting(20_000, 'evaluate (and checkpoint) every this many training examples', at_least(1))
    n_samples: Optional[int] = setting(128, 'eval.py: prompts to sample (null: the whole test split)', at_least(1))
    samples_dir: str = setting('samples/', 'eval.py: where samples are written')
    prompts: Optional[List[str]] = setting(None, 'eval.py mode=reward or sample: a prompts file or dataset names')
    reward_function: Union[str, List[str], None] = setting(None, 'eval.py mode=reward: path/to/file.py:function, or '
                                                                 'a list of them', REWARD_FUNCTIONS)
    n_eval_examples: Optional[int] = setting(512, 'test examples of each evaluation (0: none; null: all)', at_least(0))
    saved_policy: Optional[str] = setting(None, 'eval.py: the policy to sample (null: the run\'s LATEST)')
    top_p: float = setting(0.95, 'nucleus sampling mass', Rule(lambda p: 0 < p <= 1, 'in (0, 1]'))
    temperature: Optional[float] = setting(None, 'sampling temperature; 0 decodes greedily (null: the model\'s)',
                                           at_least(0))
    top_k: Optional[int] = setting(None, "top-k sampling; 0 turns it off (null: the model's)", at_least(0))
    sampling_dtype: Optional[str] = setting(None, 'sample under autocast in this dtype (null: model.autocast_dtype)',
                                            one_of(*DTYPES))
    max_new_tokens: Optional[int] = setting(None, 'most new tokens of a sample (null: up to model.max_length)',
                                            at_least(1))
    num_samples_per_prompt: Optional[int] = setting(None, 'eval.py mode=sample: k samples per prompt', at_least(1))
    human_prefix: str = setting('\n<|user|>\n', 'before each human turn')
    assistant_prefix: str = setting('\n<|assistant|>\n', 'before each assistant turn and each completion')
    human_suffix: str = setting('', 'after each human turn')
    assistant_suffix: str = setting('', 'after each assistant turn and each completion')
    frac_unique_desirable: float = setting(1.0, 'unpaired losses: keep this share of the desirable examples',
                                           between(0, 1))
    frac_unique_undesirable: float = setting(1.0, 'unpaired losses: keep this share of the undesirable examples',
                                             between(0, 1))
    online: OnlineSettings = section(OnlineSettings, 'online rounds: sample from the policy, label, train')
    lm_eval: LmEvalSettings = section(LmEvalSettings, 'eval.py mode=lm_eval: lm-eval-harness on the policy')
    model: ModelSettings = section(ModelSettings, 'the model: config/model/<name>.yaml')
    loss: LossSettings = section(LossSettings, 'the loss: config/loss/<name>.yaml')


# ---------------------------------------------------------------- checking a composed config

class WrongType(Exception):
    """A value that does not convert to a key's type."""


def converted(value: Any, kind: Any) -> Any:
    """`value` as `kind` (bool, int, float, str, a list of them, Optional or Union of them, Any); else WrongType.
    A lone string (or, for a list of numbers, a lone number) stands for a list of one; an integral float is an int;
    a number is a string where one is asked, and a string that writes a number (quoted in a YAML) is that number."""
    if kind is Any:
        return value
    options = typing.get_args(kind)
    if typing.get_origin(kind) in (Union, types.UnionType):
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return converted(value, option)
            except WrongType:
                continue
        raise WrongType
    if typing.get_origin(kind) is list:
        lone_number = isinstance(value, (int, float)) and options[0] in (int, float)
        items = [value] if isinstance(value, str) or lone_number else value
        if not isinstance(items, list):
            raise WrongType
        return [converted(item, options[0]) for item in items]
    if isinstance(value, bool) and kind is not bool:
        raise WrongType
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        return int(value)
    if kind is int and isinstance(value, str) and re.fullmatch(r'\s*[+-]?\d+\s*', value):
        return int(value)
    if kind is float and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise WrongType from None
        if math.isfinite(number):
            return number
    if kind is str and isinstance(value, (str, int, float)):
        return str(value)
    raise WrongType


def described(kind: Any, rule: Optional[Rule]) -> str:
    """What a key takes, as it reads after 'must be': 'a number > 0', 'an integer >= 1 or null'."""
    options = typing.get_args(kind)
    optional = type(None) in options and typing.get_origin(kind) in (Union, types.UnionType)
    base = next(o for o in options if o is not type(None)) if optional and len(options) == 2 else kind
    if rule is not None and rule.names_values:
        text = rule.reads
    elif base is bool:
        text = 'true or false'
    elif base is int:
        text = 'an integer' + (f' {rule.reads}' if rule else '')
    elif base is float:
        text = 'a number' + (f' {rule.reads}' if rule else '')
    elif typing.get_origin(base) is list:
        item = {int: 'integer', float: 'number'}.get(typing.get_args(base)[0], 'string')
        text = f'a list of {item}s (or one {item})'
    else:
        text = 'a string' if base is str else 'a value'
    return text + (' or null' if optional else '')


class Overrides:
    """The command line's overrides by key, to name a bad value as the user typed it."""

    def __init__(self, overrides: Sequence[str] = ()):
        from hydra.core.override_parser.overrides_parser import OverridesParser
        parsed = OverridesParser.create().parse_overrides(list(overrides)) if overrides else []
        self.lines = {override.key_or_group: override.input_line for override in parsed}

    def named(self, key: str, value: Any) -> str:
        """`++lr=abc` as typed, else `lr=abc`."""
        return self.lines.get(key) or f'{key}={value}'


def typed(schema: type, node: Mapping, overrides: Overrides, prefix: str = ''):
    """`node` (a section of the composed config, resolved) as a `schema` instance: each value converted to its
    key's type and checked against its rule, a key it lacks given its default. A ConfigError names the first
    bad or unknown key."""
    fields = {f.name: f for f in dataclasses.fields(schema) if not is_params(f)}
    try:
        hints = typing.get_type_hints(schema)
    except NameError as error:  # a type written as a string, misspelt
        raise ConfigError(f"{schema.__qualname__}: the type of one of its keys names what is not defined ({error})") \
            from None
    for key in node:
        if key not in fields:
            raise ConfigError(unknown_key(prefix + str(key), [prefix + name for name in fields], overrides))
    values = {}
    for name, spec in fields.items():
        if not dataclasses.is_dataclass(hints[name]):
            check_declaration(schema, spec, hints[name])
        if name not in node:
            continue
        value, key = node[name], prefix + name
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{overrides.named(key, value)}: {key} must be a group of keys "
                                  f"({', '.join(f.name for f in dataclasses.fields(hints[name]))})")
            values[name] = typed(hints[name], value, overrides, key + '.')
            continue
        rule = spec.metadata.get('rule')
        try:
            values[name] = converted(value, hints[name])
            if values[name] is not None and rule is not None and not all(rule.holds(v) for v in each(values[name])):
                raise WrongType
        except WrongType:
            takes = described(hints[name], rule)
            raise ConfigError(f"{overrides.named(key, value)}: {key} must be {takes}{closest_choice(value, rule)}"
                              f"{not_finite(value) if 'number' in takes else ''}") from None
    return schema(**values)


def check_declaration(schema: type, spec: dataclasses.Field, kind: Any) -> None:
    """A key declares a type that settings read, and a default that meets its type and rule: a Params class of
    one's own that does not stops the run naming the class, not the value."""
    where = f"{schema.__qualname__}.{spec.name}"
    if not readable(kind):
        raise ConfigError(f"{where}: its type {typing_name(kind)} is not one a setting reads (bool, int, float, str, "
                          f"Any, a List of one of them, or an Optional or Union of these)")
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    if default is dataclasses.MISSING or default == REQUIRED:
        return
    rule = spec.metadata.get('rule')
    try:
        value = converted(default, kind)
        if value is not None and rule is not None and not all(rule.holds(v) for v in each(value)):
            raise WrongType
    except WrongType:
        raise ConfigError(f"{where}: its default {default!r} is not {described(kind, rule)}; declare a default "
                          f"that is") from None


def readable(kind: Any) -> bool:
    """Whether `converted` reads values of this type."""
    if kind in (Any, bool, int, float, str, type(None)):
        return True
    if typing.get_origin(kind) in (Union, types.UnionType):
        return all(readable(option) for option in typing.get_args(kind))
    return typing.get_origin(kind) is list and typing.get_args(kind)[:1] in ((bool,), (int,), (float,), (str,))


def typing_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace('typing.', '')


def closest_choice(value: Any, rule: Optional[Rule]) -> str:
    """' (did you mean AdamW?)' for a value close to one of the rule's choices (`adamw`), else ''."""
    if rule is None or not isinstance(value, str):
        return ''
    close = [choice for choice in rule.choices if choice.lower() == value.lower()] or \
        difflib.get_close_matches(value, rule.choices, n=1, cutoff=0.75)
    return f' (did you mean {close[0]}?)' if close else ''


def not_finite(value: Any) -> str:
    """' (nan is not finite)' for a value that is, or holds, a number that is not finite, else ''."""
    for item in each(value):
        try:
            number = float(item) if isinstance(item, (float, str)) else None
        except ValueError:
            continue
        if number is not None and not math.isfinite(number):
            return f' ({item} is not finite)'
    return ''


def each(value: Any) -> List[Any]:
    return value if isinstance(value, list) else [value]


def unknown_key(key: str, names: Sequence[str], overrides: Overrides, otherwise: str = '') -> str:
    """The message for a key no schema defines: the closest keys that exist, else `otherwise` (or all of them)."""
    leaf = key.rsplit('.', 1)[-1]
    elsewhere = [name for name in dotted_keys(RunSettings) if name.rsplit('.', 1)[-1] == leaf and name != key]
    close = list(dict.fromkeys(elsewhere + difflib.get_close_matches(key, names, n=3, cutoff=0.8)))
    every = f"the keys there are {', '.join(sorted(names))}"
    hint = f"did you mean {' or '.join(close)}?" if close else otherwise or every
    where = f'{overrides.lines[key]}: ' if key in overrides.lines else ''
    return f"{where}no config defines the key '{key}'; {hint}"


def dotted_keys(schema: type, prefix: str = '') -> List[str]:
    """Every key a settings schema declares, dotted (`model.peft.lora_r`), its Params sections left out."""
    hints = typing.get_type_hints(schema)
    keys = []
    for spec in dataclasses.fields(schema):
        if is_params(spec):
            continue
        kind = hints[spec.name]
        keys += dotted_keys(kind, f'{prefix}{spec.name}.') if dataclasses.is_dataclass(kind) else [prefix + spec.name]
    return keys


def missing_keys(raw: Mapping, prefix: str = '') -> List[str]:
    """Every key of a composed config (a plain dict, unresolved) whose value is still REQUIRED."""
    missing = []
    for key, value in raw.items():
        if isinstance(value, Mapping):
            missing += missing_keys(value, f'{prefix}{key}.')
        elif value == REQUIRED:
            missing.append(prefix + str(key))
    return missing


def as_dict(settings: Any) -> Dict[str, Any]:
    """Settings as the plain nested dict of a config file: the loss section flat, with its Params' keys."""
    result = {}
    for spec in dataclasses.fields(settings):
        value = getattr(settings, spec.name)
        if is_params(spec):
            result.update(as_dict(value) if value is not None else {})
        elif dataclasses.is_dataclass(value):
            result[spec.name] = as_dict(value)
        else:
            result[spec.name] = value
    return result
