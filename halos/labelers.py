"""Labelers: whatever scores a completion of a prompt. Every labeler has one call shape,

    labeler(prompts, completions, extras) -> scores

with `prompts[i]` as a prompts file gives it (a string, or a list of {role, content} turns), `completions[i]`
a string, `extras[i]` the prompt's own fields in its file by name (an answer to check; {} for none: only a
reward function reads them), and `scores[i]` a float, or None when no score could be had (a failed or
unparseable judgment): such a completion is dropped and counted, never scored 0. A labeler has a `name`
for messages and says whether it `may_abstain` (give None); only a judge may.

A reward function is called once per completion, or once per batch where it is written for TRL (a parameter
named `completions`); several score with the weighted sum of theirs (RewardFunctionsLabeler).

Every score goes through one check, `checked_scores`: a finite number, or None from a labeler that may
abstain; a reward function may give a score as named parts, {name: number}, which is their sum (a
PartedScore: the monitors log each part's mean). A reward function that raises, or any labeler that gives
anything else, stops the run with one line naming the labeler, the sample and the value or exception.
"""
import asyncio
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import threading
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch

import models
from halos.batching import encode_completion, encode_prompt
from halos.errors import ConfigError, DataError, MissingFileError, UserError, describe_error, one_line, shortened
from halos.examples import Formatting, chat_template_prompt, with_completion
from utils import rank0_print

Prompt = Union[str, List[Dict[str, str]]]


class Labeler(Protocol):
    name: str           # how messages name it: 'reward function data/task/reward.py:reward'
    may_abstain: bool   # it may give None for a completion it could not score (a failed judgment)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 extras: Sequence[Dict]) -> List[Optional[float]]: ...


class LabelError(UserError):
    """A labeler that failed on a sample, or gave a score that is not a finite number."""


