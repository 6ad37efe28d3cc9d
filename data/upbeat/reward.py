"""The upbeat task's reward: how positive a reply sounds, from a small word list (a cheap, fixed stand-in for
the sentiment classifier of the DPO paper's IMDb task).

    reward(prompt, completion) = (positive words - negative words) / sqrt(words), clipped to [-1, 1]
                                 -1 for a reply of fewer than 5 words (an empty reply cannot score)

Words are lower-cased letter runs; "not", "no" and "never" directly before a listed word flip it. The
prompt is not used (it is the labeler's call shape: a string or a list of {role, content} turns).
"""
import math
import re

POSITIVE = set('''
amazing awesome beautiful best bright brilliant calm charming cheerful comfortable cozy delight delighted
delightful enjoy enjoyable enjoyed excellent excited exciting fantastic fun glad good gorgeous grateful great
happy joy joyful kind love lovely loved nice peaceful perfect pleasant pleased positive refreshing relaxing
smile sunny sweet terrific thankful thrilled warm welcome wonderful
'''.split())
NEGATIVE = set('''
angry annoying anxious awful bad bland boring broken cold depressing difficult dreadful dull fail failed gloomy
hard hate hated horrible lonely miserable nasty negative painful poor sad scary stress stressful terrible tired
tough ugly unhappy unpleasant upset worried worse worst
'''.split())
NEGATIONS = {'not', 'no', 'never'}
MIN_WORDS = 5


def reward(prompt, completion: str) -> float:
    words = re.findall(r"[a-z]+", completion.lower())
    if len(words) < MIN_WORDS:
        return -1.0
    score = 0
    for previous, word in zip([''] + words, words):
        polarity = (word in POSITIVE) - (word in NEGATIVE)
        score += -polarity if previous in NEGATIONS else polarity
    return max(-1.0, min(1.0, score / math.sqrt(len(words))))
