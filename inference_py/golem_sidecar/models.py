"""Resident bases and adapters: each base is loaded once per placement and keeps the adapters
attached to it, so a repeated request loads nothing.

peft holds one tuner type per wrapped model, so a base keeps one peft wrapper per adapter type
(LoRA, IA3, LoHa, ...). Each wrapper is built on its own copy of the base's module tree that
shares every weight tensor with the base (no weight is copied): the cost of a further type is
its adapters' weights and the module objects of one more tree. The base itself never has peft
layers injected, so bare rows run on it untouched. lanes.py says which wrapper serves a row.

Only the model worker thread (see engine.py) calls into this module, so it needs no locks.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from golem_sidecar.adapters import AdapterFolder, missing_targets, refuse_on_4bit
from golem_sidecar.bnb_state import as_loaded
from golem_sidecar.config import Security
from golem_sidecar.errors import GolemError, already_exists, failed_precondition, not_found
from golem_sidecar.gate import ModelRef
from golem_sidecar.lanes import Lane
from golem_sidecar.loading import load_model, load_tokenizer, memory_footprint_bytes
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
    # The bare base: peft layers are never injected into it.
    model: Any
    # Adapter type ("LORA", "IA3", ...) -> the peft wrapper holding that type's adapters, on a
    # module tree of its own that shares the base's weights.
    wrappers: dict[str, PeftModel] = field(default_factory=dict)
    # Adapter name -> its folder, least recently used first.
    adapters: OrderedDict[str, AdapterFolder] = field(default_factory=OrderedDict)
    # Weights identity -> adapter name, so every spelling of a folder names one adapter.
    by_identity: dict[tuple[str, int, int], str] = field(default_factory=dict)
    uses: Counter[str] = field(default_factory=Counter)
    # footprint_bytes() as of the last load, attach or detach: what a metrics scrape reads,
    # since counting afresh walks every tensor and belongs on the model thread.
    memory_bytes: int = 0

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
    def weight_dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def wrapper_of(self, adapter: str) -> PeftModel:
        """The wrapper holding a peft adapter name."""
        return next(w for w in self.wrappers.values() if adapter in w.peft_config)

    def lane(self, adapter: str | None) -> Lane:
        """How a row wearing this peft adapter (None: the bare base) is served (lanes.py)."""
        if adapter is None:
            return Lane(self.model)
        wrapper = self.wrapper_of(adapter)
        if routable(wrapper.peft_config[adapter]):
            return Lane(wrapper, routed=True)
        return Lane(wrapper, active=adapter)

    def footprint_bytes(self) -> int:
        """Bytes its tensors hold now: the base's and its adapters' (loading.py)."""
        return memory_footprint_bytes(self.model, *self.wrappers.values())

    @property
    def context_limit(self) -> int | None:
        """The most tokens a prompt and its answer may hold together, when the model says."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return limit if isinstance(limit, int) else None


def routable(config: Any) -> bool:
    """Whether peft can route single rows of a batch to this adapter (``adapter_names``): plain
    LoRA and rsLoRA can; DoRA and the other tuner types cannot."""
    # PeftType is a str enum, so it equals its name.
    return bool(config.peft_type == "LORA" and not getattr(config, "use_dora", False))


