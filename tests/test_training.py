"""Training: every loss learns, accumulation and sharding are exact where the loss allows it,
checkpoints resume exactly (and provably resume), load_from initialises both models, the reference
cache is reused and invalidated, and bad runs stop with clear messages."""
import copy
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import models
import train
from halos.build import build_trainer
from halos.checkpoint import load_policy_file, save_policy_file
from helpers import ROOT, checked, make_config, run_train, train_command, train_in_process, whole_and_killed
from halos import packing
from halos.errors import ConfigError, UserError
from halos.packing import sequence_logps, token_level_logps
from halos.settings import as_dict
import utils
from utils import get_batch_logps

LOSSES = ['sft', 'csft', 'dpo', 'cdpo', 'ipo', 'slic', 'simpo', 'orpo', 'kto', 'kto-simple', 'kto-zero', 'ppo', 'grpo',
          'bradley-terry']
TOKEN_LEVEL = ('ppo', 'grpo')  # no per-example rewards: the margin is measured on log-ratios


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_difference(first, second):
    return max((a - b).abs().max().item() for a, b in zip(first.parameters(), second.parameters()))


@pytest.mark.parametrize('loss', LOSSES)
def test_every_loss_trains_end_to_end_and_leaves_the_reference_frozen(tmp_path, loss):
    config = make_config(tmp_path, '++n_examples=8', '++lr=1e-3', '++optimizer=Adam', loss=loss)
    trainer = build_trainer(config)
    reference_before = parameters(trainer.reference_model) if trainer.reference_model is not None else None
    trainer.train()
    assert trainer.batch_counter == 2 and trainer.example_counter == 8
    if reference_before is not None:
        assert all(torch.equal(p, reference_before[n]) for n, p in parameters(trainer.reference_model).items())
    results = trainer.evaluate()
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    assert ('loss_eval/total' if loss == 'ppo' else 'loss/eval') in results


def implied_margin(trainer, batch, loss) -> float:
    """How much more the policy favours the batch's desirable completions over its undesirable ones: the
    trainer's own reward metrics, or for PPO and GRPO (which have none) the log-ratios to the frozen reference."""
    if loss in TOKEN_LEVEL:
        with torch.no_grad():
            policy, = trainer.concatenated_logps(trainer.policy, batch, ('target',))
            reference, = trainer.concatenated_logps(trainer.reference_model, batch, ('target',))
        is_chosen = batch['is_desirable'] if 'is_desirable' in batch else batch['score'] > 0
        ratios = policy - reference
        return (ratios[is_chosen].mean() - ratios[~is_chosen].mean()).item()
    with torch.no_grad():
        _, metrics = trainer.get_batch_metrics(batch, 'train')
    return (metrics['rewards_train/chosen'].mean() - metrics['rewards_train/rejected'].mean()).item()


def batch_loss(trainer, batch) -> float:
    with torch.no_grad():
        loss, _ = trainer.get_batch_metrics(batch, 'train')
    return loss.item()


@pytest.mark.parametrize('loss', LOSSES)
def test_on_a_repeated_batch_every_loss_falls_and_preferences_move_the_right_way(tmp_path, loss):
    """Adam without weight decay, so parameters move only where gradients push them. For preference
    losses the implied reward margin (chosen minus rejected) must rise: a sign error in a loss lowers
    the loss just as well, but moves the margin the wrong way."""
    config = make_config(tmp_path, '++n_examples=8', '++lr=3e-3', '++optimizer=Adam', '++warmup_steps=0', loss=loss)
    trainer = build_trainer(config)
    batch = next(iter(trainer.train_iterator))
    loss_before = batch_loss(trainer, batch)
    margin_before = None if loss in ('sft', 'csft') else implied_margin(trainer, batch, loss)
    for _ in range(8):
        trainer.train_step([batch])
    loss_after = batch_loss(trainer, batch)
    assert loss_after < loss_before - 0.01 * abs(loss_before), (loss_before, loss_after)
    if margin_before is not None:
        margin_after = implied_margin(trainer, batch, loss)
        assert margin_after > margin_before + 1e-3, (margin_before, margin_after)


@pytest.mark.parametrize('loss', ['dpo', 'kto'])
def test_on_a_repeated_batch_accuracy_reaches_one(tmp_path, loss):
    config = make_config(tmp_path, '++n_examples=8', '++lr=3e-3', '++optimizer=Adam', '++warmup_steps=0', loss=loss)
    trainer = build_trainer(config)
    batch = next(iter(trainer.train_iterator))
    accuracy = lambda: trainer.get_batch_metrics(batch, 'train')[1]['rewards_train/accuracies'].mean().item()
    with torch.no_grad():
        before = accuracy()
    for _ in range(8):
        trainer.train_step([batch])
    with torch.no_grad():
        after = accuracy()
    assert after > before and after == 1.0


# Which losses give the same update with gradient accumulation as with one big batch. The others compute
# a statistic over the microbatch, so splitting the batch changes the numbers (as in HALOs):
#   kto         z0 is the mean log-ratio of the microbatch's mismatched KL rows, which are themselves formed
#               within the microbatch (x_i with y_{i+1})
#   kto-simple  each half's reference point is the mean log-ratio of the other half of the microbatch
#   ppo         its token means are taken per microbatch, and the experience is reshuffled into microbatches
#   grpo        its token mean is taken per microbatch (loss_type halos; grpo and dr_grpo likewise, per
#               microbatch); loss_type dapo takes it over the whole optimizer step and is invariant
ACCUMULATION_INVARIANT = {'sft': True, 'csft': True, 'dpo': True, 'cdpo': True, 'ipo': True, 'slic': True,
                          'simpo': True, 'orpo': True, 'bradley-terry': True, 'grpo': False, 'grpo-dapo': True,
                          'kto-zero': True, 'kto': False, 'kto-simple': False, 'ppo': False}


# SGD learning rates for 3 steps: IPO's squared loss has large gradients; KTO's z0 stays clamped at 0 (where
# KTO is KTO-zero, which is invariant) until a larger step makes the mismatched pairs' log-ratios positive.
ACCUMULATION_LR = {'ipo': 1e-3, 'kto': 1.0}


ACCUMULATION_CASES = {loss: (loss, []) for loss in LOSSES}
ACCUMULATION_CASES['grpo-dapo'] = ('grpo', ['++loss.loss_type=dapo'])  # dapo's token mean spans the whole step


@pytest.mark.parametrize('case', list(ACCUMULATION_CASES))
def test_accumulating_microbatches_equals_one_big_batch_where_the_loss_allows_it(tmp_path, case):
    """3 optimizer steps on 4 examples each, as 2 x 2 with gradient_accumulation_steps=2 or as 1 x 4
    (SGD): the same policy to 1e-5 for the accumulation-invariant losses, a different one otherwise."""
    loss, extra = ACCUMULATION_CASES[case]
    common = ['++n_examples=12', '++optimizer=SGD', f'++lr={ACCUMULATION_LR.get(loss, 1e-2)}', '++warmup_steps=0',
              '++model.max_grad_norm=1e9', '++do_first_eval=false', '++eval_every=1000', *extra]
    big = build_trainer(make_config(tmp_path / 'big', *common, '++model.batch_size=4', loss=loss))
    small = build_trainer(make_config(tmp_path / 'small', *common, '++model.batch_size=2',
                                      '++model.gradient_accumulation_steps=2', loss=loss))
    start = parameters(big.policy)
    big.train()
    small.train()
    assert big.batch_counter == small.batch_counter == 3
    moved = max((p - start[n]).abs().max().item() for n, p in big.policy.named_parameters())
    difference = max_difference(big.policy, small.policy)
    assert moved > 1e-4, moved
    if ACCUMULATION_INVARIANT[case]:
        assert difference < 1e-5, difference
    else:
        assert difference > 1e-6, f'{case} became accumulation-invariant: update ACCUMULATION_INVARIANT and docs/faq.md'


def test_non_finite_loss_stops_with_step_and_batch_named(tmp_path):
    config = make_config(tmp_path, '++n_examples=16', '++eval_every=4', '++lr=1e-3', loss='dpo')
    trainer = build_trainer(config)
    real_metrics = trainer.get_batch_metrics
    calls = {'train': 0}

    def poisoned(batch, mode):
        loss, metrics = real_metrics(batch, mode)
        if mode == 'train':
            calls['train'] += 1
            if calls['train'] == 3:
                loss = loss * float('nan')
        return loss, metrics

    trainer.get_batch_metrics = poisoned
    with pytest.raises(FloatingPointError, match=r'optimizer step 2, after microbatch 2 \(8 examples\)') as error:
        trainer.train()
    assert 'LATEST is intact' in str(error.value) and isinstance(error.value, UserError)  # one line, exit status 2
    saved = load_policy_file(os.path.join(config.local_run_dir, 'LATEST', 'policy.pt'))
    assert saved['step_idx'] == 8


