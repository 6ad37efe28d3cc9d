"""The quality benchmark (`make quality`): from one starting model and one budget of labelled samples, does
each alignment method make the model better at a task, and at what KL and wall time?

    python bench/quality.py                          # the upbeat task (data/upbeat) on SmolLM2-135M-Instruct
    python bench/quality.py --prompts-train P.jsonl --prompts-test Q.jsonl --reward-function file.py:fn

The budget is k samples of every train prompt drawn from the starting model and scored by the reward
function (eval.py ++mode=sample, then label.py). Offline methods train on feedback built from them: SFT on
the best of k (`best`, rejection sampling), DPO, IPO and SimPO on the best-vs-worst pairs (`pairwise`), KTO
on the same pairs' outputs as desirable and undesirable examples (as HALOs flattens paired data; labels at
each prompt's median, `binary`, are noisier: KTO gained 1.5 SE on them), GRPO on the scored groups (`scalar`). Online DPO
spends the same budget over rounds of fresh samples from the policy (rounds x prompts_per_round x k <= the
budget); online PPO draws one rollout per prompt per step, as many rollouts as the budget; GRPO in HALOs' form
runs those rounds on scalar feedback; the step-level methods (GRPO as TRL and DeepSeek define it, Dr. GRPO,
DAPO, GSPO, RLOO, REINFORCE++) sample k completions of each prompt of every step, budget / k prompts in all.
Every policy is measured on the held-out prompts by `eval.py ++mode=reward`: one sample per prompt, the mean
reward and its standard error, the KL to the starting model (the samples' mean summed log-ratio) and the mean
length.

With --sweep every method first trains once per configuration of its grid (learning rate x its main
coefficient) on the train prompts less a validation split (the last --val-prompts of them; never the held-out
prompts) and is scored on that split; the configuration with the best validation reward (of equals, the lowest
KL) then trains on all the train prompts and is measured on the held-out ones. The report lists every
configuration tried.

Writes bench/results/quality-<tag>.md and .json, quality-<tag>-reward.png (held-out reward against the labelled
samples consumed) and quality-<tag>-frontier.png (reward against KL), and prints every command it ran: each
is a train.py, eval.py or label.py command line a user can rerun by hand.
"""
import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, 'config')
UPBEAT = os.path.join(ROOT, 'data', 'upbeat')
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

from halos.errors import (ArgumentParser, ConfigError, non_negative_int,  # noqa: E402  (after the path insert)
                          non_negative_number, positive_int, positive_number, reported_as_one_line,
                          wait_passing_stops)
from halos.jsonl import append_json_lines, read_json_lines, write_text  # noqa: E402
from halos.labelers import reward_function_labeler  # noqa: E402


