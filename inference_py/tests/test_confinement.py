"""security.adapterRoots / modelRoots: parsing, the default beyond loopback, and which model
names are paths that the roots confine."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from golem_sidecar.config import (
    ConfigError,
    Security,
    SidecarConfig,
    confined_beyond_loopback,
    is_loopback,
    parse_config,
)
from golem_sidecar.errors import GolemError
from golem_sidecar.paths import confine_model_name, is_hub_id
from golem_sidecar.server import Sidecar


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50052", True),
        ("127.8.9.10:1", True),
        ("localhost:50052", True),
        ("LOCALHOST:1", True),
        ("[::1]:50052", True),
        ("unix:/tmp/golem.sock", True),
        ("unix:///tmp/golem.sock", True),
        ("0.0.0.0:50052", False),
        ("[::]:50052", False),
        ("10.1.2.3:50052", False),
        ("example.com:50052", False),
        (":50052", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_roots_default_to_models_and_exams_beyond_loopback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        config = confined_beyond_loopback(SidecarConfig(listen="0.0.0.0:50052"))
    models = Path("models").resolve()
    assert config.security.adapter_roots == (models,)
    assert config.security.model_roots == (models,)
    assert config.security.exam_roots == (Path("data/exams").resolve(),)
    assert "confining all three" in caplog.text


def test_roots_stay_as_set_on_loopback_or_when_given() -> None:
    assert confined_beyond_loopback(SidecarConfig()).security == Security()
    own = Security(model_roots=(Path("/srv/models"),))
    config = confined_beyond_loopback(SidecarConfig(listen="0.0.0.0:1", security=own))
    assert config.security == own, "one list set is a deliberate choice: nothing is added"


async def test_a_sidecar_listening_beyond_loopback_is_confined() -> None:
    sidecar = Sidecar(SidecarConfig(listen="0.0.0.0:0", preload=False))
    try:
        assert sidecar.config.security.adapter_roots == (Path("models").resolve(),)
    finally:
        await sidecar.stop(0)


def test_roots_are_parsed_and_resolved(tmp_path: Path) -> None:
    raw = {"security": {"adapterRoots": [str(tmp_path / "a" / ".." / "b")], "modelRoots": []}}
    security = parse_config(raw).security
    assert security.adapter_roots == ((tmp_path / "b").resolve(),)
    assert security.model_roots == ()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"security": {"adapterRoots": "models"}}, "security.adapterRoots"),
        ({"security": {"modelRoots": [1]}}, "security.modelRoots"),
        ({"security": {"modelRoots": [" "]}}, "security.modelRoots"),
        ({"limits": {"shutdownGraceMs": -1}}, "limits.shutdownGraceMs"),
        ({"limits": {"shutdownGraceMs": 1.5}}, "limits.shutdownGraceMs"),
        ({"limits": {"maxMessageBytes": 100}}, "limits.maxMessageBytes"),
        ({"limits": {"maxMessageBytes": 2**31}}, "limits.maxMessageBytes"),
    ],
)
def test_bad_limits_and_roots_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(raw)


def test_limits_defaults() -> None:
    limits = parse_config({}).limits
    assert (limits.shutdown_grace_ms, limits.max_message_bytes) == (10_000, 1_048_576)


@pytest.mark.parametrize(
    ("name", "hub"),
    [
        ("distilgpt2", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("models/smollm2/m.gguf", False),
        ("m.gguf", False),
        ("./m", False),
        ("~/m", False),
        ("/abs/m", False),
        ("a/../b", False),
        ("a/b/c", False),
        ("not a model", False),
        ("x" * 97, False),
    ],
)
def test_hub_ids(name: str, hub: bool) -> None:
    assert is_hub_id(name) is hub


def _denied(name: str, roots: tuple[Path, ...]) -> GolemError:
    with pytest.raises(GolemError) as info:
        confine_model_name(name, roots)
    assert (info.value.code, info.value.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PATH_OUTSIDE_ROOTS",
    )
    assert info.value.field == "model_name"
    return info.value


def test_model_names_under_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    roots = (root.resolve(),)
    monkeypatch.chdir(tmp_path)
    confine_model_name(str(root / "m"), roots)
    confine_model_name("models/m", roots)  # hub-shaped, but a folder inside the roots
    confine_model_name("models/m/../m", roots)
    confine_model_name("golem-test/not-cached", roots)  # a hub id: not a path at all
    confine_model_name("anything/at-all", ())  # no roots: no confinement
    _denied(str(tmp_path / "elsewhere"), roots)
    _denied("models/m/../../elsewhere", roots)
    _denied("models/out", roots)
    _denied(str(tmp_path / "missing.gguf"), roots)
    _denied("/no/such/folder", roots)
    # Hub-shaped, but transformers would read the local folder of that name: confined too.
    assert "elsewhere" in _denied("elsewhere", roots).message
