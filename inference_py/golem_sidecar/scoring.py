"""Scoring a given answer under a model: the mean log-probability of its tokens after the prompt,
teacher-forced, many (prompt, answer, adapter) triples in one left-padded forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from golem_sidecar.decoding import BASE_ADAPTER


@dataclass(frozen=True)
class ScoreItem:
    prompt_ids: list[int]
    # Must not be empty: the mean over no tokens is undefined.
    answer_ids: list[int]
    # The peft adapter name, or None for the bare base.
    adapter: str | None


def mean_logprobs(
    model: Any, items: list[ScoreItem], pad_id: int, device: Any, peft: bool, chunk: int
) -> list[float]:
    """The mean natural-log probability of each item's answer tokens, in chunks of ``chunk``."""
    scores: list[float] = []
    for start in range(0, len(items), chunk):
        scores.extend(_score_chunk(model, items[start : start + chunk], pad_id, device, peft))
    return scores


def _score_chunk(
    model: Any, items: list[ScoreItem], pad_id: int, device: Any, peft: bool
) -> list[float]:
    sequences = [item.prompt_ids + item.answer_ids for item in items]
    width = max(len(s) for s in sequences)
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
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **extra,
        ).logits.float()
    # The token at position t is predicted by the logits at t - 1.
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scores = []
    for i, item in enumerate(items):
        n = len(item.answer_ids)
        scores.append(float(logprobs[i, width - 1 - n :].mean()))
    return scores
