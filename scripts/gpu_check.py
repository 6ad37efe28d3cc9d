"""`make gpu-check`: one command that checks halos on a GPU machine and reports what it found.

    python scripts/gpu_check.py                     # writes bench/results/gpu-<date>.json and .md
    python scripts/gpu_check.py --out DIR --parts tests sampling
    python scripts/gpu_check.py --pack DIR          # the tokenizer files to carry to the GPU machine (scripts/README.md)

Parts, each run where it can and otherwise skipped with its reason (no CUDA GPU, TRL or vLLM not importable):
- tests: `pytest -m gpu tests/test_gpu.py` in a subprocess, each test's outcome and each skip's reason;
- training: tokens/s and peak GPU memory of SFT, DPO and KTO steps in bf16 on two models with random weights built
  from configs (SmolLM2-135M's shape and a 1.1B-parameter Llama), halos against TRL with the same settings, each
  side a fresh process (bench/bench.py's runner: bench/halos_side.py and bench/trl_side.py);
- sampling: new tokens/s of halos' decoding loop, HF generate and (where installed) a vLLM engine at 64 sequences
  decoding together (16 prompts x 4 samples), on both models (bench/sampling.py's prompts and paths).
Nothing is downloaded or installed: the models' tokenizer is the embedded tiny model's ($HALOS_HOME/models/
tiny-smollm2, which `--pack` copies). Exit status 1 when a test failed or a part broke, else 0.
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from types import SimpleNamespace
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench')
for path in (ROOT, BENCH):
    if path not in sys.path:
        sys.path.insert(0, path)

PARTS = ('tests', 'training', 'sampling')
TRAINERS = ('sft', 'dpo', 'kto')
# Llama-architecture shapes with SmolLM2's vocabulary (the tokenizer that travels); random weights, bf16
MODELS = {
    'smollm2-135m': dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    'llama-1.1b': dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0),
}
TOKENIZER = 'embedded:tiny-smollm2'
DEVICE = 'cuda'
ENV = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'WANDB_MODE': 'disabled', 'TOKENIZERS_PARALLELISM': 'false'}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', help='directory of the report, gpu-<date>.json and .md (default: bench/results, '
                                      'or runs/gpu-check where no CUDA GPU ran any part)')
    parser.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS)
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--steps', type=int, default=4, help='optimizer steps per training run (HH has 36 pairs)')
    parser.add_argument('--skip', type=int, default=1, help='first steps left out of tokens/s (warm-up)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--max-length', type=int, default=512)
    parser.add_argument('--new-tokens', type=int, default=64, help='new tokens per sample in the sampling part')
    parser.add_argument('--tests-timeout', type=int, default=300, help='seconds the GPU tests may take')
    parser.add_argument('--pack', metavar='DIR', help='copy the tokenizer files the check needs to DIR/models/ and stop')
    return parser.parse_args(argv)


# ---------------------------------------------------------------- what can run here

def cuda_missing() -> Optional[str]:
    import torch
    if not torch.cuda.is_available():
        return 'no CUDA GPU: torch.cuda.is_available() is False'
    return None


def missing_module(name: str) -> Optional[str]:
    return None if importlib.util.find_spec(name) is not None else f'{name} is not importable'


def version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> Dict:
    import torch
    info = {'python': platform.python_version(), 'platform': platform.platform(), 'cpu_cores': os.cpu_count(),
            **{name: version(name) for name in ('torch', 'transformers', 'peft', 'accelerate', 'trl', 'vllm',
                                                'flash-attn')}}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda,
                    gpu_memory_gib=round(properties.total_memory / 2 ** 30, 1))
    return info


# ---------------------------------------------------------------- the tests

def junit_cases(path: str) -> List[Dict]:
    """Each test case of a JUnit XML report: its name, outcome and (skipped, failed) message."""
    cases = []
    for case in ElementTree.parse(path).iter('testcase'):
        outcome, message = 'passed', None
        for kind in ('skipped', 'failure', 'error'):
            found = case.find(kind)
            if found is not None:
                outcome = {'failure': 'failed'}.get(kind, kind)
                message = (found.get('message') or found.text or '').strip()[:2000]
        cases.append({'test': case.get('name'), 'outcome': outcome, 'message': message})
    return cases


def run_tests(args: argparse.Namespace, work_dir: str) -> Dict:
    report_path = os.path.join(work_dir, 'gpu-tests.xml')
    command = [sys.executable, '-m', 'pytest', '-m', 'gpu', '-q', '-rs', '-p', 'no:cacheprovider',
               f'--junitxml={report_path}', os.path.join('tests', 'test_gpu.py')]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, **ENV), capture_output=True, text=True,
                            timeout=args.tests_timeout)
    cases = junit_cases(report_path) if os.path.exists(report_path) else []
    counts = {outcome: sum(case['outcome'] == outcome for case in cases)
              for outcome in ('passed', 'failed', 'error', 'skipped')}
    broke = result.returncode not in (0, 5) or counts['failed'] or counts['error']
    return {'status': 'failed' if broke else 'ran', 'command': ' '.join(command[1:]), 'exit_status': result.returncode,
            **counts, 'cases': cases, 'output_tail': (result.stdout + result.stderr)[-3000:]}


# ---------------------------------------------------------------- the models

def random_model(name: str, work_dir: str) -> str:
    """An HF directory of a Llama-architecture model of shape MODELS[name] with random weights (seed 0), in bf16,
    with the embedded tiny model's tokenizer."""
    import torch
    import transformers
    import models
    directory = os.path.join(work_dir, name)
    tokenizer = models.load_tokenizer(TOKENIZER)
    shape = dict(MODELS[name])
    rope_theta = shape.pop('rope_theta')
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, **shape,
                                      rope_parameters={'rope_type': 'default', 'rope_theta': rope_theta},
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialising a billion weights is quicker there
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


