"""Traces: a server span for every ExamService call (opentelemetry-instrumentation-grpc's aio
interceptor), continuing the caller's W3C trace, and the one place that puts the OpenTelemetry
GenAI semantic-convention attributes on it, from the facts only the sidecar knows (which model
and adapter really answered, how many tokens).

With tracing off (config.tracing empty) no interceptor is installed and the ``record_*``
functions find a non-recording span and return at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.trace import Status, StatusCode

from golem_sidecar.config import Tracing
from golem_sidecar.wire import EXAM_SERVICE_NAME

if TYPE_CHECKING:
    from golem_sidecar.comparison import CompareSpec
    from golem_sidecar.errors import GolemError
    from golem_sidecar.exam import ExamSpec
    from golem_sidecar.gate import ModelRef
    from golem_sidecar.grade_spec import GradeSpec
    from golem_sidecar.session import Generation

# The GenAI conventions' names (https://opentelemetry.io/docs/specs/semconv/gen-ai/), written out:
# the semconv package keeps them in a private, incubating module.
OPERATION = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"
MAX_TOKENS = "gen_ai.request.max_tokens"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
# Ours: gen_ai.request.model names the adapter, so the base it sits on needs a key of its own.
BASE_MODEL = "golem.base_model"
# The models a comparison or an exam puts side by side, by their labels.
MODELS = "golem.models"
EXAM = "golem.exam"
ERROR_REASON = "golem.error.reason"

# gen_ai.operation.name per method. "text_completion" (a convention value) where one model
# completes one prompt; ours, in the same snake_case, where the call is something else: many
# models at once (token counts summed over them would mislead a per-model view) or no text.
OPERATIONS = {
    "TakeExam": "text_completion",
    "StreamExam": "text_completion",
    "CompareAdapters": "compare_adapters",
    "GradeExam": "grade_exam",
    "LoadAdapter": "load_adapter",
    "UnloadAdapter": "unload_adapter",
    "ListAdapters": "list_adapters",
}


def tracer_provider(config: Tracing) -> TracerProvider | None:
    """The sidecar's tracer provider with an exporter per configured destination; None when
    tracing is off. The caller shuts it down (which flushes) when the sidecar stops."""
    if not config.enabled:
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "golem-sidecar"}))
    if config.otlp_endpoint:
        # Imported only when used: the exporter pulls in its own protobuf stubs.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if config.spans_file:
        # Simple, not batched: a span is in the file as soon as it ends.
        provider.add_span_processor(SimpleSpanProcessor(_json_lines_exporter(config.spans_file)))
    return provider


def _json_lines_exporter(path: str) -> ConsoleSpanExporter:
    # Line-buffered append: whole lines, and several sidecars (restarts) may share the file.
    out = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives as long as the process)
    return ConsoleSpanExporter(out=out, formatter=_json_line)


def _json_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + os.linesep


def server_interceptors(provider: TracerProvider | None) -> list[grpc.aio.ServerInterceptor]:
    """The tracing interceptor for ExamService calls (health and reflection probes make no
    spans), to go first so its span covers every other interceptor; none when tracing is off."""
    if provider is None:
        return []
    only_exams = filters.service_name(EXAM_SERVICE_NAME)
    return [aio_server_interceptor(tracer_provider=provider, filter_=only_exams)]


def _set(**attributes: Any) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({_KEYS[key]: value for key, value in attributes.items()})


_KEYS = {
    "operation": OPERATION,
    "model": REQUEST_MODEL,
    "max_tokens": MAX_TOKENS,
    "input_tokens": INPUT_TOKENS,
    "output_tokens": OUTPUT_TOKENS,
    "finish_reasons": FINISH_REASONS,
    "base_model": BASE_MODEL,
    "models": MODELS,
    "exam": EXAM,
}


def record_operation(method: str) -> None:
    """gen_ai.operation.name for an ExamService method (its short name)."""
    _set(operation=OPERATIONS[method])


def record_exam(spec: ExamSpec) -> None:
    """What a TakeExam/StreamExam asked of which model: the adapter (its registered name, else
    its folder) as gen_ai.request.model, or the base itself when it answers bare."""
    adapter = spec.adapter_name or (spec.adapter.path if spec.adapter is not None else None)
    _set(model=adapter or spec.model_name, base_model=spec.model_name)
    _set(max_tokens=spec.max_new_tokens)


def record_generation(generation: Generation) -> None:
    """The tokens read and written for one answer, and why it stopped (length, eos or stop)."""
    _set(input_tokens=generation.prompt_tokens, output_tokens=generation.answer_tokens)
    _set(finish_reasons=[generation.finish_reason])


def record_compare(spec: CompareSpec, answer_tokens: Sequence[int]) -> None:
    """A comparison's base, its adapters' labels and the tokens written over all its rows."""
    _set(base_model=spec.model.name, models=[m.label for m in spec.models])
    _set(max_tokens=spec.max_new_tokens, output_tokens=sum(answer_tokens))


def record_grade(spec: GradeSpec) -> None:
    """An exam's file, base and models."""
    _set(exam=spec.exam_label, base_model=spec.model.name, models=[m.label for m in spec.models])


def record_adapter(name: str, model: ModelRef) -> None:
    """LoadAdapter/UnloadAdapter: the adapter's name and the base it is attached to."""
    _set(model=name, base_model=model.name)


def record_error(error: GolemError) -> None:
    """The status a call ends with: the interceptor counts only gRPC's own aborts as errors,
    and ours leave through abort_with_status, which it does not see."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", error.code.value[0])
        span.set_attribute(ERROR_REASON, error.reason)
        span.set_status(Status(StatusCode.ERROR, f"{error.code.name}: {error.message}"))
