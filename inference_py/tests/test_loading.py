"""Loading details: GGUF special tokens, pickle refusal, the sidecar process's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import grpc
import pytest
from transformers import AutoTokenizer

from golem_sidecar.config import Security
from golem_sidecar.errors import GolemError
from golem_sidecar.loading import _fill_special_tokens_from_gguf, load_model
from golem_sidecar.placement import Placement

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
        load_model(str(folder), CPU, Security())
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
