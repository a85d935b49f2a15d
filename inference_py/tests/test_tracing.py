"""Traces: a real sidecar on the tiny model, traced into the SDK's in-memory exporter, called
with a W3C traceparent as the gateway sends it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from golem_sidecar import tracing
from golem_sidecar.config import Tracing
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.server import Sidecar
from tests.conftest import tiny_config

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)


class Traced:
    def __init__(self, sidecar: Sidecar, exporter: InMemorySpanExporter) -> None:
        self.sidecar = sidecar
        self.exporter = exporter
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
        self.stub = exam_pb2_grpc.ExamServiceStub(self.channel)

    def span_of(self, method: str) -> ReadableSpan:
        """The one span of the last call to ``method``; clears the exporter."""
        spans = [s for s in self.exporter.get_finished_spans() if s.name.endswith(f"/{method}")]
        self.exporter.clear()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]


@pytest_asyncio.fixture(scope="module")
async def traced(tiny: dict[str, str]) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sidecar = Sidecar(tiny_config(tiny), provider)
    await sidecar.start()
    found = Traced(sidecar, exporter)
    yield found
    await found.channel.close()
    await sidecar.stop(0)
    provider.shutdown()


def _continues_the_callers_trace(span: ReadableSpan) -> None:
    assert span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and span.parent.is_remote
    assert format(span.parent.span_id, "016x") == PARENT_ID


async def test_take_exam_span_continues_the_trace_with_genai_attributes(
    traced: Traced, tiny: dict[str, str]
) -> None:
    request = exam_pb2.TakeExamRequest(adapter_path=tiny["adapter_b"], max_new_tokens=3)
    response = await traced.stub.TakeExam(request, metadata=TRACEPARENT)
    span = traced.span_of("TakeExam")
    _continues_the_callers_trace(span)
    assert (
        dict(span.attributes or {}).items()
        >= {
            "rpc.system": "grpc",
            "rpc.method": "TakeExam",
            "gen_ai.operation.name": "text_completion",
            "gen_ai.request.model": tiny["adapter_b"],
            "golem.base_model": tiny["model"],
            "gen_ai.request.max_tokens": 3,
            "gen_ai.usage.input_tokens": response.prompt_tokens,
            "gen_ai.usage.output_tokens": response.answer_tokens,
        }.items()
    )
    assert response.answer_tokens > 0
    assert span.status.status_code is StatusCode.UNSET


async def test_the_bare_base_is_the_request_model(traced: Traced, tiny: dict[str, str]) -> None:
    request = exam_pb2.TakeExamRequest(disable_adapter=True, max_new_tokens=2)
    await traced.stub.TakeExam(request, metadata=TRACEPARENT)
    attributes = traced.span_of("TakeExam").attributes or {}
    assert attributes["gen_ai.request.model"] == tiny["model"]
    assert attributes["golem.base_model"] == tiny["model"]


async def test_stream_exam_span_has_the_counts_of_the_final_answer(traced: Traced) -> None:
    request = exam_pb2.TakeExamRequest(max_new_tokens=3)
    chunks = [c async for c in traced.stub.StreamExam(request, metadata=TRACEPARENT)]
    final = chunks[-1].final
    span = traced.span_of("StreamExam")
    _continues_the_callers_trace(span)
    attributes = span.attributes or {}
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.usage.output_tokens"] == final.answer_tokens
    assert attributes["gen_ai.usage.input_tokens"] == final.prompt_tokens


async def test_a_refused_call_is_an_error_span_with_its_reason(traced: Traced) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await traced.stub.TakeExam(
            exam_pb2.TakeExamRequest(max_new_tokens=10**6), metadata=TRACEPARENT
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    span = traced.span_of("TakeExam")
    _continues_the_callers_trace(span)
    assert span.status.status_code is StatusCode.ERROR
    attributes = span.attributes or {}
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert attributes["golem.error.reason"] == "INVALID_FIELD"
    assert attributes["gen_ai.operation.name"] == "text_completion"


async def test_list_adapters_has_its_own_operation_name(traced: Traced) -> None:
    await traced.stub.ListAdapters(exam_pb2.ListAdaptersRequest())
    span = traced.span_of("ListAdapters")
    assert (span.attributes or {})["gen_ai.operation.name"] == "list_adapters"
    # No traceparent: the sidecar's span starts a trace of its own.
    assert span.parent is None


async def test_health_probes_make_no_spans(traced: Traced) -> None:
    traced.exporter.clear()
    health = health_pb2_grpc.HealthStub(traced.channel)
    await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert traced.exporter.get_finished_spans() == ()


def test_every_method_has_an_operation_name() -> None:
    methods = exam_pb2.DESCRIPTOR.services_by_name["ExamService"].methods_by_name
    assert set(tracing.OPERATIONS) == set(methods)


def test_tracing_off_makes_no_provider_and_no_interceptor() -> None:
    assert tracing.tracer_provider(Tracing()) is None
    assert tracing.server_interceptors(None) == []


def test_spans_file_gets_one_json_line_per_finished_span(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    provider = tracing.tracer_provider(Tracing(spans_file=str(path)))
    assert provider is not None
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("outer"), tracer.start_as_current_span("inner"):
        pass
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    provider.shutdown()
    assert [line["name"] for line in lines] == ["inner", "outer"]
    inner, outer = lines
    assert inner["context"]["trace_id"] == outer["context"]["trace_id"]
    assert inner["parent_id"] == outer["context"]["span_id"]
    assert outer["resource"]["attributes"]["service.name"] == "golem-sidecar"
