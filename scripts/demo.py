"""`make demo`: align the embedded SmolLM2-135M-Instruct on the shipped upbeat task and measure the result.

1. SFT on the best of the starting model's 4 samples per train prompt (rejection sampling; data/upbeat).
2. From the SFT checkpoint: DPO on the shipped best-vs-worst pairs, KTO on their outputs as desirable and
   undesirable examples, and two rounds of online DPO (16 prompts x 4 fresh samples from the policy, labelled by
   the reward function). Every method sees half the data of `make quality` at twice its learning rate, so that
   the demo fits in minutes on a 2-core CPU in fp32 and still shows a measured gain.
3. The held-out reward (data/upbeat/test_prompts.jsonl, one sample per prompt, mean ± standard error),
   the KL to the starting model and the length of every model, with `eval.py ++mode=reward`; a table and
   plots next to the training curves.
4. compare.py judging online DPO against SFT through halos' scoring judge server (judge_server.py, the same
   135M model, verdicts constrained to compare.py's JSON schema): a demonstration of the protocol, not a verdict.

Every command is printed, and each is a train.py / eval.py / label.py / compare.py command line to rerun by hand.
A rerun keeps every run measured before (delete its runs/demo/quality_<name> to redo one), resumes one cut
short from its checkpoint, and judges again from the cached judgments.
"""
import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import quality  # noqa: E402  (after the path insert)

RUNS = os.path.join('runs', 'demo')
UPBEAT = os.path.join('data', 'upbeat')
# Half the quality benchmark's data per method at twice its learning rate (4e-5): the same lr x steps.
SFT = quality.Method('sft-best', 'sft', 'best', ('++n_examples=56',))
ALIGNED = (quality.Method('kto', 'kto', 'pairwise', ('++n_examples=48',)),
           quality.Method('dpo', 'dpo', 'pairwise', ('++n_examples=44',)),
           quality.METHODS['online-dpo'])


def has_bf16_matmul() -> bool:
    """Whether this CPU multiplies in bf16 natively (AMX or AVX512-BF16): there bf16 autocast trains and samples
    faster than fp32; elsewhere it would be slower."""
    import torch
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def demo_args():
    precision = ['--autocast-dtype', 'bfloat16'] if has_bf16_matmul() else []
    return quality.parse_args(['--work-dir', RUNS, '--results-dir', os.path.join(ROOT, RUNS), '--tag', 'demo',
                               '--reuse', '--epochs', '1', '--lr', '4e-5', '--rounds', '2', '--prompts-per-round', '16',
                               '--no-round-eval', '--eval-batch-size', '40', *precision])


def best_of_k(run: quality.Runner) -> str:
    """SFT targets: the best of each train prompt's shipped samples (label.py --feedback best)."""
    path = os.path.join(RUNS, 'feedback', 'best.jsonl')
    if not os.path.exists(os.path.join(ROOT, path)):
        run('label.py', os.path.join(UPBEAT, 'samples.jsonl'), path, '--reward-function',
            os.path.join(UPBEAT, 'reward.py') + ':reward', '--feedback', 'best')
    return path


def plot_curves(run_dirs) -> str:
    from halos.curves import plot_training_curves
    return plot_training_curves({name: os.path.join(ROOT, d) for name, d in run_dirs.items()},
                                os.path.join(ROOT, RUNS, 'training_curves.png'))