STEP_LEVEL = ('grpo-online', 'dr-grpo', 'dapo', 'gspo', 'rloo', 'reinforce-pp')  # losses that sample every step


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table: the loss it trains, the offline feedback it reads (None: it samples its own,
    online) and its own overrides."""
    name: str
    loss: str
    feedback: Optional[str]
    overrides: Sequence[str] = ()


METHODS = {method.name: method for method in (
    Method('sft-best', 'sft', 'best'),
    Method('dpo', 'dpo', 'pairwise'),
    Method('ipo', 'ipo', 'pairwise'),
    Method('simpo', 'simpo', 'pairwise'),
    Method('kto', 'kto', 'pairwise'),  # each pair's outputs as one desirable and one undesirable (as in HALOs)
    Method('grpo', 'grpo', 'scalar', ('++n_epochs=1',)),  # one pass: more steps than 2 epochs of pairs
    Method('online-dpo', 'dpo', None, ('++online.feedback=pairwise', '++online.pair_mode=max',
                                       '++online.reference=previous')),
    Method('online-ppo', 'ppo-online', None, ('++n_epochs=null', '++loss.whiten_scores=true', '++model.batch_size=8',
                                              '++loss.ppo_epochs=2')),
    Method('grpo-rounds', 'grpo', None, ('++online.feedback=scalar', '++online.reference=previous')),  # HALOs' form
    *(Method(loss, loss, None, ('++model.batch_size=8',)) for loss in STEP_LEVEL),
)}
# The sweep's grid: the learning rates x each method's main coefficient. The methods that sample as they train
# take a few larger steps on the same budget, so their learning rates start higher; HALOs' GRPO in rounds clips
# its ratio to the previous round's policy, which holds every round's move small, so its grid reaches higher.
SWEEP_LRS = {'default': ('2e-5', '5e-5'), 'grpo-rounds': ('2e-5', '5e-5', '1e-4'),
             **{name: ('5e-5', '1e-4') for name in (*STEP_LEVEL, 'online-ppo')}}
COEFFICIENTS = {'sft-best': None, 'dpo': ('loss.beta', (0.05, 0.2)), 'online-dpo': ('loss.beta', (0.05, 0.2)),
                'kto': ('loss.beta', (0.05, 0.2)), 'ipo': ('loss.beta', (0.1, 1.0)), 'simpo': ('loss.beta', (2.5, 10.0)),
                'grpo': ('loss.epsilon', (0.01, 0.2)), 'grpo-rounds': ('loss.epsilon', (0.01, 0.2)),
                'online-ppo': ('loss.init_kl_coef', (0.05, 0.2)), 'grpo-online': ('loss.beta', (0.0, 0.04)),
                'rloo': ('loss.beta', (0.0, 0.05)), 'reinforce-pp': ('loss.beta', (0.0, 0.01)),
                'dr-grpo': ('loss.mu', (1, 2)), 'dapo': ('loss.mu', (1, 2)), 'gspo': ('loss.mu', (1, 2))}
LABEL_OPTIONS = {'best': [], 'pairwise': ['--pair-mode', 'max'], 'binary': ['--threshold', 'median', '--per-prompt'],
                 'scalar': []}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--prompts-train', type=existing_file, default=os.path.join(UPBEAT, 'train_prompts.jsonl'))
    parser.add_argument('--prompts-test', type=existing_file, default=os.path.join(UPBEAT, 'test_prompts.jsonl'))
    parser.add_argument('--reward-function', default=os.path.join(UPBEAT, 'reward.py') + ':reward',
                        help='path/to/file.py:function or module:function, called as function(prompt, completion)')
    parser.add_argument('--model', default='smollm2', help='a config/model/ name (the starting model)')
    parser.add_argument('--load-from', help='start every method from this checkpoint (model.load_from)')
    parser.add_argument('--methods', default=','.join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument('--samples-per-prompt', type=positive_int, default=4,
                        help='k: the budget is k x the train prompts')
    parser.add_argument('--rounds', type=positive_int, default=3,
                        help='online DPO: the budget split into this many rounds')
    parser.add_argument('--max-new-tokens', type=positive_int, default=48)
    parser.add_argument('--temperature', type=non_negative_number, default=0.7)
    parser.add_argument('--top-p', type=positive_number, default=0.95)
    parser.add_argument('--top-k', type=non_negative_int, default=0)
    parser.add_argument('--eval-batch-size', type=int, default=None,
                        help='prompts sampled at once (model.eval_batch_size; default: the model config\'s)')
    parser.add_argument('--round-eval', default=True, action=argparse.BooleanOptionalAction,
                        help='online DPO: the held-out reward before and after every round (its curve)')
    parser.add_argument('--autocast-dtype', default=None, choices=('bfloat16', 'float16'),
                        help='model.autocast_dtype of every training, sampling and held-out run (default: fp32)')
    parser.add_argument('--lr', type=positive_number, default=2e-5)
    parser.add_argument('--prompts-per-round', type=positive_int, default=None,
                        help='online DPO: prompts per round (default: the train prompts / rounds)')
    parser.add_argument('--epochs', type=positive_int, default=2, help='offline methods and each online DPO round')
    parser.add_argument('--batch-size', type=positive_int, default=4)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--chat-template', default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument('--work-dir', default=os.path.join(ROOT, 'runs', 'quality'),
                        help='runs, samples and feedback (cleared at the start unless --reuse)')
    parser.add_argument('--reuse', action='store_true',
                        help="keep the work directory: reuse the samples and feedback on disk, keep the rows of an "
                             "earlier report with the same --tag that trained with the same overrides (and those of "
                             "the methods not given), skip the sweep's trials recorded in quality-<tag>-trials.jsonl, "
                             "and resume any other run from its LATEST checkpoint; all under the same arguments")
    parser.add_argument('--results-dir', default=os.path.join(ROOT, 'bench', 'results'))
    parser.add_argument('--tag', default=None, help='the results file name: quality-<tag> (default: the date)')
    parser.add_argument('--extra', action='append', default=[],
                        help='one more override for every train.py run (repeatable), e.g. ++model.max_length=256')
    parser.add_argument('--sweep', action='store_true',
                        help="pick each method's learning rate and main coefficient on a validation split first")
    parser.add_argument('--sweep-lrs', default=None,
                        help="the sweep's learning rates for every method, comma-separated (default: SWEEP_LRS)")
    parser.add_argument('--val-prompts', type=int, default=20,
                        help='the sweep: the last this many train prompts are its validation split')
    args = parser.parse_args(argv)
    args.prompts_train, args.prompts_test = in_root(args.prompts_train), in_root(args.prompts_test)
    args.reward_function, args.work_dir = reward_function_in_root(args.reward_function), in_root(args.work_dir)
    unknown = [name for name in args.methods.split(',') if name not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(map(repr, unknown))}; the methods are {', '.join(METHODS)}")
    return args


class Runner:
    """Runs halos' entry points, printing and recording each command line. Each runs in a child forked from this
    process after it imported torch, transformers and halos once (a fresh interpreter would spend much of every
    command on those imports); where there is no fork, in a subprocess. This process runs no torch op itself, so
    each child starts its own thread pool, as a fresh process would."""

    def __init__(self):
        self.commands: List[str] = []
        self.fork = hasattr(os, 'fork')
        if self.fork:
            for module in ('torch', 'transformers', 'datasets', 'hydra', 'trainers', 'halos.sampling'):
                importlib.import_module(module)

    def __call__(self, script: str, *args: str) -> float:
        shown = ' '.join(['python', script, *map(shlex.quote, args)])
        self.commands.append(shown)
        print(f'\n$ {shown}', flush=True)
        started = time.time()
        if self.fork:
            run_forked(script, list(args))
        else:
            subprocess.run([sys.executable, script, *args], cwd=ROOT, check=True, env={**os.environ, 'WANDB_MODE': 'disabled'})
        return time.time() - started


def run_forked(script: str, args: List[str]) -> None:
    """`python script args` in a forked child: its exit status, as subprocess.run(check=True) gives it (a stop
    is passed on to it: halos.errors.wait_passing_stops)."""
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os._exit(child_main(script, args))
    code = wait_passing_stops(pid)
    if code:
        raise subprocess.CalledProcessError(code, ['python', script, *args])


def child_main(script: str, args: List[str]) -> int:
    import runpy
    import traceback
    code = 1
    try:
        os.chdir(ROOT)
        os.environ['WANDB_MODE'] = 'disabled'
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.join(ROOT, script))
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
    return code


def in_root(path: str) -> str:
    """A path as the commands show it: relative to the repository when inside it (they run there)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def reward_function_in_root(spec: str) -> str:
    file, _, function = spec.rpartition(':')
    return f'{in_root(file)}:{function}' if os.path.isfile(file) else spec


