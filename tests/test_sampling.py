"""halos' sampler: greedy decoding gives HF generate's tokens, the k samples of a prompt share one prefill,
and sampled tokens follow the distribution transformers' warpers define."""
import pytest
import torch

import models
from transformers import DynamicCache

from halos.sampling import (PreallocatedLayer, SamplingOptions, cache_keyword, decode, decoding_cache, halos_sampler,
                            next_tokens, nucleus_sample)

PROMPTS = ['\n<|user|>\nHello there, how are you today?\n<|assistant|>\n', '\n<|user|>\nName a color.\n<|assistant|>\n']


@pytest.fixture(scope='module')
def tiny():
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    tokenizer.padding_side = 'left'
    return models.load_causal_lm('embedded:tiny-smollm2', 'float32').eval(), tokenizer


def test_greedy_decoding_equals_hf_generate_on_a_left_padded_batch(tiny):
    model, tokenizer = tiny
    prompts = tokenizer(PROMPTS, return_tensors='pt', padding=True)
    assert (prompts['attention_mask'] == 0).any()
    options = SamplingOptions(prompts['input_ids'].shape[1] + 40, temperature=0, max_new_tokens=20)
    hf = model.generate(**prompts, do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
    ours = decode(model, prompts['input_ids'], prompts['attention_mask'], 1, options, tokenizer.eos_token_id,
                  tokenizer.pad_token_id).tokens
    assert torch.equal(ours, hf[:, prompts['input_ids'].shape[1]:][:, :ours.shape[1]])
    three = decode(model, prompts['input_ids'], prompts['attention_mask'], 3, options, tokenizer.eos_token_id,
                   tokenizer.pad_token_id).tokens
    assert torch.equal(three, ours.repeat_interleave(3, 0))  # k greedy samples of a prompt are its greedy sample


def test_each_prompt_has_its_own_length_budget_so_a_sample_does_not_depend_on_its_batch(tiny):
    """max_length bounds prompt + completion row by row (as vLLM does, where HF generate's max_length bounds the
    padded width): the short prompt of a batch decodes what it decodes alone. The tiny model's pad token is its
    EOS, so a sample cut by its budget is told from one that ended by its length, not by a pad after it."""
    model, tokenizer = tiny
    batch = tokenizer(PROMPTS, return_tensors='pt', padding=True)
    short = int(batch['attention_mask'][1].sum())
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and short < batch['input_ids'].shape[1]
    options = SamplingOptions(batch['input_ids'].shape[1] + 6, temperature=0)
    together = halos_sampler(model, tokenizer, options)({'prompt_input_ids': batch['input_ids'],
                                                         'prompt_attention_mask': batch['attention_mask']}, 2)
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors='pt')
        alone, = halos_sampler(model, tokenizer, options)({'prompt_input_ids': ids['input_ids'],
                                                           'prompt_attention_mask': ids['attention_mask']}, 1)
        assert [s.token_ids for s in together[i]] == [alone[0].token_ids] * 2
        assert len(alone[0].token_ids) == options.max_length - ids['input_ids'].shape[1] or alone[0].finished
    assert len(together[1][0].token_ids) > 6  # the short prompt had more room than the padded width left


def test_the_preallocated_cache_gives_the_dynamic_caches_logits_and_grows_when_full(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[0], return_tensors='pt')['input_ids']
    preallocated = decoding_cache(model.config, capacity=ids.shape[1] + 1)  # full after the prefill and one step
    assert all(isinstance(layer, PreallocatedLayer) for layer in preallocated.layers)
    logits = {}
    for name, cache in (('dynamic', DynamicCache(config=model.config)), ('preallocated', preallocated)):
        cache_argument = {cache_keyword(model): cache}
        steps = [model(input_ids=ids, use_cache=True, **cache_argument).logits[:, -1]]
        for token in (17, 42, 99):  # the last two overflow the preallocated buffers
            steps.append(model(input_ids=torch.tensor([[token]]), use_cache=True, **cache_argument).logits[:, -1])
        logits[name] = torch.stack(steps)
    assert preallocated.get_seq_length() == ids.shape[1] + 3
    assert preallocated.layers[0].key_buffer.shape[2] == 2 * (ids.shape[1] + 1)
    torch.testing.assert_close(logits['preallocated'], logits['dynamic'], rtol=0, atol=1e-5)


