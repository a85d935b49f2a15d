"""Turning LoadAdapter and UnloadAdapter requests into checked requests, through the same gate
as every other RPC: the adapter name, the adapter folder and the base model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from golem_sidecar.adapters import AdapterFolder
from golem_sidecar.config import SidecarConfig
from golem_sidecar.exam import check_adapter_name
from golem_sidecar.gate import ModelRef, resolve_adapter, resolve_model
from golem_sidecar.gen import exam_pb2
from golem_sidecar.models import MADE_UP_PREFIX
from golem_sidecar.placement import Placement, default_placement


@dataclass(frozen=True)
class LoadSpec:
    name: str
    folder: AdapterFolder
    model: ModelRef
    placement: Placement


@dataclass(frozen=True)
class UnloadSpec:
    name: str
    model: ModelRef
    placement: Placement


def _base(
    request: exam_pb2.LoadAdapterRequest | exam_pb2.UnloadAdapterRequest,
    config: SidecarConfig,
    is_resident: Callable[[str], bool],
) -> tuple[ModelRef, Placement]:
    """The named base (else the default model), at the default placement."""
    defaults = config.defaults
    name = request.model_name if request.HasField("model_name") else defaults.model_name
    model = resolve_model("model_name", name, config.security, is_resident)
    placement = default_placement(defaults)
    return model, placement


def resolve_load(
    request: exam_pb2.LoadAdapterRequest,
    config: SidecarConfig,
    is_resident: Callable[[str], bool],
) -> LoadSpec:
    name = check_adapter_name("name", request.name)
    folder = resolve_adapter("adapter_path", request.adapter_path, config.security)
    return LoadSpec(name, folder, *_base(request, config, is_resident))


def resolve_unload(
    request: exam_pb2.UnloadAdapterRequest,
    config: SidecarConfig,
    is_resident: Callable[[str], bool],
) -> UnloadSpec:
    # An adapter attached by path (a made-up name from ListAdapters) may be unloaded too.
    name = request.name
    if not (name.startswith(MADE_UP_PREFIX) and name.removeprefix(MADE_UP_PREFIX).isdigit()):
        check_adapter_name("name", name)
    return UnloadSpec(name, *_base(request, config, is_resident))
