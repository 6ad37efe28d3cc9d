"""Feedback files: a user's own binary, pairwise or scalar feedback as JSON, JSON Lines or Parquet.

    binary:   {"prompt": ..., "output": ..., "label": 1}
    pairwise: {"prompt": ..., "output_A": ..., "output_B": ..., "label": 1}      (label 1/true: A preferred)
    scalar:   {"prompt": ..., "output": ..., "reward": 0.7}                      (no label; for GRPO and PPO)
    demonstration: {"prompt": ..., "output": ...}       (for SFT; in a file where no record has a label or reward)
    prompt:   {"prompt": ...}                                                     (a prompts file, for sampling)

TRL's formats read as well: {"prompt", "chosen", "rejected"} is pairwise feedback (chosen preferred),
{"prompt", "completion", "label"} binary feedback, {"prompt", "completion"} a demonstration, and
{"messages": [turns]} a demonstration whose last turn (the assistant's) is the completion. In their
conversational form an output may repeat the prompt's turns before its own (as ultrafeedback_binarized's
do), and a pair may leave the prompt implicit: {"chosen": [turns], "rejected": [turns]}, the prompt being the
turns the two share.

Prompts and outputs are strings or lists of {"role", "content"} turns; a null field is an absent one (a
Parquet file's column holds nulls where its records lack the field); optional fields are `prompt_id`,
`split`, the rewards `reward` / `reward_A` / `reward_B` and the weights `weight` (of an output, or of a
pair) / `weight_A` / `weight_B` (of a pair's outputs, when the pairs are flattened into desirable and
undesirable outputs). Any other field (an answer to check, tests to run) is the prompt's own: a reward
function that names it as a parameter is given it. Every error names the file, the record and the field.
The text is kept as written (the hub datasets' runs of spaces are collapsed, as in HALOs; a user's outputs,
code among them, are not).
"""
import functools
import json
import math
import os
import re
from typing import Dict, List, Optional, Tuple

from halos.errors import DataError, MissingFileError
from halos.examples import ROLES, Dataset, render_turns
from utils import rank0_print


class NoRecordsForSplit(DataError):
    """A feedback file whose records all name another split: alone, it stops the run; beside other datasets, it
    adds nothing to this split."""


PAIR_FIELDS = (('output_A', 'output_B'), ('chosen', 'rejected'))  # halos' (with a label), TRL's (chosen preferred)
FILE_TYPES = ('.json', '.jsonl', '.parquet')
SPLITS = ('train', 'test')
MAX_WEIGHT = 1e30
# what halos reads or writes in a feedback, prompt or sample record; any other field is the prompt's own
SAMPLE_FIELDS = frozenset({'sample_id', 'generator', 'dataset', 'finished'})  # what sampling adds to a prompt's
RECORD_FIELDS = frozenset({'prompt', 'prompt_id', 'split', 'type', 'output', 'completion', 'messages', *PAIR_FIELDS[0],
                           *PAIR_FIELDS[1], 'label', 'reward', 'reward_A', 'reward_B', 'weight', 'weight_A',
                           'weight_B', 'reward_parts', *SAMPLE_FIELDS})


def extra_fields(record: Dict) -> Dict:
    """A record's fields that are the prompt's own (an answer to check), not halos'."""
    return {name: value for name, value in record.items() if name not in RECORD_FIELDS}


@functools.lru_cache(maxsize=None)  # once per file, whichever splits are read
def warn_of_shadowed_fields(path: str, names: Tuple[str, ...]) -> None:
    rank0_print(f"warning: {path}: prompt fields named {', '.join(names)} are replaced by the sample record's own "
                f"(halos writes {', '.join(sorted(SAMPLE_FIELDS))} in every sample), so no reward function is given "
                f"them: rename them")


def pair_fields(record: Dict) -> Optional[Tuple[str, str]]:
    """The names of a pairwise record's two outputs (None for another kind of record)."""
    return next((names for names in PAIR_FIELDS if any(name in record for name in names)), None)


def output_field(record: Dict) -> str:
    """The name of a record's one output: 'output', or TRL's 'completion'."""
    return 'completion' if 'completion' in record and 'output' not in record else 'output'