def test_a_non_finite_loss_before_any_update_does_not_blame_the_learning_rate(tmp_path):
    trainer = build_trainer(make_config(tmp_path, '++n_examples=4', loss='dpo'))
    trainer.loss = lambda *args, **kwargs: [value * float('nan') for value in type(trainer).loss(trainer, *args, **kwargs)]
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    assert ": before any update, so not from the learning rate: check that example, the starting model and " \
           "DPOTrainer.loss. Nothing was saved: no checkpoint had been written yet." in str(error.value)


# ---------------------------------------------------------------- load_from

def perturbed_tiny_model():
    """The tiny model with every weight moved by noise, so that its weights differ from the base model's."""
    model = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def assert_weights_equal(model, state):
    own = model.state_dict()
    assert set(state) <= set(own)
    for name, tensor in state.items():
        assert torch.equal(own[name], tensor), name


@pytest.mark.parametrize('form', ['policy.pt relative to cache_dir', 'policy.pt absolute', 'HF directory'])
def test_load_from_initialises_the_policy_and_the_reference(tmp_path, tokenizer, form):
    model = perturbed_tiny_model()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    (tmp_path / 'sft' / 'LATEST').mkdir(parents=True)
    save_policy_file(str(tmp_path / 'sft' / 'LATEST' / 'policy.pt'), 8, state, {})
    model.save_pretrained(tmp_path / 'sft_hf')
    tokenizer.save_pretrained(tmp_path / 'sft_hf')
    load_from = {'policy.pt relative to cache_dir': 'sft/LATEST/policy.pt',
                 'policy.pt absolute': str(tmp_path / 'sft' / 'LATEST' / 'policy.pt'),
                 'HF directory': str(tmp_path / 'sft_hf')}[form]
    trainer = build_trainer(make_config(tmp_path, f'++model.load_from={load_from}', loss='dpo'))
    assert_weights_equal(trainer.policy, state)
    assert_weights_equal(trainer.reference_model, state)
    base = models.load_causal_lm('embedded:tiny-smollm2', 'float32').state_dict()
    assert not torch.equal(base['model.embed_tokens.weight'], state['model.embed_tokens.weight'])


def test_an_evaluation_on_training_prompts_warns(tmp_path, capsys):
    pairs = [{'prompt': f'Question {i}?', 'output_A': 'Yes.', 'output_B': 'No.', 'label': 1} for i in range(4)]
    pairs[3]['split'] = 'test'
    feedback = tmp_path / 'pairs.jsonl'
    feedback.write_text(''.join(json.dumps(pair) + '\n' for pair in pairs))
    build_trainer(make_config(tmp_path, loss='dpo', datasets=f'[{feedback}]'))
    assert ("warning: 3 of the 4 held-out prompts are also training prompts, so the evaluation is not held out "
            "there: a feedback file's records without a 'split' field serve both splits: give the held-out ones "
            "\"split\": \"test\"") in capsys.readouterr().out
    build_trainer(make_config(tmp_path, loss='dpo'))  # hh's own test split
    assert 'also training prompts' not in capsys.readouterr().out


def test_load_from_errors_are_clear(tmp_path):
    config = make_config(tmp_path, '++model.load_from=no_such_run/LATEST/policy.pt')
    with pytest.raises(FileNotFoundError, match="model.load_from='no_such_run/LATEST/policy.pt' does not exist"):
        build_trainer(config)
    bad = tmp_path / 'bad.pt'
    torch.save({'step_idx': 0, 'state': {'model.embed_tokens.weight': torch.zeros(3, 3)}, 'metrics': {}}, bad)
    config = make_config(tmp_path, f'++model.load_from={bad}')
    with pytest.raises(ValueError) as error:
        build_trainer(config)
    n_keys = len(models.load_causal_lm('embedded:tiny-smollm2', 'float32').state_dict())
    assert str(error.value).endswith(
        f"does not match the model {models.resolve_model_path('embedded:tiny-smollm2')}: {n_keys - 1} keys missing "
        f"(e.g. model.layers.0.self_attn.q_proj.weight); 1 of another shape (e.g. model.embed_tokens.weight (3, 3) "
        f"in the checkpoint, (49152, 32) in the model) (a checkpoint of another model or size?)")


def test_unknown_trainer_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r'loss.trainer=NoSuchTrainer is not a trainer; valid: .*DPOTrainer'):
        make_config(tmp_path, '++loss.trainer=NoSuchTrainer')


@pytest.mark.slow
def test_train_py_writes_checkpoint_config_tokenizer_and_hf_export(tmp_path):
    train_in_process(tmp_path, '++n_examples=8', '++eval_every=4', '++intermediate_checkpoints=true', loss='sft')
    run_dir = tmp_path / 'test'
    saved = torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)
    assert set(saved) == {'step_idx', 'state', 'metrics'} and saved['step_idx'] == 8
    assert 'loss/eval' in saved['metrics']
    assert (run_dir / 'step-4' / 'policy.pt').exists() and (run_dir / 'config.yaml').exists()
    assert (run_dir / 'tokenizer.json').exists() and (run_dir / 'metrics.jsonl').exists()
    for name in ('policy.pt', 'optimizer.pt', 'scheduler.pt', 'trainer_state.pt'):
        torch.load(run_dir / 'LATEST' / name, weights_only=True)  # every file halos reads back loads without pickle
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(run_dir / 'LATEST' / 'hf')
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, saved['state'][name]), name


# ---------------------------------------------------------------- several processes

def cpu_only_env():
    """Two ranks on a machine with fewer than two GPUs run on the CPU (gloo) instead of sharing one GPU."""
    env = dict(os.environ)
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        env['CUDA_VISIBLE_DEVICES'] = ''
    return env


