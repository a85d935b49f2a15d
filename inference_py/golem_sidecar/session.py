"""A decode session: the requests of one base decoding on the model thread, admitted from the
base's queue between steps while there is room (continuous batching, scheduler.py), each
answered the step its row finishes. The session ends when no row is left."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.batching import BatchLimits, Pending, Take
from golem_sidecar.decoding import FINISH_CANCELLED, FINISH_ERROR, FINISH_STOP, Row, eos_ids
from golem_sidecar.errors import GolemError, caller_gone, invalid_argument
from golem_sidecar.exam import ExamSpec
from golem_sidecar.grading import Grade, grade
from golem_sidecar.lanes import group_by_lane
from golem_sidecar.metrics import Arrival, SidecarMetrics
from golem_sidecar.models import ResidentBase, ResidentModels, peft_name
from golem_sidecar.passes import fits
from golem_sidecar.scheduler import Decoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """What decoding produced for one request."""

    answer: str
    full_text: str
    prompt_tokens: int
    answer_tokens: int
    finish_reason: str
    generate_ns: int


@dataclass(frozen=True)
class ExamResult:
    spec: ExamSpec
    device: str
    dtype: str
    generation: Generation
    grade: Grade | None
    load_ns: int
    queue_ns: int
    batch_size: int
    # The adapter really worn; None for the bare base.
    adapter: AdapterFolder | None = None


@dataclass(eq=False)
class _Prepared:
    """A pending request with its base and adapter ready and its prompt encoded."""

    pending: Pending
    row: Row
    load_ns: int
    queue_ns: int
    adapter: AdapterFolder | None
    # The adapter's name in the base's registry (None: the bare base).
    adapter_name: str | None
    admitted_at: int = 0


Settle = Callable[[Pending, "ExamResult | BaseException"], None]


class Session:
    """Runs on the model thread: admits, steps, answers, until no row is left."""

    def __init__(
        self,
        models: ResidentModels,
        limits: BatchLimits,
        max_tokens: int,
        take: Take,
        settle: Settle,
        metrics: SidecarMetrics,
    ) -> None:
        self._models, self._limits, self._max_tokens = models, limits, max_tokens
        self._take, self._settle, self._metrics = take, settle, metrics
        # Prepared but not admitted yet (no room), and admitted, by id(row).
        self._ready: deque[_Prepared] = deque()
        self._live: dict[int, _Prepared] = {}
        # Admitted rows of timed calls (metrics.TIMED_TO_FIRST_TOKEN) with no token yet.
        self._untimed: list[tuple[Row, Arrival]] = []
        self._decoder: Decoder | None = None

    @property
    def running(self) -> int:
        """Rows admitted and not answered (read by a metrics scrape, off the model thread)."""
        return len(self._live)

    def cache_tokens(self) -> int:
        """KV-cache columns the decoding rows hold, padding included: rows x width of each
        running batch. Read off the model thread: a batch's rows and mask may be a step apart,
        which makes the reading a row off at worst."""
        decoder = self._decoder
        if decoder is None:
            return 0
        return sum(len(batch.rows) * int(batch.mask.shape[1]) for batch in decoder.batches)

    def run(self, first: list[Pending]) -> None:
        spec = first[0].spec
        try:
            base, base_ns = self._models.base(spec.model, spec.placement)
        except GolemError as err:
            for pending in first:
                self._settle(pending, err)
            return
        decoder = Decoder(base.tokenizer, base.input_device, eos_ids(base.model, base.tokenizer))
        self._decoder = decoder
        self._prepare(base, first, base_ns)
        with torch.inference_mode():
            while True:
                self._admit(base, decoder)
                if not decoder.rows:
                    return
                finished = decoder.step()
                self._metrics.decode_step(decoder.stepped_rows, decoder.stepped_tokens)
                self._time_first_tokens()
                for row in finished:
                    item = self._live.pop(id(row))
                    decode_ns = time.perf_counter_ns() - item.admitted_at
                    self._settle(item.pending, _result(base, item, decode_ns))

    def _time_first_tokens(self) -> None:
        """Times the rows that got their first token in this step."""
        if not self._untimed:
            return
        now, still = time.perf_counter_ns(), []
        for row, arrival in self._untimed:
            if row.generated:
                self._metrics.first_token(arrival, now)
            elif not row.done:
                still.append((row, arrival))
        self._untimed = still

    def _prepare(self, base: ResidentBase, batch: list[Pending], base_ns: int = 0) -> None:
        """Attaches each request's adapter and encodes its prompt; a request that fails here
        fails alone. The adapters of the session's rows are pinned: attaching one never evicts
        another that a row still wears."""
        held = [*self._ready, *self._live.values()]
        pinned = {item.adapter_name for item in held if item.adapter_name}
        for pending in batch:
            try:
                name, adapter_ns = self._adapter_for(base, pending.spec, pinned)
                row = _row(base, pending, name)
            except GolemError as err:
                self._settle(pending, err)
                continue
            queue_ns = time.perf_counter_ns() - pending.queued_at
            load_ns = pending.load_ns + base_ns + adapter_ns
            folder = base.adapters[name] if name else None
            self._ready.append(_Prepared(pending, row, load_ns, queue_ns, folder, name))

    def _adapter_for(
        self, base: ResidentBase, spec: ExamSpec, pinned: set[str]
    ) -> tuple[str | None, int]:
        """The adapter a request wears (None: the bare base), attached if need be, and pinned."""
        if spec.adapter_name is not None:
            name, load_ns = self._models.named(base, spec.adapter_name), 0
        elif spec.adapter is not None:
            name, load_ns = self._models.adapter(base, spec.adapter, pinned=pinned)
        else:
            return None, 0
        pinned.add(name)
        return name, load_ns

    def _admit(self, base: ResidentBase, decoder: Decoder) -> None:
        """Takes newcomers from the queue while there is room, then moves as many ready
        requests into the decoder as the batch limits allow, first come first."""
        room = self._limits.max_batch_size - len(self._live) - len(self._ready)
        if room > 0:
            self._prepare(base, self._take(room))
        widths = [item.row.width for item in self._live.values()]
        admitted: list[_Prepared] = []
        while self._ready:
            widths.append(self._ready[0].row.width)
            # A request too large for the limits alone still runs, alone.
            if len(widths) > 1 and not fits(widths, self._limits.max_batch_size, self._max_tokens):
                break
            admitted.append(self._ready.popleft())
        now = time.perf_counter_ns()
        for item in admitted:
            item.admitted_at = now
            self._live[id(item.row)] = item
        self._untimed += [
            (item.row, item.pending.arrival) for item in admitted if item.pending.arrival
        ]
        for lane, items in group_by_lane(admitted, _adapter, base.lane):
            decoder.admit(lane, [item.row for item in items])


def _row(base: ResidentBase, pending: Pending, adapter: str | None) -> Row:
    spec = pending.spec
    prompt_ids = list(base.tokenizer(spec.prompt)["input_ids"])
    check_context(base, len(prompt_ids), spec.max_new_tokens)
    return Row(
        prompt_ids=prompt_ids,
        adapter=peft_name(adapter) if adapter else None,
        max_new_tokens=spec.max_new_tokens,
        cancelled=pending.cancelled,
        params=spec.sampling,
        stop=spec.stop,
        on_text=pending.on_text,
    )


def _result(base: ResidentBase, item: _Prepared, decode_ns: int) -> ExamResult | BaseException:
    row, spec = item.row, item.pending.spec
    if row.finish_reason == FINISH_CANCELLED:
        # Nobody reads the answer; the log shows how early the generation stopped.
        log.info(
            "exam cancelled while decoding",
            extra={"answer_tokens": len(row.generated), "max_new_tokens": spec.max_new_tokens},
        )
        return caller_gone()
    if row.finish_reason == FINISH_ERROR and row.error is not None:
        return row.error
    return exam_result(base, spec, row, decode_ns, (item.load_ns, item.queue_ns), item.adapter)


def exam_result(
    base: ResidentBase,
    spec: ExamSpec,
    row: Row,
    decode_ns: int,
    waits: tuple[int, int],
    adapter: AdapterFolder | None,
) -> ExamResult:
    """A finished row as TakeExam's result, graded when the exam gives an expected answer; both
    engines answer through it. ``waits`` is (load_ns, queue_ns)."""
    decode = base.tokenizer.decode
    if row.finish_reason == FINISH_STOP:
        full_text = str(decode(row.prompt_ids, skip_special_tokens=True)) + row.answer
    else:
        full_text = str(decode(row.prompt_ids + row.generated, skip_special_tokens=True))
    generation = Generation(
        answer=row.answer,
        full_text=full_text,
        prompt_tokens=len(row.prompt_ids),
        answer_tokens=len(row.generated),
        finish_reason=row.finish_reason,
        generate_ns=decode_ns,
    )
    graded = grade(row.answer, spec.expected_answer) if spec.expected_answer else None
    return ExamResult(
        spec=spec,
        device=str(base.input_device),
        dtype=base.weight_dtype,
        generation=generation,
        grade=graded,
        load_ns=waits[0],
        queue_ns=waits[1],
        batch_size=row.peak,
        adapter=adapter,
    )


def _adapter(item: _Prepared) -> str | None:
    return item.row.adapter


def check_context(base: ResidentBase, prompt_tokens: int, max_new_tokens: int) -> None:
    """A prompt that cannot fit the model's context is refused before generating."""
    limit = base.context_limit
    if limit is None:
        return
    if prompt_tokens >= limit:
        raise invalid_argument(
            "prompt",
            f"is {prompt_tokens} tokens, the model's context is {limit}",
            reason="PROMPT_TOO_LONG",
        )
    if prompt_tokens + max_new_tokens > limit:
        raise invalid_argument(
            "max_new_tokens",
            f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the model's "
            f"context of {limit}",
            reason="PROMPT_TOO_LONG",
        )