def count_lines(path: str) -> int:
    with open(os.path.join(ROOT, path)) as f:
        return sum(1 for line in f if line.strip())


def sampling_overrides(args) -> List[str]:
    """What every train.py and eval.py run shares: the sampling settings and the forwards' dtype."""
    return [*([f'++model.autocast_dtype={args.autocast_dtype}'] if args.autocast_dtype else []),
            f'++max_new_tokens={args.max_new_tokens}', f'++temperature={args.temperature}', f'++top_p={args.top_p}',
            f'++top_k={args.top_k}', f'++use_chat_template={str(args.chat_template).lower()}', f'++seed={args.seed}',
            *([f'++model.eval_batch_size={args.eval_batch_size}'] if args.eval_batch_size else [])]


def start_overrides(args, exp_name: str) -> List[str]:
    """eval.py on the starting model, without a run: halos' config directory, the base model or --load-from."""
    return [f'--config-path={in_root(CONFIG_DIR)}', f'model={args.model}', 'loss=sft', f'exp_name={exp_name}',
            f'++cache_dir={args.work_dir}', f'++model.load_from={args.load_from or "null"}',
            f'++saved_policy={args.load_from or "null"}']


def build_feedback(run: Runner, args, kinds: Sequence[str]) -> Dict[str, str]:
    """k samples of every train prompt from the starting model, and the feedback files of `kinds` (with
    --reuse, those on disk are kept)."""
    def missing(path: str) -> bool:
        return not (args.reuse and os.path.exists(os.path.join(ROOT, path)))
    samples_dir = os.path.join(args.work_dir, 'samples')
    samples = os.path.join(samples_dir, 'start_samples.jsonl')
    if missing(samples):
        run('eval.py', *start_overrides(args, 'start'), f'datasets=[{args.prompts_train}]', '++mode=sample',
            f'++num_samples_per_prompt={args.samples_per_prompt}', '++n_samples=null', f'++samples_dir={samples_dir}',
            *sampling_overrides(args))
    paths = {kind: os.path.join(args.work_dir, 'feedback', f'{kind}.jsonl') for kind in kinds}
    for kind, path in paths.items():
        if missing(path):
            run('label.py', samples, path, '--reward-function', args.reward_function, '--feedback', kind,
                *LABEL_OPTIONS[kind], '--seed', str(args.seed))
    return {'samples': samples, **paths}


def run_dir(args, name: str) -> str:
    return os.path.join(args.work_dir, f'quality_{name}')


def prompts_per_round(args, n_prompts: int) -> int:
    return args.prompts_per_round or n_prompts // args.rounds


