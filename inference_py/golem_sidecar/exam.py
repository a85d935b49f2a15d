"""Turning a TakeExamRequest into a checked ExamSpec: defaults filled in, every field validated,
model and adapter resolved through the gate (gate.py). Nothing is loaded here; this runs on the
gate's file-check threads, never on the event loop."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.config import SidecarConfig
from golem_sidecar.errors import invalid_argument
from golem_sidecar.exams import MAX_STOP_CHARS, MAX_STOPS
from golem_sidecar.gate import ModelRef, resolve_adapter, resolve_model, text_field
from golem_sidecar.gen import exam_pb2
from golem_sidecar.placement import Placement, QuantizationRequest, resolve_placement
from golem_sidecar.sampling import SamplingParams


@dataclass(frozen=True)
class ExamSpec:
    """One exam question, fully resolved."""

    model: ModelRef
    # None when the caller asked for the bare base (disable_adapter) or named an adapter.
    adapter: AdapterFolder | None
    prompt: str
    max_new_tokens: int
    placement: Placement
    expected_answer: str | None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    # A registered adapter (LoadAdapter), used instead of a path.
    adapter_name: str | None = None

    @property
    def model_name(self) -> str:
        return self.model.name


def _given(request: exam_pb2.TakeExamRequest, field: str, default: str) -> str:
    return str(getattr(request, field)) if request.HasField(field) else default


def max_new_tokens(request: Any, config: SidecarConfig) -> int:
    """The request's max_new_tokens (TakeExam, CompareAdapters), checked against the cap."""
    if not request.HasField("max_new_tokens"):
        return config.defaults.max_new_tokens
    value = request.max_new_tokens
    cap = config.limits.max_new_tokens_cap
    if value < 1:
        raise invalid_argument("max_new_tokens", f"must be at least 1, got {value}")
    if value > cap:
        # Refused rather than clamped: a silent clamp would hand back a shorter answer than asked.
        raise invalid_argument(
            "max_new_tokens", f"must be at most {cap} (limits.maxNewTokensCap), got {value}"
        )
    return value


def quantization_request(request: Any) -> QuantizationRequest:
    """The request's quantization fields (TakeExam, GradeExam), None where left out."""
    if not request.HasField("quantization"):
        return QuantizationRequest()
    q = request.quantization
    return QuantizationRequest(
        load_in_4bit=q.load_in_4bit if q.HasField("load_in_4bit") else None,
        compute_dtype=q.bnb_4bit_compute_dtype if q.HasField("bnb_4bit_compute_dtype") else None,
        quant_type=q.bnb_4bit_quant_type if q.HasField("bnb_4bit_quant_type") else None,
        double_quant=(
            q.bnb_4bit_use_double_quant if q.HasField("bnb_4bit_use_double_quant") else None
        ),
    )


def resolve_exam(
    request: exam_pb2.TakeExamRequest,
    config: SidecarConfig,
    is_resident: Callable[[str], bool],
) -> ExamSpec:
    """Validates the request and fills left-out fields from the configured defaults."""
    defaults, security = config.defaults, config.security
    model_name = _given(request, "model_name", defaults.model_name)
    model = resolve_model("model_name", model_name, security, is_resident)
    # The prompt's real bound is the model's context, checked once it is tokenised.
    prompt = text_field("prompt", _given(request, "prompt", defaults.prompt), 2**31)
    placement = resolve_placement(
        text_field("device", _given(request, "device", defaults.device), 64),
        quantization_request(request),
        defaults.quantization,
    )
    adapter, adapter_name = None, None
    if request.HasField("adapter_name"):
        adapter_name = _adapter_name(request)
    elif not request.disable_adapter:
        adapter_path = _given(request, "adapter_path", defaults.adapter_path)
        adapter = resolve_adapter("adapter_path", adapter_path, security)
    expected = None
    if request.HasField("expected_answer"):
        expected = text_field("expected_answer", request.expected_answer)
    return ExamSpec(
        model,
        adapter,
        prompt,
        max_new_tokens(request, config),
        placement,
        expected,
        _sampling(request),
        _stop(request),
        adapter_name,
    )


ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def check_adapter_name(field_name: str, name: str) -> str:
    """A caller's adapter name: a letter, then letters, digits, _ or -. Names the registry makes
    up (models.MADE_UP_PREFIX) start otherwise, so a caller can never choose one."""
    if not ADAPTER_NAME.match(name):
        raise invalid_argument(
            field_name,
            f'"{name}" is not a valid adapter name (a letter, then up to 63 of '
            "letters, digits, _ and -)",
        )
    return name


def _adapter_name(request: exam_pb2.TakeExamRequest) -> str:
    if request.HasField("adapter_path"):
        raise invalid_argument("adapter_name", "cannot be combined with adapter_path")
    if request.disable_adapter:
        raise invalid_argument("adapter_name", "cannot be combined with disable_adapter")
    return check_adapter_name("adapter_name", request.adapter_name)


def _bounded(
    request: exam_pb2.TakeExamRequest, field: str, low: float, high: float, *, open_low: bool
) -> float | None:
    if not request.HasField(field):
        return None
    value = float(getattr(request, field))
    too_low = value <= low if open_low else value < low
    # NaN fails both comparisons, so it is caught by the explicit check.
    if too_low or value > high or value != value:
        bracket = "(" if open_low else "["
        raise invalid_argument(field, f"must be in {bracket}{low:g}, {high:g}], got {value:g}")
    return value


def _sampling(request: exam_pb2.TakeExamRequest) -> SamplingParams:
    temperature = _bounded(request, "temperature", 0.0, 100.0, open_low=False)
    top_p = _bounded(request, "top_p", 0.0, 1.0, open_low=True)
    penalty = _bounded(request, "repetition_penalty", 0.0, 10.0, open_low=True)
    top_k = request.top_k if request.HasField("top_k") else 0
    if top_k < 0:
        raise invalid_argument("top_k", f"must be 0 (all tokens) or more, got {top_k}")
    return SamplingParams(
        # Below sampling.TEMPERATURE_FLOOR the request is greedy (SamplingParams.greedy).
        temperature=temperature or 0.0,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k,
        seed=request.seed if request.HasField("seed") else None,
        repetition_penalty=1.0 if penalty is None else penalty,
    )


def _stop(request: exam_pb2.TakeExamRequest) -> tuple[str, ...]:
    stops = tuple(request.stop)
    if len(stops) > MAX_STOPS:
        raise invalid_argument("stop", f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
    for stop in stops:
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise invalid_argument(
                "stop", f"each stop sequence must be 1..{MAX_STOP_CHARS} characters"
            )
    return stops
