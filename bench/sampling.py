"""Sampling throughput: HF `generate` with its defaults against halos' decoding loop, same model, prompts,
k, lengths and warpers.

    python bench/sampling.py                      # SmolLM2, 16 prompts x k=4, 64 new tokens, 2 runs
    python bench/sampling.py --smoke              # the tiny model, for the test suite

Every path decodes exactly --max-new-tokens tokens per sample (EOS is not allowed to stop a sample: HF's
`min_new_tokens`, halos' loop with no EOS), so each does the same work; tokens/s = prompts x k x new
tokens / wall seconds, the best of --runs. Paths:

    hf-generate   model.generate(do_sample, temperature, top_p, num_return_sequences=k): each prompt's k
                  copies are prefilled separately, as generate does
    halos         halos.sampling.decode: one prefill per prompt, its KV cache repeated for the k samples
    halos-bf16    the same under torch.autocast(bfloat16), `++sampling_dtype=bfloat16` (not full precision)

All paths run in one process that keeps freed memory (utils.retain_freed_memory, as train.py and eval.py
do), so HF generate gets it too.

Writes bench/results/sampling-<timestamp>.{json,md} and sampling-latest.{json,md}.
"""
import argparse
import datetime
import json
import os
import platform
import time

from common import ROOT, with_defaults

FULL = dict(model='embedded:smollm2-135m-instruct', prompts=16, k=4, max_new_tokens=64, runs=2)
SMOKE = dict(model='embedded:tiny-smollm2', prompts=4, k=2, max_new_tokens=8, runs=1)
PATHS = ('hf-generate', 'halos', 'halos-bf16')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true', help=f'small settings for a quick check: {SMOKE}')
    parser.add_argument('--model')
    parser.add_argument('--prompts', type=int, help='prompts per batch (from data/upbeat/train_prompts.jsonl)')
    parser.add_argument('--k', type=int, help='samples per prompt')
    parser.add_argument('--max-new-tokens', type=int)
    parser.add_argument('--runs', type=int, help='timed runs per path (the best is reported)')
    parser.add_argument('--paths', nargs='+', default=list(PATHS), choices=PATHS)
    parser.add_argument('--temperature', type=float, default=0.7)
    parser.add_argument('--top-p', type=float, default=0.95)
    parser.add_argument('--out-dir', help='where the report goes (default bench/results; under --smoke, '
                                              'runs/bench-smoke)')
    args = with_defaults(parser.parse_args(argv), FULL, SMOKE)
    return args


def prompt_batch(tokenizer, n: int):
    """The first n upbeat train prompts, chat-formatted and left-padded: (ids [n, P], mask [n, P])."""
    with open(os.path.join(ROOT, 'data', 'upbeat', 'train_prompts.jsonl')) as f:
        prompts = [json.loads(line)['prompt'] for line in f][:n]
    texts = [tokenizer.apply_chat_template([{'role': 'user', 'content': p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tokenizer.padding_side = 'left'
    encoded = tokenizer(texts, return_tensors='pt', padding=True, add_special_tokens=False)
    return encoded['input_ids'], encoded['attention_mask']


def sample_once(path: str, model, tokenizer, ids, mask, args) -> int:
    """Decode one batch on `path`; returns the number of new tokens."""
    from halos.sampling import SamplingOptions, decode
    if path == 'hf-generate':
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                             top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.max_new_tokens, num_return_sequences=args.k,
                             pad_token_id=tokenizer.pad_token_id)
        return out[:, ids.shape[1]:].numel()
    options = SamplingOptions(max_length=ids.shape[1] + args.max_new_tokens, top_p=args.top_p,
                              temperature=args.temperature, top_k=0, max_new_tokens=args.max_new_tokens,
                              autocast_dtype='bfloat16' if path == 'halos-bf16' else None)
    decoded = decode(model, ids, mask, args.k, options, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    return decoded.tokens.numel()


def measure(path: str, model, tokenizer, ids, mask, args) -> dict:
    import torch
    sample_once(path, model, tokenizer, ids[:1], mask[:1], args)  # warm-up
    seconds, tokens = [], 0
    for run in range(args.runs):
        torch.manual_seed(run)
        start = time.perf_counter()
        tokens = sample_once(path, model, tokenizer, ids, mask, args)
        seconds.append(time.perf_counter() - start)
    return {'path': path, 'new_tokens': tokens, 'seconds': seconds, 'tokens_per_second': tokens / min(seconds)}


def write_report(report: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    baseline = next((r['tokens_per_second'] for r in report['rows'] if r['path'] == 'hf-generate'), None)
    lines = [f"# Sampling throughput ({report['timestamp']})", '',
             f"Machine: {report['machine']}. Model `{report['model']}`, float32 weights, {report['prompts']} prompts x "
             f"k = {report['k']}, {report['max_new_tokens']} new tokens per sample, temperature "
             f"{report['temperature']}, top-p {report['top_p']}; best of {report['runs']} runs.",
             f"Command: `{report['command']}`", '',
             '| path | new tokens | seconds (best) | tokens/s | vs hf-generate |', '|---|---|---|---|---|']
    for row in report['rows']:
        ratio = f"{row['tokens_per_second'] / baseline:.2f}x" if baseline else '–'
        lines.append(f"| {row['path']} | {row['new_tokens']} | {min(row['seconds']):.1f} | "
                     f"{row['tokens_per_second']:.1f} | {ratio} |")
    text = '\n'.join(lines) + '\n'
    stem = os.path.join(out_dir, f"sampling-{report['timestamp']}")
    for name in (stem, os.path.join(out_dir, 'sampling-latest')):
        with open(name + '.md', 'w') as f:
            f.write(text)
        with open(name + '.json', 'w') as f:
            json.dump(report, f, indent=1)
    return text


def main(argv=None) -> dict:
    import sys
    import torch
    import models
    import utils
    args = parse_args(argv)
    utils.retain_freed_memory()
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_causal_lm(args.model, 'float32').eval()
    ids, mask = prompt_batch(tokenizer, args.prompts)
    report = {'timestamp': datetime.datetime.now().strftime('%Y%m%dT%H%M%S'), 'model': args.model,
              'machine': f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                         f"({torch.get_num_threads()} threads)",
              'command': 'python bench/sampling.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
              **{key: getattr(args, key) for key in ('prompts', 'k', 'max_new_tokens', 'runs', 'temperature', 'top_p')},
              'rows': []}
    with torch.no_grad():
        for path in args.paths:
            report['rows'].append(measure(path, model, tokenizer, ids, mask, args))
            print(write_report(report, args.out_dir))
    return report


if __name__ == '__main__':
    main()