def read_json_records(path: str) -> List[Dict]:
    """Records of a JSON array file or a JSON Lines file; errors name the file and record."""
    try:
        with open(path, 'rb') as f:
            content = f.read()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except OSError as error:  # a directory, or no permission
        raise DataError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        text = content.decode('utf-8-sig')  # a byte-order mark, as some editors write, is not text
    except UnicodeDecodeError as error:
        line = content[:error.start].count(b'\n') + 1
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}, line {line}: {error.reason}); "
                        f"save the file as UTF-8") from None
    if file_type(path) == '.jsonl':
        records = []
        for number, line in enumerate(text.split('\n'), 1):  # JSON text may hold U+2028 and the like unescaped
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: record {len(records) + 1} (line {number}) is not valid JSON: {error.msg} "
                                f"(column {error.colno})") from None
        return checked_text(path, records, text)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        lines = error.msg == 'Extra data' and error.colno == 1  # a second record starts a line
        hint = ' (one JSON record per line: name the file .jsonl)' if lines else ''
        raise DataError(f"{path}: not valid JSON: {error.msg} (line {error.lineno}, column {error.colno}){hint}") \
            from None
    if isinstance(records, dict) and 'samples' in records and 'config' in records:
        raise DataError(f"{path}: eval.py's samples with their run's config (what compare.py reads), not records; "
                        f"label.py labels the sample records that eval.py ++mode=sample ++num_samples_per_prompt=k "
                        f"writes")
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    return checked_text(path, records, text)


def file_type(path: str) -> str:
    """'.json', '.jsonl', '.parquet' (whatever the case of the name's extension), or another extension."""
    return os.path.splitext(path)[1].lower()


SURROGATE_ESCAPE = re.compile(r'\\u[dD][89a-fA-F]')


def checked_text(path: str, records: List, text: str) -> List:
    """`records`, unless a \\ud800-style escape left half of a UTF-16 pair in a string, which no tokenizer
    encodes (a whole pair decodes to its character)."""
    if SURROGATE_ESCAPE.search(text):
        for number, record in enumerate(records, 1):
            field = unencodable_field(record)
            if field is not None:
                raise DataError(f"{path}: record {number}: {field} holds a \\u escape of a lone UTF-16 surrogate "
                                f"(half of a character), not text")
    return records


def unencodable_field(value, name: str = 'the record') -> Optional[str]:
    """The name of the first string within `value` that is not valid Unicode, else None."""
    if isinstance(value, str):
        try:
            value.encode('utf-8')
        except UnicodeEncodeError:
            return name
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        field = unencodable_field(inner, f"field '{key}'" if name == 'the record' else f'{name}[{key!r}]')
        if field is not None:
            return field
    return None


def read_records(path: str) -> List[Dict]:
    """Records of a JSON array, JSON Lines or Parquet file; errors name the file."""
    if file_type(path) == '.parquet':
        import pyarrow
        import pyarrow.parquet
        try:
            records = pyarrow.parquet.read_table(path).to_pylist()
        except FileNotFoundError:
            raise MissingFileError(f"{path}: no such file") from None
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"{path}: not readable as Parquet ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]})") from None
        # what JSON has no type for (a date, a decimal, bytes) is read as its text: records travel on as JSON
        return json.loads(json.dumps(records, default=str))
    return read_json_records(path)


def _field(record: Dict, name: str, where: str):
    if name not in record:
        raise DataError(f"{where}: missing field '{name}'")
    return record[name]


def checked_turns(value, name: str, where: str) -> List[Dict[str, str]]:
    """A prompt or output given as a string or a list of {'role', 'content'} turns."""
    if isinstance(value, str):
        value = [{'role': 'user' if name == 'prompt' else 'assistant', 'content': value}]
    if not isinstance(value, list) or not value or not all(
            isinstance(t, dict) and isinstance(t.get('content'), str) and 'role' in t for t in value):
        raise DataError(f"{where}: field '{name}' must be a string or a non-empty list of "
                        f"{{'role', 'content'}} turns")
    for number, turn in enumerate(value, 1):
        if turn['role'] not in ROLES:
            raise DataError(f"{where}: field '{name}' turn {number} has role {turn['role']!r}; "
                            f"roles are {', '.join(ROLES)}")
    if name == 'prompt' and not any(t['content'].strip() for t in value):  # as an empty completion, a field lost
        raise DataError(f"{where}: field 'prompt' is empty; a prompt is the text its completions answer")
    return [{'role': t['role'], 'content': t['content']} for t in value]


