"""Resident bases and adapters: each base is loaded once per placement and keeps the adapters
attached to it, so a repeated request loads nothing.

Only the model worker thread (see engine.py) calls into this module, so it needs no locks.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from golem_sidecar.adapters import AdapterFolder, missing_targets
from golem_sidecar.config import Security
from golem_sidecar.errors import GolemError, already_exists, failed_precondition, not_found
from golem_sidecar.gate import ModelRef
from golem_sidecar.loading import load_model, load_tokenizer
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
    ref: ModelRef
    placement: Placement
    tokenizer: PreTrainedTokenizerBase
    # The plain model while no adapter is attached, a PeftModel while any is.
    model: Any
    # Adapter name -> its folder, least recently used first.
    adapters: OrderedDict[str, AdapterFolder] = field(default_factory=OrderedDict)
    # Weights identity -> adapter name, so every spelling of a folder names one adapter.
    by_identity: dict[tuple[str, int, int], str] = field(default_factory=dict)
    uses: Counter[str] = field(default_factory=Counter)

    @property
    def model_name(self) -> str:
        return self.ref.name

    @property
    def key(self) -> BaseKey:
        return BaseKey(self.ref.key, self.placement)

    @property
    def input_device(self) -> Any:
        return self.model.get_input_embeddings().weight.device

    @property
    def is_peft(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def weight_dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")


# Names the registry makes up for adapters used by path. Callers' names must start with a letter
# (exam.ADAPTER_NAME), so no name a caller may choose can ever equal one of these.
MADE_UP_PREFIX = "~adapter-"


def peft_name(name: str) -> str:
    """The name an adapter has inside peft: a module key. Prefixes keep registry names such as
    "a" from clashing with peft's own parameter prefixes ("lora_"), and keep made-up names and
    callers' names in separate namespaces inside peft too."""
    if name.startswith(MADE_UP_PREFIX):
        return f"golem_p_{name.removeprefix(MADE_UP_PREFIX)}"
    return f"golem_n_{name}"