def judge(run: quality.Runner, candidate: dict, baseline: dict) -> dict:
    """compare.py: the candidate's held-out samples against the baseline's, both orders, through a local judge."""
    from judge_server import scoring_judge_server
    import models
    samples_dir = os.path.join(RUNS, 'rewards')
    with open(os.path.join(ROOT, samples_dir, f"{candidate['exp_name']}.json")) as f:
        head_to_head = json.load(f)
    with open(os.path.join(ROOT, samples_dir, f"{baseline['exp_name']}.json")) as f:
        baseline_samples = json.load(f)['samples']
    for sample, other in zip(head_to_head['samples'], baseline_samples):
        assert sample['prompt_id'] == other['prompt_id'], 'the two runs sampled different prompts'
        sample['baseline'] = other['policy']
    path = os.path.join(RUNS, 'head_to_head.json')
    with open(os.path.join(ROOT, path), 'w') as f:
        json.dump(head_to_head, f, indent=2)
    results = os.path.join(RUNS, 'results.jsonl')
    if os.path.exists(os.path.join(ROOT, results)):
        os.remove(os.path.join(ROOT, results))  # this run's result line only; the judgments stay cached
    judge_model = models.embedded_model_dir('smollm2-135m-instruct')
    with scoring_judge_server(judge_model) as base_url:
        run('compare.py', '-f', path, '-ck', 'policy', '-bk', 'baseline', '-r', results, '-mc', '8', '--base-url',
            base_url, '-j', judge_model, '-st', '0', '-v', 'false', '--both-orders')
    run('visualize.py', results, '-o', os.path.join(RUNS, 'win_rates.png'))
    with open(os.path.join(ROOT, results)) as f:
        return json.loads(f.read().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> None:
    from halos.errors import ArgumentParser, reported_as_one_line
    ArgumentParser(prog='demo.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
                   ).parse_args(argv)
    with reported_as_one_line('demo.py'):
        run_demo()


def run_demo() -> None:
    invoked = time.time()
    args, run = demo_args(), quality.Runner()
    earlier = quality.earlier_report(args, 'demo')  # a rerun keeps what an earlier one measured
    started = quality.wall_start(earlier)
    run.commands = list(earlier['commands']) if earlier else []
    n_prompts = quality.count_lines(args.prompts_train)
    feedback = {'samples': os.path.join(UPBEAT, 'samples.jsonl'), 'pairwise': os.path.join(UPBEAT, 'pairs.jsonl'),
                'best': best_of_k(run)}
    budget = quality.count_lines(feedback['samples'])
    start = earlier['start'] if earlier else quality.held_out_reward(run, args, quality.start_overrides(args, 'start'))
    sft = quality.measured(run, args, earlier, SFT, budget, n_prompts, feedback)
    args.load_from = os.path.join(quality.run_dir(args, 'sft-best'), 'LATEST', 'policy.pt')
    aligned = [quality.measured(run, args, earlier, method, budget, n_prompts, feedback) for method in ALIGNED]
    args.load_from = None  # the table's starting model: the base model
    report = quality.report_of(args, start, [sft, *aligned], run.commands, budget, n_prompts, 0.0, started, {})
    stem = quality.write_report(report, args.results_dir, 'demo')
    curves = plot_curves({row['method']: quality.run_dir(args, row['method']) for row in [sft, *aligned]})
    verdict = judge(run, aligned[-1], sft)
    print(quality.markdown(report).split('## Commands')[0])
    print('SFT-on-best starts from the starting model; KTO, DPO and online DPO start from the SFT checkpoint. '
          'The gain is measured against the starting model; the KL of KTO, DPO and online DPO is to the SFT '
          'checkpoint they started from.\n')
    rate = 'n/a (nothing judged)' if verdict['win_rate'] is None else \
        f"{verdict['win_rate']:.2f} (95% CI {verdict['win_rate_ci95'][0]:.2f}-{verdict['win_rate_ci95'][1]:.2f})"
    print(f"compare.py, online DPO vs SFT on {verdict['total']} held-out prompts in both orders"
          f" (judge: SmolLM2-135M-Instruct through judge_server.py, schema-constrained; a protocol demonstration, not a "
          f"verdict): win rate {rate}; wins {verdict['wins']}, losses {verdict['losses']}, ties {verdict['ties']}, "
          f"failures {verdict['failures']}")
    print(f'\nArtifacts in {RUNS}/: checkpoints and HF exports (<run>/LATEST/policy.pt, <run>/LATEST/hf), held-out '
          f'samples with their rewards (rewards/<run>.json), {os.path.relpath(stem, ROOT)}.md|json, '
          f'quality-demo-reward.png, quality-demo-frontier.png, {os.path.relpath(curves, ROOT)}, '
          f'online DPO\'s rounds/ (samples, feedback), results.jsonl and win_rates.png')
    print(f'\ndemo finished in {time.time() - invoked:.0f} s')


if __name__ == '__main__':
    main()