def _completion(record: Dict, name: str, where: str, prompt_turns: List[Dict[str, str]]) -> str:
    turns = checked_turns(_field(record, name, where), name, where)
    if len(turns) > len(prompt_turns) and turns[:len(prompt_turns)] == prompt_turns:
        turns = turns[len(prompt_turns):]  # a whole conversation: the prompt's turns, then the completion's
    if len(turns) != 1:
        raise DataError(f"{where}: field '{name}' has {len(turns)} turns after the prompt's; a completion must be "
                        f"one assistant turn")
    if turns[0]['role'] != 'assistant':
        raise DataError(f"{where}: field '{name}' is a {turns[0]['role']} turn; a completion is the assistant's")
    if not turns[0]['content'].strip():
        raise DataError(f"{where}: field '{name}' is an empty completion")
    return turns[0]['content']


def prompt_turns(record: Dict, where: str) -> List[Dict[str, str]]:
    """The record's prompt; where a pair of conversations has none, the turns that both share before their
    last (TRL's implicit prompt)."""
    if 'prompt' not in record and 'text' in record:
        raise DataError(f"{where}: missing field 'prompt': a record of plain text (TRL's language-modelling format) "
                        f"has no prompt to complete; give {{\"prompt\", \"completion\"}} or {{\"messages\": [turns]}}")
    if 'prompt' in record or not all(isinstance(record.get(name), list) for name in PAIR_FIELDS[1]):
        return checked_turns(_field(record, 'prompt', where), 'prompt', where)
    chosen, rejected = (checked_turns(record[name], name, where) for name in PAIR_FIELDS[1])
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if not shared:
        raise DataError(f"{where}: missing field 'prompt', and 'chosen' and 'rejected' share no turns to take "
                        f"as the prompt")
    return chosen[:shared]


def _label(record: Dict, where: str, scalar_file: bool = False) -> bool:
    if 'label' not in record and scalar_file:
        raise DataError(f"{where}: missing field 'reward' (the file's other records are scalar feedback, "
                        f"{{\"prompt\", \"output\", \"reward\"}}), or 'label' (binary feedback)")
    label = _field(record, 'label', where)
    if isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1)):  # 1.0: a Parquet column
        return bool(label)                                                                   # with nulls is float
    raise DataError(f"{where}: field 'label' must be true/false or 0/1, got {label!r}")


def _score(record: Dict, name: str, where: str) -> Optional[float]:
    if name not in record or record[name] is None:
        return None
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    return float(value)


def record_kind(record: Dict, demonstrations: bool) -> str:
    """'pairwise' (output_A/output_B, or chosen/rejected), 'scalar' (a reward and no label), 'prompt' (no output),
    'demonstration' (an output alone, in a record without a HALOs type, of a file of `demonstrations`: one where
    no record has a label or a reward) or 'binary'."""
    if pair_fields(record) or record.get('type') == 'pairwise_feedback':
        return 'pairwise'
    if output_field(record) not in record and 'label' not in record and 'reward' not in record:
        return 'prompt'
    if record.get('type') == 'scalar_feedback' or ('label' not in record and record.get('reward') is not None):
        return 'scalar'
    if demonstrations and 'type' not in record:
        return 'demonstration'
    return 'binary'