class ResidentModels:
    """The bases and adapters this sidecar keeps in memory."""

    def __init__(self, security: Security, max_adapters: int = 8, max_models: int = 2) -> None:
        self._security = security
        self._max_adapters = max_adapters
        self._max_models = max_models
        # Least recently used first.
        self._bases: OrderedDict[BaseKey, ResidentBase] = OrderedDict()
        self._names = itertools.count()

    def has(self, key: BaseKey) -> bool:
        return key in self._bases

    def has_model(self, model_key: str) -> bool:
        """Whether some placement of this model is resident (read from the event loop's file
        checks too: a dict lookup, safe without a lock)."""
        return any(key.model == model_key for key in list(self._bases))

    def base(self, model: ModelRef, placement: Placement) -> tuple[ResidentBase, int]:
        """The resident base for this model and placement, loading it if needed; also returns
        the nanoseconds spent loading (0 when it was resident). Beyond limits.maxModels the
        least recently used base is dropped first, so memory holds at most that many."""
        key = BaseKey(model.key, placement)
        resident = self._bases.get(key)
        if resident is not None:
            self._bases.move_to_end(key)
            return resident, 0
        while len(self._bases) >= self._max_models:
            _, old = self._bases.popitem(last=False)
            log.info("base evicted (least recently used)", extra={"model": old.model_name})
        started = time.perf_counter_ns()
        tokenizer = load_tokenizer(model, self._security)
        loaded = load_model(model, placement, self._security)
        if loaded.generation_config.eos_token_id is None:
            loaded.generation_config.eos_token_id = tokenizer.eos_token_id
        resident = ResidentBase(model, placement, tokenizer, loaded)
        self._bases[key] = resident
        elapsed = time.perf_counter_ns() - started
        log.info(
            "base loaded",
            extra={"model": model.name, "device": placement.device, "load_ms": elapsed // 10**6},
        )
        return resident, elapsed

    def is_resident(self, base: ResidentBase) -> bool:
        return any(resident is base for resident in self._bases.values())

    def adapter(
        self,
        base: ResidentBase,
        folder: AdapterFolder,
        name: str | None = None,
        pinned: Set[str] = frozenset(),
    ) -> tuple[str, int]:
        """The name of this adapter on this base, attaching it (under ``name``, or a made-up
        one) if needed; also returns the nanoseconds spent loading it. Beyond the resident
        bound the least recently used adapter is evicted, never one in ``pinned``."""
        if name is None:
            attached = base.by_identity.get(folder.identity)
            if attached is not None:
                return self._touch(base, attached), 0
            name = f"{MADE_UP_PREFIX}{next(self._names)}"
        elif name in base.adapters:
            if base.adapters[name].identity == folder.identity:
                return self._touch(base, name), 0
            # Never swap the weights under a name callers rely on.
            raise already_exists(
                "name",
                "ADAPTER_NAME_TAKEN",
                f'"{name}" already names the adapter at "{base.adapters[name].path}" with other '
                "weights; unload it first or choose another name",
            )
        started = time.perf_counter_ns()
        log.info("adapter found", extra={"adapter": folder.path, "peft_type": folder.peft_type})
        self._attach(base, folder, name)
        base.adapters[name] = folder
        base.by_identity.setdefault(folder.identity, name)
        self._evict(base, pinned | {name})
        return self._touch(base, name), time.perf_counter_ns() - started

    def named(self, base: ResidentBase, name: str, field: str = "adapter_name") -> str:
        """A registered adapter by name; NOT_FOUND (naming the request's ``field``) when it is
        not loaded on this base."""
        if name not in base.adapters:
            raise self.not_loaded(name, base.model_name, field)
        return self._touch(base, name)

    @staticmethod
    def not_loaded(name: str, model_name: str, field: str) -> Exception:
        return not_found(
            field,
            "ADAPTER_NOT_LOADED",
            f'no adapter named "{name}" is loaded on "{model_name}" (LoadAdapter first)',
        )

    def find(self, key: BaseKey) -> ResidentBase | None:
        """The resident base for a key, without loading anything."""
        return self._bases.get(key)

    def unload(self, base: ResidentBase, name: str) -> None:
        """Detaches an adapter. Runs on the model thread between batches, so no running
        request ever loses its adapter mid-generation."""
        self.named(base, name, "name")
        folder = base.adapters.pop(name)
        if base.by_identity.get(folder.identity) == name:
            del base.by_identity[folder.identity]
        base.uses.pop(name, None)
        if base.adapters:
            base.model.delete_adapter(peft_name(name))
        else:
            # The last adapter gone: take the LoRA layers out and keep the plain base.
            base.model = base.model.unload()
        log.info("adapter unloaded", extra={"adapter": name, "path": folder.path})

    def resident(self) -> list[ResidentBase]:
        return list(self._bases.values())

    def _touch(self, base: ResidentBase, name: str) -> str:
        base.adapters.move_to_end(name)
        base.uses[name] += 1
        return name

    def _evict(self, base: ResidentBase, pinned: Set[str]) -> None:
        for name in list(base.adapters):
            if len(base.adapters) <= self._max_adapters:
                return
            if name not in pinned:
                log.info("adapter evicted (least recently used)", extra={"adapter": name})
                self.unload(base, name)

    def _attach(self, base: ResidentBase, folder: AdapterFolder, name: str) -> None:
        """Attaches the adapter, or raises ADAPTER_INCOMPATIBLE (FAILED_PRECONDITION) naming what
        differs: target modules the base lacks (checked before peft touches the base), tensors
        whose shapes differ from the base's (peft finds those while loading; the half-attached
        adapter is then undone), or, when everything fits, a base_model_name_or_path that names
        another model (the adapter is then detached again)."""
        missing = missing_targets(folder, _module_names(base.model))
        if missing:
            raise _incompatible(
                folder, base, f"it targets modules the base lacks: {', '.join(missing)}"
            )
        first = not isinstance(base.model, PeftModel)
        try:
            if first:
                base.model = PeftModel.from_pretrained(
                    base.model,
                    str(folder.resolved),
                    adapter_name=peft_name(name),
                    is_trainable=False,
                )
            else:
                base.model.load_adapter(str(folder.resolved), adapter_name=peft_name(name))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            self._undo_attach(base, name, first)
            raise _incompatible(folder, base, _what_differs(exc, peft_name(name))) from exc
        base.model.eval()
        recorded = folder.base_model_name_or_path
        if not same_base(recorded, base.model_name):
            # It fits tensor for tensor, so taking it off again leaves the base as it was.
            if first:
                base.model = base.model.unload()
            else:
                base.model.delete_adapter(peft_name(name))
            raise _incompatible(
                folder, base, f'it was trained on "{recorded}", another model than this base'
            )

    def _undo_attach(self, base: ResidentBase, name: str, first: bool) -> None:
        """Never leave a half-loaded adapter: a failed first attach may have injected layers into
        the base itself, so that base is dropped and reloaded on next use."""
        if first:
            self._bases.pop(base.key, None)
        elif peft_name(name) in base.model.peft_config:
            base.model.delete_adapter(peft_name(name))


# Suffixes that name a file format or a quantization of the same weights, not another model.
_SAME_WEIGHTS_SUFFIX = re.compile(r"(\.gguf|\.safetensors)$|[.-](q\d(_[a-z0-9]+)*|f16|f32|bf16)$")


def same_base(recorded: str, model_name: str) -> bool:
    """Whether the base an adapter records is this model. Only the last path component counts,
    without format or quantization suffixes: "org/SmolLM2-135M-Instruct" is the same model as
    "models/SmolLM2-135M-Instruct.Q4_1.gguf", since adapters move between machines and formats.
    An adapter that records nothing is given the benefit of the doubt."""

    def stem(name: str) -> str:
        last = name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
        while True:
            shorter = _SAME_WEIGHTS_SUFFIX.sub("", last)
            if shorter == last:
                return last
            last = shorter

    return not recorded.strip() or stem(recorded) == stem(model_name)


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
