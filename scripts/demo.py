"""The HALOs loop on the embedded SmolLM2-135M-Instruct and the shipped sample data (run by `make demo`).

SFT on HH, then KTO from the SFT checkpoint, then samples from both with eval.py, then compare.py
judging KTO against SFT (and both against the human-chosen replies) through a local llama.cpp judge
server that the demo starts and stops; plots the training curves and the win rates and prints where
every artifact is. Re-running reuses the converted model and the judgments already made.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, 'runs', 'demo')
SAMPLES = os.path.join(RUNS, 'samples')
RESULTS = os.path.join(RUNS, 'results.jsonl')
sys.path.insert(0, ROOT)


def run(script: str, *args: str) -> None:
    command = [sys.executable, os.path.join(ROOT, script), *args]
    print('\n$ ' + ' '.join(command[1:]), flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    print(f'({time.time() - started:.0f} s)', flush=True)


def train(loss: str, exp_name: str, *extra: str) -> None:
    run('train.py', f'loss={loss}', 'model=smollm2', 'datasets=[hh]', f'exp_name={exp_name}', 'mode=train',
        '++data_dir=data', f'++cache_dir={RUNS}', '++n_examples=32', '++eval_every=16', '++n_eval_examples=8',
        '++optimizer=AdamW', '++lr=5e-6', '++warmup_steps=2', '++wandb.enabled=false', *extra)


def sample(exp_name: str) -> str:
    run('eval.py', f'--config-path={os.path.join(RUNS, exp_name)}', '++mode=sample', '++n_samples=8',
        '++model.eval_batch_size=4', '++model.max_length=320', f'++samples_dir={SAMPLES}')
    return os.path.join(SAMPLES, f'{exp_name}.json')


def head_to_head_file(kto_samples: str, sft_samples: str) -> str:
    """One samples file with the KTO policy's, the SFT policy's and the human-chosen reply per prompt
    (eval.py samples the same prompts in the same order for a given seed)."""
    with open(kto_samples) as f:
        kto = json.load(f)
    with open(sft_samples) as f:
        sft = json.load(f)['samples']
    for kto_sample, sft_sample in zip(kto['samples'], sft):
        assert kto_sample['prompt'] == sft_sample['prompt'], 'the two runs sampled different prompts'
        kto_sample['sft'] = sft_sample['policy']
    path = os.path.join(SAMPLES, 'kto_vs_sft.json')
    with open(path, 'w') as f:
        json.dump(kto, f, indent=2)
    return path


def judge(samples: str) -> list:
    """compare.py through a local judge server: KTO vs SFT, KTO vs chosen, SFT vs chosen (both orders)."""
    from judge_server import local_judge_server
    if os.path.exists(RESULTS):
        os.remove(RESULTS)  # the result lines of this run only; individual judgments stay cached
    matchups = [('policy', 'sft'), ('policy', 'chosen'), ('sft', 'chosen')]
    with local_judge_server() as base_url:
        for candidate, baseline in matchups:
            run('compare.py', '-f', samples, '-ck', candidate, '-bk', baseline, '-r', RESULTS, '-mc', '8',
                '--base-url', base_url, '-j', 'smollm2-135m-instruct', '-st', '0', '-v', 'false', '--both-orders')
    with open(RESULTS) as f:
        return [json.loads(line) for line in f]


def plot_curves(exp_names) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(exp_names), figsize=(5 * len(exp_names), 3.5))
    for axis, exp_name in zip(axes, exp_names):
        with open(os.path.join(RUNS, exp_name, 'metrics.jsonl')) as f:
            records = [json.loads(line) for line in f]
        for key in ('loss/train', 'loss/eval'):
            points = [(r['step'], r[key]) for r in records if key in r]
            if points:
                axis.plot(*zip(*points), marker='o', label=key)
        axis.set_title(exp_name)
        axis.set_xlabel('training examples')
        axis.legend()
    path = os.path.join(RUNS, 'training_curves.png')
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def main() -> None:
    started = time.time()
    train('sft', 'smollm2_sft')
    train('kto', 'smollm2_kto', f'++model.load_from={os.path.join(RUNS, "smollm2_sft", "LATEST", "policy.pt")}')
    samples = [sample('smollm2_sft'), sample('smollm2_kto')]
    curves = plot_curves(['smollm2_sft', 'smollm2_kto'])
    results = judge(head_to_head_file(samples[1], samples[0]))
    win_rates = os.path.join(RUNS, 'win_rates.png')
    run('visualize.py', RESULTS, '-o', win_rates)
    with open(samples[1]) as f:
        first = json.load(f)['samples'][0]
    print('\nArtifacts')
    for exp_name in ('smollm2_sft', 'smollm2_kto'):
        print(f'  {exp_name}: checkpoint {os.path.join(RUNS, exp_name, "LATEST", "policy.pt")}, '
              f'HF export {os.path.join(RUNS, exp_name, "LATEST", "hf")}')
    print(f'  samples: {samples[0]}, {samples[1]}')
    print(f'  training curves: {curves}')
    print(f'  judgments: {RESULTS} (result lines), win rates: {win_rates}')
    print('\nWin rates (judge: SmolLM2-135M-Instruct, a protocol check rather than a verdict)')
    names = {'policy': 'KTO', 'sft': 'SFT', 'chosen': 'human-chosen'}
    for result in results:
        rate = 'n/a (nothing judged)' if result['win_rate'] is None else \
            f"{result['win_rate']:.2f} (95% CI {result['win_rate_ci95'][0]:.2f}-{result['win_rate_ci95'][1]:.2f})"
        print(f"  {names[result['candidate']['name']]} vs {names[result['baseline']['name']]}: {rate}; "
              f"wins {result['wins']}, losses {result['losses']}, ties {result['ties']}, failures {result['failures']}")
    print(f'\nA KTO sample:\n  prompt: {first["prompt"].strip()[:200]!r}\n  policy: {first["policy"].strip()[:300]!r}')
    print(f'\ndemo finished in {time.time() - started:.0f} s')


if __name__ == '__main__':
    main()