# ---------------------------------------------------------------- training steps: halos against TRL

def training_rows(args: argparse.Namespace, model_dirs: Dict[str, str], work_dir: str, skipped: List[Dict]) -> List[Dict]:
    """One row per model, trainer and side: tokens/s over the steps after the warm-up, and peak GPU memory."""
    import bench
    sides = ['halos'] + (['trl'] if missing_module('trl') is None else [])
    if 'trl' not in sides:
        skipped.append({'part': 'training', 'what': 'the TRL side', 'reason': missing_module('trl')})
    peak = bench.matmul_peak('bfloat16', 8192, repeats=5, device='cuda')
    rows = []
    for name, directory in model_dirs.items():
        bench_args = bench.parse_args(['--model', directory, '--dtype', 'bfloat16', '--steps', str(args.steps),
                                       '--runs', '1', '--batch-size', str(args.batch_size), '--max-length',
                                       str(args.max_length), '--max-prompt-length', str(args.max_length // 2),
                                       '--skip', str(args.skip)])
        for trainer in TRAINERS:
            for side in sides:
                print(f'training: {name} {trainer} {side}', flush=True)
                try:
                    result = bench.summarize_run(bench.run_side(side, trainer, bench_args, work_dir), args.skip, peak)
                except Exception as error:  # one side that breaks is reported; the others still run
                    rows.append({'model': name, 'trainer': trainer, 'side': side, 'error': str(error)[-2000:]})
                    continue
                rows.append({'model': name, 'trainer': trainer, 'side': side, 'tokens_per_s': result['tokens_per_s'],
                             'examples_per_s': result['examples_per_s'], 'seconds_per_step': result['seconds_per_step'],
                             'peak_gpu_mib': result['peak_gpu_mib'],
                             'fraction_of_matmul_peak': result['fraction_of_matmul_peak'],
                             'losses': result['losses']})
    return rows


# ---------------------------------------------------------------- sampling

def timed_tokens(sample, repeats: int = 2) -> Dict:
    """New tokens per second of `sample()` (returns its new tokens), the best of `repeats` after one warm-up."""
    import torch
    sample()
    best, tokens = float('inf'), 0
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = sample()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {'new_tokens': tokens, 'seconds': best, 'tokens_per_s': tokens / best}


def sampling_rows(args: argparse.Namespace, model_dirs: Dict[str, str], skipped: List[Dict]) -> List[Dict]:
    """halos' loop and HF generate (bench/sampling.py's paths) and a vLLM engine, 16 prompts x 4 samples each."""
    import torch
    from halos.vllm_engine import vllm_unavailable
    options = SimpleNamespace(k=4, max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95)
    vllm_reason = vllm_unavailable()
    if vllm_reason:
        skipped.append({'part': 'sampling', 'what': 'the vLLM engine', 'reason': vllm_reason})
    rows = []
    for name, directory in model_dirs.items():
        rows += model_sampling_rows(name, directory, options, with_vllm=vllm_reason is None)
        torch.cuda.empty_cache()
    return rows


def model_sampling_rows(name: str, directory: str, options: SimpleNamespace, with_vllm: bool) -> List[Dict]:
    import torch
    import models
    import sampling as sampling_bench
    tokenizer = models.load_tokenizer(directory)
    model = models.load_causal_lm(directory, 'bfloat16').cuda().eval()
    ids, mask = (t.cuda() for t in sampling_bench.prompt_batch(tokenizer, 16))
    rows = []
    with torch.no_grad():
        for path in ('hf-generate', 'halos'):
            print(f'sampling: {name} {path}', flush=True)
            measured = timed_tokens(lambda: sampling_bench.sample_once(path, model, tokenizer, ids, mask, options))
            rows.append({'model': name, 'path': path, 'sequences': len(ids) * options.k, **measured})
    if with_vllm:
        print(f'sampling: {name} vllm', flush=True)
        rows.append({'model': name, 'path': 'vllm', 'sequences': len(ids) * options.k,
                     **vllm_tokens(model, tokenizer, ids.cpu(), mask.cpu(), options)})
    return rows


def vllm_tokens(model, tokenizer, ids, mask, options) -> Dict:
    """The same batch through halos' vLLM engine, its weights loaded from the model as training loads them."""
    from halos.sampling import SamplingOptions
    from halos.vllm_engine import VLLMEngine
    sampling = SamplingOptions(max_length=ids.shape[1] + options.max_new_tokens, top_p=options.top_p,
                               temperature=options.temperature, top_k=0, max_new_tokens=options.max_new_tokens)
    engine = VLLMEngine(model, tokenizer, sampling, 'bfloat16', gpu_memory_utilization=0.3)
    engine.load(model)
    batch = {'prompt_input_ids': ids, 'prompt_attention_mask': mask}
    return timed_tokens(lambda: sum(len(s.token_ids) for group in engine.sample(batch, options.k) for s in group))


# ---------------------------------------------------------------- the report

def gist(message: Optional[str]) -> str:
    """A message's last non-empty line, short, safe inside a table cell."""
    lines = [line for line in (message or '').splitlines() if line.strip()]
    return lines[-1][:160].replace('|', '\\|') if lines else ''


def markdown(report: Dict) -> str:
    m = report['machine']
    lines = [f"# GPU check ({report['created']})", '',
             f"Machine: {m.get('gpu', 'no GPU')} ({m.get('gpu_memory_gib', '-')} GiB), CUDA {m.get('cuda', '-')}, "
             f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, TRL {m['trl']}, "
             f"vLLM {m['vllm']}, flash-attn {m['flash-attn']}, Python {m['python']}.",
             f"Command: `{report['command']}`; {report['seconds']:.0f} s.", '']
    tests = report['parts'].get('tests', {})
    if tests.get('status') in ('ran', 'failed'):
        lines += [f"## Tests (`pytest -m gpu`): {tests['passed']} passed, {tests['failed'] + tests['error']} failed, "
                  f"{tests['skipped']} skipped", '', '| test | outcome | message |', '|---|---|---|']
        lines += [f"| {c['test']} | {c['outcome']} | {gist(c['message'])} |" for c in tests['cases']]
        lines.append('')
    training = report['parts'].get('training', {})
    if training.get('rows'):
        lines += ['## Training steps (bf16, random weights)', '',
                  '| model | trainer | side | tokens/s | s/step | peak GPU memory (MiB) | % of bf16 matmul peak |',
                  '|---|---|---|---|---|---|---|']
        for r in training['rows']:
            if 'error' in r:
                lines.append(f"| {r['model']} | {r['trainer']} | {r['side']} | failed: {gist(r['error'])} | | | |")
            else:
                memory = '-' if r['peak_gpu_mib'] is None else f"{r['peak_gpu_mib']:.0f}"
                lines.append(f"| {r['model']} | {r['trainer']} | {r['side']} | {r['tokens_per_s']:.0f} | "
                             f"{r['seconds_per_step']:.3f} | {memory} | {100 * r['fraction_of_matmul_peak']:.1f} |")
        lines.append('')
    sampling = report['parts'].get('sampling', {})
    if sampling.get('rows'):
        lines += ['## Sampling (16 prompts x 4 samples, bf16)', '', '| model | path | new tokens | s | tokens/s |',
                  '|---|---|---|---|---|']
        lines += [f"| {r['model']} | {r['path']} | {r['new_tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} |"
                  for r in sampling['rows']]
        lines.append('')
    lines += ['## Skipped', ''] + ([f"- {s['part']}: {s['what']}: {s['reason']}" for s in report['skipped']] or ['- nothing'])
    broken = [f"- {name}: {part['error']}" for name, part in report['parts'].items() if part.get('error')]
    if broken:
        lines += ['', '## Broken', ''] + broken
    return '\n'.join(lines) + '\n'


def write_report(report: Dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"gpu-{report['created'][:10]}")
    with open(stem + '.json', 'w') as f:
        json.dump(report, f, indent=1)
    with open(stem + '.md', 'w') as f:
        f.write(markdown(report))
    return stem


def run_part(run) -> Dict:
    """A part's result; one that breaks is reported with its traceback (the others still run)."""
    start = time.perf_counter()
    try:
        result = run()
    except Exception:
        result = {'status': 'failed', 'error': traceback.format_exc()[-3000:]}
    result['seconds'] = time.perf_counter() - start
    return result


def run_on_gpu(args: argparse.Namespace, report: Dict, work_dir: str) -> None:
    """The parts asked for, in order: the tests, then the models both benchmarks use, then the benchmarks."""
    parts, skipped = report['parts'], report['skipped']
    if 'tests' in args.parts:
        parts['tests'] = run_part(lambda: run_tests(args, work_dir))
    benchmarks = [part for part in ('training', 'sampling') if part in args.parts]
    if not benchmarks:
        return
    model_dirs = {}
    built = run_part(lambda: {'status': 'ran', 'dirs': model_dirs.update(
        {name: random_model(name, work_dir) for name in args.models})})
    if built['status'] == 'failed':
        for part in benchmarks:
            parts[part] = {'status': 'failed', 'error': 'building the random models failed: ' + built['error']}
        return
    if 'training' in benchmarks:
        parts['training'] = run_part(lambda: {'status': 'ran',
                                              'rows': training_rows(args, model_dirs, work_dir, skipped)})
    if 'sampling' in benchmarks:
        parts['sampling'] = run_part(lambda: {'status': 'ran', 'rows': sampling_rows(args, model_dirs, skipped)})


def pack(directory: str) -> None:
    """Copy what the check reads from $HALOS_HOME (the tiny model: its tokenizer files) to DIR/models/."""
    import models
    source = models.resolve_model_path(TOKENIZER)
    target = os.path.join(directory, 'models', os.path.basename(source))
    shutil.copytree(source, target, dirs_exist_ok=True)
    print(f'{target}: run the check with HALOS_HOME={directory}')


def report_dir(cuda_missing_reason: Optional[str]) -> str:
    """bench/results holds what a GPU measured; a report of parts all skipped goes to runs/."""
    return os.path.join(ROOT, 'runs', 'gpu-check') if cuda_missing_reason else os.path.join(ROOT, 'bench', 'results')


def main(argv=None) -> int:
    args = parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    if args.pack:
        pack(args.pack)
        return 0
    start = time.perf_counter()
    report = {'created': datetime.datetime.now().strftime('%Y-%m-%dT%H-%M-%S'),
              'command': ' '.join(['python', 'scripts/gpu_check.py', *(sys.argv[1:] if argv is None else argv)]),
              'machine': machine(), 'settings': {k: v for k, v in vars(args).items() if k != 'pack'},
              'parts': {}, 'skipped': []}
    skipped, reason = report['skipped'], cuda_missing()
    for part in PARTS:
        if part not in args.parts:
            skipped.append({'part': part, 'what': 'the whole part', 'reason': 'not asked for (--parts)'})
            report['parts'][part] = {'status': 'skipped', 'reason': 'not asked for (--parts)'}
        elif reason:
            skipped.append({'part': part, 'what': 'the whole part', 'reason': reason})
            report['parts'][part] = {'status': 'skipped', 'reason': reason}
    if not reason:
        with tempfile.TemporaryDirectory(prefix='halos-gpu-check-') as work_dir:
            run_on_gpu(args, report, work_dir)
    report['seconds'] = time.perf_counter() - start
    stem = write_report(report, args.out or report_dir(reason))
    print(markdown(report))
    print(f'wrote {stem}.json and {stem}.md')
    failed = any(part.get('status') == 'failed' for part in report['parts'].values()) or any(
        'error' in row for row in report['parts'].get('training', {}).get('rows', []))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
