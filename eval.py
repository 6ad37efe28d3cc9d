"""Sample from or evaluate a trained policy.

    python eval.py --config-path=<cache_dir>/<exp_name> ++mode=sample ++n_samples=512 \
        ++model.eval_batch_size=32 ++samples_dir=samples/

mode=sample      one completion per test prompt -> <samples_dir>/<exp_name>.json
                 {sampled_at, config, samples: [{prompt, chosen, policy}]}; n_samples=null samples every prompt;
                 a CSFT run's prompts end in its desirable control token (loss.chosen_control_token).
                 With ++num_samples_per_prompt=k: k samples per prompt as HALOs sample records
                 {output, prompt, prompt_id, sample_id, generator, dataset, type} in
                 <samples_dir>/<exp_name>_samples.jsonl (for label.py)
mode=eval        the trainer's evaluation metrics on the test split
mode=alpacaeval  AlpacaEval model outputs -> <samples_dir>/alpaca_<exp_name>.json
mode=reward      one sample per prompt of ++prompts=<prompts file or datasets> (test split), scored by
                 ++reward_function=file.py:function: prints the mean reward, its standard error, n, the mean
                 length and the KL to the starting model (the mean summed log-ratio of the samples), and
                 appends them to <samples_dir>/rewards.jsonl; the samples go to <samples_dir>/<exp_name>.json
                 ({sampled_at, config, samples: [{prompt, policy, reward, prompt_id}]}, the prompt rendered with the
                 run's prefixes as in mode=sample; compare.py reads it)

`--config-path` is the run directory (train.py saved config.yaml there). The policy is
`saved_policy` (a policy.pt or an HF directory, relative to cache_dir or absolute); ++saved_policy=null
samples from the base model, as does `--config-path=config model=<model> loss=<loss> exp_name=<name>
datasets=[...]` (halos' own config directory: no run needed). Generation uses vLLM when it is installed and a GPU is present, and
transformers' generate otherwise (halos/sampling.py); the output format is the same.
"""
import datetime
import json
import os
import statistics
from typing import Dict, List, Tuple

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import dataloader
import models
import trainers
from halos import batch as schema
from halos import lora, rl
from halos.build import (build_loader, check_overrides, control_tokens, load_models, load_run_tokenizer,
                         saved_adapter, shipped_defaults)
from halos.errors import ConfigError, reported_as_one_line
from halos.examples import render_turns
from halos.feedback import write_jsonl
from halos.labelers import RewardFunctionLabeler
from halos.online import reward_summary
from halos.packing import sequence_logps
from halos.sampling import Sample, SamplingOptions, make_sampler, sample_records
from utils import autocast, disable_dropout, set_seed, start_process

MODES = ('sample', 'eval', 'alpacaeval', 'reward')


def load_policy(config: DictConfig, tokenizer):
    """The saved policy as a plain causal LM (a PPO policy's value head is dropped: sampling needs none; a
    LoRA run's adapter is merged into its base model)."""
    lora_run = config.model.use_peft and config.saved_policy is not None
    policy = models.load_causal_lm(config.model.name_or_path, config.model.policy_dtype,
                                   use_flash_attention=config.model.use_flash_attention,
                                   load_from=config.model.load_from if lora_run else config.saved_policy,
                                   cache_dir=config.cache_dir, vocab_size=len(tokenizer))
    if lora_run:
        policy = lora.with_lora(policy, None, saved_adapter(config.saved_policy)).merge_and_unload()
    disable_dropout(policy)
    return policy.eval()


def sampling_loader(config: DictConfig, tokenizer, dataset_names) -> dataloader.SFTDataLoader:
    """One item per test prompt, in a seeded order; a CSFT run's prompts end in its desirable control token."""
    tokens = control_tokens(config)
    return build_loader(config, tokenizer, 'test', dataset_names, dataloader.SFTDataLoader,
                        max_prompt_count=1, n_examples=config.n_samples, prompt_suffix=tokens[0] if tokens else '')


def policy_sampler(config: DictConfig, tokenizer):
    return make_sampler(load_policy(config, tokenizer), tokenizer, SamplingOptions.of(config), config.model.policy_dtype)


def sample_k(config: DictConfig) -> list:
    """num_samples_per_prompt samples of each test prompt (or of n_samples of them), as HALOs sample records."""
    tokenizer = load_run_tokenizer(config)
    complete = policy_sampler(config, tokenizer)
    loader = build_loader(config, tokenizer, 'test', loader_class=dataloader.PromptDataLoader, n_examples=config.n_samples)
    set_seed(config.seed)
    return sample_records(complete, loader, config.num_samples_per_prompt, config.exp_name, config.n_samples)


