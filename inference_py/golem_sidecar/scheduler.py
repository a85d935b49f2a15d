"""Continuous batching on the model thread: rows join the running batches between decode steps
and leave them the step they finish, so a newcomer never waits for a whole batch to end.

Each step:

1. rows whose prompts are being read (prefill.Prefill) read the next chunk; a prefill that is
   done joins its lane's running batch (decoding.Batch.merge), or starts it;
2. every running batch picks each row's next token and, for the rows still going, runs one
   forward pass.

A prefill is read whole when nothing is decoding. While rows are decoding, prefills read at
most PREFILL_TOKENS_PER_STEP prompt tokens per step between them (chunked prefill), so however
long a newcomer's prompt, the running rows' next token is delayed by a bounded amount.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from golem_sidecar.decoding import Batch, Row, eos_ids, pad_id
from golem_sidecar.lanes import Lane
from golem_sidecar.prefill import Prefill, length_groups

# Prompt tokens read per step while other rows decode. A step of SmolLM2-135M over 512 tokens
# costs about what three or four decode steps of a full batch do on 2 CPU cores: newcomers get
# in within a few steps, and rows already decoding slow down by a bounded factor meanwhile.
PREFILL_TOKENS_PER_STEP = 512


def _bare(lane: Lane) -> bool:
    return not lane.routed and lane.active is None


class Decoder:
    """The rows decoding on one base, in batches by lane, and the prompts being read."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, device: Any, eos: set[int]) -> None:
        self._tokenizer, self._device, self._eos = tokenizer, device, eos
        self._pad = pad_id(tokenizer)
        self._batches: dict[Hashable, Batch] = {}
        self._prefills: list[Prefill] = []
        # Sampling generators of the rows that sample, by id(row).
        self._generators: dict[int, Any] = {}
        # The last step's decoding rows and the tokens they gained (metrics.py counts them).
        self.stepped_rows = 0
        self.stepped_tokens = 0

    @property
    def batches(self) -> list[Batch]:
        """The running batches, one per lane."""
        return list(self._batches.values())

    @property
    def rows(self) -> list[Row]:
        """Every row not finished yet: decoding, or having its prompt read."""
        decoding = [row for batch in self._batches.values() for row in batch.rows]
        return decoding + [row for prefill in self._prefills for row in prefill.rows]

    def admit(self, lane: Lane, rows: list[Row]) -> None:
        """Starts reading the prompts of new rows of one lane; they decode from the next step
        on. Bare rows ride in a running routed lane when there is one (one pass fewer)."""
        if not rows:
            return
        if _bare(lane):
            lane = next((known for known in self._lanes() if known.routed), lane)
        for group in length_groups(rows):
            self._prefills.append(Prefill(lane, group, self._pad, self._device))

    def _lanes(self) -> list[Lane]:
        return [b.lane for b in self._batches.values()] + [p.lane for p in self._prefills]

    def step(self) -> list[Row]:
        """One step of every row; returns the rows that finished in it."""
        self._read_prompts()
        finished: list[Row] = []
        stepped = [row for batch in self._batches.values() for row in batch.rows]
        for row in stepped:
            row.peak = max(row.peak, len(stepped))
        tokens_before = sum(len(row.generated) for row in stepped)
        for key, batch in list(self._batches.items()):
            going = batch.choose(self._tokenizer, self._eos, self._generators)
            finished += [row for row in batch.rows if row.done]
            batch.drop_finished()
            if batch.rows:
                batch.step(going)
            else:
                del self._batches[key]
        for row in finished:
            self._generators.pop(id(row), None)
        self.stepped_rows = len(stepped)
        # A cancelled or failed row leaves without a token, so this is not simply the rows.
        self.stepped_tokens = sum(len(row.generated) for row in stepped) - tokens_before
        return finished

    def _read_prompts(self) -> None:
        """Reads prompts: whole while nothing decodes, else at most PREFILL_TOKENS_PER_STEP
        tokens between all prefills (at least one column of the first, so each gets on)."""
        budget = PREFILL_TOKENS_PER_STEP if self._batches else None
        for prefill in list(self._prefills):
            while not prefill.done and (budget is None or budget > 0):
                if budget is None:
                    prefill.advance(prefill.width)
                else:
                    budget -= prefill.advance(max(1, budget // prefill.reading_rows))
            if not prefill.done:
                break
            self._prefills.remove(prefill)
            self._join(prefill.decoding())

    def _join(self, batch: Batch) -> None:
        if batch.lane.routed:
            # Bare rows decoding on the bare base move into the routed lane (peft's __base__
            # rows): the same weights, so their cache carries over, and one pass fewer a step.
            for key, bare in list(self._batches.items()):
                if _bare(bare.lane):
                    del self._batches[key]
                    batch.merge(bare)
        running = self._batches.get(batch.lane.key)
        if running is None:
            self._batches[batch.lane.key] = batch
        else:
            running.merge(batch)


def decode_batch(
    lane: Lane, tokenizer: PreTrainedTokenizerBase, rows: list[Row], device: Any
) -> None:
    """Runs rows of one lane, all starting together, to their ends (eos, stop sequence, token
    budget or cancellation)."""
    decoder = Decoder(tokenizer, device, eos_ids(lane.model, tokenizer))
    decoder.admit(lane, rows)
    with torch.inference_mode():
        while decoder.rows:
            decoder.step()
