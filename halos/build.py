"""The wiring: the composed config checked into typed settings once, at the edge, then the loaders, the
models, the trainer, the labeller and the online rounds built from them.

train.py and eval.py (the entry points) call these; everything below them receives typed settings
(halos/settings.py, LoopSettings, SamplingOptions, OnlineSettings) or plain arguments.
"""
import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import dataloader
import models
import trainers
from halos import batch as schema
from halos import checkpoint, lora
from halos.batching import FEEDBACK_NAMES, held_feedback_kinds, item_example, load_examples
from halos.datasets import check_dataset_name
from halos.errors import ConfigError, DataError, describe_error, one_line
from halos.examples import Formatting, prompt_digest
from halos.feedback import NoRecordsForSplit
from halos.labelers import (RewardFunctionLabeler, RewardFunctionsLabeler, check_prompts, make_labeler,
                            reward_function_labeler)
from halos.labelling import FEEDBACK_OPTIONS
from halos.loop import Humanline, LoopSettings
from halos.monitors import HackingMonitor, MonitorSettings
from halos.online import OnlineRounds
from halos.online_rl import Rollouts
from halos.sampling import SamplingOptions
from halos.settings import (REQUIRED, LossSettings, Overrides, RunSettings, dotted_keys, is_params, missing_keys,
                            typed, unknown_key)
from halos.vllm_engine import EngineChoice, chosen_sampler
from utils import concrete_classes, disable_dropout, get_rank, get_world_size, rank0_print, start_process


LOSS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'config', 'loss')


def run_settings(config: DictConfig, overrides: Sequence[str] = ()) -> RunSettings:
    """The composed config as typed settings: every key's type and rule (halos/settings.py), the loss section's
    keys against its trainer's and loader's Params, then what spans keys. `overrides` (the command line's)
    name a bad value as the user typed it. Nothing is loaded before this has passed."""
    overrides = Overrides(overrides)
    raw = OmegaConf.to_container(config, resolve=False)
    if raw.get('datasets') in (REQUIRED, None):
        raw['datasets'] = []  # what needs datasets says so (check_consistency, eval.py)
    missing = missing_keys(raw)
    if missing:
        raise missing_keys_error(missing)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as error:  # an interpolation that does not resolve
        key, message = error.full_key, str(error).split('\n')[0]
        named = f"{overrides.named(key, raw_value(raw, key))}: {message}" if key else one_line(error)
        raise ConfigError(named) from None
    loss = resolved.pop('loss', {}) or {}
    if not isinstance(loss, dict):  # a loss= choice over a run directory's config, which has no loss group
        raise ConfigError(f"{overrides.named('loss', loss)}: loss must be a group of keys (a run directory's "
                          f"config.yaml holds its own; change one with ++loss.<key>=...)")
    run = typed(RunSettings, resolved, overrides)
    run = dataclasses.replace(run, loss=loss_settings(loss, overrides))
    check_consistency(run)
    return derived(run)


def raw_value(raw: dict, key: str):
    """The value at a dotted key of an unresolved config."""
    for part in key.split('.'):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def missing_keys_error(missing: List[str]) -> ConfigError:
    example = {'exp_name': 'exp_name=my_run', 'datasets': 'datasets=[hh]'}.get(missing[0])
    return ConfigError(f"missing required config keys: {', '.join(missing)}"
                       + (f" (e.g. {example})" if example else ''))


def loss_settings(loss: dict, overrides: Overrides) -> LossSettings:
    """The loss section: its fixed keys, its trainer's Params and its loader's Params."""
    own = [spec.name for spec in dataclasses.fields(LossSettings) if not is_params(spec)]
    fixed = typed(LossSettings, {key: value for key, value in loss.items() if key in own}, overrides, 'loss.')
    if 'loss.name' in overrides.lines:  # it would rename the loss, not change it
        raise ConfigError(f"{overrides.lines['loss.name']}: loss.name is the name of the loss YAML that loss=<name> "
                          f"chooses (a resume checks it): choose the loss with loss=<name>")
    missing = [f'loss.{key}' for key in ('name', 'trainer', 'dataloader') if getattr(fixed, key) == REQUIRED]
    if missing:
        raise ConfigError(f"missing required config keys: {', '.join(missing)} (a loss YAML names all three: its name, "
                          f"which a resume checks, its trainer and its dataloader)")
    trainer_class = trainers.get_trainer_class(fixed.trainer)
    loader_class = dataloader.get_dataloader_class(fixed.dataloader)
    check_loader_fits(fixed.trainer, trainer_class, fixed.dataloader, loader_class)
    trainer_keys = [spec.name for spec in dataclasses.fields(trainer_class.Params)]
    loader_keys = [spec.name for spec in dataclasses.fields(loader_class.Params)]
    rest = {key: value for key, value in loss.items() if key not in own}
    for key in rest:
        if key == 'humanline' and not issubclass(trainer_class.Params, Humanline):
            raise ConfigError(f"loss.humanline: {fixed.trainer} takes no humanline, as its Params are not a Humanline "
                              f"(humanline works with dpo, cdpo, ipo, kto, kto-simple, kto-zero, grpo)")
        if key not in trainer_keys and key not in loader_keys:
            names = [f'loss.{name}' for name in (*own, *trainer_keys, *loader_keys)]
            declared = ', '.join(trainer_keys) or 'no parameters'
            raise ConfigError(unknown_key(f'loss.{key}', names, overrides, otherwise=(
                f"{fixed.trainer}.Params declares {declared} (a loss declares its keys in its trainer's Params)")))
    params = typed(trainer_class.Params, {k: v for k, v in rest.items() if k in trainer_keys}, overrides, 'loss.')
    if getattr(params, 'humanline', False) and not trainer_class.uses_reference(params):
        raise ConfigError(f"loss.humanline=true: {fixed.trainer} loads no reference model, whose per-token log-ratios "
                          f"humanline clamps")
    loader_params = typed(loader_class.Params, {k: v for k, v in rest.items() if k in loader_keys}, overrides, 'loss.')
    return dataclasses.replace(fixed, params=params, loader_params=loader_params)