def test_under_autocast_the_preallocated_cache_holds_the_autocast_dtype_with_the_same_logits(tiny):
    """Attention under bf16 autocast reads keys and values in bf16: the preallocated buffers store them so (not
    the float32 that rotary embeddings return, cast again at every step), and the logits are those of transformers'
    dynamic cache under the same autocast."""
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[0], return_tensors='pt')['input_ids']
    logits, preallocated = {}, decoding_cache(model.config, capacity=ids.shape[1] + 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for name, cache in (('dynamic', DynamicCache(config=model.config)), ('preallocated', preallocated)):
            cache_argument = {cache_keyword(model): cache}
            steps = [model(input_ids=ids, use_cache=True, **cache_argument).logits[:, -1]]
            for token in (17, 42, 99):
                steps.append(model(input_ids=torch.tensor([[token]]), use_cache=True, **cache_argument).logits[:, -1])
            logits[name] = torch.stack(steps).float()
    assert preallocated.layers[0].key_buffer.dtype == preallocated.layers[0].value_buffer.dtype == torch.bfloat16
    torch.testing.assert_close(logits['preallocated'], logits['dynamic'], rtol=0, atol=1e-5)


def test_the_k_samples_of_a_prompt_share_one_prefill(tiny):
    model, tokenizer = tiny
    prompts = tokenizer(PROMPTS, return_tensors='pt', padding=True)
    shapes = []
    hook = model.register_forward_hook(lambda module, args, kwargs, output: shapes.append(tuple(kwargs['input_ids'].shape)),
                                       with_kwargs=True)
    torch.manual_seed(0)
    samples = halos_sampler(model, tokenizer, SamplingOptions(100, temperature=1.0, max_new_tokens=6))(
        {'prompt_input_ids': prompts['input_ids'], 'prompt_attention_mask': prompts['attention_mask']}, 4)
    hook.remove()
    assert shapes[0] == tuple(prompts['input_ids'].shape)      # the prompts once, not 4 times
    assert all(shape == (8, 1) for shape in shapes[1:]) and len(shapes) <= 6  # then one token per forward
    assert [len(per_prompt) for per_prompt in samples] == [4, 4]
    assert len({tuple(s.token_ids) for s in samples[0]}) > 1     # k different samples


def test_the_samplers_log_probs_equal_a_forward_of_prompt_and_completion(tiny):
    """Sample.logp, gathered from the decoding forwards (left-padded, k per prompt, drawn at temperature 0.7),
    is the summed temperature-1 log-prob a full forward gives the completion; nothing counts after an EOS."""
    from halos.packing import sequence_logps
    from halos.rl import rollout_sequences
    model, tokenizer = tiny
    prompts = tokenizer(PROMPTS, return_tensors='pt', padding=True)
    batch = {'prompt_input_ids': prompts['input_ids'], 'prompt_attention_mask': prompts['attention_mask']}
    torch.manual_seed(0)
    samples = [s for per_prompt in halos_sampler(model, tokenizer, SamplingOptions(
        prompts['input_ids'].shape[1] + 10, temperature=0.7, top_p=0.9))(batch, 3) for s in per_prompt]
    three_each = {key: value.repeat_interleave(3, 0) for key, value in prompts.items()}
    rows = rollout_sequences(three_each['input_ids'], three_each['attention_mask'], [s.token_ids for s in samples],
                             tokenizer.pad_token_id)
    forward = sequence_logps(model, rows.input_ids, rows.attention_mask, rows.labels)
    torch.testing.assert_close(torch.tensor([s.logp for s in samples]), forward, rtol=0, atol=1e-4)
    options = SamplingOptions(prompts['input_ids'].shape[1] + 8, temperature=0)
    greedy = decode(model, prompts['input_ids'], prompts['attention_mask'], 1, options, -1, tokenizer.pad_token_id)
    eos = greedy.tokens[0, 2].item()  # a token the first greedy sample emits third: its EOS here
    stopped = decode(model, prompts['input_ids'], prompts['attention_mask'], 1, options, eos, tokenizer.pad_token_id)
    end = stopped.tokens[0].tolist().index(eos) + 1
    assert end <= 3 and (stopped.token_logps[0, end:] == 0).all()
    torch.testing.assert_close(stopped.token_logps[0, :end], greedy.token_logps[0, :end])


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.6), (0.5, 4, 0.8)])
def test_sampled_tokens_follow_the_warped_distribution(temperature, top_k, top_p):
    """Against transformers' own warpers, on fixed logits: total variation of 20,000 draws below 0.02."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.2, 0.0, -0.5, -1.0, -2.0, -3.0]])
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = warped.softmax(-1)[0]
    torch.manual_seed(0)
    draws = next_tokens(logits.repeat(20000, 1), SamplingOptions(100, top_p=top_p, temperature=temperature, top_k=top_k))
    observed = torch.bincount(draws, minlength=10).float() / len(draws)
    assert (observed - expected).abs().sum() / 2 < 0.02
    assert observed[expected == 0].sum() == 0  # nothing outside top-k / top-p is ever drawn


@pytest.mark.parametrize('top_p', [1.0, 0.9])
def test_a_policy_whose_weights_went_nan_is_named_not_a_torch_traceback(top_p):
    from halos.errors import TrainingDiverged
    logits = torch.tensor([[0.5, float('nan'), 1.0], [0.1, 0.2, 0.3]])
    with pytest.raises(TrainingDiverged) as error:
        next_tokens(logits, SamplingOptions(100, top_p=top_p, temperature=1.0))
    assert str(error.value) == ("sampling: the policy's next-token probabilities are NaN or inf, so its weights are (an "
                                "optimizer step that diverged, as float16 weights do, or a checkpoint saved so): lower "
                                "lr, or train with model.policy_dtype=bfloat16 or float32")


def test_nucleus_beyond_the_first_candidate_widths_is_exact():
    """nucleus_sample looks at the 64, then 1024 most likely tokens before sorting everything: rows whose
    nucleus needs each of the three draw only from transformers' top-p set, and the narrow row at its
    probabilities (total variation of 20,000 draws below 0.03)."""
    from transformers.generation.logits_process import TopPLogitsWarper
    vocabulary, top_p = 3000, 0.9
    ranks = torch.arange(vocabulary, dtype=torch.float)
    logits = torch.stack([-ranks / 8, -ranks / 150, -ranks / 2000])  # nuclei of about 20, 350 and 2300 tokens
    kept = TopPLogitsWarper(top_p)(None, logits.clone()).isfinite()
    assert kept[0].sum() < 64 < kept[1].sum() < 1024 < kept[2].sum()
    torch.manual_seed(0)
    draws = nucleus_sample(logits.repeat_interleave(20000, 0).softmax(-1), top_p).view(3, 20000)
    for row in range(3):
        assert kept[row, draws[row]].all()  # never outside the nucleus
        assert len(draws[row].unique()) > 0.8 * kept[row].sum()  # and across all of it
    expected = TopPLogitsWarper(top_p)(None, logits[:1].clone()).softmax(-1)[0]
    observed = torch.bincount(draws[0], minlength=vocabulary).float() / 20000
    assert (observed - expected).abs().sum() / 2 < 0.03


def test_sampling_dtype_defaults_to_the_forwards_autocast(tmp_path):
    """++sampling_dtype sets the decoding autocast; unset, sampling runs as the forwards do (model.autocast_dtype)."""
    from halos.build import sampling_options
    from helpers import make_config
    assert sampling_options(make_config(tmp_path)).autocast_dtype is None
    assert sampling_options(make_config(tmp_path, '++model.autocast_dtype=bfloat16')).autocast_dtype == 'bfloat16'
    assert sampling_options(make_config(tmp_path, '++sampling_dtype=bfloat16')).autocast_dtype == 'bfloat16'


def greedy_on_rank(rank, port, prompts, length, results):
    """One rank of an FSDP2-sharded tiny model decoding its own prompt greedily up to `length` tokens."""
    import os
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    tokenizer = models.load_tokenizer('embedded:tiny-smollm2')
    model = models.load_causal_lm('embedded:tiny-smollm2', 'float32').eval()
    mesh = init_device_mesh('cpu', (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    prompt_ids = tokenizer(prompts[rank], return_tensors='pt')
    tokens = decode(model, prompt_ids['input_ids'], prompt_ids['attention_mask'], 1,
                    SamplingOptions(length, temperature=0), tokenizer.eos_token_id, tokenizer.pad_token_id).tokens
    results[rank] = tokens.tolist()
    dist.destroy_process_group()


def test_sharded_ranks_decode_in_step_each_to_its_own_length(tiny):
    """Under FSDP2 every forward is a collective: a rank whose prompt leaves less room keeps stepping (without
    keeping tokens) until the other is done, and each gets what one unsharded process decodes."""
    import torch.multiprocessing as mp
    from utils import free_port
    model, tokenizer = tiny
    length = len(tokenizer(PROMPTS[1])['input_ids']) + 12
    results = mp.Manager().dict()
    mp.spawn(greedy_on_rank, args=(free_port(), PROMPTS, length, results), nprocs=2, join=True)
    for rank, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors='pt')
        alone = decode(model, ids['input_ids'], ids['attention_mask'], 1, SamplingOptions(length, temperature=0),
                       tokenizer.eos_token_id, tokenizer.pad_token_id).tokens
        assert results[rank] == alone.tolist() and len(alone[0]) == length - ids['input_ids'].shape[1]
    assert len(results[0][0]) < len(results[1][0])  # the budgets differed