def conversation_record(record: Dict, where: str) -> Dict:
    """A record in TRL's conversational language-modelling format, {"messages": [turns]}, as a demonstration:
    the turns before the last are its prompt, the last (the assistant's) its completion."""
    if 'messages' not in record:
        return record
    for name in ('prompt', output_field(record)):
        if name in record:
            raise DataError(f"{where}: fields 'messages' and '{name}' both given; a conversation is either "
                            f"{{\"messages\": [turns]}} or {{\"prompt\", \"completion\"}}")
    turns = checked_turns(record['messages'], 'messages', where)
    if len(turns) < 2 or turns[-1]['role'] != 'assistant':
        raise DataError(f"{where}: field 'messages' must end with an assistant turn (the completion) after at least "
                        f"one turn (the prompt)")
    return {**{name: value for name, value in record.items() if name != 'messages'}, 'prompt': turns[:-1],
            'completion': turns[-1:]}


def _weight(record: Dict, name: str, where: str) -> float:
    """A weight: a finite number >= 0 (1 when the record has none)."""
    if record.get(name) is None:
        return 1.0
    value = _score(record, name, where)
    if not 0 <= value <= MAX_WEIGHT:
        raise DataError(f"{where}: field '{name}' must be a number in [0, {MAX_WEIGHT:g}] (weights are relative; "
                        f"a larger one overflows the float32 sums of a batch), got {value!r}")
    return value


def add_generation(example, text: str, score: Optional[float], weight: float) -> None:
    example.generations.append(text)
    example.scores.append(score)
    example.weights.append(weight)


def another_prompt(where: str, key: str, first: str) -> DataError:
    """The error of a record whose prompt_id (`key`) already named another prompt, at `first`."""
    return DataError(f"{where}: {key} already names another prompt (in {first}); one prompt_id stands for one prompt")


