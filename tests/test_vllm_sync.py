"""The vLLM path of sampling during training, where it can be checked without vLLM or a GPU: the weights it loads
into the engine are the policy's HF state dict (LoRA merged as peft merges it, FSDP2 shards gathered, heads left
out) while the live policy keeps its adapters; and the choice of sampler falls back to halos' loop here."""
import copy
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import models
from halos import lora, vllm_engine
from halos.build import build_trainer
from halos.errors import ConfigError
from halos.loop import shard_model
from halos.sampling import SamplingOptions, halos_sampler
from halos.settings import PeftSettings
from halos.vllm_engine import EngineChoice, PolicySampler, chosen_sampler, weights_for_vllm
from helpers import make_config
from utils import free_port

TINY = 'embedded:tiny-smollm2'


def tiny(dtype='float32', **options):
    return models.load_causal_lm(TINY, dtype, **options)


def with_perturbed_adapters(model, seed=0):
    """The model with LoRA adapters whose B matrices are no longer zero, so that merging them changes the weights."""
    policy = lora.with_lora(model, lora.lora_config(PeftSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0),
                                                    'CAUSAL_LM', ()))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if 'lora_B' in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return policy


def assert_same_state(got, expected):
    """Same keys, and for each the same shape, dtype and values (bit for bit), as plain tensors."""
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert type(got[key]) is torch.Tensor, key  # gathered, not a DTensor
        assert got[key].shape == tensor.shape and got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def test_the_engines_weights_are_the_exported_models_state_dict(tmp_path):
    policy = tiny()
    policy.save_pretrained(tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    weights = weights_for_vllm(policy)
    assert_same_state(weights, exported)
    assert 'lm_head.weight' in weights  # tied embeddings under both names, as the HF state dict has them


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_lora_is_merged_as_peft_merges_it_and_the_live_policy_keeps_its_adapters(dtype):
    policy = with_perturbed_adapters(tiny(dtype))
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    weights = weights_for_vllm(policy)
    assert_same_state(weights, merged)
    assert sorted(weights) == sorted(tiny(dtype).state_dict())  # the base model's keys: no lora_ or base_layer
    assert any(not torch.equal(weights[key], tiny(dtype).state_dict()[key]) for key in weights)  # the merge mattered
    after = policy.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert not any(layer.merged for layer in lora.lora_layers(lora.unwrapped(policy)).values())


def test_a_value_head_stays_out_of_the_engines_weights():
    policy = tiny(value_head=True)
    weights = weights_for_vllm(policy)
    assert not any(key.startswith('v_head.') for key in weights)
    assert sorted(weights) == sorted(tiny().state_dict())


def test_under_fsdp2_the_shards_are_gathered_whole_and_lora_merged():
    """FSDP2 over a one-rank gloo group: the parameters are DTensors; the weights come back as whole plain tensors,
    equal to what peft's merge gives the unsharded model."""
    policy = with_perturbed_adapters(tiny())
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor
        shard_model(policy, 'LlamaDecoderLayer', init_device_mesh('cpu', (1,)))
        assert all(isinstance(p, DTensor) for p in policy.parameters())
        assert_same_state(weights_for_vllm(policy), expected)
    finally:
        dist.destroy_process_group()


def test_auto_falls_back_to_halos_loop_without_vllm_or_cuda(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    installed = lambda name, *args: object() if name == 'vllm' else real_find_spec(name, *args)
    monkeypatch.setattr(vllm_engine.importlib.util, 'find_spec', installed)  # vLLM present, no GPU
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert chosen_sampler(EngineChoice('auto')) == 'halos'
    assert "halos' decoding loop: no CUDA GPU is present" in capsys.readouterr().out
    assert chosen_sampler(EngineChoice('halos')) == 'halos' and capsys.readouterr().out == ''
    with pytest.raises(ConfigError, match='online.sampler=vllm but no CUDA GPU is present'):
        chosen_sampler(EngineChoice('vllm'))
    monkeypatch.setattr(vllm_engine.importlib.util, 'find_spec', real_find_spec)
    if real_find_spec('vllm') is None:
        assert vllm_engine.vllm_unavailable() == 'vllm is not installed'


def test_the_fallback_samples_what_halos_loop_samples(tokenizer):
    model = tiny().eval()
    ids = tokenizer(['\n<|user|>\nName a color.\n<|assistant|>\n'], return_tensors='pt')
    batch = {'prompt_input_ids': ids['input_ids'], 'prompt_attention_mask': ids['attention_mask']}
    options = SamplingOptions(ids['input_ids'].shape[1] + 8, temperature=1.0)
    sampler = PolicySampler(model, tokenizer, options, EngineChoice('auto'), 'float32')
    samples = []
    for sample in (sampler.current(0), halos_sampler(model, tokenizer, options)):
        torch.manual_seed(3)
        samples.append(sample(batch, 2))
    assert sampler.engine is None and samples[0] == samples[1]


def test_a_run_keeps_one_engine_and_reloads_it_only_after_the_policy_changed(tmp_path, monkeypatch):
    """The wiring with a stand-in for the vLLM engine: built once on first use, loaded with the policy's weights
    then, and again only after an optimizer step."""
    class Engine:
        built, loads = 0, []

        def __init__(self, policy, tokenizer, options, dtype, gpu_memory_utilization):
            Engine.built += 1
            assert gpu_memory_utilization == 0.25

        def load(self, policy):
            Engine.loads.append({key: value.clone() for key, value in lora.merged_weights(policy)})

        def sample(self, batch, k):
            return []
    monkeypatch.setattr(vllm_engine, 'vllm_unavailable', lambda: None)
    monkeypatch.setattr(vllm_engine, 'VLLMEngine', Engine)
    trainer = build_trainer(make_config(tmp_path, '++n_examples=4', '++lr=1e-2', '++warmup_steps=0',
                                        '++online.vllm_gpu_memory_utilization=0.25', loss='sft'))
    trainer.sampler()
    trainer.sampler()
    assert Engine.built == 1 and len(Engine.loads) == 1
    trainer.train_step([next(iter(trainer.train_iterator))])
    trainer.sampler()
    assert Engine.built == 1 and len(Engine.loads) == 2
    assert_same_state(Engine.loads[1], trainer.policy.state_dict())
    assert any(not torch.equal(Engine.loads[0][key], Engine.loads[1][key]) for key in Engine.loads[0])


def test_a_run_that_asks_for_vllm_where_it_cannot_run_stops_before_loading(tmp_path):
    if vllm_engine.vllm_unavailable() is None:
        pytest.skip('vLLM runs here')
    with pytest.raises(ConfigError, match='online.sampler=vllm but'):
        make_config(tmp_path, '++online.sampler=vllm', loss='sft')
    assert not os.path.exists(tmp_path / 'test')
