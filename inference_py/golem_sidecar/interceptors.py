"""What every ExamService call goes through, whatever its handler: the request id, the bearer
token (when one is set), the shutdown gate (with its grace period), error mapping, a log line and
its metrics. A handler holds only its own logic and raises GolemError to refuse; an RPC added
later gets all of this without a line of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from golem_sidecar.auth import BearerCheck
from golem_sidecar.errors import GolemError
from golem_sidecar.logs import REQUEST_ID
from golem_sidecar.metrics import SidecarMetrics, mark_arrival
from golem_sidecar.shutdown import CallGate
from golem_sidecar.tracing import record_error, record_operation
from golem_sidecar.wire import EXAM_SERVICE_NAME, REQUEST_ID_KEY

log = logging.getLogger(__name__)
Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Streaming = Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]]


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id, else a fresh one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)
    return uuid.uuid4().hex


def as_golem_error(exc: Exception) -> GolemError:
    """The status a failure gives the caller; a bug is logged with its stack."""
    if isinstance(exc, GolemError):
        log.warning(
            "call refused",
            extra={"code": exc.code.name, "reason": exc.reason, "error": exc.message},
        )
        return exc
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        log.error("out of memory", extra={"error": str(exc)})
        return GolemError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "OUT_OF_MEMORY",
            "the model ran out of memory; retry later or ask for fewer max_new_tokens",
            retry_after_s=5.0,
        )
    log.exception("call failed", exc_info=exc)
    return GolemError(
        grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error: {type(exc).__name__}: {exc}"
    )


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every ExamService method handler (health and reflection pass untouched)."""

    def __init__(
        self, gate: CallGate, metrics: SidecarMetrics, bearer: BearerCheck | None = None
    ) -> None:
        self._gate = gate
        self._metrics = metrics
        self._bearer = bearer

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self._bearer is not None:
            self._bearer.verify(context.invocation_metadata())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(f"/{EXAM_SERVICE_NAME}/"):
            return handler
        name = method.rsplit("/", 1)[-1]
        # Requests arrive as bytes and are parsed inside the gate, so that bytes which are no
        # such message get INVALID_ARGUMENT like any other bad input.
        parse = _parser(handler.request_deserializer)
        codec = {"response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            unary = self._unary(name, _parsed(parse, handler.unary_unary))
            return grpc.unary_unary_rpc_method_handler(unary, **codec)
        if handler.unary_stream is not None:
            stream = self._streaming(name, _parsed_stream(parse, handler.unary_stream))
            return grpc.unary_stream_rpc_method_handler(stream, **codec)
        raise TypeError(f"{method}: only unary and server-streaming RPCs pass the call gate")

    def _unary(self, name: str, behaviour: Unary) -> Unary:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            REQUEST_ID.set(request_id(context))
            mark_arrival(_label(name))
            record_operation(name)
            started = time.perf_counter()
            try:
                self._authenticate(context)
                # Shutdown refuses new calls here, and ends those still running when grace ends.
                with self._gate.admit():
                    response = await self._gate.until_expiry(behaviour(request, context))
            except asyncio.CancelledError:
                log.info("call cancelled by the caller", extra={"method": name})
                self._count(name, grpc.StatusCode.CANCELLED, started)
                raise
            except Exception as exc:  # every failure becomes the caller's status here
                await self._abort(context, name, as_golem_error(exc), started)
            self._finished(name, started)
            return response

        return call

    def _streaming(self, name: str, behaviour: Streaming) -> Streaming:
        async def call(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncGenerator[Any, None]:
            REQUEST_ID.set(request_id(context))
            mark_arrival(_label(name))
            record_operation(name)
            started = time.perf_counter()
            stream = behaviour(request, context)
            counted = False
            try:
                self._authenticate(context)
                with self._gate.admit():
                    while True:
                        try:
                            item = await self._gate.until_expiry(anext(stream))
                        except StopAsyncIteration:
                            break
                        yield item
                counted = True
                self._finished(name, started)
            except Exception as exc:  # GeneratorExit and CancelledError (caller gone) pass
                counted = True
                await self._abort(context, name, as_golem_error(exc), started)
            finally:
                await stream.aclose()
                # Neither answered nor failed: the caller went away mid-stream.
                if not counted:
                    self._count(name, grpc.StatusCode.CANCELLED, started)

        return call

    async def _abort(
        self, context: grpc.aio.ServicerContext, name: str, error: GolemError, started: float
    ) -> None:
        _log_finished(name, error.code.name, started)
        self._count(name, error.code, started)
        record_error(error)
        await context.abort_with_status(error.to_status())

    def _finished(self, name: str, started: float) -> None:
        _log_finished(name, "OK", started)
        self._count(name, grpc.StatusCode.OK, started)

    def _count(self, name: str, code: grpc.StatusCode, started: float) -> None:
        self._metrics.call_finished(_label(name), code, started)


def _label(name: str) -> str:
    """A method as metrics label it, service included (as the gateway's do)."""
    return f"{EXAM_SERVICE_NAME}/{name}"


def _parser(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            raise GolemError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "REQUEST_UNREADABLE",
                f"the request's bytes are not a valid message of this method: {exc}",
            ) from None

    return parse


def _parsed(parse: Callable[[bytes], Any], behaviour: Unary) -> Unary:
    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(parse(raw), context)

    return call


def _parsed_stream(parse: Callable[[bytes], Any], behaviour: Streaming) -> Streaming:
    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
        async for item in behaviour(parse(raw), context):
            yield item

    return call


def _log_finished(method: str, code: str, started: float) -> None:
    ms = round((time.perf_counter() - started) * 1000, 1)
    log.info("call finished", extra={"method": method, "code": code, "ms": ms})
