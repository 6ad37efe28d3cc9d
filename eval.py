"""Sample from or evaluate a trained policy.

    python eval.py --config-path=<cache_dir>/<exp_name> ++mode=sample ++n_samples=512 \
        ++model.eval_batch_size=32 ++samples_dir=samples/

mode=sample      one completion per test prompt -> <samples_dir>/<exp_name>.json
                 {sampled_at, config, samples: [{prompt, chosen, policy}]} (no chosen where the data holds prompts
                 only); n_samples=null samples every prompt;
                 a CSFT run's prompts end in its desirable control token (loss.chosen_control_token).
                 With ++num_samples_per_prompt=k: k samples per prompt as HALOs sample records
                 {output, prompt, prompt_id, sample_id, generator, dataset, type} in
                 <samples_dir>/<exp_name>_samples.jsonl (for label.py)
mode=eval        the trainer's evaluation metrics on the test split
mode=alpacaeval  AlpacaEval model outputs -> <samples_dir>/alpaca_<exp_name>.json
mode=reward      one sample per prompt of ++prompts=<prompts file or datasets> (test split), scored by
                 ++reward_function=file.py:function (a run trained online has its own: online rounds'
                 online.eval_prompts, online RL's, else the prompts it trained on, scored by
                 online.eval_reward_function, else online.reward_function; online PPO's datasets, scored by
                 loss.reward_function): prints the mean reward, its standard error, n, the mean length and the KL to
                 the starting model (the mean summed log-ratio of the samples), and appends them (with each
                 part's mean, for a reward given in parts) to <samples_dir>/rewards.jsonl; the samples go
                 to <samples_dir>/<exp_name>.json ({sampled_at, config, samples: [{prompt, policy, reward,
                 reward_parts?, prompt_id}]}, the prompt as the policy was given it, as in mode=sample;
                 compare.py reads it; a file there that mode=sample wrote is kept as <exp_name>.sample.json,
                 and the other way round)
mode=lm_eval     lm-eval-harness (requirements-eval.txt) on the policy, its final weights with any LoRA adapter
                 merged (what its HF export holds): ++lm_eval.tasks=[halos_basics,...]; prints lm-eval's table,
                 writes its results to <local_run_dir>/lm_eval.json and logs them to wandb

`--config-path` is the run directory (train.py saved config.yaml there). The policy is
`saved_policy` (a policy.pt or an HF directory, relative to cache_dir or absolute); ++saved_policy=null
samples from the base model, as does `--config-path=config model=<model> loss=<loss> exp_name=<name>
datasets=[...]` (halos' own config directory: no run needed). Generation uses vLLM when it is installed and
a GPU is present, and halos' own decoding loop otherwise (halos/sampling.py); the output format is the same.
"""
import dataclasses
import datetime
import importlib.util
import json
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

import dataloader
import models
import trainers
from halos import batch as schema
from halos import checkpoint, lora, rl
from halos.actor_critic import ActorCriticTrainer
from halos.build import (build_labeler, build_loader, build_rollouts, load_models, load_run_tokenizer, loop_settings,
                         missing_keys_error, run_settings, sampling_options, saved_adapter, start_wandb,
                         warn_on_shared_held_out)
from halos.cli import primary_config_dir, run_hydra, skipped_task_files, task_overrides
from halos.datasets import is_feedback_file
from halos.errors import ConfigError, MissingFileError, describe_error, reported_as_one_line
from halos.jsonl import append_json_lines, write_json, write_jsonl, write_text
from halos.labelers import checked_scores, make_labeler, reward_function_labeler
from halos.labelling import reward_parts_field
from halos.monitors import part_means, reward_summary
from halos.packing import sequence_logps
from halos.preference import RewardModelTrainer
from halos.sampling import Sample, make_sampler, sample_records
from halos.settings import Overrides, RunSettings, as_dict
from utils import autocast, disable_dropout, set_seed, start_process

MODES = ('sample', 'eval', 'alpacaeval', 'reward', 'lm_eval')
HALOS_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'lm_eval')


