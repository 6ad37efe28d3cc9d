"""`make docs-check`: run every command of README.md and docs/*.md for real, in order, in a temporary copy of
the repository, shrunk to seconds each; print one line per command (ok, failed with the tail of its stderr,
or skipped with the reason) and exit 1 if any failed.

    python scripts/docs_check.py                 # everything
    python scripts/docs_check.py --only docs/extending.md --keep
    python scripts/docs_check.py --list          # the shrunk commands, without running them

What runs: every line of a ```bash block that starts with `python ` (continuation lines joined, trailing
comments dropped), with `python` this interpreter. The files the docs ask the reader to write (a fenced
block under an HTML comment `<!-- file: create PATH -->` or `<!-- file: append PATH -->`) are written into the
copy at the point where they appear, so later commands see them.

How a command is shrunk:
- train.py and any script run with train.py's command line (`mode=train`): `model=` becomes `model=tiny`,
  and `++n_examples=8 ++n_eval_examples=8 ++max_new_tokens=8 ++wandb.enabled=false ++cache_dir=<copy>/.cache`
  are set, `++data_dir=<tests' data dir>` unless the command gives one; online rounds run 1 round of 2 prompts
  x 2 samples;
- eval.py: the same model, cache and length, `++n_samples=4`, `++lm_eval.limit=4`; a `--config-path` under a
  directory that does not exist (`/data/models/<run>`) becomes `<copy>/.cache/<run>`;
- a reward function that would score the tiny model's random text (online runs, `++mode=reward`, label.py
  on samples that are not shipped in data/) becomes tests/rewards.py:vowels, which does not tie on it;
- compare.py and label.py --judge talk to a local llama.cpp judge (judge_server.local_judge_server), and
  compare.py judges 4 samples; without llama-cpp-python they are skipped;
- bench/bench.py, bench/sampling.py and bench/grpo_step.py run with --smoke; bench/quality.py on the tiny
  model with 8 train and 8 held-out prompts; scripts/stackllama.py (SmolLM2 in three stages) and module
  commands (`python -m ...`: servers) are skipped.
A train.py command seen before (the same run in two pages) runs once. The runs' optimizer states are deleted as
they are written (no command resumes), so the copy stays small; it is deleted at the end unless --keep.
"""
import argparse
import contextlib
import dataclasses
import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'data')  # tests/helpers.py's DATA
ORDER = ('README.md', 'docs/training.md', 'docs/extending.md', 'docs/online.md', 'docs/evaluation.md',
         'docs/benchmarks.md', 'docs/differences.md', 'docs/faq.md')
IGNORED = ('.venv', '.git', 'runs', '.cache', '__pycache__', 'outputs', 'samples', 'wandb', '.pytest_cache',
           'multirun')
TINY_REWARD = 'tests/rewards.py:vowels'
ENV = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'WANDB_MODE': 'disabled', 'TOKENIZERS_PARALLELISM': 'false'}
FILE_BLOCK = re.compile(r'<!-- file: (append|create) (\S+) -->\n```[\w-]*\n(.*?)```', re.S)
BASH_BLOCK = re.compile(r'```bash\n(.*?)```', re.S)


# ---------------------------------------------------------------- reading the docs

def doc_paths(root: str = ROOT) -> List[str]:
    """README.md and every docs/*.md, in reading order (the known pages first, then any other, sorted)."""
    found = ['README.md'] + sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, 'docs', '*.md')))
    return [p for p in ORDER if p in found] + [p for p in found if p not in ORDER]


def bash_commands(text: str) -> List[Tuple[int, str]]:
    """(offset, command) of every `python ...` line of the text's bash blocks: continuation lines joined,
    a trailing `# comment` dropped."""
    found = []
    for block in BASH_BLOCK.finditer(text):
        for line in block.group(1).replace('\\\n', ' ').splitlines():
            line = re.sub(r'\s+#\s.*$', '', line).strip()
            if line.startswith('python '):
                found.append((block.start(), ' '.join(line.split())))
    return found


@dataclasses.dataclass(frozen=True)
class FileStep:
    doc: str
    action: str   # create or append
    path: str
    content: str


@dataclasses.dataclass(frozen=True)
class CommandStep:
    doc: str
    line: str


