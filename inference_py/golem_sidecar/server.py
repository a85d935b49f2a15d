"""The grpc.aio server: ExamService, grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from golem_sidecar.config import SidecarConfig, confined_beyond_loopback
from golem_sidecar.engine import ExamEngine, ExamResult
from golem_sidecar.errors import GolemError
from golem_sidecar.exam import resolve_exam
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.generation import FINISH_EOS
from golem_sidecar.grading import CONTAINS, EXACT_MATCH
from golem_sidecar.logs import REQUEST_ID
from golem_sidecar.shutdown import CallGate

log = logging.getLogger(__name__)
# After the last call has answered, how long the transport gets to deliver those answers.
_FLUSH_S = 1.0
SERVICE_NAME = exam_pb2.DESCRIPTOR.services_by_name["ExamService"].full_name
_GRADE_RULES = {
    EXACT_MATCH: exam_pb2.GRADE_RULE_EXACT_MATCH,
    CONTAINS: exam_pb2.GRADE_RULE_CONTAINS,
}


class ExamServicer(exam_pb2_grpc.ExamServiceServicer):
    def __init__(self, config: SidecarConfig, engine: ExamEngine, gate: CallGate) -> None:
        self._config = config
        self._engine = engine
        self._gate = gate

    async def TakeExam(
        self, request: exam_pb2.TakeExamRequest, context: grpc.aio.ServicerContext
    ) -> exam_pb2.TakeExamResponse:
        REQUEST_ID.set(_request_id(context))
        error = await self._take_exam(request)
        if isinstance(error, exam_pb2.TakeExamResponse):
            return error
        await context.abort_with_status(error.to_status())
        raise AssertionError("abort_with_status returns only by raising")

    async def _take_exam(
        self, request: exam_pb2.TakeExamRequest
    ) -> exam_pb2.TakeExamResponse | GolemError:
        cancelled = threading.Event()
        try:
            with self._gate.admit():
                spec = resolve_exam(request, self._config)
                self._debug_text("exam received", prompt=spec.prompt)
                result = await self._gate.until_expiry(self._engine.take_exam(spec, cancelled))
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
            )
        except Exception as exc:
            log.exception("exam failed")
            return GolemError(
                grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error: {type(exc).__name__}: {exc}"
            )
        self._log_result(result)
        return to_response(result)

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
        finish_reason=(
            exam_pb2.FINISH_REASON_EOS
            if gen.finish_reason == FINISH_EOS
            else exam_pb2.FINISH_REASON_LENGTH
        ),
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
        config = confined_beyond_loopback(config)
        self.config = config
        self.engine = ExamEngine(config)
        self.gate = CallGate()
        self.health = health.aio.HealthServicer()
        size = config.limits.max_message_bytes
        # gRPC refuses a bigger request with RESOURCE_EXHAUSTED before parsing any of it.
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
            ]
        )
        exam_pb2_grpc.add_ExamServiceServicer_to_server(
            ExamServicer(config, self.engine, self.gate), self.server
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
        """Health NOT_SERVING first, so balancers look elsewhere; then new calls are refused and
        those in flight get ``grace`` seconds before they end with SHUTTING_DOWN."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        cut_short = await self.gate.close(grace)
        if cut_short:
            log.warning("calls ended by shutdown", extra={"calls": cut_short, "grace_s": grace})
        await self.server.stop(_FLUSH_S)
        self.engine.close()
