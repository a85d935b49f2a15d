"""Exam scorers, chosen by name from one registry.

A scorer reads what an exam item expects (``Target``) and what one model did on it (``Observed``)
and returns a number, higher is better. Text scorers read the model's generated output; with
several accepted answers they take the best over them. Log-likelihood scorers read numbers from
the model: each names the continuations it needs (``Scorer.continuations``), so the engine can
score every item's continuations for base and adapters in the same batched passes, then hand the
results back in ``Observed.likelihoods``.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from rouge_score import rouge_scorer

from golem_sidecar.errors import invalid_argument
from golem_sidecar.scoring import Loglikelihood

Kind = Literal["text", "loglikelihood"]

# Python's re has no timeout, so a hostile pattern could backtrack for ever. Patterns come from
# exam files, so they are bounded in length here and the subject is a generated output, which
# max_new_tokens bounds; a short pattern can still backtrack badly, so exam authors own theirs.
MAX_PATTERN_CHARS = 256


@dataclass(frozen=True)
class Target:
    """What an exam item expects."""

    # Accepted answers, at least one; for the regex scorer each is a pattern.
    answers: tuple[str, ...]
    # The options of a multiple-choice item; the right ones are among ``answers``.
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Observed:
    """What one model did on an exam item."""

    # The generated answer; empty when only log-likelihood scorers run.
    output: str = ""
    # Log-likelihood of each continuation a scorer asked for, by its text.
    likelihoods: Mapping[str, Loglikelihood] = field(default_factory=dict)


@dataclass(frozen=True)
class Scorer:
    name: str
    kind: Kind
    score: Callable[[Target, Observed], float]
    # The continuations whose log-likelihood ``score`` reads; none for a text scorer.
    continuations: Callable[[Target], tuple[str, ...]] = lambda target: ()
    # Whether the scorer can score an item at all; one that cannot leaves it out of its mean.
    applies: Callable[[Target], bool] = lambda target: True


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation, drop the articles a/an/the,
    collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _best(metric: Callable[[str, str], float]) -> Callable[[Target, Observed], float]:
    """A text scorer from a metric of (output, one answer): the best over accepted answers."""

    def score(target: Target, observed: Observed) -> float:
        return max(metric(observed.output, answer) for answer in target.answers)

    return score


def _exact_match(output: str, answer: str) -> float:
    return float(normalize(output) == normalize(answer))


def _contains(output: str, answer: str) -> float:
    # Compared word-wise, so "fantasy" is not found inside "fantasyland".
    return float(f" {normalize(answer)} " in f" {normalize(output)} ")


def token_f1(output: str, answer: str) -> float:
    """SQuAD's token F1 between normalised output and answer tokens (multiset overlap)."""
    predicted, expected = normalize(output).split(), normalize(answer).split()
    if not predicted or not expected:
        # SQuAD v2: an empty answer only matches an empty output.
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """An exam answer compiled as a regex, refused when too long or invalid; exam loading calls
    it so that a bad pattern is refused before any work starts."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise invalid_argument(
            "answer",
            f"a regex answer has at most {MAX_PATTERN_CHARS} characters, this has {len(pattern)}",
        )
    return _compiled(pattern)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise invalid_argument("answer", f"{pattern!r} is not a valid regex: {error}") from None


def _regex(output: str, pattern: str) -> float:
    # The raw output, not normalised: the pattern decides what it accepts.
    return float(compile_pattern(pattern).search(output) is not None)


@functools.cache
def _rouge() -> rouge_scorer.RougeScorer:
    # Built once: the scorer holds its tokenizer. No stemming, the library's default.
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(output: str, answer: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens) from Google's rouge-score."""
    return float(_rouge().score(answer, output)["rougeL"].fmeasure)


def _mean_logprob(target: Target, observed: Observed) -> float:
    """Mean log-probability per token of the likeliest accepted answer, teacher forced."""
    results = (observed.likelihoods[answer] for answer in target.answers)
    return max(result.sum_logprob / result.n_tokens for result in results)


def _choice_accuracy(target: Target, observed: Observed) -> float:
    """1 when the choice with the highest log-likelihood is an accepted answer (the harness's
    ``acc``: summed, not length-normalised; the first choice wins a tie)."""
    chosen = max(target.choices, key=lambda choice: observed.likelihoods[choice].sum_logprob)
    return float(chosen in target.answers)


SCORERS: Mapping[str, Scorer] = {
    scorer.name: scorer
    for scorer in (
        Scorer("exact_match", "text", _best(_exact_match)),
        Scorer("contains", "text", _best(_contains)),
        Scorer("regex", "text", _best(_regex)),
        Scorer("token_f1", "text", _best(token_f1)),
        Scorer("rouge_l", "text", _best(rouge_l)),
        Scorer("mean_logprob", "loglikelihood", _mean_logprob, lambda target: target.answers),
        Scorer(
            "choice_accuracy",
            "loglikelihood",
            _choice_accuracy,
            lambda target: target.choices,
            lambda target: bool(target.choices),
        ),
    )
}


def known_scorers() -> list[str]:
    """Every scorer's name, sorted."""
    return sorted(SCORERS)


def get_scorer(name: str) -> Scorer:
    """The scorer called ``name``; an unknown name is INVALID_ARGUMENT with the closest known
    name suggested."""
    scorer = SCORERS.get(name)
    if scorer is not None:
        return scorer
    close = difflib.get_close_matches(name, known_scorers(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise invalid_argument(
        "scorers",
        f"unknown scorer {name!r}{hint} (known: {', '.join(known_scorers())})",
        reason="UNKNOWN_SCORER",
    )
