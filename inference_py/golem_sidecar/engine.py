"""The model worker: every load and generate runs on one dedicated thread, so the asyncio loop
stays free (health checks answer during a generation) and the resident models need no locks."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from golem_sidecar.adapters import AdapterFolder, check_adapter_folder
from golem_sidecar.config import Security, SidecarConfig
from golem_sidecar.errors import GolemError, caller_gone, invalid_argument
from golem_sidecar.exam import ExamSpec
from golem_sidecar.generation import Generation, encode_prompt, generate
from golem_sidecar.grading import Grade, grade
from golem_sidecar.models import ResidentBase, ResidentModels
from golem_sidecar.paths import confine_model_name
from golem_sidecar.placement import QuantizationRequest, resolve_placement

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ExamResult:
    spec: ExamSpec
    device: str
    dtype: str
    generation: Generation
    grade: Grade | None
    load_ns: int
    queue_ns: int


class ExamEngine:
    """Runs exams on the resident models, one at a time on the model thread."""

    def __init__(self, config: SidecarConfig) -> None:
        self._config = config
        self._models = ResidentModels(config.security)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="golem-model")
        # Held by the worker while it runs a job; shutdown asks whether the worker is free.
        self._running = threading.Lock()

    async def _on_worker(self, fn: Any, *args: Any) -> Any:
        # Carry the request's context (its request id) into the worker thread's log lines.
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._run, call)

    def _run(self, call: Any) -> Any:
        with self._running:
            return call()

    async def take_exam(self, spec: ExamSpec, cancelled: threading.Event) -> ExamResult:
        """Answers one exam; if the calling task is cancelled, the generation stops too."""
        queued_at = time.perf_counter_ns()
        try:
            result: ExamResult = await self._on_worker(
                self._take_exam_sync, spec, cancelled, queued_at
            )
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return result

    def _take_exam_sync(
        self, spec: ExamSpec, cancelled: threading.Event, queued_at: int
    ) -> ExamResult:
        queue_ns = time.perf_counter_ns() - queued_at
        if cancelled.is_set():
            raise caller_gone()
        base, load_ns = self._models.base(spec.model_name, spec.placement)
        adapter_name = None
        if spec.adapter is not None:
            adapter_name, adapter_ns = self._models.adapter(base, spec.adapter)
            load_ns += adapter_ns
        encoded = encode_prompt(base.tokenizer, spec.prompt, base.input_device)
        _check_context(base, int(encoded["input_ids"].shape[1]), spec.max_new_tokens)
        with base.wearing(adapter_name) as model:
            generation = generate(model, base.tokenizer, encoded, spec.max_new_tokens, cancelled)
        graded = grade(generation.answer, spec.expected_answer) if spec.expected_answer else None
        return ExamResult(
            spec=spec,
            device=str(base.input_device),
            dtype=base.weight_dtype,
            generation=generation,
            grade=graded,
            load_ns=load_ns,
            queue_ns=queue_ns,
        )

    async def preload(self) -> None:
        """Loads the default base, and the default adapter when its folder exists, so the first
        call is as fast as any other. A missing base raises; a missing adapter only warns,
        since callers may name their own."""
        await self._on_worker(self._preload_sync)

    def _preload_sync(self) -> None:
        defaults, security = self._config.defaults, self._config.security
        # Requests that leave model_name out are confined; so is the model they would get.
        confine_model_name(defaults.model_name, security.model_roots)
        placement = resolve_placement(defaults.device, QuantizationRequest(), defaults.quantization)
        base, _ = self._models.base(defaults.model_name, placement)
        adapter = _default_adapter(defaults.adapter_path, security)
        if adapter is not None:
            self._models.adapter(base, adapter)

    def close(self) -> None:
        """Drops queued jobs. Calls cut short by shutdown have already set their generations'
        cancel flags, so a running generation stops at its next token."""
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Whether the worker became free within ``timeout_s``; a model load cannot be
        interrupted, so shutdown may have to leave without it."""
        acquired = await asyncio.to_thread(self._running.acquire, True, timeout_s)
        if acquired:
            self._running.release()
        return bool(acquired)


def _default_adapter(path: str, security: Security) -> AdapterFolder | None:
    try:
        return check_adapter_folder(path, security.allow_pickle, security.adapter_roots)
    except GolemError as err:
        if err.reason not in ("ADAPTER_NOT_FOUND", "PATH_OUTSIDE_ROOTS"):
            raise
        log.warning(
            "default adapter not usable; requests must name one",
            extra={"adapter": path, "reason": err.reason},
        )
        return None


def _check_context(base: ResidentBase, prompt_tokens: int, max_new_tokens: int) -> None:
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
