"""Data: the HALOs data model, dataset functions and the batch loaders.

A dataset function `get_<name>(split, human_prefix, human_suffix, assistant_prefix, assistant_suffix)`
returns a `Dataset`: an ordered mapping from the formatted prompt to an `Example` that holds all
completions of that prompt, their pairwise preferences and/or unary labels. Loaders flatten the
Examples into training items (one per prompt for SFT, one per pair for DPO-style losses, one per
desirable or undesirable completion for KTO-style losses), shuffle them with a seeded RNG, tokenize
lazily and yield padded batches.

Where the data lives: every dataset function reads the Hugging Face hub by default, or
`<data_dir>/<name>/<split>.jsonl` (or `.parquet`) in the hub's raw schema when `data_dir` is given.
A name that is a path to a `.json`/`.jsonl` file is read as binary or pairwise feedback.
"""
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from utils import rank0_print


class DataError(ValueError):
    """Bad input data; the message names the file (or dataset), the record and the field."""


@dataclass
class Example:
    """One prompt and everything known about its completions."""
    prompt: str = ''                      # formatted prompt, ending with assistant_prefix
    turns: List[Dict[str, str]] = field(default_factory=list)  # the prompt as chat turns {'role', 'content'}
    generations: List[str] = field(default_factory=list)       # completions, each ending with assistant_suffix
    sft_index: int = -1                   # index of the SFT target in generations
    scores: List[float] = field(default_factory=list)          # one per generation, when the data has them
    pairs: List[Tuple[int, int]] = field(default_factory=list)  # (i, j): generations[i] preferred to generations[j]
    desirable: List[bool] = field(default_factory=list)        # unary labels, one per generation (binary feedback)
    truncation_mode: str = 'keep_end'     # keep the start or the end of an over-long prompt
    dataset_name: str = ''
    original_prompt: str = ''             # the raw instruction (AlpacaEval)
    source: str = ''                      # where the first record of this prompt came from, for error messages

    def num_generations(self) -> int:
        return len(self.generations)

    def remove_extra_spaces(self) -> None:
        """Replace every run of two or more spaces or tabs by one space (prompt and generations)."""
        collapse = lambda text: re.sub(r'[ \t]{2,}', ' ', text)
        self.prompt = collapse(self.prompt)
        self.generations = [collapse(g) for g in self.generations]
        self.turns = [dict(turn, content=collapse(turn['content'])) for turn in self.turns]


class Dataset:
    """Ordered mapping prompt -> Example; a missing key creates an empty Example.

    `counts` records how many raw records were read and how many each filter dropped, so that
    nothing is skipped silently.
    """

    def __init__(self, name: str):
        self.name = name
        self.data: Dict[str, Example] = {}
        self.counts: Counter = Counter()

    def __getitem__(self, key: str) -> Example:
        if key not in self.data:
            self.data[key] = Example()
        return self.data[key]

    def __setitem__(self, key: str, example: Example) -> None:
        if not isinstance(key, str) or not isinstance(example, Example):
            raise TypeError("a Dataset maps str prompts to Example objects")
        self.data[key] = example

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        return iter(self.data)

    def items(self):
        return self.data.items()

    def num_pairs(self) -> int:
        return sum(len(example.pairs) for example in self.data.values())


# ---------------------------------------------------------------- formatting

def render_turns(turns: List[Dict[str, str]], human_prefix: str, human_suffix: str,
                 assistant_prefix: str, assistant_suffix: str) -> str:
    """Prompt string: each turn as prefix + text + suffix of its role, then assistant_prefix.

    A system turn is written as its bare text before the first human turn.
    """
    rendered = []
    for turn in turns:
        if turn['role'] == 'assistant':
            rendered.append(assistant_prefix + turn['content'] + assistant_suffix)
        elif turn['role'] == 'system':
            rendered.append(turn['content'])
        else:
            rendered.append(human_prefix + turn['content'] + human_suffix)
    return ''.join(rendered) + assistant_prefix


# ---------------------------------------------------------------- raw records

