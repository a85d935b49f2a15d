"""The model worker: requests are batched per base model (batching.py), and every load and
decode runs on one dedicated thread, so the asyncio loop stays free (health checks answer during
a generation) and the resident models need no locks."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.batching import BatchLimits, BatchQueue, Pending, Take
from golem_sidecar.comparison import ComparedAnswer, CompareSpec, run_comparison
from golem_sidecar.config import Security, SidecarConfig
from golem_sidecar.decoding import pad_id
from golem_sidecar.errors import GolemError, invalid_argument
from golem_sidecar.exam import ExamSpec
from golem_sidecar.gate import ModelRef, resolve_adapter, resolve_model
from golem_sidecar.grade_spec import GradedModel
from golem_sidecar.loglikelihood import pair_item
from golem_sidecar.metrics import (
    ARRIVAL,
    EngineLoad,
    QueueDepth,
    ResidentAdapter,
    ResidentModel,
    SidecarMetrics,
    placement_label,
)
from golem_sidecar.models import (
    MADE_UP_PREFIX,
    BaseKey,
    ResidentBase,
    ResidentModels,
    peft_name,
)
from golem_sidecar.placement import Placement, default_placement
from golem_sidecar.registry import LoadSpec, UnloadSpec
from golem_sidecar.scoring import Loglikelihood, ScoreItem, loglikelihoods
from golem_sidecar.session import ExamResult, Session, check_context

# A (context, continuation) pair to score under one model of a GradeExam.
Pair = tuple[str, str, GradedModel]

log = logging.getLogger(__name__)


class ExamEngine:
    """Runs exams on the resident models: batched per base, decoded on the model thread."""

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics | None = None) -> None:
        self._config = config
        self._metrics = metrics or SidecarMetrics(config.limits)
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
        # Jobs submitted to the worker and not started: a decode session admits no newcomers
        # while there are any, so it ends and lets them run.
        self._jobs_waiting = 0
        self._counting = threading.Lock()
        # Decode sessions started and not ended, with the requests each holds unanswered.
        self._sessions: dict[Session, dict[Pending, None]] = {}

    async def _on_worker(self, fn: Any, *args: Any) -> Any:
        # Carry the caller's context (its request id) into the worker thread's log lines.
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        with self._counting:
            self._jobs_waiting += 1
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._run, call)

    def _run(self, call: Any) -> Any:
        with self._counting:
            self._jobs_waiting -= 1
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
                queue = self._queues[key] = BatchQueue(self._limits, self._run_session)
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
        pending = Pending(
            spec, cancelled, loop.create_future(), streamed, load_ns=load_ns, arrival=ARRIVAL.get()
        )
        adapter = spec.adapter_name or (spec.adapter.path if spec.adapter else None)
        if adapter is not None:
            self._metrics.adapter_request(adapter)
        queue.submit(pending)
        try:
            result: ExamResult = await pending.future
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return result

    async def _run_session(self, batch: list[Pending], take: Take) -> None:
        """Decodes ``batch``, and every request taken from the queue while it runs, on the model
        thread; each request is answered the step its row finishes."""
        loop = asyncio.get_running_loop()
        # The requests this session has taken and not yet answered, to fail them all if it
        # fails. Only the model thread touches it while the session runs; answered ones leave
        # at once, so a session that runs for hours under steady load does not grow with it.
        unanswered: dict[Pending, None] = dict.fromkeys(batch)

        def settle(pending: Pending, outcome: ExamResult | BaseException) -> None:
            unanswered.pop(pending, None)
            loop.call_soon_threadsafe(_settle, pending, outcome)

        def take_when_free(count: int) -> list[Pending]:
            # Other work waiting for the model thread (another base's session, an adapter load)
            # goes first: the session stops taking newcomers, finishes its rows and ends.
            taken = [] if self._jobs_waiting else take(count)
            unanswered.update(dict.fromkeys(taken))
            return taken

        session = Session(
            self._models, self._limits, self._max_tokens, take_when_free, settle, self._metrics
        )
        self._sessions[session] = unanswered
        try:
            await self._on_worker(session.run, batch)
        except Exception as exc:
            # Answers settled before the failure were queued on the loop before this resumed.
            for pending in unanswered:
                _settle(pending, exc)
            raise
        finally:
            del self._sessions[session]

    def load(self) -> EngineLoad:
        """What the engine holds now, for a metrics scrape. Read on the event loop while the
        model thread works, without its locks: only len() of its containers and list() copies of
        them, each one step under the GIL, so a scrape that races a decode step is a row off at
        worst (a copy that does see a container change size raises, and the scrape reads again).
        """
        queues = list(self._queues.items())
        sessions = list(self._sessions.items())
        running = [session.running for session, _ in sessions]
        held = [len(unanswered) for _, unanswered in sessions]
        bases = self._models.resident()
        return EngineLoad(
            waiting=sum(q.depth for _, q in queues) + max(0, sum(held) - sum(running)),
            running=sum(running),
            cache_tokens=sum(session.cache_tokens() for session, _ in sessions),
            queues=tuple(
                QueueDepth(key.model, placement_label(key.placement), q.depth) for key, q in queues
            ),
            models=tuple(
                ResidentModel(b.model_name, placement_label(b.placement), b.memory_bytes)
                for b in bases
            ),
            adapters=tuple(resident_adapters(bases)),
            waiting_adapters=tuple(self._awaited_adapters(queues)),
        )

    def _awaited_adapters(self, queues: list[tuple[BaseKey, BatchQueue]]) -> list[str]:
        """Adapters that queued requests name by path and their base does not hold yet (one
        named by LoadAdapter is resident, or its request fails)."""
        awaited = []
        for key, queue in queues:
            base = self._models.find(key)
            for pending in queue.queued():
                folder = pending.spec.adapter
                if folder is not None and (base is None or folder.identity not in base.by_identity):
                    awaited.append(folder.path)
        return awaited

    async def load_adapter(self, spec: LoadSpec) -> tuple[ResidentBase, str, int]:
        """Attaches an adapter under a name (on the model thread, between batches)."""

        result: tuple[ResidentBase, str, int] = await self._on_worker(
            self._models.load_named, spec.model, spec.placement, spec.folder, spec.name
        )
        self._prune_queues()
        return result

    async def unload_adapter(self, spec: UnloadSpec) -> None:
        """Detaches a named adapter once the batch running now (if any) has finished."""
        await self._on_worker(self._models.unload_named, spec.model, spec.placement, spec.name)

    async def list_adapters(self) -> list[tuple[ResidentBase, str, AdapterFolder, int]]:
        result: list[tuple[ResidentBase, str, AdapterFolder, int]] = await self._on_worker(
            self._models.listing
        )
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

    async def base_info(self, model: ModelRef, placement: Placement) -> tuple[str, str]:
        """The device and weight dtype of a base, loading it if it is not resident."""

        def info() -> tuple[str, str]:
            base, _ = self._models.base(model, placement)
            return str(base.input_device), base.weight_dtype

        result: tuple[str, str] = await self._on_worker(info)
        self._prune_queues()
        return result

    async def registered_folder(
        self, model: ModelRef, placement: Placement, name: str
    ) -> AdapterFolder:
        """The folder of an adapter registered under ``name`` (LoadAdapter); NOT_FOUND naming
        "adapters" when it is not, or its base is not resident. Loads nothing."""

        folder: AdapterFolder = await self._on_worker(
            self._models.registered, model, placement, name
        )
        return folder

    async def loglikelihoods(
        self,
        model: ModelRef,
        placement: Placement,
        pairs: list[Pair],
        cancelled: threading.Event,
    ) -> list[Loglikelihood]:
        """Each pair's continuation scored after its context under its model, by
        lm-evaluation-harness's definition (loglikelihood.py), in batched passes on the model
        thread, whatever mix of base and adapters the pairs hold."""

        def scoring() -> list[Loglikelihood]:
            base, _ = self._models.base(model, placement)
            items = pair_items(base, pairs, self._worn(base, [graded for _, _, graded in pairs]))
            limits = (self._limits.max_batch_size, self._max_tokens)
            return loglikelihoods(
                base.lane, items, pad_id(base.tokenizer), base.input_device, limits, cancelled
            )

        try:
            result: list[Loglikelihood] = await self._on_worker(scoring)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return result

    def _worn(self, base: ResidentBase, graded: list[GradedModel]) -> dict[GradedModel, str | None]:
        """The peft name each distinct graded model wears on ``base`` (None for the bare base),
        looked up once per model: each lookup counts as a use of the adapter (ListAdapters)."""
        pinned: set[str] = set()
        worn: dict[GradedModel, str | None] = {}
        for model in dict.fromkeys(graded):
            name = self._models.wear(base, model.folder, model.registered, pinned)
            if name is not None:
                pinned.add(name)
            worn[model] = None if name is None else peft_name(name)
        return worn

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
        adapter = default_adapter(defaults.adapter_path, security)
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


def pair_items(
    base: ResidentBase, pairs: list[Pair], worn: dict[GradedModel, str | None]
) -> list[ScoreItem]:
    """GradeExam's (context, continuation) pairs as items to score, each under the adapter its
    model wears (``worn``), refused as the request's answer field when a continuation has no
    tokens and as PROMPT_TOO_LONG when it does not fit the context, in either engine."""
    items = []
    for context, continuation, graded in pairs:
        try:
            item = pair_item(base.tokenizer, context, continuation, worn[graded])
        except ValueError as error:
            raise invalid_argument("answer", str(error)) from None
        check_context(base, item.width, 0)
        items.append(item)
    return items


def resident_adapters(bases: list[ResidentBase]) -> list[ResidentAdapter]:
    """Each base's adapters by the name callers use: LoadAdapter's name, else the path."""
    return [
        ResidentAdapter(
            base.model_name,
            placement_label(base.placement),
            folder.path if name.startswith(MADE_UP_PREFIX) else name,
            folder.identity[1],
        )
        for base in bases
        for name, folder in list(base.adapters.items())
    ]


def _settle(pending: Pending, outcome: ExamResult | BaseException) -> None:
    """Answers a request on the loop, unless it is answered or its caller gone already."""
    if pending.future.done():
        return
    if isinstance(outcome, BaseException):
        pending.future.set_exception(outcome)
    else:
        pending.future.set_result(outcome)


def _threadsafe(
    loop: asyncio.AbstractEventLoop, fn: Callable[[str], None]
) -> Callable[[str], None]:
    """Streaming callbacks fire on the model thread; the caller's queue lives on the loop."""

    def on_model_thread(text: str) -> None:
        loop.call_soon_threadsafe(fn, text)

    return on_model_thread


def default_adapter(path: str, security: Security) -> AdapterFolder | None:
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
