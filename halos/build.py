"""Building a run from its config: validating the config, the loaders, the models and the trainer.

train.py and eval.py (the entry points) call these; everything below them receives plain arguments.
"""
import difflib
import os
from typing import Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf

import dataloader
import models
import trainers
from halos import checkpoint, lora
from halos.errors import ConfigError
from halos.labelers import make_labeler
from halos.online import OnlineRounds, OnlineSettings
from halos.sampling import SamplingOptions, halos_sampler
from utils import disable_dropout, get_rank, get_world_size, rank0_print, start_process

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'config')


def validate_config(config: DictConfig) -> None:
    """Resolve the config, fail early on missing or inconsistent keys, and fill in derived ones."""
    OmegaConf.resolve(config)
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"missing required config keys: {', '.join(missing)} (e.g. exp_name=my_run)")
    trainer_class = trainers.get_trainer_class(config.loss.trainer)
    dataloader.get_dataloader_class(config.loss.dataloader)
    if 'use_reference_model' in config.loss and config.loss.use_reference_model != trainer_class.use_reference_model:
        raise ConfigError(f"loss.use_reference_model={config.loss.use_reference_model} but {config.loss.trainer} "
                          f"{'needs' if trainer_class.use_reference_model else 'does not use'} a reference model")
    if config.n_epochs is None and config.n_examples is None:
        raise ConfigError("set n_epochs or n_examples (both are null)")
    if config.loss.get('humanline'):
        if not trainer_class.supports_humanline:
            raise ConfigError(f"loss.humanline=true: {config.loss.trainer} has no per-token log-ratios to a reference "
                              f"model to clamp (humanline works with dpo, cdpo, ipo, kto, kto-simple, kto-zero, grpo)")
        if config.cache_reference_logprobs:
            raise ConfigError("loss.humanline=true moves the reference to the policy at every step, so its log-probs "
                              "cannot be cached: set cache_reference_logprobs=false")
    step_examples = config.model.batch_size * config.model.gradient_accumulation_steps
    if config.eval_every % step_examples:
        rounded = max(step_examples, config.eval_every - config.eval_every % step_examples)
        rank0_print(f"eval_every={config.eval_every} is not a multiple of batch_size x gradient_accumulation_steps "
                    f"= {step_examples}; using {rounded} so that checkpoints fall on optimizer steps")
        config.eval_every = rounded
    if config.model.use_peft:
        if config.loss.get('humanline'):
            raise ConfigError("loss.humanline=true with model.use_peft=true: under LoRA the reference is the base model "
                              "with the adapters off, so it cannot follow the policy step by step; train without LoRA")
        if config.online.rounds > 0 and config.online.reference == 'previous':
            raise ConfigError("online.reference=previous with model.use_peft=true: under LoRA the reference is the base "
                              "model with the adapters off, which stays the starting model; use online.reference=fixed")
    if config.online.rounds > 0:
        if config.cache_reference_logprobs:
            raise ConfigError("online rounds train on new samples every round: set cache_reference_logprobs=false")
        if config.online.reference == 'previous' and not trainer_class.use_reference_model:
            raise ConfigError(f"online.reference=previous: {config.loss.trainer} has no reference model")
    if config.saved_policy is None:
        config.saved_policy = os.path.join(config.local_run_dir, 'LATEST', 'policy.pt')


def dotted_keys(config, prefix: str = '') -> List[str]:
    """Every key of a config, nested keys as 'model.batch_size'."""
    keys = []
    tree = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else config
    for key, value in tree.items():
        name = f'{prefix}{key}'
        keys.append(name)
        if isinstance(value, dict):
            keys += dotted_keys(value, name + '.')
    return keys


def shipped_defaults(model: Optional[str], loss: Optional[str]) -> DictConfig:
    """The keys halos defines: config/config.yaml with the chosen model and loss files (and what they extend)."""
    def read(path: str) -> DictConfig:
        data = OmegaConf.load(path)
        parents = [OmegaConf.load(os.path.join(os.path.dirname(path), f'{name}.yaml'))
                   for name in data.pop('defaults', []) if name != '_self_' and isinstance(name, str)]
        return OmegaConf.merge(*parents, data)
    defaults = read(os.path.join(CONFIG_DIR, 'config.yaml'))
    for group, name in (('model', model), ('loss', loss)):
        path = os.path.join(CONFIG_DIR, group, f'{name}.yaml')
        if name and os.path.exists(path):
            defaults[group] = read(path)
    return defaults


def check_overrides(overrides: Iterable[str], known: DictConfig) -> None:
    """Refuse a command-line `+key=value` / `++key=value` for a key that no config defines (a typo, or an
    option this version does not have), naming the closest keys that exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    names = dotted_keys(known)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.startswith('hydra.') or key in names:
            continue
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.8)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; the config's keys are in {CONFIG_DIR}"
        raise ConfigError(f"{override.input_line}: no config defines the key '{key}'{hint}")


def build_loader(config: DictConfig, tokenizer, split: str, dataset_names: Optional[List[str]] = None,
                 loader_class: Optional[type] = None, **options):
    """The run's loader of `split` (its loss's loader class unless given); `options` override the config's."""
    loader_class = loader_class or dataloader.get_dataloader_class(config.loss.dataloader)
    trainer_class = trainers.get_trainer_class(config.loss.trainer)
    kwargs = dict(split=split, max_length=config.model.max_length, max_prompt_length=config.model.max_prompt_length,
                  human_prefix=config.human_prefix, human_suffix=config.human_suffix,
                  assistant_prefix=config.assistant_prefix, assistant_suffix=config.assistant_suffix,
                  seed=config.seed, data_dir=config.data_dir, use_chat_template=config.use_chat_template,
                  frac_unique_desirable=config.frac_unique_desirable,
                  frac_unique_undesirable=config.frac_unique_undesirable, sequence_kinds=trainer_class.prefixes,
                  rank=get_rank(), world_size=get_world_size())
    if loader_class.control_tokens(config.loss):
        kwargs['chosen_control_token'], kwargs['rejected_control_token'] = loader_class.control_tokens(config.loss)
    if split == 'train':
        kwargs.update(batch_size=config.model.batch_size, n_epochs=config.n_epochs, n_examples=config.n_examples)
    else:
        kwargs.update(batch_size=config.model.eval_batch_size, n_epochs=1, n_examples=config.n_eval_examples)
    kwargs.update(options)
    return loader_class(list(dataset_names or config.datasets), tokenizer, **kwargs)


