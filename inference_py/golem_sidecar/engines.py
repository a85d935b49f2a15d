"""Which engine serves a base: the config's ``engines`` (``default``, and ``models`` by name)
decides per model, and every call goes to that engine through one interface (ExamEngine's).
The vLLM engine is made only when the config names it, so vLLM is never imported otherwise."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.comparison import ComparedAnswer, CompareSpec
from golem_sidecar.config import SidecarConfig
from golem_sidecar.engine import ExamEngine, Pair
from golem_sidecar.environment import TRANSFORMERS, VLLM
from golem_sidecar.exam import ExamSpec
from golem_sidecar.gate import ModelRef, resolve_model
from golem_sidecar.metrics import EngineLoad, SidecarMetrics
from golem_sidecar.models import ResidentBase
from golem_sidecar.placement import Placement
from golem_sidecar.registry import LoadSpec, UnloadSpec
from golem_sidecar.scoring import Loglikelihood
from golem_sidecar.session import ExamResult


class Engines:
    """The engines a sidecar runs, one per kind the config uses, behind ExamEngine's methods."""

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics) -> None:
        self._config = config
        self._engines: dict[str, Any] = {TRANSFORMERS: ExamEngine(config, metrics)}
        if config.engines.uses_vllm:
            from golem_sidecar.vllm_engine import VllmEngine

            self._engines[VLLM] = VllmEngine(config, metrics)

    def by_kind(self, kind: str) -> Any:
        """The engine of one kind ("transformers", "vllm"); KeyError when the config uses none."""
        return self._engines[kind]

    def engine_for(self, model: ModelRef) -> Any:
        return self._engines[self._config.engines.engine_for(model.name, model.key)]

    def is_resident(self, model_key: str) -> bool:
        return any(engine.is_resident(model_key) for engine in self._engines.values())

    async def take_exam(
        self,
        spec: ExamSpec,
        cancelled: threading.Event,
        on_text: Callable[[str], None] | None = None,
    ) -> ExamResult:
        result: ExamResult = await self.engine_for(spec.model).take_exam(spec, cancelled, on_text)
        return result

    async def compare(
        self, spec: CompareSpec, cancelled: threading.Event
    ) -> list[list[ComparedAnswer]]:
        table: list[list[ComparedAnswer]] = await self.engine_for(spec.model).compare(
            spec, cancelled
        )
        return table

    async def loglikelihoods(
        self,
        model: ModelRef,
        placement: Placement,
        pairs: list[Pair],
        cancelled: threading.Event,
    ) -> list[Loglikelihood]:
        scores: list[Loglikelihood] = await self.engine_for(model).loglikelihoods(
            model, placement, pairs, cancelled
        )
        return scores

    async def load_adapter(self, spec: LoadSpec) -> tuple[ResidentBase, str, int]:
        loaded: tuple[ResidentBase, str, int] = await self.engine_for(spec.model).load_adapter(spec)
        return loaded

    async def unload_adapter(self, spec: UnloadSpec) -> None:
        await self.engine_for(spec.model).unload_adapter(spec)

    async def list_adapters(self) -> list[tuple[ResidentBase, str, AdapterFolder, int]]:
        listed: list[tuple[ResidentBase, str, AdapterFolder, int]] = []
        for engine in self._engines.values():
            listed.extend(await engine.list_adapters())
        return listed

    async def list_models(self) -> list[tuple[ResidentBase, int]]:
        listed: list[tuple[ResidentBase, int]] = []
        for engine in self._engines.values():
            listed.extend(await engine.list_models())
        return listed

    async def base_info(self, model: ModelRef, placement: Placement) -> tuple[str, str]:
        info: tuple[str, str] = await self.engine_for(model).base_info(model, placement)
        return info

    async def registered_folder(
        self, model: ModelRef, placement: Placement, name: str
    ) -> AdapterFolder:
        folder: AdapterFolder = await self.engine_for(model).registered_folder(
            model, placement, name
        )
        return folder

    def load(self) -> EngineLoad:
        loads = [engine.load() for engine in self._engines.values()]
        return EngineLoad(
            waiting=sum(load.waiting for load in loads),
            running=sum(load.running for load in loads),
            cache_tokens=sum(load.cache_tokens for load in loads),
            queues=tuple(q for load in loads for q in load.queues),
            models=tuple(m for load in loads for m in load.models),
            adapters=tuple(a for load in loads for a in load.adapters),
            waiting_adapters=tuple(w for load in loads for w in load.waiting_adapters),
        )

    async def preload(self) -> None:
        """The default base, in the engine that serves it."""
        defaults, security = self._config.defaults, self._config.security
        model = resolve_model("model_name", defaults.model_name, security, self.is_resident)
        await self.engine_for(model).preload()

    async def close(self) -> None:
        for engine in self._engines.values():
            await engine.close()

    async def wait_idle(self, timeout_s: float) -> bool:
        idle = True
        for engine in self._engines.values():
            idle = await engine.wait_idle(timeout_s) and idle
        return idle