def train_overrides(args, method: Method, budget: int, n_prompts: int, feedback: Dict[str, str]) -> List[str]:
    resume = args.reuse and os.path.isdir(os.path.join(ROOT, run_dir(args, method.name), 'LATEST'))
    common = [f'loss={method.loss}', f'model={args.model}', f'exp_name=quality_{method.name}', 'mode=train',
              f'++cache_dir={args.work_dir}', '++wandb.enabled=false', f'++lr={args.lr}', '++optimizer=AdamW',
              '++warmup_steps=2', f'++n_epochs={args.epochs}', f'++model.batch_size={args.batch_size}',
              '++do_first_eval=false', '++eval_every=1000000', '++n_eval_examples=0', '++minimum_log_interval_secs=0',
              *sampling_overrides(args), *([f'++model.load_from={args.load_from}'] if args.load_from else []),
              *(['++resume=true'] if resume else [])]
    if method.feedback:
        return common + [f'datasets=[{feedback[method.feedback]}]', *method.overrides, *args.extra]
    data = [f'datasets=[{args.prompts_train}]']
    if method.loss in STEP_LEVEL:
        k = args.samples_per_prompt
        return common + data + ['++n_epochs=null', f'++n_examples={budget // k}', f'++online.samples_per_prompt={k}',
                                f'++online.reward_function={args.reward_function}', *method.overrides, *args.extra]
    if method.loss == 'ppo-online':
        return common + data + [f'++loss.reward_function={args.reward_function}', f'++n_examples={budget}',
                                *method.overrides, *args.extra]
    return common + data + [f'++online.rounds={args.rounds}',
                            f'++online.prompts_per_round={prompts_per_round(args, n_prompts)}',
                            f'++online.samples_per_prompt={args.samples_per_prompt}',
                            f'++online.reward_function={args.reward_function}',
                            *([f'++online.eval_prompts={args.prompts_test}'] if args.round_eval else []),
                            *method.overrides, *args.extra]


def held_out_reward(run: Runner, args, config_overrides: List[str]) -> dict:
    """eval.py ++mode=reward on the held-out prompts: its record (appended to <work>/rewards/rewards.jsonl)."""
    rewards_dir = os.path.join(args.work_dir, 'rewards')
    seconds = run('eval.py', *config_overrides, '++mode=reward', f'++prompts=[{args.prompts_test}]',
                  f'++reward_function={args.reward_function}', '++n_samples=null', f'++samples_dir={rewards_dir}',
                  *sampling_overrides(args))
    with open(os.path.join(ROOT, rewards_dir, 'rewards.jsonl')) as f:
        record = json.loads(f.read().splitlines()[-1])
    return {**record, 'eval_seconds': seconds}


def metric_curve(directory: str, key: str, se_key: Optional[str] = None) -> List[dict]:
    """(step or round, value[, se]) of every metrics.jsonl record holding `key`."""
    records = [record for record in read_json_lines(os.path.join(ROOT, directory, 'metrics.jsonl')) if key in record]
    return [{'round': r.get('round'), 'step': r.get('step'), 'mean': r[key], **({'se': r[se_key]} if se_key else {})}
            for r in records]


def run_method(run: Runner, args, method: Method, budget: int, n_prompts: int, feedback: Dict[str, str]) -> dict:
    directory = run_dir(args, method.name)
    train_seconds = run('train.py', *train_overrides(args, method, budget, n_prompts, feedback))
    result = held_out_reward(run, args, [f'--config-path={directory}'])
    if method.feedback:
        limit = [o.split('=', 1)[1] for o in method.overrides if o.startswith('++n_examples=')]
        trained_on = f'{method.feedback} feedback, {count_lines(feedback[method.feedback])} records' + \
            (f' (the first {limit[-1]} examples)' if limit else '')
        curve = []
    elif method.loss == 'ppo-online':
        trained_on, curve = f'{budget} rollouts', metric_curve(directory, 'rewards/score')
    elif method.loss in STEP_LEVEL:
        trained_on = f'{budget // args.samples_per_prompt} prompts x {args.samples_per_prompt}, step by step'
        curve = metric_curve(directory, 'reward_train/mean')
    else:
        trained_on = f'{args.rounds} rounds x {prompts_per_round(args, n_prompts)} prompts x {args.samples_per_prompt}'
        curve = metric_curve(directory, 'reward_eval/mean', 'reward_eval/se')
    return {'method': method.name, 'loss': method.loss, 'trains_on': trained_on, 'train_seconds': train_seconds,
            'curve': curve, 'hyperparameters': hyperparameters(args, method), 'overrides': list(method.overrides),
            **result}


def hyperparameters(args, method: Method) -> str:
    """The learning rate and the swept coefficient a method trained with (the YAML's when not overridden)."""
    overrides = dict(o[2:].split('=', 1) for o in method.overrides if o.startswith('++'))
    coefficient = COEFFICIENTS.get(method.name.rsplit('-', 1)[0] if method.name not in COEFFICIENTS else method.name)
    shown = f"lr {overrides.get('lr', args.lr)}"
    if coefficient:
        shown += f", {coefficient[0].split('.')[-1]} {overrides.get(coefficient[0], 'as in its YAML')}"
    return shown


