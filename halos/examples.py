"""The HALOs data model: an `Example` holds one prompt and everything known about its completions, and a
`Dataset` maps formatted prompts to Examples. Dataset parsers (halos.datasets, halos.feedback) fill them;
loaders (dataloader.py) flatten them into training items.
"""
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

ROLES = ('user', 'assistant', 'system')


@dataclass
class Example:
    """One prompt and everything known about its completions."""
    prompt: str = ''                      # formatted prompt, ending with assistant_prefix
    turns: List[Dict[str, str]] = field(default_factory=list)  # the prompt as chat turns {'role', 'content'}
    generations: List[str] = field(default_factory=list)       # completions, each ending with assistant_suffix
    sft_index: int = -1                   # index of the SFT target in generations
    scores: List[float] = field(default_factory=list)  # one per generation (higher is better), when the data has them
    pairs: List[Tuple[int, int]] = field(default_factory=list)  # (i, j): generations[i] preferred to generations[j]
    desirable: List[bool] = field(default_factory=list)        # unary labels, one per generation (binary feedback)
    weights: List[float] = field(default_factory=list)         # per generation (feedback files); empty: all 1
    pair_weights: Dict[Tuple[int, int], float] = field(default_factory=dict)  # per pair (feedback files); else 1
    truncation_mode: str = 'keep_end'     # keep the start or the end of an over-long prompt
    dataset_name: str = ''
    original_prompt: str = ''             # the raw instruction (AlpacaEval)
    prompt_id: str = ''                   # the prompt's id in a feedback or prompts file (else: a digest of it)
    extra: Dict[str, Any] = field(default_factory=dict)  # its record's other fields (an answer to check), by name
    source: str = ''                      # where the first record of this prompt came from, for error messages
    text_prompt: bool = False             # its record gave the prompt as one string (TRL's standard format)
    demonstrated: bool = False            # its generations are demonstrations: SFT trains on every one

    def num_generations(self) -> int:
        return len(self.generations)

    def weight_of(self, completion: str) -> float:
        """The weight of a completion (its first occurrence), 1 when the data gives none."""
        return self.weights[self.generations.index(completion)] if self.weights else 1.0

    def pair_weight(self, pair: Tuple[int, int]) -> float:
        return self.pair_weights.get(tuple(pair), 1.0)

    def sft_targets(self) -> List[str]:
        """What SFT trains on: every demonstration, else the one SFT target (none without generations)."""
        if not self.generations:
            return []
        return list(self.generations) if self.demonstrated else [self.generations[self.sft_index]]

    def given_prompt(self):
        """The prompt in the form its record gave it, as labellers see it: its text, or its turns."""
        return self.turns[0]['content'] if self.text_prompt else self.turns

    def group_key(self) -> str:
        """What groups the completions of this prompt (GRPO): its prompt_id, else a digest of its turns."""
        return self.prompt_id or prompt_digest(self.turns or self.prompt)

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

    def values(self):
        return self.data.values()

    def num_pairs(self) -> int:
        return sum(len(example.pairs) for example in self.data.values())


def prompt_digest(prompt) -> str:
    """A stable id of a prompt (a string or a list of turns): the same in every run, round and process."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Formatting:
    """How turns become a prompt string (Tulu style by default): each turn as prefix + text + suffix of its
    role, then assistant_prefix; each completion ends with assistant_suffix."""
    human_prefix: str = '\n<|user|>\n'
    human_suffix: str = ''
    assistant_prefix: str = '\n<|assistant|>\n'
    assistant_suffix: str = ''

    def prompt(self, turns: List[Dict[str, str]]) -> str:
        return render_turns(turns, self.human_prefix, self.human_suffix, self.assistant_prefix, self.assistant_suffix)


def render_turns(turns: List[Dict[str, str]], human_prefix: str, human_suffix: str,
                 assistant_prefix: str, assistant_suffix: str) -> str:
    """Prompt string: each turn as prefix + text + suffix of its role, then assistant_prefix; a prompt that ends
    in an assistant turn (a prefilled reply) ends in that turn, open, for the completion to continue.

    A system turn is written as its bare text before the first human turn.
    """
    rendered = []
    for number, turn in enumerate(turns, 1):
        if turn['role'] == 'assistant':
            left_open = number == len(turns)
            rendered.append(assistant_prefix + turn['content'] + ('' if left_open else assistant_suffix))
        elif turn['role'] == 'system':
            rendered.append(turn['content'])
        else:
            rendered.append(human_prefix + turn['content'] + human_suffix)
    return ''.join(rendered) + ('' if ends_in_reply(turns) else assistant_prefix)


def ends_in_reply(turns: List[Dict[str, str]]) -> bool:
    """Whether a prompt ends in the assistant's turn: the start of the reply, which its completion continues (as
    TRL's continue_final_message)."""
    return bool(turns) and turns[-1]['role'] == 'assistant'


def chat_template_prompt(tokenizer, turns: List[Dict[str, str]]) -> str:
    """A prompt rendered by the tokenizer's chat template: a new assistant turn opened, or a prefilled one left
    open (ends_in_reply)."""
    if ends_in_reply(turns):
        return tokenizer.apply_chat_template(turns, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def with_completion(turns: List[Dict[str, str]], completion: str) -> List[Dict[str, str]]:
    """The conversation of a prompt and its completion: the reply's own turn, or the end of a prefilled one."""
    if ends_in_reply(turns):
        return [*turns[:-1], {'role': 'assistant', 'content': turns[-1]['content'] + completion}]
    return [*turns, {'role': 'assistant', 'content': completion}]


def add_comparison(dataset: Dataset, turns: List[Dict[str, str]], completions: Tuple[str, str], preferred: int,
                   formatting: Formatting, source: str, scores: Tuple = (), truncation_mode: str = 'keep_end') -> Example:
    """Record that completions[preferred] is preferred to the other completion of the conversation `turns`:
    the part every hub parser shares. The SFT target is the first completion recorded for the prompt."""
    prompt = formatting.prompt(turns)
    example = dataset[prompt]
    n = example.num_generations()
    example.prompt, example.turns = prompt, turns
    example.generations += [completion + formatting.assistant_suffix for completion in completions]
    example.scores += list(scores)
    example.pairs.append((n + preferred, n + 1 - preferred))
    example.sft_index = 0
    example.truncation_mode = truncation_mode
    example.dataset_name = dataset.name
    example.source = example.source or source
    example.remove_extra_spaces()
    return example
