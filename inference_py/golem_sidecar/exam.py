"""Turning a TakeExamRequest into a checked ExamSpec: defaults filled in, every field validated,
the adapter folder checked and paths confined to the configured roots. Cheap work only; nothing
is loaded here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from golem_sidecar.adapters import AdapterFolder, check_adapter_folder
from golem_sidecar.config import SidecarConfig
from golem_sidecar.errors import invalid_argument
from golem_sidecar.gen import exam_pb2
from golem_sidecar.paths import confine_model_name
from golem_sidecar.placement import Placement, QuantizationRequest, resolve_placement
from golem_sidecar.sampling import SamplingParams

MAX_STOPS = 8
MAX_STOP_CHARS = 128


@dataclass(frozen=True)
class ExamSpec:
    """One exam question, fully resolved."""

    model_name: str
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


def _text(request: exam_pb2.TakeExamRequest, field: str, default: str) -> str:
    if not request.HasField(field):
        return default
    value: str = getattr(request, field)
    if not value.strip():
        raise invalid_argument(field, "must not be empty")
    return value


def _path_text(request: exam_pb2.TakeExamRequest, field: str, default: str) -> str:
    value = _text(request, field, default)
    # No file system takes a NUL in a path; refused here rather than crashing a check later.
    if "\x00" in value:
        raise invalid_argument(field, "must not contain NUL characters")
    return value


def _max_new_tokens(request: exam_pb2.TakeExamRequest, config: SidecarConfig) -> int:
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


def _quantization(request: exam_pb2.TakeExamRequest) -> QuantizationRequest:
    if not request.HasField("quantization"):
        return QuantizationRequest()
    q = request.quantization
    return QuantizationRequest(
        load_in_4bit=q.load_in_4bit if q.HasField("load_in_4bit") else None,
        compute_dtype=q.bnb_4bit_compute_dtype if q.HasField("bnb_4bit_compute_dtype") else None,
    )


def resolve_exam(request: exam_pb2.TakeExamRequest, config: SidecarConfig) -> ExamSpec:
    """Validates the request and fills left-out fields from the configured defaults."""
    defaults, security = config.defaults, config.security
    model_name = _path_text(request, "model_name", defaults.model_name)
    confine_model_name(model_name, security.model_roots)
    prompt = _text(request, "prompt", defaults.prompt)
    max_new_tokens = _max_new_tokens(request, config)
    placement = resolve_placement(
        _text(request, "device", defaults.device), _quantization(request), defaults.quantization
    )
    adapter, adapter_name = None, None
    if request.HasField("adapter_name"):
        adapter_name = _adapter_name(request)
    elif not request.disable_adapter:
        adapter_path = _path_text(request, "adapter_path", defaults.adapter_path)
        adapter = check_adapter_folder(adapter_path, security.allow_pickle, security.adapter_roots)
    expected = request.expected_answer if request.HasField("expected_answer") else None
    return ExamSpec(
        model_name,
        adapter,
        prompt,
        max_new_tokens,
        placement,
        expected,
        _sampling(request),
        _stop(request),
        adapter_name,
    )


ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def check_adapter_name(field_name: str, name: str) -> str:
    """Adapter names become peft module keys: a letter, then letters, digits, _ or -."""
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