def grid(method: Method, lrs: Sequence[str]) -> List[Tuple[str, ...]]:
    """The sweep's configurations of a method: every learning rate x every value of its main coefficient."""
    coefficient = COEFFICIENTS[method.name]
    values = coefficient[1] if coefficient else (None,)
    return [(f'++lr={lr}', *([f'++{coefficient[0]}={value}'] if coefficient else [])) for lr in lrs for value in values]


def split_prompts(args) -> Tuple[str, str]:
    """The train prompts less the last --val-prompts (the sweep trains on them) and those last ones (the sweep's
    validation split), written into the work directory."""
    with open(os.path.join(ROOT, args.prompts_train)) as f:
        lines = [line for line in f if line.strip()]
    if not 0 < args.val_prompts < len(lines):
        raise ConfigError(f"--val-prompts {args.val_prompts}: the {len(lines)} train prompts of {args.prompts_train} "
                          f"leave none to train or validate on")
    paths = (os.path.join(args.work_dir, 'sweep', 'train_prompts.jsonl'), os.path.join(args.work_dir, 'sweep',
                                                                                       'val_prompts.jsonl'))
    os.makedirs(os.path.join(ROOT, args.work_dir, 'sweep'), exist_ok=True)
    for path, part in zip(paths, (lines[:-args.val_prompts], lines[-args.val_prompts:])):
        with open(os.path.join(ROOT, path), 'w') as f:
            f.writelines(part)
    return paths


def sweep(run: Runner, args, methods: Sequence[Method], done: Dict[str, dict], tag: str) -> Dict[str, dict]:
    """Every configuration of every method's grid, trained on the train prompts less the validation split and
    scored on it; per method its trials and the chosen overrides (those of the best validation reward). `done`:
    an earlier report's sweep, kept with --reuse."""
    train, val = split_prompts(args)
    sweep_args = argparse.Namespace(**{**vars(args), 'prompts_train': train, 'prompts_test': val,
                                       'work_dir': os.path.join(args.work_dir, 'sweep')})
    feedback = build_feedback(run, sweep_args, sorted({method.feedback for method in methods if method.feedback}))
    budget, n_prompts, results = count_lines(feedback['samples']), count_lines(train), {}
    record = TrialRecord(os.path.join(args.results_dir, f'quality-{tag}-trials.jsonl'), keep=args.reuse)
    for method in methods:
        lrs = args.sweep_lrs.split(',') if args.sweep_lrs else SWEEP_LRS.get(method.name, SWEEP_LRS['default'])
        configurations = grid(method, lrs)
        kept = kept_sweep(done, method.name, configurations)
        if kept:
            results[method.name] = kept
            continue
        trials = []
        for index, overrides in enumerate(configurations):
            variant = dataclasses.replace(method, name=f'{method.name}-{index}', overrides=(*method.overrides, *overrides))
            trials.append(record.get(variant.name, overrides) or
                          record.add(variant.name, trial(run, sweep_args, variant, overrides, budget, n_prompts, feedback)))
        results[method.name] = {'trials': trials, 'chosen': best_trial(trials)['overrides']}
    return results


def kept_sweep(done: Dict[str, dict], name: str, configurations: Sequence[Tuple[str, ...]]) -> Optional[dict]:
    """An earlier report's sweep of the method, if it tried exactly these configurations (a grid that grew
    runs the trials it lacks)."""
    earlier = done.get(name)
    if earlier and [trial['overrides'] for trial in earlier['trials']] == [list(c) for c in configurations]:
        return earlier
    return None


def best_trial(trials: Sequence[dict]) -> dict:
    """The best validation reward; among equals (a reward at its ceiling) the one that moved least from the start."""
    return max(trials, key=lambda trial: (trial['reward_mean'], -trial['kl']))


class TrialRecord:
    """The sweep's finished trials, one JSON line each in the results directory, appended as each finishes: with
    --reuse a sweep cut short (or moved to another machine with the results) runs only the trials not recorded."""

    def __init__(self, path: str, keep: bool):
        self.path, self.trials = path, {}
        if keep and os.path.exists(path):
            for record in read_json_lines(path):
                self.trials[record.pop('trial')] = record
        elif os.path.exists(path):
            os.remove(path)

    def get(self, name: str, overrides: Tuple[str, ...]) -> Optional[dict]:
        found = self.trials.get(name)
        return found if found is not None and found['overrides'] == list(overrides) else None

    def add(self, name: str, result: dict) -> dict:
        append_json_lines(self.path, [{'trial': name, **result}])
        self.trials[name] = result
        return result


def trial(run: Runner, args, variant: Method, overrides: Tuple[str, ...], budget: int, n_prompts: int,
          feedback: Dict[str, str]) -> dict:
    """One configuration of the sweep, trained and scored on the validation prompts; its checkpoint is deleted
    (only the chosen configuration is trained again, for the table)."""
    row = run_method(run, args, variant, budget, n_prompts, feedback)
    for checkpoint in ('LATEST', 'LATEST.tmp'):
        shutil.rmtree(os.path.join(ROOT, run_dir(args, variant.name), checkpoint), ignore_errors=True)
    return {'overrides': list(overrides), 'reward_mean': row['reward_mean'], 'reward_se': row['reward_se'],
            'kl': row['kl']}