def get_feedback_file(path: str, split: str, human_prefix: str, human_suffix: str, assistant_prefix: str,
                      assistant_suffix: str) -> Dataset:
    """A user's own feedback: binary {prompt, output, label} or pairwise {prompt, output_A, output_B, label}.

    Records group by `prompt_id`, or by prompt text when there is none. A record with a `split`
    field is used only for that split; one without is used for both.
    Binary: each output is desirable or not; the SFT target is the first desirable output.
    Pairwise: label 1 means output_A is preferred; identical outputs of one prompt are stored once.
    Scalar: each output with its reward and no label; the SFT target is the best-rewarded output.
    Prompt: a prompt alone (a prompts file, for sampling).
    One prompt's records are all of one kind.
    """
    dataset = Dataset(os.path.basename(path))
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the file holds no records (of feedback, or prompts to sample)")
    dataset.counts['records'] = len(records)
    kinds: Dict[str, str] = {}  # the kind of feedback of each prompt
    shadowed = set()  # fields of prompt records that the samples' own fields of that name replace
    # a record with an output and no label is a demonstration only where no record is labelled or scored: in a
    # file of feedback, it lacks its label
    demonstrations = not any(isinstance(record, dict) and (record.get('label') is not None or
                                                           record.get('reward') is not None) for record in records)
    scalar_file = any(isinstance(record, dict) and record.get('reward') is not None and record.get('label') is None
                      for record in records)
    for number, record in enumerate(records, 1):
        where = f'{path}: record {number}'
        if not isinstance(record, dict):
            one_array = len(records) == 1 and isinstance(record, list) and file_type(path) == '.jsonl'
            hint = ' (the file holds one JSON array of records: name it .json)' if one_array else ''
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}{hint}")
        record = {name: value for name, value in record.items() if value is not None}
        if record.get('split', split) not in SPLITS:
            raise DataError(f"{where}: field 'split' is {record['split']!r}; give train or test (or no split: both)")
        if record.get('split', split) != split:
            dataset.counts[f"skipped: split is not '{split}'"] += 1
            continue
        record = conversation_record(record, where)
        kind = record_kind(record, demonstrations)
        if kind == 'binary' and 'label' not in record and record.get('type') == 'sample':
            raise DataError(f"{where}: an unlabelled sample (type 'sample', as eval.py writes it); label the file "
                            f"first: python label.py {path} feedback.jsonl --reward-function file.py:function (or "
                            f"--reward-model, --judge)")
        turns = prompt_turns(record, where)
        prompt = render_turns(turns, human_prefix, human_suffix, assistant_prefix, assistant_suffix)
        key = f"prompt_id {record['prompt_id']}" if record.get('prompt_id') is not None else prompt
        example = dataset[key]
        if example.source and example.prompt != prompt:
            raise another_prompt(where, key, example.source)
        example.prompt, example.turns = prompt, turns
        example.text_prompt = isinstance(record.get('prompt'), str)
        example.prompt_id = str(record['prompt_id']) if record.get('prompt_id') is not None else ''
        example.dataset_name = dataset.name
        example.source = example.source or where
        example.extra = {**extra_fields(record), **example.extra}  # the prompt's first record says first
        if kinds.setdefault(key, kind) != kind:
            raise DataError(f"{where}: this prompt already has {kinds[key]} feedback (first at {example.source}); "
                            f"the records of one prompt must be all binary, all pairwise, all scalar or all "
                            f"demonstrations")
        if kind == 'prompt':
            shadowed |= SAMPLE_FIELDS & set(record)
            conflict = next((name for name, value in extra_fields(record).items()
                             if name in example.extra and example.extra[name] != value), None)
            if conflict is not None:  # which one a reward function would check is not for halos to pick
                raise DataError(f"{where}: field {conflict!r} is {record[conflict]!r}, where this prompt's first "
                                f"record ({example.source}) gives {example.extra[conflict]!r}: one prompt, one value")
        elif kind == 'demonstration':
            add_generation(example, _completion(record, output_field(record), where, turns) + assistant_suffix, None,
                           _weight(record, 'weight', where))
            example.demonstrated = True
        elif kind == 'scalar':
            reward = _score(record, 'reward', where) if record.get('reward') is not None else _field(record, 'reward', where)
            add_generation(example, _completion(record, output_field(record), where, turns) + assistant_suffix, reward,
                           _weight(record, 'weight', where))
        elif kind == 'pairwise':
            first, second = pair_fields(record) or PAIR_FIELDS[0]
            if first != 'output_A' and 'label' in record:
                raise DataError(f"{where}: field 'label' beside '{first}' and '{second}', where '{first}' is the "
                                f"preferred output as written; leave the label out, or name the outputs "
                                f"output_A and output_B")
            label = _label(record, where) if first == 'output_A' else True
            outputs = [_completion(record, first, where, turns), _completion(record, second, where, turns)]
            if outputs[0].strip() == outputs[1].strip():
                raise DataError(f"{where}: fields '{first}' and '{second}' are the same text; a preference needs "
                                f"two different outputs")
            rewards = [_score(record, 'reward_A', where), _score(record, 'reward_B', where)]
            weights = [_weight(record, 'weight_A', where), _weight(record, 'weight_B', where)]
            indices = []
            for output, reward, weight in zip(outputs, rewards, weights):
                text = output + assistant_suffix
                if text not in example.generations:
                    add_generation(example, text, reward, weight)
                indices.append(example.generations.index(text))
            pair = tuple(indices) if label else tuple(reversed(indices))
            example.pairs.append(pair)
            example.pair_weights[pair] = _weight(record, 'weight', where)
        else:
            label = _label(record, where, scalar_file)
            add_generation(example, _completion(record, output_field(record), where, turns) + assistant_suffix,
                           _score(record, 'reward', where), _weight(record, 'weight', where))
            example.desirable.append(label)
    if shadowed:
        warn_of_shadowed_fields(path, tuple(sorted(shadowed)))
    if not dataset.data:
        splits = sorted({str(record.get('split')) for record in records if isinstance(record, dict)})
        raise NoRecordsForSplit(f"{path}: no records for split '{split}': every record's 'split' field names "
                                f"another split ({', '.join(splits)}); records without a 'split' field are used for "
                                f"both splits")

    best_scored = lambda scores: max(range(len(scores)), key=lambda i: -math.inf if scores[i] is None else scores[i])
    for example in dataset.data.values():
        if example.desirable:
            example.sft_index = example.desirable.index(True) if True in example.desirable else \
                best_scored(example.scores)
        elif example.scores and all(score is not None for score in example.scores):
            example.sft_index = best_scored(example.scores)
        elif example.pairs:
            example.sft_index = example.pairs[0][0]
    return dataset