@pytest.mark.slow
@pytest.mark.parametrize('loss, eval_loss', [('kto', 'loss/eval'), ('ppo', 'loss_eval/total')])
def test_two_processes_match_one_process(tmp_path, loss, eval_loss):
    """torchrun with 2 ranks (gloo, FSDP2) gives the same update as 1 process on the same global batch
    (for PPO: whitening, reshuffling and token means over both ranks; ppo_epochs 2 steps twice)."""
    common = ['++n_examples=8', '++optimizer=SGD', '++lr=1.0', '++warmup_steps=0', '++do_first_eval=false',
              '++loss.ppo_epochs=2' if loss == 'ppo' else '++seed=1']
    two = subprocess.Popen(train_command(tmp_path, *common, loss=loss, exp_name='two', nproc=2), cwd=ROOT,
                           env=cpu_only_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train.worker_main(make_config(tmp_path, *common, 'exp_name=one', loss=loss))  # train.py's worker, in this process
    stdout, stderr = two.communicate(timeout=600)
    two_processes = checked(subprocess.CompletedProcess(two.args, two.returncode, stdout, stderr), two.args)
    for rank in (0, 1):
        assert f'process {rank} of 2' in two_processes.stdout
    one = load_policy_file(tmp_path / 'one' / 'LATEST' / 'policy.pt')
    two = load_policy_file(tmp_path / 'two' / 'LATEST' / 'policy.pt')
    assert one['step_idx'] == two['step_idx'] == 8
    for name, tensor in one['state'].items():
        assert torch.allclose(tensor, two['state'][name], atol=1e-5), name
    assert one['metrics'][eval_loss] == pytest.approx(two['metrics'][eval_loss], abs=1e-5)


# ---------------------------------------------------------------- resume

# Two epochs of hh_helpful (12 pairs: 3 batches of 4 each), a checkpoint after 16 examples (in the second,
# reshuffled epoch), Adam moments and a warm-up that is still running at the checkpoint.
RESUMABLE = ['++n_epochs=2', '++eval_every=16', '++optimizer=AdamW', '++lr=1e-3', '++warmup_steps=10',
             'datasets=[hh_helpful]']


# PPO trains on the desirable and undesirable completions of the pairs: half of each keeps 12 per epoch
RESUMABLE_LOSS = {'dpo': RESUMABLE, 'ppo': RESUMABLE + ['++frac_unique_desirable=0.5', '++frac_unique_undesirable=0.5']}


@pytest.mark.parametrize('loss', ['dpo', 'ppo'])
def test_resume_restores_optimizer_scheduler_rng_and_data_position(tmp_path, loss):
    overrides = RESUMABLE_LOSS[loss]
    whole = build_trainer(make_config(tmp_path / 'whole', *overrides, loss=loss))
    at_checkpoint, trained_on = {}, []
    save_checkpoint, train_step = whole.save_checkpoint, whole.train_step

    def snapshot_first_checkpoint(final=False):
        save_checkpoint(final)
        if not at_checkpoint:
            shutil.copytree(os.path.join(whole.run_dir, 'LATEST'), tmp_path / 'snapshot')
            at_checkpoint.update(lr=whole.scheduler.get_last_lr()[0], rng=torch.get_rng_state(),
                                 python_rng=random.getstate(), numpy_rng=np.random.get_state(),
                                 optimizer=copy.deepcopy(whole.optimizer.state_dict()), trained=len(trained_on))

    def record(microbatches):
        trained_on.append([batch['prompt_text'] for batch in microbatches])
        return train_step(microbatches)

    whole.save_checkpoint, whole.train_step = snapshot_first_checkpoint, record
    whole.train()
    total = whole.example_counter
    assert at_checkpoint['trained'] == 4 and total == 24

    resumed = build_trainer(make_config(tmp_path / 'resumed', *overrides, loss=loss))
    utils.set_seed(12345)  # the RNGs a fresh process would start from
    resumed.load_checkpoint(str(tmp_path / 'snapshot'))
    assert (resumed.example_counter, resumed.batch_counter, resumed.batches_seen) == (16, 4, 4)
    assert torch.equal(torch.get_rng_state(), at_checkpoint['rng']) and random.getstate() == at_checkpoint['python_rng']
    numpy_rng = np.random.get_state()
    assert (numpy_rng[1] == at_checkpoint['numpy_rng'][1]).all() and numpy_rng[2] == at_checkpoint['numpy_rng'][2]
    assert resumed.scheduler.get_last_lr()[0] == pytest.approx(at_checkpoint['lr'])
    assert at_checkpoint['lr'] < 1e-3  # the warm-up is still running
    moments = [state['exp_avg_sq'] for state in resumed.optimizer.state_dict()['state'].values()]
    saved_moments = [state['exp_avg_sq'] for state in at_checkpoint['optimizer']['state'].values()]
    assert len(moments) == len(saved_moments) > 0 and all(m.abs().sum() > 0 for m in moments)
    assert all(torch.equal(a, b) for a, b in zip(moments, saved_moments))
    resumed_on, resumed_step = [], resumed.train_step
    resumed.train_step = lambda microbatches: (resumed_on.append([b['prompt_text'] for b in microbatches]),
                                               resumed_step(microbatches))[1]
    resumed.train()
    assert resumed_on == trained_on[4:]  # only the remaining batches, in the later epoch's reshuffled order
    assert resumed.batch_counter == whole.batch_counter and resumed.example_counter == total
    assert max_difference(whole.policy, resumed.policy) == 0

    # Not vacuous: the same weights and data position without the optimizer and scheduler state end elsewhere.
    fresh = build_trainer(make_config(tmp_path / 'fresh', *overrides, loss=loss))
    fresh.policy.load_state_dict(load_policy_file(tmp_path / 'snapshot' / 'policy.pt')['state'])
    fresh.example_counter, fresh.batches_seen = 16, 4
    fresh.train()
    assert max_difference(whole.policy, fresh.policy) > 1e-4


def test_resuming_a_finished_run_changes_nothing_another_loss_model_or_data_order_is_refused_and_a_rerun_warns(
        tmp_path, capsys):
    train_in_process(tmp_path, '++n_examples=8', '++n_eval_examples=4', loss='sft')
    policy, config = tmp_path / 'test' / 'LATEST' / 'policy.pt', tmp_path / 'test' / 'config.yaml'
    written, configured = policy.stat().st_mtime_ns, config.stat().st_mtime_ns
    out = train_in_process(tmp_path, '++n_examples=8', '++n_eval_examples=4', '++resume=true', loss='sft')
    assert f"{tmp_path}/test/LATEST holds the finished run: nothing is left to train" in out
    assert policy.stat().st_mtime_ns == written and config.stat().st_mtime_ns == configured
    for changed, says in ((['loss=kto'], 'loss=sft, not kto; resume with loss=sft'),
                          (['++model.name_or_path=embedded:smollm2-135m-instruct'],
                           'model.name_or_path=embedded:tiny-smollm2, not embedded:smollm2-135m-instruct'),
                          # the data position counts batches of the saved order: a larger n_examples still resumes
                          (['++n_examples=16', '++model.batch_size=2'], 'model.batch_size=4, not 2; resume with '
                                                                        'model.batch_size=4, or start a new exp_name'),
                          (['datasets=[hh,shp]'], 'datasets=[hh], not [hh,shp]; resume with datasets=[hh]'),
                          (['++seed=7'], 'seed=1, not 7'),
                          (['++model.gradient_accumulation_steps=2'], 'model.gradient_accumulation_steps=1, not 2'),
                          # the optimizer's state and schedule are of the saved optimizer, learning rate and weights
                          (['++optimizer=AdamW'], 'optimizer=RMSprop, not AdamW; resume with optimizer=RMSprop'),
                          (['++lr=0.001'], 'lr=5e-07, not 0.001; resume with lr=5e-07'),
                          (['++warmup_steps=5'], 'warmup_steps=150, not 5; resume with warmup_steps=150'),
                          (['++model.use_peft=true'], 'model.use_peft=false, not true; resume with model.use_peft=false'),
                          (['++model.peft.lora_r=8'], 'model.peft.lora_r=64, not 8'),
                          # online rounds take the prompt pool's blocks in turn, each prompt's group of samples
                          (['++online.prompts_per_round=2'], 'online.prompts_per_round=16, not 2'),
                          (['++online.samples_per_prompt=8'], 'online.samples_per_prompt=4, not 8')):
        with pytest.raises(SystemExit) as exit_:
            train_in_process(tmp_path, '++n_examples=8', '++resume=true', *changed, loss='sft')
        assert exit_.value.code == 2
        assert f"train.py: resume=true: {tmp_path}/test was trained with {says}" in capsys.readouterr().err
    assert policy.stat().st_mtime_ns == written
    # a fresh run whose settings its loader refuses stops before it clears the earlier run
    with pytest.raises(SystemExit):
        train_in_process(tmp_path, '++n_examples=8', '++model.batch_size=3', loss='kto-simple')
    assert "SimpleKTODataLoader needs an even number of examples per process, got batch_size 3 over 1 processes" in \
        capsys.readouterr().err
    assert policy.stat().st_mtime_ns == written and config.stat().st_mtime_ns == configured
    out = train_in_process(tmp_path, '++n_examples=8', '++n_eval_examples=4', loss='sft')  # the same run, afresh
    assert (f"warning: {tmp_path}/test holds an earlier run (LATEST, metrics.jsonl): this run starts afresh and "
            f"removes them once its models have loaded (++resume=true continues the earlier run instead)") in out
    steps = [json.loads(line)['step'] for line in open(tmp_path / 'test' / 'metrics.jsonl')]
    assert steps == sorted(steps)  # this run's metrics alone: the earlier run's do not come first


def test_an_interrupted_run_resumed_with_less_to_train_says_so_and_ends_with_its_final_save(tmp_path):
    train_in_process(tmp_path, '++n_examples=8', '++n_eval_examples=4', loss='sft')
    state_file = tmp_path / 'test' / 'LATEST' / 'trainer_state.pt'
    state = torch.load(state_file, weights_only=False)
    torch.save({**state, 'finished': False}, state_file)  # as if stopped before its final save
    out = train_in_process(tmp_path, '++n_examples=4', '++n_eval_examples=4', '++resume=true', loss='sft')
    assert (f"{tmp_path}/test/LATEST has trained 8 examples, all that the run plans or more: nothing is left to "
            f"train, so it ends with its final evaluation and save") in out
    assert torch.load(state_file, weights_only=False)['finished']


def test_a_loss_starts_from_a_csft_checkpoint_whose_vocabulary_has_its_control_tokens(tmp_path):
    train_in_process(tmp_path, '++n_examples=4', '++n_eval_examples=4', loss='csft', exp_name='csft')
    csft = load_policy_file(tmp_path / 'csft' / 'LATEST' / 'policy.pt')['state']
    trainer = build_trainer(make_config(tmp_path, '++model.load_from=csft/LATEST/policy.pt', loss='dpo'))
    for model in (trainer.policy, trainer.reference_model):
        embedding = model.get_input_embeddings().weight
        assert embedding.shape[0] == len(trainer.tokenizer) + 2  # <|good|> and <|bad|>
        assert torch.equal(embedding.detach(), csft['model.embed_tokens.weight'])


def test_an_hf_directory_of_another_shape_given_as_load_from_is_refused(tmp_path):
    from transformers import LlamaConfig
    wider = tmp_path / 'wider'
    LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3).save_pretrained(wider)
    with pytest.raises(ConfigError) as error:
        build_trainer(make_config(tmp_path, f'++model.load_from={wider}', loss='sft'))
    assert str(error.value) == (f"model.load_from={wider} is not a checkpoint of model.name_or_path=embedded:tiny-"
                                f"smollm2: its hidden_size 64, not 32; num_hidden_layers 3, not 2 (give the model it "
                                f"was trained from)")


