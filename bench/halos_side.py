"""One halos run of the benchmark, in its own process:  python bench/halos_side.py SPEC OUT

Builds the trainer exactly as `python train.py <overrides>` does (halos.build.build_trainer on the same
validated config) and runs `trainer.train()`. It stops there: train.py's final evaluation and
checkpoint export are not training and would only add to the run's peak memory.

The trainer is only observed, never changed: the end of every optimizer step is time-stamped and the
tokens of every training batch counted. Per-step losses come from the run's metrics.jsonl (the spec's
overrides set minimum_log_interval_secs=0, so halos logs every step).
"""
import json
import os
import sys
import time

from common import GRAD_PREFIXES, compose_config, peak_gpu_mib, peak_rss_mib, read_spec, write_result


def batch_tokens(trainer, batch, name: str) -> dict:
    """Non-padding tokens of one batch: through the policy with a gradient, forward-only, and scored by the loss."""
    count = lambda prefix: int(batch[f'{prefix}_combined_attention_mask'].sum())
    grad_prefixes = GRAD_PREFIXES[name]
    trained = sum(count(p) for p in grad_prefixes)
    forward_only = sum(count(p) for p in trainer.prefixes if p not in grad_prefixes)  # KTO's KL rows, no grad
    if trainer.use_reference_model and trainer.reference_model is not None:  # not when reference log-probs are cached
        forward_only += sum(count(p) for p in trainer.prefixes)
    scored = sum(int((batch[f'{p}_labels'][:, 1:] != -100).sum()) for p in grad_prefixes)
    return {'trained': trained, 'forward_only': forward_only, 'scored': scored,
            'examples': trainer.global_batch_size(batch)}


def instrument(trainer, name: str) -> dict:
    """Record the end time of each optimizer step and the tokens of each training batch."""
    record = {'step_end': [], 'tokens': []}
    optimizer_step, get_batch_metrics = trainer.optimizer_step, trainer.get_batch_metrics

    def timed_optimizer_step():
        optimizer_step()
        record['step_end'].append(time.perf_counter())

    def counted_batch_metrics(batch, mode):
        if mode == 'train':
            record['tokens'].append(batch_tokens(trainer, batch, name))
        return get_batch_metrics(batch, mode)

    trainer.optimizer_step, trainer.get_batch_metrics = timed_optimizer_step, counted_batch_metrics
    return record


def logged_steps(run_dir: str) -> list:
    """The per-step training records of metrics.jsonl, in order."""
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if 'loss/train' in r]


def main(spec_path: str, out_path: str) -> None:
    spec = read_spec(spec_path)
    import torch
    from halos.build import build_trainer
    config = compose_config(spec['overrides'])
    trainer = build_trainer(config)
    record = instrument(trainer, spec['trainer'])
    start = time.perf_counter()
    trainer.train()
    rss = peak_rss_mib()
    logs = logged_steps(config.local_run_dir)
    tokens = record['tokens']
    losses = [r['loss/train'] for r in logs]
    if spec['trainer'] == 'sft':  # halos' SFT loss sums each target's NLL; TRL's averages over tokens
        comparable = [loss * t['examples'] / t['scored'] for loss, t in zip(losses, tokens)]
    else:
        comparable = losses
    write_result(out_path, {
        'side': 'halos', 'trainer': spec['trainer'], 'threads': torch.get_num_threads(),
        'n_params': sum(p.numel() for p in trainer.policy.parameters()), 'peak_rss_mib': rss,
        'peak_gpu_mib': peak_gpu_mib(),
        'step_end': [t - start for t in record['step_end']],
        'compute_seconds': [t['examples'] / r['examples_per_second'] for t, r in zip(tokens, logs)],
        'losses': losses, 'comparable_losses': comparable, 'tokens': tokens,
    })


if __name__ == '__main__':
    main(*sys.argv[1:3])
