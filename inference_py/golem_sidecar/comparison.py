"""CompareAdapters: the same prompts answered by the bare base and by each adapter in batched
passes, then every answer scored under every one of those models."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.config import SidecarConfig
from golem_sidecar.decoding import Row, eos_ids, pad_id
from golem_sidecar.errors import caller_gone, invalid_argument
from golem_sidecar.exam import ADAPTER_NAME, max_new_tokens
from golem_sidecar.gate import ModelRef, path_field, resolve_adapter, resolve_model, text_field
from golem_sidecar.gen import exam_pb2
from golem_sidecar.lanes import BASE_ADAPTER, group_by_lane
from golem_sidecar.models import ResidentBase, ResidentModels, peft_name
from golem_sidecar.passes import split_passes
from golem_sidecar.paths import as_path, kind
from golem_sidecar.placement import Placement, default_placement
from golem_sidecar.scheduler import decode_batch
from golem_sidecar.scoring import ScoreItem, mean_logprobs

MAX_PROMPTS = 8
MAX_ADAPTERS = 8


@dataclass(frozen=True)
class ComparedModel:
    # As the caller wrote it: a registered name or a folder.
    label: str
    folder: AdapterFolder | None
    registered: str | None


@dataclass(frozen=True)
class CompareSpec:
    model: ModelRef
    placement: Placement
    prompts: tuple[str, ...]
    models: tuple[ComparedModel, ...]
    max_new_tokens: int

    @property
    def rows(self) -> int:
        """Rows decoded: every prompt by the bare base and by each adapter."""
        return len(self.prompts) * (len(self.models) + 1)


@dataclass
class ComparedAnswer:
    model: str
    row: Row
    mean_logprob: dict[str, float] = field(default_factory=dict)


def resolve_compare(
    request: exam_pb2.CompareAdaptersRequest,
    config: SidecarConfig,
    is_resident: Callable[[str], bool],
) -> CompareSpec:
    """Validates a CompareAdaptersRequest through the gate; names that look like adapter names
    and are not folders are taken as registered adapters. Two entries naming the same weights
    (two spellings of one folder) are refused before anything is loaded."""
    prompts = tuple(request.prompts)
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise invalid_argument("prompts", f"give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}")
    for prompt in prompts:
        text_field("prompts", prompt, max_chars=config.limits.max_message_bytes)
    if not 1 <= len(request.adapters) <= MAX_ADAPTERS:
        raise invalid_argument(
            "adapters", f"give 1 to {MAX_ADAPTERS} adapters, got {len(request.adapters)}"
        )
    models = tuple(compared_model(label, config) for label in request.adapters)
    refuse_duplicates(models)
    defaults = config.defaults
    model_name = request.model_name if request.HasField("model_name") else defaults.model_name
    return CompareSpec(
        model=resolve_model("model_name", model_name, config.security, is_resident),
        placement=default_placement(defaults),
        prompts=prompts,
        models=models,
        max_new_tokens=max_new_tokens(request, config),
    )


def compared_model(label: str, config: SidecarConfig) -> ComparedModel:
    """An adapter named by a caller (CompareAdapters, GradeExam): a registered name or a folder."""
    path_field("adapters", label)
    # A bare word that is no folder here is a registered adapter's name.
    if ADAPTER_NAME.match(label) and kind(as_path(label)) is None:
        return ComparedModel(label, None, label)
    return ComparedModel(label, resolve_adapter("adapters", label, config.security), None)


def refuse_duplicates(models: tuple[ComparedModel, ...]) -> None:
    seen: dict[object, str] = {}
    for compared in models:
        key = compared.registered or (compared.folder.identity if compared.folder else None)
        if key in seen:
            raise invalid_argument(
                "adapters",
                f'"{compared.label}" names the same adapter as "{seen[key]}"; give each once',
                reason="DUPLICATE_ADAPTER",
            )
        seen[key] = compared.label


def run_comparison(
    models: ResidentModels,
    base: ResidentBase,
    spec: CompareSpec,
    cancelled: threading.Event,
    max_batch: int,
    max_tokens: int,
    check_context: Callable[[ResidentBase, int, int], None],
) -> list[list[ComparedAnswer]]:
    """Answers, then scores; runs on the model thread, in passes no larger than one batch."""
    names = _attach(models, base, spec)
    labels, table = answer_table(base, spec, names, cancelled, check_context)
    rows = [answer.row for answers in table for answer in answers]
    for lane, members in group_by_lane(rows, lambda row: row.adapter, base.lane):
        for group in split_passes(members, lambda row: row.width, max_batch, max_tokens):
            if cancelled.is_set():
                raise caller_gone()
            decode_batch(lane, base.tokenizer, group, base.input_device)
    _score(base, table, labels, names, max_batch, max_tokens, cancelled)
    return table


def answer_table(
    base: ResidentBase,
    spec: CompareSpec,
    names: list[str | None],
    cancelled: threading.Event,
    check_context: Callable[[ResidentBase, int, int], None],
) -> tuple[list[str], list[list[ComparedAnswer]]]:
    """The model labels, and one row to decode per prompt and model (each prompt checked against
    the context first), in either engine: ``names`` holds each model's adapter name, None first
    for the bare base."""
    labels = [BASE_ADAPTER, *(m.label for m in spec.models)]
    table = []
    for prompt in spec.prompts:
        prompt_ids = list(base.tokenizer(prompt)["input_ids"])
        check_context(base, len(prompt_ids), spec.max_new_tokens)
        table.append(
            [
                ComparedAnswer(label, Row(prompt_ids, name, spec.max_new_tokens, cancelled))
                for label, name in zip(labels, names, strict=True)
            ]
        )
    return labels, table


def _attach(models: ResidentModels, base: ResidentBase, spec: CompareSpec) -> list[str | None]:
    names: list[str | None] = [None]
    pinned: set[str] = set()
    for compared in spec.models:
        name = models.wear(base, compared.folder, compared.registered, pinned)
        assert name is not None, "a compared model is an adapter, never the bare base"
        if name in pinned:
            # A registered name and a path can name the same weights; each is compared once.
            raise invalid_argument(
                "adapters",
                f'"{compared.label}" names an adapter that another entry names too',
                reason="DUPLICATE_ADAPTER",
            )
        pinned.add(name)
        names.append(peft_name(name))
    return names


def _score(
    base: ResidentBase,
    table: list[list[ComparedAnswer]],
    labels: list[str],
    names: list[str | None],
    max_batch: int,
    max_tokens: int,
    cancelled: threading.Event,
) -> None:
    # The same ids that ended the answers while decoding.
    items, owners = score_plan(table, labels, names, eos_ids(base.model, base.tokenizer))
    scores = mean_logprobs(
        base.lane,
        items,
        pad_id(base.tokenizer),
        base.input_device,
        (max_batch, max_tokens),
        cancelled,
    )
    for (answer, label), score in zip(owners, scores, strict=True):
        answer.mean_logprob[label] = score


def score_plan(
    table: list[list[ComparedAnswer]],
    labels: list[str],
    names: list[str | None],
    eos: set[int],
) -> tuple[list[ScoreItem], list[tuple[ComparedAnswer, str]]]:
    """What CompareAdapters scores, in either engine: every non-empty answer (its end-of-text
    tokens left out) under every model, with the answer and model label each score belongs to."""
    items, owners = [], []
    for answers in table:
        for answer in answers:
            tokens = list(answer.row.generated)
            while tokens and tokens[-1] in eos:
                tokens.pop()
            if not tokens:
                continue
            for label, name in zip(labels, names, strict=True):
                items.append(ScoreItem(answer.row.prompt_ids, tokens, name))
                owners.append((answer, label))
    return items, owners
