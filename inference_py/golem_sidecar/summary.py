"""The summary of a GradeExam: each model's mean per scorer, and each adapter's change from the
bare base, item by item.

Sums are exact (fractions of the scores' binary values), so the summary does not depend on the
order the results were added in: a run resumed from a results file ends with the same numbers,
bit for bit, as a run that graded everything in one go. Memory holds one running total per model
and scorer, whatever the exam's length."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from golem_sidecar.gen import exam_pb2


@dataclass
class _Total:
    sum: Fraction = Fraction(0)
    n: int = 0

    def add(self, value: float | Fraction) -> None:
        self.sum += Fraction(value)
        self.n += 1

    @property
    def mean(self) -> float:
        return float(self.sum / self.n) if self.n else 0.0


@dataclass
class _Delta:
    # Sum over the items both models were scored on of (adapter - base).
    total: _Total
    better: int = 0
    worse: int = 0
    same: int = 0


class Tally:
    """Running totals for ``models`` (labels, the base's first when graded) and ``scorers``."""

    def __init__(self, models: Sequence[str], scorers: Sequence[str], base: str | None) -> None:
        self._models, self._scorers, self._base = list(models), list(scorers), base
        self._totals = {(m, s): _Total() for m in models for s in scorers}
        adapters = [m for m in models if m != base] if base is not None else []
        self._deltas = {(m, s): _Delta(_Total()) for m in adapters for s in scorers}

    def add_item(self, scores: Mapping[str, Mapping[str, float]]) -> None:
        """One item's scores: model label -> scorer -> score (absent where a scorer does not
        apply to the item)."""
        for (model, scorer), total in self._totals.items():
            if scorer in scores[model]:
                total.add(scores[model][scorer])
        if self._base is None:
            return
        base = scores[self._base]
        for (model, scorer), delta in self._deltas.items():
            if scorer not in base or scorer not in scores[model]:
                continue
            ours, theirs = scores[model][scorer], base[scorer]
            # Subtracted as fractions: a float difference would round.
            delta.total.add(Fraction(ours) - Fraction(theirs))
            delta.better += ours > theirs
            delta.worse += ours < theirs
            delta.same += ours == theirs

    def models(self, adapter_hashes: Mapping[str, str]) -> list[exam_pb2.ModelScores]:
        return [
            exam_pb2.ModelScores(
                model=model,
                adapter_hash=adapter_hashes.get(model, ""),
                scores=[self._score(model, scorer) for scorer in self._scorers],
            )
            for model in self._models
        ]

    def _score(self, model: str, scorer: str) -> exam_pb2.ScorerScore:
        total = self._totals[(model, scorer)]
        return exam_pb2.ScorerScore(scorer=scorer, mean=total.mean, n=total.n)

    def deltas(self) -> list[exam_pb2.AdapterDelta]:
        adapters = dict.fromkeys(model for model, _ in self._deltas)
        return [
            exam_pb2.AdapterDelta(
                model=model, deltas=[self._delta(model, scorer) for scorer in self._scorers]
            )
            for model in adapters
        ]

    def _delta(self, model: str, scorer: str) -> exam_pb2.ScorerDelta:
        delta = self._deltas[(model, scorer)]
        return exam_pb2.ScorerDelta(
            scorer=scorer,
            delta=delta.total.mean,
            n=delta.total.n,
            better=delta.better,
            worse=delta.worse,
            same=delta.same,
        )
