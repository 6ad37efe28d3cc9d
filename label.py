"""Label HALOs sample records and write them as feedback halos trains on.

    python label.py samples/run_samples.jsonl feedback.jsonl --reward-function data/task/reward.py:reward \
        --feedback pairwise --pair-mode max
    python label.py samples.jsonl feedback.jsonl --reward-model runs/rm/LATEST/hf --feedback binary --threshold median
    python label.py samples.jsonl feedback.jsonl --judge my-model --base-url http://127.0.0.1:8000/v1 --feedback scalar

The samples are what `eval.py ++mode=sample ++num_samples_per_prompt=k` writes (or any records with `prompt`,
`output` and optionally `prompt_id`, in JSON Lines, JSON or Parquet). Each sample is scored by a reward function
(`file.py:function` or `module:function`, called as function(prompt, completion, **the sample's own fields it
names) -> a number, or {name: number} parts whose sum is the score and which are written beside it; several
--reward-function score with the sum of their scores, weighted by --reward-weights, each written as a part), a
reward model (any HF sequence-classification model) or an LLM judge (a pointwise 1-10 score; every judgment is
cached, so a rerun asks nothing twice). A sample that gets no score is dropped and counted; fewer than --min-scored
of them scored, a labeller that fails or gives anything but a finite number, or feedback with nothing to train on
stops with one line and exit status 2. The feedback (binary, pairwise, scalar or best; see halos/labelling.py) is
written as JSON Lines, the format `datasets=[file]` reads; an existing output is replaced only where it holds
feedback (a rerun's), so samples given as the output by mistake are left as they were.
"""
import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from halos.errors import (ArgumentParser, DataError, UserError, exit_at_the_next_interrupt, finite_number, positive_int,
                          reported)
from halos.examples import prompt_digest
from halos.feedback import another_prompt, checked_turns, read_records
from halos.jsonl import check_distinct_files, read_json_lines, write_jsonl
from halos.labelers import make_labeler
from halos.labelling import (FEEDBACK_KINDS, FEEDBACK_OPTIONS, FEEDBACK_TYPES, PAIR_MODES, build_feedback, by_prompt,
                             kind_defaults, label_samples, one_class, scored_enough, unscored_note,
                             why_no_training_data)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(prog='label.py', description=__doc__.split('\n')[0])
    parser.add_argument('samples', help='sample records (JSON Lines, a JSON array or Parquet)')
    parser.add_argument('output', help='the feedback file to write (JSON Lines)')
    labeler = parser.add_mutually_exclusive_group(required=True)
    labeler.add_argument('--reward-function', action='append', metavar='FUNCTION',
                         help='path/to/file.py:function or module:function; given again for each of several, which '
                              'score with the sum of theirs')
    labeler.add_argument('--reward-model', help='an HF sequence-classification model (hub id or directory)')
    labeler.add_argument('--judge', help='the judge model name on an OpenAI-compatible server')
    parser.add_argument('--reward-weights', type=weights, metavar='W1,W2,...',
                        help='one weight per reward function, in their order (default: all 1); a negative first '
                             'one as --reward-weights=-1,2')
    parser.add_argument('--base-url', help='the judge server (default: OPENAI_BASE_URL, else OpenAI)')
    parser.add_argument('--cache', help='the judgment cache (default: <output without .jsonl>.judgments.jsonl)')
    parser.add_argument('--concurrency', type=positive_int, default=4, help='judge requests in flight at once')
    parser.add_argument('--max-length', type=positive_int,
                        help="the reward model's longest input, in tokens (default: the length a halos reward model "
                             "trained at, else 2048)")
    parser.add_argument('--feedback', choices=FEEDBACK_KINDS, default='pairwise')
    parser.add_argument('--threshold', type=threshold,
                        help='binary: mean, median (the default) or a number; pairwise: the least reward gap of a '
                             'pair (a number, default 0)')
    parser.add_argument('--per-prompt', action='store_true', help="binary: each prompt's own mean or median")
    parser.add_argument('--pair-mode', choices=PAIR_MODES, help='pairwise: how pairs are chosen (default max)')
    parser.add_argument('--seed', type=int, default=0, help='pairwise: the A/B order and the random pairs')
    parser.add_argument('--min-scored', type=share, default=0.5,
                        help='stop when the labeller scores fewer than this share of the samples')
    args = parser.parse_args(argv)
    if args.reward_weights and not args.reward_function:
        parser.error('--reward-weights weighs the functions of --reward-function')
    given = {'threshold': args.threshold is not None, 'per_prompt': args.per_prompt,
             'pair_mode': args.pair_mode is not None}
    for option, kinds in FEEDBACK_OPTIONS.items():
        if given[option] and args.feedback not in kinds:
            parser.error(f"--{option.replace('_', '-')} applies to --feedback {' or '.join(kinds)}, not "
                         f"{args.feedback}")
    if args.feedback == 'pairwise' and args.threshold in ('mean', 'median'):
        parser.error(f"--threshold {args.threshold}: --feedback pairwise takes the least reward gap of a pair, a "
                     f"number")
    args.threshold, args.pair_mode = kind_defaults(args.feedback, args.threshold, args.pair_mode)
    return args


