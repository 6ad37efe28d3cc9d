"""Rule-based rewards for the tests (the labeler's call shape: reward(prompt, completion) -> float)."""


def vowels(prompt, completion: str) -> float:
    """The number of vowels: varies from sample to sample even for the tiny random model."""
    return float(sum(character in 'aeiou' for character in completion.lower()))


def letter_e(prompt, completion: str) -> float:
    """The share of the letter e among the completion's characters (0 when it is empty)."""
    return completion.count('e') / max(1, len(completion))


def characters(prompt, completion: str) -> float:
    """A hackable proxy: the longer the completion, the higher."""
    return float(len(completion))


def brief(prompt, completion: str) -> float:
    """A gold reward for the hackable proxy: 1 for a completion of at most 150 characters, else 0."""
    return 1.0 if len(completion) <= 150 else 0.0


def on_some_prompts(prompt, completion: str) -> float:
    """A constant for the prompts that ask for a short note or mention a friend (their groups are degenerate),
    the completion's length for the others."""
    return 0.0 if 'friend' in str(prompt) or 'short note' in str(prompt) else float(len(completion))


def constant(prompt, completion: str) -> float:
    """The same score for every completion: nothing to learn from."""
    return 1.0


def answer_count(prompt, completion: str, answer: str) -> float:
    """A reward that reads a field of the prompts file: how often the completion says the prompt's answer."""
    return float(completion.count(answer))


def vowels_and_brevity(prompt, completion: str) -> dict:
    """A reward given in named parts: their sum is the score, and each part's mean is logged."""
    return {'vowels': vowels(prompt, completion), 'brevity': -len(completion) / 100}


CALLS = []  # what trl_answer_count was given, call by call


def trl_answer_count(prompts, completions, answer, **kwargs):
    """answer_count in TRL's form: one call for the batch, every argument a list (a completion of a prompt given as
    turns is TRL's [{'role': 'assistant', 'content': text}])."""
    CALLS.append({'prompts': prompts, 'completions': completions, 'answer': answer, **kwargs})
    texts = [c if isinstance(c, str) else c[0]['content'] for c in completions]
    return [float(text.count(a)) for text, a in zip(texts, answer)]
