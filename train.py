"""Train a policy with any HALOs loss.

    python train.py loss=kto model=llama7b datasets=[shp,hh,oasst] exp_name=llama7b_kto mode=train \
        ++cache_dir=/data/models ++model.load_from=llama7b_sft/LATEST/policy.pt

One process trains on CPU or one GPU; `torchrun --nproc_per_node N train.py ...` (also across nodes)
shards the models with FSDP2, and with use_fsdp=true on a multi-GPU machine halos starts one process
per GPU itself. A mistake in the data, the config or a checkpoint ends the run with one line naming it
(exit status 2; HYDRA_FULL_ERROR=1 shows the traceback).
"""
import os
import resource
import sys

import hydra
import torch
import torch.multiprocessing as mp
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from halos import checkpoint
from halos.build import build_online_rounds, build_trainer, check_overrides, shipped_defaults, validate_config
from halos.errors import ConfigError, reported_as_one_line
from utils import free_port, get_rank, get_world_size, init_distributed_from_env


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
    latest = os.path.join(config.local_run_dir, checkpoint.LATEST)
    if config.resume:
        checkpoint.complete_checkpoint_dir(latest)  # before anything loads
    trainer = build_trainer(config)
    rounds = build_online_rounds(config, trainer) if config.online.rounds > 0 else None  # before the resume:
    if config.resume:                                                   # it decides what the checkpoint holds
        trainer.load_checkpoint(latest)
    if rounds is not None:
        rounds.run()
    else:
        trainer.train()
    trainer.evaluate()
    trainer.save_checkpoint(final=True)


def spawned_worker(rank: int, world_size: int, config_container: dict, port: int) -> None:
    """One process per GPU when halos starts them itself (use_fsdp=true, several GPUs, no torchrun)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='localhost', MASTER_PORT=str(port))
    init_distributed_from_env()
    with reported_as_one_line('train.py'):
        worker_main(OmegaConf.create(config_container))


def launch(config: DictConfig) -> None:
    """This process (one, or one of torchrun's), or one spawned process per GPU."""
    if init_distributed_from_env():
        if not config.use_fsdp:
            raise ConfigError("several processes need use_fsdp=true (nothing else averages their gradients)")
        worker_main(config)
    elif config.use_fsdp and torch.cuda.device_count() > 1:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        world_size = torch.cuda.device_count()
        mp.spawn(spawned_worker, nprocs=world_size, join=True,
                 args=(world_size, OmegaConf.to_container(config), config.fsdp_port or free_port()))
    else:
        worker_main(config)


@hydra.main(version_base=None, config_path='config', config_name='config')
def main(config: DictConfig) -> None:
    choices = HydraConfig.get().runtime.choices
    try:
        with reported_as_one_line('train.py'):
            check_overrides(HydraConfig.get().overrides.task, shipped_defaults(choices.get('model'), choices.get('loss')))
            validate_config(config)
            launch(config)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint in {config.local_run_dir}/LATEST is intact; "
              f"continue with ++resume=true", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