def load_policy(run: RunSettings, tokenizer):
    """The saved policy as a plain causal LM (a PPO policy's value head is dropped: sampling needs none; a
    LoRA run's policy.pt holds its adapters alone: those beside it are merged into its base model, while its HF
    export is the merged model already)."""
    adapters = saved_lora_adapters(run)
    policy = models.load_causal_lm(run.model.name_or_path, run.model.policy_dtype,
                                   use_flash_attention=run.model.use_flash_attention,
                                   load_from=run.model.load_from if adapters else run.saved_policy,
                                   cache_dir=run.cache_dir, vocab_size=len(tokenizer))
    if adapters:
        policy = lora.with_lora(policy, None, adapters, 'saved_policy').merge_and_unload()
    disable_dropout(policy)
    return policy.eval()


def saved_lora_adapters(run: RunSettings) -> Optional[str]:
    """The adapters beside the saved policy.pt of a LoRA run (which holds them alone); None for a whole model,
    such as an HF directory or the policy.pt of a run without LoRA given as saved_policy."""
    if not (run.model.use_peft and run.saved_policy):
        return None
    saved = models.resolve_load_from(run.saved_policy, run.cache_dir)
    adapters = saved_adapter(saved)
    return adapters if not os.path.isdir(saved) and os.path.isdir(adapters) else None


def sampling_loader(run: RunSettings, tokenizer, dataset_names) -> dataloader.SFTDataLoader:
    """One item per test prompt, in a seeded order; a CSFT run's prompts end in its desirable control token
    (build_loader)."""
    return build_loader(run, tokenizer, 'test', dataset_names, dataloader.SFTDataLoader,
                        max_prompt_count=1, n_examples=run.n_samples)


def policy_sampler(run: RunSettings, tokenizer):
    return make_sampler(load_policy(run, tokenizer), tokenizer, sampling_options(run), run.model.policy_dtype)


def sample_k(run: RunSettings) -> list:
    """num_samples_per_prompt samples of each test prompt (or of n_samples of them), as HALOs sample records."""
    tokenizer = load_run_tokenizer(run)
    loader = build_loader(run, tokenizer, 'test', loader_class=dataloader.PromptDataLoader, n_examples=run.n_samples)
    complete = policy_sampler(run, tokenizer)  # after the prompts: a mistake in them stops it before the model loads
    set_seed(run.seed)
    return sample_records(complete, loader, run.num_samples_per_prompt, run.exp_name, run.n_samples)


def sample(run: RunSettings, dataset_names, include_original_prompt: bool = False) -> list:
    """One sample of each test prompt beside the data's chosen completion (none where the data holds prompts
    only, as a prompts file does)."""
    tokenizer = load_run_tokenizer(run)
    loader = sampling_loader(run, tokenizer, dataset_names)
    if not loader.items:
        loader = build_loader(run, tokenizer, 'test', dataset_names, dataloader.PromptDataLoader,
                              n_examples=run.n_samples)
    complete = policy_sampler(run, tokenizer)
    set_seed(run.seed)
    samples = []
    with tqdm(total=min(len(loader.items), run.n_samples or len(loader.items)), desc='sampling') as progress:
        for batch in loader:
            chosen = batch.get(schema.key(schema.TARGET, schema.TEXT))
            for i, (completion,) in enumerate(complete(batch, 1)):
                sample_record = {'prompt': batch[schema.PROMPT_TEXT][i], **({'chosen': chosen[i]} if chosen else {}),
                                 'policy': completion.text}
                if include_original_prompt:
                    sample_record['original_prompt'] = batch[schema.ORIGINAL_PROMPT][i]
                samples.append(sample_record)
            progress.update(min(schema.batch_size(batch), progress.total - progress.n))  # the last batch may be cut
    return samples[:run.n_samples]


