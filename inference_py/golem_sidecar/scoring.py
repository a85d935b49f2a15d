"""Scoring a given answer under a model: the log-probability of its tokens after the prompt,
teacher-forced, many (prompt, answer, adapter) triples per left-padded forward pass. The sum and
whether greedy decoding would produce the answer are lm-evaluation-harness's loglikelihood
(loglikelihood.py splits context and continuation as it does); the mean is CompareAdapters'.

Memory is bounded whatever the request: logits are computed only at the answer positions
(answers sit at the right end of left-padded rows, so ``logits_to_keep`` takes just those), and
items are split into passes (passes.py) that also hold at most ``MAX_SCORED_POSITIONS``
vocabulary-wide rows of logits. Cancellation is checked between passes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from golem_sidecar.errors import caller_gone
from golem_sidecar.lanes import Lane, group_by_lane
from golem_sidecar.passes import split_passes

# Scored positions per pass: each holds a vocabulary-sized row of logits (SmolLM2: 49,152
# floats, 192 KiB), so 1,024 positions keep one pass's logits near 200 MiB.
MAX_SCORED_POSITIONS = 1024


class Loglikelihood(NamedTuple):
    """One answer's score under one model, plus the token count that a mean needs."""

    # Sum of the answer tokens' log-probabilities, each teacher forced.
    sum_logprob: float
    # Whether greedy decoding would have produced exactly these tokens.
    is_greedy: bool
    n_tokens: int

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / self.n_tokens


@dataclass(frozen=True)
class ScoreItem:
    prompt_ids: list[int]
    # Must not be empty: the mean over no tokens is undefined.
    answer_ids: list[int]
    # The peft adapter name, or None for the bare base.
    adapter: str | None

    @property
    def width(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def mean_logprobs(
    lane_of: Callable[[str | None], Lane],
    items: list[ScoreItem],
    pad_id: int,
    device: Any,
    limits: tuple[int, int],
    cancelled: threading.Event,
) -> list[float]:
    """The mean natural-log probability of each item's answer tokens, in the items' order."""
    found = loglikelihoods(lane_of, items, pad_id, device, limits, cancelled)
    return [score.mean_logprob for score in found]


def loglikelihoods(
    lane_of: Callable[[str | None], Lane],
    items: list[ScoreItem],
    pad_id: int,
    device: Any,
    limits: tuple[int, int],
    cancelled: threading.Event,
) -> list[Loglikelihood]:
    """Each item's answer scored under its adapter, in the items' order. ``lane_of`` says which
    lane serves an adapter (lanes.py); ``limits`` are the rows and padded tokens one pass may
    hold (limits.maxBatchSize, limits.maxBatchTokens)."""
    max_rows, max_tokens = limits
    longest = max((len(item.answer_ids) for item in items), default=1)
    # Every row of a pass keeps logits for the pass's longest answer.
    max_rows = max(1, min(max_rows, MAX_SCORED_POSITIONS // longest))
    scores: dict[int, Loglikelihood] = {}
    for lane, members in group_by_lane(list(enumerate(items)), lambda n: n[1].adapter, lane_of):
        for group in split_passes(members, lambda n: n[1].width, max_rows, max_tokens):
            if cancelled.is_set():
                raise caller_gone()
            found = _score_group(lane, [item for _, item in group], pad_id, device)
            scores.update(zip((index for index, _ in group), found, strict=True))
    return [scores[index] for index in range(len(items))]


def _score_group(
    lane: Lane, items: list[ScoreItem], pad_id: int, device: Any
) -> list[Loglikelihood]:
    sequences = [item.prompt_ids + item.answer_ids for item in items]
    width = max(len(s) for s in sequences)
    longest = max(len(item.answer_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        # The token at position t is predicted by the logits at t - 1: the last `longest`
        # tokens of every row are predicted by the `longest` positions before the last one.
        logits = lane(
            [item.adapter for item in items],
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=longest + 1,
        ).logits[:, :-1]
        targets = ids[:, width - longest :].unsqueeze(-1)
        picked = logits.gather(-1, targets).squeeze(-1).float()
        logprobs = picked - torch.logsumexp(logits.float(), dim=-1)
        greedy = logits.argmax(dim=-1) == targets.squeeze(-1)
    scores = []
    for i, item in enumerate(items):
        n = len(item.answer_ids)
        total = float(logprobs[i, longest - n :].sum())
        scores.append(Loglikelihood(total, bool(greedy[i, longest - n :].all()), n))
    return scores