def gap_in_se(row: dict, start: dict) -> float:
    """The gain over the starting model in standard errors of the difference of the two means (infinite where
    neither mean varies: every sample scored alike)."""
    gain, se = row['reward_mean'] - start['reward_mean'], math.hypot(row['reward_se'], start['reward_se'])
    return gain / se if se else math.copysign(math.inf, gain) if gain else 0.0


def markdown(report: dict) -> str:
    start = report['start']
    lines = [f"# Quality: held-out reward per method ({report['finished_at'][:10]})", '',
             f"Task: train prompts `{report['prompts_train']}` ({report['n_train_prompts']}), held-out prompts "
             f"`{report['prompts_test']}` (n = {start['n']}), reward `{report['reward_function']}`. Starting model: "
             f"`{report['model']}`{' from ' + report['load_from'] if report['load_from'] else ''}. Budget: "
             f"{report['budget']} labelled samples ({report['samples_per_prompt']} per train prompt). "
             f"Machine: {report['machine']}; {precision(report.get('autocast_dtype'))}." +
             (f" Sampling the budget took {report['sampling_seconds']:.0f} s." if report['sampling_seconds'] else ''),
             '',
             '| method | trains on | hyperparameters | held-out reward ± SE | gain / SE of the difference | '
             'KL to start | length (words) | train (s) | eval (s) |', '|---|---|---|---|---|---|---|---|---|',
             f"| starting model | – | – | {start['reward_mean']:.3f} ± {start['reward_se']:.3f} | – | 0 | "
             f"{start['length_words']:.1f} | – | {start['eval_seconds']:.0f} |"]
    for row in report['methods']:
        lines.append(f"| {row['method']} (`loss={row['loss']}`) | {row['trains_on']} | {row.get('hyperparameters', '')} | "
                     f"{row['reward_mean']:.3f} ± {row['reward_se']:.3f} | {gap_in_se(row, start):+.1f} | "
                     f"{row['kl']:.2f} | {row['length_words']:.1f} | {row['train_seconds']:.0f} | "
                     f"{row['eval_seconds']:.0f} |")
    lines += ['', 'Reward: mean over one sample per held-out prompt (temperature '
              f"{report['temperature']}, at most {report['max_new_tokens']} new tokens). KL: the mean over those "
              'samples of their summed log-ratio log pi(y|x) - log pi_start(y|x). Wall times on this machine.',
              *[f'Note: {note}' for note in report.get('notes', [])], *sweep_lines(report),
              '', '## Commands', '', '```bash', *report['commands'], '```', '']
    return '\n'.join(lines)


def sweep_lines(report: dict) -> List[str]:
    """The sweep's section: every configuration of every method with its validation reward."""
    if not report.get('sweep'):
        return []
    lines = ['', '## Sweep', '', f"Each configuration trained on the train prompts less the last {report['val_prompts']} "
             f"and was scored on those {report['val_prompts']} (validation reward ± SE, KL); the best was chosen (of "
             "equal rewards, the lowest KL).", '',
             '| method | configuration | validation reward ± SE | KL | chosen |', '|---|---|---|---|---|']
    for method, result in report['sweep'].items():
        for trial in result['trials']:
            lines.append(f"| {method} | {' '.join(trial['overrides'])} | {trial['reward_mean']:.3f} ± "
                         f"{trial['reward_se']:.3f} | {trial['kl']:.2f} | "
                         f"{'yes' if trial['overrides'] == result['chosen'] else ''} |")
    return lines


