"""Turning a GradeExamRequest into a checked GradeSpec, through the same gate as every other RPC:
paths confined to security.examRoots (and the adapter and model rules of gate.py), the header
read, scorers resolved by name, adapters resolved and hashed. The exam's items are checked in a
pass of their own (grader.py), still before any work starts. Runs on the gate's file-check
threads, never on the event loop."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from golem_sidecar.adapters import AdapterFolder, content_hash
from golem_sidecar.comparison import (
    MAX_ADAPTERS,
    ComparedModel,
    compared_model,
    refuse_duplicates,
)
from golem_sidecar.config import SidecarConfig
from golem_sidecar.errors import GolemError, invalid_argument, not_found
from golem_sidecar.exam import quantization_request
from golem_sidecar.exams import (
    HASH_FORMAT,
    ExamError,
    ExamHeader,
    ExamItem,
    canonical,
    default_header_path,
    item_fields,
    read_header,
)
from golem_sidecar.gate import ModelRef, path_field, resolve_model, text_field
from golem_sidecar.gen import exam_pb2
from golem_sidecar.lanes import BASE_ADAPTER
from golem_sidecar.paths import as_path, confine, kind
from golem_sidecar.placement import Placement, resolve_placement
from golem_sidecar.scorers import Scorer, get_scorer, known_scorers

# The label of the bare base in results and summaries, as CompareAdapters names it.
BASE_LABEL = BASE_ADAPTER


@dataclass(frozen=True)
class GradedModel:
    """One model that takes the exam: the bare base, or the base wearing an adapter."""

    label: str
    # For an adapter folder named by path.
    folder: AdapterFolder | None = None
    # For an adapter registered with LoadAdapter.
    registered: str | None = None
    # sha256 of the adapter's config and weights (adapters.content_hash); "" for the bare base
    # and, until grader.py has looked it up, for a registered adapter.
    adapter_hash: str = ""

    @property
    def is_base(self) -> bool:
        return self.folder is None and self.registered is None


@dataclass(frozen=True)
class GradeSpec:
    model: ModelRef
    placement: Placement
    # The exam file, resolved, and as the caller wrote it (for messages).
    exam_path: Path
    exam_label: str
    # The header's settings, with the request's scorers in place of the header's when given.
    header: ExamHeader
    scorers: tuple[Scorer, ...]
    models: tuple[GradedModel, ...]
    # None when the request named no resume file.
    resume_path: Path | None


def resolve_grade(
    request: exam_pb2.GradeExamRequest,
    config: SidecarConfig,
    is_resident: Callable[[str], bool],
) -> GradeSpec:
    """Validates the request; every refusal names its field."""
    exam_path = _exam_file("exam_path", request.exam_path, config, required=True)
    assert exam_path is not None
    models = _models(request, config)
    scorers = _request_scorers(request)
    header_path = None
    if request.HasField("header_path"):
        header_path = _exam_file("header_path", request.header_path, config, required=True)
    header = _header(exam_path, header_path, config)
    if scorers:
        header = replace(header, scorers=scorers)
    resume_path = None
    if request.HasField("resume_path"):
        resume_path = _exam_file("resume_path", request.resume_path, config, required=False)
    defaults = config.defaults
    model_name = request.model_name if request.HasField("model_name") else defaults.model_name
    device = request.device if request.HasField("device") else defaults.device
    return GradeSpec(
        model=resolve_model("model_name", model_name, config.security, is_resident),
        placement=resolve_placement(
            text_field("device", device, 64), quantization_request(request), defaults.quantization
        ),
        exam_path=exam_path,
        exam_label=request.exam_path,
        header=header,
        scorers=tuple(get_scorer(name) for name in header.scorers),
        models=models,
        resume_path=resume_path,
    )


def _exam_file(field: str, text: str, config: SidecarConfig, *, required: bool) -> Path | None:
    """A caller's file: confined first (a refusal reads the same whether or not it exists), then
    it must be a regular file; a resume file may also not exist yet (returned all the same)."""
    path_field(field, text)
    confine(text, config.security.exam_roots, field)
    path = as_path(text)
    found = kind(path)
    if found is None:
        if not required:
            return path.resolve()
        raise not_found(field, "EXAM_NOT_FOUND", f'no file at "{text}"')
    if found != "file":
        raise invalid_argument(field, f'"{text}" is not a regular file', reason="EXAM_NOT_A_FILE")
    return path.resolve()


def _models(request: exam_pb2.GradeExamRequest, config: SidecarConfig) -> tuple[GradedModel, ...]:
    if len(request.adapters) > MAX_ADAPTERS:
        raise invalid_argument(
            "adapters", f"give at most {MAX_ADAPTERS} adapters, got {len(request.adapters)}"
        )
    if not request.adapters and not request.include_base:
        raise invalid_argument(
            "adapters", "name at least one adapter, or set include_base to grade the bare base"
        )
    compared = tuple(compared_model(label, config) for label in request.adapters)
    refuse_duplicates(compared)
    adapters = tuple(_graded(model) for model in compared)
    return ((GradedModel(BASE_LABEL),) if request.include_base else ()) + adapters


def _graded(model: ComparedModel) -> GradedModel:
    if model.folder is None:
        return GradedModel(model.label, registered=model.registered)
    return GradedModel(model.label, folder=model.folder, adapter_hash=content_hash(model.folder))


def _request_scorers(request: exam_pb2.GradeExamRequest) -> tuple[str, ...]:
    names = tuple(request.scorers)
    for i, name in enumerate(names):
        get_scorer(name)
        if name in names[:i]:
            raise invalid_argument("scorers", f'"{name}" is named twice')
    return names


def _header(exam_path: Path, header_path: Path | None, config: SidecarConfig) -> ExamHeader:
    try:
        if header_path is None:
            header_path = default_header_path(exam_path)
            if header_path is None:
                return ExamHeader(name=exam_path.stem)
            # Found by the exam's stem, it may still be a link out of the roots.
            confine(str(header_path), config.security.exam_roots, "header_path")
        return read_header(
            header_path,
            default_name=exam_path.stem,
            known_scorers=known_scorers(),
            max_new_tokens_cap=config.limits.max_new_tokens_cap,
        )
    except ExamError as error:
        field = "exam_path" if error.path == str(exam_path) else "header_path"
        raise exam_refused(error, field) from None


def exam_refused(error: ExamError, field: str) -> GolemError:
    """An ExamError as the caller sees it: INVALID_ARGUMENT on the request field that named the
    file, with the file, the line and the item's field in the message and the ErrorInfo."""
    refused = invalid_argument(field, str(error), reason="INVALID_EXAM")
    refused.metadata.update({"path": error.path, "line": str(error.line or ""), "field": ""})
    if error.field is not None:
        refused.metadata["field"] = error.field
    return refused


def model_settings(spec: GradeSpec, model: GradedModel) -> bytes:
    """What, besides the item, decides one model's result: the base and how it is loaded, the
    adapter's content, the generation settings and the scorers."""
    placement = spec.placement
    generation = spec.header.generation
    return canonical(
        [
            HASH_FORMAT,
            spec.model.key,
            [placement.device, placement.dtype, placement.load_in_4bit, placement.compute_dtype],
            [placement.quant_type, placement.double_quant],
            model.adapter_hash or "base",
            [generation.max_new_tokens, generation.stop],
            [scorer.name for scorer in spec.scorers],
        ]
    )


def result_key(settings: bytes, item: ExamItem) -> str:
    """The key of one item's result under one model's settings (model_settings)."""
    return hashlib.sha256(settings + canonical(item_fields(item))).hexdigest()
