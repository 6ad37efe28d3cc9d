"""Sample from or evaluate a trained policy.

    python eval.py --config-path=<cache_dir>/<exp_name> ++mode=sample ++n_samples=512 \
        ++model.eval_batch_size=32 ++samples_dir=samples/

mode=sample      one completion per test prompt -> <samples_dir>/<exp_name>.json
                 {sampled_at, config, samples: [{prompt, chosen, policy}]}; n_samples=null samples every prompt;
                 a CSFT run's prompts end in its desirable control token (loss.chosen_control_token)
mode=eval        the trainer's evaluation metrics on the test split
mode=alpacaeval  AlpacaEval model outputs -> <samples_dir>/alpaca_<exp_name>.json

`--config-path` is the run directory (train.py saved config.yaml there). The policy is
`saved_policy` (a policy.pt or an HF directory, relative to cache_dir or absolute); ++saved_policy=null
samples from the base model. Generation uses vLLM when it is installed and a GPU is present, and
transformers' generate otherwise; the output format is the same.
"""
import datetime
import importlib.util
import json
import os
import tempfile

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import dataloader
import models
import trainers
from utils import disable_dropout, set_seed


def load_policy(config: DictConfig, tokenizer) -> torch.nn.Module:
    """The saved policy as a plain causal LM (a PPO policy's value head is dropped: sampling needs none)."""
    policy = models.load_causal_lm(config.model.name_or_path, config.model.policy_dtype,
                                   use_flash_attention=config.model.use_flash_attention,
                                   load_from=config.saved_policy, cache_dir=config.cache_dir,
                                   vocab_size=len(tokenizer))
    disable_dropout(policy)
    return policy.eval()


def load_run_tokenizer(config: DictConfig):
    """The tokenizer saved in the run directory (with any control tokens), else the model's."""
    run_dir = config.local_run_dir
    source = run_dir if os.path.exists(os.path.join(run_dir, 'tokenizer_config.json')) else \
        (config.model.tokenizer_name_or_path or config.model.name_or_path)
    return models.load_tokenizer(source)


def generate(policy, tokenizer, batch, config: DictConfig) -> list:
    """Completions of the batch's (left-padded) prompts; the prompt is removed by tokens, not characters."""
    prompt_ids = batch['prompt_input_ids']
    options = dict(max_length=config.model.max_length, do_sample=True, top_p=config.top_p,
                   pad_token_id=tokenizer.pad_token_id)
    if config.get('temperature') == 0:
        options.update(do_sample=False, top_p=None, top_k=None, temperature=None)  # greedy decoding
    elif config.get('temperature') is not None:
        options['temperature'] = config.temperature
    with torch.no_grad():
        output = policy.generate(input_ids=prompt_ids, attention_mask=batch['prompt_attention_mask'], **options)
    return tokenizer.batch_decode(output[:, prompt_ids.shape[1]:], skip_special_tokens=True)


def use_vllm() -> bool:
    """vLLM generates when it is installed and a GPU is present."""
    return importlib.util.find_spec('vllm') is not None and torch.cuda.is_available()


def vllm_generator(policy, tokenizer, config: DictConfig):
    """A function batch -> completions like `generate`, backed by vLLM (the policy is exported for it first)."""
    import vllm
    with tempfile.TemporaryDirectory(prefix='halos_vllm_') as export_dir:
        policy.save_pretrained(export_dir)
        tokenizer.save_pretrained(export_dir)
        engine = vllm.LLM(model=export_dir, dtype=config.model.policy_dtype, seed=config.seed)
    temperature = config.temperature if config.get('temperature') is not None else \
        (policy.generation_config.temperature or 1.0)
    top_k = policy.generation_config.top_k or -1  # as generate() samples (vLLM's default is no top-k)

    def generate_batch(batch) -> list:
        prompts = [ids[mask.bool()].tolist() for ids, mask in
                   zip(batch['prompt_input_ids'], batch['prompt_attention_mask'])]
        options = [vllm.SamplingParams(temperature=temperature, top_p=config.top_p, top_k=top_k,
                                       max_tokens=config.model.max_length - len(ids)) for ids in prompts]
        outputs = engine.generate([{'prompt_token_ids': ids} for ids in prompts], options, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]
    return generate_batch


