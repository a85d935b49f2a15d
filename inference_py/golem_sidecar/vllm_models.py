"""The bases and LoRA adapters of the vLLM engine (vllm_engine.py): the same registry as the
transformers engine's (models.ResidentModels: names, identities, least-recently-used eviction,
maxModels and maxAdapters), with a vLLM ``AsyncLLM`` as each base's model.

vLLM is imported only here and only when a base is loaded, so a sidecar that serves no model
with ``engine: "vllm"`` never imports it (its environment need not have it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from golem_sidecar.adapters import AdapterFolder, missing_targets
from golem_sidecar.config import Security, VllmSettings
from golem_sidecar.decoding import end_ids
from golem_sidecar.errors import failed_precondition
from golem_sidecar.gate import ModelRef
from golem_sidecar.loading import (
    check_no_pickle_only,
    load_refusal,
    load_tokenizer,
    save_dequantized_gguf,
)
from golem_sidecar.models import ResidentBase, ResidentModels, _incompatible, same_base
from golem_sidecar.placement import Placement, quantization_failed

log = logging.getLogger(__name__)

# The engine core runs in a process of its own. Forking this one (grpc's threads, an asyncio
# loop) is unsafe, so it is spawned; the sidecar's entry point has the __main__ guard that needs.
_SPAWN = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


@dataclass(eq=False)
class VllmBase(ResidentBase):
    """A base served by vLLM: ``model`` is its AsyncLLM. Adapters are LoRA requests by id."""

    # The safetensors folder vLLM reads (a .gguf base is exported to one, see export_folder).
    folder: Path = Path()
    max_model_len: int = 0
    module_names: frozenset[str] = frozenset()
    eos: frozenset[int] = frozenset()
    weights_bytes: int = 0
    # Adapter name -> the LoRA id vLLM knows it by.
    lora_ids: dict[str, int] = field(default_factory=dict)
    # Registered here and not yet added to the engine; ids removed here and not yet from it
    # (the engine's calls are async, the registry's are not: vllm_engine.py syncs them).
    to_add: list[str] = field(default_factory=list)
    to_remove: list[int] = field(default_factory=list)

    @property
    def input_device(self) -> Any:
        return self.placement.device

    @property
    def weight_dtype(self) -> str:
        return self.placement.dtype

    @property
    def context_limit(self) -> int | None:
        return self.max_model_len

    def footprint_bytes(self) -> int:
        """The weights' bytes on disk, the base's and its adapters': vLLM's process holds them
        (its KV cache, sized by vllm.kvCacheGiB or gpuMemoryUtilization, comes on top)."""
        adapters = sum(_weights_size(folder.resolved) for folder in self.adapters.values())
        return self.weights_bytes + adapters

    def lane(self, adapter: str | None) -> Any:
        raise NotImplementedError("a vLLM base decodes in vLLM's engine, not in golem's lanes")


class VllmModels(ResidentModels):
    """ResidentModels whose bases load into vLLM and whose adapters are LoRA requests."""

    def __init__(
        self,
        security: Security,
        settings: VllmSettings,
        max_adapters: int = 8,
        max_models: int = 2,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__(security, max_adapters, max_models)
        self._settings = settings
        self._cache = cache_dir or default_cache_dir()
        self._lora_ids = itertools.count(1)

    def _load(self, model: ModelRef, placement: Placement) -> ResidentBase:
        _check_placement(placement)
        folder = export_folder(model, self._security, self._cache)
        # The transformers engine's refusals, with the same reasons: vLLM would say INTERNAL.
        check_no_pickle_only(str(folder), self._security)
        tokenizer = load_tokenizer(model, self._security)
        try:
            llm = self._engine(folder, placement)
        except Exception as exc:
            refusal = load_refusal(model.name, exc, placement)
            if refusal is None:
                raise
            raise refusal from exc
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        return VllmBase(
            model,
            placement,
            tokenizer,
            llm,
            folder=folder,
            max_model_len=int(llm.model_config.max_model_len),
            module_names=_module_names(folder),
            eos=frozenset(_eos_ids(folder, tokenizer)),
            weights_bytes=weights,
        )

    def _engine(self, folder: Path, placement: Placement) -> Any:
        settings = self._settings
        _prepare_environment(settings, placement)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(folder),
            dtype=placement.dtype,
            trust_remote_code=self._security.trust_remote_code,
            # Safetensors only, as everywhere in golem.
            load_format="safetensors",
            enable_lora=True,
            max_loras=self._max_adapters,
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len or None,
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            distributed_executor_backend=settings.distributed_executor_backend or None,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            quantization="bitsandbytes" if placement.load_in_4bit else None,
            # Seeds are per request (SamplingParams.seed); this one only fixes the rest.
            seed=0,
        )
        return AsyncLLM.from_engine_args(args)

    def _release(self, base: ResidentBase) -> None:
        # An evicted base's engine process must end with it, or its memory stays taken.
        base.model.shutdown()

    def _attach(self, base: ResidentBase, folder: AdapterFolder, name: str) -> None:
        assert isinstance(base, VllmBase)
        if folder.peft_type != "LORA":
            raise failed_precondition(
                "adapter_path",
                "ADAPTER_TYPE_UNSUPPORTED",
                f'"{folder.path}" is a {folder.peft_type} adapter; the vllm engine serves LoRA '
                'adapters only (serve this base with engine "transformers" for other types)',
            )
        missing = missing_targets(folder, base.module_names)
        if missing:
            raise _incompatible(
                folder, base, f"it targets modules the base lacks: {', '.join(missing)}"
            )
        rank = _lora_rank(folder)
        if rank > self._settings.max_lora_rank:
            raise _incompatible(
                folder,
                base,
                f"its rank r={rank} is above vllm.maxLoraRank ({self._settings.max_lora_rank})",
            )
        recorded = folder.base_model_name_or_path
        if not same_base(recorded, base.model_name):
            raise _incompatible(
                folder, base, f'it was trained on "{recorded}", another model than this base'
            )
        base.lora_ids[name] = next(self._lora_ids)
        base.to_add.append(name)

    def _detach(self, base: ResidentBase, name: str) -> None:
        assert isinstance(base, VllmBase)
        lora_id = base.lora_ids.pop(name, None)
        if name in base.to_add:
            base.to_add.remove(name)
        elif lora_id is not None:
            base.to_remove.append(lora_id)

    def close(self) -> None:
        for base in self.resident():
            self._release(base)


def default_cache_dir() -> Path:
    """Where exported .gguf bases go: $GOLEM_CACHE_DIR/vllm, else golem/vllm under
    $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get("GOLEM_CACHE_DIR"):
        return Path(os.environ["GOLEM_CACHE_DIR"]) / "vllm"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "golem" / "vllm"


