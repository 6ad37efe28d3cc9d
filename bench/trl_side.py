"""One TRL run of the benchmark, in its own process:  python bench/trl_side.py SPEC OUT

TRL gets the same work as halos: the examples of halos' own loader, in halos' batch order (TRL's
sequential sampler), as text in TRL's standard formats (SFT prompt/completion, DPO
prompt/chosen/rejected, KTO prompt/completion/label). The texts are those halos trains on after its
truncation to max_length / max_prompt_length (TRL 1.16 has no max_prompt_length), and the token ids
TRL makes of them are checked against halos' (`token_mismatches`). The same model directory, dtype,
batch size, max_length, beta, clipping norm and seed come from the halos config, and the optimizer
and learning-rate schedule are built exactly as halos builds them (halos.loop.build_optimizer: torch.optim.<optimizer>(lr)
with the same fused or foreach kernel, no weight decay, linear warmup min(1, (step + 1) / (warmup + 1))) and handed to TRL. halos'
cache_reference_logprobs=true turns on TRL's precompute_ref_log_probs (done before training on both sides).
"""
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from common import (GRAD_PREFIXES, compose_config, halos_train_batches, peak_gpu_mib, peak_rss_mib, read_spec,
                    unpadded_sequences, write_result)
import models  # noqa: E402  (common puts the halos repository on sys.path)
from halos.loop import build_optimizer  # noqa: E402


def trl_rows(name: str, batches: list) -> list:
    """halos' training items as rows of TRL's dataset format for the trainer `name`."""
    rows = []
    for batch in batches:
        for i, prompt in enumerate(batch['prompt_text']):
            if name == 'sft':
                rows.append({'prompt': prompt, 'completion': batch['target_text'][i]})
            elif name == 'dpo':
                rows.append({'prompt': prompt, 'chosen': batch['chosen_text'][i], 'rejected': batch['rejected_text'][i]})
            else:
                rows.append({'prompt': prompt, 'completion': batch['target_text'][i],
                             'label': bool(batch['is_desirable'][i])})
    return rows


def trl_sequences(name: str, row: dict, max_length: int) -> list:
    """The token ids TRL trains on for one tokenized dataset row (after its collator's truncation)."""
    if name == 'sft':
        return [row['input_ids'][:max_length]]
    if name == 'dpo':
        return [(row['prompt_ids'] + row[k])[:max_length] for k in ('chosen_ids', 'rejected_ids')]
    return [(row['prompt_ids'] + row['completion_ids'])[:max_length]]


def token_mismatches(name: str, batches: list, dataset, max_length: int) -> int:
    """How many sequences TRL tokenized differently from halos (0: both train on identical tokens)."""
    halos = [seq for batch in batches for item in zip(*(unpadded_sequences(batch, p) for p in GRAD_PREFIXES[name]))
             for seq in item]
    trl = [seq for row in dataset for seq in trl_sequences(name, row, max_length)]
    return sum(a != b for a, b in zip(halos, trl)) + abs(len(halos) - len(trl))