def check_loader_fits(trainer_name: str, trainer_class: type, loader_name: str, loader_class: type) -> None:
    """A loss's trainer and dataloader agree (BasicTrainer.fits_loader), else a ConfigError naming the dataloaders
    that do."""
    takes = lambda loader: loader.kinds is None or trainer_class.fits_loader(loader)  # a user's loader may declare none
    if takes(loader_class):
        return
    fitting = sorted(name for name, loader in concrete_classes(vars(dataloader), dataloader.DataLoader).items()
                     if loader.kinds is not None and takes(loader))
    labelled = f", labelled with {' and '.join(trainer_class.labels_read)}" if trainer_class.labels_read else ''
    what = 'prompts alone' if trainer_class.trains_on_prompts else \
        f"{' and '.join(trainer_class.prefixes)} sequences{labelled}"
    raise ConfigError(f"loss.dataloader={loader_name} does not give what loss.trainer={trainer_name} trains on "
                      f"({what}); these do: {', '.join(fitting)}")


def check_consistency(run: RunSettings) -> None:
    """What no single key's rule can say: keys that must agree with each other or with the trainer."""
    trainer_class = trainers.get_trainer_class(run.loss.trainer)
    loss, model, online = run.loss, run.model, run.online
    if loss.use_reference_model is not None and loss.use_reference_model != trainer_class.use_reference_model:
        raise ConfigError(f"loss.use_reference_model={loss.use_reference_model} but {loss.trainer} "
                          f"{'needs' if trainer_class.use_reference_model else 'does not use'} a reference model")
    if run.n_epochs is None and run.n_examples is None:
        raise ConfigError("set n_epochs or n_examples (both are null)")
    if model.max_prompt_length >= model.max_length:
        raise ConfigError(f"model.max_prompt_length ({model.max_prompt_length}) must be below model.max_length "
                          f"({model.max_length}), or no room is left for a completion")
    humanline = isinstance(loss.params, Humanline) and loss.params.humanline
    if humanline and run.cache_reference_logprobs:
        raise ConfigError("loss.humanline=true moves the reference to the policy at every step, so its log-probs "
                          "cannot be cached: set cache_reference_logprobs=false")
    if run.cache_reference_logprobs and not trainer_class.uses_reference(loss.params):
        rank0_print(f"warning: cache_reference_logprobs=true, but loss={loss.name} loads no reference model with these "
                    f"settings, so there is nothing to cache")
    elif run.cache_reference_logprobs and not trainer_class.reference_logps_cacheable:
        raise ConfigError(f"loss={loss.name} needs per-token reference log-probs: set cache_reference_logprobs=false")
    if model.load_lora_from and not model.use_peft:
        raise ConfigError(f"model.load_lora_from={model.load_lora_from} continues saved LoRA adapters: set "
                          f"model.use_peft=true (without it the run trains every weight and never loads them)")
    if model.use_peft and humanline:
        raise ConfigError("loss.humanline=true with model.use_peft=true: under LoRA the reference is the base model "
                          "with the adapters off, so it cannot follow the policy step by step; train without LoRA")
    if run.max_new_tokens is not None and run.max_new_tokens >= model.max_length:
        rank0_print(f"warning: max_new_tokens={run.max_new_tokens} is not below model.max_length={model.max_length}, "
                    f"which bounds a prompt and its completion together: a completion gets at most max_length less "
                    f"its prompt's tokens")
    if run.mode != 'train':
        return  # eval.py neither trains nor labels: what it needs, it checks itself
    if model.policy_dtype == 'float16':
        rank0_print("warning: model.policy_dtype=float16 keeps the weights and the optimizer's state in float16, "
                    "without loss scaling: small updates are lost and the optimizer's eps (1e-8) is 0 there, which "
                    "turns weights without gradient to NaN; train in bfloat16, or in float32 with "
                    "model.autocast_dtype=float16 to compute in float16")
    if schema.KL in trainer_class.prefixes and model.batch_size == 1:
        rank0_print(f"warning: model.batch_size=1: loss={loss.name} estimates its reference point from each prompt "
                    f"paired with another item's completion in the batch, and a batch of one pairs it with its own: "
                    f"use model.batch_size >= 2")
    if run.online.sampler == 'vllm':
        chosen_sampler(EngineChoice('vllm'))  # where vLLM cannot run, the run stops before anything loads
    if online.rounds > 0 and trainer_class.samples_online:
        raise ConfigError(f"loss={loss.name} samples and trains every step: leave online.rounds=0")
    if online.rounds > 0:
        check_online(run, trainer_class)
    elif trainer_class.samples_online:
        check_sampled_online(run)
    elif not run.datasets:
        raise missing_keys_error(['datasets'])
    if online.reward_weights is not None and not (online.rounds > 0 or trainer_class.samples_online):
        raise ConfigError(f"online.reward_weights weighs the functions of online.reward_function, which "
                          f"loss={loss.name} does not score with (online rounds and online RL do): leave it null")
    warn_of_unread_keys(run, trainer_class)
    warn_of_policy_gradient_keys(run)
    warn_of_a_reference_without_the_loaded_adapters(run, trainer_class)
    if getattr(loss.params, 'reward_function', None):  # online PPO scores its own samples
        reward_function_labeler(loss.params.reward_function)


def warn_of_a_reference_without_the_loaded_adapters(run: RunSettings, trainer_class: type) -> None:
    """Under LoRA the reference is the policy with its adapters off: adapters continued from an SFT run leave the
    SFT policy out of it, which the recipe of SFT then DPO means to keep."""
    if run.model.load_lora_from and trainer_class.uses_reference(run.loss.params):
        start = f"model.load_from={run.model.load_from}" if run.model.load_from else \
            f"the base model {run.model.name_or_path}"
        rank0_print(f"warning: the reference model is the policy with its adapters off, {start}, not the policy "
                    f"that the adapters of model.load_lora_from={run.model.load_lora_from} make: to keep that policy "
                    f"as the reference, train fresh adapters on its merged model (++model.load_from=<its run>/LATEST/hf "
                    f"without model.load_lora_from)")