def test_a_run_without_evaluation_needs_no_test_split(tmp_path):
    path = tmp_path / 'train_only.jsonl'
    path.write_text(''.join(json.dumps({'prompt': f'Say {word}.', 'output_A': word, 'output_B': 'no', 'label': 1,
                                        'split': 'train'}) + '\n' for word in ('hi', 'yo', 'hey', 'bye')))
    trainer = build_trainer(make_config(tmp_path, f'datasets=[{path}]', '++n_eval_examples=0'))
    assert trainer.eval_batches == [] and len(trainer.train_iterator.items) == 4
    assert trainer.evaluate() == {}


def test_a_resume_keeps_every_key_of_the_loss(tmp_path):
    run = make_config(tmp_path, loss='kto')
    os.makedirs(run.local_run_dir)
    OmegaConf.save(OmegaConf.create(as_dict(run)), os.path.join(run.local_run_dir, 'config.yaml'))
    train.check_same_run(make_config(tmp_path, '++resume=true', loss='kto'))
    with pytest.raises(ConfigError) as error:
        train.check_same_run(make_config(tmp_path, '++resume=true', '++loss.desirable_weight=1.5', loss='kto'))
    assert str(error.value).startswith(f"resume=true: {run.local_run_dir} was trained with loss.desirable_weight=1.0, "
                                       f"not 1.5; resume with loss.desirable_weight=1.0")


def test_a_resume_that_changes_how_an_online_run_scores_or_samples_is_warned_of(tmp_path, capsys):
    reward = os.path.join(ROOT, 'tests', 'rewards.py')
    online = ['++online.prompts=[hh]', f'++online.reward_function={reward}:vowels']
    run = make_config(tmp_path, *online, loss='grpo-online')
    os.makedirs(run.local_run_dir)
    OmegaConf.save(OmegaConf.create(as_dict(run)), os.path.join(run.local_run_dir, 'config.yaml'))
    capsys.readouterr()
    train.check_same_run(make_config(tmp_path, *online, '++resume=true', loss='grpo-online'))
    assert 'warning' not in capsys.readouterr().out
    train.check_same_run(make_config(tmp_path, *online, f'++online.reward_function={reward}:characters',
                                     '++temperature=0.5', '++resume=true', loss='grpo-online'))
    assert capsys.readouterr().out == (
        f"warning: resume=true with online.reward_function={reward}:characters (was {reward}:vowels), temperature=0.5 "
        f"(was null): what the run sampled or scored before this resume was done the old way, and metrics.jsonl holds "
        f"both\n")
    rounds = ['++online.rounds=3', f'++online.reward_function={reward}:vowels']
    run = make_config(tmp_path, *rounds, loss='dpo')
    OmegaConf.save(OmegaConf.create(as_dict(run)), os.path.join(run.local_run_dir, 'config.yaml'))
    for round_index, name in ((0, 'feedback.jsonl'), (1, 'feedback.jsonl'), (2, 'samples.jsonl')):
        os.makedirs(os.path.join(run.local_run_dir, 'rounds', str(round_index)))
        open(os.path.join(run.local_run_dir, 'rounds', str(round_index), name), 'w').close()
    train.check_same_run(make_config(tmp_path, *rounds, '++temperature=0.5', '++resume=true', loss='dpo'))
    assert 'rounds 0, 1' not in capsys.readouterr().out  # sampling changed, not the labels
    train.check_same_run(make_config(tmp_path, *rounds, f'++online.reward_function={reward}:characters',
                                     '++resume=true', loss='dpo'))
    assert capsys.readouterr().out.endswith(
        f"; rounds 0, 1 in {run.local_run_dir}/rounds hold feedback labelled the old way, which a round not yet "
        f"trained trains on: delete a round's feedback.jsonl to label its samples again\n")


def test_a_fresh_run_replaces_an_earlier_runs_checkpoints_and_records_and_keeps_the_rest(tmp_path):
    for name in ('LATEST/policy.pt', 'step-8/policy.pt', 'rounds/0/samples.jsonl', 'rounds/judgments.jsonl',
                 'rounds/reward_per_round.png', 'metrics.jsonl', 'rollouts.jsonl', 'config.yaml', '.lock',
                 'reference_logps_abc.pt', 'wandb/run.txt'):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('earlier')
    (tmp_path / 'LATEST.old').mkdir()  # a crash between a save's two renames leaves the complete copy there
    (tmp_path / 'step-16').mkdir()
    assert train.earlier_run(str(tmp_path)) == ['LATEST', 'LATEST.old', 'metrics.jsonl', 'rollouts.jsonl',
                                                'rounds/0', 'rounds/reward_per_round.png', 'step-16', 'step-8']
    # a checkpoint the fresh run starts from (model.load_from) stays
    assert 'step-8' not in train.earlier_run(str(tmp_path), [str(tmp_path / 'step-8' / 'policy.pt')])
    assert train.earlier_run(str(tmp_path / 'not_there')) == []


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_state(tmp_path):
    """Under torchrun each rank draws its own dropout (LoRA's) and sampling noise: a checkpoint keeps every rank's
    random state, and a rank resumes its own (one of another world size, rank 0's)."""
    from halos import checkpoint
    trainer = build_trainer(make_config(tmp_path, '++n_examples=4', loss='sft'))
    trainer.save_checkpoint()
    saved = torch.load(tmp_path / 'test' / 'LATEST' / 'trainer_state.pt', weights_only=True)
    assert len(saved['rank_rngs']) == 1 and torch.equal(saved['rank_rngs'][0]['torch'], saved['rng']['torch'])
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(checkpoint.get_rng_state())
    trainer.rank, trainer.world_size = 1, 2
    trainer.restore_trainer_state({**trainer.trainer_state(), 'rng': states[0], 'rank_rngs': states})
    assert torch.equal(torch.get_rng_state(), states[1]['torch'])
    trainer.restore_trainer_state({**trainer.trainer_state(), 'rng': states[0], 'rank_rngs': states[:1]})
    assert torch.equal(torch.get_rng_state(), states[0]['torch'])


def test_killed_run_resumes_where_it_stopped_to_the_same_policy(tmp_path):
    """Killed at a random moment (mid-step, mid-eval or mid-save), then resumed: it starts after the last
    checkpoint, does only the remaining steps, and ends with the policy of an uninterrupted run."""
    common = RESUMABLE[:1] + ['++eval_every=8'] + RESUMABLE[2:]
    whole_and_killed(tmp_path, *common, max_delay=1.5)
    killed_at = load_policy_file(tmp_path / 'killed' / 'LATEST' / 'policy.pt')['step_idx']
    assert 0 < killed_at < 24, 'the run finished before it was killed'
    metrics_file = tmp_path / 'killed' / 'metrics.jsonl'

    rerun = run_train(tmp_path, *common, '++resume=true', exp_name='killed')
    assert f'after {killed_at} examples' in rerun.stdout and 'resumed from' in rerun.stdout
    steps = [line['counters/examples'] for line in map(json.loads, metrics_file.read_text().splitlines())
             if 'counters/examples' in line]
    assert steps == list(range(4, 25, 4))  # each once: the lines of the steps after the checkpoint were dropped
    whole = load_policy_file(tmp_path / 'whole' / 'LATEST' / 'policy.pt')
    resumed = load_policy_file(tmp_path / 'killed' / 'LATEST' / 'policy.pt')
    assert resumed['step_idx'] == whole['step_idx'] == 24
    for name, tensor in whole['state'].items():
        assert torch.allclose(tensor, resumed['state'][name], atol=1e-6), name


