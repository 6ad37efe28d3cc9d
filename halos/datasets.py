"""Hub datasets: one `get_<name>` parser per dataset, registered in `DATASETS`, and `load_dataset`.

A parser `get_<name>(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix, data_dir=None)`
returns a `Dataset` of `Example`s. It reads the Hugging Face hub by default, or
`<data_dir>/<name>/<split>.jsonl` (or `.parquet`) in the hub's raw schema when `data_dir` is given.
A name that is a path to a `.json`, `.jsonl` or `.parquet` file is read as a feedback file (halos.feedback).
"""
import inspect
import math
import os
import random
import re
from typing import Callable, Dict, List, Optional, Tuple

from halos.errors import DataError, HubUnavailableError, MissingFileError, shortened
from halos.examples import Dataset, Example, Formatting, add_comparison
from halos.feedback import FILE_TYPES, checked_turns, file_type, get_feedback_file, read_records

NUMBER, OPTIONAL_NUMBER, INTEGER, TEXT, OPTIONAL_TEXT, LIST = (
    (int, float), (int, float, type(None)), (int,), (str,), (str, type(None)), (list,))
TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a string', list: 'a list', type(None): 'null'}


def load_raw_records(name: str, split: str, data_dir: Optional[str], hub_id: str, hub_split: str,
                     hub_data_dir: Optional[str] = None,
                     fields: Optional[Dict[str, tuple]] = None) -> Tuple[List[Dict], str]:
    """Raw records of one dataset split, from `<data_dir>/<name>/<split>.{jsonl,parquet}` or the hub, each
    checked for the `fields` its parser reads (name -> the types allowed, e.g. {'prompt': (str,)}).

    Returns the records and a description of their origin for messages.
    """
    if data_dir is not None:
        for extension in ('jsonl', 'json', 'parquet'):
            path = os.path.join(data_dir, name, f'{split}.{extension}')
            if os.path.exists(path):
                return checked_records(read_records(path), path, fields), path
        raise MissingFileError(
            f"dataset '{name}': no file {os.path.join(data_dir, name, split)}.jsonl (or .json, .parquet) under "
            f"data_dir={data_dir}")
    import datasets
    try:
        records = datasets.load_dataset(hub_id, data_dir=hub_data_dir, split=hub_split)
    except Exception as error:
        raise HubUnavailableError(
            f"dataset '{name}': could not fetch {hub_id} (split {hub_split}) from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Offline? Put the raw records in DIR/{name}/{split}.jsonl "
            f"and pass ++data_dir=DIR (this repo ships samples: ++data_dir=data).") from error
    source = f'{hub_id}:{hub_split}'
    return checked_records(list(records), source, fields), source


def checked_records(rows: List, source: str, fields: Optional[Dict[str, tuple]]) -> List[Dict]:
    """`rows`, when each is an object with `fields` of the allowed types (no `fields`: unchecked); else the first
    bad one, named."""
    for number, row in enumerate(rows if fields else (), 1):
        where = f'{source} record {number}'
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with the fields {', '.join(fields)}, got "
                            f"{type(row).__name__} (a local copy of a hub dataset keeps the hub's schema)")
        for name, types in fields.items():
            if name not in row:
                raise DataError(f"{where}: missing field '{name}' (a local copy of a hub dataset keeps the hub's "
                                f"schema: {', '.join(fields)})")
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, types):
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + '...'
                allowed = [TYPE_NAMES[t] for t in types if not (t is int and float in types)]  # an int is a number
                raise DataError(f"{where}: field '{name}' must be {' or '.join(allowed)}, got {shown}")
    return rows


def get_shp(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
            data_dir: Optional[str] = None, seed: int = 0) -> Dataset:
    """Stanford Human Preferences (stanfordnlp/SHP).

    Train split: rows whose score ratio max(A/B, B/A) is below 2 are dropped, and each prompt keeps
    at most 5 of its pairs (a seeded sample). The test split keeps every row. The SFT target is the
    first response added for the prompt.
    """
    formatting = Formatting(human_prefix, human_suffix, assistant_prefix, assistant_suffix)
    rows, source = load_raw_records('shp', split, data_dir, 'stanfordnlp/SHP', split, fields={
        'history': TEXT, 'human_ref_A': TEXT, 'human_ref_B': TEXT, 'score_A': NUMBER, 'score_B': NUMBER,
        'labels': INTEGER})
    dataset = Dataset('shp')
    dataset.counts['records'] = len(rows)
    for number, row in enumerate(rows, 1):
        if row['labels'] not in (0, 1):
            raise DataError(f"{source} record {number}: field 'labels' is {row['labels']}; SHP's is 1 (human_ref_A "
                            f"preferred) or 0 (human_ref_B preferred)")
        low, high = sorted((row['score_A'], row['score_B']))
        ratio = high / low if low > 0 else math.inf
        if split == 'train' and ratio < 2:
            dataset.counts['dropped: score ratio < 2'] += 1
            continue
        add_comparison(dataset, [{'role': 'user', 'content': row['history']}], (row['human_ref_A'], row['human_ref_B']),
                       0 if row['labels'] == 1 else 1, formatting, f'{source} record {number}',
                       scores=(row['score_A'], row['score_B']), truncation_mode='keep_start')
    if split == 'train':
        rng = random.Random(seed)
        for example in dataset.data.values():
            if len(example.pairs) > 5:
                dataset.counts['pairs dropped: more than 5 per prompt'] += len(example.pairs) - 5
                example.pairs = rng.sample(example.pairs, 5)
    return dataset