class ControlledSFTDataLoader(dataloader.SFTDataLoader):
    """SFT prompts ending in a control token: how a CSFT model is asked for desirable completions."""

    def __init__(self, *args, control_token: str, **kwargs):
        self.control_token = control_token
        super().__init__(*args, **kwargs)

    def prompt_text(self, example) -> str:
        return super().prompt_text(example) + self.control_token


def desirable_control_token(config: DictConfig) -> str:
    """The token a conditional-SFT run puts after desirable prompts ('' for other losses)."""
    tokens = dataloader.get_dataloader_class(config.loss.dataloader).control_tokens(config.loss)
    return tokens[0] if tokens else ''


def sampling_loader(config: DictConfig, tokenizer, dataset_names) -> dataloader.SFTDataLoader:
    """One item per test prompt, in a seeded order."""
    kwargs = dict(split='test', batch_size=config.model.eval_batch_size, max_length=config.model.max_length,
                  max_prompt_length=config.model.max_prompt_length, max_prompt_count=1, n_epochs=1,
                  n_examples=config.n_samples, human_prefix=config.human_prefix, human_suffix=config.human_suffix,
                  assistant_prefix=config.assistant_prefix, assistant_suffix=config.assistant_suffix,
                  seed=config.seed, data_dir=config.data_dir, use_chat_template=config.get('use_chat_template', False))
    control_token = desirable_control_token(config)
    if control_token:
        return ControlledSFTDataLoader(list(dataset_names), tokenizer, control_token=control_token, **kwargs)
    return dataloader.SFTDataLoader(list(dataset_names), tokenizer, **kwargs)


def sample(config: DictConfig, dataset_names, include_original_prompt: bool = False) -> list:
    tokenizer = load_run_tokenizer(config)
    policy = load_policy(config, tokenizer)
    loader = sampling_loader(config, tokenizer, dataset_names)
    set_seed(config.seed)
    complete = vllm_generator(policy, tokenizer, config) if use_vllm() else \
        (lambda batch: generate(policy, tokenizer, batch, config))
    samples = []
    with tqdm(total=min(len(loader.items), config.n_samples or len(loader.items)), desc='sampling') as progress:
        for batch in loader:
            for i, completion in enumerate(complete(batch)):
                sample_record = {'prompt': batch['prompt_text'][i], 'chosen': batch['target_text'][i],
                                 'policy': completion}
                if include_original_prompt:
                    sample_record['original_prompt'] = batch['original_prompt'][i]
                samples.append(sample_record)
            progress.update(len(batch['prompt_text']))
    return samples[:config.n_samples]


def evaluate(config: DictConfig) -> dict:
    """The run's trainer evaluation (its loss and metrics) on the test split."""
    import train
    trainer_class = trainers.get_trainer_class(config.loss.trainer)
    tokenizer = load_run_tokenizer(config)
    policy, reference_model = train.load_models(config, trainer_class, tokenizer, config.saved_policy)
    policy.eval()
    eval_loader = train.build_loader(config, tokenizer, 'test')
    trainer = trainer_class(tokenizer, config, None, eval_loader, policy, reference_model)
    return {'metadata': OmegaConf.to_container(config), 'results': trainer.evaluate()}


@hydra.main(version_base=None, config_path=None, config_name='config')
def main(config: DictConfig) -> None:
    if config.mode not in ('sample', 'eval', 'alpacaeval'):
        raise ValueError(f"mode={config.mode}: eval.py takes mode=sample, eval or alpacaeval")
    set_seed(config.seed)
    os.makedirs(config.samples_dir, exist_ok=True)
    if config.mode == 'sample':
        samples = sample(config, config.datasets)
        path = os.path.join(config.samples_dir, f'{config.exp_name}.json')
        with open(path, 'w') as f:
            json.dump({'sampled_at': str(datetime.datetime.now()), 'config': OmegaConf.to_container(config, resolve=True),
                       'samples': samples}, f, indent=2)
        print(f'wrote {len(samples)} samples to {path}')
    elif config.mode == 'eval':
        print(json.dumps(evaluate(config)['results'], indent=2))
    else:
        samples = sample(config, ['alpacaeval'], include_original_prompt=True)
        path = os.path.join(config.samples_dir, f'alpaca_{config.exp_name}.json')
        with open(path, 'w') as f:
            json.dump([{'instruction': s['original_prompt'], 'output': s['policy'].strip(),
                        'reference': s['chosen'].strip(), 'generator': config.exp_name} for s in samples], f, indent=2)
        print(f'wrote {len(samples)} AlpacaEval outputs to {path}')


if __name__ == '__main__':
    main()