def evaluate(run: RunSettings) -> dict:
    """The run's trainer evaluation (its loss and metrics) on the test split; online RL's on the held-out prompts
    that its training evaluated on."""
    trainer_class = trainers.get_trainer_class(run.loss.trainer)
    if run.saved_policy:
        check_trained_head(run, trainer_class)
    tokenizer = load_run_tokenizer(run)
    eval_loader = build_loader(run, tokenizer, 'test',
                               own_held_out_prompts(run) if trainer_class.samples_online else None)
    if run.online.rounds and not eval_loader.items:
        raise ConfigError(f"mode=eval: {run.exp_name} trained in online rounds on prompts, which hold no completions "
                          f"to evaluate its loss on; its measure is the held-out reward: ++mode=reward (on "
                          f"{'online.eval_prompts' if run.online.eval_prompts else '++prompts=<held-out prompts>'}, "
                          f"scored as the run scored them), or give ++datasets=[feedback files] for the loss")
    adapters = saved_lora_adapters(run)
    if run.model.use_peft and not adapters:  # a whole model given as saved_policy
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, use_peft=False))
    policy, reference_model = load_models(run, trainer_class, tokenizer, run.saved_policy, adapters)
    policy.eval()
    extra = {'rollouts': build_rollouts(run)} if trainer_class.samples_online else {}  # it samples and scores
    trainer = trainer_class(tokenizer, loop_settings(run), run.loss.params, None, eval_loader, policy, reference_model,
                            **extra)
    return {'metadata': as_dict(run), 'results': trainer.evaluate()}


def check_trained_head(run: RunSettings, trainer_class) -> None:
    """A reward model's saved_policy holds the score head it trained, and a PPO policy's its value head: another
    policy's checkpoint loads with a freshly initialised head (as training from an SFT policy starts). A reward
    model would then score at random, so it is refused; PPO's evaluation is warned of what the fresh head sets."""
    if issubclass(trainer_class, RewardModelTrainer):
        if not has_head(run, 'score'):
            raise ConfigError(f"saved_policy={run.saved_policy} has no score head (a policy's checkpoint, not a reward "
                              f"model's): {run.exp_name} is a reward model (loss={run.loss.name}), evaluated by the "
                              f"head it trained; give its checkpoint, <its run>/LATEST/policy.pt or <its run>/LATEST/hf")
    elif issubclass(trainer_class, ActorCriticTrainer) and not has_head(run, 'v_head'):
        print(f"warning: saved_policy={run.saved_policy} holds no value head (it is not a PPO run's policy.pt), so "
              f"its evaluation's values, and the advantages and losses made from them, come from a freshly "
              f"initialised head")


def has_head(run: RunSettings, head: str) -> bool:
    """Whether the saved policy holds the head `head` (an HF directory holds a score head as a sequence
    classifier, and never a value head: PPO's export leaves it in policy.pt)."""
    path = models.resolve_load_from(run.saved_policy, run.cache_dir)
    if os.path.isdir(path):
        return head == 'score' and models.is_sequence_classifier(path)
    return any(head in key.split('.') for key in checkpoint.state_keys(path))


def log_ratios_to_start(run: RunSettings, policy, start, batch: Dict, samples: List[Sample], pad_token_id: int,
                        recorded: bool) -> List[float]:
    """log pi(y|x) - log pi_start(y|x) per sample: packed rows, the LM head at completion tokens only, under the
    run's model.autocast_dtype like its training. The policy's side is the log-prob its sampler recorded where
    the sampler ran at that precision (`recorded`), else one more forward."""
    rows = rl.rollout_sequences(batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK],
                                [s.token_ids for s in samples], pad_token_id)

    def logps_under(model) -> List[float]:
        with torch.no_grad(), autocast(next(model.parameters()).device.type, run.model.autocast_dtype):
            return sequence_logps(model, rows.input_ids, rows.attention_mask, rows.labels,
                                  padding_free=run.model.padding_free).tolist()
    recorded_logps = [s.logp for s in samples]
    policy_logps = recorded_logps if recorded and None not in recorded_logps else logps_under(policy)
    return [policy_logp - start_logp for policy_logp, start_logp in zip(policy_logps, logps_under(start))]


