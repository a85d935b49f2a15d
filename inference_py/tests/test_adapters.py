"""The adapter folder checks that run before anything is loaded."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from golem_sidecar.adapters import AdapterFolder, check_adapter_folder, missing_targets
from golem_sidecar.errors import GolemError


def _copy(tiny: dict[str, str], tmp_path: Path) -> Path:
    dest = tmp_path / "results" / "checkpoint-250"
    shutil.copytree(tiny["adapter"], dest)
    return dest


def _refusal(
    path: Path | str, allow_pickle: bool = False, roots: tuple[Path, ...] = ()
) -> GolemError:
    with pytest.raises(GolemError) as info:
        check_adapter_folder(str(path), allow_pickle, roots)
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


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated to half"),
        pytest.param(lambda data: data[:-1], id="one byte short"),
        pytest.param(lambda data: data + b"\0", id="one byte too many"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: data[:8] + b"{" * 16 + data[24:], id="header overwritten"),
        pytest.param(lambda data: bytes(len(data)), id="zeroed"),
    ],
)
def test_damaged_safetensors_are_refused_before_loading(
    tiny: dict[str, str], tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    folder = _copy(tiny, tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    err = _refusal(folder)
    assert (err.code, err.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ADAPTER_WEIGHTS_CORRUPT",
    )
    assert "adapter_model.safetensors" in err.message


def test_header_names_are_kept_for_the_target_check(tiny: dict[str, str]) -> None:
    folder = check_adapter_folder(tiny["adapter"], allow_pickle=False)
    assert folder.target_modules is not None
    assert set(folder.target_modules) == {"q_proj", "v_proj"}
    assert folder.weight_keys is not None
    assert any(".q_proj.lora_A." in key for key in folder.weight_keys)


LLAMA_MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.up_proj",
]


def _folder(targets: object, keys: frozenset[str] | None) -> AdapterFolder:
    return AdapterFolder(
        path="a",
        resolved=Path("a"),
        peft_type="LORA",
        base_model_name_or_path="",
        target_modules=targets,  # type: ignore[arg-type]
        weight_keys=keys,
    )


_Q_WEIGHTS = frozenset({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"})


@pytest.mark.parametrize(
    ("targets", "keys", "missing"),
    [
        pytest.param(("q_proj", "v_proj"), _Q_WEIGHTS, [], id="all present"),
        pytest.param(("c_attn",), None, ["c_attn"], id="none present"),
        pytest.param(
            ("q_proj", "c_attn"), _Q_WEIGHTS, [], id="a generic list: no weights for the extra"
        ),
        pytest.param(
            ("q_proj", "k_proj"),
            _Q_WEIGHTS | {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"},
            ["k_proj"],
            id="weights for a module the base lacks",
        ),
        pytest.param(("q_proj", "k_proj"), None, ["k_proj"], id="pickle: weights unknown"),
        pytest.param(r".*\.self_attn\.(q|v)_proj", _Q_WEIGHTS, [], id="regex that matches"),
        pytest.param(r".*\.c_attn", _Q_WEIGHTS, [r".*\.c_attn"], id="regex that matches nothing"),
        pytest.param("all-linear", _Q_WEIGHTS, [], id="all-linear"),
        pytest.param(None, None, [], id="no targets (prompt tuning)"),
    ],
)
def test_missing_targets(targets: object, keys: frozenset[str] | None, missing: list[str]) -> None:
    assert missing_targets(_folder(targets, keys), LLAMA_MODULES) == missing


def _roots(tmp_path: Path) -> tuple[Path, ...]:
    return ((tmp_path / "root").resolve(),)


def test_an_adapter_inside_the_roots_is_accepted(tiny: dict[str, str], tmp_path: Path) -> None:
    inside = shutil.copytree(tiny["adapter"], tmp_path / "root" / "a")
    roots = _roots(tmp_path)
    assert check_adapter_folder(str(inside), False, roots).peft_type == "LORA"
    # Relative spellings and ".." that stay inside are fine too.
    winding = tmp_path / "root" / "a" / ".." / "a"
    assert check_adapter_folder(str(winding), False, roots).resolved == inside.resolve()


def _escape(tiny: dict[str, str], tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "root").mkdir()
    outside = shutil.copytree(tiny["adapter"], tmp_path / "outside")
    link = tmp_path / "root" / "link"
    link.symlink_to(outside, target_is_directory=True)
    leaky = shutil.copytree(tiny["adapter"], tmp_path / "root" / "leaky")
    (leaky / "adapter_config.json").unlink()
    (leaky / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    return {
        "dotdot": tmp_path / "root" / ".." / "outside",
        "symlink": link,
        "symlinked file inside": leaky,
        "absolute, missing": tmp_path / "nowhere",
        "relative": Path("."),
    }


@pytest.mark.parametrize(
    "way", ["dotdot", "symlink", "symlinked file inside", "absolute, missing", "relative"]
)
def test_adapters_outside_the_roots_are_denied_whether_or_not_they_exist(
    tiny: dict[str, str], tmp_path: Path, way: str
) -> None:
    path = _escape(tiny, tmp_path)[way]
    err = _refusal(path, roots=_roots(tmp_path))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS")