def batch_tokens(name: str, batch: dict, reference_per_step: bool) -> dict:
    """Non-padding tokens of one collated TRL batch, counted like halos_side.batch_tokens."""
    trained = int(batch['attention_mask'].sum())
    forward_only = trained if reference_per_step else 0
    if name == 'kto':  # the KL rows go through the policy (and the live reference), without gradient
        forward_only += (2 if reference_per_step else 1) * int(batch['KL_attention_mask'].sum())
    scored = int(batch['completion_mask'][:, 1:].sum()) if 'completion_mask' in batch \
        else int((batch['labels'][:, 1:] != -100).sum())
    return {'trained': trained, 'forward_only': forward_only, 'scored': scored,
            'examples': len(batch['input_ids']) // (2 if name == 'dpo' else 1)}


class Recorder(TrainerCallback):
    """Time stamps of every step's begin and end, and the logged per-step losses."""

    def __init__(self):
        self.start, self.step_begin, self.step_end, self.losses = None, [], [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begin.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and 'loss' in logs:
            self.losses.append(logs['loss'])


def counting(collator, name: str, reference_per_step: bool, counts: list):
    """The collator, also appending the token counts of each batch it makes to `counts`."""
    def collate(examples):
        batch = collator(examples)
        counts.append(batch_tokens(name, batch, reference_per_step))
        return batch
    return collate


def build_trainer(name: str, config, dataset, output_dir: str):
    """The TRL trainer for `name`, configured like the halos run."""
    import trl
    path = models.resolve_model_path(config.model.name_or_path)
    dtype = getattr(torch, config.model.policy_dtype)
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation='sdpa')
    model = load()
    if config.model.use_peft:  # the halos run's LoRA settings; the optimizer then holds the adapters only
        from peft import get_peft_model
        from halos.lora import lora_config
        model = get_peft_model(model, lora_config(config.model.peft, 'CAUSAL_LM', ()),
                               autocast_adapter_dtype=False)
    optimizer = build_optimizer(config.optimizer, [p for p in model.parameters() if p.requires_grad], config.lr, sharded=False)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    common = dict(output_dir=output_dir, per_device_train_batch_size=config.model.batch_size,
                  gradient_accumulation_steps=1, max_steps=len(dataset) // config.model.batch_size,
                  learning_rate=config.lr, weight_decay=0.0, max_grad_norm=config.model.max_grad_norm,
                  max_length=config.model.max_length, train_sampling_strategy='sequential', seed=config.seed,
                  activation_checkpointing=config.model.activation_checkpointing, use_cpu=not torch.cuda.is_available(), fp16=False,
                  bf16=config.model.autocast_dtype == 'bfloat16',  # halos' ++model.autocast_dtype: autocast
                  logging_steps=1, save_strategy='no', eval_strategy='no', report_to='none', disable_tqdm=True)
    kwargs = dict(model=model, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(path),
                  optimizers=(optimizer, scheduler))
    if name == 'sft':
        return trl.SFTTrainer(args=trl.SFTConfig(**common, completion_only_loss=True), **kwargs)
    common.update(beta=config.loss.params.beta, precompute_ref_log_probs=config.cache_reference_logprobs)
    if name == 'dpo':  # under LoRA (a PeftModel) TRL's reference is the model with its adapters off
        return trl.DPOTrainer(args=trl.DPOConfig(**common), ref_model=None if config.model.use_peft else load(), **kwargs)
    kto_args = trl.KTOConfig(**common, desirable_weight=config.loss.params.desirable_weight,
                             undesirable_weight=config.loss.params.undesirable_weight)
    return trl.KTOTrainer(args=kto_args, ref_model=load(), **kwargs)


def main(spec_path: str, out_path: str) -> None:
    import datasets
    spec = read_spec(spec_path)
    name = spec['trainer']
    config = compose_config(spec['overrides'])
    batches = halos_train_batches(config, models.load_tokenizer(config.model.name_or_path))
    if any(len(batch['prompt_text']) != config.model.batch_size for batch in batches):
        raise ValueError("a halos batch is not full (an epoch ends inside the run): TRL would batch differently; "
                         "choose steps x batch size within one epoch of the data")
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(name, config, datasets.Dataset.from_list(trl_rows(name, batches)), output_dir)
        mismatches = token_mismatches(name, batches, trainer.train_dataset, config.model.max_length)
        counts, recorder = [], Recorder()
        reference_per_step = name != 'sft' and not config.cache_reference_logprobs
        trainer.data_collator = counting(trainer.data_collator, name, reference_per_step, counts)
        trainer.add_callback(recorder)
        trainer.train()
    rss = peak_rss_mib()
    write_result(out_path, {
        'side': 'trl', 'trainer': name, 'threads': torch.get_num_threads(),
        'n_params': sum(p.numel() for p in trainer.model.parameters()), 'peak_rss_mib': rss,
        'peak_gpu_mib': peak_gpu_mib(),
        'step_end': [t - recorder.start for t in recorder.step_end],
        'compute_seconds': [end - begin for begin, end in zip(recorder.step_begin, recorder.step_end)],
        'losses': recorder.losses, 'comparable_losses': recorder.losses, 'tokens': counts[-len(recorder.step_end):],
        'token_mismatches': mismatches,
    })


if __name__ == '__main__':
    main(*sys.argv[1:3])
