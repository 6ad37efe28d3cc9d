"""Benchmark halos against TRL on the same model, data, settings and machine.

    python bench/bench.py --trainers sft dpo kto --steps 8 --runs 3 --batch-size 4 --max-length 256 \
        --dtype float32 --model embedded:smollm2-135m-instruct
    python bench/bench.py --smoke          # one step of each side on the tiny model, for the test suite

For each trainer and run, halos and then TRL train in their own process (halos run 1, TRL run 1,
halos run 2, ...), each reporting its per-step time stamps, losses, token counts and peak RSS
(bench/halos_side.py, bench/trl_side.py). Throughput counts the steps after the first `--skip`
(warm-up): examples/s and tokens/s are examples and non-padding policy tokens over the wall time
between the ends of optimizer steps, and each side's figure is the median over runs. FLOP/s uses

    6 x n_params x trained tokens  +  2 x n_params x forward-only tokens

(trained: the sequences through the policy with a gradient; forward-only: the reference model's
forwards and KTO's no-grad KL rows), as a fraction of the best torch.matmul of two 2048 x 2048
matrices of the same dtype timed in this invocation. Writes <out-dir>/<timestamp>.{json,md} and
<out-dir>/latest.{json,md} (bench/results; runs/bench-smoke under --smoke).
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from common import RETAIN_FREED_MEMORY_ENV, ROOT, with_defaults
from halos.errors import ArgumentParser, non_negative_int, positive_int  # noqa: E402 (common puts ROOT on the path)

FULL = dict(model='embedded:smollm2-135m-instruct', steps=8, runs=3, batch_size=4, max_length=256,
            max_prompt_length=128, skip=2, matmul_size=2048, override=[])
# three steps at a learning rate that moves the tiny model, so that later losses compare the updates too
SMOKE = dict(model='embedded:tiny-smollm2', steps=3, runs=1, batch_size=2, max_length=64,
             max_prompt_length=32, skip=0, matmul_size=256, override=['++lr=1e-2'])
SIDES = ('halos', 'trl')
# extra halos runs beside the two sides: (the script's side, its extra overrides)
VARIANTS = {'halos-unshared': ('halos', ['++model.share_prompts=false'])}
FLOPS_FORMULA = ('6 * n_params * trained_tokens + 2 * n_params * forward_only_tokens; trained tokens: non-padding '
                 'tokens of the sequences through the policy with a gradient; forward-only: the reference model\'s '
                 'forwards and KTO\'s no-grad KL rows through the policy; attention-score FLOPs are not counted')


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog='bench.py', description=__doc__.split('\n')[0])
    parser.add_argument('--trainers', nargs='+', default=['sft', 'dpo', 'kto'], choices=['sft', 'dpo', 'kto'])
    parser.add_argument('--smoke', action='store_true', help=f'small settings for a quick check: {SMOKE}')
    parser.add_argument('--model', help=f"halos model name or HF directory (default {FULL['model']})")
    parser.add_argument('--steps', type=positive_int, help='optimizer steps per run')
    parser.add_argument('--runs', type=positive_int, help='runs per side and trainer (the median is reported)')
    parser.add_argument('--batch-size', type=positive_int)
    parser.add_argument('--max-length', type=positive_int)
    parser.add_argument('--max-prompt-length', type=positive_int)
    parser.add_argument('--skip', type=non_negative_int, help='warm-up steps left out of the throughput')
    parser.add_argument('--matmul-size', type=positive_int)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                        help='weights (and so compute and optimizer state) of policy and reference, on both sides')
    parser.add_argument('--override', action='append', default=None, metavar='KEY=VALUE',
                        help='extra halos config override (repeatable). TRL follows the keys it has: ++lr, '
                             '++optimizer, ++warmup_steps, ++loss.beta, ++seed, ++cache_reference_logprobs '
                             '(as precompute_ref_log_probs), ++model.autocast_dtype=bfloat16 (as bf16=True: '
                             'autocast over float32 weights on both sides); other keys change halos only')
    parser.add_argument('--unshared', action='store_true',
                        help='also run halos with model.share_prompts=false (a halos-unshared row per trainer)')
    parser.add_argument('--trl-retains-memory', action='store_true',
                        help="give TRL's processes the allocator settings halos applies itself (retain_freed_memory)")
    parser.add_argument('--jobs', type=positive_int, default=1,
                        help='runs at once; above 1 only to check that everything works (the timings then mean nothing)')
    parser.add_argument('--out-dir', help='where the report goes (default bench/results; under --smoke, '
                                              'runs/bench-smoke)')
    args = with_defaults(parser.parse_args(argv), FULL, SMOKE)
    if args.skip >= args.steps:
        parser.error(f"--skip {args.skip} leaves none of the {args.steps} steps (--steps) to time")
    if os.path.isfile(args.out_dir):
        parser.error(f"--out-dir {args.out_dir} is a file, not a directory")
    args.sides = SIDES + (('halos-unshared',) if args.unshared else ())
    return args


# ---------------------------------------------------------------- the machine

def machine_info() -> dict:
    import torch
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')), '?')
    memory = next((line.split()[1] for line in open('/proc/meminfo') if line.startswith('MemTotal')), '0')
    versions = {name: importlib.metadata.version(name) for name in ('torch', 'transformers', 'trl')}
    return {'cpu': cpu, 'logical_cores': os.cpu_count(), 'usable_cores': len(os.sched_getaffinity(0)),
            'memory_gib': round(int(memory) / 2 ** 20, 1), 'torch_threads': torch.get_num_threads(),
            'python': platform.python_version(), 'platform': platform.platform(), **versions}


def matmul_peak(dtype: str, size: int, repeats: int = 10, device: str = 'cpu') -> float:
    """FLOP/s of the fastest of `repeats` torch.matmul calls on two size x size matrices of `dtype` on `device`."""
    import torch
    a, b = (torch.randn(size, size, device=device).to(getattr(torch, dtype)) for _ in range(2))
    synchronize = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    for _ in range(2):
        torch.matmul(a, b)
    best = float('inf')
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize()  # a GPU's matmul returns before it is done
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# ---------------------------------------------------------------- running one side

def halos_overrides(trainer: str, args: argparse.Namespace, cache_dir: str, extra=()) -> list:
    """The train.py command line of a run: the shipped HH sample, no evaluation, a log line per step."""
    b = args.batch_size
    return [f'loss={trainer}', 'model=smollm2', f'++model.name_or_path={args.model}', 'datasets=[hh]',
            f'exp_name=bench_{trainer}', 'mode=train', f'++data_dir={os.path.join(ROOT, "data")}',
            f'++cache_dir={cache_dir}', '++wandb.enabled=false', '++n_epochs=null', f'++n_examples={args.steps * b}',
            f'++model.batch_size={b}', '++model.gradient_accumulation_steps=1',
            f'++model.max_length={args.max_length}', f'++model.max_prompt_length={args.max_prompt_length}',
            f'++model.policy_dtype={args.dtype}', f'++model.reference_dtype={args.dtype}',
            '++model.activation_checkpointing=false', '++do_first_eval=false', f'++eval_every={(args.steps + 1) * b}',
            f'++n_eval_examples={b}', '++minimum_log_interval_secs=0', *args.override, *extra]


def run_side(side: str, trainer: str, args: argparse.Namespace, work_dir: str) -> dict:
    """One run of one side in a fresh process; returns the result it wrote."""
    cache_dir = tempfile.mkdtemp(prefix='cache-', dir=work_dir)
    spec, out, log = (os.path.join(work_dir, f'{side}_{trainer}.{ext}') for ext in ('spec.json', 'json', 'log'))
    script_side, extra = VARIANTS.get(side, (side, []))
    with open(spec, 'w') as f:
        json.dump({'trainer': trainer, 'overrides': halos_overrides(trainer, args, cache_dir, extra)}, f)
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', WANDB_MODE='disabled',
               TOKENIZERS_PARALLELISM='false', **(RETAIN_FREED_MEMORY_ENV if side == 'trl' and args.trl_retains_memory else {}))
    script = os.path.join(ROOT, 'bench', f'{script_side}_side.py')
    with open(log, 'w') as f:
        code = subprocess.run([sys.executable, script, spec, out], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    shutil.rmtree(cache_dir, ignore_errors=True)
    if code != 0:
        tail = open(log).read()[-4000:]
        raise RuntimeError(f'{side} {trainer} run failed (exit {code}); end of its log {log}:\n{tail}')
    with open(out) as f:
        return json.load(f)


def announced_run(run: int, side: str, trainer: str, args: argparse.Namespace, work_dir: str) -> dict:
    print(f'run {run + 1}/{args.runs}: {side} {trainer}', flush=True)
    return run_side(side, trainer, args, work_dir)


# ---------------------------------------------------------------- summarising

def summarize_run(result: dict, skip: int, peak_flops: float) -> dict:
    """Throughput of one run over the steps after the first `skip` (all steps if there are no more)."""
    ends = result['step_end']
    durations = [end - start for start, end in zip([0.0] + ends[:-1], ends)]
    window = slice(skip, None) if skip < len(durations) else slice(None)
    seconds, compute = sum(durations[window]), sum(result['compute_seconds'][window])
    tokens = result['tokens'][window]
    examples = sum(t['examples'] for t in tokens)
    flops = sum(6 * result['n_params'] * t['trained'] + 2 * result['n_params'] * t['forward_only'] for t in tokens)
    return {'steps_timed': len(tokens), 'seconds_per_step': seconds / len(tokens),
            'examples_per_s': examples / seconds, 'tokens_per_s': sum(t['trained'] for t in tokens) / seconds,
            'compute_examples_per_s': examples / compute, 'flops_per_s': flops / seconds,
            'fraction_of_matmul_peak': flops / seconds / peak_flops, 'peak_rss_mib': result['peak_rss_mib'],
            'peak_gpu_mib': result.get('peak_gpu_mib'),
            'losses': result['losses'], 'comparable_losses': result['comparable_losses'],
            'step_seconds': durations, 'tokens': result['tokens']}


def summarize_side(runs: list, results: list) -> dict:
    """Medians over runs (peak RSS: the largest), the first run's loss curve, and every run."""
    median = lambda key: statistics.median(run[key] for run in runs)
    summary = {key: median(key) for key in ('examples_per_s', 'tokens_per_s', 'compute_examples_per_s',
                                            'seconds_per_step', 'flops_per_s', 'fraction_of_matmul_peak')}
    summary.update(peak_rss_mib=max(run['peak_rss_mib'] for run in runs), n_params=results[0]['n_params'],
                   threads=results[0]['threads'], losses=runs[0]['comparable_losses'], runs=runs)
    if 'token_mismatches' in results[0]:
        summary['token_mismatches'] = results[0]['token_mismatches']
    return summary


