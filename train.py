"""Train a policy with any HALOs loss.

    python train.py loss=kto model=llama7b datasets=[shp,hh,oasst] exp_name=llama7b_kto mode=train \
        ++cache_dir=/data/models ++model.load_from=llama7b_sft/LATEST/policy.pt

One process trains on CPU or one GPU; `torchrun --nproc_per_node N train.py ...` (also across nodes)
shards the models with FSDP2, and with use_fsdp=true on a multi-GPU machine halos starts one process
per GPU itself.
"""
import os
import resource
import sys
from typing import Optional

import hydra
import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

import dataloader
import models
import trainers
from utils import (disable_dropout, free_port, get_rank, get_world_size, init_distributed_from_env, rank0_print,
                   set_seed)


def validate_config(config: DictConfig) -> None:
    """Resolve the config, fail early on missing or inconsistent keys, and fill in derived ones."""
    OmegaConf.resolve(config)
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ValueError(f"missing required config keys: {', '.join(missing)} (e.g. exp_name=my_run)")
    trainer_class = trainers.get_trainer_class(config.loss.trainer)
    dataloader.get_dataloader_class(config.loss.dataloader)
    if 'use_reference_model' in config.loss and config.loss.use_reference_model != trainer_class.use_reference_model:
        raise ValueError(f"loss.use_reference_model={config.loss.use_reference_model} but {config.loss.trainer} "
                         f"{'needs' if trainer_class.use_reference_model else 'does not use'} a reference model")
    if config.n_epochs is None and config.n_examples is None:
        raise ValueError("set n_epochs or n_examples (both are null)")
    step_examples = config.model.batch_size * config.model.gradient_accumulation_steps
    if config.eval_every % step_examples:
        rounded = max(step_examples, config.eval_every - config.eval_every % step_examples)
        rank0_print(f"eval_every={config.eval_every} is not a multiple of batch_size x gradient_accumulation_steps "
                    f"= {step_examples}; using {rounded} so that checkpoints fall on optimizer steps")
        config.eval_every = rounded
    if config.saved_policy is None:
        config.saved_policy = os.path.join(config.local_run_dir, 'LATEST', 'policy.pt')


def build_loader(config: DictConfig, tokenizer, split: str):
    loader_class = dataloader.get_dataloader_class(config.loss.dataloader)
    kwargs = dict(split=split, max_length=config.model.max_length, max_prompt_length=config.model.max_prompt_length,
                  human_prefix=config.human_prefix, human_suffix=config.human_suffix,
                  assistant_prefix=config.assistant_prefix, assistant_suffix=config.assistant_suffix,
                  seed=config.seed, data_dir=config.data_dir, use_chat_template=config.use_chat_template,
                  frac_unique_desirable=config.frac_unique_desirable,
                  frac_unique_undesirable=config.frac_unique_undesirable,
                  rank=get_rank(), world_size=get_world_size())
    if loader_class.control_tokens(config.loss):
        kwargs['chosen_control_token'], kwargs['rejected_control_token'] = loader_class.control_tokens(config.loss)
    if split == 'train':
        kwargs.update(batch_size=config.model.batch_size, n_epochs=config.n_epochs, n_examples=config.n_examples)
    else:
        kwargs.update(batch_size=config.model.eval_batch_size, n_epochs=1, n_examples=config.n_eval_examples)
    return loader_class(list(config.datasets), tokenizer, **kwargs)


def load_models(config: DictConfig, trainer_class, tokenizer, policy_load_from: Optional[str]):
    """The policy from `policy_load_from` (train.py: model.load_from; eval.py: the trained policy) and, when
    the loss uses one, the reference model from model.load_from; the base model where they are null."""
    model_config = config.model
    common = dict(use_flash_attention=model_config.use_flash_attention, load_from=model_config.load_from,
                  cache_dir=config.cache_dir, vocab_size=len(tokenizer))
    policy = trainer_class.load_policy(model_config.name_or_path, model_config.policy_dtype,
                                       **{**common, 'load_from': policy_load_from})
    disable_dropout(policy)
    reference_model = None
    if trainer_class.use_reference_model:
        reference_model = models.load_causal_lm(model_config.name_or_path, model_config.reference_dtype, **common)
        disable_dropout(reference_model)
    return policy, reference_model


def build_trainer(config: DictConfig):
    """Data, models and the trainer of one process, from a validated config."""
    rank, world_size = get_rank(), get_world_size()
    set_seed(config.seed)
    trainer_class = trainers.get_trainer_class(config.loss.trainer)
    loader_class = dataloader.get_dataloader_class(config.loss.dataloader)
    tokenizer = models.load_tokenizer(config.model.tokenizer_name_or_path or config.model.name_or_path,
                                      loader_class.control_tokens(config.loss))
    policy, reference_model = load_models(config, trainer_class, tokenizer, config.model.load_from)
    train_loader = build_loader(config, tokenizer, 'train')
    eval_loader = build_loader(config, tokenizer, 'test')
    return trainer_class(tokenizer, config, train_loader, eval_loader, policy, reference_model,
                         rank=rank, world_size=world_size)


def worker_main(config: DictConfig) -> None:
    """Everything one process does: save the config, start wandb, train, evaluate, save."""
    print(f'process {get_rank()} of {get_world_size()}', flush=True)
    os.makedirs(config.local_run_dir, exist_ok=True)
    if get_rank() == 0:
        OmegaConf.save(config, os.path.join(config.local_run_dir, 'config.yaml'))
        if config.wandb.enabled and not config.debug:
            import wandb
            os.environ.setdefault('WANDB_MODE', config.wandb.mode)
            wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name,
                       config=OmegaConf.to_container(config), dir=config.local_run_dir)
    trainer = build_trainer(config)
    if config.resume:
        trainer.load_checkpoint(os.path.join(config.local_run_dir, 'LATEST'))
    trainer.train()
    trainer.evaluate()
    trainer.save_checkpoint(final=True)


def spawned_worker(rank: int, world_size: int, config_container: dict, port: int) -> None:
    """One process per GPU when halos starts them itself (use_fsdp=true, several GPUs, no torchrun)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='localhost', MASTER_PORT=str(port))
    init_distributed_from_env()
    worker_main(OmegaConf.create(config_container))


@hydra.main(version_base=None, config_path='config', config_name='config')
def main(config: DictConfig) -> None:
    validate_config(config)
    try:
        if init_distributed_from_env():
            if not config.use_fsdp:
                raise ValueError("several processes need use_fsdp=true (nothing else averages their gradients)")
            worker_main(config)
        elif config.use_fsdp and torch.cuda.device_count() > 1:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            world_size = torch.cuda.device_count()
            mp.spawn(spawned_worker, nprocs=world_size, join=True,
                     args=(world_size, OmegaConf.to_container(config), config.fsdp_port or free_port()))
        else:
            worker_main(config)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint in {config.local_run_dir}/LATEST is intact; "
              f"continue with ++resume=true", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