def test_sigterm_asks_for_a_stop_once_however_often_it_comes_and_the_handler_is_restored():
    import signal
    trainer, before = types.SimpleNamespace(stop_signal=None), signal.getsignal(signal.SIGTERM)
    with train.stopping_after_a_step_on_sigterm(trainer):
        for _ in range(2):  # a scheduler's SIGTERM and torchrun's copy of it
            os.kill(os.getpid(), signal.SIGTERM)
            assert trainer.stop_signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_saves_the_step_stops_and_the_resumed_run_ends_with_the_uninterrupted_policy(tmp_path):
    """SIGTERM mid-training (a scheduler's preemption): the step in progress ends, LATEST is saved at it (no
    evaluation was due), the run stops with one line and status 143, and ++resume=true finishes the run."""
    import signal
    import time
    common = ['++n_epochs=3', '++eval_every=1000', '++optimizer=AdamW', '++lr=1e-3', '++warmup_steps=10',
              'datasets=[hh_helpful]', '++n_eval_examples=4']
    run_train(tmp_path, *common, exp_name='whole')
    stopped = subprocess.Popen(train_command(tmp_path, *common, exp_name='stopped'), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / 'stopped' / 'metrics.jsonl', time.time() + 300
    while not (metrics.exists() and 'counters/examples' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    stopped.send_signal(signal.SIGTERM)
    last = stopped.communicate(timeout=300)[1].strip().splitlines()[-1]
    state = torch.load(tmp_path / 'stopped' / 'LATEST' / 'trainer_state.pt', weights_only=True)
    examples = state['example_counter']
    assert stopped.returncode == 128 + signal.SIGTERM and 0 < examples < 36, (stopped.returncode, examples)
    assert last == (f"train.py: stopped by SIGTERM after {examples} examples, saved in {tmp_path}/stopped/LATEST: "
                    f"continue with ++resume=true")
    run_train(tmp_path, *common, '++resume=true', exp_name='stopped')
    whole, resumed = (load_policy_file(tmp_path / name / 'LATEST' / 'policy.pt') for name in ('whole', 'stopped'))
    assert resumed['step_idx'] == whole['step_idx'] == 36
    for name, tensor in whole['state'].items():
        assert torch.allclose(tensor, resumed['state'][name], atol=1e-6), name


def test_an_evaluation_due_when_a_run_stopped_runs_when_it_resumes(tmp_path, monkeypatch):
    """A stop at a step that reaches eval_every comes before that evaluation (it runs at the next step's start):
    the resumed run runs it first, so its metrics hold every evaluation the uninterrupted run's do."""
    from halos.loop import BasicTrainer
    common = ['++n_examples=16', '++model.batch_size=4', '++eval_every=8', '++do_first_eval=false']
    evaluated = lambda name: [record['step'] for record in map(json.loads, open(tmp_path / name / 'metrics.jsonl'))
                              if 'loss/eval' in record]
    train_in_process(tmp_path, *common, loss='sft', exp_name='whole')
    monkeypatch.setattr(BasicTrainer, 'stop_asked', lambda trainer: trainer.example_counter == 8)
    with pytest.raises(SystemExit):
        train_in_process(tmp_path, *common, loss='sft', exp_name='stopped')
    assert evaluated('stopped') == []
    monkeypatch.undo()
    train_in_process(tmp_path, *common, '++resume=true', loss='sft', exp_name='stopped')
    assert evaluated('stopped') == evaluated('whole') == [8, 16]


SPAWNED = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import train
from helpers import make_config
train.spawn_workers(make_config({cache!r}, *{overrides!r}), 2)
"""


@pytest.mark.slow
def test_sigterm_to_halos_spawned_workers_reaches_both_which_save_together_and_stop_with_status_143(tmp_path):
    """halos' own one-process-per-GPU launch (here two CPU processes over gloo): the parent passes SIGTERM on, both
    ranks save the same step, the parent ends with the workers' status, and two processes resume it to its end."""
    import signal
    import time
    overrides = ['++n_epochs=3', '++eval_every=1000', '++optimizer=AdamW', '++lr=1e-3', 'datasets=[hh_helpful]',
                 'exp_name=spawned', '++n_eval_examples=4']
    spawned = lambda *extra: [sys.executable, '-c', SPAWNED.format(
        root=ROOT, tests=os.path.join(ROOT, 'tests'), cache=str(tmp_path), overrides=overrides + list(extra))]
    parent = subprocess.Popen(spawned(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / 'spawned' / 'metrics.jsonl', time.time() + 300
    while not (metrics.exists() and 'counters/examples' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    parent.send_signal(signal.SIGTERM)
    stderr = parent.communicate(timeout=300)[1]
    examples = torch.load(tmp_path / 'spawned' / 'LATEST' / 'trainer_state.pt', weights_only=True)['example_counter']
    assert parent.returncode == 143 and 0 < examples < 36, (parent.returncode, stderr[-2000:])
    assert stderr.count(f"train.py: stopped by SIGTERM after {examples} examples, saved in {tmp_path}/spawned/"
                        f"LATEST") == 1  # rank 0 says it for both
    assert 'Traceback' not in stderr
    checked(subprocess.run(spawned('++resume=true'), cwd=ROOT, capture_output=True, text=True, timeout=300),
            ['python', 'train.py'])
    assert load_policy_file(tmp_path / 'spawned' / 'LATEST' / 'policy.pt')['step_idx'] == 36


# ---------------------------------------------------------------- the reference cache

def count_forwards(model) -> list:
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize('loss', ['dpo', 'kto'])
def test_cached_reference_logprobs_give_the_same_training(tmp_path, loss):
    common = ['++n_examples=8', '++optimizer=SGD', '++lr=0.1', '++warmup_steps=0', '++do_first_eval=false']
    plain = build_trainer(make_config(tmp_path / 'plain', *common, loss=loss))
    cached = build_trainer(make_config(tmp_path / 'cached', *common, '++cache_reference_logprobs=true', loss=loss))
    plain.train()
    cached.train()
    assert cached.reference_model is None   # freed after the one pass
    files = [f for f in os.listdir(cached.run_dir) if f.startswith('reference_logps_')]
    assert len(files) == 1
    # train + eval sequences: for KTO also the mismatched KL sequences
    assert len(cached.reference.entries) >= 8 * len(cached.prefixes)
    for p_plain, p_cached in zip(plain.policy.parameters(), cached.policy.parameters()):
        assert torch.allclose(p_plain, p_cached, atol=1e-5)
    assert cached.evaluate()['loss/eval'] == pytest.approx(plain.evaluate()['loss/eval'], abs=1e-5)


def test_the_reference_cache_is_reused_and_missed_when_the_reference_changes(tmp_path):
    common = ['++n_examples=8', '++optimizer=SGD', '++lr=0.1', '++warmup_steps=0', '++cache_reference_logprobs=true']
    cache_files = lambda: sorted(f for f in os.listdir(tmp_path / 'test') if f.startswith('reference_logps_'))
    first = build_trainer(make_config(tmp_path, *common))
    first_calls = count_forwards(first.reference_model)
    first.train()
    assert len(first_calls) > 0 and len(cache_files()) == 1

    second = build_trainer(make_config(tmp_path, *common))
    second_calls = count_forwards(second.reference_model)
    second.train()
    assert second_calls == [] and cache_files() == cache_files()
    assert max_difference(first.policy, second.policy) == 0

    third = build_trainer(make_config(tmp_path, *common, '++model.reference_dtype=bfloat16'))
    third_calls = count_forwards(third.reference_model)
    third.train()
    assert len(third_calls) > 0 and len(cache_files()) == 2


def reference_changes(tmp_path, monkeypatch):
    """Ways to change what decides the reference model's numbers, as config overrides."""
    base = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    save_policy_file(str(tmp_path / 'same_weights.pt'), 0, base.state_dict(), {})
    shutil.copytree(models.resolve_model_path('embedded:tiny-smollm2'), tmp_path / 'tiny_copy')
    return {'reference_dtype': ['++model.reference_dtype=bfloat16'],
            'autocast_dtype': ['++model.autocast_dtype=bfloat16'],
            'padding_free': ['++model.padding_free=false'],
            'load_from': [f'++model.load_from={tmp_path / "same_weights.pt"}'],
            'name_or_path': [f'++model.name_or_path={tmp_path / "tiny_copy"}'],
            'attention': lambda: monkeypatch.setattr(models, 'attention_implementation', lambda *args: 'eager')}


@pytest.mark.parametrize('change', ['reference_dtype', 'autocast_dtype', 'padding_free', 'load_from', 'name_or_path',
                                    'attention'])
def test_changing_what_decides_the_reference_numbers_misses_the_cache(tmp_path, monkeypatch, change):
    """Even the same weights from another file, or the same file under another attention kernel: the cache
    is keyed by the reference model's identity, so only the very same reference reuses it."""
    common = ['++n_examples=4', '++cache_reference_logprobs=true']
    first = build_trainer(make_config(tmp_path, *common))
    first.cache_reference_logprobs()
    again = build_trainer(make_config(tmp_path, *common))
    how = reference_changes(tmp_path, monkeypatch)[change]
    overrides = how if isinstance(how, list) else how() or []
    changed = build_trainer(make_config(tmp_path, *common, *overrides))
    assert again.reference_cache == first.reference_cache and changed.reference_cache != first.reference_cache
    calls = count_forwards(changed.reference_model)
    changed.cache_reference_logprobs()
    assert len(calls) > 0 and os.path.exists(changed.reference_cache)


def test_more_data_computes_only_the_sequences_the_cache_lacks(tmp_path):
    first = build_trainer(make_config(tmp_path, '++n_examples=4', '++cache_reference_logprobs=true'))
    first.cache_reference_logprobs()
    more = build_trainer(make_config(tmp_path, '++n_examples=8', '++cache_reference_logprobs=true'))
    calls = count_forwards(more.reference_model)
    more.cache_reference_logprobs()
    assert more.reference_cache == first.reference_cache
    assert len(calls) == 1  # the second training batch; the first and the eval batches were cached
    assert len(more.reference.entries) == len(first.reference.entries) + 2 * 4


# ---------------------------------------------------------------- forwards

@pytest.mark.parametrize('padding_free', [False, True])
def test_completion_only_forward_equals_the_full_logits(tmp_path, padding_free):
    """sequence_logps (LM head at label positions only; packed rows without padding) gives the log-probs
    and gradients of the plain padded forward with full [B, T, V] logits."""
    trainer = build_trainer(make_config(tmp_path, loss='dpo'))
    input_ids, attention_mask, labels = trainer.stack_sequences(trainer.eval_batches[0], ('chosen', 'rejected'))
    assert (attention_mask == 0).any()  # the rows have padding to skip
    assert packing.pack_rows(attention_mask.sum(1), ids=input_ids)['ids'].shape == (1, int(attention_mask.sum()))
    assert_equals_the_full_forward(trainer.policy, lambda *rows: sequence_logps(*rows, padding_free=padding_free),
                                   input_ids, attention_mask, labels)


def assert_equals_the_full_forward(model, forward, input_ids, attention_mask, labels, token_level=False):
    """forward(model, input_ids, attention_mask, labels) gives the log-probs (within 1e-4) and the gradients
    (within 1e-5) of the plain padded forward with full [B, T, V] logits."""
    full = get_batch_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels,
                           token_level=token_level)
    full.sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = forward(model, input_ids, attention_mask, labels)
    fast.sum().backward()
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-6)
    for fast_grad, full_grad in zip((p.grad for p in model.parameters()), full_grads):
        torch.testing.assert_close(fast_grad, full_grad, atol=1e-5, rtol=1e-4)


SHARED_PROMPT_CASES = {  # loss: the kinds that go through one forward, and whether the loss reads token log-probs
    'dpo': (('chosen', 'rejected'), False),   # each pair's two completions after one prompt
    'kto': (('target', 'KL'), False),         # each target and the mismatched KL completion after its prompt
    'grpo': (('target',), True),              # the completions of a group, whole in a microbatch
}


@pytest.mark.parametrize('loss', sorted(SHARED_PROMPT_CASES))
def test_shared_prompts_equal_the_unshared_forward(tmp_path, loss):
    """With model.share_prompts each prompt is computed once for all its completions, and the completions'
    log-probs (summed, and per token for GRPO) and their gradients equal the plain padded forward's."""
    kinds, token_level = SHARED_PROMPT_CASES[loss]
    trainer = build_trainer(make_config(tmp_path, loss=loss))
    assert trainer.share_prompts  # on by default with SDPA
    input_ids, attention_mask, labels = trainer.stack_sequences(trainer.eval_batches[0], kinds)
    shared = packing.share_prompt_rows(input_ids, attention_mask, labels)
    assert shared.input_ids.shape[1] < attention_mask.sum()  # fewer positions than tokens
    forward = token_level_logps if token_level else sequence_logps
    assert_equals_the_full_forward(trainer.policy, lambda *rows: forward(*rows, share_prompts=True),
                                   input_ids, attention_mask, labels, token_level=token_level)


def test_a_reward_models_shared_prompt_scores_equal_the_unshared_forward(tmp_path):
    """A Bradley-Terry pair's prompt runs once; each completion's score (read at its last token that is not
    padding, where the classifier pools) and the gradients equal the classifier's own padded forward."""
    trainer = build_trainer(make_config(tmp_path, loss='bradley-terry'))
    assert trainer.share_prompts
    input_ids, attention_mask, labels = trainer.stack_sequences(trainer.eval_batches[0], ('chosen', 'rejected'))
    assert (attention_mask == 0).any()
    model = trainer.policy
    full = model(input_ids=input_ids, attention_mask=attention_mask).logits
    full.sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared = packing.classifier_logits(model, input_ids, attention_mask, labels, share_prompts=True)
    shared.sum().backward()
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-6)
    for shared_grad, full_grad in zip((p.grad for p in model.parameters()), full_grads):
        torch.testing.assert_close(shared_grad, full_grad, atol=1e-5, rtol=1e-4)


def test_shared_prompt_rows_layout():
    """Rows [5 6 | 7 8], [5 6 | 9] share their prompt; [5 1 | 2] has its own. One row holds the two
    segments end to end, no padding: 5 6 7 8 9 with positions 0 1 2 3 2 (both completions continue from the
    prompt), then 5 1 2; 9 attends to the prompt and itself, not to 7 8; the prompt's last position (6)
    predicts both 7 and 9."""
    input_ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 1, 2, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, 9, -100], [-100, -100, 2, -100]])
    shared = packing.share_prompt_rows(input_ids, attention_mask, labels)
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 1, 2]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2]]
    assert shared.segments.bounds == ((0, 5), (5, 8))
    assert shared.segments.masks[0][0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                                             [1, 1, 0, 0, 0],
                                                             [1, 1, 1, 0, 0],
                                                             [1, 1, 1, 1, 0],
                                                             [1, 1, 0, 0, 1]]
    assert shared.segments.masks[1] is None  # a prompt with one completion: plain causal attention
    assert shared.predictor.tolist() == [1, 2, 1, 5 + 1]       # positions: 6 -> 7, 7 -> 8, 6 -> 9, 1 -> 2
    assert shared.targets.tolist() == [7, 8, 9, 2]
    assert shared.rows.tolist() == [0, 0, 1, 2] and shared.positions.tolist() == [1, 2, 1, 1]
    assert shared.flat_index.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [5, 6, 7, -1]]  # the prompt's one copy