def ratios(halos: dict, trl: dict) -> dict:
    keys = ('examples_per_s', 'tokens_per_s', 'compute_examples_per_s', 'fraction_of_matmul_peak', 'peak_rss_mib')
    return {key: halos[key] / trl[key] for key in keys}


# ---------------------------------------------------------------- the report

def markdown(report: dict) -> str:
    m, s = report['machine'], report['settings']
    lines = [f"# halos vs TRL ({report['created']})", '',
             f"Machine: {m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m['transformers']}, TRL {m['trl']}, Python {m['python']}.",
             f"Model `{s['model']}`, {s['dtype']}, batch {s['batch_size']}, max_length {s['max_length']}, "
             f"max_prompt_length {s['max_prompt_length']}, {s['steps']} steps, {s['runs']} runs per side, "
             f"first {s['skip']} steps not timed; optimizer {s['optimizer']} lr {s['lr']} (warmup {s['warmup_steps']}). "
             f"Matmul peak ({s['dtype']}, {s['matmul_size']}²): {report['matmul_peak_flops'] / 1e9:.0f} GFLOP/s. "
             f"Freed memory: halos keeps it in the process; TRL "
             f"{'the same, from the environment' if s.get('trl_retains_memory') else 'on the glibc default'}.",
             f"Command: `{report['command']}`", '',
             '| trainer | side | examples/s | tokens/s | s/step | peak RSS (MiB) | % of matmul peak | loss step 1 | loss last |',
             '|---|---|---|---|---|---|---|---|---|']
    for name, entry in report['trainers'].items():
        for side in report['settings'].get('sides', SIDES):
            r = entry[side]
            lines.append(f"| {name} | {side} | {r['examples_per_s']:.3f} | {r['tokens_per_s']:.1f} | "
                         f"{r['seconds_per_step']:.2f} | {r['peak_rss_mib']:.0f} | "
                         f"{100 * r['fraction_of_matmul_peak']:.1f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |")
    unshared = 'halos-unshared' in report['settings'].get('sides', SIDES)
    lines += ['', '| trainer | examples/s halos/TRL | tokens/s halos/TRL | peak RSS halos/TRL | TRL token mismatches |'
              + (' examples/s shared/unshared prompts |' if unshared else ''),
              '|---|---|---|---|---|' + ('---|' if unshared else '')]
    for name, entry in report['trainers'].items():
        r = entry['ratio_halos_over_trl']
        sharing = f" {entry['halos']['examples_per_s'] / entry['halos-unshared']['examples_per_s']:.2f} |" if unshared else ''
        lines.append(f"| {name} | {r['examples_per_s']:.2f} | {r['tokens_per_s']:.2f} | {r['peak_rss_mib']:.2f} | "
                     f"{entry['trl'].get('token_mismatches')} |{sharing}")
    lines += ['', 'Loss per step (first run; SFT: halos\' summed NLL per target converted to TRL\'s mean NLL per token):', '']
    for name, entry in report['trainers'].items():
        halos, trl = entry['halos']['losses'], entry['trl']['losses']
        lines.append(f"- {name}: halos {' '.join(f'{x:.6f}' for x in halos)}; TRL {' '.join(f'{x:.6f}' for x in trl)}")
    lines += ['', f"FLOPs: {report['flops_formula']}.", '']
    return '\n'.join(lines)


