"""Grading an answer against an expected answer: normalise both, then try the rules in order
(exact match, contains, token F1) and report the first that applies."""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

EXACT_MATCH = "exact_match"
CONTAINS = "contains"
TOKEN_F1 = "token_f1"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Grade:
    score: float
    rule: str
    normalized_answer: str
    normalized_expected: str


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalisation)."""
    lowered = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", lowered).split())


def token_f1(answer: str, expected: str) -> float:
    """F1 of the two bags of words; 0 when either is empty."""
    answer_tokens, expected_tokens = answer.split(), expected.split()
    common = sum((Counter(answer_tokens) & Counter(expected_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(answer_tokens)
    recall = common / len(expected_tokens)
    return 2 * precision * recall / (precision + recall)


def grade(answer: str, expected: str) -> Grade:
    """Scores in [0, 1]: 1 for an exact or contained match, else the token F1."""
    got, want = normalize(answer), normalize(expected)
    if got == want:
        return Grade(1.0, EXACT_MATCH, got, want)
    # Word-bounded, so "fantasy" is not found inside "fantasyland".
    if want and re.search(rf"(^| ){re.escape(want)}( |$)", got):
        return Grade(1.0, CONTAINS, got, want)
    return Grade(token_f1(got, want), TOKEN_F1, got, want)
