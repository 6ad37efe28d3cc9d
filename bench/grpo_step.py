"""One online GRPO step, halos against TRL's GRPOTrainer: sample k completions for each of P prompts from the
policy, score them with a reward function, and make mu optimizer updates on them.

    python bench/grpo_step.py                 # SmolLM2, 8 upbeat prompts x k=4, 48 new tokens, 2 runs per side
    python bench/grpo_step.py --smoke         # the tiny model, for a quick check

Both sides get the same model directory (fp32), prompts (the first P of data/upbeat/train_prompts.jsonl,
chat-formatted), reward (data/upbeat/reward.py:reward), k, completion length, temperature 0.7, top-p 0.95,
no top-k, fused AdamW (as halos builds it) at the same learning rate, beta (KL weight) 0.01, clip epsilon 0.2,
the `grpo` reduction, and mu updates (--mu, TRL's num_iterations) on all P x k completions. halos runs one
step of standard GRPO (`train.py loss=grpo-online`: halos' sampler, the reward labeler, the old policy = the
policy that sampled, the k3 KL to the starting model): the loop's train_step alone, without a
checkpoint, since TRL's run saves nothing; TRL runs `GRPOTrainer.train()` for max_steps=mu with HF generate.
Each side runs in its own process, alternating; the wall time of the step (sampling + scoring + updates; model
loading excluded) is the best of --runs.

Writes bench/results/grpo-<timestamp>.{json,md} and grpo-latest.{json,md}.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from common import RETAIN_FREED_MEMORY_ENV, ROOT, with_defaults

FULL = dict(model='embedded:smollm2-135m-instruct', prompts=8, k=4, max_new_tokens=48, runs=2)
SMOKE = dict(model='embedded:tiny-smollm2', prompts=2, k=2, max_new_tokens=8, runs=1)
SIDES = ('halos', 'trl')
UPBEAT = os.path.join(ROOT, 'data', 'upbeat')
LR, BETA, EPSILON, TEMPERATURE, TOP_P = 2e-5, 0.01, 0.2, 0.7, 0.95


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true', help=f'small settings for a quick check: {SMOKE}')
    parser.add_argument('--model')
    parser.add_argument('--prompts', type=int)
    parser.add_argument('--k', type=int)
    parser.add_argument('--max-new-tokens', type=int)
    parser.add_argument('--runs', type=int)
    parser.add_argument('--mu', type=int, default=1, help='optimizer updates on each sampled batch')
    parser.add_argument('--trl-retains-memory', action='store_true',
                        help="give TRL's process the allocator settings halos applies itself (retain_freed_memory)")
    parser.add_argument('--side', choices=SIDES, help=argparse.SUPPRESS)  # one run of one side (internal)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    parser.add_argument('--out-dir', help='where the report goes (default bench/results; under --smoke, '
                                              'runs/bench-smoke)')
    args = with_defaults(parser.parse_args(argv), FULL, SMOKE)
    return args


def prompts_file(n: int, directory: str) -> str:
    """The first n upbeat train prompts, as a prompts file."""
    path = os.path.join(directory, 'prompts.jsonl')
    with open(os.path.join(UPBEAT, 'train_prompts.jsonl')) as source, open(path, 'w') as f:
        f.writelines(line for _, line in zip(range(n), source))
    return path


def halos_step(args, work_dir: str) -> dict:
    from common import compose_config
    from halos.build import build_trainer
    config = compose_config([
        'loss=grpo-online', 'model=smollm2', f'++model.name_or_path={args.model}', '++model.policy_dtype=float32',
        '++model.reference_dtype=float32', '++model.activation_checkpointing=false', f'++cache_dir={work_dir}',
        'exp_name=grpo_step', 'mode=train', f'datasets=[{prompts_file(args.prompts, work_dir)}]',
        f'++online.samples_per_prompt={args.k}', f"++online.reward_function={os.path.join(UPBEAT, 'reward.py')}:reward",
        f'++model.batch_size={args.prompts}', '++n_epochs=null', f'++n_examples={args.prompts}', f'++lr={LR}',
        '++optimizer=AdamW', '++warmup_steps=0', f'++loss.beta={BETA}', f'++loss.epsilon={EPSILON}',
        f'++loss.mu={args.mu}', '++loss.loss_type=grpo', f'++max_new_tokens={args.max_new_tokens}',
        f'++temperature={TEMPERATURE}', f'++top_p={TOP_P}', '++top_k=0', '++use_chat_template=true',
        '++do_first_eval=false', '++eval_every=1000000', '++n_eval_examples=0', '++wandb.enabled=false',
        '++minimum_log_interval_secs=0'])
    trainer = build_trainer(config)
    batch = next(iter(trainer.train_iterator))
    trainer.policy.train()  # as the loop's train() leaves it
    start = time.perf_counter()
    trainer.train_step([batch])  # the step alone: no checkpoint (TRL's writes none), and timed whatever the scores
    return {'seconds': time.perf_counter() - start, 'completions': args.prompts * args.k, 'steps': trainer.batch_counter}


def upbeat_reward(prompts, completions, **_):
    """TRL's reward-function signature around data/upbeat/reward.py:reward (conversational completions)."""
    sys.path.insert(0, UPBEAT)
    from reward import reward
    return [reward(prompt, completion[0]['content']) for prompt, completion in zip(prompts, completions)]


