"""The CUDA subset of the suite (`pytest -m gpu`; `make gpu-check` runs it and reports each outcome): every trainer's
step in bf16, the packed, shared-prompt and padded forwards under SDPA and flash-attention 2, greedy sampling against
HF generate, LoRA, resume, FSDP2 with one process (and two with two GPUs) and the vLLM engine's weights. Every test
skips, with its reason, where there is no CUDA GPU; on CPU the rest of the suite covers the same code."""
import copy
import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist

import models
from halos import batch as schema
from halos.build import build_trainer
from halos.checkpoint import load_policy_file
from halos.loop import shard_model
from halos.packing import sequence_logps
from halos.sampling import SamplingOptions, decode
from halos.vllm_engine import vllm_unavailable, weights_for_vllm
from helpers import DATA, ROOT, make_config, run_train
from utils import free_port

NO_CUDA = 'needs a CUDA GPU (torch.cuda.is_available() is False)'
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

REWARD = os.path.join(ROOT, 'tests', 'rewards.py')
PROMPTS = os.path.join(DATA, 'upbeat', 'train_prompts.jsonl')
OFFLINE = ['sft', 'csft', 'dpo', 'cdpo', 'ipo', 'slic', 'simpo', 'orpo', 'kto', 'kto-simple', 'kto-zero', 'ppo', 'grpo',
           'bradley-terry']
STEP_LEVEL = ['grpo-online', 'dr-grpo', 'dapo', 'gspo', 'rloo', 'reinforce-pp']
BF16 = ['++model.policy_dtype=bfloat16', '++model.reference_dtype=bfloat16', '++optimizer=AdamW', '++lr=1e-3',
        '++warmup_steps=0', '++do_first_eval=false']
LORA = ['++model.use_peft=true', '++model.peft.lora_r=4', '++model.peft.lora_alpha=8', '++model.peft.lora_dropout=0.0']


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def trainer_config(tmp_path, loss, *overrides):
    """A small run of `loss` on the tiny model; the losses that sample get prompts and a reward function."""
    if loss in STEP_LEVEL:
        return make_config(tmp_path, *overrides, f'++online.prompts={PROMPTS}', '++online.samples_per_prompt=3',
                           f'++online.reward_function={REWARD}:vowels', '++max_new_tokens=8', '++model.batch_size=2',
                           '++n_epochs=null', '++n_examples=4', '++n_eval_examples=2', '++temperature=1.0',
                           '++top_k=0', '++top_p=1.0', loss=loss)
    if loss == 'ppo-online':
        return make_config(tmp_path, *overrides, f'++loss.reward_function={REWARD}:vowels', '++max_new_tokens=8',
                           '++n_epochs=null', '++n_examples=4', loss=loss, datasets=f'[{PROMPTS}]')
    return make_config(tmp_path, *overrides, '++n_examples=4', loss=loss)


@pytest.mark.parametrize('loss', OFFLINE + ['ppo-online'] + STEP_LEVEL)
def test_every_trainer_takes_a_bf16_step_on_cuda(tmp_path, loss):
    trainer = build_trainer(trainer_config(tmp_path, loss, *BF16))
    assert all(p.is_cuda for p in trainer.policy.parameters())
    assert all(p.dtype == torch.bfloat16 for name, p in trainer.policy.named_parameters()
               if not name.startswith('v_head.'))  # PPO's value head computes in float32
    before = snapshot(trainer.policy)
    value = trainer.train_step([next(iter(trainer.train_iterator))])
    assert math.isfinite(value)
    after = snapshot(trainer.policy)
    assert any(not torch.equal(after[name], before[name]) for name in before)
    assert all(torch.isfinite(p).all() for p in after.values())


@pytest.mark.parametrize('attention', ['sdpa', 'flash_attention_2'])
def test_packed_shared_and_padded_forwards_agree_on_cuda(tmp_path, attention):
    """halos' attention in float32 (packed rows, and each prompt shared by its completions) within 1e-4 of the padded
    forward; flash-attention 2 in bf16 (packed through its variable-length kernel) within bf16 rounding."""
    flash = attention == 'flash_attention_2'
    if flash and importlib.util.find_spec('flash_attn') is None:
        pytest.skip('flash-attn is not installed')
    overrides = ['++model.use_flash_attention=true', '++model.policy_dtype=bfloat16',
                 '++model.reference_dtype=bfloat16'] if flash else []
    trainer = build_trainer(make_config(tmp_path, *overrides, '++n_examples=4', loss='dpo'))
    assert models.attention_implementation(flash) == (attention if flash else models.SDPA)
    sequences = schema.Sequences.stacked(trainer.eval_batches[0], trainer.prefixes, trainer.tokenizer.pad_token_id,
                                         trainer.device)
    rows = (sequences.input_ids, sequences.attention_mask, sequences.labels)
    assert (sequences.attention_mask == 0).any()
    with torch.no_grad():
        padded = sequence_logps(trainer.policy, *rows, padding_free=False)
        packed = sequence_logps(trainer.policy, *rows, padding_free=True)
        shared = None if flash else sequence_logps(trainer.policy, *rows, padding_free=True, share_prompts=True)
    tolerance = dict(rtol=2e-2, atol=0.5) if flash else dict(rtol=0, atol=1e-4)
    torch.testing.assert_close(packed, padded, **tolerance)
    if shared is not None:
        torch.testing.assert_close(shared, padded, **tolerance)


