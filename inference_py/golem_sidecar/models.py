"""Resident bases and adapters: each base is loaded once per placement and keeps the adapters
attached to it, so a repeated request loads nothing.

Only the model worker thread (see engine.py) calls into this module, so it needs no locks.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from golem_sidecar.adapters import AdapterFolder, missing_targets
from golem_sidecar.config import Security
from golem_sidecar.errors import GolemError, failed_precondition
from golem_sidecar.loading import load_model, load_tokenizer
from golem_sidecar.paths import as_path, kind
from golem_sidecar.placement import Placement

log = logging.getLogger(__name__)
# torch's load_state_dict wording, stable since torch 1.0: one line per tensor that differs.
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<name>\S+): copying a param with shape "
    r"torch\.Size\(\[(?P<got>[^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(?P<want>[^\]]*)\]\)"
)


@dataclass(frozen=True)
class BaseKey:
    """Two requests share a resident base only when all of these agree."""

    model: str
    placement: Placement


@dataclass
class ResidentBase:
    model_name: str
    placement: Placement
    tokenizer: PreTrainedTokenizerBase
    # The plain model until the first adapter is attached, a PeftModel from then on.
    model: Any
    # Resolved adapter folder -> (peft adapter name, the checked folder).
    adapters: dict[Path, tuple[str, AdapterFolder]] = field(default_factory=dict)

    @property
    def input_device(self) -> Any:
        return self.model.get_input_embeddings().weight.device

    @property
    def weight_dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @contextlib.contextmanager
    def wearing(self, adapter_name: str | None) -> Iterator[Any]:
        """The model with exactly this adapter active, or with every adapter disabled (None)."""
        if adapter_name is not None:
            self.model.set_adapter(adapter_name)
            yield self.model
        elif isinstance(self.model, PeftModel):
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model


def model_key(model_name: str) -> str:
    """Local paths are keyed by their absolute form, so "./m" and "m" share one base."""
    path = as_path(model_name)
    return str(path.resolve()) if kind(path) is not None else model_name


class ResidentModels:
    """The bases and adapters this sidecar keeps in memory."""

    def __init__(self, security: Security) -> None:
        self._security = security
        self._bases: dict[BaseKey, ResidentBase] = {}

    def base(self, model_name: str, placement: Placement) -> tuple[ResidentBase, int]:
        """The resident base for this model and placement, loading it if needed; also returns
        the nanoseconds spent loading (0 when it was resident)."""
        key = BaseKey(model_key(model_name), placement)
        resident = self._bases.get(key)
        if resident is not None:
            return resident, 0
        started = time.perf_counter_ns()
        tokenizer = load_tokenizer(model_name, self._security)
        model = load_model(model_name, placement, self._security)
        if model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        resident = ResidentBase(model_name, placement, tokenizer, model)
        self._bases[key] = resident
        elapsed = time.perf_counter_ns() - started
        log.info(
            "base loaded",
            extra={"model": model_name, "device": placement.device, "load_ms": elapsed // 10**6},
        )
        return resident, elapsed

    def adapter(self, base: ResidentBase, folder: AdapterFolder) -> tuple[str, int]:
        """The name of this adapter on this base, attaching it if needed; also returns the
        nanoseconds spent loading it."""
        attached = base.adapters.get(folder.resolved)
        if attached is not None:
            return attached[0], 0
        started = time.perf_counter_ns()
        name = f"adapter_{len(base.adapters)}"
        log.info("adapter found", extra={"adapter": folder.path, "peft_type": folder.peft_type})
        self._attach(base, folder, name)
        base.adapters[folder.resolved] = (name, folder)
        return name, time.perf_counter_ns() - started

    def _attach(self, base: ResidentBase, folder: AdapterFolder, name: str) -> None:
        """Attaches the adapter, or raises ADAPTER_INCOMPATIBLE (FAILED_PRECONDITION) naming what
        differs: target modules the base lacks (checked before peft touches the base), or
        tensors whose shapes differ from the base's (peft finds those while loading; the
        half-attached adapter is then undone)."""
        missing = missing_targets(folder, _module_names(base.model))
        if missing:
            raise _incompatible(
                folder, base, f"it targets modules the base lacks: {', '.join(missing)}"
            )
        first = not isinstance(base.model, PeftModel)
        try:
            if first:
                base.model = PeftModel.from_pretrained(
                    base.model, str(folder.resolved), adapter_name=name, is_trainable=False
                )
            else:
                base.model.load_adapter(str(folder.resolved), adapter_name=name)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            self._undo_attach(base, name, first)
            raise _incompatible(folder, base, _what_differs(exc, name)) from exc
        base.model.eval()

    def _undo_attach(self, base: ResidentBase, name: str, first: bool) -> None:
        """Never leave a half-loaded adapter: a failed first attach may have injected layers into
        the base itself, so that base is dropped and reloaded on next use."""
        if first:
            self._bases = {k: v for k, v in self._bases.items() if v is not base}
        elif name in base.model.peft_config:
            base.model.delete_adapter(name)


def _module_names(model: Any) -> list[str]:
    # The bare base's names, as target_modules are written against them.
    bare = model.get_base_model() if isinstance(model, PeftModel) else model
    return [module_name for module_name, _ in bare.named_modules()]


def _incompatible(folder: AdapterFolder, base: ResidentBase, why: str) -> GolemError:
    return failed_precondition(
        "adapter_path",
        "ADAPTER_INCOMPATIBLE",
        f'"{folder.path}" cannot be applied to "{base.model_name}": {why}',
    )


def _what_differs(exc: BaseException, adapter_name: str) -> str:
    """The first module whose adapter tensor has another shape than the base needs, and how many
    more tensors differ; otherwise the error's first line."""
    mismatches = list(_SIZE_MISMATCH.finditer(str(exc)))
    if not mismatches:
        return _first_line(exc)
    first = mismatches[0]
    # "base_model.model.<module>.<peft tensor>.<adapter name>.weight"
    name = first["name"].removeprefix("base_model.model.")
    owner, _, suffix = name.partition(f".{adapter_name}.")
    module, _, tensor = owner.rpartition(".")
    tensor = f"{tensor}.{suffix}" if suffix else tensor
    more = f"; {len(mismatches) - 1} more tensors differ" if len(mismatches) > 1 else ""
    return (
        f"it was made for another base: in module {module}, {tensor} has shape "
        f"[{first['got']}] in the adapter but the base needs [{first['want']}]{more}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