def plot(report: dict, reward_path: str, frontier_path: str) -> None:
    """Two figures: the reward per method against the labelled samples consumed (left: held-out, per round for
    online DPO; right: the training-time score of online PPO's rollouts per step), and reward against KL."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    start, budget = report['start'], report['budget']
    stepwise = [row for row in report['methods'] if row['curve'] and 'se' not in row['curve'][0]]  # online PPO
    figure, axes = plt.subplots(1, 2 if stepwise else 1, figsize=(12 if stepwise else 7, 4.5), squeeze=False)
    held_out = axes[0][0]
    for row in report['methods']:
        if row['curve'] and 'se' in row['curve'][0]:   # online rounds: held-out reward after every round
            rounds = [point['round'] for point in row['curve']]
            x = [budget * r / max(rounds) for r in rounds]
            held_out.errorbar(x, [p['mean'] for p in row['curve']], yerr=[p['se'] for p in row['curve']],
                              marker='o', capsize=3, label=row['method'])
        else:
            held_out.errorbar([0, budget], [start['reward_mean'], row['reward_mean']],
                              yerr=[start['reward_se'], row['reward_se']], marker='o', capsize=3, label=row['method'])
    held_out.set(xlabel='labelled samples consumed', ylabel='held-out reward (mean ± SE)',
                 title='held-out reward per method')
    held_out.legend(fontsize=8, loc='best')
    if stepwise:   # online PPO: its rollouts' mean score per step
        per_step = axes[0][1]
        for row in stepwise:
            per_step.plot([p['step'] for p in row['curve']], [p['mean'] for p in row['curve']], marker='.',
                          label=row['method'])
        per_step.set(xlabel='rollouts sampled', ylabel="mean score of the step's rollouts",
                     title='training reward per step')
        per_step.legend(fontsize=8, loc='best')
    save(figure, reward_path)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.errorbar([0], [start['reward_mean']], yerr=[start['reward_se']], fmt='ks', capsize=3, label='starting model')
    for row in report['methods']:
        axes.errorbar([row['kl']], [row['reward_mean']], yerr=[row['reward_se']], fmt='o', capsize=3)
        axes.annotate(row['method'], (row['kl'], row['reward_mean']), textcoords='offset points', xytext=(6, 4),
                      fontsize=8)
    axes.set(xlabel='KL to the starting model (mean summed log-ratio, nats)', ylabel='held-out reward (mean ± SE)',
             title='reward vs KL')
    axes.legend(fontsize=8, loc='lower right')
    save(figure, frontier_path)


def save(figure, path: str) -> None:
    import matplotlib.pyplot as plt
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def precision(autocast_dtype: Optional[str]) -> str:
    return f'{autocast_dtype} autocast' if autocast_dtype else 'fp32'


def machine() -> str:
    import torch
    return f'{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}'


def report_of(args, start: dict, rows: List[dict], commands: List[str], budget: int, n_prompts: int,
              sampling_seconds: float, started: float, sweep: Dict[str, dict]) -> dict:
    return {'sweep': sweep, 'val_prompts': args.val_prompts if sweep else None, 'model': args.model, 'load_from': args.load_from, 'prompts_train': args.prompts_train,
            'prompts_test': args.prompts_test, 'reward_function': args.reward_function, 'n_train_prompts': n_prompts,
            'samples_per_prompt': args.samples_per_prompt, 'budget': budget, 'temperature': args.temperature,
            'max_new_tokens': args.max_new_tokens, 'autocast_dtype': args.autocast_dtype, 'machine': machine(),
            'sampling_seconds': sampling_seconds, 'settings': measured_under(args),
            'start': start, 'methods': rows, 'commands': commands, 'wall_seconds': time.time() - started,
            'finished_at': datetime.datetime.now().isoformat()}


def write_report(report: dict, results_dir: str, tag: str) -> str:
    """quality-<tag>.json, .md, -reward.png and -frontier.png in results_dir, each written whole or not at all;
    returns their common stem."""
    stem = os.path.join(results_dir, f'quality-{tag}')
    table = markdown(report)
    write_text(f'{stem}.json', json.dumps(report, indent=2))  # as NaN, the SE of one prompt, which it reads back
    write_text(f'{stem}.md', table)
    plot(report, f'{stem}-reward.png', f'{stem}-frontier.png')
    return stem


def earlier_report(args, tag: str) -> Optional[dict]:
    """With --reuse, the report of an earlier invocation with the same tag, if any."""
    path = os.path.join(args.results_dir, f'quality-{tag}.json')
    if not (args.reuse and os.path.exists(path)):
        return None
    with open(path) as f:
        return json.load(f)


def wall_start(earlier: Optional[dict]) -> float:
    """When the report's wall time starts: now, less the time its earlier invocations took (--reuse)."""
    return time.time() - (earlier['wall_seconds'] if earlier else 0.0)


def measured(run: Runner, args, earlier: Optional[dict], method: Method, budget: int, n_prompts: int,
             feedback: Dict[str, str]) -> dict:
    """The method's row: as an earlier report measured it (kept_row), else trained and measured now."""
    return kept_row(earlier, method) or run_method(run, args, method, budget, n_prompts, feedback)


def with_earlier_rows(earlier: Optional[dict], rows: List[dict]) -> List[dict]:
    """The table: these rows, and an earlier report's rows (--reuse) of the methods they do not measure (again),
    in the order of METHODS; a table fills over several invocations."""
    measured = {row['method'] for row in rows}
    kept = [row for row in (earlier['methods'] if earlier else []) if row['method'] not in measured]
    return sorted(kept + rows, key=lambda row: list(METHODS).index(row['method']))


def kept_row(earlier: Optional[dict], method: Method) -> Optional[dict]:
    """The earlier report's row of `method` if it trained with the same overrides: --reuse keeps it as measured,
    on this machine or on another one holding the results (the table of a long sweep fills over several runs)."""
    rows = earlier['methods'] if earlier else []
    same = lambda row: row['method'] == method.name and row.get('overrides') == list(method.overrides)
    return next(filter(same, rows), None)