def changed_keys(section, prefix: str = '') -> List[str]:
    """The keys of a settings section whose values are not their defaults (a required key has none)."""
    def default(spec):
        return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    return [f'{prefix}{spec.name}' for spec in dataclasses.fields(section)
            if default(spec) is not dataclasses.MISSING and getattr(section, spec.name) != default(spec)]


def warn_of_policy_gradient_keys(run: RunSettings) -> None:
    """Name a policy-gradient loss's keys set where they do nothing, and clip ranges that do not act as meant."""
    params, changed = run.loss.params, changed_keys(run.loss.params, 'loss.')
    warnings = []
    if 'loss.max_refills' in changed and getattr(params, 'dynamic_sampling', True) is False:
        warnings.append("loss.max_refills set, but loss.dynamic_sampling=false replaces no group: "
                        "++loss.dynamic_sampling=true replaces the groups whose scores are all equal")
    length = getattr(params, 'max_completion_length', None)
    if length is not None and params.loss_type != 'dr_grpo':
        warnings.append(f"loss.max_completion_length set, but loss.loss_type={params.loss_type} does not read it: "
                        f"dr_grpo alone divides by that constant")
    elif length is not None and run.max_new_tokens is not None and length < run.max_new_tokens:
        warnings.append(f"loss.max_completion_length={length} is below max_new_tokens={run.max_new_tokens}: "
                        f"dr_grpo divides by it as the longest a completion can be, so a long completion's tokens "
                        f"weigh more than one sequence; set it to max_new_tokens, as TRL does")
    if hasattr(params, 'epsilon_high'):  # a clip range [1 - epsilon, 1 + epsilon_high]
        if params.epsilon >= 1:
            warnings.append(f"loss.epsilon={params.epsilon} puts the clip range's lower side at "
                            f"{1 - params.epsilon:g}: a ratio, always > 0, is never clipped from below")
        if params.epsilon_high is not None and params.epsilon_high < params.epsilon:
            warnings.append(f"loss.epsilon_high={params.epsilon_high} is below loss.epsilon={params.epsilon}: the "
                            f"clip range is narrower above 1 than below, the reverse of DAPO's clip-higher")
    for warning in warnings:
        rank0_print(f"warning: {warning}")


FORMATTING_KEYS = ('human_prefix', 'human_suffix', 'assistant_prefix', 'assistant_suffix')


def warn_of_unread_keys(run: RunSettings, trainer_class: type) -> None:
    """Name keys set where the run reads none of them: online keys of an offline run (the held-out keys aside,
    which eval.py reads; and the sampler's, where the trainer samples), LoRA keys without LoRA or where saved
    adapters give them."""
    # online PPO reads its sampler's keys; an offline run's held-out keys are kept for an online run from it
    read = ('online.sampler', 'online.vllm_') if trainer_class.trains_on_prompts else ('online.eval_',)
    unread = [key for key in changed_keys(run.online, 'online.') if not key.startswith(read)]
    if unread and not (run.online.rounds > 0 or trainer_class.samples_online):
        how = ("samples with its own keys (loss.reward_function, loss.reward_model) and reads no other online key: "
               "it evaluates on the test split of its datasets" if trainer_class.trains_on_prompts else
               "trains offline on its datasets and reads no online key: ++online.rounds=N trains in online rounds")
        rank0_print(f"warning: {', '.join(unread)} set, but loss={run.loss.name} with online.rounds=0 {how}")
    lora_keys = changed_keys(run.model.peft, 'model.peft.')
    if lora_keys and not run.model.use_peft:
        rank0_print(f"warning: {', '.join(lora_keys)} set, but model.use_peft=false trains every weight: "
                    f"++model.use_peft=true trains LoRA adapters")
    elif lora_keys and run.model.load_lora_from:
        rank0_print(f"warning: {', '.join(lora_keys)} set, but the adapters of model.load_lora_from="
                    f"{run.model.load_lora_from} keep the settings of their adapter_config.json")
    changed = changed_keys(run)
    fractions = [key for key in ('frac_unique_desirable', 'frac_unique_undesirable') if key in changed]
    loader_class = dataloader.get_dataloader_class(run.loss.dataloader)
    if fractions and not issubclass(loader_class, dataloader.UnpairedPreferenceDataLoader):
        rank0_print(f"warning: {', '.join(fractions)} set, but loss={run.loss.name} trains on every item of its "
                    f"data: they keep a share of the desirable and undesirable examples of the unpaired losses")
    band = [key for key in changed_keys(run.loss.params, 'loss.')
            if key in ('loss.log_epsilon_P', 'loss.log_epsilon_R')]
    if band and isinstance(run.loss.params, Humanline) and not run.loss.params.humanline:
        rank0_print(f"warning: {', '.join(band)} set, but loss.humanline=false clamps no log-ratio: "
                    f"++loss.humanline=true clamps each token's log-ratio to the band")
    formatting = [key for key in FORMATTING_KEYS if key in changed]
    if formatting and run.use_chat_template:
        rank0_print(f"warning: {', '.join(formatting)} set, but use_chat_template=true formats the turns with the "
                    f"tokenizer's chat template instead")


def check_model_paths(run: RunSettings, training: bool = True) -> None:
    """A model the run loads, named by a local path that is not there, stops it before anything loads (checked
    when a run starts, not with the settings: a command may name the model that the command before it writes).
    Training also loads its labeller's reward model."""
    named = {'model.name_or_path': run.model.name_or_path,
             'model.tokenizer_name_or_path': run.model.tokenizer_name_or_path}
    if training:
        named['online.reward_model'] = run.online.reward_model if labels_as_it_trains(run, 'reward_model') else None
        named['loss.reward_model'] = getattr(run.loss.params, 'reward_model', None)
    for key, value in named.items():
        reason = value and models.missing_model(value)
        if reason:
            raise ConfigError(f"{key}={value!r}: {reason}")


