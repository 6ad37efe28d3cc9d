"""Train a policy with any HALOs loss.

    python train.py loss=kto model=llama7b datasets=[shp,hh,oasst] exp_name=llama7b_kto mode=train \
        ++cache_dir=/data/models ++model.load_from=llama7b_sft/LATEST/policy.pt

One process trains on CPU or one GPU; `torchrun --nproc_per_node N train.py ...` (also across nodes)
shards the models with FSDP2, and with use_fsdp=true on a multi-GPU machine halos starts one process
per GPU itself. A mistake in the data, the config or a checkpoint ends the run with one line naming it
(exit status 2; HYDRA_FULL_ERROR=1 shows the traceback).
"""
import contextlib
import dataclasses
import os
import resource
import shutil
import signal
import sys
from typing import List, Sequence

import hydra
import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

import models
import trainers
from halos import checkpoint
from halos.build import build_online_rounds, build_trainer, run_settings, start_wandb
from halos.cli import config_choices, loss_named_otherwise, run_hydra, task_overrides
from halos.datasets import DATASETS
from halos.errors import (ConfigError, exit_at_the_next_interrupt, first_on_its_node, met_alike_by_every_process,
                          reported_as_one_line)
from halos.loop import METRICS
from halos.online_rl import ROLLOUTS
from halos.run_lock import exclusive_run_dir
from halos.settings import Overrides, PeftSettings, RunSettings, as_dict
from utils import barrier, free_port, get_rank, get_world_size, init_distributed_from_env, rank0_print

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config')
WORKER_GRACE_SECONDS = 10  # after one spawned worker fails, for the others to end (they may wait in a collective)


def worker_main(run: RunSettings) -> None:
    """Everything one process does, rank 0 holding the run directory's lock."""
    print(f'process {get_rank()} of {get_world_size()}', flush=True)
    checkpoint.check_run_dir(run.local_run_dir)
    lock = exclusive_run_dir(run.local_run_dir, disposable=('config.yaml',)) if get_rank() == 0 else None
    with lock or contextlib.nullcontext():
        train_run(run)


def train_run(run: RunSettings) -> None:
    """Build, resume, save the config, start wandb, train, evaluate, save."""
    latest = os.path.join(run.local_run_dir, checkpoint.LATEST)
    resume = run.resume and resumable(run, latest)  # checked before anything loads or the config is saved
    loaded = [path for given in (run.model.load_from, run.model.load_lora_from) if given
              for path in models.load_from_candidates(given, run.cache_dir)]
    earlier = [] if run.resume else earlier_run(run.local_run_dir, loaded)
    if earlier:
        shown = ', '.join(sorted({name.split(os.sep)[0] for name in earlier}))
        rank0_print(f"warning: {run.local_run_dir} holds an earlier run ({shown}): this run starts afresh and removes "
                    f"them once its models have loaded (++resume=true continues the earlier run instead)")
    with met_alike_by_every_process():
        trainer = build_trainer(run)
        rounds = build_online_rounds(run, trainer) if run.online.rounds > 0 else None  # before the resume:
    if resume:                                                                          # it decides what is restored
        trainer.load_checkpoint(latest)
        if nothing_left(run, trainer):
            if trainer.finished:
                rank0_print(f"{latest} holds the finished run: nothing is left to train (raise n_epochs, n_examples "
                            f"or online.rounds to train further); the run directory is unchanged")
                return
            done = f' in {trainer.completed_rounds} rounds' if rounds else ''
            rank0_print(f"{latest} has trained {trainer.example_counter} examples{done}, all that the run plans or "
                        f"more: nothing is left to train, so it ends with its final evaluation and save (raise "
                        f"n_epochs, n_examples or online.rounds to train further)")
    start_run_records(run, earlier)
    with stopping_after_a_step_on_sigterm(trainer):
        if rounds is not None:
            rounds.run()
        else:
            trainer.train()
        trainer.evaluate()
        trainer.save_checkpoint(final=True)


def stopping_after_a_step_on_sigterm(trainer):
    """SIGTERM (a scheduler's preemption, `kill`; torchrun passes it to every process) lets the current optimizer
    step end, saves the checkpoint and stops the run, instead of losing what was trained since the last one. A
    process may get it twice (from a scheduler and from torchrun): Ctrl-C, not a second SIGTERM, stops at once."""
    def ask_to_stop(signum, frame):
        trainer.stop_signal = signum
    return sigterm_handled_by(ask_to_stop)


