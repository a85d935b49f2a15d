"""Loading details: GGUF special tokens, pickle refusal, the sidecar process's exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import grpc
import pytest
from transformers import AutoTokenizer

from golem_sidecar.config import Security
from golem_sidecar.errors import GolemError
from golem_sidecar.gate import ModelRef
from golem_sidecar.loading import _fill_special_tokens_from_gguf, load_model, load_tokenizer
from golem_sidecar.placement import Placement
from tests.bad_inputs import build_remote_code_model
from tests.tiny_models import local_model

CPU = Placement(device="cpu", dtype="float32", load_in_4bit=False)


def _metadata_only_gguf(path: Path, eos: int, bos: int) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_eos_token_id(eos)
    writer.add_bos_token_id(bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_special_tokens_are_taken_from_gguf_metadata(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    eos_id = tokenizer.eos_token_id
    tokenizer.eos_token = None
    assert tokenizer.eos_token is None and tokenizer.bos_token is None
    bos_id = tokenizer.convert_tokens_to_ids("Ġgenre")
    _fill_special_tokens_from_gguf(
        tokenizer, _metadata_only_gguf(tmp_path / "m.gguf", eos_id, bos_id)
    )
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id) == (eos_id, bos_id)


def test_pickle_only_model_folder_is_refused(tiny: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for item in Path(tiny["model"]).iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(GolemError) as info:
        load_model(local_model(folder), CPU, Security())
    assert (info.value.code, info.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_PICKLE_REFUSED",
    )


def _run_sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "golem_sidecar", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_sidecar_exits_2_on_a_bad_config() -> None:
    done = _run_sidecar("--config-json", json.dumps({"defaults": {"maxNewTokens": "many"}}))
    assert done.returncode == 2
    assert "defaults.maxNewTokens" in done.stderr


def test_sidecar_exits_1_when_the_default_model_cannot_load(tmp_path: Path) -> None:
    config = {"defaults": {"modelName": str(tmp_path / "missing"), "device": "cpu"}}
    done = _run_sidecar("--config-json", json.dumps(config))
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(line.get("reason") == "MODEL_NOT_FOUND" for line in lines)


def _refused(fn: Callable[[], object]) -> GolemError:
    with pytest.raises(GolemError) as info:
        fn()
    return info.value


def test_model_code_shipped_with_a_model_is_never_run(tiny: dict[str, str], tmp_path: Path) -> None:
    folder, marker = build_remote_code_model(tiny["model"], tmp_path / "custom")
    load_tokenizer(local_model(folder), Security())  # its tokenizer is a plain one: it loads
    err = _refused(lambda: load_model(local_model(folder), CPU, Security()))
    assert (err.code, err.reason, err.field) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_REMOTE_CODE_REFUSED",
        "model_name",
    )
    assert "security.trustRemoteCode" in err.message
    assert not marker.exists(), "the model's own code ran"


def test_a_known_architecture_with_an_auto_map_loads_without_its_code(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    folder, marker = build_remote_code_model(tiny["model"], tmp_path / "llama_with_code")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    model = load_model(local_model(folder), CPU, Security())
    assert type(model).__module__.startswith("transformers.models.llama")
    assert not marker.exists(), "the model's own code ran"


def test_the_marker_shows_when_remote_code_does_run(tiny: dict[str, str], tmp_path: Path) -> None:
    """The control for the two tests above: trusted, the same folder does run its code (in a
    child process, so the dynamic module stays out of this one)."""
    folder, marker = build_remote_code_model(tiny["model"], tmp_path / "trusted")
    script = (
        "import sys\n"
        "from golem_sidecar.config import Security\n"
        "from golem_sidecar.gate import ModelRef\n"
        "from golem_sidecar.loading import load_model\n"
        "from golem_sidecar.placement import Placement\n"
        "load_model(ModelRef(sys.argv[1], sys.argv[1]), Placement('cpu', 'float32', False), "
        "Security(trust_remote_code=True))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder.resolve())],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.exists()


def test_hub_ids_are_looked_up_offline_without_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    err = _refused(
        lambda: load_tokenizer(
            ModelRef("golem-test/not-cached", "golem-test/not-cached"), Security()
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert attempts == []
