"""The grpc.aio server: ExamService, grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from golem_sidecar.config import SidecarConfig
from golem_sidecar.decoding import FINISH_EOS, FINISH_LENGTH, FINISH_STOP
from golem_sidecar.engine import ExamEngine, ExamResult
from golem_sidecar.errors import GolemError
from golem_sidecar.exam import resolve_exam
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.grading import CONTAINS, EXACT_MATCH
from golem_sidecar.logs import REQUEST_ID

log = logging.getLogger(__name__)
SERVICE_NAME = exam_pb2.DESCRIPTOR.services_by_name["ExamService"].full_name
_FINISH_REASONS = {
    FINISH_LENGTH: exam_pb2.FINISH_REASON_LENGTH,
    FINISH_EOS: exam_pb2.FINISH_REASON_EOS,
    FINISH_STOP: exam_pb2.FINISH_REASON_STOP,
}
_GRADE_RULES = {
    EXACT_MATCH: exam_pb2.GRADE_RULE_EXACT_MATCH,
    CONTAINS: exam_pb2.GRADE_RULE_CONTAINS,
}


class ExamServicer(exam_pb2_grpc.ExamServiceServicer):
    def __init__(self, config: SidecarConfig, engine: ExamEngine) -> None:
        self._config = config
        self._engine = engine

    async def TakeExam(
        self, request: exam_pb2.TakeExamRequest, context: grpc.aio.ServicerContext
    ) -> exam_pb2.TakeExamResponse:
        REQUEST_ID.set(_request_id(context))
        outcome = await self._answer(request, None)
        if isinstance(outcome, GolemError):
            await context.abort_with_status(outcome.to_status())
            raise AssertionError("abort_with_status returns only by raising")
        return to_response(outcome)

    async def StreamExam(
        self, request: exam_pb2.TakeExamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[exam_pb2.ExamChunk]:
        REQUEST_ID.set(_request_id(context))
        pieces: asyncio.Queue[str] = asyncio.Queue()
        answering = asyncio.ensure_future(self._answer(request, pieces.put_nowait))
        try:
            while not (answering.done() and pieces.empty()):
                getting = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getting, answering}, return_when=asyncio.FIRST_COMPLETED)
                if getting.done():
                    yield exam_pb2.ExamChunk(text=getting.result())
                else:
                    getting.cancel()
        finally:
            # The caller went away mid-stream: its row leaves the batch at the next token.
            answering.cancel()
        outcome = answering.result()
        if isinstance(outcome, GolemError):
            await context.abort_with_status(outcome.to_status())
            raise AssertionError("abort_with_status returns only by raising")
        yield exam_pb2.ExamChunk(final=to_response(outcome))

    async def _answer(
        self, request: exam_pb2.TakeExamRequest, on_text: Callable[[str], None] | None
    ) -> ExamResult | GolemError:
        """Runs one exam; every failure becomes the GolemError the caller will receive."""
        cancelled = threading.Event()
        try:
            spec = resolve_exam(request, self._config)
            self._debug_text("exam received", prompt=spec.prompt)
            result = await self._engine.take_exam(spec, cancelled, on_text)
        except GolemError as err:
            log.warning(
                "exam refused",
                extra={"code": err.code.name, "reason": err.reason, "error": err.message},
            )
            return err
        except asyncio.CancelledError:
            log.info("exam cancelled by the caller")
            raise
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            log.error("out of memory", extra={"error": str(exc)})
            return GolemError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "OUT_OF_MEMORY",
                "the model ran out of memory; retry later or ask for fewer max_new_tokens",
                retry_after_s=5.0,
            )
        except Exception as exc:
            log.exception("exam failed")
            return GolemError(
                grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error: {type(exc).__name__}: {exc}"
            )
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


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)
    return uuid.uuid4().hex


def to_response(result: ExamResult) -> exam_pb2.TakeExamResponse:
    spec, gen = result.spec, result.generation
    placement = spec.placement
    quantization = exam_pb2.Quantization(load_in_4bit=placement.load_in_4bit)
    if placement.load_in_4bit:
        quantization.bnb_4bit_compute_dtype = placement.compute_dtype
    response = exam_pb2.TakeExamResponse(
        answer=gen.answer,
        full_text=gen.full_text,
        model=exam_pb2.ModelInfo(
            model_name=spec.model_name,
            device=result.device,
            dtype=result.dtype,
            quantization=quantization,
        ),
        prompt_tokens=gen.prompt_tokens,
        answer_tokens=gen.answer_tokens,
        finish_reason=_FINISH_REASONS[gen.finish_reason],
        batch_size=result.batch_size,
        timings=exam_pb2.Timings(
            load_ns=result.load_ns, queue_ns=result.queue_ns, generate_ns=gen.generate_ns
        ),
    )
    if spec.adapter is not None:
        response.adapter.CopyFrom(
            exam_pb2.AdapterInfo(
                path=spec.adapter.path,
                base_model_name_or_path=spec.adapter.base_model_name_or_path,
                peft_type=spec.adapter.peft_type,
            )
        )
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
    """A running sidecar: the server, its health and its engine."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.engine = ExamEngine(config)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        exam_pb2_grpc.add_ExamServiceServicer_to_server(
            ExamServicer(config, self.engine), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(config.listen)

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
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await self.engine.close()
