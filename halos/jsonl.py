"""The append-only JSON Lines files of a run (metrics.jsonl, rollouts.jsonl, rewards.jsonl, compare.py's results
and judgment caches).

A process killed mid-write leaves a last line without its newline: readers skip it, and the next append drops
it first, so that a record never runs into the one after it (a whole record that only lacks its newline is
kept). A file written whole (a round's samples and feedback, label.py's output) is replaced atomically. A
number that is not finite (the standard error of one value) is written as null, which JSON has, where NaN and
Infinity are not JSON.
"""
import json
import math
import os
import tempfile
from typing import Callable, Dict, Iterable, List, Sequence

from halos.errors import DataError, UserError


def check_distinct_files(paths: Dict[str, str]) -> None:
    """Stop before anything is written when two of a command's files (by the argument naming each) are one file:
    an output would overwrite, or append to, an input."""
    named = {}
    for argument, path in paths.items():
        same = named.setdefault(os.path.realpath(path), argument)
        if same != argument:
            raise UserError(f"{same} and {argument} are the same file ({path}): give {argument} another path")


def drop_cut_last_line(path: str) -> bool:
    """Make `path` end with a newline before an append: a last line that holds a whole record (its newline lost,
    say by an editor) gets one; a line cut off by an interrupted write is dropped. Whether one was dropped."""
    if not os.path.exists(path):
        return False
    with open(path, 'r+b') as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b'\n':
            return False
        f.seek(0)
        content = f.read()
        end = content.rfind(b'\n') + 1
        if is_record(content[end:]):
            f.write(b'\n')
            return False
        f.truncate(end)
    return True


def is_record(text: bytes) -> bool:
    """Whether `text` is one whole JSON object: a write cut off short of its closing brace never is."""
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def complete_lines(path: str) -> List[str]:
    """The lines of `path` that a writer finished, without their newline: those that end with one, and a last line
    that holds a whole record (split at '\\n' alone: JSON text may hold other line separators, such as U+2028)."""
    with open(path, 'rb') as f:
        content = f.read()
    end = content.rfind(b'\n') + 1
    lines = content[:end].decode('utf-8', errors='replace').split('\n')[:-1]
    return lines + [content[end:].decode('utf-8', errors='replace')] if is_record(content[end:]) else lines


def read_json_lines(path: str, required: Sequence[str] = ()) -> List[Dict]:
    """The records of the complete, non-blank lines of `path`; a line that is not a JSON object, or one that lacks
    a `required` field, stops with the file and its number."""
    records = []
    for number, line in enumerate(complete_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object (a record)")
        missing = [name for name in required if name not in record]
        if missing:
            raise DataError(f"{path}: line {number} lacks {', '.join(missing)}")
        records.append(record)
    return records


def check_appendable(path: str, required: Sequence[str], argument: str, what: str) -> None:
    """Stop before anything is appended to `path` unless it is missing, empty, or JSON Lines of records with the
    `required` fields (`what`, named by `argument`): another file given by mistake is left as it was."""
    if os.path.isdir(path):
        raise DataError(f"{argument} {path}: a directory, not {what}")
    if not os.path.isfile(path):
        return
    try:
        read_json_lines(path, required)
    except DataError as error:
        raise DataError(f"{error}: {argument} takes {what}, and this file holds something else; give "
                        f"{argument} another path (nothing was written to it)") from None


def append_json_lines(path: str, records: Iterable[Dict], sync: bool = False) -> None:
    """Append one line per record (after dropping a cut last line; the directory made if need be); `sync`: on
    disk before returning."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    drop_cut_last_line(path)
    with open(path, 'a', encoding='utf-8') as f:
        f.writelines(json_line(record) for record in records)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def keep_json_lines(path: str, keep: Callable[[Dict], bool]) -> None:
    """Rewrite `path` (if there) atomically with the records that `keep`."""
    if os.path.exists(path):
        write_jsonl(path, [record for record in read_json_lines(path) if keep(record)])


def json_line(record: Dict) -> str:
    return json.dumps(finite(record), ensure_ascii=False) + '\n'


def finite(value):
    """`value` with each float that is not finite replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(inner) for inner in value]
    return value


def logged_number(record: Dict, key: str, default: float = math.nan) -> float:
    """A number as a JSON Lines file holds it: NaN where it was written as null, `default` where absent."""
    value = record.get(key, default)
    return math.nan if value is None else value


def write_jsonl(path: str, records: List[Dict]) -> None:
    """Write records as JSON Lines atomically: a crash leaves the previous file (or none), never half of one."""
    write_text(path, ''.join(json_line(record) for record in records))


def write_json(path: str, data) -> None:
    """Write one JSON document (indented) atomically."""
    write_text(path, json.dumps(finite(data), indent=2))


def write_text(path: str, text: str) -> None:
    """Write a text file atomically, its directory made where missing."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile('w', dir=directory, delete=False, encoding='utf-8', suffix='.tmp') as f:
            temporary = f.name
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(f.name, 0o666 & ~umask)  # the mode of a file written with open(), not the temporary file's 0600
        os.replace(f.name, path)
    except BaseException as error:  # a directory in the way, no permission, a full disk, Ctrl-C
        if temporary and os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise UserError(f"{path}: cannot be written ({error.strerror or error})") from None
        raise