@contextlib.contextmanager
def sigterm_handled_by(handler):
    """SIGTERM goes to `handler` while the body runs; then to whatever handled it before."""
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# what a run writes beside its checkpoints and reads back when it resumes: the metrics (that the rounds' plot and
# the curves read), step-level RL's samples, and in rounds/ each round's samples and feedback and the plot
RUN_RECORDS = (METRICS, ROLLOUTS)
KEPT_IN_ROUNDS = ('judgments.jsonl',)  # the judge's cache: a judgment does not depend on the run that asked it


def earlier_run(run_dir: str, loaded: Sequence[str] = ()) -> List[str]:
    """What an earlier run left in `run_dir` that a fresh run replaces (paths relative to it): its checkpoints
    (LATEST, step-<n>, with the .old or .tmp copy a crash mid-save leaves) and its records; not a checkpoint
    that holds one of the `loaded` paths (the run starts from it: model.load_from)."""
    rounds = os.path.join(run_dir, 'rounds')
    found = [name for name in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
             if name.split('.')[0] == checkpoint.LATEST or name.startswith('step-') or name in RUN_RECORDS]
    found += [os.path.join('rounds', name) for name in (os.listdir(rounds) if os.path.isdir(rounds) else [])
              if name not in KEPT_IN_ROUNDS]
    return sorted(name for name in found if not any(inside(path, os.path.join(run_dir, name)) for path in loaded))


def inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies under it."""
    directory = os.path.abspath(directory)
    return os.path.commonpath([os.path.abspath(path), directory]) == directory


def start_run_records(run: RunSettings, earlier: List[str]) -> None:
    """The run's config.yaml and its wandb run (rank 0), after what an earlier run left is removed: a round on
    disk would be read back as this run's, metrics would mix two runs, and its checkpoint would be resumed with
    this run's config."""
    os.makedirs(run.local_run_dir, exist_ok=True)
    if get_rank() == 0:
        for name in earlier:
            path = os.path.join(run.local_run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    barrier()  # no process looks for a round on disk before it is gone
    if get_rank() != 0:
        return
    OmegaConf.save(OmegaConf.create(as_dict(run)), os.path.join(run.local_run_dir, 'config.yaml'))
    if run.wandb.enabled and not run.debug:
        start_wandb(run, run.exp_name, config=as_dict(run))


def resumable(run: RunSettings, latest: str) -> bool:
    """resume=true: from the complete checkpoint in `latest`, of a run with the same loss and model; online
    rounds stopped before their first checkpoint start again from the start, keeping what is on disk (no round
    is sampled or labelled twice)."""
    check_same_run(run)
    rounds_dir = os.path.join(run.local_run_dir, 'rounds')
    if run.online.rounds > 0 and checkpoint.resolve_checkpoint_dir(latest) is None and os.path.isdir(rounds_dir):
        rank0_print(f'no checkpoint yet in {latest}: starting from the first round, with the rounds in {rounds_dir}')
        return False
    checkpoint.complete_checkpoint_dir(latest)
    return True


# what a resumed run must keep (besides each key of its loss): its loss and model, what its optimizer state is the
# state of (the checkpoint's optimizer and schedule restore their own learning rate and warmup), and what decides
# its data's order, its optimizer steps and its samples (the checkpoint's data position counts batches of that
# order; online rounds take the prompt pool's blocks in turn)
KEPT_ON_RESUME = ('loss.name', 'model.name_or_path', 'model.use_peft',
                  *(f'model.peft.{key.name}' for key in dataclasses.fields(PeftSettings)), 'optimizer', 'lr',
                  'warmup_steps', 'datasets', 'seed', 'model.batch_size', 'model.gradient_accumulation_steps',
                  'frac_unique_desirable', 'frac_unique_undesirable', 'online.prompts', 'online.prompts_per_round',
                  'online.samples_per_prompt')


# what scores and samples the run's online steps: a resume may change it (to fix a broken reward function), and is
# told that the steps before and after its checkpoint differ in it
LABELLING_KEYS = ('online.labeler', 'online.reward_function', 'online.reward_weights', 'online.reward_model',
                  'online.judge')
WARNED_ON_RESUME = (*LABELLING_KEYS, 'temperature', 'top_p', 'top_k', 'max_new_tokens')


def check_same_run(run: RunSettings) -> None:
    """A resumed run keeps what its saved config.yaml says for each of KEPT_ON_RESUME and each key of its loss, and
    is warned of a change to WARNED_ON_RESUME."""
    saved_path = os.path.join(run.local_run_dir, 'config.yaml')
    if not os.path.exists(saved_path):
        return
    saved, now = OmegaConf.load(saved_path), OmegaConf.create(as_dict(run))
    changed = [key for key in WARNED_ON_RESUME if setting(saved, key) != setting(now, key)]
    if changed and (run.online.rounds > 0 or trainers.get_trainer_class(run.loss.trainer).trains_on_prompts):
        shown = ', '.join(f'{key}={shown_value(setting(now, key))} (was {shown_value(setting(saved, key))})'
                          for key in changed)
        relabel = labelled_rounds_note(run) if set(changed) & set(LABELLING_KEYS) else ''
        rank0_print(f"warning: resume=true with {shown}: what the run sampled or scored before this resume was done "
                    f"the old way, and metrics.jsonl holds both{relabel}")
    for key in (*KEPT_ON_RESUME, *(f'loss.{spec.name}' for spec in dataclasses.fields(run.loss.params))):
        shown = 'loss' if key == 'loss.name' else key  # a loss is chosen as loss=<name>
        before, after = setting(saved, key), setting(now, key)
        if before is not None and before != after:
            # a LoRA run's policy.pt holds its adapters alone
            start = checkpoint.start_from_lora_run(run.local_run_dir) if OmegaConf.select(saved, 'model.use_peft') \
                else f'++model.load_from={run.local_run_dir}/{checkpoint.LATEST}/{checkpoint.POLICY}'
            raise ConfigError(f"resume=true: {run.local_run_dir} was trained with {shown}={shown_value(before)}, not "
                              f"{shown_value(after)}; resume with {shown}={shown_value(before)}, or start a new exp_name "
                              f"from it ({start})")


def labelled_rounds_note(run: RunSettings) -> str:
    """The rounds on disk whose feedback the labeller labelled before a resume changed it: one not yet trained
    trains on that feedback as it is, unless its feedback.jsonl is deleted ('' where there are none)."""
    rounds = os.path.join(run.local_run_dir, 'rounds')
    labelled = sorted(int(name) for name in (os.listdir(rounds) if os.path.isdir(rounds) else [])
                      if name.isdigit() and os.path.exists(os.path.join(rounds, name, 'feedback.jsonl')))
    if not labelled:
        return ''
    return (f"; rounds {', '.join(map(str, labelled))} in {rounds} hold feedback labelled the old way, which a round "
            f"not yet trained trains on: delete a round's feedback.jsonl to label its samples again")


def setting(config, key: str):
    """The value at a dotted key of a config, as plain Python (None where absent)."""
    value = OmegaConf.select(config, key)
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def shown_value(value) -> str:
    """A setting as it is typed on the command line: [a,b] for a list, true for True, null for None."""
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return str(value).lower()
    return f"[{','.join(map(shown_value, value))}]" if isinstance(value, list) else str(value)


def nothing_left(run: RunSettings, trainer) -> bool:
    """Whether the resumed trainer has trained every round, or every batch, that the run plans."""
    if run.online.rounds > 0:
        return trainer.completed_rounds >= run.online.rounds
    return trainer.batches_seen >= len(trainer.train_iterator)


def spawned_worker(rank: int, world_size: int, run: RunSettings, port: int) -> None:
    """One process per GPU when halos starts them itself (use_fsdp=true, several GPUs, no torchrun)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='localhost', MASTER_PORT=str(port))
    init_distributed_from_env()
    with reported_as_one_line('train.py'):
        worker_main(run)


def launch(run: RunSettings) -> None:
    """This process (one, or one of torchrun's), or one spawned process per GPU."""
    if init_distributed_from_env():
        if not run.use_fsdp:
            raise ConfigError("several processes need use_fsdp=true (nothing else averages their gradients)")
        worker_main(run)
    elif run.use_fsdp and torch.cuda.device_count() > 1:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        spawn_workers(run, torch.cuda.device_count())
    else:
        worker_main(run)


def spawn_workers(run: RunSettings, world_size: int) -> None:
    """One process per GPU. SIGTERM is passed on to them (each saves and stops); a worker that stopped with its own
    line ends this process with its exit status, and the others get a short grace before they are killed."""
    workers = mp.spawn(spawned_worker, nprocs=world_size, join=False,
                       args=(world_size, run, run.fsdp_port or free_port()))
    pass_on = lambda signum, frame: [os.kill(worker.pid, signum) for worker in workers.processes if worker.is_alive()]
    try:
        with sigterm_handled_by(pass_on):
            while not workers.join(grace_period=WORKER_GRACE_SECONDS):
                pass
    except mp.ProcessExitedException as error:
        if error.exit_code is None or error.exit_code <= 0:
            raise
        sys.exit(error.exit_code)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name='config')
def train(config: DictConfig) -> None:
    with reported_as_one_line('train.py'):
        overrides = task_overrides()
        run = run_settings(config, overrides)
        if run.mode != 'train':  # eval.py's modes
            raise ConfigError(f"mode={run.mode}: train.py trains, with mode=train; eval.py does the others: python "
                              f"eval.py --config-path=<a run directory> ++mode={run.mode}")
        if (warning := loss_named_otherwise(run.loss.name)):
            rank0_print(warning)
        train_with(in_its_own_run_dir(run, overrides))


def in_its_own_run_dir(run: RunSettings, overrides: Sequence[str]) -> RunSettings:
    """The run with its run directory and the path of its policy, which eval.py reads. Another run's config.yaml
    (--config-path=<its directory>) names that run's directory and policy: an exp_name or cache_dir given on the
    command line trains in <cache_dir>/<exp_name> instead, and leaves the earlier run as it is."""
    named, local_run_dir = Overrides(overrides).lines, run.local_run_dir
    own = os.path.join(run.cache_dir, run.exp_name)
    if {'exp_name', 'cache_dir'} & set(named) and 'local_run_dir' not in named and \
            os.path.normpath(local_run_dir) != os.path.normpath(own):
        local_run_dir = own
    return dataclasses.replace(run, local_run_dir=local_run_dir,
                               saved_policy=os.path.join(local_run_dir, checkpoint.LATEST, checkpoint.POLICY))


def train_with(run: RunSettings) -> None:
    try:
        launch(run)
    except KeyboardInterrupt:
        exit_at_the_next_interrupt()
        if first_on_its_node():
            print(f"\n{what_an_interrupt_left(run)}", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def what_an_interrupt_left(run: RunSettings) -> str:
    """What to do after a Ctrl-C: resume from the last checkpoint (or, in online rounds, from the rounds on disk), or
    start again where nothing was saved."""
    latest = os.path.join(run.local_run_dir, checkpoint.LATEST)
    if checkpoint.resolve_checkpoint_dir(latest):
        return f"interrupted: the last checkpoint in {latest} is intact; continue with ++resume=true"
    rounds = os.path.join(run.local_run_dir, 'rounds')
    if run.online.rounds > 0 and os.path.isdir(rounds):
        return (f"interrupted before the first checkpoint: continue with ++resume=true, which keeps the rounds in "
                f"{rounds}")
    return "interrupted before the first checkpoint, so there is nothing to resume: rerun without ++resume=true"


def main() -> None:
    run_hydra('train.py', train, lambda: (
        "usage: python train.py loss=<loss> model=<model> datasets=[<name or file>,...] exp_name=<name> mode=train "
        "[++key=value ...]\n\n"
        f"losses (config/loss): {config_choices('loss')}\n"
        f"models (config/model): {config_choices('model')}\n"
        f"datasets: {', '.join(sorted(DATASETS))} (from the hub; ++data_dir=data reads the shipped samples), or "
        ".json/.jsonl/.parquet files of feedback or prompts\n\n"
        "Every key with its default and rule: docs/training.md; online rounds and online RL: docs/online.md; "
        "++resume=true continues a run."))


if __name__ == '__main__':
    main()
