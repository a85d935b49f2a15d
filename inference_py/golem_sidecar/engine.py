"""The model worker: requests are batched per base model (batching.py), and every load and
decode runs on one dedicated thread, so the asyncio loop stays free (health checks answer during
a generation) and the resident models need no locks."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.batching import BatchLimits, BatchQueue, Pending
from golem_sidecar.comparison import ComparedAnswer, CompareSpec, run_comparison
from golem_sidecar.config import Security, SidecarConfig
from golem_sidecar.decoding import FINISH_CANCELLED, FINISH_ERROR, FINISH_STOP, Row, decode_batch
from golem_sidecar.errors import GolemError, caller_gone, invalid_argument
from golem_sidecar.exam import ExamSpec
from golem_sidecar.gate import ModelRef, resolve_adapter, resolve_model
from golem_sidecar.grading import Grade, grade
from golem_sidecar.lanes import group_by_lane
from golem_sidecar.models import BaseKey, ResidentBase, ResidentModels, peft_name
from golem_sidecar.passes import split_passes
from golem_sidecar.placement import Placement, default_placement
from golem_sidecar.registry import LoadSpec, UnloadSpec

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


class ExamEngine:
    """Runs exams on the resident models: batched per base, decoded on the model thread."""

    def __init__(self, config: SidecarConfig) -> None:
        self._config = config
        self._limits = BatchLimits(
            max_batch_size=config.limits.max_batch_size,
            batch_wait_s=config.limits.batch_wait_ms / 1000,
            max_queue=config.limits.max_queue,
        )
        limits = config.limits
        self._models = ResidentModels(config.security, limits.max_adapters, limits.max_models)
        self._max_tokens = limits.max_batch_tokens
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="golem-model")
        self._queues: dict[BaseKey, BatchQueue] = {}
        # Held by the worker while it runs a job; shutdown asks whether the worker is free.
        self._running = threading.Lock()

    async def _on_worker(self, fn: Any, *args: Any) -> Any:
        # Carry the caller's context (its request id) into the worker thread's log lines.
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._run, call)

    def _run(self, call: Any) -> Any:
        with self._running:
            return call()

    def is_resident(self, model_key: str) -> bool:
        """Whether a base with this key is in memory (the gate asks, from its own threads)."""
        return self._models.has_model(model_key)

    async def _queue_for(self, model: ModelRef, placement: Placement) -> tuple[BatchQueue, int]:
        """The batch queue of this base, and the nanoseconds spent loading the base for it.
        Per-base state exists only once the base has loaded: a name that cannot be loaded
        leaves nothing behind."""
        key = BaseKey(model.key, placement)
        queue, load_ns = self._queues.get(key), 0
        if queue is None:
            _, load_ns = await self._on_worker(self._models.base, model, placement)
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = BatchQueue(self._limits, self._run_batch)
        self._prune_queues(keep=key)
        return queue, load_ns

    def _prune_queues(self, keep: BaseKey | None = None) -> None:
        """Drops the idle queues of bases that were evicted (limits.maxModels), never ``keep``:
        the queue a caller is about to submit to, whose base another load may have evicted while
        this one waited (a stopped queue would hold that caller's request forever)."""
        for key, queue in list(self._queues.items()):
            if key != keep and queue.idle and not self._models.has(key):
                queue.stop()
                del self._queues[key]

    async def take_exam(
        self,
        spec: ExamSpec,
        cancelled: threading.Event,
        on_text: Callable[[str], None] | None = None,
    ) -> ExamResult:
        """Answers one exam in the next batch of its base. If the calling task is cancelled, its
        row leaves the batch at the next token and the other rows carry on."""
        queue, load_ns = await self._queue_for(spec.model, spec.placement)
        loop = asyncio.get_running_loop()
        streamed = None if on_text is None else _threadsafe(loop, on_text)
        pending = Pending(spec, cancelled, loop.create_future(), streamed, load_ns=load_ns)
        queue.submit(pending)
        try:
            result: ExamResult = await pending.future
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return result

    async def _run_batch(self, batch: list[Pending]) -> None:
        outcomes = await self._on_worker(self._run_batch_sync, batch)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    def _run_batch_sync(self, batch: list[Pending]) -> list[ExamResult | BaseException]:
        started = time.perf_counter_ns()
        outcomes: dict[int, ExamResult | BaseException] = {}
        spec = batch[0].spec
        try:
            base, base_ns = self._models.base(spec.model, spec.placement)
            prepared = self._prepare(base, batch, started, base_ns, outcomes)
        except GolemError as err:
            return [err for _ in batch]
        limits = (self._limits.max_batch_size, self._max_tokens)
        for lane, items in group_by_lane(prepared, _adapter, base.lane):
            for group in split_passes(items, _width, *limits):
                rows = [p.row for p in group]
                decode_started = time.perf_counter_ns()
                decode_batch(lane, base.tokenizer, rows, base.input_device)
                decode_ns = time.perf_counter_ns() - decode_started
                for item in group:
                    outcomes[id(item.pending)] = self._result(base, item, decode_ns, len(rows))
        return [outcomes[id(p)] for p in batch]

    def _prepare(
        self,
        base: ResidentBase,
        batch: list[Pending],
        started: int,
        base_ns: int,
        outcomes: dict[int, ExamResult | BaseException],
    ) -> list[_Prepared]:
        """Attaches each request's adapter and encodes its prompt; a request that fails here
        fails alone, the rest of the batch goes on."""
        prepared = []
        pinned: set[str] = set()
        for pending in batch:
            try:
                adapter_name, adapter_ns = self._adapter_for(base, pending.spec, pinned)
                row = self._row(base, pending, adapter_name)
                folder = base.adapters[adapter_name] if adapter_name else None
            except GolemError as err:
                outcomes[id(pending)] = err
                continue
            queue_ns = started - pending.queued_at
            load_ns = pending.load_ns + base_ns + adapter_ns
            prepared.append(_Prepared(pending, row, load_ns, queue_ns, folder))
        return prepared

    def _adapter_for(
        self, base: ResidentBase, spec: ExamSpec, pinned: set[str]
    ) -> tuple[str | None, int]:
        """The adapter a request wears (None: the bare base), attached if need be. Adapters of
        the batch being prepared are pinned: attaching one never evicts another."""
        if spec.adapter_name is not None:
            name, load_ns = self._models.named(base, spec.adapter_name), 0
        elif spec.adapter is not None:
            name, load_ns = self._models.adapter(base, spec.adapter, pinned=pinned)
        else:
            return None, 0
        pinned.add(name)
        return name, load_ns

    def _row(self, base: ResidentBase, pending: Pending, adapter: str | None) -> Row:
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

    def _result(
        self, base: ResidentBase, item: _Prepared, decode_ns: int, batch_size: int
    ) -> ExamResult | BaseException:
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
            load_ns=item.load_ns,
            queue_ns=item.queue_ns,
            batch_size=batch_size,
            adapter=item.adapter,
        )

    async def load_adapter(self, spec: LoadSpec) -> tuple[ResidentBase, str, int]:
        """Attaches an adapter under a name (on the model thread, between batches)."""

        def load() -> tuple[ResidentBase, str, int]:
            base, base_ns = self._models.base(spec.model, spec.placement)
            attached, load_ns = self._models.adapter(base, spec.folder, name=spec.name)
            return base, attached, base_ns + load_ns

        result: tuple[ResidentBase, str, int] = await self._on_worker(load)
        self._prune_queues()
        return result

    async def unload_adapter(self, spec: UnloadSpec) -> None:
        """Detaches a named adapter once the batch running now (if any) has finished."""
        key = BaseKey(spec.model.key, spec.placement)

        def unload() -> None:
            base = self._models.find(key)
            if base is None:
                raise self._models.not_loaded(spec.name, spec.model.name, "name")
            self._models.unload(base, spec.name)

        await self._on_worker(unload)

    async def list_adapters(self) -> list[tuple[ResidentBase, str, AdapterFolder, int]]:
        def listing() -> list[tuple[ResidentBase, str, AdapterFolder, int]]:
            return [
                (base, name, folder, base.uses[name])
                for base in self._models.resident()
                for name, folder in base.adapters.items()
            ]

        result: list[tuple[ResidentBase, str, AdapterFolder, int]] = await self._on_worker(listing)
        return result

    async def list_models(self) -> list[tuple[ResidentBase, int]]:
        """Each resident base with its memory footprint now (read on the model thread, where
        the fused 4-bit CPU kernel repacks weights)."""

        def listing() -> list[tuple[ResidentBase, int]]:
            return [(base, base.footprint_bytes()) for base in self._models.resident()]

        result: list[tuple[ResidentBase, int]] = await self._on_worker(listing)
        return result

    async def compare(
        self, spec: CompareSpec, cancelled: threading.Event
    ) -> list[list[ComparedAnswer]]:
        """Base and adapters on the same prompts, batched on the model thread. Its rows hold
        places in the base's bounded queue while it runs, as the same number of exams would."""

        def comparing() -> list[list[ComparedAnswer]]:
            base, _ = self._models.base(spec.model, spec.placement)
            return run_comparison(
                self._models,
                base,
                spec,
                cancelled,
                self._limits.max_batch_size,
                self._max_tokens,
                check_context,
            )

        queue, _ = await self._queue_for(spec.model, spec.placement)
        try:
            with queue.reserve(spec.rows):
                result: list[list[ComparedAnswer]] = await self._on_worker(comparing)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return result

    async def preload(self) -> None:
        """Loads the default base, and the default adapter when its folder exists, so the first
        call is as fast as any other. A missing base raises; a missing adapter only warns,
        since callers may name their own."""
        await self._on_worker(self._preload_sync)

    def _preload_sync(self) -> None:
        defaults, security = self._config.defaults, self._config.security
        # Requests that leave model_name out go through the gate; so does the model they get.
        model = resolve_model("model_name", defaults.model_name, security, self.is_resident)
        base, _ = self._models.base(model, default_placement(defaults))
        adapter = _default_adapter(defaults.adapter_path, security)
        if adapter is not None:
            self._models.adapter(base, adapter)

    async def close(self) -> None:
        """Stops batching and drops queued jobs. Calls cut short by shutdown have already set
        their rows' cancel flags, so a running batch lets them go at the next token."""
        for queue in self._queues.values():
            await queue.close()
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._queues.clear()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Whether the worker became free within ``timeout_s``; a model load cannot be
        interrupted, so shutdown may have to leave without it."""
        acquired = await asyncio.to_thread(self._running.acquire, True, timeout_s)
        if acquired:
            self._running.release()
        return bool(acquired)


def _threadsafe(
    loop: asyncio.AbstractEventLoop, fn: Callable[[str], None]
) -> Callable[[str], None]:
    """Streaming callbacks fire on the model thread; the caller's queue lives on the loop."""

    def on_model_thread(text: str) -> None:
        loop.call_soon_threadsafe(fn, text)

    return on_model_thread


def _default_adapter(path: str, security: Security) -> AdapterFolder | None:
    try:
        return resolve_adapter("adapter_path", path, security)
    except GolemError as err:
        if err.reason not in ("ADAPTER_NOT_FOUND", "PATH_OUTSIDE_ROOTS"):
            raise
        log.warning(
            "default adapter not usable; requests must name one",
            extra={"adapter": path, "reason": err.reason},
        )
        return None


def _adapter(item: _Prepared) -> str | None:
    return item.row.adapter


def _width(item: _Prepared) -> int:
    return len(item.row.prompt_ids) + item.row.max_new_tokens


def check_context(base: ResidentBase, prompt_tokens: int, max_new_tokens: int) -> None:
    """A prompt that cannot fit the model's context is refused before generating."""
    limit = getattr(base.model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
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