def labels_as_it_trains(run: RunSettings, labeler: str) -> bool:
    """The run samples from the policy as it trains (online rounds, or a loss that samples every step) and
    labels the samples with `labeler`."""
    samples = run.online.rounds > 0 or trainers.get_trainer_class(run.loss.trainer).samples_online
    return samples and run.online.labeler == labeler


def check_judge_server(run: RunSettings) -> None:
    """A judge server that is down, or refuses the API key, stops a fresh run before the models load and sample,
    on the processes that ask it (online rounds: rank 0; step-level online RL: every rank). A resumed run may
    find its judgments cached: its labeller checks the server when it needs it."""
    asks = get_rank() == 0 or trainers.get_trainer_class(run.loss.trainer).samples_online
    if labels_as_it_trains(run, 'judge') and asks and not run.resume:
        from halos import judge
        url = judge.server_url(run.online.base_url)
        judge.check_reachable(judge.make_client(url, timeout=10, max_retries=1), url)


def check_online(run: RunSettings, trainer_class: type) -> None:
    online = run.online
    if run.model.use_peft and online.reference == 'previous':
        raise ConfigError("online.reference=previous with model.use_peft=true: under LoRA the reference is the base "
                          "model with the adapters off, which stays the starting model; use online.reference=fixed")
    if run.cache_reference_logprobs:
        raise ConfigError("online rounds train on new samples every round: set cache_reference_logprobs=false")
    if online.reference == 'previous' and not trainer_class.use_reference_model:
        raise ConfigError(f"online.reference=previous: {run.loss.trainer} has no reference model")
    if online.reference == 'previous' and getattr(run.loss.params, 'humanline', False):
        rank0_print("warning: online.reference=previous, but loss.humanline=true moves the reference to the policy "
                    "at every step, so the round's start is never the reference")
    kinds = dataloader.get_dataloader_class(run.loss.dataloader).feedback_kinds
    written = 'binary' if online.feedback == 'best' else online.feedback  # the best sample, labelled desirable
    if kinds and written not in kinds:
        raise ConfigError(f"online.feedback={online.feedback}: loss={run.loss.name} trains on {' or '.join(kinds)} "
                          f"feedback; set online.feedback={kinds[0]}")
    compares = online.feedback in ('pairwise', 'scalar', 'best') or online.feedback == 'binary' and online.per_prompt
    feedback = f"online.feedback={online.feedback}" + (' with online.per_prompt=true' if online.feedback == 'binary'
                                                       else '')
    if compares and online.samples_per_prompt < 2:
        raise ConfigError(f"online.samples_per_prompt={online.samples_per_prompt}: {feedback} compares the samples of "
                          f"a prompt, so it needs at least 2")
    if run.temperature == 0 and compares and online.samples_per_prompt > 1:
        raise ConfigError(f"temperature=0 decodes greedily, so the samples of a prompt are alike and {feedback} has "
                          f"nothing to compare: set temperature > 0 (null: the model's)")
    if online.feedback == 'best' and schema.SCORE in trainer_class.labels_read:
        raise ConfigError(f"online.feedback=best keeps one sample of each prompt, and loss={run.loss.name} compares "
                          f"the samples of a prompt: set online.feedback=scalar")
    check_feedback_options(run)
    check_labeler(run, 'online rounds')


def check_feedback_options(run: RunSettings) -> None:
    """An online.* key set for a kind of feedback that does not read it (label.py refuses the same options)."""
    online = run.online
    for option in changed_keys(online):
        kinds = FEEDBACK_OPTIONS.get(option)
        if kinds and online.feedback not in kinds:
            raise ConfigError(f"online.{option} applies to online.feedback={' or '.join(kinds)}, not {online.feedback}")
    if online.feedback == 'pairwise' and online.threshold in ('mean', 'median'):
        raise ConfigError(f"online.threshold={online.threshold}: pairwise feedback takes the least reward gap of a "
                          f"pair, a number")


def check_sampled_online(run: RunSettings) -> None:
    """A trainer that samples every step (loss=grpo-online and its kin)."""
    online = run.online
    if trainers.get_trainer_class(run.loss.trainer).baseline_of == 'prompt':
        if online.samples_per_prompt < 2:
            raise ConfigError(f"online.samples_per_prompt={online.samples_per_prompt}: loss={run.loss.name} compares "
                              f"the samples of a prompt, so it needs at least 2")
        if run.temperature == 0:
            raise ConfigError(f"temperature=0 decodes greedily, so the samples of a prompt are alike and "
                              f"loss={run.loss.name}'s advantages, which compare them, are all 0: set temperature > 0 "
                              f"(null: the model's)")
    check_labeler(run, f'loss={run.loss.name}')


def check_labeler(run: RunSettings, who: str) -> None:
    """Prompts to sample, and a labeler whose settings are given (a reward function imported: a broken file
    stops the run before anything loads)."""
    online = run.online
    if not (online.prompts or run.datasets):
        raise ConfigError(f"{who} need prompts: online.prompts=[file.jsonl] (or datasets=[...])")
    needs = {'function': 'reward_function', 'reward_model': 'reward_model', 'judge': 'judge'}[online.labeler]
    if not getattr(online, needs):
        given = [key for key in ('reward_model', 'judge') if getattr(online, key)]  # its labeller is named alike
        switch = f" (online.{given[0]} is set: add online.labeler={given[0]} to score with it)" if given else ''
        raise ConfigError(f"online.labeler={online.labeler} needs online.{needs} to be set{switch}")
    if online.reward_weights is not None and online.labeler != 'function':
        raise ConfigError(f"online.reward_weights weighs the functions of online.reward_function, and "
                          f"online.labeler={online.labeler} scores with none: leave it null")
    unread = [f'online.{key}' for key in ('reward_function', 'reward_model', 'judge')
              if key != needs and getattr(online, key)]
    if unread:
        rank0_print(f"warning: {', '.join(unread)} set, but online.labeler={online.labeler} scores with "
                    f"online.{needs} (online.eval_reward_function scores the held-out samples)")
    if online.labeler == 'function':
        reward_function_labeler(online.reward_function, online.reward_weights)
    if online.eval_reward_function:
        reward_function_labeler(online.eval_reward_function)