HH_TURN = re.compile(r'\n\n(Human|Assistant): ')


def _load_hh(name: str, hub_data_dir: Optional[str], split: str, formatting: Formatting,
             data_dir: Optional[str]) -> Dataset:
    """Anthropic HH-RLHF: the prompt is the transcript up to the last assistant marker."""
    rows, source = load_raw_records(name, split, data_dir, 'Anthropic/hh-rlhf', split, hub_data_dir,
                                    fields={'chosen': TEXT, 'rejected': TEXT})
    dataset = Dataset(name)
    dataset.counts['records'] = len(rows)
    marker = '\n\nAssistant: '
    for number, row in enumerate(rows, 1):
        cut = row['chosen'].rfind(marker) + len(marker)
        history = row['chosen'][:cut]
        if cut < len(marker):
            raise DataError(f"{source} record {number}: field 'chosen' has no '\\n\\nAssistant: ' marker (HH writes "
                            f"each turn as '\\n\\nHuman: ...' or '\\n\\nAssistant: ...')")
        if not row['rejected'].startswith(history):
            raise DataError(f"{source} record {number}: field 'rejected' does not share the history of 'chosen' "
                            f"up to the last '\\n\\nAssistant: ' marker")
        chosen, rejected = row['chosen'][cut:], row['rejected'][cut:]
        if not chosen.strip() or not rejected.strip():
            dataset.counts['dropped: empty completion'] += 1
            continue
        before, *pieces = HH_TURN.split(history)  # before the first marker; then [role, text, ..., 'Assistant', '']
        if before.strip():  # a first turn without its marker would vanish from the prompt
            dataset.counts["dropped: text before the first '\\n\\nHuman: '"] += 1
            continue
        turns = [{'role': 'user' if role == 'Human' else 'assistant', 'content': text.strip()}
                 for role, text in zip(pieces[0:-2:2], pieces[1:-2:2])]
        add_comparison(dataset, turns, (chosen, rejected), 0, formatting, f'{source} record {number}')
    return dataset