def load_raw_records(name: str, split: str, data_dir: Optional[str], hub_id: str,
                     hub_split: str, hub_data_dir: Optional[str] = None) -> Tuple[List[Dict], str]:
    """Raw records of one dataset split, from `<data_dir>/<name>/<split>.{jsonl,parquet}` or the hub.

    Returns the records and a description of their origin for messages.
    """
    import datasets
    if data_dir is not None:
        for extension, builder in (('jsonl', 'json'), ('json', 'json'), ('parquet', 'parquet')):
            path = os.path.join(data_dir, name, f'{split}.{extension}')
            if os.path.exists(path):
                records = datasets.load_dataset(builder, data_files=path, split='train')
                return list(records), path
        raise FileNotFoundError(
            f"dataset '{name}': no file {os.path.join(data_dir, name, split)}.jsonl (or .parquet) under data_dir={data_dir}")
    try:
        records = datasets.load_dataset(hub_id, data_dir=hub_data_dir, split=hub_split)
    except Exception as error:
        raise ConnectionError(
            f"dataset '{name}': could not fetch {hub_id} (split {hub_split}) from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Offline? Put the raw records in DIR/{name}/{split}.jsonl "
            f"and pass ++data_dir=DIR (this repo ships samples: ++data_dir=data).") from error
    return list(records), f'{hub_id}:{hub_split}'


# ---------------------------------------------------------------- hub datasets

