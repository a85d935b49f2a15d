"""Reading the prompts of rows that join a batch: in groups of similar length (length_groups),
each left-padded together, a chunk of columns at a time when others are decoding
(scheduler.py), with the group's common beginning read once per adapter instead of once per
row.

Padding is compute thrown away: a batch of prompts of 5 to 19 tokens, padded to 19, reads
about twice the tokens it holds. Splitting it costs a forward pass per group instead, so rows
are grouped where that pays.

Rows whose prompts begin with the same tokens (a template, a system prompt, an exam's
instruction) hold the same keys and values for those tokens, position for position, as long as
they wear the same adapter. So that shared prefix is read for one row per adapter, its cache
copied to every row, and only the rest of each prompt is read row by row. The layout of a row
is then [shared prefix][padding][own tokens]: padding in the middle is masked like padding on
the left, and positions count real tokens only, so every row sees what it would alone.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from golem_sidecar.decoding import Batch, Row, forward
from golem_sidecar.lanes import Lane

# Reading a prefix once costs one more forward pass (on CPU its weights are read again, about
# what 20-30 prompt tokens of SmolLM2-135M cost to compute); it pays when it saves more token
# reads than that.
SHARED_PREFIX_MIN_SAVING = 32
# What one more forward pass costs, in prompt tokens read: on 2 CPU cores a pass over one token
# of one row of SmolLM2-135M takes about 45 ms, a prompt token in a batch about 1.2 ms.
PASS_COST_TOKENS = 40


def length_groups(rows: list[Row]) -> list[list[Row]]:
    """The rows cut into groups of similar prompt length, each padded to its longest, such that
    the token reads padding costs plus PASS_COST_TOKENS per group are least (exactly, over the
    rows sorted by length: a group is a run of that order)."""
    ordered = sorted(rows, key=lambda row: len(row.prompt_ids))
    lengths = [len(row.prompt_ids) for row in ordered]
    # best[i]: the least cost of the first i rows; start[i]: where the last group of it starts.
    best = [0] + [0] * len(ordered)
    start = [0] * (len(ordered) + 1)
    for end in range(1, len(ordered) + 1):
        options = (
            (best[begin] + PASS_COST_TOKENS + (end - begin) * lengths[end - 1], begin)
            for begin in range(end)
        )
        best[end], start[end] = min(options)
    groups = []
    end = len(ordered)
    while end:
        groups.append(ordered[start[end] : end])
        end = start[end]
    return groups[::-1]


def shared_prefix(rows: list[Row]) -> int:
    """How many leading prompt tokens all rows have in common, leaving each row at least one of
    its own (the last token's logits start its answer)."""
    first = rows[0].prompt_ids
    limit = min(len(row.prompt_ids) for row in rows) - 1
    length = 0
    while length < limit and all(row.prompt_ids[length] == first[length] for row in rows):
        length += 1
    return length


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of prompts padded on the left to the longest."""
    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


class Prefill:
    """Rows reading their prompts: at once, or a chunk of columns per step so that rows already
    decoding are never held up by a long prompt for long; a shared prefix first, for one row
    per adapter."""

    def __init__(self, lane: Lane, rows: list[Row], pad_id: int, device: Any) -> None:
        self.lane, self.rows = lane, rows
        # One row per adapter reads the shared prefix; ``_head_of`` maps each row to its head.
        self._heads = list(dict.fromkeys(row.adapter for row in rows))
        shared = shared_prefix(rows)
        if (len(rows) - len(self._heads)) * shared < SHARED_PREFIX_MIN_SAVING:
            shared = 0
        self.shared = shared
        own, own_mask = left_pad([row.prompt_ids[shared:] for row in rows], pad_id)
        prefix = torch.tensor(rows[0].prompt_ids[:shared], dtype=torch.long)
        ids = torch.cat([prefix.expand(len(rows), shared), own], dim=1)
        mask = torch.cat([torch.ones((len(rows), shared), dtype=torch.long), own_mask], dim=1)
        self.ids, self.mask = ids.to(device), mask.to(device)
        # Positions count real tokens only, so a padded row sees the positions it would alone.
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self._head_of = torch.tensor(
            [self._heads.index(row.adapter) for row in rows], dtype=torch.long, device=device
        )
        self.cache = DynamicCache()
        self.read = 0
        self.logits: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    @property
    def done(self) -> bool:
        return self.read == self.width

    @property
    def reading_rows(self) -> int:
        """How many rows the next chunk reads: one per adapter within the shared prefix."""
        return len(self._heads) if self.read < self.shared else len(self.rows)

    def advance(self, columns: int) -> int:
        """Reads up to ``columns`` more prompt columns (of the shared prefix, then of every
        row's own tokens); returns how many tokens that read."""
        start, rows = self.read, self.reading_rows
        in_prefix = start < self.shared
        # Within the prefix the first rows stand for their heads: every row's prefix is the same.
        adapters = self._heads if in_prefix else [row.adapter for row in self.rows]
        end = min(self.shared if in_prefix else self.width, start + max(1, columns))
        self.logits = forward(
            self.lane,
            adapters,
            self.ids[:rows, start:end],
            self.mask[:rows, :end],
            self.positions[:rows, start:end],
            self.cache,
        )
        if in_prefix and end == self.shared:
            # Every row takes its adapter's copy of the prefix's keys and values.
            self.cache.batch_select_indices(self._head_of)
        self.read = end
        return (end - start) * rows

    def decoding(self) -> Batch:
        """The rows, prompts read, ready for their first token."""
        assert self.done and self.logits is not None
        return Batch(
            self.lane, self.rows, self.mask, self.positions[:, -1:], self.cache, self.logits
        )