class SampleFailed(Exception):
    """Raised by a labeler when scoring the completion at `index` of its call failed (None: the whole call)."""

    def __init__(self, index: Optional[int], reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


def checked_scores(labeler: Labeler, prompts: Sequence[Prompt], completions: Sequence[str], names: Sequence[str],
                   extras: Optional[Sequence[Dict]] = None) -> List[Optional[float]]:
    """The labeler's scores of the completions (`names[i]` says which sample each is, for messages; `extras[i]`
    its prompt's own fields, none by default): each a finite float, or None where the labeler may abstain; a
    LabelError otherwise."""
    labeler_name = getattr(labeler, 'name', 'the labeler')
    try:
        scores = list(labeler(prompts, completions, extras or [{}] * len(completions)))
    except SampleFailed as failure:
        where = names[failure.index] if failure.index is not None else the_batch(names)
        raise LabelError(f"{labeler_name} failed on {where}: {failure.reason}") from None
    if len(scores) != len(completions):
        raise LabelError(f"{labeler_name} gave {len(scores)} scores for {the_batch(names)}")
    return [checked_score(score, labeler_name, getattr(labeler, 'may_abstain', True), name)
            for score, name in zip(scores, names)]


def the_batch(names: Sequence[str]) -> str:
    """A batch of completions, by the samples it holds (`names`), for a message."""
    if len(set(names)) == 1:
        return f"the batch of {len(names)} completions of {names[0]}"
    return f"the batch of {len(names)} completions from {names[0]} to {names[-1]}"


class PartedScore(float):
    """A score given as named parts (a correctness and a format reward): the float of their sum everywhere,
    with the parts beside it."""
    parts: Dict[str, float] = {}

    @classmethod
    def of(cls, parts: Dict[str, float]) -> 'PartedScore':
        score = cls(math.fsum(parts.values()))
        score.parts = parts
        return score


def parts_of(score: Optional[float]) -> Optional[Dict[str, float]]:
    return score.parts if isinstance(score, PartedScore) else None


def checked_score(value, labeler_name: str, may_abstain: bool, name: str) -> Optional[float]:
    if value is None and may_abstain:
        return None
    try:
        return score_of(value)
    except NotAScore as refusal:
        raise LabelError(f"{labeler_name} gave {shortened(value)} for {name}: {refusal}") from None


LARGEST_SCORE = 1e30  # far below float32's largest, so that a batch's sums and means of scores stay finite too
IN_RANGE = f"within +-{LARGEST_SCORE:g}, where the float32 sums and means of training stay finite"


class NotAScore(ValueError):
    """Why a value is not a score."""


def score_of(value) -> float:
    """A finite number as a float, a PartedScore as it is, or {name: part} as a PartedScore; else NotAScore."""
    if isinstance(value, PartedScore):
        return value
    if isinstance(value, Mapping):
        return parts_score(value)
    number = as_number(value)
    if number is None or not math.isfinite(number):
        batched = (f"; function(prompt, completion) scores one completion a call (a function with a parameter "
                   f"named {BATCH_PARAMETER} is given a batch, as TRL's are)") \
            if isinstance(value, (list, tuple)) else ''
        raise NotAScore(f"a score must be a finite number{batched}")
    if abs(number) > LARGEST_SCORE:
        raise NotAScore(f"a score must lie {IN_RANGE}")
    return number


def parts_score(value: Mapping) -> PartedScore:
    """A score given as {name: part}: every part a finite number, and their sum."""
    parts = {str(part_name): as_number(part) for part_name, part in value.items()}
    bad = [part_name for part_name, part in parts.items() if part is None or not math.isfinite(part)]
    if bad or not parts:
        raise NotAScore(f"a score's parts must be finite numbers ({f'not {bad[0]}' if bad else 'it has none'})")
    try:
        score = PartedScore.of(parts)
    except OverflowError:  # finite parts whose sum is not
        raise NotAScore("the sum of its parts is not a finite number") from None
    if abs(score) > LARGEST_SCORE:
        raise NotAScore(f"the sum of its parts must lie {IN_RANGE}")
    return score


def as_number(value) -> Optional[float]:
    """A real number (a bool counts as 0 or 1; numpy and one-element torch scalars too) as a float, else None
    (also for an integer too large for a float)."""
    is_scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()
    if not (isinstance(value, numbers.Real) or is_scalar_tensor):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def as_turns(prompt: Prompt) -> List[Dict[str, str]]:
    return [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else list(prompt)


def function_identity(spec: str) -> Tuple[str, str]:
    """What a spec names, however its path is written: (the file's absolute path, or the module; the function)."""
    location, _, name = spec.rpartition(':')
    return (os.path.abspath(location) if location.endswith('.py') else location), name


def load_reward_function(spec: str) -> Callable[..., float]:
    """`path/to/file.py:function` or `module:function` -> the function, called as function(prompt, completion,
    **the prompt's fields it names). Each file is imported once per process (the run's start-up checks import it
    before anything loads)."""
    location, _, name = spec.rpartition(':')
    if not location or not name:
        raise ConfigError(f"reward function {spec!r}: give it as path/to/file.py:function or module:function")
    if location.endswith('.py') and not os.path.exists(location):
        raise MissingFileError(f"reward function {spec!r}: no file {location}")
    location, name = function_identity(spec)
    try:
        module = imported_module(location)
    except SyntaxError as error:
        raise ConfigError(f"reward function {spec!r}: {error.filename or location} line {error.lineno}: "
                          f"{error.msg}") from None
    except FAILURES as error:  # whatever the module's own code raises while it is imported
        raise ConfigError(f"reward function {spec!r}: importing {location} raised {describe_error(error)}") from None
    function = getattr(module, name, None)
    if not callable(function):
        what = f"has {name!r} of type {type(function).__name__}, not a function" if hasattr(module, name) else \
            f"has no function {name!r}"
        raise ConfigError(f"reward function {spec!r}: {location} {what}")
    return function


@functools.lru_cache(maxsize=None)
def imported_module(location: str):
    """The module of a file's absolute path, or of a module's name: imported once per process, so that the reward
    functions of one file share what it holds (a client, a cache, a model it loads)."""
    if not location.endswith('.py'):
        return importlib.import_module(location)
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(location))[0], location)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


