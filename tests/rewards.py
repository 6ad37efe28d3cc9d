"""Rule-based rewards for the tests (the labeler's call shape: reward(prompt, completion) -> float)."""


def vowels(prompt, completion: str) -> float:
    """The number of vowels: varies from sample to sample even for the tiny random model."""
    return float(sum(character in 'aeiou' for character in completion.lower()))


def letter_e(prompt, completion: str) -> float:
    """The share of the letter e among the completion's characters (0 when it is empty)."""
    return completion.count('e') / max(1, len(completion))
