"""Labelers: whatever scores a completion of a prompt. Every labeler has one call shape,

    labeler(prompts, completions) -> scores

with `prompts[i]` as a prompts file gives it (a string, or a list of {role, content} turns), `completions[i]`
a string, and `scores[i]` a float, or None when no score could be had (a failed or unparseable judgment):
such a completion is dropped and counted, never scored 0.
"""
import importlib
import importlib.util
import os
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Union

import torch

import models
from halos.errors import ConfigError, MissingFileError
from halos.examples import Formatting

Prompt = Union[str, List[Dict[str, str]]]


class Labeler(Protocol):
    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> List[Optional[float]]: ...


def as_turns(prompt: Prompt) -> List[Dict[str, str]]:
    return [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else list(prompt)


def load_reward_function(spec: str) -> Callable[[Prompt, str], float]:
    """`path/to/file.py:function` or `module:function` -> the function, called as function(prompt, completion)."""
    location, _, name = spec.rpartition(':')
    if not location or not name:
        raise ConfigError(f"reward function {spec!r}: give it as path/to/file.py:function or module:function")
    if location.endswith('.py'):
        if not os.path.exists(location):
            raise MissingFileError(f"reward function {spec!r}: no file {location}")
        module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(location))[0], location)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ConfigError(f"reward function {spec!r}: cannot import module {location!r} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"reward function {spec!r}: {location} has no function {name!r}")
    return function


class RewardFunctionLabeler:
    """Scores from a Python function(prompt, completion) -> float."""

    def __init__(self, spec: str):
        self.spec, self.function = spec, load_reward_function(spec)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> List[Optional[float]]:
        return [float(self.function(prompt, completion)) for prompt, completion in zip(prompts, completions)]


@torch.no_grad()
def reward_model_scores(model, tokenizer, texts: List[str], max_length: int, device, batch_size: int = 8) -> torch.Tensor:
    """A sequence-classification reward model's score of each text: its class-1 logit when it has two classes
    (HALOs' Bradley-Terry convention), else its only one. A long text loses its prompt's start, not its end."""
    tokenizer.truncation_side = 'left'
    scores = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(texts[start:start + batch_size], return_tensors='pt', padding=True, truncation=True,
                           max_length=max_length).to(device)
        logits = model(**inputs).logits.float()
        scores.append(logits[:, 1] if logits.shape[1] == 2 else logits[:, 0])
    return torch.cat(scores)


class RewardModelLabeler:
    """Scores from any HF sequence-classification model (one logit, or HALOs' two-logit convention). The
    reward model reads the conversation through its tokenizer's chat template, or the halos prompt
    format when it has none."""

    def __init__(self, path: str, dtype: str = 'float32', max_length: int = 2048, formatting: Formatting = Formatting(),
                 device=None):
        self.model, self.tokenizer = models.load_reward_model(path, dtype)
        self.device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        self.model.to(self.device)
        self.max_length, self.formatting = max_length, formatting

    def text(self, prompt: Prompt, completion: str) -> str:
        turns = as_turns(prompt)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(turns + [{'role': 'assistant', 'content': completion}],
                                                      tokenize=False)
        return self.formatting.prompt(turns) + completion + self.formatting.assistant_suffix

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> List[Optional[float]]:
        texts = [self.text(prompt, completion) for prompt, completion in zip(prompts, completions)]
        return reward_model_scores(self.model, self.tokenizer, texts, self.max_length, self.device).tolist()