def test_prompts_are_shared_only_where_the_forward_allows_it(tmp_path):
    """Sharing needs packed rows (off under padding_free=false), halos' SDPA (not transformers' own, nor
    flash-attention 2: neither reads the segments' masks) and a plain causal mask (not a sliding window)."""
    assert not build_trainer(make_config(tmp_path, '++model.padding_free=false')).share_prompts
    model = lambda **config: types.SimpleNamespace(config=types.SimpleNamespace(**config))
    assert packing.segment_attention_supported(model(_attn_implementation='halos_sdpa'))
    assert not packing.segment_attention_supported(model(_attn_implementation='sdpa'))
    assert not packing.segment_attention_supported(model(_attn_implementation='flash_attention_2'))
    assert not packing.segment_attention_supported(model(_attn_implementation='halos_sdpa', sliding_window=16))
    assert packing.segment_attention_supported(model(_attn_implementation='halos_sdpa', sliding_window=16,
                                                  use_sliding_window=False))


def test_bf16_autocast_stays_within_bf16_rounding_of_fp32(tmp_path):
    """A token's log-prob is logit_y - logsumexp(logits); rounding the logits to bf16 (8 significant bits)
    moves each by at most 2^-8 |logit|, so each token's log-prob by at most 2 * 2^-8 * max |logit|."""
    plain = build_trainer(make_config(tmp_path / 'fp32', loss='sft'))
    autocast = build_trainer(make_config(tmp_path / 'bf16', '++model.autocast_dtype=bfloat16', loss='sft'))
    batch = plain.eval_batches[0]
    fp32_logps, = plain.concatenated_logps(plain.policy, batch, ('target',))
    bf16_logps, = autocast.concatenated_logps(autocast.policy, batch, ('target',))
    assert bf16_logps.dtype == torch.float32 and not torch.equal(bf16_logps, fp32_logps)
    input_ids, attention_mask, labels = plain.stack_sequences(batch, ('target',))
    with torch.no_grad():
        largest_logit = plain.policy(input_ids=input_ids, attention_mask=attention_mask).logits.abs().max()
    tokens = (labels[:, 1:] != -100).sum(1)
    assert ((bf16_logps - fp32_logps).abs() <= tokens * 2 * 2 ** -8 * largest_logit).all()