def file_blocks(text: str, doc: str = '') -> List[Tuple[int, FileStep]]:
    return [(m.start(), FileStep(doc, m.group(1), m.group(2), m.group(3))) for m in FILE_BLOCK.finditer(text)]


def steps(root: str = ROOT, docs: Optional[List[str]] = None) -> List:
    """Every file to write and command to run, in the order the docs give them."""
    ordered = []
    for doc in docs or doc_paths(root):
        with open(os.path.join(root, doc), encoding='utf-8') as f:
            text = f.read()
        found = file_blocks(text, doc) + [(offset, CommandStep(doc, line)) for offset, line in bash_commands(text)]
        ordered += [step for _, step in sorted(found, key=lambda pair: pair[0])]
    return ordered


def write_file(repo: str, step: FileStep) -> None:
    path = os.path.join(repo, step.path)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'a' if step.action == 'append' else 'w', encoding='utf-8') as f:
        f.write(('\n\n' if step.action == 'append' else '') + step.content)


# ---------------------------------------------------------------- shrinking a command

@dataclasses.dataclass
class Context:
    repo: str                       # the copy the commands run in
    judge_url: Optional[str] = None  # a local judge's base URL, once started
    judge_available: bool = True


class Skip(Exception):
    """A command docs-check does not run, with the reason."""


def is_hydra_train(script: str, args: List[str]) -> bool:
    return script == 'train.py' or 'mode=train' in args


def key_of(arg: str) -> str:
    return arg.lstrip('+').split('=', 1)[0]


def setting(args: List[str], key: str) -> Optional[str]:
    values = [arg.split('=', 1)[1] for arg in args if '=' in arg and key_of(arg) == key]
    return values[-1] if values else None


def with_setting(args: List[str], key: str, value: str) -> List[str]:
    """`++key=value` in place of any value the command gives the key."""
    return [arg for arg in args if key_of(arg) != key] + [f'++{key}={value}']


def with_flag(args: List[str], flags: Tuple[str, ...], value: Optional[str]) -> List[str]:
    """argparse options `flags` (with their value) replaced by `flags[0] value` (dropped when value is None)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if any(arg.startswith(flag + '=') for flag in flags):
            continue
        kept.append(arg)
    return kept + ([flags[0], value] if value is not None else [])


def flag_value(args: List[str], flags: Tuple[str, ...]) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg in flags and i + 1 < len(args):
            return args[i + 1]
        for flag in flags:
            if arg.startswith(flag + '='):
                return arg.split('=', 1)[1]
    return None


def shrunk_hydra(script: str, args: List[str], context: Context) -> Tuple[List[str], List[str]]:
    """A train.py or eval.py command line on the tiny model, with the docs-check's cache and lengths."""
    notes = []
    cache = os.path.join(context.repo, '.cache')
    args = [('model=tiny' if arg.startswith('model=') else arg) for arg in args]
    config_path = next((arg for arg in args if arg.startswith('--config-path=')), None)
    if config_path:
        path = config_path.split('=', 1)[1]
        if os.path.isabs(path) and not os.path.exists(path):
            args = [f'--config-path={os.path.join(cache, os.path.basename(path.rstrip("/")))}' if arg == config_path
                    else arg for arg in args]
    args = with_setting(args, 'cache_dir', cache)
    args = with_setting(args, 'max_new_tokens', '8')
    args = with_setting(args, 'wandb.enabled', 'false')
    if is_hydra_train(script, args):
        args = with_setting(args, 'n_examples', '8')
        args = with_setting(args, 'n_eval_examples', '8')
        if setting(args, 'data_dir') is None:
            args = with_setting(args, 'data_dir', DATA)
        if int(setting(args, 'online.rounds') or 0) > 0:
            args = with_setting(args, 'online.rounds', '1')
            args = with_setting(args, 'online.prompts_per_round', '2')
            args = with_setting(args, 'online.samples_per_prompt', '2')
        elif setting(args, 'online.samples_per_prompt'):
            args = with_setting(args, 'online.samples_per_prompt', '2')
        for key in ('online.reward_function', 'loss.reward_function'):
            if setting(args, key):
                args = with_setting(args, key, TINY_REWARD)
                notes.append(f'{key}={TINY_REWARD}')
    else:
        args = with_setting(args, 'n_samples', '4')
        if setting(args, 'mode') == 'lm_eval':
            if importlib.util.find_spec('lm_eval') is None:
                raise Skip('needs lm-eval-harness (requirements-eval.txt)')
            args = with_setting(args, 'lm_eval.limit', '4')
        if setting(args, 'mode') == 'reward' and setting(args, 'reward_function'):
            args = with_setting(args, 'reward_function', TINY_REWARD)
            notes.append(f'reward_function={TINY_REWARD}')
    return args, notes


