"""CompareAdapters: the same prompts answered by the bare base and by each adapter in one batched
pass, then every answer scored under every one of those models."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from golem_sidecar.adapters import AdapterFolder, check_adapter_folder
from golem_sidecar.config import SidecarConfig
from golem_sidecar.decoding import BASE_ADAPTER, Row, decode_batch, eos_ids, pad_id
from golem_sidecar.errors import invalid_argument
from golem_sidecar.exam import ADAPTER_NAME
from golem_sidecar.gen import exam_pb2
from golem_sidecar.models import ResidentBase, ResidentModels, peft_name
from golem_sidecar.placement import Placement, QuantizationRequest, resolve_placement
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
    model_name: str
    placement: Placement
    prompts: tuple[str, ...]
    models: tuple[ComparedModel, ...]
    max_new_tokens: int


@dataclass
class ComparedAnswer:
    model: str
    row: Row
    mean_logprob: dict[str, float] = field(default_factory=dict)


def resolve_compare(request: exam_pb2.CompareAdaptersRequest, config: SidecarConfig) -> CompareSpec:
    """Validates a CompareAdaptersRequest; names that look like adapter names and are not
    folders are taken as registered adapters."""
    prompts = tuple(request.prompts)
    if not 1 <= len(prompts) <= MAX_PROMPTS or any(not p.strip() for p in prompts):
        raise invalid_argument("prompts", f"give 1 to {MAX_PROMPTS} non-empty prompts")
    if not 1 <= len(request.adapters) <= MAX_ADAPTERS:
        raise invalid_argument("adapters", f"give 1 to {MAX_ADAPTERS} adapters")
    if len(set(request.adapters)) != len(request.adapters):
        raise invalid_argument("adapters", "each adapter may appear once")
    models = tuple(_compared(label, config) for label in request.adapters)
    max_new = request.max_new_tokens if request.HasField("max_new_tokens") else None
    if max_new is not None and not 1 <= max_new <= config.limits.max_new_tokens_cap:
        raise invalid_argument(
            "max_new_tokens", f"must be 1..{config.limits.max_new_tokens_cap}, got {max_new}"
        )
    defaults = config.defaults
    return CompareSpec(
        model_name=request.model_name if request.HasField("model_name") else defaults.model_name,
        placement=resolve_placement(defaults.device, QuantizationRequest(), defaults.quantization),
        prompts=prompts,
        models=models,
        max_new_tokens=max_new or defaults.max_new_tokens,
    )


def _compared(label: str, config: SidecarConfig) -> ComparedModel:
    # A bare word that is no folder here is a registered adapter's name.
    if ADAPTER_NAME.match(label) and not Path(label).exists():
        return ComparedModel(label, None, label)
    security = config.security
    folder = check_adapter_folder(label, security.allow_pickle, security.adapter_roots)
    return ComparedModel(label, folder, None)


def run_comparison(
    models: ResidentModels,
    base: ResidentBase,
    spec: CompareSpec,
    cancelled: threading.Event,
    chunk: int,
) -> list[list[ComparedAnswer]]:
    """Answers, then scores; runs on the model thread."""
    names: list[str | None] = [None]
    pinned: set[str] = set()
    for compared in spec.models:
        if compared.registered is not None:
            name = models.named(base, compared.registered)
        else:
            assert compared.folder is not None
            name, _ = models.adapter(base, compared.folder, pinned=pinned)
        pinned.add(name)
        names.append(peft_name(name))
    labels = [BASE_ADAPTER, *(m.label for m in spec.models)]
    table = []
    for prompt in spec.prompts:
        prompt_ids = list(base.tokenizer(prompt)["input_ids"])
        table.append(
            [
                ComparedAnswer(label, Row(prompt_ids, name, spec.max_new_tokens, cancelled))
                for label, name in zip(labels, names, strict=True)
            ]
        )
    rows = [answer.row for answers in table for answer in answers]
    decode_batch(base.model, base.tokenizer, rows, base.input_device, base.is_peft)
    _score(base, table, labels, names, chunk)
    return table


def _score(
    base: ResidentBase,
    table: list[list[ComparedAnswer]],
    labels: list[str],
    names: list[str | None],
    chunk: int,
) -> None:
    # The same ids that ended the answers while decoding.
    eos = eos_ids(base.model, base.tokenizer)
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
    scores = mean_logprobs(
        base.model, items, pad_id(base.tokenizer), base.input_device, base.is_peft, chunk
    )
    for (answer, label), score in zip(owners, scores, strict=True):
        answer.mean_logprob[label] = score