def _hh_subset(name: str, hub_data_dir: Optional[str], description: str) -> Callable[..., Dataset]:
    """The dataset function of one HH-RLHF subset (`hub_data_dir` on the hub; None: all of them)."""
    def get(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
            data_dir: Optional[str] = None) -> Dataset:
        formatting = Formatting(human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        return _load_hh(name, hub_data_dir, split, formatting, data_dir)
    get.__name__, get.__qualname__, get.__doc__ = f'get_{name}', f'get_{name}', description
    return get


get_hh = _hh_subset('hh', None, 'Anthropic HH-RLHF, all preference subsets (Anthropic/hh-rlhf).')
get_hh_helpful = _hh_subset('hh_helpful', 'helpful-base', 'The helpful-base subset of Anthropic HH-RLHF.')
get_hh_harmless = _hh_subset('hh_harmless', 'harmless-base', 'The harmless-base subset of Anthropic HH-RLHF.')


def get_oasst(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
              data_dir: Optional[str] = None) -> Dataset:
    """OpenAssistant oasst1, English only; `test` reads the hub's validation split.

    Every ranked assistant reply of rank k > 0 is paired with its English sibling of rank k - 1
    (the next better reply), so a ranking a > b > c gives the pairs (a, b) and (b, c). The prompt is
    the conversation from the root down to the replies' parent. A reply's score is minus its rank (a higher
    score is better, as GRPO reads scores); the SFT target is the best-ranked reply of the prompt.
    """
    formatting = Formatting(human_prefix, human_suffix, assistant_prefix, assistant_suffix)
    rows, source = load_raw_records('oasst', split, data_dir, 'OpenAssistant/oasst1',
                                    'validation' if split == 'test' else split, fields={
                                        'message_id': TEXT, 'parent_id': OPTIONAL_TEXT, 'rank': OPTIONAL_NUMBER,
                                        'role': TEXT, 'text': TEXT, 'lang': TEXT})
    dataset = Dataset('oasst')
    dataset.counts['records'] = len(rows)
    numbered = [(number, row) for number, row in enumerate(rows, 1) if row['lang'] == 'en']
    dataset.counts['dropped: not English'] = len(rows) - len(numbered)
    by_id = {row['message_id']: row for _, row in numbered}
    by_parent_and_rank = {(row['parent_id'], row['rank']): row for _, row in numbered if row['rank'] is not None}

    for number, row in numbered:
        if row['rank'] is None or row['rank'] == 0:
            continue
        if row['role'] != 'assistant':
            dataset.counts['dropped: ranked prompter reply'] += 1
            continue
        better = by_parent_and_rank.get((row['parent_id'], row['rank'] - 1))
        if better is None:
            dataset.counts['dropped: no English sibling of the next better rank'] += 1
            continue
        path, parent_id = [], row['parent_id']
        while parent_id is not None and parent_id in by_id:
            if len(path) > len(by_id):  # a message among its own ancestors: no root to reach
                raise DataError(f"{source} record {number}: field 'parent_id' leads into a loop of messages "
                                f"({parent_id!r} is among its own ancestors), not up to a root message")
            path.append(by_id[parent_id])
            parent_id = by_id[parent_id]['parent_id']
        if parent_id is not None:
            dataset.counts['dropped: ancestor not English or missing'] += 1
            continue
        turns = [{'role': 'assistant' if message['role'] == 'assistant' else 'user', 'content': message['text']}
                 for message in reversed(path)]
        example = add_comparison(dataset, turns, (better['text'], row['text']), 0, formatting,
                                 f'{source} record {number}', scores=(-float(better['rank']), -float(row['rank'])))
        example.sft_index = max(range(len(example.scores)), key=lambda i: example.scores[i])
    return dataset


def get_ultrabin(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
                 data_dir: Optional[str] = None) -> Dataset:
    """UltraFeedback binarized (HuggingFaceH4/ultrafeedback_binarized, *_prefs splits)."""
    formatting = Formatting(human_prefix, human_suffix, assistant_prefix, assistant_suffix)
    rows, source = load_raw_records('ultrabin', split, data_dir, 'HuggingFaceH4/ultrafeedback_binarized',
                                    f'{split}_prefs', fields={'prompt': TEXT, 'chosen': LIST, 'rejected': LIST})
    dataset = Dataset('ultrabin')
    dataset.counts['records'] = len(rows)
    for number, row in enumerate(rows, 1):
        where = f'{source} record {number}'
        replies = [checked_turns(row[name], name, where)[-1] for name in ('chosen', 'rejected')]
        for name, reply in zip(('chosen', 'rejected'), replies):
            if reply['role'] != 'assistant':
                raise DataError(f"{where}: field '{name}' ends with a {reply['role']} turn, not the assistant's reply")
        chosen, rejected = (reply['content'] for reply in replies)
        if not chosen.strip() or not rejected.strip():
            dataset.counts['dropped: empty completion'] += 1
            continue
        add_comparison(dataset, [{'role': 'user', 'content': row['prompt']}], (chosen, rejected), 0, formatting,
                       where, truncation_mode='keep_start')
    return dataset


def get_alpacaeval(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
                   data_dir: Optional[str] = None) -> Dataset:
    """AlpacaEval instructions with their reference outputs (test only; for sampling)."""
    if split != 'test':
        raise DataError("alpacaeval has only a test split")
    formatting = Formatting(human_prefix, human_suffix, assistant_prefix, assistant_suffix)
    rows, source = load_raw_records('alpacaeval', split, data_dir, 'tatsu-lab/alpaca_eval', 'eval',
                                    fields={'instruction': TEXT, 'output': TEXT, 'dataset': TEXT})
    dataset = Dataset('alpacaeval')
    dataset.counts['records'] = len(rows)
    for number, row in enumerate(rows, 1):
        turns = [{'role': 'user', 'content': row['instruction']}]
        prompt = formatting.prompt(turns)
        example = dataset[prompt]
        example.prompt, example.turns = prompt, turns
        example.generations.append(row['output'] + assistant_suffix)
        example.sft_index = -1
        example.dataset_name = row['dataset']
        example.original_prompt = row['instruction']
        example.source = example.source or f'{source} record {number}'
    return dataset


DATASETS: Dict[str, Callable[..., Dataset]] = {
    'shp': get_shp,
    'hh': get_hh,
    'hh_helpful': get_hh_helpful,
    'hh_harmless': get_hh_harmless,
    'oasst': get_oasst,
    'ultrabin': get_ultrabin,
    'alpacaeval': get_alpacaeval,
}


def is_feedback_file(name: str) -> bool:
    return file_type(name) in FILE_TYPES


def check_dataset_name(name: str) -> None:
    """Stop unless `name` is a registered dataset or a feedback file that exists."""
    if is_feedback_file(name):
        if not os.path.exists(name):
            raise MissingFileError(f"{name}: no such file (a .json/.jsonl/.parquet file of feedback records or "
                                   f"prompts)")
    elif name in DATASETS:
        return
    elif os.path.isdir(name):
        files = [os.path.join(name, f) for f in sorted(os.listdir(name)) if is_feedback_file(f)]
        if not files:
            raise DataError(f"dataset '{name}' is a directory with no .json/.jsonl/.parquet file; valid names: "
                            f"{', '.join(sorted(DATASETS))}, or a path to a .json/.jsonl/.parquet feedback file")
        listed = ','.join(files[:3]) + (',...' if len(files) > 3 else '')
        raise DataError(f"dataset '{name}' is a directory: name its .json/.jsonl/.parquet files "
                        f"(datasets=[{listed}])")
    else:
        raise DataError(f"unknown dataset '{name}'; valid names: {', '.join(sorted(DATASETS))}, "
                        f"or a path to a .json/.jsonl/.parquet feedback file")


def raw_hub_file_note(path: str) -> str:
    """Where a file given as feedback lies as ++data_dir keeps a registered dataset's raw hub records
    (DIR/<name>/<split>.jsonl): how to read it as that dataset."""
    directory, name = os.path.split(os.path.dirname(os.path.abspath(path)))
    split = os.path.splitext(os.path.basename(path))[0]
    if name not in DATASETS or split not in ('train', 'test'):
        return ''
    return (f" (it lies as ++data_dir keeps the hub's raw '{name}' records, which are not feedback records: give "
            f"datasets=[{name}] ++data_dir={os.path.relpath(directory)})")


def load_dataset(name: str, split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                 assistant_suffix: str, data_dir: Optional[str] = None, seed: int = 0) -> Dataset:
    """A registered dataset by name, or a feedback file by path. `seed` goes to the dataset functions that
    sample (those with a `seed` parameter, such as get_shp)."""
    formatting = (human_prefix, human_suffix, assistant_prefix, assistant_suffix)
    check_dataset_name(name)
    if is_feedback_file(name):
        try:
            return get_feedback_file(name, split, *formatting)
        except DataError as error:
            note = raw_hub_file_note(name)
            if not note:
                raise
            raise type(error)(f"{error}{note}") from None
    get = DATASETS[name]
    options = {'seed': seed} if 'seed' in inspect.signature(get).parameters else {}
    return checked_dataset(get(split, *formatting, data_dir=data_dir, **options), f"dataset {name} ({get.__name__})")


def checked_dataset(dataset, where: str):
    """What a dataset function returned, once it is a Dataset whose Examples hold what the loaders read (a
    function of one's own that gives anything else stops here, naming itself and the prompt, instead of
    training on something else or failing deep inside a loader)."""
    if not isinstance(dataset, Dataset):
        raise DataError(f"{where} returned {type(dataset).__name__}, not a halos.examples.Dataset")
    for key, example in dataset.items():
        problem = example_problem(example)
        if problem:
            raise DataError(f"{where}: the Example of prompt {key[:60]!r}: {problem}")
    return dataset


def example_problem(example: Example) -> Optional[str]:
    """What in an Example the loaders cannot read, in a few words (None: nothing)."""
    if not isinstance(example.prompt, str) or not example.prompt:
        return f"prompt is {example.prompt!r}, not a formatted prompt string"
    generations = example.generations
    if not isinstance(generations, list) or not all(isinstance(text, str) for text in generations):
        return f"generations is {shortened(generations)}, not a list of completion strings"
    for name in ('desirable', 'scores', 'weights'):
        values = getattr(example, name)
        if values and len(values) != len(generations):
            return f"{name} holds {len(values)} values for its {len(generations)} generations: give one per generation"
    for pair in example.pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and
                all(isinstance(i, int) and 0 <= i < len(generations) for i in pair)):
            return f"pair {pair!r} is not two indices of its {len(generations)} generations"
        if pair[0] == pair[1]:
            return f"pair {pair!r} prefers a generation to itself"
    if generations and not example.demonstrated and not -len(generations) <= example.sft_index < len(generations):
        return f"sft_index {example.sft_index} is not an index of its {len(generations)} generations"
    return None