def reward(run: RunSettings) -> Tuple[List[dict], dict]:
    """The policy's held-out reward: one sample per prompt, scored by the reward function, with the samples'
    mean summed log-ratio to the starting model (model.load_from, else the base model) as its KL."""
    tokenizer = load_run_tokenizer(run)
    loader = build_loader(run, tokenizer, 'test', run.prompts, loader_class=dataloader.PromptDataLoader,
                          n_examples=run.n_samples)
    warn_of_training_prompts(run, tokenizer, loader.items)
    policy = load_policy(run, tokenizer)
    is_start = run.saved_policy == run.model.load_from and not run.model.use_peft  # its KL is 0
    start = None if is_start else models.load_causal_lm(
        run.model.name_or_path, run.model.policy_dtype, load_from=run.model.load_from,
        cache_dir=run.cache_dir, vocab_size=len(tokenizer)).eval()
    options = sampling_options(run)
    labeler, complete = reward_labeler(run), make_sampler(
        policy, tokenizer, options, run.model.policy_dtype)
    set_seed(run.seed)
    rewards, lengths, log_ratios, records = [], [], [], []
    with tqdm(loader, desc='sampling') as batches:  # closed before an error's line is printed
        for batch in batches:
            wanted = None if run.n_samples is None else run.n_samples - len(rewards)  # the last batch may run past
            samples = [group[0] for group in complete(batch, 1)][:wanted]
            given = {name: batch[name][:len(samples)] for name in (schema.PROMPT_AS_GIVEN, schema.PROMPT_ID,
                                                                    schema.PROMPT_EXTRA)}
            batch_rewards = checked_scores(labeler, given[schema.PROMPT_AS_GIVEN], [s.text for s in samples],
                                           [f'prompt {prompt_id}' for prompt_id in given[schema.PROMPT_ID]],
                                           given[schema.PROMPT_EXTRA])
            records += [{'prompt': prompt, 'policy': s.text, 'reward': r, **reward_parts_field(r), 'prompt_id': prompt_id}
                        for prompt, s, r, prompt_id in zip(batch[schema.PROMPT_TEXT], samples, batch_rewards,
                                                           batch[schema.PROMPT_ID])]
            rewards += batch_rewards
            lengths += [len(s.text.split()) for s in samples]
            log_ratios += [0.0] * len(samples) if is_start else log_ratios_to_start(
                run, policy, start, batch, samples, tokenizer.pad_token_id,
                recorded=options.autocast_dtype == run.model.autocast_dtype)
    summary, parts = reward_summary(rewards), part_means(rewards)
    return records, {'exp_name': run.exp_name, 'saved_policy': run.saved_policy, 'prompts': run.prompts,
            'reward_function': run.reward_function or labeler.name, 'reward_mean': summary['mean'],
            'reward_se': summary['se'], 'n': summary['n'], 'length_words': statistics.fmean(lengths),
            'kl': statistics.fmean(log_ratios),
            **({'reward_parts': parts} if parts else {}),
            'sampled_at': str(datetime.datetime.now())}


def warn_of_training_prompts(run: RunSettings, tokenizer, held_out: list) -> None:
    """Held-out prompts that the run also trained on (a file without 'split' fields serves both splits) are warned
    of, as training warned of them; a hub dataset's splits are its own, so only files are read again."""
    files = [name for name in run.online.prompts or run.datasets if is_feedback_file(name)]
    if files:
        training = build_loader(run, tokenizer, 'train', files, loader_class=dataloader.PromptDataLoader,
                                n_examples=None, n_epochs=1)
        warn_on_shared_held_out(training.items, held_out, remedy='give ++prompts=<a file of other prompts>')


def reward_line(result: dict) -> str:
    """mode=reward's summary line; one prompt has no standard error, and a KL that rounds to zero from below
    (the policy's own sampling noise) reads 0.000."""
    spread = f"+- {result['reward_se']:.4f} " if result['n'] > 1 else ''
    return (f"reward {result['reward_mean']:.4f} {spread}(n={result['n']}), length {result['length_words']:.1f} words, "
            f"KL to the starting model {round(result['kl'], 3) + 0.0:.3f}")