def sharing_weights(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of the model's module tree whose parameters and buffers are the original's own
    tensors: peft may inject layers into the copy without touching the original, and no weight
    is duplicated (tied weights stay tied, 4-bit weights keep their quantization state)."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


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
            self._release(old)
        started = time.perf_counter_ns()
        resident = self._load(model, placement)
        resident.memory_bytes = resident.footprint_bytes()
        self._bases[key] = resident
        elapsed = time.perf_counter_ns() - started
        log.info(
            "base loaded",
            extra={"model": model.name, "device": placement.device, "load_ms": elapsed // 10**6},
        )
        return resident, elapsed

    def _load(self, model: ModelRef, placement: Placement) -> ResidentBase:
        """Loads a base: the engine's own part of ``base`` (vllm_engine.py has another)."""
        tokenizer = load_tokenizer(model, self._security)
        loaded = load_model(model, placement, self._security)
        if loaded.generation_config.eos_token_id is None:
            loaded.generation_config.eos_token_id = tokenizer.eos_token_id
        return ResidentBase(model, placement, tokenizer, loaded)

    def _release(self, base: ResidentBase) -> None:
        """Frees an evicted base beyond dropping it: nothing to do here, the garbage collector
        frees its tensors."""

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
        base.memory_bytes = base.footprint_bytes()
        return self._touch(base, name), time.perf_counter_ns() - started

    def named(self, base: ResidentBase, name: str, field: str = "adapter_name") -> str:
        """A registered adapter by name; NOT_FOUND (naming the request's ``field``) when it is
        not loaded on this base."""
        if name not in base.adapters:
            raise self.not_loaded(name, base.model_name, field)
        return self._touch(base, name)

    def wear(
        self,
        base: ResidentBase,
        folder: AdapterFolder | None,
        registered: str | None,
        pinned: Set[str],
        field: str = "adapters",
    ) -> str | None:
        """The name on ``base`` of an adapter a caller gave as a registered name or a folder
        (CompareAdapters, GradeExam), attaching a folder if needed without evicting ``pinned``;
        None for the bare base (neither given)."""
        if registered is not None:
            return self.named(base, registered, field)
        if folder is None:
            return None
        name, _ = self.adapter(base, folder, pinned=pinned)
        return name

    @staticmethod
    def not_loaded(name: str, model_name: str, field: str) -> Exception:
        return not_found(
            field,
            "ADAPTER_NOT_LOADED",
            f'no adapter named "{name}" is loaded on "{model_name}" (LoadAdapter first)',
        )

    def load_named(
        self, model: ModelRef, placement: Placement, folder: AdapterFolder, name: str
    ) -> tuple[ResidentBase, str, int]:
        """LoadAdapter: the base (loaded if needed), the adapter attached under ``name``, and
        the nanoseconds both loads took."""
        base, base_ns = self.base(model, placement)
        attached, load_ns = self.adapter(base, folder, name=name)
        return base, attached, base_ns + load_ns

    def unload_named(self, model: ModelRef, placement: Placement, name: str) -> ResidentBase:
        """UnloadAdapter: NOT_FOUND when the base or the name is not resident; the base."""
        base = self.find(BaseKey(model.key, placement))
        if base is None:
            raise self.not_loaded(name, model.name, "name")
        self.unload(base, name)
        return base

    def listing(self) -> list[tuple[ResidentBase, str, AdapterFolder, int]]:
        """ListAdapters: every resident adapter with its base, name, folder and uses."""
        return [
            (base, name, folder, base.uses[name])
            for base in self.resident()
            for name, folder in base.adapters.items()
        ]

    def registered(self, model: ModelRef, placement: Placement, name: str) -> AdapterFolder:
        """The folder of an adapter registered under ``name``; NOT_FOUND naming "adapters" when
        it is not, or its base is not resident. Loads nothing."""
        base = self.find(BaseKey(model.key, placement))
        if base is None:
            raise self.not_loaded(name, model.name, "adapters")
        return base.adapters[self.named(base, name, "adapters")]

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
        self._detach(base, name)
        base.memory_bytes = base.footprint_bytes()
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
        """Attaches the adapter to its type's wrapper (made on first use), or raises
        ADAPTER_INCOMPATIBLE (FAILED_PRECONDITION) naming what differs: target modules the base
        lacks (checked before peft touches anything), tensors whose shapes differ from the
        base's (peft finds those while loading; the half-attached adapter is then undone), or,
        when everything fits, a base_model_name_or_path that names another model (the adapter
        is then detached again). The bare base is never touched, whatever fails."""
        if base.placement.load_in_4bit:
            refuse_on_4bit(folder, base.model_name)
        missing = missing_targets(folder, _module_names(base.model))
        if missing:
            raise _incompatible(
                folder, base, f"it targets modules the base lacks: {', '.join(missing)}"
            )
        adapter = peft_name(name)
        with as_loaded(base.model):
            self._attach_checked(base, folder, adapter)

    def _detach(self, base: ResidentBase, name: str) -> None:
        with as_loaded(base.model):
            _detach(base, peft_name(name))

    def _attach_checked(self, base: ResidentBase, folder: AdapterFolder, adapter: str) -> None:
        wrapper = base.wrappers.get(folder.peft_type)
        try:
            if wrapper is None:
                wrapper = PeftModel.from_pretrained(
                    sharing_weights(base.model),
                    str(folder.resolved),
                    adapter_name=adapter,
                    is_trainable=False,
                )
                base.wrappers[folder.peft_type] = wrapper
            else:
                wrapper.load_adapter(str(folder.resolved), adapter_name=adapter, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            if wrapper is not None and adapter in wrapper.peft_config:
                _detach(base, adapter)
            raise _incompatible(folder, base, _what_differs(exc, adapter)) from exc
        wrapper.eval()
        recorded = folder.base_model_name_or_path
        if not same_base(recorded, base.model_name):
            # It fits tensor for tensor, so taking it off again leaves the wrapper as it was.
            _detach(base, adapter)
            raise _incompatible(
                folder, base, f'it was trained on "{recorded}", another model than this base'
            )


def _detach(base: ResidentBase, adapter: str) -> None:
    """Takes a peft adapter off its wrapper; a wrapper left with none is dropped whole (its
    module tree goes, the shared weights stay with the base)."""
    for kind, wrapper in list(base.wrappers.items()):
        if adapter not in wrapper.peft_config:
            continue
        if len(wrapper.peft_config) == 1:
            del base.wrappers[kind]
        else:
            wrapper.delete_adapter(adapter)


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
    return [module_name for module_name, _ in model.named_modules()]


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
