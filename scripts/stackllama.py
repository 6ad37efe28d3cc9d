"""The classic RLHF pipeline (StackLLaMA) on the embedded SmolLM2-135M-Instruct and the shipped HH and SHP
samples: SFT, then a Bradley-Terry reward model trained on preference pairs from the SFT model, then online
PPO against that reward model with a KL penalty to the SFT model. Prints the reward model's held-out
accuracy, the held-out score of the SFT and the PPO policies (mean +- SE under the reward model), the PPO
policy's KL to the SFT model and the wall time of every stage, and the train.py commands it ran.

    python scripts/stackllama.py [--runs runs/stackllama] [--ppo-examples 96] [--ppo-lr 5e-5] [--new-tokens 48]

Rerunning reuses the stages already trained (delete the run directory to start over).
"""
import argparse
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATASETS = '[hh,shp]'

from halos.errors import wait_passing_stops  # noqa: E402  (after the path insert)


def train(runs: str, loss: str, exp_name: str, *extra: str) -> float:
    """train.py for one stage (skipped when its final checkpoint exists); returns its wall time (a skipped
    stage's as recorded when it ran)."""
    wall_time_file = os.path.join(runs, exp_name, 'wall_seconds.txt')
    if os.path.isdir(os.path.join(runs, exp_name, 'LATEST', 'hf')):
        print(f'{exp_name}: already trained in {runs}/{exp_name}')
        return float(open(wall_time_file).read()) if os.path.exists(wall_time_file) else float('nan')
    command = [sys.executable, os.path.join(ROOT, 'train.py'), f'loss={loss}', 'model=smollm2', f'datasets={DATASETS}',
               f'exp_name={exp_name}', 'mode=train', '++data_dir=data', f'++cache_dir={runs}', '++wandb.enabled=false',
               '++optimizer=AdamW', '++model.max_length=384', '++model.max_prompt_length=256', *extra]
    print('\n$ ' + ' '.join(command[1:]), flush=True)
    started = time.time()
    code = wait_passing_stops(subprocess.Popen(command, cwd=ROOT).pid)
    if code:
        raise subprocess.CalledProcessError(code, command)
    with open(wall_time_file, 'w') as f:
        f.write(f'{time.time() - started:.1f}')
    return time.time() - started


def last_eval(run_dir: str, name: str) -> float:
    import json
    values = [record[name] for record in map(json.loads, open(os.path.join(run_dir, 'metrics.jsonl'))) if name in record]
    return values[-1]


def held_out_scores(runs: str, new_tokens: int, seed: int):
    """Samples of the SFT and PPO policies on the held-out prompts: their reward-model scores, and the PPO
    samples' summed log-ratio to the SFT model (its KL estimate)."""
    import torch
    from hydra import compose, initialize_config_dir

    import dataloader
    import models
    from halos import rl
    from halos import batch as schema
    from halos.build import build_loader, run_settings
    from halos.labelers import RewardModelLabeler
    from halos.sampling import SamplingOptions, halos_sampler

    with initialize_config_dir(config_dir=os.path.join(ROOT, 'config'), version_base=None):
        config = compose('config', overrides=['loss=sft', 'model=smollm2', f'datasets={DATASETS}', 'exp_name=held_out',
                                              'mode=sample',
                                              '++data_dir=data', '++model.max_length=384',
                                              '++model.max_prompt_length=256'])
    config = run_settings(config)
    tokenizer = models.load_tokenizer(os.path.join(runs, 'sft', 'LATEST', 'hf'))
    prompts = build_loader(config, tokenizer, 'test', loader_class=dataloader.PromptDataLoader, batch_size=8,
                           n_epochs=1, n_examples=None)
    reward_model = RewardModelLabeler(os.path.join(runs, 'rm', 'LATEST', 'hf'), 'float32', 384, torch.device('cpu'))
    policies = {name: models.load_causal_lm(os.path.join(runs, name, 'LATEST', 'hf'), 'float32').eval()
                for name in ('sft', 'ppo')}
    options = SamplingOptions(384, top_p=1.0, temperature=1.0, top_k=0, max_new_tokens=new_tokens, seed=seed)
    scores, kl = {name: [] for name in policies}, []
    no_autocast = torch.autocast('cpu', enabled=False)
    for name, policy in policies.items():
        torch.manual_seed(seed)
        for batch in prompts:
            samples = [group[0] for group in halos_sampler(policy, tokenizer, options)(batch, 1)]
            scores[name] += reward_model(batch[schema.PROMPT_AS_GIVEN], [sample.text for sample in samples],
                                         batch[schema.PROMPT_EXTRA])
            if name == 'ppo':
                rows = rl.rollout_sequences(batch[schema.PROMPT_INPUT_IDS], batch[schema.PROMPT_ATTENTION_MASK],
                                            [sample.token_ids for sample in samples], tokenizer.pad_token_id)
                logps = {other: rl.token_logps(policies[other], rows.input_ids, rows.attention_mask, rows.labels,
                                               lambda: no_autocast).sum(-1) for other in policies}
                kl += (logps['ppo'] - logps['sft']).tolist()
    return scores, kl