def test_attention_runs_in_float32_under_cpu_autocast_except_when_decoding(monkeypatch):
    """halos' SDPA attention under bf16 autocast: a forward over a sequence runs SDPA on float32 inputs with
    autocast off (SDPA's bf16 backward is the slower one on CPU), with or without gradient, so policy and
    reference agree; a decoding step (one query position) leaves SDPA to autocast, which casts to bf16. The
    log-probs stay within bf16 rounding of the plain float32 forward, and the gradient flows."""
    from transformers import DynamicCache
    from halos.sampling import cache_keyword
    model = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    assert model.config._attn_implementation == models.SDPA
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda query, key, value, **kwargs: seen.append((torch.is_autocast_enabled('cpu'),
                                                                         value.dtype)) or sdpa(query, key, value, **kwargs))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    fp32_logits = model(input_ids=ids).logits
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            cache = {cache_keyword(model): DynamicCache(config=model.config)}
            model(input_ids=ids, use_cache=True, **cache)
            seen.clear()
            model(input_ids=torch.tensor([[11]]), use_cache=True, **cache)  # one decoding step
            assert set(seen) == {(True, torch.bfloat16)}      # v_proj's output, left to autocast
            seen.clear()
            reference_logits = model(input_ids=ids).logits
            assert set(seen) == {(False, torch.float32)}
        seen.clear()
        logits = model(input_ids=ids).logits
        assert set(seen) == {(False, torch.float32)}
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=0)  # policy and reference agree
    logps, fp32_logps = (x.float().log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None]) for x in (logits, fp32_logits))
    assert ((logps - fp32_logps).abs() <= 4 * 2 ** -8 * fp32_logits.abs().max()).all()
    logps.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    layer = model.model.layers[0].self_attn   # an additive bf16 mask (as some models build) is cast up too
    query, key, value = (torch.randn(1, heads, 4, 8) for heads in (4, 2, 2))
    additive = torch.zeros(1, 1, 4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float('-inf'))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        output, _ = models.sdpa_float32_under_cpu_autocast(layer, query, key, value.bfloat16(), additive.bfloat16())
    expected, _ = models.sdpa_float32_under_cpu_autocast(layer, query, key, value.bfloat16().float(), additive)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_attention_over_segments_attends_within_each_one_only():
    """Two sequences end to end in one row, given as segments: halos' attention equals each one's own
    causal attention, ignoring the row's attention_mask (all False here, which would give NaN), and a
    segment's own mask applies within it (a key it hides changes nothing)."""
    layer = models.load_causal_lm('embedded:tiny-smollm2', 'float32').model.layers[0].self_attn
    assert layer.num_key_value_groups > 1
    query, key, value = (torch.randn(1, heads, 7, 8) for heads in (4, 2, 2))
    hidden = torch.ones(4, 4, dtype=torch.bool).tril()
    hidden[3, 1] = False                                  # in the second segment, query 3 does not see key 1
    segments = models.Segments(((0, 3), (3, 7)), (None, hidden[None, None]))
    everything_hidden = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    output, _ = models.sdpa_float32_under_cpu_autocast(layer, query, key, value, everything_hidden,
                                                       halos_segments=segments)
    first, _ = models.sdpa_float32_under_cpu_autocast(layer, query[:, :, :3], key[:, :, :3], value[:, :, :3], None)
    changed = value.clone()
    changed[:, :, 3 + 1] += 1                             # what query 3 of the second segment may not see
    second, _ = models.sdpa_float32_under_cpu_autocast(layer, query[:, :, 3:], key[:, :, 3:], value[:, :, 3:],
                                                       hidden[None, None])
    torch.testing.assert_close(output, torch.cat([first, second], dim=1))
    with_changed, _ = models.sdpa_float32_under_cpu_autocast(layer, query, key, changed, None, halos_segments=segments)
    torch.testing.assert_close(with_changed[:, 3 + 3], output[:, 3 + 3])
    assert not torch.allclose(with_changed[:, 3 + 2], output[:, 3 + 2])  # query 2 does see key 1


def test_a_packed_row_builds_no_mask_and_a_model_that_drops_the_segments_is_caught(monkeypatch):
    """halos' attention over a packed row gets no [L, L] mask from transformers (it would ignore it), and a
    model whose layers never hand `halos_segments` on to the attention stops with a clear error instead of
    letting the sequences attend to each other."""
    model = models.load_causal_lm('embedded:tiny-smollm2', 'float32')
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    attention_mask = (input_ids != 0).long()
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    masks_seen, attend = [], models.attend_within_segments
    monkeypatch.setattr(models, 'attend_within_segments', lambda module, query, key, value, attention_mask, *rest,
                        **kwargs: masks_seen.append(attention_mask) or attend(module, query, key, value,
                                                                              attention_mask, *rest, **kwargs))
    sequence_logps(model, input_ids, attention_mask, labels)
    assert masks_seen and all(mask is None for mask in masks_seen)
    monkeypatch.setattr(models, 'attend_within_segments', lambda module, query, key, value, attention_mask, segments,
                        **kwargs: attend(module, query, key, value, attention_mask, None, **kwargs))
    with pytest.raises(ConfigError, match='does not pass the keyword halos_segments on to its attention'):
        sequence_logps(model, input_ids, attention_mask, labels)


def test_a_sliding_window_model_packs_by_its_own_mask():
    """Segments would drop a sliding window, so a model with one packs by transformers' own mask (the window
    kept): its packed log-probs equal the padded forward's."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=3)
    config._attn_implementation = models.SDPA
    model = MistralForCausalLM(config)
    assert not packing.segment_attention_supported(model)
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]])
    attention_mask = (input_ids != 0).long()
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    torch.testing.assert_close(sequence_logps(model, input_ids, attention_mask, labels),
                               sequence_logps(model, input_ids, attention_mask, labels, padding_free=False))


def test_pack_rows_lays_the_sequences_end_to_end_in_one_row():
    """Lengths [2, 5, 3, 1]: one row of 11 tokens and no padding, every sequence in order with positions from
    0 and its own causal attention segment."""
    ids = torch.tensor([[1, 2, 0, 0, 0], [3, 4, 5, 6, 7], [8, 9, 10, 0, 0], [11, 0, 0, 0, 0]])
    packed = packing.pack_rows(torch.tensor([2, 5, 3, 1]), input_ids=ids)
    assert packed['input_ids'].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert packed['position_ids'].tolist() == [[0, 1, 0, 1, 2, 3, 4, 0, 1, 2, 0]]
    assert packed['segments'].bounds == ((0, 2), (2, 7), (7, 10), (10, 11))
    assert packed['segments'].masks == (None,) * 4


def test_grpo_reads_the_old_policy_from_the_policy_forward_until_the_first_update(tmp_path):
    """Right after the reference is synced to the policy (an online round with online.reference=previous) the
    two hold the same weights: GRPO takes the old log-probs from the policy's own forward instead of a second
    one, with the loss and KL of the real reference forward; after the update it runs the reference again."""
    trainer = build_trainer(make_config(tmp_path, '++n_examples=8', '++lr=1e-2', loss='grpo'))
    batch = next(iter(trainer.train_iterator))
    trainer.sync_reference()
    assert trainer.reference_is_policy
    reference, trainer.reference_model = trainer.reference_model, None  # any forward of it would fail
    shortcut_loss, shortcut_metrics = trainer.group_metrics(batch, 'train')
    trainer.reference_model, trainer.reference_is_policy = reference, False
    loss, metrics = trainer.group_metrics(batch, 'train')
    torch.testing.assert_close(shortcut_loss, loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(shortcut_metrics['rewards_train/KL'], metrics['rewards_train/KL'], atol=1e-6, rtol=0)
    trainer.sync_reference()
    trainer.train_step([batch])
    assert not trainer.reference_is_policy and max_difference(trainer.policy, trainer.reference_model) > 0


# ---------------------------------------------------------------- humanline

@pytest.mark.parametrize('loss', ['dpo', 'kto', 'grpo'])
def test_humanline_makes_the_reference_the_previous_policy_and_logs_the_unclamped_fraction(tmp_path, loss):
    config = make_config(tmp_path, '++n_examples=8', '++lr=1e-2', '++optimizer=Adam', '++warmup_steps=0',
                         '++loss.humanline=true', loss=loss)
    trainer = build_trainer(config)
    batches = iter(trainer.train_iterator)
    trainer.train_step([next(batches)])
    before_second_step = parameters(trainer.policy)
    trainer.train_step([next(batches)])
    for name, p in trainer.reference_model.named_parameters():  # synced before the second step's update
        assert torch.equal(p, before_second_step[name]), name
    assert max_difference(trainer.policy, trainer.reference_model) > 0
    unclamped = trainer.train_metrics.means()['rewards_train/unclamped']
    assert 0 < unclamped <= 1


@pytest.mark.parametrize('loss, overrides, message', [
    ('ppo', [], r'^loss.humanline: PPOTrainer takes no humanline, as its Params are not a Humanline \(humanline works '
                r'with dpo, cdpo, ipo, kto, kto-simple, kto-zero, grpo\)$'),
    ('slic', [], 'SLiCTrainer takes no humanline'),
    ('dpo', ['++cache_reference_logprobs=true'], 'cannot be cached: set cache_reference_logprobs=false')])
def test_humanline_refuses_what_cannot_work(tmp_path, loss, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, '++loss.humanline=true', *overrides, loss=loss)


@pytest.mark.parametrize('name, kernel', [('AdamW', 'fused'), ('Adam', 'fused'), ('RMSprop', 'foreach')])
def test_the_optimizer_takes_its_fast_kernel_and_makes_the_same_steps(name, kernel):
    """halos.loop.build_optimizer: the fused (else foreach) kernel in one process, torch's default when sharded;
    three steps equal those of torch's per-tensor loop."""
    from halos.loop import build_optimizer
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    gradients = [[torch.randn_like(p) for p in start] for _ in range(3)]

    def three_steps(make_optimizer):
        parameters = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make_optimizer(parameters)
        for step_gradients in gradients:
            for parameter, gradient in zip(parameters, step_gradients):
                parameter.grad = gradient.clone()
            optimizer.step()
        return optimizer, parameters
    fast, fast_parameters = three_steps(lambda parameters: build_optimizer(name, parameters, 1e-2, sharded=False))
    _, loop_parameters = three_steps(lambda parameters: getattr(torch.optim, name)(parameters, lr=1e-2, foreach=False))
    assert fast.param_groups[0][kernel] is True
    for fast_parameter, loop_parameter, initial in zip(fast_parameters, loop_parameters, start):
        assert not torch.equal(fast_parameter, initial)
        torch.testing.assert_close(fast_parameter, loop_parameter, rtol=1e-6, atol=1e-7)
    sharded = build_optimizer(name, [torch.nn.Parameter(torch.ones(2))], 1e-2, sharded=True).param_groups[0]
    assert not sharded.get('fused') and not sharded.get('foreach')


