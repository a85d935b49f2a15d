"""Rows and the tensors of rows decoding together, one token step at a time, on one resident
base (scheduler.py decides which rows run when).

All rows of a batch are in one lane (lanes.py): one module serves them all, routing each to its
adapter where peft can. Each row has its own prompt, adapter, sampling settings, stop sequences,
token budget and cancel flag, so batching never changes an answer: greedy rows give exactly what
they give alone. Rows that finish leave the batch (their slice of the KV cache is dropped) and
rows whose prompts have been read join it (their cache is left-padded to the batch's width), so
the batch runs on while requests come and go.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import grpc
import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

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
    # ---- filled in while decoding (scheduler.py)
    generated: list[int] = field(default_factory=list)
    answer: str = ""
    finish_reason: str = ""
    error: GolemError | None = None
    # The most rows in a decode step with this one, itself included.
    peak: int = 0
    _emitted: int = 0
    _text: Detokenizer | None = None

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)

    @property
    def width(self) -> int:
        """The most columns the row can hold: its prompt and its whole token budget (what the
        per-pass limits bound, passes.py)."""
        return len(self.prompt_ids) + self.max_new_tokens


def eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids that end an answer: the model's generation config, else the tokenizer's eos."""
    return end_ids(model.generation_config.eos_token_id, tokenizer)


def end_ids(configured: int | list[int] | None, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """eos_ids' rule on a configured ``eos_token_id`` (one id, a list, or None), for an engine
    that reads the generation config from disk instead of from a loaded model."""
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


def forward(
    lane: Lane,
    adapters: list[str | None],
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """The next-token logits of each row (wearing ``adapters``) after reading ``ids`` on top of
    ``cache``."""
    out = lane(
        adapters,
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits: torch.Tensor = out.logits[:, -1, :]
    return logits


class Batch:
    """The rows of one lane decoding together: shrinks as rows finish, grows as rows whose
    prompts have been read join (merge)."""

    def __init__(
        self,
        lane: Lane,
        rows: list[Row],
        mask: torch.Tensor,
        last: torch.Tensor,
        cache: DynamicCache,
        logits: torch.Tensor,
    ) -> None:
        self.lane, self.rows, self.cache = lane, rows, cache
        # The attention mask over the cache's columns, and each row's last position.
        self.mask, self.last = mask, last
        # The scores of each row's next token.
        self.logits = logits

    def merge(self, other: Batch) -> None:
        """Takes in another batch of the same lane: both caches are left-padded (masked
        columns) to the wider one, as if the rows had been padded together from the start."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            )
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        self.last = torch.cat([self.last, other.last])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows = self.rows + other.rows

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
        self.mask, self.last, self.logits = self.mask[index], self.last[index], self.logits[index]
        self._trim()

    def _trim(self) -> None:
        """Drops leading columns that no remaining row reads (padding for rows that left), so
        a batch that runs on as rows come and go does not grow without end."""
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first == 0:
            return
        for layer in _layers(self.cache):
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self.mask = self.mask[:, first:]

    def step(self, tokens: list[int]) -> None:
        """Feeds each row its chosen token and computes the scores of the next one."""
        device = self.mask.device
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.last = self.last + 1
        ids = torch.tensor(tokens, device=device).unsqueeze(1)
        adapters = [row.adapter for row in self.rows]
        self.logits = forward(self.lane, adapters, ids, self.mask, self.last, self.cache)

    def choose(
        self, tokenizer: PreTrainedTokenizerBase, eos: set[int], generators: dict[int, Any]
    ) -> list[int]:
        """Picks each row's next token and adds it to the row (which may finish it); returns
        the tokens of the rows still going, in order."""
        # Plain greedy rows take their argmax in one operation over the whole batch.
        picks, finite = greedy_picks(self.logits)
        going = []
        for i, row in enumerate(self.rows):
            if row.cancelled.is_set():
                row.finish_reason = FINISH_CANCELLED
                continue
            try:
                if row.params.plain_greedy:
                    if not finite[i]:
                        raise NonFiniteScores("model")
                    token = picks[i]
                else:
                    seen = row.prompt_ids + row.generated
                    generator = generators.setdefault(id(row), make_generator(row.params))
                    token = choose_next(self.logits[i], row.params, generator, seen)
            except NonFiniteScores as exc:
                # This row alone leaves the batch with its own error; the others go on.
                row.finish_reason, row.error = FINISH_ERROR, row_failed(row.params, exc)
                continue
            _advance(row, token, tokenizer, eos)
            if not row.done:
                going.append(token)
        return going


class _Layer(Protocol):
    keys: torch.Tensor
    values: torch.Tensor


def _layers(cache: DynamicCache) -> list[_Layer]:
    """The cache's layers. A DynamicCache made without a model config, as here, holds plain
    DynamicLayers: one key and one value tensor each, [rows, heads, columns, dim]."""
    layers = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None, "a plain KV cache"
        layers.append(cast(_Layer, layer))
    return layers


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before a mask's columns ([rows, columns]) or a cache's ([rows, heads, columns,
    dim]) up to ``width``; padded columns are masked out, so their values never count."""
    missing = width - (tensor.shape[1] if tensor.dim() == 2 else tensor.shape[-2])
    if missing == 0:
        return tensor
    pad = (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0)
    return torch.nn.functional.pad(tensor, pad)