def summary(values) -> str:
    return f'{statistics.fmean(values):.3f} +- {statistics.stdev(values) / math.sqrt(len(values)):.3f} (n={len(values)})'


def main() -> None:
    from halos.errors import ArgumentParser, positive_int, positive_number, reported_as_one_line
    parser = ArgumentParser(prog='stackllama.py', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', default=os.path.join(ROOT, 'runs', 'stackllama'))
    parser.add_argument('--ppo-examples', type=positive_int, default=96, help='prompts PPO trains on (one sample each)')
    parser.add_argument('--ppo-lr', type=positive_number, default=5e-5)
    parser.add_argument('--new-tokens', type=positive_int, default=48, help='the longest sample, in new tokens')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    with reported_as_one_line('stackllama.py'):
        run_pipeline(args)


def run_pipeline(args) -> None:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('WANDB_MODE', 'disabled')
    runs = os.path.abspath(args.runs)
    started = time.time()
    times = {
        'sft': train(runs, 'sft', 'sft', '++n_epochs=2', '++lr=1e-5', '++eval_every=64', '++n_eval_examples=24'),
        'rm': train(runs, 'bradley-terry', 'rm', '++model.load_from=sft/LATEST/hf', '++n_epochs=3', '++lr=1e-5',
                    '++eval_every=64', '++n_eval_examples=24'),
        'ppo': train(runs, 'ppo-online', 'ppo', '++model.load_from=sft/LATEST/hf',
                     f'++loss.reward_model={runs}/rm/LATEST/hf', f'++n_examples={args.ppo_examples}', '++n_epochs=null',
                     '++model.batch_size=8', f'++max_new_tokens={args.new_tokens}', '++top_p=1.0', '++temperature=1.0',
                     '++top_k=0', f'++lr={args.ppo_lr}', '++eval_every=100000', '++n_eval_examples=8', '++do_first_eval=false'),
    }
    evaluation_started = time.time()
    scores, kl = held_out_scores(runs, args.new_tokens, args.seed)
    times['held-out sampling'] = time.time() - evaluation_started
    print('\n=== StackLLaMA pipeline on SmolLM2-135M-Instruct (HH + SHP samples) ===')
    print(f"reward model held-out accuracy: {last_eval(os.path.join(runs, 'rm'), 'rewards_eval/accuracies'):.3f} "
          f"(margin {last_eval(os.path.join(runs, 'rm'), 'rewards_eval/margins'):.3f})")
    print(f"held-out RM score, SFT policy: {summary(scores['sft'])}")
    print(f"held-out RM score, PPO policy: {summary(scores['ppo'])}")
    print(f"KL(PPO || SFT) on the PPO samples (mean summed log-ratio): {summary(kl)}")
    print('wall time: ' + ', '.join(f'{stage} {seconds:.0f} s' for stage, seconds in times.items())
          + f'; total {time.time() - started:.0f} s')


if __name__ == '__main__':
    main()