BATCH_PARAMETER = 'completions'  # a reward function that names it is called as TRL calls its reward functions
TRL_ONLY = ('completion_ids', 'trainer_state', 'log_extra', 'log_metric')  # what TRL gives and halos does not


def field_parameters(function: Callable, batched: bool) -> Tuple[Optional[set], set, set]:
    """The prompt fields a reward function takes: the names of its parameters beyond what halos fills in (None
    where it takes **kwargs: every field), those of them without a default, and the names halos fills in (never
    given a field): the first two positional parameters, (prompt, completion), of a function called once per
    completion, or `prompts` and `completions` of one called once per batch."""
    parameters = signature_of(function)
    if batched:
        filled = [p for p in parameters if p.name in ('prompts', BATCH_PARAMETER) and p.kind != p.POSITIONAL_ONLY]
    else:
        filled = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p not in filled]
    takes_all = any(p.kind == p.VAR_KEYWORD for p in parameters)
    return ((None if takes_all else {p.name for p in named}), {p.name for p in named if p.default is p.empty},
            {p.name for p in filled})


def signature_of(function: Callable) -> List[inspect.Parameter]:
    try:
        return list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin or extension function without a signature: called as it comes
        return [inspect.Parameter(name, inspect.Parameter.POSITIONAL_ONLY) for name in ('prompt', 'completion')]


class RewardFunctionLabeler:
    """Scores from a Python function, called one of two ways:

    - once per completion, function(prompt, completion, **the prompt's fields it names) -> score;
    - once per call, where it has a parameter named `completions`, as TRL calls its reward functions:
      function(prompts=[...], completions=[...], **each field it names as a list) -> [score, ...]; a completion
      of a prompt given as turns is then TRL's [{'role': 'assistant', 'content': text}].

    Either may be `async def` (a reward that asks a server): the completions of one call are then scored
    concurrently."""
    may_abstain = False

    def __init__(self, spec: str):
        self.spec, self.function = spec, load_reward_function(spec)
        self.name = f'reward function {spec}'
        self.batched = any(p.name == BATCH_PARAMETER for p in signature_of(self.function))
        self.takes, self.needs, self.filled = field_parameters(self.function, self.batched)
        if not self.batched:
            self.check_one_at_a_time()
        missing = sorted(self.needs & set(TRL_ONLY))
        if missing:
            raise ConfigError(f"{self.name}: it takes {', '.join(missing)}, which TRL gives and halos does not (halos "
                              f"gives prompts, {BATCH_PARAMETER} and the prompts' own fields); give "
                              f"{missing[0]} a default")

    def check_one_at_a_time(self) -> None:
        """A function that cannot be called as function(prompt, completion) stops the run before anything loads."""
        try:
            inspect.signature(self.function).bind(None, None, **dict.fromkeys(self.needs))
        except ValueError:  # no signature to check
            pass
        except TypeError:
            raise ConfigError(
                f"{self.name}: it takes {inspect.signature(self.function)}; halos calls a reward function as "
                f"function(prompt, completion) for each completion, or, where it has a parameter named "
                f"{BATCH_PARAMETER}, as TRL does: function(prompts=[...], {BATCH_PARAMETER}=[...]) for a batch"
            ) from None

    def lacking(self, extra: Dict) -> Optional[str]:
        """What a prompt with these fields lacks for the function, else None."""
        missing = sorted(self.needs - extra.keys())
        if not missing:
            return None
        return (f"it takes {', '.join(missing)}, which its prompt's record lacks (a field given as null counts as "
                f"absent; the prompt's own fields: {', '.join(sorted(extra)) or 'none'})")

    def given(self, extra: Dict) -> Dict:
        """The prompt's fields that the function takes."""
        return {name: value for name, value in extra.items()
                if (self.takes is None or name in self.takes) and name not in self.filled}

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[Dict]) -> List:
        self.check_fields(extras)
        return self.scores(awaited(self.started(prompts, completions, extras)))

    def check_fields(self, extras: Sequence[Dict]) -> None:
        for index, extra in enumerate(extras):
            lacking = self.lacking(extra)
            if lacking:
                raise SampleFailed(index, lacking)

    def started(self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[Dict]) -> List:
        """The function called on the completions: its results, the failures it raised, or, where it is `async
        def`, the awaitables to await (with those of other functions, so that they overlap)."""
        if not self.batched:
            return [outcome(functools.partial(self.function, prompt, completion, **self.given(extra)))
                    for prompt, completion, extra in zip(prompts, completions, extras)]
        names = sorted({name for extra in extras for name in self.given(extra)})
        arguments = {name: [extra.get(name) for extra in extras] for name in names}
        arguments[BATCH_PARAMETER] = [text if isinstance(prompt, str) else [{'role': 'assistant', 'content': text}]
                                      for prompt, text in zip(prompts, completions)]
        if 'prompts' in self.filled or self.takes is None:
            arguments['prompts'] = list(prompts)
        return [outcome(functools.partial(self.function, **arguments))]

    def scores(self, results: List) -> List:
        """The scores of the finished calls (`started`, awaited), or the failure of the first that failed."""
        if not self.batched:
            for index, result in enumerate(results):
                if isinstance(result, FAILURES):
                    raise SampleFailed(index, f"it raised {describe_error(result)}")
            return results
        result, = results
        if isinstance(result, FAILURES):
            raise SampleFailed(None, f"it raised {describe_error(result)}")
        try:
            if isinstance(result, (str, bytes, Mapping)):
                raise TypeError
            return list(result)
        except TypeError:
            raise SampleFailed(None, f"it gave {shortened(result)}, not a list of one score per completion") from None