def lm_eval_results(run: RunSettings) -> dict:
    """lm-eval-harness's simple_evaluate on the policy (LoRA merged), its tasks from data/lm_eval, lm_eval.include_path
    and lm-eval's own; the table printed, the results written to <local_run_dir>/lm_eval.json and logged to wandb."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table
    settings = run.lm_eval
    if settings.include_path and not os.path.isdir(settings.include_path):
        raise MissingFileError(f"lm_eval.include_path={settings.include_path}: no such directory (of task YAMLs)")
    task_manager = TaskManager(include_path=[HALOS_TASKS, *([settings.include_path] if settings.include_path else [])])
    unknown = [task for task in settings.tasks if task not in task_manager.all_tasks]
    if unknown:  # said before the policy loads
        skipped = skipped_task_files(settings.include_path) if settings.include_path else []
        raise ConfigError(f"lm_eval.tasks: no task {', '.join(unknown)} in lm-eval or {HALOS_TASKS}"
                          + (f" or {settings.include_path}" if settings.include_path else '')
                          + (f" (lm-eval skipped these task files: {'; '.join(skipped)})" if skipped else ''))
    for task in settings.tasks:
        check_task_builds(task_manager, task)
    tokenizer = load_run_tokenizer(run)
    policy = load_policy(run, tokenizer).to('cuda' if torch.cuda.is_available() else 'cpu')
    model = HFLM(pretrained=policy, tokenizer=tokenizer, batch_size=settings.batch_size,
                 max_length=run.model.max_length)
    results = lm_eval.simple_evaluate(model=model, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot,
                                      limit=settings.limit, task_manager=task_manager)
    print(make_table(results))
    path = os.path.join(run.local_run_dir, 'lm_eval.json')
    record = {'saved_policy': run.saved_policy, 'results': results['results'], 'versions': results['versions'],
              'n-shot': results['n-shot'], 'n-samples': results.get('n-samples', {}),
              'config': {key: str(value) for key, value in results['config'].items()}}
    write_text(path, json.dumps(with_earlier_tasks(path, record), indent=2, default=str))
    print(f'wrote the results to {path}')
    if run.wandb.enabled and not run.debug:
        with start_wandb(run, f'{run.exp_name}-lm_eval') as logged:
            logged.log({f'lm_eval/{task}/{metric}': value for task, metrics in results['results'].items()
                        for metric, value in metrics.items() if isinstance(value, (int, float))})
    return results


def with_earlier_tasks(path: str, record: dict) -> dict:
    """The results of the tasks evaluated now, and those of other tasks that the file at `path` holds for the
    same saved policy: a run's tasks may be evaluated one invocation at a time. Another policy's are replaced."""
    if not os.path.exists(path):
        return record
    with open(path) as f:
        earlier = json.load(f)
    if earlier.get('saved_policy') != record['saved_policy']:
        print(f"note: {path} held the results of saved_policy={earlier.get('saved_policy')}: replaced")
        return record
    return {**record, **{key: {**earlier.get(key, {}), **record[key]} for key in TASK_KEYED}}


TASK_KEYED = ('results', 'versions', 'n-shot', 'n-samples')  # lm-eval's results by task


def check_task_builds(task_manager, task: str) -> None:
    """lm-eval builds `task` (reads its YAML, loads its data) before the policy loads; what stops it, one line."""
    try:
        task_manager.load([task])
    except FileNotFoundError as error:  # a task's data_files, found relative to the working directory
        raise MissingFileError(f"lm_eval.tasks: task {task}: its data is not there ({str(error).splitlines()[0]}); "
                               f"a task YAML names its data_files relative to the working directory (run eval.py from "
                               f"the repository's root for halos_basics)") from None
    except Exception as error:  # its YAML's or its data's, whichever lm-eval or datasets raises
        entry = task_manager.task_index.get(task)
        where = f" ({entry.yaml_path})" if getattr(entry, 'yaml_path', None) else ''
        raise ConfigError(f"lm_eval.tasks: task {task}{where} does not build: "
                          f"{describe_error(error.__cause__ or error)}") from None


def own_held_out_prompts(run: RunSettings):
    """The prompts a run measured itself on: online rounds' online.eval_prompts; online RL's, else the test split
    of the prompts it trained on; any other run's, else its datasets (their test split, as mode=sample samples)."""
    if run.online.rounds > 0:
        return run.online.eval_prompts
    if trainers.get_trainer_class(run.loss.trainer).samples_online:
        return run.online.eval_prompts or run.online.prompts or run.datasets
    return run.online.eval_prompts or run.datasets