def test_greedy_sampling_equals_hf_generate_on_cuda():
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    tokenizer.padding_side = 'left'
    model = models.load_causal_lm('embedded:tiny-smollm2', 'float32').cuda().eval()
    prompts = tokenizer(['\n<|user|>\nHello there, how are you today?\n<|assistant|>\n',
                         '\n<|user|>\nName a color.\n<|assistant|>\n'], return_tensors='pt', padding=True).to('cuda')
    options = SamplingOptions(prompts['input_ids'].shape[1] + 40, temperature=0, max_new_tokens=20)
    hf = model.generate(**prompts, do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
    ours = decode(model, prompts['input_ids'], prompts['attention_mask'], 1, options, tokenizer.eos_token_id,
                  tokenizer.pad_token_id).tokens
    assert torch.equal(ours, hf[:, prompts['input_ids'].shape[1]:][:, :ours.shape[1]])


def test_a_lora_step_on_cuda_trains_the_adapters_only(tmp_path):
    trainer = build_trainer(make_config(tmp_path, *LORA, '++model.autocast_dtype=bfloat16', '++optimizer=AdamW',
                                        '++lr=1e-2', '++warmup_steps=0', '++n_examples=4', loss='dpo'))
    before = snapshot(trainer.policy)
    assert math.isfinite(trainer.train_step([next(iter(trainer.train_iterator))]))
    changed = [name for name, p in snapshot(trainer.policy).items() if not torch.equal(p, before[name])]
    assert changed and all('lora_' in name for name in changed)


def test_resume_on_cuda_ends_with_the_uninterrupted_weights(tmp_path):
    overrides = ['++n_epochs=2', '++eval_every=16', '++optimizer=AdamW', '++lr=1e-3', '++warmup_steps=10',
                 'datasets=[hh_helpful]']
    whole = build_trainer(make_config(tmp_path / 'whole', *overrides, loss='dpo'))
    save_checkpoint, snapshot_dir = whole.save_checkpoint, tmp_path / 'snapshot'

    def keep_first(final=False):
        save_checkpoint(final)
        if not snapshot_dir.exists():
            import shutil
            shutil.copytree(os.path.join(whole.run_dir, 'LATEST'), snapshot_dir)
    whole.save_checkpoint = keep_first
    whole.train()
    resumed = build_trainer(make_config(tmp_path / 'resumed', *overrides, loss='dpo'))
    resumed.load_checkpoint(str(snapshot_dir))
    assert resumed.example_counter == 16
    resumed.train()
    assert resumed.example_counter == whole.example_counter
    for name, parameter in whole.policy.named_parameters():
        torch.testing.assert_close(resumed.policy.get_parameter(name), parameter, rtol=0, atol=1e-6)


def test_fsdp2_with_one_process_takes_the_unsharded_step_on_cuda(tmp_path):
    """halos' FSDP2 wrapping over an NCCL group of one: the same loss, the same SGD step as the model unsharded,
    and the weights the vLLM engine would load are the unsharded model's."""
    trainer = build_trainer(make_config(tmp_path, '++n_examples=4', loss='sft'))
    batch = next(iter(trainer.train_iterator))
    plain, sharded = copy.deepcopy(trainer.policy), copy.deepcopy(trainer.policy)
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        shard_model(sharded, 'LlamaDecoderLayer', init_device_mesh('cuda', (1,)))
        losses = []
        for model in (plain, sharded):
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
            loss = -trainer.concatenated_logps(model, batch, trainer.prefixes)[0].sum()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        expected = plain.state_dict()
        for name, tensor in weights_for_vllm(sharded).items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA GPUs')
def test_two_gpus_under_fsdp2_match_one(tmp_path):
    """train.py starts one process per GPU itself (FSDP2 over NCCL): the same update as one GPU on the global batch."""
    common = ['++n_examples=8', '++optimizer=SGD', '++lr=1.0', '++warmup_steps=0', '++do_first_eval=false']
    two = run_train(tmp_path, *common, loss='kto', exp_name='two')
    assert 'process 1 of 2' in two.stdout
    run_train(tmp_path, *common, loss='kto', exp_name='one', env=dict(os.environ, CUDA_VISIBLE_DEVICES='0'))
    one, two = (load_policy_file(tmp_path / name / 'LATEST' / 'policy.pt') for name in ('one', 'two'))
    for name, tensor in one['state'].items():
        assert torch.allclose(tensor, two['state'][name], atol=1e-5), name


@pytest.mark.skipif(vllm_unavailable() is not None, reason=f'vLLM cannot run here: {vllm_unavailable()}')
def test_the_vllm_engine_samples_with_the_policys_weights(tokenizer):
    """The engine starts with placeholder weights; after `load` the log-probs it records for its samples are the
    policy's own (a forward of prompt + completion), so the weights it holds are the policy's."""
    from halos.rl import rollout_sequences
    from halos.vllm_engine import VLLMEngine
    policy = models.load_causal_lm('embedded:tiny-smollm2', 'bfloat16').cuda().eval()
    prompts = tokenizer(['\n<|user|>\nName a color.\n<|assistant|>\n'], return_tensors='pt')
    batch = {'prompt_input_ids': prompts['input_ids'], 'prompt_attention_mask': prompts['attention_mask']}
    engine = VLLMEngine(policy, tokenizer, SamplingOptions(64, temperature=1.0, top_p=1.0, top_k=0), 'bfloat16', 0.2)
    engine.load(policy)
    torch.manual_seed(0)
    samples = engine.sample(batch, 2)[0]
    rows = rollout_sequences(prompts['input_ids'].repeat(2, 1), prompts['attention_mask'].repeat(2, 1),
                             [s.token_ids for s in samples], tokenizer.pad_token_id)
    with torch.no_grad():
        forward = sequence_logps(policy, rows.input_ids.cuda(), rows.attention_mask.cuda(), rows.labels.cuda())
    torch.testing.assert_close(torch.tensor([s.logp for s in samples]), forward.cpu(), rtol=2e-2, atol=0.5)