def get_shp(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
            data_dir: Optional[str] = None, seed: int = 0) -> Dataset:
    """Stanford Human Preferences (stanfordnlp/SHP).

    Train split: rows whose score ratio max(A/B, B/A) is below 2 are dropped, and each prompt keeps
    at most 5 of its pairs (a seeded sample). The test split keeps every row. The SFT target is the
    first response added for the prompt.
    """
    rows, source = load_raw_records('shp', split, data_dir, 'stanfordnlp/SHP', split)
    dataset = Dataset('shp')
    dataset.counts['records'] = len(rows)
    for number, row in enumerate(rows, 1):
        ratio = max(row['score_A'] / row['score_B'], row['score_B'] / row['score_A'])
        if split == 'train' and ratio < 2:
            dataset.counts['dropped: score ratio < 2'] += 1
            continue
        turns = [{'role': 'user', 'content': row['history']}]
        prompt = render_turns(turns, human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        example = dataset[prompt]
        n = example.num_generations()
        example.prompt, example.turns = prompt, turns
        example.generations += [row['human_ref_A'] + assistant_suffix, row['human_ref_B'] + assistant_suffix]
        example.scores += [row['score_A'], row['score_B']]
        example.pairs.append((n, n + 1) if row['labels'] == 1 else (n + 1, n))
        example.sft_index = 0
        example.truncation_mode = 'keep_start'
        example.dataset_name = 'shp'
        example.source = example.source or f'{source} record {number}'
        example.remove_extra_spaces()

    if split == 'train':
        rng = random.Random(seed)
        for example in dataset.data.values():
            if len(example.pairs) > 5:
                dataset.counts['pairs dropped: more than 5 per prompt'] += len(example.pairs) - 5
                example.pairs = rng.sample(example.pairs, 5)
    return dataset


HH_TURN = re.compile(r'\n\n(Human|Assistant): ')


def _load_hh(name: str, hub_data_dir: Optional[str], split: str, human_prefix: str, human_suffix: str,
             assistant_prefix: str, assistant_suffix: str, data_dir: Optional[str]) -> Dataset:
    """Anthropic HH-RLHF: the prompt is the transcript up to the last assistant marker."""
    rows, source = load_raw_records(name, split, data_dir, 'Anthropic/hh-rlhf', split, hub_data_dir)
    dataset = Dataset(name)
    dataset.counts['records'] = len(rows)
    marker = '\n\nAssistant: '
    for number, row in enumerate(rows, 1):
        cut = row['chosen'].rfind(marker) + len(marker)
        history = row['chosen'][:cut]
        if cut < len(marker) or not row['rejected'].startswith(history):
            raise DataError(f"{source} record {number}: field 'rejected' does not share the history of 'chosen' "
                            f"up to the last '\\n\\nAssistant: ' marker")
        chosen, rejected = row['chosen'][cut:], row['rejected'][cut:]
        if not chosen.strip() or not rejected.strip():
            dataset.counts['dropped: empty completion'] += 1
            continue
        pieces = HH_TURN.split(history)[1:]  # [role, text, role, text, ..., 'Assistant', '']
        turns = [{'role': 'user' if role == 'Human' else 'assistant', 'content': text.strip()}
                 for role, text in zip(pieces[0:-2:2], pieces[1:-2:2])]
        prompt = render_turns(turns, human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        example = dataset[prompt]
        n = example.num_generations()
        example.prompt, example.turns = prompt, turns
        example.generations += [chosen + assistant_suffix, rejected + assistant_suffix]
        example.pairs.append((n, n + 1))
        example.sft_index = 0
        example.dataset_name = name
        example.source = example.source or f'{source} record {number}'
        example.remove_extra_spaces()
    return dataset


def get_hh(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
           data_dir: Optional[str] = None) -> Dataset:
    """Anthropic HH-RLHF, all preference subsets (Anthropic/hh-rlhf)."""
    return _load_hh('hh', None, split, human_prefix, human_suffix, assistant_prefix, assistant_suffix, data_dir)


def get_hh_helpful(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
                   data_dir: Optional[str] = None) -> Dataset:
    """The helpful-base subset of Anthropic HH-RLHF."""
    return _load_hh('hh_helpful', 'helpful-base', split, human_prefix, human_suffix, assistant_prefix,
                    assistant_suffix, data_dir)


def get_hh_harmless(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
                    data_dir: Optional[str] = None) -> Dataset:
    """The harmless-base subset of Anthropic HH-RLHF."""
    return _load_hh('hh_harmless', 'harmless-base', split, human_prefix, human_suffix, assistant_prefix,
                    assistant_suffix, data_dir)


def get_oasst(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
              data_dir: Optional[str] = None) -> Dataset:
    """OpenAssistant oasst1, English only; `test` reads the hub's validation split.

    Every ranked assistant reply of rank k > 0 is paired with its English sibling of rank k - 1
    (the next better reply), so a ranking a > b > c gives the pairs (a, b) and (b, c). The prompt is
    the conversation from the root down to the replies' parent. The SFT target is the best-ranked
    reply of the prompt.
    """
    rows, source = load_raw_records('oasst', split, data_dir, 'OpenAssistant/oasst1',
                                    'validation' if split == 'test' else split)
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
            path.append(by_id[parent_id])
            parent_id = by_id[parent_id]['parent_id']
        if parent_id is not None:
            dataset.counts['dropped: ancestor not English or missing'] += 1
            continue
        turns = [{'role': 'assistant' if message['role'] == 'assistant' else 'user', 'content': message['text']}
                 for message in reversed(path)]
        prompt = render_turns(turns, human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        example = dataset[prompt]
        n = example.num_generations()
        example.prompt, example.turns = prompt, turns
        example.generations += [better['text'] + assistant_suffix, row['text'] + assistant_suffix]
        example.scores += [float(better['rank']), float(row['rank'])]
        example.pairs.append((n, n + 1))
        example.sft_index = min(range(len(example.scores)), key=lambda i: example.scores[i])
        example.dataset_name = 'oasst'
        example.source = example.source or f'{source} record {number}'
        example.remove_extra_spaces()
    return dataset


def get_ultrabin(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
                 data_dir: Optional[str] = None) -> Dataset:
    """UltraFeedback binarized (HuggingFaceH4/ultrafeedback_binarized, *_prefs splits)."""
    rows, source = load_raw_records('ultrabin', split, data_dir, 'HuggingFaceH4/ultrafeedback_binarized',
                                    f'{split}_prefs')
    dataset = Dataset('ultrabin')
    dataset.counts['records'] = len(rows)
    for number, row in enumerate(rows, 1):
        turns = [{'role': 'user', 'content': row['prompt']}]
        prompt = render_turns(turns, human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        example = dataset[prompt]
        n = example.num_generations()
        example.prompt, example.turns = prompt, turns
        example.generations += [row['chosen'][-1]['content'] + assistant_suffix,
                                row['rejected'][-1]['content'] + assistant_suffix]
        example.pairs.append((n, n + 1))
        example.sft_index = 0
        example.truncation_mode = 'keep_start'
        example.dataset_name = 'ultrabin'
        example.source = example.source or f'{source} record {number}'
        example.remove_extra_spaces()
    return dataset


def get_alpacaeval(split: str, human_prefix: str, human_suffix: str, assistant_prefix: str, assistant_suffix: str,
                   data_dir: Optional[str] = None) -> Dataset:
    """AlpacaEval instructions with their reference outputs (test only; for sampling)."""
    if split != 'test':
        raise ValueError("alpacaeval has only a test split")
    rows, source = load_raw_records('alpacaeval', split, data_dir, 'tatsu-lab/alpaca_eval', 'eval')
    dataset = Dataset('alpacaeval')
    dataset.counts['records'] = len(rows)
    for number, row in enumerate(rows, 1):
        turns = [{'role': 'user', 'content': row['instruction']}]
        prompt = render_turns(turns, human_prefix, human_suffix, assistant_prefix, assistant_suffix)
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


# ---------------------------------------------------------------- local feedback files

def read_json_records(path: str) -> List[Dict]:
    """Records of a JSON array file or a JSON Lines file; errors name the file and record."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    if path.endswith('.jsonl'):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: record {len(records) + 1} (line {number}) is not valid JSON: {error.msg} "
                                f"(column {error.colno})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of feedback records, got {type(records).__name__}")
    return records


def _field(record: Dict, name: str, where: str):
    if name not in record:
        raise DataError(f"{where}: missing field '{name}'")
    return record[name]


def _turns(value, name: str, where: str) -> List[Dict[str, str]]:
    """A prompt or output given as a string or a list of {'role', 'content'} turns."""
    if isinstance(value, str):
        return [{'role': 'user' if name == 'prompt' else 'assistant', 'content': value}]
    if not isinstance(value, list) or not value or not all(
            isinstance(t, dict) and isinstance(t.get('content'), str) and 'role' in t for t in value):
        raise DataError(f"{where}: field '{name}' must be a string or a non-empty list of "
                        f"{{'role', 'content'}} turns")
    return [{'role': t['role'], 'content': t['content']} for t in value]


def _completion(record: Dict, name: str, where: str) -> str:
    turns = _turns(_field(record, name, where), name, where)
    if len(turns) != 1:
        raise DataError(f"{where}: field '{name}' has {len(turns)} turns; a completion must be one assistant turn")
    if not turns[0]['content'].strip():
        raise DataError(f"{where}: field '{name}' is an empty completion")
    return turns[0]['content']


def _label(record: Dict, where: str) -> bool:
    label = _field(record, 'label', where)
    if isinstance(label, bool) or (isinstance(label, int) and label in (0, 1)):
        return bool(label)
    raise DataError(f"{where}: field 'label' must be true/false or 0/1, got {label!r}")


def _score(record: Dict, name: str, where: str) -> Optional[float]:
    if name not in record or record[name] is None:
        return None
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    return float(value)


def get_feedback_file(path: str, split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                      assistant_suffix: str) -> Dataset:
    """A user's own feedback: binary {prompt, output, label} or pairwise {prompt, output_A, output_B, label}.

    Records group by `prompt_id`, or by prompt text when there is none. A record with a `split`
    field is used only for that split; one without is used for both.
    Binary: each output is desirable or not; the SFT target is the first desirable output.
    Pairwise: label 1 means output_A is preferred; identical outputs of one prompt are stored once.
    One prompt's records are all binary or all pairwise.
    """
    dataset = Dataset(os.path.basename(path))
    records = read_json_records(path)
    dataset.counts['records'] = len(records)
    for number, record in enumerate(records, 1):
        where = f'{path}: record {number}'
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if record.get('split', split) != split:
            dataset.counts[f"skipped: split is not '{split}'"] += 1
            continue
        pairwise = 'output_A' in record or 'output_B' in record or record.get('type') == 'pairwise_feedback'
        turns = _turns(_field(record, 'prompt', where), 'prompt', where)
        prompt = render_turns(turns, human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        key = f"prompt_id {record['prompt_id']}" if record.get('prompt_id') is not None else prompt
        example = dataset[key]
        example.prompt, example.turns = prompt, turns
        example.dataset_name = dataset.name
        example.source = example.source or where
        label = _label(record, where)
        if (example.pairs and not pairwise) or (example.desirable and pairwise):
            raise DataError(f"{where}: this prompt already has {'pairwise' if example.pairs else 'binary'} feedback "
                            f"(first at {example.source}); the records of one prompt must be all binary or all pairwise")
        if pairwise:
            outputs = [_completion(record, 'output_A', where), _completion(record, 'output_B', where)]
            rewards = [_score(record, 'reward_A', where), _score(record, 'reward_B', where)]
            indices = []
            for output, reward in zip(outputs, rewards):
                text = output + assistant_suffix
                if text not in example.generations:
                    example.generations.append(text)
                    example.scores.append(reward)
                indices.append(example.generations.index(text))
            example.pairs.append(tuple(indices) if label else tuple(reversed(indices)))
        else:
            example.generations.append(_completion(record, 'output', where) + assistant_suffix)
            example.desirable.append(label)
            example.scores.append(_score(record, 'reward', where))
        example.remove_extra_spaces()

    for example in dataset.data.values():
        if example.desirable:
            example.sft_index = example.desirable.index(True) if True in example.desirable else \
                max(range(len(example.scores)), key=lambda i: example.scores[i] or -math.inf)
        elif all(score is not None for score in example.scores):
            example.sft_index = max(range(len(example.scores)), key=lambda i: example.scores[i])
        else:
            example.sft_index = example.pairs[0][0]
    return dataset


def load_dataset(name: str, split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                 assistant_suffix: str, data_dir: Optional[str] = None, seed: int = 0) -> Dataset:
    """A registered dataset by name, or a feedback file by path."""
    formatting = (human_prefix, human_suffix, assistant_prefix, assistant_suffix)
    if name.endswith('.json') or name.endswith('.jsonl'):
        if not os.path.exists(name):
            raise FileNotFoundError(f"feedback file '{name}' does not exist")
        return get_feedback_file(name, split, *formatting)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; valid names: {', '.join(sorted(DATASETS))}, "
                         f"or a path to a .json/.jsonl feedback file")
    if name == 'shp':
        return get_shp(split, *formatting, data_dir=data_dir, seed=seed)
    return DATASETS[name](split, *formatting, data_dir=data_dir)


# ---------------------------------------------------------------- loaders

class DataLoader:
    """Base loader: flattening into items is up to the subclass; batching, tokenization and sharding live here.

    Each global batch holds `batch_size` items; this process (rank r of world_size W) tokenizes and
    yields only its contiguous slice of B/W items, so all ranks together see the global batch.
    """

    def __init__(self, dataset_names: List[str], tokenizer, split: str = 'train', batch_size: int = 1,
                 max_length: int = 512, max_prompt_length: int = 128, max_prompt_count: Optional[int] = None,
                 n_epochs: Optional[int] = None, n_examples: Optional[int] = None,
                 human_prefix: str = '\n<|user|>\n', human_suffix: str = '',
                 assistant_prefix: str = '\n<|assistant|>\n', assistant_suffix: str = '',
                 seed: int = 0, data_dir: Optional[str] = None, use_chat_template: bool = False,
                 frac_unique_desirable: float = 1.0, frac_unique_undesirable: float = 1.0,
                 chosen_control_token: str = '<|good|>', rejected_control_token: str = '<|bad|>',
                 rank: int = 0, world_size: int = 1):
        if n_epochs is None and n_examples is None:
            raise ValueError("set n_epochs or n_examples (both are null)")
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}), "
                             f"or no room is left for a completion")
        if batch_size % world_size != 0:
            key = 'model.batch_size' if split == 'train' else 'model.eval_batch_size'
            raise ValueError(f"{key} ({batch_size}) must be divisible by the number of processes ({world_size})")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.split, self.batch_size = split, batch_size
        self.max_length, self.max_prompt_length, self.max_prompt_count = max_length, max_prompt_length, max_prompt_count
        self.n_epochs, self.n_examples = n_epochs, n_examples
        self.seed, self.use_chat_template = seed, use_chat_template
        self.frac_unique_desirable, self.frac_unique_undesirable = frac_unique_desirable, frac_unique_undesirable
        self.chosen_control_token, self.rejected_control_token = chosen_control_token, rejected_control_token
        self.rank, self.world_size = rank, world_size
        self.skip_batches = 0  # set when resuming: the first batches are planned but not tokenized
        self.counts: Counter = Counter()

        self.full_data: Dict[str, Example] = {}
        for name in dataset_names:
            dataset = load_dataset(name, split, human_prefix, human_suffix, assistant_prefix, assistant_suffix,
                                   data_dir=data_dir, seed=seed)
            overlap = sum(key in self.full_data for key in dataset)
            self.counts[f'{name}: prompts'] += len(dataset)
            self.counts.update({f'{name}: {what}': n for what, n in dataset.counts.items()})
            if overlap:
                self.counts[f'{name}: prompts that replaced an earlier dataset\'s prompt'] += overlap
            self.full_data.update(dataset.data)

        prompts = list(self.full_data)
        random.Random(seed).shuffle(prompts)  # a frac_unique_* subset is a random, fixed part of the data
        self.items = self.flatten([self.full_data[p] for p in prompts])
        self.counts['items'] = len(self.items)
        rank0_print(f"[{split}] {type(self).__name__}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())))

    # --- what subclasses provide
    @classmethod
    def control_tokens(cls, loss_config) -> List[str]:
        """Special tokens this loader adds to prompts (the tokenizer and embeddings must know them)."""
        return []

    def flatten(self, examples: List[Example]) -> List[Tuple]:
        raise NotImplementedError

    def tokenize_items(self, items: List[Tuple], global_batch: List[Tuple]) -> List[Dict]:
        raise NotImplementedError

    # --- shared pairs and labels
    def example_pairs(self, example: Example, rng: random.Random) -> List[Tuple[int, int]]:
        if self.max_prompt_count is not None and len(example.pairs) > self.max_prompt_count:
            return rng.sample(example.pairs, self.max_prompt_count)
        return example.pairs

    def unary_items(self, examples: List[Example]) -> List[Tuple[Example, str, str]]:
        """(example, completion, 'chosen'|'rejected') items, one per distinct completion of a prompt.

        A completion's label is the sign of (pairs it wins - pairs it loses), or its binary label;
        a completion with as many wins as losses (e.g. the middle of an OASST ranking a > b > c), or
        labelled both ways, gets no label and is counted as dropped. The first frac_unique_* of each
        kind (in shuffled prompt order) is kept.
        """
        rng = random.Random(self.seed)
        desirable, undesirable = [], []
        for example in examples:
            net = defaultdict(int)
            for i, j in self.example_pairs(example, rng):
                net[example.generations[i]] += 1
                net[example.generations[j]] -= 1
            for text, label in zip(example.generations, example.desirable):
                net[text] += 1 if label else -1
                self.counts['binary labels'] += 1
            for text, score in net.items():
                if score > 0:
                    desirable.append((example, text, 'chosen'))
                elif score < 0:
                    undesirable.append((example, text, 'rejected'))
                else:
                    self.counts['unary: dropped, as often preferred as dispreferred'] += 1
        n_desirable = round(len(desirable) * self.frac_unique_desirable)
        n_undesirable = round(len(undesirable) * self.frac_unique_undesirable)
        self.counts['unary: desirable'], self.counts['unary: undesirable'] = n_desirable, n_undesirable
        self.counts['unary: dropped by frac_unique_*'] = len(desirable) + len(undesirable) - n_desirable - n_undesirable
        return desirable[:n_desirable] + undesirable[:n_undesirable]

    # --- batching
    def epoch_batches(self, rng: random.Random) -> List[List[Tuple]]:
        """One epoch of global batches: the items shuffled, cut into batch_size chunks.

        A last, smaller batch is kept (trimmed to a multiple of the number of processes) rather than
        dropped; what has to be dropped is counted.
        """
        order = list(self.items)
        rng.shuffle(order)
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if batches and len(batches[-1]) % self.world_size:
            keep = len(batches[-1]) - len(batches[-1]) % self.world_size
            batches[-1] = batches[-1][:keep]
            if not batches[-1]:
                batches.pop()
        return batches

    def plan(self) -> Iterator[List[Tuple]]:
        """The global batches of the whole run, untokenized: epochs until n_epochs or n_examples."""
        rng = random.Random(self.seed + 1)
        epoch, n_seen = 0, 0
        while self.n_epochs is None or epoch < self.n_epochs:
            batches = self.epoch_batches(rng)
            if not batches:
                raise ValueError(f"[{self.split}] no {type(self).__name__} items in this data: nothing to iterate")
            for batch in batches:
                yield batch
                n_seen += len(batch)
                if self.n_examples is not None and n_seen >= self.n_examples:
                    return
            epoch += 1

    def __len__(self) -> int:
        return sum(1 for _ in self.plan())

    def __iter__(self) -> Iterator[Dict]:
        for index, global_batch in enumerate(self.plan()):
            if index < self.skip_batches:
                continue
            local_size = len(global_batch) // self.world_size
            local = global_batch[self.rank * local_size:(self.rank + 1) * local_size]
            yield self.collate(self.tokenize_items(local, global_batch))

    # --- tokenization
    def prompt_text(self, example: Example) -> str:
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(example.turns, tokenize=False, add_generation_prompt=True)
        return example.prompt

    def encode_prompt(self, text: str) -> List[int]:
        """Prompt tokens with at most one BOS (the tokenizer's, if it adds one) and no trailing EOS."""
        ids = self.tokenizer(text, add_special_tokens=not self.use_chat_template)['input_ids']
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if bos is not None:
            while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
                ids = ids[1:]
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        return ids

    def encode_completion(self, text: str) -> List[int]:
        """Completion tokens without special tokens, ending in one EOS."""
        ids = self.tokenizer(text, add_special_tokens=False)['input_ids']
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if bos is not None and ids and ids[0] == bos and bos != eos:
            ids = ids[1:]
        while ids and ids[-1] == eos:
            ids = ids[:-1]
        return ids + [eos]

    def tokenize_element(self, example: Example, prompt: str, completions: Dict[str, str]) -> Dict:
        """Tokenize one prompt with its completions (e.g. {'chosen': .., 'rejected': ..}).

        Each string is tokenized once and the token lists are concatenated, so the label mask is
        exactly the prompt's token count. Truncation is decided once for all completions of the
        element, so they share the same prompt tokens: if prompt + longest completion exceeds
        max_length and the prompt exceeds max_prompt_length, the prompt is cut to max_prompt_length
        (keeping its start or end, and its BOS); then each completion is cut to the room left. A cut
        completion loses its EOS: it did not end there. No sequence exceeds max_length.
        """
        prompt_ids = self.encode_prompt(prompt)
        completion_ids = {name: self.encode_completion(text) for name, text in completions.items()}
        longest = max(len(ids) for ids in completion_ids.values())
        prompt_truncated = len(prompt_ids) + longest > self.max_length and len(prompt_ids) > self.max_prompt_length
        if prompt_truncated:
            if example.truncation_mode == 'keep_start':
                prompt_ids = prompt_ids[:self.max_prompt_length]
            elif example.truncation_mode == 'keep_end':
                has_bos = prompt_ids[0] == self.tokenizer.bos_token_id
                prompt_ids = prompt_ids[:1] * has_bos + prompt_ids[-(self.max_prompt_length - has_bos):]
            else:
                raise ValueError(f"{example.source}: unknown truncation_mode '{example.truncation_mode}'")
        room = self.max_length - len(prompt_ids)
        if room < 1:
            raise DataError(f"{example.source}: field 'prompt' is {len(prompt_ids)} tokens and leaves no room for "
                            f"a completion within max_length={self.max_length}; lower max_prompt_length")

        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
        prompt_text = decode(prompt_ids) if prompt_truncated else prompt
        element = {'prompt_text': prompt_text, 'prompt_input_ids': prompt_ids,
                   'prompt_attention_mask': [1] * len(prompt_ids), 'truncation_mode': example.truncation_mode}
        for name, ids in completion_ids.items():
            text = completions[name]
            if len(ids) > room:
                ids = ids[:room]
                text = decode(ids)
                self.counts['completions truncated'] += 1
            element.update({
                f'{name}_text': text,
                f'{name}_input_ids': ids,
                f'{name}_attention_mask': [1] * len(ids),
                f'{name}_combined_text': prompt_text + text,
                f'{name}_combined_input_ids': prompt_ids + ids,
                f'{name}_combined_attention_mask': [1] * (len(prompt_ids) + len(ids)),
                f'{name}_labels': [-100] * len(prompt_ids) + ids,
            })
        return element

    def collate(self, elements: List[Dict]) -> Dict:
        """Pad token lists into tensors: ids with the pad token, masks with 0, labels with -100.

        Keys containing 'prompt' are left-padded (for generation); the others are right-padded.
        Non-token keys become lists.
        """
        batch = {}
        for key in elements[0]:
            values = [element[key] for element in elements]
            if key.endswith('_input_ids') or key.endswith('_attention_mask') or key.endswith('_labels'):
                pad = self.tokenizer.pad_token_id if key.endswith('_input_ids') else \
                    (0 if key.endswith('_attention_mask') else -100)
                length = max(len(v) for v in values)
                left = 'prompt' in key
                batch[key] = torch.tensor([[pad] * (length - len(v)) + v if left else v + [pad] * (length - len(v))
                                           for v in values], dtype=torch.long)
            else:
                batch[key] = values
        return batch


class SFTDataLoader(DataLoader):
    """One item per prompt: its SFT target generations[sft_index]."""

    def flatten(self, examples):
        items = [(example, example.generations[example.sft_index]) for example in examples if example.generations]
        return items

    def tokenize_items(self, items, global_batch):
        elements = []
        for example, completion in items:
            element = self.tokenize_element(example, self.prompt_text(example), {'target': completion})
            element['original_prompt'] = example.original_prompt
            elements.append(element)
        return elements


class UnpairedPreferenceDataLoader(DataLoader):
    """One item per desirable ('chosen') or undesirable ('rejected') completion.

    Each element also carries a mismatched 'KL' completion: in the global batch, item i's prompt is
    paired with item (i+1 mod B)'s completion. KTO estimates its reference point from these.
    """

    def flatten(self, examples):
        return self.unary_items(examples)

    def tokenize_items(self, items, global_batch):
        start = self.rank * len(items)
        elements = []
        for offset, (example, completion, status) in enumerate(items):
            prompt = self.prompt_text(example)
            element = self.tokenize_element(example, prompt, {'target': completion})
            _, mismatched, _ = global_batch[(start + offset + 1) % len(global_batch)]
            kl = self.tokenize_element(example, prompt, {'KL': mismatched})
            element.update({key: value for key, value in kl.items() if key.startswith('KL_')})
            element['status'] = status
            elements.append(element)
        return elements


class SimpleKTODataLoader(UnpairedPreferenceDataLoader):
    """Unpaired items in batches of exactly B/2 desirable and B/2 undesirable, alternating."""

    def epoch_batches(self, rng):
        if (self.batch_size // self.world_size) % 2:
            raise ValueError(f"SimpleKTODataLoader needs an even number of examples per process, got batch_size "
                             f"{self.batch_size} over {self.world_size} processes")
        order = list(self.items)
        rng.shuffle(order)
        chosen = [item for item in order if item[2] == 'chosen']
        rejected = [item for item in order if item[2] == 'rejected']
        half = self.batch_size // 2
        batches = []
        for start in range(0, min(len(chosen), len(rejected)) - half + 1, half):
            batches.append([item for pair in zip(chosen[start:start + half], rejected[start:start + half])
                            for item in pair])
        return batches


class ConditionalSFTDataLoader(UnpairedPreferenceDataLoader):
    """SFT on desirable and undesirable completions, the prompt ending in a control token (CSFT).

    The control token belongs to the prompt, so it is masked out of the loss.
    """

    @classmethod
    def control_tokens(cls, loss_config) -> List[str]:
        return [loss_config.chosen_control_token, loss_config.rejected_control_token]

    def tokenize_items(self, items, global_batch):
        elements = []
        for example, completion, status in items:
            token = self.chosen_control_token if status == 'chosen' else self.rejected_control_token
            element = self.tokenize_element(example, self.prompt_text(example) + token, {'target': completion})
            element['status'] = status
            elements.append(element)
        return elements


class PairedPreferenceDataLoader(DataLoader):
    """One item per preference pair (chosen, rejected); both share the same prompt tokens."""

    def flatten(self, examples):
        rng = random.Random(self.seed)
        items = []
        for example in examples:
            pairs = self.example_pairs(example, rng)
            if not pairs:
                self.counts['prompts without pairs'] += 1
            items += [(example, example.generations[i], example.generations[j]) for i, j in pairs]
        return items

    def tokenize_items(self, items, global_batch):
        return [self.tokenize_element(example, self.prompt_text(example), {'chosen': chosen, 'rejected': rejected})
                for example, chosen, rejected in items]


def get_dataloader_class(name: str) -> type:
    """The loader class called `name` in this module."""
    loader_class = globals().get(name)
    if not (isinstance(loader_class, type) and issubclass(loader_class, DataLoader) and loader_class is not DataLoader):
        valid = sorted(n for n, c in globals().items()
                       if isinstance(c, type) and issubclass(c, DataLoader) and c is not DataLoader)
        raise ValueError(f"loss.dataloader={name} is not a dataloader; valid: {', '.join(valid)}")
    return loader_class