def own_reward_function(run: RunSettings):
    """The reward function a run trained online scored its held-out samples with."""
    if trains_online_ppo(run):
        return run.loss.params.reward_function
    return run.online.eval_reward_function or run.online.reward_function


def trains_online_ppo(run: RunSettings) -> bool:
    return run.online.rounds == 0 and hasattr(run.loss.params, 'reward_function')


def own_labeler(run: RunSettings) -> Optional[str]:
    """What a run scored with where no reward function did (None: a reward function, or nothing): PPO's reward
    model (loss.reward_model, online or offline), else its labeller's reward model or judge (online.labeler; an
    offline run's where it is given)."""
    if own_reward_model(run):
        return 'reward_model'
    if trains_online_ppo(run) or run.online.eval_reward_function or run.online.labeler == 'function':
        return None
    return run.online.labeler


def own_reward_model(run: RunSettings) -> Optional[str]:
    """The reward model that PPO (loss.reward_model) scored with."""
    return getattr(run.loss.params, 'reward_model', None) if run.online.rounds == 0 else None


def reward_labeler(run: RunSettings):
    """mode=reward's labeler: its reward function, weighted as in training where it is the run's own list; else
    the run's own reward model or judge."""
    if not run.reward_function:
        reward_model = own_reward_model(run)
        if reward_model:
            return make_labeler('reward_model', reward_model=reward_model)
        return build_labeler(run, os.path.join(run.local_run_dir, 'judgments.jsonl'))
    own = run.reward_function == run.online.reward_function and not trains_online_ppo(run)
    return reward_function_labeler(run.reward_function, run.online.reward_weights if own else None)


def checked(run: RunSettings) -> RunSettings:
    """What eval.py needs of the settings, beyond the schema's checks."""
    if run.mode not in MODES:  # a run directory's config.yaml holds mode=train, train.py's
        raise ConfigError(f"mode={run.mode}: eval.py takes ++mode=<{'|'.join(MODES)}>")
    if run.prompts == []:  # an empty shell variable, say: not the datasets, which null stands for
        default = "the run's own held-out prompts" if run.mode == 'reward' else 'the datasets'
        raise ConfigError(f"prompts=[]: no prompts files or dataset names; give some, or leave prompts out for "
                          f"{default}")
    if run.mode == 'sample' and run.prompts:  # the prompts to sample, instead of the test split of the datasets
        run = dataclasses.replace(run, datasets=run.prompts)
    if run.mode in ('sample', 'eval') and not run.datasets:
        raise missing_keys_error(['datasets'])
    if run.mode == 'eval' and run.n_eval_examples == 0:  # a run that trained without evaluating holds it
        raise ConfigError("n_eval_examples=0: mode=eval would evaluate no example; give ++n_eval_examples=N (null: "
                          "the whole test split)")
    if run.num_samples_per_prompt and run.mode != 'sample':
        raise ConfigError(f"num_samples_per_prompt={run.num_samples_per_prompt}: mode={run.mode} samples one "
                          f"completion per prompt; k completions per prompt are mode=sample's")
    if (run.num_samples_per_prompt or 1) > 1 and run.temperature == 0:
        print(f"warning: temperature=0 decodes greedily, so the {run.num_samples_per_prompt} samples of each prompt "
              f"are the same (label.py finds only ties among them): sample at a temperature above 0")
    if run.mode == 'reward':
        run = dataclasses.replace(run, prompts=run.prompts or own_held_out_prompts(run),
                                  reward_function=run.reward_function or own_reward_function(run))
    if run.mode == 'reward':
        lacking = [needed for needed, given in [
            ("++prompts=<prompts file or dataset names> (the run trained in online rounds and measured no held-out "
             "prompts: online.eval_prompts)" if run.online.rounds > 0 else "++prompts=<prompts file or dataset "
             "names> (the run has no held-out prompts of its own: online.eval_prompts, or its datasets)", run.prompts),
            ("++reward_function=path/to/file.py:function (the run scored with none of its own), or a reward model "
             "or judge: ++online.labeler=reward_model ++online.reward_model=<dir> (or ++online.labeler=judge "
             "++online.judge=<name>)",
             run.reward_function or own_labeler(run))] if not given]
        if lacking:
            raise ConfigError(f"mode=reward needs {' and '.join(lacking)}")
        if run.reward_function:
            reward_labeler(run)  # a broken reward function stops eval.py before anything loads
    if run.mode == 'lm_eval' and not run.lm_eval.tasks:
        raise ConfigError("mode=lm_eval needs ++lm_eval.tasks=[task,...] (halos_basics ships in data/lm_eval)")
    if run.mode == 'lm_eval' and importlib.util.find_spec('lm_eval') is None:
        raise ConfigError("mode=lm_eval needs lm-eval-harness: pip install -c constraints.txt -r requirements-eval.txt")
    return run