def judge_url(context: Context, stack: contextlib.ExitStack) -> str:
    """The local judge's base URL, started on first use (stopped when docs-check ends)."""
    if context.judge_url is None:
        if not context.judge_available or importlib.util.find_spec('llama_cpp') is None:
            context.judge_available = False
            raise Skip('needs a judge server: no local judge (llama-cpp-python, requirements-judge.txt)')
        sys.path.insert(0, ROOT)
        from judge_server import local_judge_server
        context.judge_url = stack.enter_context(local_judge_server())
    return context.judge_url


def shrunk(line: str, context: Context, stack: Optional[contextlib.ExitStack] = None) -> Tuple[List[str], List[str]]:
    """The argv docs-check runs for a doc's command line, and notes on what it changed; Skip when it runs none."""
    words = shlex.split(line)
    if words[1] == '-m':
        raise Skip(f'`python -m {words[2]}` starts a server or a tool, not a halos command')
    script, args = words[1], words[2:]
    name = os.path.basename(script)
    notes: List[str] = []
    if script == 'scripts/stackllama.py':
        raise Skip('trains SmolLM2 in three stages (about 20 minutes); its commands are checked one by one')
    if script == 'scripts/docs_check.py':
        raise Skip('docs-check itself')
    if script == 'scripts/gpu_check.py':
        import torch
        if not torch.cuda.is_available():
            raise Skip('needs a GPU')
    if script in ('bench/bench.py', 'bench/grpo_step.py') and importlib.util.find_spec('trl') is None:
        raise Skip('needs TRL (requirements-bench.txt)')
    out_dir = os.path.join(context.repo, 'docs-check-results')
    if script == 'bench/bench.py':
        trainers = []
        if '--trainers' in args:
            for arg in args[args.index('--trainers') + 1:]:
                if arg.startswith('-'):
                    break
                trainers.append(arg)
        kept = [arg for arg in args if arg in ('--unshared', '--trl-retains-memory')]
        args = ['--smoke', '--out-dir', out_dir] + (['--trainers', *trainers] if trainers else []) + kept
        notes.append('--smoke')
    elif script in ('bench/sampling.py', 'bench/grpo_step.py'):
        args = ['--smoke', '--out-dir', out_dir] + [arg for arg in args if arg == '--trl-retains-memory']
        notes.append('--smoke')
    elif script == 'bench/quality.py':
        prompts = {}
        for flag, default in (('--prompts-train', 'data/upbeat/train_prompts.jsonl'),
                              ('--prompts-test', 'data/upbeat/test_prompts.jsonl')):
            source = os.path.join(context.repo, flag_value(args, (flag,)) or default)
            prompts[flag] = os.path.join(out_dir, f'{flag.strip("-")}.jsonl')
            os.makedirs(out_dir, exist_ok=True)
            with open(source) as f, open(prompts[flag], 'w') as out:
                out.writelines(f.readlines()[:8])
            args = with_flag(args, (flag,), prompts[flag])
        for flag, value in (('--reward-function', TINY_REWARD), ('--model', 'tiny'), ('--samples-per-prompt', '2'),
                            ('--rounds', '1'), ('--max-new-tokens', '6'), ('--epochs', '1'),
                            ('--work-dir', os.path.join(out_dir, 'quality')), ('--results-dir', out_dir),
                            ('--tag', 'docs-check')):
            args = with_flag(args, (flag,), value)
        args.append('--no-chat-template')
        notes.append('tiny model, 8 + 8 prompts')
    elif name == 'eval.py' or is_hydra_train(name, args):
        args, notes = shrunk_hydra(name, args, context)
    elif name == 'compare.py':
        args = with_flag(args, ('--base-url',), judge_url(context, stack))
        args = with_flag(args, ('-mc', '--max_comp'), '4')
        args = with_flag(args, ('-v', '--verbose'), 'false')
        notes.append('the local llama.cpp judge, 4 samples')
    elif name == 'label.py':
        if flag_value(args, ('--judge',)):
            args = with_flag(args, ('--base-url',), judge_url(context, stack))
            notes.append('the local llama.cpp judge')
        if flag_value(args, ('--reward-function',)) and not args[0].startswith('data/'):
            args = with_flag(args, ('--reward-function',), TINY_REWARD)
            notes.append(f'--reward-function {TINY_REWARD}')
    return [sys.executable, script, *args], notes


