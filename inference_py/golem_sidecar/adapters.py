"""Finding and checking a PEFT adapter folder before anything is loaded from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from golem_sidecar.errors import GolemError, failed_precondition, not_found

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterFolder:
    """A checked adapter folder: it holds a PEFT config and weights we are allowed to load."""

    # As the caller wrote it; reported back unchanged.
    path: str
    resolved: Path
    peft_type: str
    base_model_name_or_path: str


def check_adapter_folder(path: str, allow_pickle: bool) -> AdapterFolder:
    """Checks that ``path`` is a loadable adapter folder (a Trainer checkpoint folder counts)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise not_found(
            "adapter_path",
            "ADAPTER_NOT_FOUND",
            f'no adapter at "{path}" (looked in {folder.resolve()})',
        )
    if not folder.is_dir():
        raise GolemError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "ADAPTER_NOT_A_DIRECTORY",
            f'adapter_path: "{path}" is a file; give the adapter folder',
            "adapter_path",
        )
    config = _read_adapter_config(folder, path)
    _check_weights(folder, path, allow_pickle)
    return AdapterFolder(
        path=path,
        resolved=folder.resolve(),
        peft_type=str(config["peft_type"]),
        base_model_name_or_path=str(config.get("base_model_name_or_path") or ""),
    )


def _read_adapter_config(folder: Path, path: str) -> dict[str, object]:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise failed_precondition(
            "adapter_path", "ADAPTER_CONFIG_MISSING", f'"{path}" has no {CONFIG_FILE}'
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise failed_precondition(
            "adapter_path",
            "ADAPTER_CONFIG_INVALID",
            f'{CONFIG_FILE} in "{path}" is not JSON: {exc}',
        ) from exc
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise failed_precondition(
            "adapter_path",
            "ADAPTER_CONFIG_INVALID",
            f'{CONFIG_FILE} in "{path}" is not a PEFT config (no "peft_type")',
        )
    return config


def _check_weights(folder: Path, path: str, allow_pickle: bool) -> None:
    if (folder / SAFETENSORS_FILE).is_file():
        return
    if (folder / PICKLE_FILE).is_file():
        if allow_pickle:
            return
        raise failed_precondition(
            "adapter_path",
            "ADAPTER_PICKLE_REFUSED",
            f'"{path}" holds only {PICKLE_FILE}, a pickle that can run code when loaded; '
            "convert it to safetensors, or set security.allowPickle in the config to load it",
        )
    raise failed_precondition(
        "adapter_path", "ADAPTER_WEIGHTS_MISSING", f'"{path}" has no {SAFETENSORS_FILE}'
    )
