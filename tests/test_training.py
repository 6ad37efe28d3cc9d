"""Training: every loss trains, learning is visible, accumulation and sharding are exact,
checkpoints resume exactly, and bad runs stop with clear messages."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from helpers import ROOT, base_overrides, make_config, run_train
import utils
from utils import get_batch_logps, load_policy_file, sequence_logps

LOSSES = ['sft', 'csft', 'dpo', 'cdpo', 'ipo', 'slic', 'kto', 'kto-simple', 'kto-zero']


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize('loss', LOSSES)
def test_every_loss_trains_a_few_steps(tmp_path, loss):
    config = make_config(tmp_path, '++n_examples=8', '++lr=1e-3', '++optimizer=AdamW', loss=loss)
    trainer = train.build_trainer(config)
    before = parameters(trainer.policy)
    reference_before = parameters(trainer.reference_model) if trainer.reference_model is not None else None
    trainer.train()
    after = parameters(trainer.policy)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before), f'parameters that did not change: {set(before) - set(changed)}'
    assert trainer.batch_counter == 2 and trainer.example_counter == 8
    if reference_before is not None:
        assert all(torch.equal(p, reference_before[n]) for n, p in parameters(trainer.reference_model).items())
    results = trainer.evaluate()
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    assert 'loss/eval' in results


@pytest.mark.parametrize('loss', ['dpo', 'kto'])
def test_on_a_repeated_batch_the_loss_falls_and_accuracy_rises(tmp_path, loss):
    config = make_config(tmp_path, '++n_examples=8', '++lr=3e-3', '++optimizer=AdamW', '++warmup_steps=0',
                         loss=loss)
    trainer = train.build_trainer(config)
    batch = next(iter(trainer.train_iterator))
    with torch.no_grad():
        loss_before, metrics_before = trainer.get_batch_metrics(batch, 'train')
    for _ in range(8):
        loss_value, _ = trainer.get_batch_metrics(batch, 'train')
        loss_value.backward()
        trainer.optimizer_step()
    with torch.no_grad():
        loss_after, metrics_after = trainer.get_batch_metrics(batch, 'train')
    assert loss_after < loss_before - 0.05
    accuracy = lambda m: m['rewards_train/accuracies'].mean().item()
    assert accuracy(metrics_after) > accuracy(metrics_before)
    assert accuracy(metrics_after) == 1.0


@pytest.mark.parametrize('loss', ['sft', 'dpo'])
def test_accumulating_k_microbatches_equals_one_big_batch(tmp_path, loss):
    """4 examples as 2 x 2 with gradient_accumulation_steps=2 give the same update as 1 x 4 (SGD, lr 1)."""
    common = ['++n_examples=4', '++optimizer=SGD', '++lr=1.0', '++warmup_steps=0', '++model.max_grad_norm=1e9',
              '++do_first_eval=false']
    big = train.build_trainer(make_config(tmp_path / 'big', *common, '++model.batch_size=4', loss=loss))
    small = train.build_trainer(make_config(tmp_path / 'small', *common, '++model.batch_size=2',
                                            '++model.gradient_accumulation_steps=2', loss=loss))
    big.train()
    small.train()
    assert big.batch_counter == small.batch_counter == 1
    for (name, p_big), p_small in zip(big.policy.named_parameters(), small.policy.parameters()):
        assert torch.allclose(p_big, p_small, atol=1e-5), name


def test_non_finite_loss_stops_with_step_and_batch_named(tmp_path):
    config = make_config(tmp_path, '++n_examples=16', '++eval_every=4', '++lr=1e-3', loss='dpo')
    trainer = train.build_trainer(config)
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
    assert 'LATEST is intact' in str(error.value)
    saved = load_policy_file(os.path.join(config.local_run_dir, 'LATEST', 'policy.pt'))
    assert saved['step_idx'] == 8


def test_load_from_errors_are_clear(tmp_path):
    config = make_config(tmp_path, '++model.load_from=no_such_run/LATEST/policy.pt')
    with pytest.raises(FileNotFoundError, match="model.load_from='no_such_run/LATEST/policy.pt' does not exist"):
        train.build_trainer(config)
    bad = tmp_path / 'bad.pt'
    torch.save({'step_idx': 0, 'state': {'model.embed_tokens.weight': torch.zeros(3, 3)}, 'metrics': {}}, bad)
    config = make_config(tmp_path, f'++model.load_from={bad}')
    with pytest.raises(ValueError, match='does not match the model'):
        train.build_trainer(config)


def test_unknown_trainer_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r'loss.trainer=NoSuchTrainer is not a trainer; valid: .*DPOTrainer'):
        make_config(tmp_path, '++loss.trainer=NoSuchTrainer')


@pytest.mark.slow
def test_train_py_writes_checkpoint_config_tokenizer_and_hf_export(tmp_path):
    run_train(tmp_path, '++n_examples=8', '++eval_every=4', '++intermediate_checkpoints=true', loss='sft')
    run_dir = tmp_path / 'test'
    saved = torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)
    assert set(saved) == {'step_idx', 'state', 'metrics'} and saved['step_idx'] == 8
    assert 'loss/eval' in saved['metrics']
    assert (run_dir / 'step-4' / 'policy.pt').exists() and (run_dir / 'config.yaml').exists()
    assert (run_dir / 'tokenizer.json').exists() and (run_dir / 'metrics.jsonl').exists()
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(run_dir / 'LATEST' / 'hf')
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, saved['state'][name]), name
    # An SFT checkpoint initialises the next run (policy and reference) through load_from.
    run_train(tmp_path, '++n_examples=4', f'++model.load_from=test/LATEST/policy.pt', loss='dpo', exp_name='dpo')
    assert (tmp_path / 'dpo' / 'LATEST' / 'policy.pt').exists()


@pytest.mark.slow
@pytest.mark.parametrize('loss, eval_loss', [('kto', 'loss/eval'), ('ppo', 'loss_eval/total')])
def test_two_processes_match_one_process(tmp_path, loss, eval_loss):
    """torchrun with 2 ranks (gloo, FSDP2) gives the same update as 1 process on the same global batch
    (for PPO: whitening, reshuffling and token means over both ranks; ppo_epochs 2 steps twice)."""
    common = ['++n_examples=8', '++optimizer=SGD', '++lr=1.0', '++warmup_steps=0', '++do_first_eval=false',
              '++loss.ppo_epochs=2' if loss == 'ppo' else '++seed=1']
    run_train(tmp_path, *common, loss=loss, exp_name='one')
    run_train(tmp_path, *common, loss=loss, exp_name='two', nproc=2)
    one = load_policy_file(tmp_path / 'one' / 'LATEST' / 'policy.pt')
    two = load_policy_file(tmp_path / 'two' / 'LATEST' / 'policy.pt')
    assert one['step_idx'] == two['step_idx'] == 8
    for name, tensor in one['state'].items():
        assert torch.allclose(tensor, two['state'][name], atol=1e-5), name
    assert one['metrics'][eval_loss] == pytest.approx(two['metrics'][eval_loss], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['dpo', 'ppo'])
def test_killed_run_resumes_to_the_same_policy(tmp_path, loss):
    common = ['++n_examples=32', '++eval_every=8', '++optimizer=AdamW', '++lr=1e-3', '++warmup_steps=2']
    run_train(tmp_path, *common, loss=loss, exp_name='whole')

    command = [sys.executable, os.path.join(ROOT, 'train.py')] + base_overrides(tmp_path, loss, 'killed') + common
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / 'killed' / 'LATEST' / 'trainer_state.pt'
    deadline = time.time() + 300
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.5))  # a random moment: mid-step, mid-eval or mid-save
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = load_policy_file(tmp_path / 'killed' / 'LATEST' / 'policy.pt')
    assert saved['step_idx'] < 32, 'the run finished before it was killed'

    run_train(tmp_path, *common, '++resume=true', loss=loss, exp_name='killed')
    whole = load_policy_file(tmp_path / 'whole' / 'LATEST' / 'policy.pt')
    resumed = load_policy_file(tmp_path / 'killed' / 'LATEST' / 'policy.pt')
    assert resumed['step_idx'] == whole['step_idx'] == 32
    for name, tensor in whole['state'].items():
        assert torch.allclose(tensor, resumed['state'][name], atol=1e-6), name


@pytest.mark.parametrize('loss', ['dpo', 'kto'])
def test_cached_reference_logprobs_give_the_same_training(tmp_path, loss):
    common = ['++n_examples=8', '++optimizer=SGD', '++lr=0.1', '++warmup_steps=0', '++do_first_eval=false']
    plain = train.build_trainer(make_config(tmp_path / 'plain', *common, loss=loss))
    cached = train.build_trainer(make_config(tmp_path / 'cached', *common, '++cache_reference_logprobs=true', loss=loss))
    plain.train()
    cached.train()
    assert cached.reference_model is None   # freed after the one pass
    files = [f for f in os.listdir(cached.run_dir) if f.startswith('reference_logps_')]
    assert len(files) == 1
    # train + eval sequences: for KTO also the mismatched KL sequences
    assert len(cached.reference_logps_cache) >= 8 * len(cached.prefixes)
    for p_plain, p_cached in zip(plain.policy.parameters(), cached.policy.parameters()):
        assert torch.allclose(p_plain, p_cached, atol=1e-5)
    assert cached.evaluate()['loss/eval'] == pytest.approx(plain.evaluate()['loss/eval'], abs=1e-5)


@pytest.mark.parametrize('padding_free', [False, True])
def test_completion_only_forward_equals_the_full_logits(tmp_path, padding_free):
    """sequence_logps (LM head at label positions only; packed rows without padding) gives the log-probs
    and gradients of the plain padded forward with full [B, T, V] logits."""
    trainer = train.build_trainer(make_config(tmp_path, loss='dpo'))
    input_ids, attention_mask, labels = trainer.stack_sequences(trainer.eval_batches[0], ('chosen', 'rejected'))
    assert (attention_mask == 0).any()  # the rows have padding to skip
    assert len(utils.pack_rows(attention_mask.sum(1), ids=input_ids)['ids']) < len(input_ids)  # and share packed rows
    model = trainer.policy
    full = get_batch_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    full.sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = sequence_logps(model, input_ids, attention_mask, labels, padding_free=padding_free)
    fast.sum().backward()
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-6)
    for fast_grad, full_grad in zip((p.grad for p in model.parameters()), full_grads):
        torch.testing.assert_close(fast_grad, full_grad, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_stays_close_to_fp32(tmp_path):
    plain = train.build_trainer(make_config(tmp_path / 'fp32', loss='sft'))
    autocast = train.build_trainer(make_config(tmp_path / 'bf16', '++model.autocast_dtype=bfloat16', loss='sft'))
    batch = plain.eval_batches[0]
    fp32_logps, = plain.concatenated_logps(plain.policy, batch, ('target',))
    bf16_logps, = autocast.concatenated_logps(autocast.policy, batch, ('target',))
    assert bf16_logps.dtype == torch.float32 and not torch.equal(bf16_logps, fp32_logps)
    torch.testing.assert_close(bf16_logps, fp32_logps, rtol=0.02, atol=0)


def test_pack_rows_first_fit_by_decreasing_length():
    """Lengths [2, 5, 3, 1] into rows of 5: [5], then 3 + 2, then 1 (3 rows instead of 4); every sequence
    keeps its tokens in order with positions from 0, and a free tail starts its own positions."""
    ids = torch.tensor([[1, 2, 0, 0, 0], [3, 4, 5, 6, 7], [8, 9, 10, 0, 0], [11, 0, 0, 0, 0]])
    packed = utils.pack_rows(torch.tensor([2, 5, 3, 1]), input_ids=ids)
    assert packed['input_ids'].tolist() == [[3, 4, 5, 6, 7], [8, 9, 10, 1, 2], [11, 0, 0, 0, 0]]
    assert packed['position_ids'].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