REFAULT_PROBE = '''
import resource, sys, torch
sys.path.insert(0, {root!r})
import utils
applied = utils.retain_freed_memory() if sys.argv[1] == 'retain' else False
def faults_of_a_fresh_tensor(n_floats):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n_floats)  # written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_tensor(16 * 2 ** 20)  # 64 MiB
print(applied, faults_of_a_fresh_tensor(15 * 2 ** 20))  # 60 MiB: 15360 pages unless the 64 MiB are reused
'''


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_retained_memory_is_reused_without_faulting_fresh_pages():
    """utils.retain_freed_memory: a 60 MiB tensor allocated after a 64 MiB one was freed reuses its pages (glibc
    otherwise unmaps the 64 MiB and maps and zeroes 15360 fresh 4 KiB pages)."""
    script = REFAULT_PROBE.format(root=ROOT)
    outputs = {mode: subprocess.run([sys.executable, '-c', script, mode], capture_output=True, text=True, check=True)
               .stdout.split() for mode in ('retain', 'default')}
    assert outputs['retain'][0] == 'True' and outputs['default'][0] == 'False'
    assert int(outputs['default'][1]) > 15000
    assert int(outputs['retain'][1]) < 500


def test_a_resume_on_data_whose_records_changed_is_refused(tmp_path):
    """A checkpoint's data position counts batches of the items it was trained on: other records would put it
    elsewhere in other data."""
    from halos.errors import ConfigError
    pairs = tmp_path / 'pairs.jsonl'
    records = open(os.path.join(ROOT, 'data', 'upbeat', 'pairs.jsonl')).readlines()
    pairs.write_text(''.join(records))
    trained = build_trainer(make_config(tmp_path, f'datasets=[{pairs}]', '++n_examples=8'))
    state = trained.trainer_state()
    build_trainer(make_config(tmp_path, f'datasets=[{pairs}]', '++n_examples=16')).restore_trainer_state(state)
    pairs.write_text(''.join(records[10:]))
    changed = build_trainer(make_config(tmp_path, f'datasets=[{pairs}]', '++n_examples=16'))
    assert changed.data_digest != trained.data_digest
    with pytest.raises(ConfigError, match=r'^resume=true: the training data is not the data the checkpoint was '):
        changed.restore_trainer_state(state)


@pytest.mark.parametrize('loss', ['kto-simple', 'sft'])
def test_a_loss_that_returns_other_than_one_loss_per_example_stops_the_step(tmp_path, loss):
    """A researcher's loss() that broadcasts, keeps one example or averages would otherwise train on another
    objective and exit 0."""
    trainer = build_trainer(make_config(tmp_path, '++n_examples=4', '++model.batch_size=4', loss=loss))
    batch = next(iter(trainer.train_iterator))
    right = trainer.loss
    for wrong, shape in [(lambda losses: losses[:, None] + losses[None, :], [4, 4]), (lambda losses: losses[:1], [1]),
                         (lambda losses: losses.mean(), [])]:
        if loss == 'sft':
            trainer.loss = lambda *args: wrong(right(*args))
        else:
            trainer.loss = lambda *args: (wrong(right(*args)[0]), *right(*args)[1:])
        with pytest.raises(UserError) as error:  # one line, exit status 2
            trainer.get_batch_metrics(batch, 'train')
        assert str(error.value) == (f"{type(trainer).__name__}.loss returned losses of shape {shape}: it must return "
                                    f"one loss per example of the batch, shape [4]")
    trainer.loss = lambda *args: right(*args).detach() if loss == 'sft' else \
        (right(*args)[0].detach(), *right(*args)[1:])
    with pytest.raises(UserError) as error:
        trainer.get_batch_metrics(batch, 'train')
    assert str(error.value) == (f"{type(trainer).__name__}.loss returned losses without a gradient (detached, or not "
                                f"computed from the policy's log-probs), which would train nothing")
    trainer.loss = right
    loss_value, _ = trainer.get_batch_metrics(batch, 'train')
    assert loss_value.shape == ()


@pytest.mark.parametrize('loss, returns', [('dpo', 'losses, chosen_rewards, rejected_rewards'),
                                           ('kto', 'losses, chosen_rewards, rejected_rewards, KL')])
def test_a_loss_that_returns_other_than_its_tuple_is_named_with_what_it_must_return(tmp_path, loss, returns):
    """Unpacked, a loss() that returns its losses alone would split them along the batch's examples (a batch of
    three) or stop in Python's bare unpacking error."""
    trainer = build_trainer(make_config(tmp_path, '++n_examples=3', '++model.batch_size=3', loss=loss))
    batch = next(iter(trainer.train_iterator))
    right = trainer.loss
    for wrong, what in [(lambda *args: right(*args)[0], 'a Tensor'), (lambda *args: right(*args)[:2], '2 values')]:
        trainer.loss = wrong
        with pytest.raises(UserError) as error:
            trainer.get_batch_metrics(batch, 'train')
        assert str(error.value) == f"{type(trainer).__name__}.loss returned {what}: it must return the tuple ({returns})"


def test_a_note_on_the_settings_is_printed_by_torchruns_rank_0_alone_before_the_processes_join(tmp_path, capsys,
                                                                                                 monkeypatch):
    """Every process reads the settings before the process group forms: rank 0's note speaks for them all."""
    note = ("note: eval_every=7 is not a multiple of batch_size x gradient_accumulation_steps = 4; using 4 so that "
            "checkpoints fall on optimizer steps")
    for rank, printed in [('1', False), ('0', True)]:
        monkeypatch.setenv('RANK', rank)
        make_config(tmp_path, '++eval_every=7', '++model.batch_size=4')
        assert (note in capsys.readouterr().out) == printed


def test_a_warmup_that_outlasts_the_run_is_warned_of_counting_each_steps_optimizer_passes(tmp_path, capsys):
    four_steps = ('++n_examples=8', '++model.batch_size=2', '++n_eval_examples=0')
    build_trainer(make_config(tmp_path, *four_steps, '++warmup_steps=4', '++lr=1e-5', loss='sft'))
    assert ("warning: warmup_steps=4 outlasts the run's 4 optimizer steps, so the learning rate never reaches lr=1e-05 "
            "(at the last step it is 80% of it): lower warmup_steps") in capsys.readouterr().out
    build_trainer(make_config(tmp_path, *four_steps, '++warmup_steps=3', loss='sft'))  # its last step is at lr
    assert 'warmup_steps' not in capsys.readouterr().out
    reward = f'++online.reward_function={ROOT}/tests/rewards.py:vowels'
    build_trainer(make_config(tmp_path, *four_steps, '++warmup_steps=4', '++loss.mu=2', reward, loss='grpo-online'))
    assert 'warmup_steps' not in capsys.readouterr().out  # 4 steps of 2 passes each