@hydra.main(version_base=None, config_path=None, config_name='config')
def evaluation(config: DictConfig) -> None:
    with reported_as_one_line('eval.py'):
        overrides = task_overrides()
        run_evaluation(checked(where_it_is(run_settings(config, overrides), primary_config_dir(), overrides)))


def where_it_is(run: RunSettings, config_dir: Optional[str], overrides: Sequence[str]) -> RunSettings:
    """A run directory given as --config-path that is no longer where its config.yaml says (copied, moved, or
    fetched from a cluster) is read where it is: its own LATEST/policy.pt and tokenizer, not those of the paths
    it was saved with, unless the command line names them. A copy of its config.yaml alone reads the run it
    was saved from, and says so."""
    if config_dir is None or os.path.exists(run.local_run_dir) and os.path.samefile(config_dir, run.local_run_dir):
        return run
    named = set(Overrides(overrides).lines)
    if named & {'local_run_dir', 'cache_dir', 'exp_name'}:
        return run
    saved_default = os.path.join(run.local_run_dir, checkpoint.LATEST, checkpoint.POLICY)
    reads_its_checkpoint = run.saved_policy == saved_default and 'saved_policy' not in named
    if not os.path.isdir(os.path.join(config_dir, checkpoint.LATEST)):
        if reads_its_checkpoint and not os.path.isdir(os.path.join(config_dir, 'loss')):  # not a config tree
            print(f"note: {config_dir} holds no checkpoint: reading that of the run its config.yaml was saved from, "
                  f"{run.local_run_dir} (where mode=lm_eval also writes)")
        return run
    policy = os.path.join(config_dir, checkpoint.LATEST, checkpoint.POLICY) if reads_its_checkpoint else run.saved_policy
    print(f"note: {config_dir} holds the run saved as {run.local_run_dir}: reading it where it is")
    return dataclasses.replace(run, local_run_dir=config_dir, saved_policy=policy)


def check_saved_policy(run: RunSettings) -> None:
    """The policy eval.py reads is there and readable, before anything loads."""
    try:
        path = models.resolve_load_from(run.saved_policy, run.cache_dir)
    except MissingFileError:
        if not run.saved_policy.endswith(os.path.join(checkpoint.LATEST, checkpoint.POLICY)):  # not a run's
            raise MissingFileError(f"saved_policy={run.saved_policy} does not exist (looked in cache_dir="
                                   f"{run.cache_dir} and the working directory)") from None
        raise MissingFileError(f"saved_policy={run.saved_policy} does not exist: the run has no checkpoint yet (train "
                               f"it, or continue it with ++resume=true), or give ++saved_policy=<a policy.pt or an "
                               f"HF directory>") from None
    checkpoint.check_policy_file(path, 'saved_policy')
    if os.path.isdir(path):
        models.check_same_shape(path, run.model.name_or_path, 'saved_policy')


