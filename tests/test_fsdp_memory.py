"""FSDP2 memory at 7B on paper: halos' own wrapping of a Llama-7B-shaped model (on the meta device, so nothing is
allocated) in a simulated world of 8 ranks gives each rank 1/8 of the parameters and of the optimizer state, as
halos.memory_plan's formula says; the formula's activations per token are what transformers' Llama layer keeps; and
docs/gpu.md quotes the plan as it prints."""
import os

import pytest
import torch
import torch.distributed as dist
import transformers
from torch.testing._internal.distributed.fake_pg import FakeStore

from halos.loop import build_optimizer, shard_model
from halos.memory_plan import LLAMA_7B, Architecture, fsdp_memory_per_rank
from helpers import ROOT

WORLD = 8
# 32 layers x (4 x 4096^2 attention + 3 x 4096 x 11008 MLP + 2 x 4096 norms) + 2 x 32000 x 4096 (embeddings and
# LM head, untied) + 4096 (final norm)
LLAMA_7B_PARAMS = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096
LLAMA_7B_CONFIG = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32000,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)


@pytest.fixture
def fake_world():
    """Rank 0 of a simulated process group of WORLD ranks (collectives do nothing), torn down afterwards."""
    dist.init_process_group('fake', store=FakeStore(), rank=0, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        yield init_device_mesh('cpu', (WORLD,))
    finally:
        dist.destroy_process_group()


def local_bytes(tensors) -> int:
    """Bytes this rank holds of DTensors: the size of its local shards."""
    return sum(t.to_local().numel() * t.element_size() for t in tensors)


def padding_bound(model: torch.nn.Module, world: int) -> int:
    """The most bytes FSDP2's padding of each parameter's first dimension to a multiple of `world` can add to one rank."""
    return sum(p[0].numel() * p.element_size() for p in model.parameters())


def test_halos_fsdp2_wrapping_of_llama_7b_gives_each_of_8_ranks_an_eighth(fake_world):
    with torch.device('meta'):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_7B_CONFIG)).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == LLAMA_7B_PARAMS == LLAMA_7B.n_params() == 6_738_415_616  # "6.7B"
    assert Architecture.of(model.config) == LLAMA_7B
    plan = fsdp_memory_per_rank(n_params, WORLD, param_bytes=2, optimizer_states=2)
    # hand-computed: 6,738,415,616 x 2 bytes / 8 ranks
    assert plan.params == plan.grads == 1_684_603_904                   # 1.57 GiB
    assert plan.optimizer == 3_369_207_808                              # AdamW's two bf16 states: 3.14 GiB
    assert fsdp_memory_per_rank(n_params, WORLD, 2, 2, state_bytes=4).optimizer == 6_738_415_616  # float32 states

    shard_model(model, 'LlamaDecoderLayer', fake_world)
    parameters = list(model.parameters())
    assert all(p.to_local().shape[0] == -(-p.shape[0] // WORLD) for p in parameters)  # rows split over 8 ranks
    held = local_bytes(parameters)
    assert plan.params <= held <= plan.params + padding_bound(model, WORLD)
    assert held == plan.params  # no padding at these shapes

    # the gradients FSDP2 reduce-scatters are sharded like their parameters; AdamW's state follows them
    for p in parameters:
        p.grad = torch.zeros_like(p)
    assert local_bytes(p.grad for p in parameters) == plan.grads
    optimizer = build_optimizer('AdamW', parameters, lr=1e-5, sharded=True)  # as halos builds it under FSDP2
    optimizer.step()
    states = [value for state in optimizer.state.values() for key, value in state.items() if key != 'step']
    assert {s.dtype for s in states} == {torch.bfloat16} and len(states) == 2 * len(parameters)
    assert local_bytes(states) == plan.optimizer


@pytest.mark.parametrize('hidden, intermediate, heads', [(256, 688, 4), (512, 688, 8), (256, 1376, 4)])
def test_the_activation_formula_is_what_a_llama_layer_keeps_for_its_backward(hidden, intermediate, heads):
    """Bytes of the tensors a bf16 LlamaDecoderLayer saves for its backward (saved-tensor hooks; each storage counted
    once; the weights and the rotary tables, which every layer shares, left out), per token, against
    Architecture.layer_activation_bytes."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                                      num_key_value_heads=heads, num_hidden_layers=1, vocab_size=64)
    config._attn_implementation = 'sdpa'
    layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16)
    tokens = 128
    hidden_states = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens).unsqueeze(0)
    cos, sin = (table.to(torch.bfloat16) for table in LlamaRotaryEmbedding(config)(hidden_states, positions))
    shared = {p.data_ptr() for p in layer.parameters()} | {cos.data_ptr(), sin.data_ptr()}  # not the layer's own
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in shared:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(hidden_states, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    per_token = sum(saved.values()) / tokens
    expected = Architecture(hidden, intermediate, 1, 64, heads, heads).layer_activation_bytes()
    assert per_token == pytest.approx(expected, rel=0.01)


def test_docs_gpu_md_quotes_what_the_memory_plan_prints(capsys):
    from halos import memory_plan
    memory_plan.main([])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    with open(os.path.join(ROOT, 'docs', 'gpu.md')) as f:
        doc = f.read().splitlines()
    assert printed and all(line in doc for line in printed)