class RewardFunctionsLabeler:
    """Several reward functions, as TRL's GRPOTrainer takes them (reward_funcs, reward_weights): a completion's
    score is the weighted sum of the functions' scores, and each function's score is a part of it, named after
    the function and kept unweighted (as TRL logs them). A function that gives None for a completion does not
    apply to it (TRL's convention: a code reward on a math prompt); at least one must apply."""
    may_abstain = False

    def __init__(self, specs: Sequence[str], weights: Optional[Sequence[float]] = None):
        identities = [function_identity(spec) for spec in specs]
        twice = [spec for index, spec in enumerate(specs) if identities.index(identities[index]) != index]
        if twice:
            raise ConfigError(f"the reward functions {', '.join(specs)} name {twice[0]} twice: give each once (a "
                              f"weight scales one)")
        if weights is not None and len(weights) != len(specs):
            raise ConfigError(f"{len(weights)} reward weight{'s' * (len(weights) != 1)} for the {len(specs)} reward "
                              f"function{'s' * (len(specs) != 1)} {', '.join(specs)}: give one weight per function")
        if weights is not None and not any(weights):
            raise ConfigError(f"the reward weights of {', '.join(specs)} are all 0, so every score would be 0: give "
                              f"some function a weight")
        self.functions = [RewardFunctionLabeler(spec) for spec in specs]
        self.weights = [float(weight) for weight in weights] if weights is not None else [1.0] * len(specs)
        self.name = f"reward functions {', '.join(specs)}"
        short = [spec.rpartition(':')[2] for spec in specs]
        self.part_names = short if len(set(short)) == len(short) else list(specs)
        self.needs = set().union(*(function.needs for function in self.functions))  # the fields some function needs

    def lacking(self, extra: Dict) -> Optional[str]:
        reasons = [f'{function.spec}: {reason}' for function in self.functions for reason in [function.lacking(extra)]
                   if reason]
        return reasons[0] if reasons else None

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], extras: Sequence[Dict]) -> List:
        for function in self.functions:  # before any is called
            with named_in_failures(function):
                function.check_fields(extras)
        started = [function.started(prompts, completions, extras) for function in self.functions]
        finished = iter(awaited([result for results in started for result in results]))  # async ones overlap
        columns = []
        for function, results in zip(self.functions, started):
            with named_in_failures(function):
                columns.append(function.scores([next(finished) for _ in results]))
            if len(columns[-1]) != len(completions):
                raise SampleFailed(None, f"{function.spec} gave {len(columns[-1])} scores for {len(completions)} "
                                         f"completions")
        return [self.combined(index, row) for index, row in enumerate(zip(*columns))]

    def combined(self, index: int, row: Sequence) -> PartedScore:
        parts, total = {}, 0.0
        for function, name, weight, value in zip(self.functions, self.part_names, self.weights, row):
            if value is None:
                continue
            try:
                parts[name] = float(score_of(value))
            except NotAScore as refusal:
                raise SampleFailed(index, f"{function.spec} gave {shortened(value)}: {refusal}") from None
            total += weight * parts[name]
        if not parts:
            raise SampleFailed(index, "none of the reward functions applies to it (each gave None)")
        if not math.isfinite(total) or abs(total) > LARGEST_SCORE:
            raise SampleFailed(index, f"the weighted sum of its scores {parts} is not a finite number {IN_RANGE}")
        score = PartedScore(total)
        score.parts = parts
        return score