# ---------------------------------------------------------------- running

def copy_repository(target: str) -> str:
    repo = os.path.join(target, 'repo')
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(*IGNORED))
    return repo


def prune(repo: str) -> None:
    """Drop what no later command reads (the runs' optimizer states), to keep the copy small on disk."""
    for path in glob.glob(os.path.join(repo, '.cache', '*', 'LATEST', 'optimizer.pt')):
        os.remove(path)


def tail(text: str, n_lines: int = 12) -> str:
    return '\n'.join('        ' + line for line in text.strip().splitlines()[-n_lines:])


def run(args: argparse.Namespace) -> int:
    docs = [doc for doc in doc_paths() if not args.only or any(part in doc for part in args.only)]
    ordered = steps(ROOT, docs)
    n_commands = sum(isinstance(step, CommandStep) for step in ordered)
    target = tempfile.mkdtemp(prefix='halos-docs-check-')
    repo = copy_repository(target)
    context, env = Context(repo, judge_url='<the local judge>' if args.list else None), {**os.environ, **ENV}
    failures, done, started = 0, {}, time.time()
    print(f'docs-check: {n_commands} commands of {", ".join(docs)}, in {repo}', flush=True)
    with contextlib.ExitStack() as stack:
        number = 0
        for step in ordered:
            if isinstance(step, FileStep):
                write_file(repo, step)
                print(f'[  file ] {step.doc}: {step.action} {step.path}', flush=True)
                continue
            number += 1
            head = f'[{number:2d}/{n_commands}]'
            try:
                argv, notes = shrunk(step.line, context, stack)
            except Skip as reason:
                print(f'{head} skipped  {step.doc}: {step.line}  ({reason})', flush=True)
                continue
            shown = ' '.join(shlex.quote(arg) for arg in argv[1:])
            if args.list:
                print(f'{head} {step.doc}: {step.line}\n        -> python {shown}', flush=True)
                continue
            if shown in done and (is_hydra_train(os.path.basename(argv[1]), argv[2:]) or argv[1].startswith('bench/')):
                print(f'{head} ok       {step.doc}: {step.line}  (the same command as [{done[shown]}])', flush=True)
                continue
            begun = time.time()
            try:
                result = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=args.timeout)
                status, output = result.returncode, result.stderr or result.stdout
            except subprocess.TimeoutExpired as error:
                output = error.stderr or error.stdout or ''
                status, output = f'none: stopped after {args.timeout:.0f} s', (
                    output.decode(errors='replace') if isinstance(output, bytes) else output)
            seconds = time.time() - begun
            prune(repo)
            note = f'  [{"; ".join(notes)}]' if notes else ''
            if status == 0:
                done[shown] = number
                print(f'{head} ok       {seconds:5.1f} s  {step.doc}: {step.line}{note}', flush=True)
            else:
                failures += 1
                print(f'{head} FAILED   {seconds:5.1f} s  {step.doc}: {step.line}{note}\n'
                      f'        ran: python {shown}\n        exit status {status}; the end of its output:\n'
                      f'{tail(output)}', flush=True)
    print(f'docs-check: {failures} failed, in {time.time() - started:.0f} s', flush=True)
    if args.keep:
        print(f'docs-check: the copy is kept in {repo}')
    else:
        shutil.rmtree(target, ignore_errors=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', help='only the docs whose path contains one of these')
    parser.add_argument('--list', action='store_true', help='print the shrunk commands without running them')
    parser.add_argument('--keep', action='store_true', help='keep the temporary copy')
    parser.add_argument('--timeout', type=float, default=600, help='seconds before a command counts as failed')
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