def export_folder(model: ModelRef, security: Security, cache: Path) -> Path:
    """The safetensors folder vLLM loads. A local folder is used as it is. A .gguf file is
    dequantized once to float32 safetensors (vLLM's own GGUF loader takes no LoRA) in a cache
    folder keyed by the file's path, size and modification time, written whole or not at all."""
    if not model.key.endswith(".gguf"):
        return Path(model.key)
    source = Path(model.key)
    stat = source.stat()
    digest = hashlib.sha256(f"{model.key}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache / f"{source.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".export-", dir=cache))
    try:
        save_dequantized_gguf(str(source.parent), {"gguf_file": source.name}, security, partial)
        load_tokenizer(model, security).save_pretrained(str(partial))
        partial.rename(target)
    except OSError:
        # Another sidecar exported it first (rename onto a full folder fails): use theirs.
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("gguf exported for vllm", extra={"model": model.name, "folder": str(target)})
    return target


def _check_placement(placement: Placement) -> None:
    """4-bit through vLLM is bitsandbytes on CUDA; the CPU build has no such kernels."""
    if placement.load_in_4bit and not placement.device.startswith("cuda"):
        raise quantization_failed(
            placement.device, "the vllm engine quantizes to 4 bit (bitsandbytes) on CUDA only"
        )
    wanted = "cuda" if placement.device.startswith("cuda") else placement.device
    platform = _platform()
    if wanted != platform:
        raise failed_precondition(
            "device",
            "DEVICE_UNAVAILABLE",
            f'the vllm engine installed here runs on "{platform}", not on "{placement.device}"',
        )


def _platform() -> str:
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def _prepare_environment(settings: VllmSettings, placement: Placement) -> None:
    """vLLM reads these when its engine starts; values already set by the operator win."""
    for key, value in _SPAWN.items():
        os.environ.setdefault(key, value)
    if placement.device == "cpu":
        cores = sorted(os.sched_getaffinity(0))
        # vLLM's CPU default binds one core less than there are and reserves one for itself;
        # on a small machine that halves the compute. All of this process's cores, none kept.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))


def _module_names(folder: Path) -> frozenset[str]:
    """The base's module names, from its weight names (``model.layers.0.mlp.up_proj.weight``
    -> ``model.layers.0.mlp.up_proj`` and every prefix), for the adapter's target check."""
    names: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        for key in _safetensors_keys(shard):
            parts = key.split(".")[:-1]
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(names)


def _safetensors_keys(path: Path) -> list[str]:
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return [key for key in header if key != "__metadata__"]


def _eos_ids(folder: Path, tokenizer: Any) -> set[int]:
    """The ids that end an answer, as decoding.eos_ids reads them: the generation config's,
    else the tokenizer's eos."""
    config = folder / "generation_config.json"
    configured = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
    return end_ids(configured, tokenizer)


def _lora_rank(folder: AdapterFolder) -> int:
    config = json.loads((folder.resolved / "adapter_config.json").read_text())
    ranks = [
        int(config.get("r", 8)),
        *(int(r) for r in (config.get("rank_pattern") or {}).values()),
    ]
    return max(ranks)


def _weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
