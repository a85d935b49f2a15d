"""Decoding a batch of rows together, one token step at a time, on one resident base.

All rows of a batch are in one lane (lanes.py): one module serves them all, routing each to its
adapter where peft can. Each row has its own prompt, adapter, sampling settings, stop sequences,
token budget and cancel flag, so batching never changes an answer: greedy rows give exactly what
they give alone. Rows that finish leave the batch (their slice of the KV cache is dropped) so the
others run on without them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from golem_sidecar.detokenize import Detokenizer
from golem_sidecar.errors import GolemError, invalid_argument
from golem_sidecar.lanes import Lane
from golem_sidecar.sampling import (
    NonFiniteScores,
    SamplingParams,
    choose_next,
    greedy_picks,
    make_generator,
)

FINISH_LENGTH = "length"
FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_CANCELLED = "cancelled"
# The row failed alone (its scores became non-finite); ``Row.error`` says why.
FINISH_ERROR = "error"


@dataclass(eq=False)
class Row:
    """One request in a batch; the decoder fills in the fields below the line."""

    prompt_ids: list[int]
    # The peft adapter name, or None for the bare base.
    adapter: str | None
    max_new_tokens: int
    cancelled: threading.Event
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    # Streaming: called from the model thread with each new piece of the answer.
    on_text: Callable[[str], None] | None = None
    # ---- filled in by decode_batch
    generated: list[int] = field(default_factory=list)
    answer: str = ""
    finish_reason: str = ""
    error: GolemError | None = None
    _emitted: int = 0
    _text: Detokenizer | None = None

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)


def eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids that end an answer: the model's generation config, else the tokenizer's eos."""
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return {int(i) for i in configured} if isinstance(configured, list) else {int(configured)}


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Padding is masked out, so any id will do when the tokenizer names none."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def row_failed(params: SamplingParams, exc: NonFiniteScores) -> GolemError:
    """The error of a row whose scores became NaN or infinite."""
    if exc.stage == "sampling":
        field = "repetition_penalty" if params.repetition_penalty != 1.0 else "temperature"
        return invalid_argument(
            field,
            f"temperature {params.temperature:g} with repetition_penalty "
            f"{params.repetition_penalty:g} made this request's token scores non-finite; use "
            "values nearer 1",
            reason="SAMPLING_DEGENERATE",
        )
    return GolemError(
        grpc.StatusCode.INTERNAL,
        "MODEL_OUTPUT_NON_FINITE",
        "the model produced non-finite scores for this prompt (NaN or infinity in its logits)",
    )


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters a stream must not show yet: a half-decoded character, or
    the start of a stop sequence that may still complete (it would then be cut from the answer)."""
    if text.endswith("\ufffd"):
        return 1
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _advance(row: Row, token: int, tokenizer: PreTrainedTokenizerBase, eos: set[int]) -> None:
    """Adds one token to a row and decides whether the row is finished. Only the new token's
    text is decoded, and stop sequences are looked for only where the new text could complete
    one; a finished row's answer is the whole answer decoded once, as plain decode gives it."""
    if row._text is None:
        row._text = Detokenizer(tokenizer, row.generated)
    checked = len(row._text.text)
    row._text.push(token)
    row.answer = row._text.text
    if _stop_in(row.answer, row.stop, checked):
        full = row._text.final()
        cut = min((full.find(s) for s in row.stop if s in full), default=len(full))
        row.answer, row.finish_reason = full[:cut], FINISH_STOP
    elif token in eos or len(row.generated) >= row.max_new_tokens:
        row.answer = row._text.final()
        row.finish_reason = FINISH_EOS if token in eos else FINISH_LENGTH
    _stream(row)


def _stop_in(text: str, stops: tuple[str, ...], checked: int) -> bool:
    """Whether a stop sequence ends in the text past ``checked`` (the text before it held
    none)."""
    return any(text.find(s, max(0, checked - len(s) + 1)) >= 0 for s in stops)


def _stream(row: Row) -> None:
    if row.on_text is None:
        return
    visible = len(row.answer) if row.done else len(row.answer) - _held_back(row.answer, row.stop)
    if visible > row._emitted:
        row.on_text(row.answer[row._emitted : visible])
        row._emitted = visible


def _left_pad(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
        mask[i, width - len(row.prompt_ids) :] = 1
    return ids, mask


class _Batch:
    """The tensors of the rows still decoding: shrinks as rows finish."""

    def __init__(self, lane: Lane, rows: list[Row], pad_id: int, device: Any):
        self.lane, self.rows = lane, rows
        ids, mask = _left_pad(rows, pad_id)
        self.mask = mask.to(device)
        # Positions count real tokens only, so a padded row sees the positions it would alone.
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        self.logits = self._forward(ids.to(device), self.positions)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.lane(
            [r.adapter for r in self.rows],
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows = []
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.logits = self.logits[index]

    def step(self, tokens: list[int]) -> None:
        device = self.mask.device
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = self.positions[:, -1:] + 1
        ids = torch.tensor(tokens, device=device).unsqueeze(1)
        self.logits = self._forward(ids, self.positions)


def decode_batch(
    lane: Lane, tokenizer: PreTrainedTokenizerBase, rows: list[Row], device: Any
) -> None:
    """Runs every row of one lane to its end (eos, stop sequence, token budget or
    cancellation)."""
    eos = eos_ids(lane.model, tokenizer)
    generators = {id(r): make_generator(r.params) for r in rows}
    with torch.inference_mode():
        batch = _Batch(lane, rows, pad_id(tokenizer), device)
        while batch.rows:
            # Plain greedy rows take their argmax in one operation over the whole batch.
            picks, finite = greedy_picks(batch.logits)
            tokens = []
            for i, row in enumerate(batch.rows):
                if row.cancelled.is_set():
                    row.finish_reason = FINISH_CANCELLED
                    tokens.append(0)
                    continue
                try:
                    if row.params.plain_greedy:
                        if not finite[i]:
                            raise NonFiniteScores("model")
                        token = picks[i]
                    else:
                        seen = row.prompt_ids + row.generated
                        token = choose_next(batch.logits[i], row.params, generators[id(row)], seen)
                except NonFiniteScores as exc:
                    # This row alone leaves the batch with its own error; the others go on.
                    row.finish_reason, row.error = FINISH_ERROR, row_failed(row.params, exc)
                    tokens.append(0)
                    continue
                _advance(row, token, tokenizer, eos)
                tokens.append(token)
            active = [t for t, r in zip(tokens, batch.rows, strict=True) if not r.done]
            batch.drop_finished()
            if batch.rows:
                batch.step(active)
