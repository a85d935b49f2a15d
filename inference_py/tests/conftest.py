"""Fixtures: tiny real models built offline once per session, and a real sidecar serving them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from golem_sidecar.config import Defaults, EngineChoice, Limits, QuantizationDefault, SidecarConfig
from golem_sidecar.gen import exam_pb2_grpc
from golem_sidecar.server import Sidecar
from tests.bad_inputs import build_bad_inputs
from tests.peft_kinds import build_kinds
from tests.tiny_models import build_all

CAP = 64
# The engine the shared sidecars serve with: "vllm" runs suites written for the transformers
# engine (the bad-input matrix) on the vLLM engine, in its environment (make test-vllm).
ENGINE = os.environ.get("GOLEM_TEST_ENGINE", "transformers")
ENGINES = EngineChoice(default=ENGINE)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of a tiny Llama (model), and two LoRA adapters for it (adapter, adapter_b)."""
    return build_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def bad(tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Broken, foreign and root-escaping models and adapters (see tests/bad_inputs.py)."""
    return build_bad_inputs(tiny, tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="session")
def kinds(tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One adapter folder per served PEFT type for the tiny model, by kind name (peft_kinds.py)."""
    return build_kinds(Path(tiny["model"]), tmp_path_factory.mktemp("kinds"))


def tiny_config(
    tiny: dict[str, str], listen: str = "127.0.0.1:0", **overrides: object
) -> SidecarConfig:
    defaults = Defaults(
        model_name=tiny["model"],
        adapter_path=tiny["adapter"],
        max_new_tokens=8,
        device="cpu",
        quantization=QuantizationDefault(mode="auto"),
    )
    overrides.setdefault("engines", ENGINES)
    return SidecarConfig(
        listen=listen,
        defaults=defaults,
        limits=Limits(max_new_tokens_cap=CAP),
        **overrides,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def serving(config: SidecarConfig) -> AsyncIterator[exam_pb2_grpc.ExamServiceStub]:
    """A real sidecar of its own for ``config``, in this process on a free loopback port, and a
    stub to call it; stopped on leaving."""
    server = Sidecar(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield exam_pb2_grpc.ExamServiceStub(channel)
    finally:
        await server.stop(0)


@pytest_asyncio.fixture(scope="session")
async def sidecar(tiny: dict[str, str]) -> AsyncIterator[Sidecar]:
    """A real sidecar on the tiny model, started in this process on a free loopback port."""
    server = Sidecar(tiny_config(tiny))
    await server.start()
    yield server
    await server.stop(0)


@pytest_asyncio.fixture(scope="session")
async def channel(sidecar: Sidecar) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> exam_pb2_grpc.ExamServiceStub:
    return exam_pb2_grpc.ExamServiceStub(channel)


REPO = Path(__file__).resolve().parents[2]