def run_evaluation(run: RunSettings) -> None:
    """What eval.py does in run.mode."""
    if run.saved_policy:
        check_saved_policy(run)
    start_process(run.seed, run.retain_freed_memory)
    os.makedirs(run.samples_dir, exist_ok=True)
    if run.mode == 'sample' and run.num_samples_per_prompt:
        records = sample_k(run)
        path = os.path.join(run.samples_dir, f'{run.exp_name}_samples.jsonl')
        write_jsonl(path, records)
        print(f'wrote {len(records)} samples ({run.num_samples_per_prompt} per prompt) to {path}'
              f'{all_there_are(run, len(records) // run.num_samples_per_prompt)}')
    elif run.mode == 'sample':
        samples = sample(run, run.datasets)
        path = write_samples_file(run, samples, str(datetime.datetime.now()))
        print(f'wrote {len(samples)} samples to {path}{all_there_are(run, len(samples))}')
    elif run.mode == 'eval':
        print(json.dumps(evaluate(run)['results'], indent=2))
    elif run.mode == 'reward':
        samples, result = reward(run)
        append_json_lines(os.path.join(run.samples_dir, 'rewards.jsonl'), [result])
        path = write_samples_file(run, samples, result['sampled_at'])
        print(reward_line(result))
        print(f'wrote its {len(samples)} samples to {path}{all_there_are(run, len(samples))}')
    elif run.mode == 'lm_eval':
        lm_eval_results(run)
    else:
        samples = sample(run, ['alpacaeval'], include_original_prompt=True)
        path = os.path.join(run.samples_dir, f'alpaca_{run.exp_name}.json')
        write_json(path, [{'instruction': s['original_prompt'], 'output': s['policy'].strip(),
                           'reference': s['chosen'].strip(), 'generator': run.exp_name} for s in samples])
        print(f'wrote {len(samples)} AlpacaEval outputs to {path}{all_there_are(run, len(samples))}')


def all_there_are(run: RunSettings, n_prompts: int) -> str:
    """What a line of what was written adds where n_samples asked for more prompts than there are."""
    if run.n_samples is None or n_prompts >= run.n_samples:
        return ''
    return f' (n_samples={run.n_samples}, but there are only {n_prompts} prompts: all of them)'


def write_samples_file(run: RunSettings, samples: List[dict], sampled_at: str) -> str:
    """<samples_dir>/<exp_name>.json, which mode=sample and mode=reward both write (compare.py reads either): a
    file the other mode wrote is kept beside it, as <exp_name>.<that mode>.json."""
    path = os.path.join(run.samples_dir, f'{run.exp_name}.json')
    other = written_by(path)
    if other not in (None, run.mode):
        kept = os.path.join(run.samples_dir, f'{run.exp_name}.{other}.json')
        os.replace(path, kept)
        print(f'kept the samples that mode={other} wrote to {path} as {kept}')
    write_json(path, {'sampled_at': sampled_at, 'config': as_dict(run), 'samples': samples})
    return path


def written_by(path: str) -> Optional[str]:
    """The mode of the eval.py run that wrote the samples file at `path` (None: no such file of eval.py's)."""
    try:
        with open(path, encoding='utf-8') as f:
            mode = json.load(f)['config']['mode']
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return mode if mode in MODES else None


def main() -> None:
    run_hydra('eval.py', evaluation, lambda: (
        f"usage: python eval.py --config-path=<run directory> ++mode=<{'|'.join(MODES)}> [++key=value ...]\n\n"
        "The run directory is where train.py saved the run's config.yaml (<cache_dir>/<exp_name>); "
        "--config-path=config starts from halos' defaults. Each mode, what it writes and its keys: "
        "docs/evaluation.md."))


if __name__ == '__main__':
    main()