def sample(config: DictConfig, dataset_names, include_original_prompt: bool = False) -> list:
    tokenizer = load_run_tokenizer(config)
    complete = policy_sampler(config, tokenizer)
    loader = sampling_loader(config, tokenizer, dataset_names)
    set_seed(config.seed)
    samples = []
    with tqdm(total=min(len(loader.items), config.n_samples or len(loader.items)), desc='sampling') as progress:
        for batch in loader:
            for i, (completion,) in enumerate(complete(batch, 1)):
                sample_record = {'prompt': batch[schema.PROMPT_TEXT][i],
                                 'chosen': batch[schema.key(schema.TARGET, schema.TEXT)][i], 'policy': completion.text}
                if include_original_prompt:
                    sample_record['original_prompt'] = batch[schema.ORIGINAL_PROMPT][i]
                samples.append(sample_record)
            progress.update(schema.batch_size(batch))
    return samples[:config.n_samples]


def evaluate(config: DictConfig) -> dict:
    """The run's trainer evaluation (its loss and metrics) on the test split."""
    trainer_class = trainers.get_trainer_class(config.loss.trainer)
    tokenizer = load_run_tokenizer(config)
    policy, reference_model = load_models(config, trainer_class, tokenizer, config.saved_policy,
                                          saved_adapter(config.saved_policy) if config.model.use_peft else None)
    policy.eval()
    eval_loader = build_loader(config, tokenizer, 'test')
    trainer = trainer_class(tokenizer, config, None, eval_loader, policy, reference_model)
    return {'metadata': OmegaConf.to_container(config), 'results': trainer.evaluate()}


def log_ratios_to_start(config: DictConfig, policy, start, batch: Dict, samples: List[Sample], pad_token_id: int,
                        recorded: bool) -> List[float]:
    """log pi(y|x) - log pi_start(y|x) per sample: packed rows, the LM head at completion tokens only, under the
    run's model.autocast_dtype like its training. The policy's side is the log-prob its sampler recorded where
    the sampler ran at that precision (`recorded`), else one more forward."""
    rows = rl.rollout_sequences(batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK],
                                [s.token_ids for s in samples], pad_token_id)

    def logps_under(model) -> List[float]:
        with torch.no_grad(), autocast(next(model.parameters()).device.type, config.model.autocast_dtype):
            return sequence_logps(model, rows.input_ids, rows.attention_mask, rows.labels,
                                  padding_free=config.model.padding_free).tolist()
    recorded_logps = [s.logp for s in samples]
    policy_logps = recorded_logps if recorded and None not in recorded_logps else logps_under(policy)
    return [policy_logp - start_logp for policy_logp, start_logp in zip(policy_logps, logps_under(start))]


def reward(config: DictConfig) -> Tuple[List[dict], dict]:
    """The policy's held-out reward: one sample per prompt, scored by the reward function, with the samples'
    mean summed log-ratio to the starting model (model.load_from, else the base model) as its KL."""
    if not config.prompts or not config.reward_function:
        raise ConfigError("mode=reward needs ++prompts=<prompts file or dataset names> and "
                          "++reward_function=path/to/file.py:function")
    tokenizer = load_run_tokenizer(config)
    policy = load_policy(config, tokenizer)
    is_start = config.saved_policy == config.model.load_from and not config.model.use_peft  # its KL is 0
    start = None if is_start else models.load_causal_lm(
        config.model.name_or_path, config.model.policy_dtype, load_from=config.model.load_from,
        cache_dir=config.cache_dir, vocab_size=len(tokenizer)).eval()
    options = SamplingOptions.of(config)
    prompts = [config.prompts] if isinstance(config.prompts, str) else list(config.prompts)
    loader = build_loader(config, tokenizer, 'test', prompts, loader_class=dataloader.PromptDataLoader,
                          n_examples=config.n_samples)
    labeler, complete = RewardFunctionLabeler(config.reward_function), make_sampler(
        policy, tokenizer, options, config.model.policy_dtype)
    set_seed(config.seed)
    rewards, lengths, log_ratios, records = [], [], [], []
    for batch in tqdm(loader, desc='sampling'):
        samples = [group[0] for group in complete(batch, 1)]
        batch_rewards = labeler(batch[schema.PROMPT_TURNS], [s.text for s in samples])
        records += [{'prompt': render_turns(turns, config.human_prefix, config.human_suffix, config.assistant_prefix,
                                            config.assistant_suffix),
                     'policy': s.text, 'reward': r, 'prompt_id': prompt_id}
                    for turns, s, r, prompt_id in zip(batch[schema.PROMPT_TURNS], samples, batch_rewards,
                                                      batch[schema.PROMPT_ID])]
        rewards += batch_rewards
        lengths += [len(s.text.split()) for s in samples]
        log_ratios += [0.0] * len(samples) if is_start else log_ratios_to_start(
            config, policy, start, batch, samples, tokenizer.pad_token_id,
            recorded=options.autocast_dtype == config.model.autocast_dtype)
    summary = reward_summary(rewards)
    return records, {'exp_name': config.exp_name, 'saved_policy': config.saved_policy, 'prompts': prompts,
            'reward_function': config.reward_function, 'reward_mean': summary['mean'], 'reward_se': summary['se'],
            'n': summary['n'], 'length_words': statistics.fmean(lengths), 'kl': statistics.fmean(log_ratios),
            'sampled_at': str(datetime.datetime.now())}


