"""Scoring a given answer under a model: the mean log-probability of its tokens after the prompt,
teacher-forced, many (prompt, answer, adapter) triples per left-padded forward pass.

Memory is bounded whatever the request: logits are computed only at the answer positions
(answers sit at the right end of left-padded rows, so ``logits_to_keep`` takes just those), and
items are grouped so that one pass holds at most ``max_positions`` scored positions and
``max_tokens`` input tokens. Cancellation is checked between passes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from golem_sidecar.decoding import BASE_ADAPTER
from golem_sidecar.errors import caller_gone

# Scored positions per pass: each holds a vocabulary-sized row of logits (SmolLM2: 49,152
# floats, 192 KiB), so 1,024 positions keep one pass's logits near 200 MiB.
MAX_SCORED_POSITIONS = 1024


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
    model: Any,
    items: list[ScoreItem],
    pad_id: int,
    device: Any,
    peft: bool,
    max_tokens: int,
    cancelled: threading.Event,
    max_positions: int = MAX_SCORED_POSITIONS,
) -> list[float]:
    """The mean natural-log probability of each item's answer tokens."""
    scores: list[float] = []
    for group in _groups(items, max_tokens, max_positions):
        if cancelled.is_set():
            raise caller_gone()
        scores.extend(_score_group(model, group, pad_id, device, peft))
    return scores


def _groups(
    items: list[ScoreItem], max_tokens: int, max_positions: int
) -> Iterator[list[ScoreItem]]:
    """Consecutive items, as many per pass as the padded token and position budgets allow (an
    item too big for them alone still gets a pass of its own)."""
    group: list[ScoreItem] = []
    for item in items:
        candidate = [*group, item]
        width = max(i.width for i in candidate)
        answer = max(len(i.answer_ids) for i in candidate)
        fits = len(candidate) * width <= max_tokens and len(candidate) * answer <= max_positions
        if group and not fits:
            yield group
            candidate = [item]
        group = candidate
    if group:
        yield group


def _score_group(
    model: Any, items: list[ScoreItem], pad_id: int, device: Any, peft: bool
) -> list[float]:
    sequences = [item.prompt_ids + item.answer_ids for item in items]
    width = max(len(s) for s in sequences)
    longest = max(len(item.answer_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    extra: dict[str, Any] = {}
    if peft:
        extra["adapter_names"] = [item.adapter or BASE_ADAPTER for item in items]
    with torch.inference_mode():
        # The token at position t is predicted by the logits at t - 1: the last `longest`
        # tokens of every row are predicted by the `longest` positions before the last one.
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=longest + 1,
            **extra,
        ).logits[:, :-1]
        targets = ids[:, width - longest :].unsqueeze(-1)
        picked = logits.gather(-1, targets).squeeze(-1).float()
        logprobs = picked - torch.logsumexp(logits.float(), dim=-1)
    scores = []
    for i, item in enumerate(items):
        n = len(item.answer_ids)
        scores.append(float(logprobs[i, longest - n :].mean()))
    return scores