def weights(text: str) -> List[float]:
    """Comma-separated finite numbers."""
    values = [finite_number(item) for item in text.split(',')]
    if None in values:
        raise argparse.ArgumentTypeError(f"{text} is not a comma-separated list of numbers")
    return values


def threshold(text: str):
    """mean, median or a finite number."""
    if text in ('mean', 'median'):
        return text
    value = finite_number(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text} is not mean, median or a number")
    return value


def share(text: str) -> float:
    """A number from 0 to 1."""
    value = finite_number(text)
    if value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def read_samples(path: str) -> List[dict]:
    """Sample records with `prompt` and `output`; a record without `prompt_id` gets a digest of its prompt."""
    records = read_records(path)
    samples = [checked_sample(record, f"{path}: record {number}") for number, record in enumerate(records, 1)]
    if not samples:
        raise DataError(f"{path}: the file holds no samples")
    first_of_prompt, seen = {}, set()
    for number, sample in enumerate(samples, 1):
        first, prompt = first_of_prompt.setdefault(sample['prompt_id'], (number, sample['prompt']))
        if prompt != sample['prompt']:
            raise another_prompt(f"{path}: record {number}", f"prompt_id {sample['prompt_id']}", f"record {first}")
        seen.add(json.dumps([sample['prompt'], sample['output']]))
    if len(seen) < len(samples):
        print(f"warning: {path}: {len(samples) - len(seen)} records repeat the prompt and output of an earlier one; "
              f"each is labelled, and trained on, as often as it appears")
    return samples


def checked_sample(record, where: str) -> dict:
    for field in ('prompt', 'output'):
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{where}: missing field '{field}'")
    checked_turns(record['prompt'], 'prompt', where)
    if not isinstance(record['output'], str):
        raise DataError(f"{where}: field 'output' must be a string (the sampled completion), got {record['output']!r}")
    given = record.get('prompt_id')
    return {**record, 'prompt_id': str(given) if given is not None else prompt_digest(record['prompt'])}


def check_replaceable(path: str) -> None:
    """The output replaces only a file of feedback records (a label.py run's, written again): samples given as
    the output by mistake (the arguments swapped, another run's samples) are left as they were."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        types = [record.get('type') for record in read_json_lines(path)]
    except DataError as error:
        reason = str(error)
    else:
        other = next((number for number, kind in enumerate(types, 1) if kind not in FEEDBACK_TYPES), None)
        if other is None:
            return
        reason = f"record {other} is not feedback: its 'type' is none of {', '.join(FEEDBACK_TYPES)}"
    raise DataError(f"output {path} holds something other than feedback that label.py wrote ({reason}): give the "
                    f"output another path (nothing was written)")


def run(args: argparse.Namespace) -> dict:
    cache = args.cache or args.output.rsplit('.jsonl', 1)[0] + '.judgments.jsonl'
    check_distinct_files({'samples': args.samples, 'output': args.output, '--cache': cache})
    check_replaceable(args.output)
    samples = read_samples(args.samples)
    kind = 'function' if args.reward_function else 'reward_model' if args.reward_model else 'judge'
    labeler = make_labeler(kind, args.reward_function, args.reward_model, args.judge, args.base_url, cache,
                           args.max_length, args.concurrency, reward_weights=args.reward_weights)
    labelled, counts = label_samples(samples, labeler)
    scored_enough(len(labelled), len(samples), args.min_scored, labeler, args.samples)
    records = build_feedback(labelled, args.feedback, args.threshold, args.per_prompt, args.pair_mode, args.seed)
    reason = why_no_training_data(labelled, records, args.feedback, args.threshold)
    if reason:
        reason += unscored_note(len(labelled), len(samples), labeler)
    if reason and len(by_prompt(samples)) == len(samples):  # as eval.py's mode=sample and mode=reward sample
        reason += ("; each prompt has one sample (eval.py ++mode=sample ++num_samples_per_prompt=k samples k per "
                   "prompt; eval.py ++mode=reward measures a policy by one per prompt)")
    if reason:
        raise DataError(f"{args.samples}: no {args.feedback} feedback to write: {reason}")
    lopsided = one_class(records, args.feedback, args.threshold)
    if lopsided:
        print(f"warning: {args.samples} (--threshold): {lopsided}", file=sys.stderr)
    write_jsonl(args.output, records)
    return {'samples': len(samples), **counts, 'feedback records': len(records)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        counts = run(args)
    except UserError as error:
        return reported('label.py', error)
    except KeyboardInterrupt:
        exit_at_the_next_interrupt()
        print(f"\nlabel.py: interrupted before {args.output} was written (a judge's answers so far are cached for "
              f"the rerun)", file=sys.stderr)
        return 130
    print(f"wrote {counts['feedback records']} {args.feedback} feedback records to {args.output} "
          f"({', '.join(f'{k} {v}' for k, v in counts.items() if k != 'feedback records')})")
    return 0


if __name__ == '__main__':
    sys.exit(main())
