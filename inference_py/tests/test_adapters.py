"""The adapter folder checks that run before anything is loaded."""

import json
import shutil
from pathlib import Path

import grpc
import pytest

from golem_sidecar.adapters import check_adapter_folder
from golem_sidecar.errors import GolemError


def _copy(tiny: dict[str, str], tmp_path: Path) -> Path:
    dest = tmp_path / "results" / "checkpoint-250"
    shutil.copytree(tiny["adapter"], dest)
    return dest


def _refusal(path: Path | str, allow_pickle: bool = False) -> GolemError:
    with pytest.raises(GolemError) as info:
        check_adapter_folder(str(path), allow_pickle)
    assert info.value.field == "adapter_path"
    return info.value


def test_trainer_checkpoint_folder_is_accepted(tiny: dict[str, str], tmp_path: Path) -> None:
    folder = check_adapter_folder(str(_copy(tiny, tmp_path)), allow_pickle=False)
    assert folder.peft_type == "LORA"
    assert folder.base_model_name_or_path == tiny["model"]


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    err = _refusal(tmp_path / "nope")
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "adapter.safetensors"
    file.write_bytes(b"x")
    err = _refusal(file)
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ADAPTER_NOT_A_DIRECTORY")


@pytest.mark.parametrize(
    ("config_text", "reason"),
    [
        (None, "ADAPTER_CONFIG_MISSING"),
        ("{not json", "ADAPTER_CONFIG_INVALID"),
        (json.dumps({"r": 8}), "ADAPTER_CONFIG_INVALID"),
        (json.dumps([1, 2]), "ADAPTER_CONFIG_INVALID"),
    ],
)
def test_bad_configs_are_refused(
    tiny: dict[str, str], tmp_path: Path, config_text: str | None, reason: str
) -> None:
    folder = _copy(tiny, tmp_path)
    config = folder / "adapter_config.json"
    if config_text is None:
        config.unlink()
    else:
        config.write_text(config_text)
    err = _refusal(folder)
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, reason)


def test_pickle_only_is_refused_unless_allowed(tiny: dict[str, str], tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    err = _refusal(folder)
    assert err.reason == "ADAPTER_PICKLE_REFUSED"
    assert "allowPickle" in err.message
    assert check_adapter_folder(str(folder), allow_pickle=True).peft_type == "LORA"


def test_no_weights_is_refused(tiny: dict[str, str], tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    assert _refusal(folder).reason == "ADAPTER_WEIGHTS_MISSING"