@contextlib.contextmanager
def named_in_failures(function: RewardFunctionLabeler):
    """A failure of one of several reward functions, named with its spec."""
    try:
        yield
    except SampleFailed as failure:
        raise SampleFailed(failure.index, f"{function.spec}: {failure.reason}") from None


def reward_function_labeler(spec: Union[str, Sequence[str]], weights: Optional[Sequence[float]] = None):
    """The labeler of a reward function, or of several (a list of specs, with a weight each or all 1); a list of
    one without a weight is that function."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if len(specs) == 1 and weights is None:
        return RewardFunctionLabeler(specs[0])
    return RewardFunctionsLabeler(specs, weights)


def check_prompts(labeler, examples, what: str) -> None:
    """Stop before anything is sampled when a prompt lacks a field a reward function takes."""
    examples = list(examples)
    lacking = sorted((example for example in examples if labeler.lacking(example.extra)),
                     key=lambda example: [int(part) if part.isdigit() else part
                                          for part in re.split(r'(\d+)', example.source)])  # record 2 before 10
    if lacking:
        others = f" (and so do {len(lacking) - 1} more of its {len(examples)} prompts)" if len(lacking) > 1 else ''
        raise LabelError(f"{labeler.name} cannot score {what}: {lacking[0].source}: "
                         f"{labeler.lacking(lacking[0].extra)}{others}")


# what a user's function may raise that is its failure, named with its sample: sys.exit() too, which would end the
# run without a word (Ctrl-C stays the process's own)
FAILURES = (Exception, SystemExit)


def outcome(call: Callable):
    """The call's result, or the failure it raised (FAILURES)."""
    try:
        return call()
    except FAILURES as error:
        return error


def awaited(results: List) -> List:
    """The results with every awaitable among them (from an `async def` function) awaited, all concurrently, on
    the process's one reward event loop."""
    pending = [index for index, result in enumerate(results) if inspect.isawaitable(result)]
    if pending:
        async def gathered():
            return await asyncio.gather(*(settled(results[index]) for index in pending))
        loop = reward_loop(os.getpid())
        for index, result in zip(pending, asyncio.run_coroutine_threadsafe(gathered(), loop).result()):
            if isinstance(result, BaseException) and not isinstance(result, FAILURES):
                raise result  # Ctrl-C in the function: this process's to act on, not the loop's
            results[index] = result
    return results


async def settled(awaitable):
    """The awaitable's result, or whatever it raised (SystemExit too, which would stop the shared loop)."""
    try:
        return await awaitable
    except BaseException as error:
        return error


