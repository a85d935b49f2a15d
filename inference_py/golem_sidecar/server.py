"""The grpc.aio server: ExamService, grpc.health.v1, reflection, and SidecarMetricsService for the
gateway."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.auth import BearerCheck
from golem_sidecar.comparison import ComparedAnswer, resolve_compare
from golem_sidecar.config import SidecarConfig, confined_beyond_loopback, is_loopback
from golem_sidecar.engines import Engines
from golem_sidecar.exam import resolve_exam
from golem_sidecar.gate import FileChecks
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc, metrics_pb2_grpc
from golem_sidecar.grade_spec import resolve_grade
from golem_sidecar.grader import grade_exam
from golem_sidecar.grading import CONTAINS, EXACT_MATCH
from golem_sidecar.interceptors import CallInterceptor
from golem_sidecar.messages import FINISH_REASONS, quantization_info
from golem_sidecar.metrics import MetricsServicer, SidecarMetrics
from golem_sidecar.models import ResidentBase
from golem_sidecar.registry import resolve_load, resolve_unload
from golem_sidecar.session import ExamResult
from golem_sidecar.shutdown import CallGate
from golem_sidecar.tracing import (
    record_adapter,
    record_compare,
    record_exam,
    record_generation,
    record_grade,
    server_interceptors,
)
from golem_sidecar.wire import EXAM_SERVICE_NAME as SERVICE_NAME

log = logging.getLogger(__name__)
T = TypeVar("T")
# After the last call has answered, how long the transport gets to deliver those answers.
_FLUSH_S = 1.0
_GRADE_RULES = {
    EXACT_MATCH: exam_pb2.GRADE_RULE_EXACT_MATCH,
    CONTAINS: exam_pb2.GRADE_RULE_CONTAINS,
}


class ExamServicer(exam_pb2_grpc.ExamServiceServicer):
    """ExamService's handlers: each resolves its request through the gate (on the file-check
    threads), then asks the engine. Request ids, the shutdown gate and error mapping are the
    interceptor's (interceptors.py); a handler refuses by raising GolemError."""

    def __init__(self, config: SidecarConfig, engine: Engines, files: FileChecks) -> None:
        self._config = config
        self._engine = engine
        self._files = files

    async def _resolve(self, resolve: Callable[..., T], request: Any) -> T:
        return await self._files.run(resolve, request, self._config, self._engine.is_resident)

    async def TakeExam(
        self, request: exam_pb2.TakeExamRequest, context: grpc.aio.ServicerContext
    ) -> exam_pb2.TakeExamResponse:
        return to_response(await self._answer(request, None))

    async def StreamExam(
        self, request: exam_pb2.TakeExamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[exam_pb2.ExamChunk]:
        pieces: asyncio.Queue[str] = asyncio.Queue()
        answering = asyncio.ensure_future(self._answer(request, pieces.put_nowait))
        getting: asyncio.Future[str] | None = None
        try:
            while not (answering.done() and pieces.empty()):
                getting = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getting, answering}, return_when=asyncio.FIRST_COMPLETED)
                if getting.done():
                    yield exam_pb2.ExamChunk(text=getting.result())
                getting.cancel()
        finally:
            # The caller went away mid-stream: its row leaves the batch at the next token, and
            # nothing of this call is left pending on the loop.
            answering.cancel()
            if getting is not None:
                getting.cancel()
        yield exam_pb2.ExamChunk(final=to_response(answering.result()))

    async def LoadAdapter(
        self, request: exam_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> exam_pb2.LoadAdapterResponse:
        spec = await self._resolve(resolve_load, request)
        record_adapter(spec.name, spec.model)
        base, attached, load_ns = await self._engine.load_adapter(spec)
        resident = _resident(base, attached, base.adapters[attached], base.uses[attached])
        log.info("adapter loaded", extra={"adapter": attached, "path": spec.folder.path})
        return exam_pb2.LoadAdapterResponse(adapter=resident, load_ns=load_ns)

    async def UnloadAdapter(
        self, request: exam_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> exam_pb2.UnloadAdapterResponse:
        spec = await self._resolve(resolve_unload, request)
        record_adapter(spec.name, spec.model)
        await self._engine.unload_adapter(spec)
        return exam_pb2.UnloadAdapterResponse()

    async def ListAdapters(
        self, request: exam_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> exam_pb2.ListAdaptersResponse:
        listing = await self._engine.list_adapters()
        models = await self._engine.list_models()
        return exam_pb2.ListAdaptersResponse(
            adapters=[_resident(*item) for item in listing],
            models=[_resident_model(*item) for item in models],
        )

    async def CompareAdapters(
        self, request: exam_pb2.CompareAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> exam_pb2.CompareAdaptersResponse:
        spec = await self._resolve(resolve_compare, request)
        table = await self._engine.compare(spec, threading.Event())
        record_compare(spec, [len(a.row.generated) for answers in table for a in answers])
        return _comparison_response(spec.prompts, table)

    async def GradeExam(
        self, request: exam_pb2.GradeExamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[exam_pb2.GradeExamResponse]:
        spec = await self._resolve(resolve_grade, request)
        record_grade(spec)
        log.info(
            "exam grading",
            extra={"exam": str(spec.exam_path), "models": [m.label for m in spec.models]},
        )
        cancelled = threading.Event()
        try:
            async for response in grade_exam(
                self._engine, self._files, self._config, spec, cancelled
            ):
                yield response
        finally:
            # The caller went away (or the call failed): rows still decoding leave their batch.
            cancelled.set()

    async def _answer(
        self, request: exam_pb2.TakeExamRequest, on_text: Callable[[str], None] | None
    ) -> ExamResult:
        spec = await self._resolve(resolve_exam, request)
        record_exam(spec)
        self._debug_text("exam received", prompt=spec.prompt)
        result = await self._engine.take_exam(spec, threading.Event(), on_text)
        record_generation(result.generation)
        self._log_result(result)
        return result

    def _debug_text(self, message: str, **texts: str) -> None:
        # Prompts and answers are the caller's data: debug level only, never in production.
        if not self._config.production:
            log.debug(message, extra=texts)

    def _log_result(self, result: ExamResult) -> None:
        gen = result.generation
        log.info(
            "exam answered",
            extra={
                "prompt_tokens": gen.prompt_tokens,
                "answer_tokens": gen.answer_tokens,
                "finish_reason": gen.finish_reason,
                "load_ms": result.load_ns // 10**6,
                "queue_ms": result.queue_ns // 10**6,
                "generate_ms": gen.generate_ns // 10**6,
                "batch_size": result.batch_size,
            },
        )
        self._debug_text("exam answer", answer=gen.answer)


def _adapter_info(folder: AdapterFolder) -> exam_pb2.AdapterInfo:
    return exam_pb2.AdapterInfo(
        path=folder.path,
        base_model_name_or_path=folder.base_model_name_or_path,
        peft_type=folder.peft_type,
    )


def _resident(
    base: ResidentBase, name: str, folder: AdapterFolder, uses: int
) -> exam_pb2.ResidentAdapter:
    return exam_pb2.ResidentAdapter(
        name=name, model_name=base.model_name, adapter=_adapter_info(folder), uses=uses
    )


def _resident_model(base: ResidentBase, footprint: int) -> exam_pb2.ResidentModel:
    return exam_pb2.ResidentModel(
        model_name=base.model_name,
        device=str(base.input_device),
        dtype=base.weight_dtype,
        quantization=quantization_info(base.placement),
        memory_footprint_bytes=footprint,
        adapters=list(base.adapters),
    )


def _comparison_response(
    prompts: tuple[str, ...], table: list[list[ComparedAnswer]]
) -> exam_pb2.CompareAdaptersResponse:
    response = exam_pb2.CompareAdaptersResponse()
    for prompt, answers in zip(prompts, table, strict=True):
        comparison = response.comparisons.add(prompt=prompt)
        for answer in answers:
            comparison.answers.add(
                model=answer.model,
                answer=answer.row.answer,
                answer_tokens=len(answer.row.generated),
                finish_reason=FINISH_REASONS[answer.row.finish_reason],
                mean_logprob=answer.mean_logprob,
            )
    return response


def to_response(result: ExamResult) -> exam_pb2.TakeExamResponse:
    spec, gen = result.spec, result.generation
    response = exam_pb2.TakeExamResponse(
        answer=gen.answer,
        full_text=gen.full_text,
        model=exam_pb2.ModelInfo(
            model_name=spec.model_name,
            device=result.device,
            dtype=result.dtype,
            quantization=quantization_info(spec.placement),
        ),
        prompt_tokens=gen.prompt_tokens,
        answer_tokens=gen.answer_tokens,
        finish_reason=FINISH_REASONS[gen.finish_reason],
        batch_size=result.batch_size,
        timings=exam_pb2.Timings(
            load_ns=result.load_ns, queue_ns=result.queue_ns, generate_ns=gen.generate_ns
        ),
    )
    if result.adapter is not None:
        response.adapter.CopyFrom(_adapter_info(result.adapter))
    if result.grade is not None:
        g = result.grade
        response.grade.CopyFrom(
            exam_pb2.Grade(
                score=g.score,
                rule=_GRADE_RULES.get(g.rule, exam_pb2.GRADE_RULE_TOKEN_F1),
                normalized_answer=g.normalized_answer,
                normalized_expected=g.normalized_expected,
            )
        )
    return response


class Sidecar:
    """A running sidecar: the server, its health and its engine. With a tracer provider (the
    process's, see tracing.py) every ExamService call gets a server span."""

    def __init__(
        self, config: SidecarConfig, tracer_provider: TracerProvider | None = None
    ) -> None:
        config = confined_beyond_loopback(config)
        self.config = config
        self.metrics = SidecarMetrics(config.limits)
        self.engine = Engines(config, self.metrics)
        self.metrics.watch(self.engine.load)
        self.gate = CallGate()
        self.files = FileChecks()
        self.health = health.aio.HealthServicer()
        size = config.limits.max_message_bytes
        bearer = BearerCheck.from_environment(config.link.auth_token_env)
        _log_security(config, bearer is not None)
        # gRPC refuses a bigger request with RESOURCE_EXHAUSTED before parsing any of it.
        self.server = grpc.aio.server(
            interceptors=[
                *server_interceptors(tracer_provider),
                CallInterceptor(self.gate, self.metrics, bearer),
            ],
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
            ],
        )
        exam_pb2_grpc.add_ExamServiceServicer_to_server(
            ExamServicer(config, self.engine, self.files), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # Left out of reflection: it is the gateway's, not the callers'.
        metrics_pb2_grpc.add_SidecarMetricsServiceServicer_to_server(
            MetricsServicer(self.metrics, bearer), self.server
        )
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = _bind(self.server, config)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Starts answering (health NOT_SERVING), loads the default model, then SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("sidecar listening", extra={"listen": self.config.listen, "port": self.port})
        if self.config.preload:
            await self.engine.preload()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("sidecar serving", extra={"model": self.config.defaults.model_name})

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING first, so balancers look elsewhere; then new calls are refused and
        those in flight get ``grace`` seconds before they end with SHUTTING_DOWN."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        cut_short = await self.gate.close(grace)
        if cut_short:
            log.warning("calls ended by shutdown", extra={"calls": cut_short, "grace_s": grace})
        await self.server.stop(_FLUSH_S)
        await self.engine.close()
        self.files.close()


def _bind(server: grpc.aio.Server, config: SidecarConfig) -> int:
    """Adds the listening port: TLS when sidecar.tlsCertFile and tlsKeyFile are set."""
    tls = config.link.tls
    if tls is None:
        return server.add_insecure_port(config.listen)
    # No client certificates: the gateway proves itself with the bearer token.
    credentials = grpc.ssl_server_credentials([(tls.private_key, tls.cert_chain)])
    return server.add_secure_port(config.listen, credentials)


def _log_security(config: SidecarConfig, bearer: bool) -> None:
    # Said once at start; the token's variable is named, its value never.
    tls = config.link.tls is not None
    extra = {"tls": tls, "bearer_auth": bearer, "token_env": config.link.auth_token_env}
    log.info("sidecar security", extra=extra)
    if not is_loopback(config.listen) and not (tls and bearer):
        log.warning(
            "listening beyond loopback without TLS and a bearer token: anyone who can reach "
            "the port can call it",
            extra={"listen": config.listen, **extra},
        )