def write_json(path: str, data) -> None:
    with open(path, 'w') as f:
        json.dump(data, f, indent=2)


def run_config_keys() -> DictConfig:
    """The keys this run's config may have: the saved config.yaml of the run directory and halos' defaults
    (with --config-path=config, halos' own directory, the model= and loss= chosen on the command line)."""
    runtime = HydraConfig.get().runtime
    run_dir = next(source.path for source in runtime.config_sources if source.provider == 'main' and source.schema == 'file')
    saved = OmegaConf.load(os.path.join(run_dir, 'config.yaml'))
    if 'loss' not in saved:
        return shipped_defaults(runtime.choices.get('model'), runtime.choices.get('loss'))
    return OmegaConf.merge(shipped_defaults(None, saved.loss.get('name')), saved)


@hydra.main(version_base=None, config_path=None, config_name='config')
def main(config: DictConfig) -> None:
    with reported_as_one_line('eval.py'):
        check_overrides(HydraConfig.get().overrides.task, run_config_keys())
        if config.mode not in MODES:
            raise ConfigError(f"mode={config.mode}: eval.py takes mode={', '.join(MODES)}")
        start_process(config.seed, config.retain_freed_memory)
        os.makedirs(config.samples_dir, exist_ok=True)
        if config.mode == 'sample' and config.num_samples_per_prompt:
            records = sample_k(config)
            path = os.path.join(config.samples_dir, f'{config.exp_name}_samples.jsonl')
            write_jsonl(path, records)
            print(f'wrote {len(records)} samples ({config.num_samples_per_prompt} per prompt) to {path}')
        elif config.mode == 'sample':
            samples = sample(config, config.datasets)
            path = os.path.join(config.samples_dir, f'{config.exp_name}.json')
            write_json(path, {'sampled_at': str(datetime.datetime.now()),
                              'config': OmegaConf.to_container(config, resolve=True), 'samples': samples})
            print(f'wrote {len(samples)} samples to {path}')
        elif config.mode == 'eval':
            print(json.dumps(evaluate(config)['results'], indent=2))
        elif config.mode == 'reward':
            samples, result = reward(config)
            with open(os.path.join(config.samples_dir, 'rewards.jsonl'), 'a') as f:
                f.write(json.dumps(result) + '\n')
            write_json(os.path.join(config.samples_dir, f'{config.exp_name}.json'),
                       {'sampled_at': result['sampled_at'], 'config': OmegaConf.to_container(config, resolve=True),
                        'samples': samples})
            print(f"reward {result['reward_mean']:.4f} +- {result['reward_se']:.4f} (n={result['n']}), "
                  f"length {result['length_words']:.1f} words, KL to the starting model {result['kl']:.3f}")
        else:
            samples = sample(config, ['alpacaeval'], include_original_prompt=True)
            path = os.path.join(config.samples_dir, f'alpaca_{config.exp_name}.json')
            write_json(path, [{'instruction': s['original_prompt'], 'output': s['policy'].strip(),
                               'reference': s['chosen'].strip(), 'generator': config.exp_name} for s in samples])
            print(f'wrote {len(samples)} AlpacaEval outputs to {path}')


if __name__ == '__main__':
    main()