@functools.lru_cache(maxsize=None)
def reward_loop(pid: int) -> asyncio.AbstractEventLoop:
    """One event loop for the async reward functions of process `pid` (a forked child gets its own), running in a
    daemon thread for the run's life (as TRL's): what a function keeps between calls (a client, a semaphore)
    stays bound to it, and a caller whose own loop is running (a notebook) can wait on it."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name='halos-reward-loop', daemon=True).start()
    return loop


def classifier_scores(logits: torch.Tensor) -> torch.Tensor:
    """[rows, labels] -> [rows]: a reward model's score, its class-1 logit when it has two classes (HALOs'
    Bradley-Terry convention), else its only one."""
    return logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]


REWARD_MODEL_FORMAT = 'halos_reward_model.json'  # how a halos-trained reward model's inputs were formatted
DEFAULT_REWARD_MODEL_LENGTH = 2048  # the longest input of a reward model that records none


@dataclasses.dataclass(frozen=True)
class RewardModelFormat:
    """How a halos reward model's training inputs were formatted, and their longest length (None: not recorded,
    by an export older than the record)."""
    use_chat_template: bool
    formatting: Formatting
    max_length: Optional[int] = None


def write_reward_model_format(directory: str, formatting: Formatting, use_chat_template: bool,
                              max_length: int) -> None:
    """Record, next to an exported reward model, how its training inputs were formatted and cut."""
    with open(os.path.join(directory, REWARD_MODEL_FORMAT), 'w') as f:
        json.dump({'use_chat_template': use_chat_template, **dataclasses.asdict(formatting), 'max_length': max_length},
                  f, indent=1)


def read_reward_model_format(path: str) -> Optional[RewardModelFormat]:
    """The format write_reward_model_format recorded; None without the file."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            recorded = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not readable as the reward model's format ({one_line(error)}); delete it to read "
                        f"inputs through the tokenizer's chat template") from None
    names = ['human_prefix', 'human_suffix', 'assistant_prefix', 'assistant_suffix']
    length = recorded.get('max_length') if isinstance(recorded, dict) else None
    if not (isinstance(recorded, dict) and isinstance(recorded.get('use_chat_template'), bool)
            and all(isinstance(recorded.get(name), str) for name in names)
            and (length is None or isinstance(length, int) and not isinstance(length, bool) and length > 0)):
        raise DataError(f"{path}: the reward model's format needs use_chat_template (true/false) and "
                        f"{', '.join(names)} (strings), and may give max_length (an integer > 0)")
    return RewardModelFormat(recorded['use_chat_template'], Formatting(*(recorded[name] for name in names)), length)


@torch.no_grad()
def score_token_rows(model, rows: List[List[int]], pad_token_id: int, device, batch_size: int = 8) -> torch.Tensor:
    """A reward model's score of each row of token ids (right-padded in batches)."""
    scores = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        length = max(len(row) for row in chunk)
        input_ids = torch.tensor([row + [pad_token_id] * (length - len(row)) for row in chunk], device=device)
        attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in chunk], device=device)
        scores.append(classifier_scores(model(input_ids=input_ids, attention_mask=attention_mask).logits.float()))
    return torch.cat(scores)