def control_tokens(config: DictConfig) -> List[str]:
    """The special tokens the run's loader adds to prompts (CSFT's control tokens)."""
    return dataloader.get_dataloader_class(config.loss.dataloader).control_tokens(config.loss)


def load_models(config: DictConfig, trainer_class, tokenizer, policy_load_from: Optional[str],
                adapter_from: Optional[str] = None):
    """The policy from `policy_load_from` (train.py: model.load_from; eval.py: the trained policy) and, when
    the loss uses one, the reference model from model.load_from; the base model where they are null.
    With model.use_peft the policy is model.load_from (or the base model) with LoRA adapters, fresh or from
    `adapter_from`, and the reference is that policy with its adapters off."""
    model_config = config.model
    common = dict(use_flash_attention=model_config.use_flash_attention, load_from=model_config.load_from,
                  cache_dir=config.cache_dir, vocab_size=len(tokenizer))
    if model_config.use_peft:
        quantized = lora.four_bit_options(model_config.policy_dtype) if model_config.peft.load_in_4bit else {}
        policy = trainer_class.load_policy(model_config.name_or_path, model_config.policy_dtype, **common, **quantized)
        disable_dropout(policy)
        settings = lora.lora_config(lora.LoraSettings.of(model_config), trainer_class.lora_task_type,
                                    trainer_class.lora_heads)
        policy = lora.with_lora(policy, settings, adapter_from)
        return policy, lora.AdaptersOff(policy) if trainer_class.use_reference_model else None
    policy = trainer_class.load_policy(model_config.name_or_path, model_config.policy_dtype,
                                       **{**common, 'load_from': policy_load_from})
    disable_dropout(policy)
    reference_model = None
    if trainer_class.use_reference_model:
        reference_model = models.load_causal_lm(model_config.name_or_path, model_config.reference_dtype, **common)
        disable_dropout(reference_model)
    return policy, reference_model


def saved_adapter(saved_policy: str) -> str:
    """The adapter directory of the checkpoint whose policy.pt is `saved_policy` (a LoRA run's)."""
    return os.path.join(os.path.dirname(saved_policy), checkpoint.ADAPTER)


def build_trainer(config: DictConfig):
    """Data, models and the trainer of one process, from a validated config (online: without data; each
    round gives its own)."""
    start_process(config.seed, config.retain_freed_memory)
    trainer_class = trainers.get_trainer_class(config.loss.trainer)
    tokenizer = models.load_tokenizer(config.model.tokenizer_name_or_path or config.model.name_or_path,
                                      control_tokens(config))
    online = config.online.rounds > 0
    train_loader = None if online else build_loader(config, tokenizer, 'train')  # data errors surface before models
    eval_loader = None if online else build_loader(config, tokenizer, 'test')
    policy, reference_model = load_models(config, trainer_class, tokenizer, config.model.load_from,
                                          config.model.load_lora_from)
    return trainer_class(tokenizer, config, train_loader, eval_loader, policy, reference_model,
                         rank=get_rank(), world_size=get_world_size())


def build_labeler(config: DictConfig, cache_path: str):
    online = config.online
    return make_labeler(online.labeler, online.reward_function, online.reward_model, online.judge,
                        online.base_url or os.environ.get('OPENAI_BASE_URL'), cache_path, config.model.max_length)


def build_online_rounds(config: DictConfig, trainer) -> OnlineRounds:
    """The online round loop of a run: the prompt pool, the held-out prompts, the labeler, and each round's
    loaders (the loss's loader on the round's feedback file)."""
    tokenizer, online = trainer.tokenizer, config.online
    prompt_options = dict(loader_class=dataloader.PromptDataLoader, batch_size=config.model.eval_batch_size,
                          n_epochs=1, n_examples=None)
    pool = build_loader(config, tokenizer, 'train', list(online.prompts or config.datasets), **prompt_options)
    held_out = build_loader(config, tokenizer, 'test', [online.eval_prompts], **prompt_options) \
        if online.eval_prompts else None
    make_loaders = lambda path: (build_loader(config, tokenizer, 'train', [path], n_examples=None),
                                 build_loader(config, tokenizer, 'test', [path]))
    labeler = build_labeler(config, os.path.join(trainer.run_dir, 'rounds', 'judgments.jsonl'))
    make_sampler = lambda: halos_sampler(trainer.policy, tokenizer, SamplingOptions.of(config))
    return OnlineRounds(trainer, OnlineSettings.of(config), pool, held_out, make_loaders, make_sampler, labeler)


def load_run_tokenizer(config: DictConfig):
    """The tokenizer the run saved (with any control tokens), else the model's."""
    return models.load_run_tokenizer(config.local_run_dir, config.model.tokenizer_name_or_path or config.model.name_or_path)