def derived(run: RunSettings) -> RunSettings:
    """eval_every on an optimizer step; reward models and saved adapters found relative to cache_dir, as
    model.load_from is."""
    step_examples = run.model.batch_size * run.model.gradient_accumulation_steps
    eval_every = run.eval_every
    if eval_every % step_examples:
        eval_every = max(step_examples, eval_every - eval_every % step_examples)
        rank0_print(f"note: eval_every={run.eval_every} is not a multiple of batch_size x gradient_accumulation_steps "
                    f"= {step_examples}; using {eval_every} so that checkpoints fall on optimizer steps")
    online = dataclasses.replace(run.online, reward_model=models.in_cache_dir(run.online.reward_model, run.cache_dir))
    params = run.loss.params
    if getattr(params, 'reward_model', None):
        params = dataclasses.replace(params, reward_model=models.in_cache_dir(params.reward_model, run.cache_dir))
    model = dataclasses.replace(run.model, load_lora_from=models.in_cache_dir(run.model.load_lora_from, run.cache_dir))
    return dataclasses.replace(run, eval_every=eval_every, online=online, model=model,
                               loss=dataclasses.replace(run.loss, params=params))


def loop_settings(run: RunSettings) -> LoopSettings:
    return LoopSettings(run_dir=run.local_run_dir, cache_dir=run.cache_dir, seed=run.seed, model=run.model,
                        optimizer=run.optimizer, lr=run.lr, warmup_steps=run.warmup_steps, eval_every=run.eval_every,
                        do_first_eval=run.do_first_eval, minimum_log_interval_secs=run.minimum_log_interval_secs,
                        keep_intermediate_checkpoints=run.intermediate_checkpoints and not run.debug,
                        cache_reference_logprobs=run.cache_reference_logprobs, sampling=sampling_options(run),
                        formatting=formatting(run), use_chat_template=run.use_chat_template,
                        checkpoint_minutes=run.checkpoint_minutes,
                        engine=EngineChoice(run.online.sampler, run.online.vllm_gpu_memory_utilization))


def sampling_options(run: RunSettings) -> SamplingOptions:
    """A run's sampling settings (top_p, temperature, top_k, max_new_tokens, sampling_dtype; seed)."""
    return SamplingOptions(max_length=run.model.max_length, top_p=run.top_p, temperature=run.temperature,
                           top_k=run.top_k, max_new_tokens=run.max_new_tokens, seed=run.seed,
                           autocast_dtype=run.sampling_dtype or run.model.autocast_dtype)


def formatting(run: RunSettings) -> Formatting:
    return Formatting(run.human_prefix, run.human_suffix, run.assistant_prefix, run.assistant_suffix)


def build_loader(run: RunSettings, tokenizer, split: str, dataset_names: Optional[List[str]] = None,
                 loader_class: Optional[type] = None, **options):
    """The run's loader of `split` (its loss's loader class unless given); `options` override the settings'."""
    loader_class = loader_class or dataloader.get_dataloader_class(run.loss.dataloader)
    trainer_class = trainers.get_trainer_class(run.loss.trainer)
    kwargs = dict(split=split, max_length=run.model.max_length, max_prompt_length=run.model.max_prompt_length,
                  human_prefix=run.human_prefix, human_suffix=run.human_suffix,
                  assistant_prefix=run.assistant_prefix, assistant_suffix=run.assistant_suffix,
                  seed=run.seed, data_dir=run.data_dir, use_chat_template=run.use_chat_template,
                  frac_unique_desirable=run.frac_unique_desirable,
                  frac_unique_undesirable=run.frac_unique_undesirable, sequence_kinds=trainer_class.prefixes,
                  rank=get_rank(), world_size=get_world_size())
    if isinstance(run.loss.loader_params, loader_class.Params):
        kwargs.update(dataclasses.asdict(run.loss.loader_params))
    if split == 'train':
        kwargs.update(batch_size=run.model.batch_size, n_epochs=run.n_epochs, n_examples=run.n_examples)
    else:
        kwargs.update(batch_size=run.model.eval_batch_size, n_epochs=1, n_examples=run.n_eval_examples)
    tokens = control_tokens(run)
    if tokens and issubclass(loader_class, (dataloader.SFTDataLoader, dataloader.PromptDataLoader)):
        kwargs['prompt_suffix'] = tokens[0]  # a CSFT policy is asked for what it learned as desirable
    kwargs.update(options)
    return loader_class(list(dataset_names or run.datasets), tokenizer, **kwargs)


def warn_of_an_unreached_n_examples(run: RunSettings, train_loader) -> None:
    """n_epochs and n_examples both stop a run (as in HALOs): say so where n_epochs stops it first."""
    if run.n_epochs is None or run.n_examples is None:
        return
    planned = run.n_epochs * train_loader.examples_per_epoch()
    if planned < run.n_examples:
        rank0_print(f"warning: n_epochs={run.n_epochs} stops the run after {planned} examples, before "
                    f"n_examples={run.n_examples}; ++n_epochs=null trains n_examples examples")