class RewardModelLabeler:
    """Scores from any HF sequence-classification model (one logit, or HALOs' two-logit convention).

    A reward model trained by halos (loss=bradley-terry) reads prompt + completion tokenized exactly as its
    training pairs were (its export records the format); any other reads the conversation through its
    tokenizer's chat template (HALOs' convention), or the halos format when it has none. A long input loses
    its start (warned of once).
    """
    may_abstain = False

    def __init__(self, path: str, dtype: str = 'float32', max_length: Optional[int] = None, device=None):
        self.name = f'reward model {path}'
        self.model, self.tokenizer = models.load_reward_model(path, dtype)
        self.device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        self.model.to(self.device)
        self.warned_of_cuts = False
        self.halos_format = read_reward_model_format(os.path.join(models.resolve_model_path(path), REWARD_MODEL_FORMAT))
        # its own training length unless one is given: every caller then scores an input alike
        self.max_length = max_length or (self.halos_format and self.halos_format.max_length) or \
            DEFAULT_REWARD_MODEL_LENGTH
        if self.halos_format is not None and self.halos_format.use_chat_template and not self.tokenizer.chat_template:
            raise ConfigError(f"reward model {path!r} was trained on chat-template text ({REWARD_MODEL_FORMAT} says "
                              f"use_chat_template: true), but its tokenizer has no chat template: restore its "
                              f"tokenizer files from the run's LATEST/hf export")

    def token_ids(self, prompt: Prompt, completion: str) -> List[int]:
        turns = as_turns(prompt)
        if self.halos_format is not None:
            use_chat_template, formatting = self.halos_format.use_chat_template, self.halos_format.formatting
            prompt_text = chat_template_prompt(self.tokenizer, turns) if use_chat_template else formatting.prompt(turns)
            prompt_ids = encode_prompt(self.tokenizer, prompt_text, use_chat_template)
            completion_ids = encode_completion(self.tokenizer, completion + formatting.assistant_suffix)
        elif self.tokenizer.chat_template:
            prompt_ids = []
            completion_ids = self.tokenizer.apply_chat_template(with_completion(turns, completion), tokenize=True,
                                                                return_dict=False)
        else:
            prompt_ids = encode_prompt(self.tokenizer, Formatting().prompt(turns), False)
            completion_ids = encode_completion(self.tokenizer, completion)
        ids = prompt_ids + completion_ids
        if len(ids) > self.max_length and not self.warned_of_cuts:
            self.warned_of_cuts = True
            rank0_print(f"warning: {self.name}: an input of {len(ids)} tokens is longer than max_length="
                        f"{self.max_length}, so it is scored on its last {self.max_length} (as is any other that "
                        f"long): its prompt's start is cut, or the start of its completion too")
        return ids[-self.max_length:]

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 extras: Sequence[Dict]) -> List[Optional[float]]:
        rows = [self.token_ids(prompt, completion) for prompt, completion in zip(prompts, completions)]
        return score_token_rows(self.model, rows, self.tokenizer.pad_token_id, self.device).tolist()


JUDGE_PROMPT_VERSION = 'halos-pointwise-v1'
JUDGE_INSTRUCTIONS = (
    "You rate how well an AI assistant answered a user. Consider helpfulness, correctness, clarity and "
    "concision. Rate the response from 1 (useless or harmful) to 10 (excellent). Answer with 'Score: N' only.")
SCORE_SCHEMA = {'type': 'object', 'properties': {'score': {'type': 'integer', 'enum': list(range(1, 11))}},
                'required': ['score'], 'additionalProperties': False}  # what a constrained judge answers
SCORE_PATTERN = re.compile(r'score\s*[:=]?\s*(\d+(?:\.\d+)?)', re.IGNORECASE)
NUMBER_PATTERN = re.compile(r'(?<![\d.])(\d+(?:\.\d+)?)(?![\d.])')


def parse_score(answer: str) -> Optional[float]:
    """The judge's 1-10 score: a constrained answer's `score` ({"score": 7}), else the number after the first
    'Score' (as in 'Score: 7'), else the first number in the answer; None when that number is missing or
    outside 1-10 (the sample is then dropped, never 0)."""
    match = SCORE_PATTERN.search(answer) or NUMBER_PATTERN.search(answer)  # {"score": 7} finds 7 too
    if match is None:
        return None
    score = float(match.group(1))
    return score if 1 <= score <= 10 else None


def pointwise_messages(prompt: Prompt, completion: str) -> List[Dict[str, str]]:
    conversation = '\n\n'.join(f"{turn['role'].upper()}: {turn['content']}" for turn in as_turns(prompt))
    return [{'role': 'system', 'content': JUDGE_INSTRUCTIONS},
            {'role': 'user', 'content': f"{conversation}\n\nRESPONSE TO RATE: {completion}"}]