def trl_step(args, work_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    import models
    path = models.resolve_model_path(args.model)
    with open(prompts_file(args.prompts, work_dir)) as f:
        rows = [{'prompt': [{'role': 'user', 'content': json.loads(line)['prompt']}]} for line in f]
    n = args.prompts * args.k
    config = GRPOConfig(output_dir=work_dir, per_device_train_batch_size=n, num_generations=args.k, max_steps=args.mu,
                        max_completion_length=args.max_new_tokens, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                        learning_rate=LR, lr_scheduler_type='constant', optim='adamw_torch_fused', weight_decay=0.0,
                        beta=BETA, epsilon=EPSILON, loss_type='grpo', num_iterations=args.mu, logging_steps=1,
                        save_strategy='no', report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False,
                        gradient_checkpointing=False, dataloader_num_workers=0, seed=1)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                          reward_funcs=upbeat_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(path))
    start = time.perf_counter()
    trainer.train()
    return {'seconds': time.perf_counter() - start, 'completions': n, 'steps': trainer.state.global_step}


def run_side(side: str, args) -> dict:
    """One run of `side` in its own process."""
    with tempfile.TemporaryDirectory(prefix=f'grpo_{side}_') as work_dir:
        out = os.path.join(work_dir, 'result.json')
        command = [sys.executable, os.path.abspath(__file__), '--side', side, '--out', out, '--model', args.model,
                   '--prompts', str(args.prompts), '--k', str(args.k), '--max-new-tokens', str(args.max_new_tokens),
                   '--mu', str(args.mu)]
        env = dict(os.environ, **(RETAIN_FREED_MEMORY_ENV if side == 'trl' and args.trl_retains_memory else {}))
        subprocess.run(command, check=True, cwd=ROOT, env=env)
        with open(out) as f:
            return json.load(f)


def write_report(report: dict, out_dir: str) -> str:
    best = {side: min(r['seconds'] for r in report['runs'][side]) for side in SIDES}
    lines = [f"# One online GRPO step, halos vs TRL ({report['timestamp']})", '',
             f"Machine: {report['machine']}. Model `{report['model']}`, float32; {report['prompts']} prompts x "
             f"k = {report['k']}, {report['max_new_tokens']} new tokens at most, temperature {TEMPERATURE}, top-p {TOP_P}; "
             f"{report['mu']} AdamW update(s) (lr {LR}, beta {BETA}, epsilon {EPSILON}) on all completions; best of "
             f"{report['n_runs']} runs per side, model loading excluded; freed memory: halos keeps it in the process, TRL "
             f"{'the same, from the environment' if report.get('trl_retains_memory') else 'on the glibc default'}.",
             f"Command: `{report['command']}`", '',
             '| side | step seconds (best) | runs | completions/s |', '|---|---|---|---|']
    for side in SIDES:
        seconds = [f"{r['seconds']:.1f}" for r in report['runs'][side]]
        lines.append(f"| {side} | {best[side]:.1f} | {', '.join(seconds)} | {report['completions'] / best[side]:.2f} |")
    lines += ['', f"halos/TRL speed: **{best['trl'] / best['halos']:.2f}x**"]
    text = '\n'.join(lines) + '\n'
    os.makedirs(out_dir, exist_ok=True)
    for stem in (f"grpo-{report['timestamp']}", 'grpo-latest'):
        with open(os.path.join(out_dir, stem + '.md'), 'w') as f:
            f.write(text)
        with open(os.path.join(out_dir, stem + '.json'), 'w') as f:
            json.dump(report, f, indent=1)
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.side:
        with tempfile.TemporaryDirectory() as work_dir:
            result = (halos_step if args.side == 'halos' else trl_step)(args, work_dir)
        with open(args.out, 'w') as f:
            json.dump(result, f)
        return
    import torch
    report = {'timestamp': datetime.datetime.now().strftime('%Y%m%dT%H%M%S'), 'model': args.model,
              'machine': f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              'command': 'python bench/grpo_step.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
              'prompts': args.prompts, 'k': args.k, 'max_new_tokens': args.max_new_tokens, 'n_runs': args.runs,
              'mu': args.mu,
              'completions': args.prompts * args.k, 'trl_retains_memory': args.trl_retains_memory,
              'runs': {side: [] for side in SIDES}}
    for _ in range(args.runs):
        for side in SIDES:
            report['runs'][side].append(run_side(side, args))
    print(write_report(report, args.out_dir))


if __name__ == '__main__':
    main()
