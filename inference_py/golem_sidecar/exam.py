"""Turning a TakeExamRequest into a checked ExamSpec: defaults filled in, every field validated,
the adapter folder checked and paths confined to the configured roots. Cheap work only; nothing
is loaded here."""

from __future__ import annotations

from dataclasses import dataclass

from golem_sidecar.adapters import AdapterFolder, check_adapter_folder
from golem_sidecar.config import SidecarConfig
from golem_sidecar.errors import invalid_argument
from golem_sidecar.gen import exam_pb2
from golem_sidecar.paths import confine_model_name
from golem_sidecar.placement import Placement, QuantizationRequest, resolve_placement


@dataclass(frozen=True)
class ExamSpec:
    """One exam question, fully resolved."""

    model_name: str
    # None when the caller asked for the bare base (disable_adapter).
    adapter: AdapterFolder | None
    prompt: str
    max_new_tokens: int
    placement: Placement
    expected_answer: str | None


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
    adapter = None
    if not request.disable_adapter:
        adapter_path = _path_text(request, "adapter_path", defaults.adapter_path)
        adapter = check_adapter_folder(adapter_path, security.allow_pickle, security.adapter_roots)
    expected = request.expected_answer if request.HasField("expected_answer") else None
    return ExamSpec(model_name, adapter, prompt, max_new_tokens, placement, expected)