def existing_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


WORK_ENTRIES = ('samples', 'feedback', 'rewards', 'sweep')  # and quality_<method> runs, quality-<tag> reports
SETTINGS_FILE = 'quality-settings.json'  # in the work directory: the arguments its samples and runs were made under
# The arguments that samples, runs and rows depend on: --reuse keeps them only under the same values.
MEASURED_UNDER = ('model', 'load_from', 'prompts_train', 'prompts_test', 'reward_function', 'samples_per_prompt',
                  'rounds', 'prompts_per_round', 'max_new_tokens', 'temperature', 'top_p', 'top_k', 'autocast_dtype',
                  'chat_template', 'lr', 'epochs', 'batch_size', 'seed', 'extra', 'val_prompts')


def measured_under(args) -> dict:
    return {name: getattr(args, name) for name in MEASURED_UNDER}


def check_same_settings(args, recorded: Optional[dict], what: str) -> None:
    """What --reuse keeps was made under the same arguments: samples, runs or rows made under others would stand
    in the table as this invocation's."""
    now = measured_under(args)
    changed = [name for name in MEASURED_UNDER if recorded and name in recorded and recorded[name] != now[name]]
    if changed:
        shown = ', '.join(f"--{name.replace('_', '-')} {recorded[name]} (now {now[name]})" for name in changed)
        raise ConfigError(f"--reuse: {what} was made with {shown}: give the same arguments, or another --work-dir "
                          f"and --tag to measure anew")


def check_clearable(work_dir: str) -> None:
    """Stop before clearing a work directory that holds what quality.py does not write there (another directory,
    given by mistake, would be wiped)."""
    path = os.path.join(ROOT, work_dir)
    foreign = sorted(name for name in os.listdir(path) if name not in WORK_ENTRIES and not name.startswith('quality')) \
        if os.path.isdir(path) else []
    if foreign:
        raise ConfigError(f"--work-dir {work_dir} holds {', '.join(foreign[:3])}{' and more' if foreign[3:] else ''}, "
                          f"which quality.py does not write; it clears its work directory at the start (unless "
                          f"--reuse): give it a directory of its own")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    with reported_as_one_line('quality.py'):
        return measure(args)


def measure(args: argparse.Namespace) -> dict:
    methods = [METHODS[name] for name in args.methods.split(',')]
    with contextlib.chdir(ROOT):  # where its commands run; a broken reward function stops it before any sampling
        reward_function_labeler(args.reward_function)
    if not args.reuse:
        check_clearable(args.work_dir)
        shutil.rmtree(os.path.join(ROOT, args.work_dir), ignore_errors=True)
    tag = args.tag or datetime.datetime.now().strftime('%Y%m%dT%H%M%S')
    earlier = earlier_report(args, tag)
    settings_path = os.path.join(ROOT, args.work_dir, SETTINGS_FILE)
    if args.reuse:
        check_same_settings(args, earlier and earlier.get('settings'), f'the report quality-{tag}')
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                check_same_settings(args, json.load(f), f'--work-dir {args.work_dir}')
    write_text(settings_path, json.dumps(measured_under(args), indent=2))
    run, invoked, started = Runner(), time.time(), wall_start(earlier)
    run.commands = list(earlier['commands']) if earlier else []
    n_prompts = count_lines(args.prompts_train)
    chosen = sweep(run, args, methods, earlier.get('sweep', {}) if earlier else {}, tag) if args.sweep else {}
    sampling_started = time.time()  # after the sweep: its own sampling and trials are not the table's
    feedback = build_feedback(run, args, sorted({method.feedback for method in methods if method.feedback}))
    sampling_seconds = earlier['sampling_seconds'] if earlier else time.time() - sampling_started
    budget = count_lines(feedback['samples'])
    start = earlier['start'] if earlier else held_out_reward(run, args, start_overrides(args, 'start'))
    rows = []
    for method in methods:  # the report is rewritten after every method: a crash keeps the rows done
        tuned = dataclasses.replace(method, overrides=(*method.overrides, *chosen.get(method.name, {}).get('chosen', ())))
        rows.append(measured(run, args, earlier, tuned, budget, n_prompts, feedback))
        report = report_of(args, start, with_earlier_rows(earlier, rows), run.commands, budget, n_prompts,
                           sampling_seconds, started, {**(earlier or {}).get('sweep', {}), **chosen})
        stem = write_report(report, args.results_dir, tag)
    print('\n' + markdown(report).split('## Commands')[0])
    print(f'wrote {stem}.md, .json, -reward.png and -frontier.png in {time.time() - invoked:.0f} s '
          f'({report["wall_seconds"]:.0f} s over its invocations)')
    return report


if __name__ == '__main__':
    main()