class JudgeLabeler:
    """Pointwise 1-10 scores from an LLM judge on any OpenAI-compatible server (halos/judge.py: timeouts,
    retries, concurrency, pacing). Every judgment is kept in a JSONL cache as it arrives, keyed by the judge's
    messages, the judge, the prompt version, the seed and the answer length, so a rerun asks nothing twice;
    an answer without a score and a failed request score None and are not cached (a rerun asks again, as a fixed
    server should be), and `last_error` keeps the last of them.
    halos/judge.py (and the OpenAI client, a long import) is imported only here, so that train.py and
    eval.py start without it."""
    may_abstain = True

    def __init__(self, model: str, base_url: Optional[str], cache_path: str, concurrency: int = 4,
                 timeout: float = 30.0, max_retries: int = 5, sleep_time: float = 0.0, max_tokens: int = 16,
                 seed: int = 0):
        from halos import judge
        base_url = judge.server_url(base_url)
        self.model, self.base_url, self.cache_path = model, base_url, cache_path
        self.name = f'judge {model} at {judge.public_url(base_url)}'
        self.last_error: Optional[str] = None  # of the requests that failed after their retries
        self.concurrency, self.sleep_time, self.max_tokens, self.seed = concurrency, sleep_time, max_tokens, seed
        self.client = judge.make_client(base_url, timeout, max_retries)
        self.requested = 0  # requests sent by this labeler (a cached judgment costs none)

    def key(self, messages: List[Dict[str, str]]) -> str:
        from halos import judge
        return judge.cache_key(messages, self.model, JUDGE_PROMPT_VERSION, self.seed, self.max_tokens)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 extras: Sequence[Dict]) -> List[Optional[float]]:
        from halos import judge
        messages = [pointwise_messages(p, c) for p, c in zip(prompts, completions)]
        keys = [self.key(m) for m in messages]
        with judge.JudgmentCache(self.cache_path) as cache:
            missing = {key: m for key, m in zip(keys, messages) if key not in cache.records}
            response_format = None
            if missing:
                judge.check_reachable(self.client, self.base_url)
                response_format = judge.constrained(self.client, self.base_url, self.model, SCORE_SCHEMA)
            pacer = judge.RequestPacer(self.sleep_time)

            def ask_and_cache(key: str, request: List[Dict[str, str]]) -> dict:
                pacer.wait()
                answer = judge.ask(self.client, self.model, request, self.max_tokens, self.seed, response_format)
                if parse_score(answer) is None:
                    raise ValueError(f"an answer without a 1-10 score: {answer[:80]!r}")
                record = {'key': key, 'judge': self.model, 'prompt_version': JUDGE_PROMPT_VERSION, 'answer': answer,
                          'score': parse_score(answer)}
                cache.add(record)
                return record
            requests = {key: (lambda key=key, request=request: ask_and_cache(key, request))
                        for key, request in missing.items()}
            errors = judge.ask_all(requests, self.concurrency, lambda error: judge.fatal_error_message(
                error, self.base_url, self.model, self.cache_path))
            self.last_error = next(reversed(errors.values()), None)
            self.requested += len(missing)
            return [cache.records[key]['score'] if key in cache.records else None for key in keys]


LABELERS = ('function', 'reward_model', 'judge')


def make_labeler(kind: str, reward_function: Union[str, Sequence[str], None] = None, reward_model: Optional[str] = None,
                 judge_model: Optional[str] = None, base_url: Optional[str] = None, cache_path: Optional[str] = None,
                 max_length: Optional[int] = None, concurrency: int = 4,
                 reward_weights: Optional[Sequence[float]] = None) -> Labeler:
    """The labeler of `kind` (function, reward_model or judge) from its settings; a ConfigError names what is missing."""
    needs = {'function': ('reward_function', reward_function), 'reward_model': ('reward_model', reward_model),
             'judge': ('judge', judge_model)}
    if kind not in needs:
        raise ConfigError(f"labeler {kind!r}: give one of {', '.join(LABELERS)}")
    name, value = needs[kind]
    if not value:
        raise ConfigError(f"the {kind} labeler needs {name} to be set")
    if kind == 'function':
        return reward_function_labeler(reward_function, reward_weights)
    if kind == 'reward_model':
        return RewardModelLabeler(reward_model, max_length=max_length)
    return JudgeLabeler(judge_model, base_url, cache_path, concurrency=concurrency)
