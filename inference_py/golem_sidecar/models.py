"""Resident bases and adapters: each base is loaded once per placement and keeps the adapters
attached to it, so a repeated request loads nothing.

Only the model worker thread (see engine.py) calls into this module, so it needs no locks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.config import Security
from golem_sidecar.errors import failed_precondition
from golem_sidecar.loading import load_model, load_tokenizer
from golem_sidecar.placement import Placement

log = logging.getLogger(__name__)


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
    def is_peft(self) -> bool:
        return isinstance(self.model, PeftModel)

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
    path = Path(model_name).expanduser()
    return str(path.resolve()) if path.exists() else model_name


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

    def is_resident(self, base: ResidentBase) -> bool:
        return any(resident is base for resident in self._bases.values())

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
            raise failed_precondition(
                "adapter_path",
                "ADAPTER_INCOMPATIBLE",
                f'"{folder.path}" cannot be applied to "{base.model_name}": {_first_line(exc)}',
            ) from exc
        base.model.eval()

    def _undo_attach(self, base: ResidentBase, name: str, first: bool) -> None:
        """Never leave a half-loaded adapter: a failed first attach may have injected layers into
        the base itself, so that base is dropped and reloaded on next use."""
        if first:
            self._bases = {k: v for k, v in self._bases.items() if v is not base}
        elif name in base.model.peft_config:
            base.model.delete_adapter(name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