def write_report(report: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = report['created'].replace(':', '').replace('-', '')
    text = markdown(report)
    for name in (stamp, 'latest'):
        with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
            f.write(text)
    return text


def settings(args: argparse.Namespace) -> dict:
    """The command-line settings plus the optimizer settings both sides take from the halos config."""
    from common import compose_config
    config = compose_config(halos_overrides(args.trainers[0], args, tempfile.gettempdir()))
    return {**vars(args), 'optimizer': config.optimizer, 'lr': config.lr, 'warmup_steps': config.warmup_steps,
            'max_grad_norm': config.model.max_grad_norm, 'seed': config.seed}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import models
    models.resolve_model_path(args.model)  # convert the embedded model once, before anything is timed
    peak_before = matmul_peak(args.dtype, args.matmul_size)
    results = {name: {side: [] for side in args.sides} for name in args.trainers}
    with tempfile.TemporaryDirectory(prefix="halos-bench-") as work_dir, ThreadPoolExecutor(args.jobs) as pool:
        for run in range(args.runs):
            planned = [(name, side) for name in args.trainers for side in args.sides]
            futures = [pool.submit(announced_run, run, side, name, args, work_dir) for name, side in planned]
            for (name, side), future in zip(planned, futures):
                results[name][side].append(future.result())
    peak_after = matmul_peak(args.dtype, args.matmul_size)
    peak = max(peak_before, peak_after)
    trainers = {}
    for name in args.trainers:
        entry = {side: summarize_side([summarize_run(r, args.skip, peak) for r in results[name][side]],
                                      results[name][side]) for side in args.sides}
        entry['ratio_halos_over_trl'] = ratios(entry['halos'], entry['trl'])
        trainers[name] = entry
    report = {'created': datetime.datetime.now().strftime('%Y-%m-%dT%H-%M-%S'),
              'command': ' '.join(['python', 'bench/bench.py', *(argv if argv is not None else sys.argv[1:])]),
              'settings': settings(args), 'machine': machine_info(), 'matmul_peak_flops': peak,
              'matmul_peak_flops_before_after': [peak_before, peak_after], 'flops_formula': FLOPS_FORMULA,
              'trainers': trainers}
    print(write_report(report, args.out_dir))
    return report


if __name__ == '__main__':
    main()