def warn_of_a_warmup_past_the_run(run: RunSettings, trainer) -> None:
    """A linear warmup as long as the run keeps the learning rate below lr to its end (HALOs' default warmup
    outlasts a short run); online rounds, whose steps add up round by round, are not checked."""
    steps = -(-len(trainer.train_iterator) // trainer.accumulation_steps) * trainer.steps_per_batch()
    if 0 < steps <= run.warmup_steps:
        rank0_print(f"warning: warmup_steps={run.warmup_steps} outlasts the run's {steps} optimizer steps, so the "
                    f"learning rate never reaches lr={run.lr:g} (at the last step it is "
                    f"{steps / (run.warmup_steps + 1):.0%} of it): lower warmup_steps")


def warn_of_unused_datasets(run: RunSettings, train_loader) -> None:
    """Name a dataset of several that gives the loss nothing to train on (prompts alone, or feedback of a kind
    its loader does not read) while the others train."""
    used = {item_example(item).dataset_name for item in train_loader.items}
    examples: Dict[str, list] = {}
    for example in train_loader.full_data.values():
        examples.setdefault(example.dataset_name, []).append(example)
    for name, held in examples.items():
        if used and name not in used:
            kinds = ' and '.join(FEEDBACK_NAMES[kind] for kind in held_feedback_kinds(held)) or 'prompts alone'
            rank0_print(f"warning: {name}: loss={run.loss.name} trains on none of its {len(held)} prompts (they hold "
                        f"{kinds}), only on the other datasets")


def warn_of_unbalanced_kto_weights(run: RunSettings, train_loader) -> None:
    """KTO's paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3]: name a run outside it, and the weight that
    brings it to 1."""
    params = run.loss.params
    desirable, undesirable = (train_loader.counts.get(f'unary: {kind}', 0) for kind in ('desirable', 'undesirable'))
    if not (hasattr(params, 'undesirable_weight') and desirable and undesirable):  # one kind alone is warned of
        return
    ratio = params.desirable_weight * desirable / (params.undesirable_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return
    balanced = params.desirable_weight * desirable / undesirable
    rank0_print(f"warning: loss={run.loss.name}: desirable_weight x {desirable} desirable / (undesirable_weight x "
                f"{undesirable} undesirable) = {ratio:.3g}, outside the [1, 4/3] that KTO's paper recommends: "
                f"++loss.undesirable_weight={balanced:.3g} makes it 1")


def warn_of_cuts(run: RunSettings, train_loader) -> None:
    """Say so where model.max_length cuts most completions, or model.max_prompt_length most prompts (checked on
    the first prompts): the loss then sees completions that stop where they did not end, or prompts that lost
    their start (or end)."""
    cuts, data, model = train_loader.cuts(), ', '.join(train_loader.dataset_names), run.model
    if cuts.completions_cut > cuts.completions / 2:
        rank0_print(f"warning: model.max_length={model.max_length} cuts {cuts.completions_cut} of the first "
                    f"{cuts.completions} completions of {data} (with model.max_prompt_length="
                    f"{model.max_prompt_length}): raise model.max_length to train on whole completions")
    if cuts.prompts_cut > cuts.prompts / 2:
        where = 'where a completion would not fit after them' if cuts.completions else 'before they are sampled'
        rank0_print(f"warning: model.max_prompt_length={model.max_prompt_length} cuts {cuts.prompts_cut} of the "
                    f"first {cuts.prompts} prompts of {data}, {where}: raise model.max_prompt_length (and "
                    f"model.max_length) to train on whole prompts")


def warn_of_special_token_text(run: RunSettings, loader) -> None:
    """Name data whose text holds a special token's (`<|im_end|>`, `</s>`): the tokenizer reads it as that token,
    not as text, so a completion seems to end, or a turn to open, where the data did not mean it."""
    tokenizer = loader.tokenizer
    specials = {token for token in tokenizer.all_special_tokens if token} | \
        {token.content for token in tokenizer.added_tokens_decoder.values() if token.special and token.content}
    if not specials:
        return
    pattern = re.compile('|'.join(re.escape(token) for token in sorted(specials, key=len, reverse=True)))
    found, holding = set(), 0
    for example in loader.full_data.values():
        texts = [turn['content'] for turn in example.turns] + [text.removesuffix(run.assistant_suffix)
                                                                for text in example.generations]
        tokens = {match.group() for text in texts for match in pattern.finditer(text)}
        found |= tokens
        holding += bool(tokens)
    if holding:
        rank0_print(f"warning: {holding} of the {len(loader.full_data)} prompts of {', '.join(loader.dataset_names)} "
                    f"hold the text of the tokenizer's special tokens {', '.join(sorted(found))} in a turn or a "
                    f"completion: it is read as that token, not as text, so a completion seems to end, or a turn to "
                    f"open, where the data did not mean it")


def start_wandb(run: RunSettings, name: str, **options):
    """The run's wandb run, in wandb.mode unless WANDB_MODE says otherwise, its files in the run directory unless
    WANDB_DIR says otherwise; a wandb that does not start (no API key, a WANDB_* value it refuses, no server) ends
    in one line."""
    import wandb
    os.environ.setdefault('WANDB_MODE', run.wandb.mode)
    try:
        return wandb.init(entity=run.wandb.entity, project=run.wandb.project, name=name,
                          dir=os.environ.get('WANDB_DIR', run.local_run_dir), **options)
    except Exception as error:
        raise ConfigError(f"wandb did not start ({' '.join(describe_error(error).split())}): fix that, or train "
                          f"without it (++wandb.enabled=false, or WANDB_MODE=offline)") from None


def control_tokens(run: RunSettings) -> List[str]:
    """The special tokens the run's loader adds to prompts (CSFT's control tokens)."""
    return dataloader.get_dataloader_class(run.loss.dataloader).control_tokens(run.loss.loader_params)


def load_models(run: RunSettings, trainer_class, tokenizer, policy_load_from: Optional[str],
                adapter_from: Optional[str] = None):
    """The policy from `policy_load_from` (train.py: model.load_from; eval.py: the trained policy) and, when
    the loss uses one, the reference model from model.load_from; the base model where they are null.
    With model.use_peft the policy is model.load_from (or the base model) with LoRA adapters, fresh or from
    `adapter_from`, and the reference is that policy with its adapters off."""
    model = run.model
    common = dict(use_flash_attention=model.use_flash_attention, load_from=model.load_from,
                  cache_dir=run.cache_dir, vocab_size=len(tokenizer))
    if model.use_peft:
        quantized = lora.four_bit_options(model.policy_dtype) if model.peft.load_in_4bit else {}
        policy = trainer_class.load_policy(model.name_or_path, model.policy_dtype, **common, **quantized)
        disable_dropout(policy)
        policy = lora.with_lora(policy, lora.lora_config(model.peft, trainer_class.lora_task_type,
                                                         trainer_class.lora_heads), adapter_from)
        return policy, lora.AdaptersOff(policy) if trainer_class.uses_reference(run.loss.params) else None
    policy = trainer_class.load_policy(model.name_or_path, model.policy_dtype,
                                       **{**common, 'load_from': policy_load_from})
    disable_dropout(policy)
    reference_model = None
    if trainer_class.uses_reference(run.loss.params):
        reference_model = models.load_causal_lm(model.name_or_path, model.reference_dtype, **common)
        disable_dropout(reference_model)
    return policy, reference_model


def saved_adapter(saved_policy: str) -> str:
    """The adapter directory of the checkpoint whose policy.pt is `saved_policy` (a LoRA run's)."""
    return os.path.join(os.path.dirname(saved_policy), checkpoint.ADAPTER)


def build_trainer(run: RunSettings):
    """Data, models and the trainer of one process, from checked settings (online: without data; each round
    gives its own)."""
    check_model_paths(run)
    check_judge_server(run)
    if run.model.load_from:  # a missing or unreadable checkpoint stops the run before anything loads
        checkpoint.check_policy_file(models.resolve_load_from(run.model.load_from, run.cache_dir), 'model.load_from')
    start_process(run.seed, run.retain_freed_memory)
    trainer_class = trainers.get_trainer_class(run.loss.trainer)
    tokenizer = models.load_tokenizer(run.model.tokenizer_name_or_path or run.model.name_or_path, control_tokens(run))
    check_chat_template(run, tokenizer)
    online, sampled = run.online.rounds > 0, trainer_class.samples_online
    prompts = run.online.prompts or run.datasets
    train_prompts, held_out_prompts = (prompts, run.online.eval_prompts or prompts) if sampled else (None, None)
    if online:  # the rounds' loaders come later
        for name in [*prompts, *(run.online.eval_prompts or [])]:
            check_dataset_name(name)
        check_round_prompt_fields(run)
    train_loader = None if online else build_loader(run, tokenizer, 'train', train_prompts)  # data errors surface
    evaluates = not online and run.n_eval_examples != 0  # (0: no evaluation, so no test split to read)
    try:
        eval_loader = build_loader(run, tokenizer, 'test', held_out_prompts) if evaluates else None  # before models
    except NoRecordsForSplit as error:  # a file of training records alone
        raise NoRecordsForSplit(f"{error}; or train without evaluating: ++n_eval_examples=0") from None
    for loader in (train_loader, eval_loader):
        if loader is not None and not loader.items and loader.n_examples != 0:
            raise DataError(loader.why_no_items(losses_reading))
    if train_loader is not None:
        warn_of_an_unreached_n_examples(run, train_loader)
        warn_of_unused_datasets(run, train_loader)
        warn_of_cuts(run, train_loader)
        warn_of_special_token_text(run, train_loader)
        warn_of_unbalanced_kto_weights(run, train_loader)
        if eval_loader is not None and not sampled:
            warn_on_shared_held_out(train_loader.full_data.values(), eval_loader.full_data.values(), 'evaluation',
                                    "a feedback file's records without a 'split' field serve both splits: give the "
                                    "held-out ones \"split\": \"test\"")
    extra = {}
    if sampled:
        extra['rollouts'] = rollouts = build_rollouts(run)
        check_prompt_fields(rollouts.labeler, train_loader.items, 'the training prompts')
        if eval_loader is not None:
            warn_on_shared_held_out(train_loader.items, eval_loader.items)
            check_prompt_fields(rollouts.held_out_labeler, eval_loader.items, 'the held-out prompts')
    policy, reference_model = load_models(run, trainer_class, tokenizer, run.model.load_from, run.model.load_lora_from)
    trainer = trainer_class(tokenizer, loop_settings(run), run.loss.params, train_loader, eval_loader, policy,
                            reference_model, rank=get_rank(), world_size=get_world_size(), **extra)
    if train_loader is not None:
        warn_of_a_warmup_past_the_run(run, trainer)
    return trainer


def unknown_override(key: str, override: str) -> str:
    """The message for `key=value` (`override`, as typed) of a key the composed config lacks: a key that halos
    declares (a setting, or a key of some loss) but no config file lists is set with ++, which checks it against
    the chosen loss; anything else gets the closest keys of the settings and of every loss."""
    loss_keys = {f'loss.{name}' for config in loss_yamls().values() for name in config}
    loss_keys |= {f'loss.{spec.name}' for module, base in ((trainers, trainers.BasicTrainer),
                                                            (dataloader, dataloader.DataLoader))
                  for kind in vars(module).values() if isinstance(kind, type) and issubclass(kind, base)
                  for spec in dataclasses.fields(kind.Params)}
    known = dotted_keys(RunSettings) + sorted(loss_keys)
    readers = [f'loss={name}' for name, config in sorted(loss_yamls().items()) if key.split('.', 1)[-1] in config]
    if key.startswith('loss.') and readers:  # the chosen loss, whose YAML lacks it, may read it all the same
        shown = ', '.join(readers[:4]) + (f' and {len(readers) - 4} more' if len(readers) > 4 else '')
        return (f"{override}: the chosen loss's config does not list {key}, a key of {shown}: with a loss that reads "
                f"it, set it with ++{override}")
    if key in known:
        return f"{override}: the config files do not list {key}; set it with ++{override}"
    return f"{override}: " + unknown_key(key, known, Overrides(), otherwise='no key is close to it (docs/training.md '
                                                                            'lists them)')


def losses_reading(kind: str) -> List[str]:
    """The losses of config/loss/ that train offline on `kind` feedback (binary, pairwise or scalar): those whose
    loader's feedback_kinds hold it, or that read any kind."""
    names = []
    for name, config in loss_yamls().items():
        loader = getattr(dataloader, str(config.get('dataloader')), None)
        reads_feedback = isinstance(loader, type) and issubclass(loader, dataloader.DataLoader) and \
            not issubclass(loader, dataloader.PromptDataLoader)  # a YAML naming no such loader is left out
        if reads_feedback and kind in (loader.feedback_kinds or (kind,)):
            names.append(name)
    return names


def loss_yamls() -> Dict[str, DictConfig]:
    """config/loss/<name>.yaml by name, in name order."""
    return {file[:-len('.yaml')]: OmegaConf.load(os.path.join(LOSS_CONFIGS, file))
            for file in sorted(os.listdir(LOSS_CONFIGS))}


def build_rollouts(run: RunSettings) -> Rollouts:
    """What a trainer that samples every step needs: k, the labelers of its samples and held-out samples, and
    the monitors' settings."""
    labeler = build_labeler(run, os.path.join(run.local_run_dir, 'judgments.jsonl'))
    return Rollouts(run.online.samples_per_prompt, labeler, held_out_labeler(run, labeler), monitor_settings(run),
                    run.online.min_scored)


def held_out_labeler(run: RunSettings, labeler):
    """online.eval_reward_function (a gold reward for the held-out samples), else the labeler."""
    return reward_function_labeler(run.online.eval_reward_function) if run.online.eval_reward_function else labeler


def monitor_settings(run: RunSettings) -> MonitorSettings:
    online = run.online
    return MonitorSettings(online.monitor_window, online.max_length_growth, online.max_repetition,
                           online.stop_on_hacking)


def build_labeler(run: RunSettings, cache_path: str):
    online = run.online
    return make_labeler(online.labeler, online.reward_function, online.reward_model, online.judge,
                        online.base_url, cache_path, reward_weights=online.reward_weights)


def build_online_rounds(run: RunSettings, trainer) -> OnlineRounds:
    """The online round loop of a run: the prompt pool, the held-out prompts, the labeller, and each round's
    loaders (the loss's loader on the round's feedback file)."""
    tokenizer, online = trainer.tokenizer, run.online
    prompt_options = dict(loader_class=dataloader.PromptDataLoader, batch_size=run.model.eval_batch_size,
                          n_epochs=1, n_examples=None)
    pool = build_loader(run, tokenizer, 'train', online.prompts or run.datasets, **prompt_options)
    held_out = build_loader(run, tokenizer, 'test', online.eval_prompts, **prompt_options) \
        if online.eval_prompts else None
    if held_out is not None:
        warn_on_shared_held_out(pool.items, held_out.items)
    warn_of_cuts(run, pool)
    warn_of_special_token_text(run, pool)
    make_loaders = lambda path: (build_loader(run, tokenizer, 'train', [path]),  # n_epochs, n_examples: a round's
                                 build_loader(run, tokenizer, 'test', [path]))
    labeler = build_labeler(run, os.path.join(trainer.run_dir, 'rounds', 'judgments.jsonl'))
    gold = held_out_labeler(run, labeler)
    return OnlineRounds(trainer, online, run.seed, pool, held_out, make_loaders, trainer.sampler, labeler, gold,
                        HackingMonitor(monitor_settings(run)))


def check_round_prompt_fields(run: RunSettings) -> None:
    """Before the models load: a prompt of the online rounds' pool or held-out set that lacks a field its reward
    function needs stops the run (the rounds' loaders are built after the models; their records are read here
    only where a function needs a field)."""
    online = run.online
    labeler = reward_function_labeler(online.reward_function, online.reward_weights) \
        if online.labeler == 'function' else None
    gold = reward_function_labeler(online.eval_reward_function) if online.eval_reward_function else labeler
    formatting = (run.human_prefix, run.human_suffix, run.assistant_prefix, run.assistant_suffix)
    for function, names, split, what in [(labeler, online.prompts or run.datasets, 'train', 'the prompt pool'),
                                         (gold, online.eval_prompts, 'test', 'the held-out prompts')]:
        if names and getattr(function, 'needs', None):
            examples, _ = load_examples(names, split, formatting, run.data_dir, run.seed)
            check_prompt_fields(function, examples.values(), what)


def check_prompt_fields(labeler, examples, what: str) -> None:
    """A reward function that takes a field some prompt's record lacks stops the run before anything samples
    (other labelers read no fields)."""
    if isinstance(labeler, (RewardFunctionLabeler, RewardFunctionsLabeler)):
        check_prompts(labeler, examples, what)


def warn_on_shared_held_out(train_items, held_out_items, measure: str = 'held-out reward',
                            remedy: str = 'give online.eval_prompts a file of other prompts') -> None:
    """Warn (rank 0) when held-out prompts are also training prompts: the held-out reward checks the training
    reward (the monitors compare them), which a training prompt cannot do, and an offline evaluation on them
    measures how well the training data is fitted, not how the policy does on other prompts."""
    shared = len(prompt_digests(held_out_items) & prompt_digests(train_items))
    if shared:
        rank0_print(f"warning: {shared} of the {len(held_out_items)} held-out prompts are also training prompts, so "
                    f"the {measure} is not held out there: {remedy}")


def prompt_digests(examples) -> set:
    return {prompt_digest(example.turns or example.prompt) for example in examples}


def load_run_tokenizer(run: RunSettings):
    """The tokenizer the run saved (with any control tokens), else the model's; eval.py's first load."""
    check_model_paths(run, training=False)
    tokenizer = models.load_run_tokenizer(run.local_run_dir, run.model.tokenizer_name_or_path or run.model.name_or_path)
    check_chat_template(run, tokenizer)
    return tokenizer


def check_chat_template(run: RunSettings, tokenizer) -> None:
    """use_chat_template=true needs a tokenizer with a chat template: stop before any model loads."""
    if run.use_chat_template and not tokenizer.chat_template:
        raise ConfigError(f"use_chat_template=true, but the tokenizer of {tokenizer.name_or_path} has no chat "
                          f"template: set use_chat_template=false (prompts then take human_prefix and "
                          f"assistant_prefix), or give model.tokenizer_name_or_path a tokenizer that has one")
