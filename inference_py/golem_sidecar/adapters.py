"""Finding and checking a PEFT adapter folder before anything is loaded from it."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from peft import PeftType
from peft.config import PromptLearningConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors import SafetensorError, safe_open

from golem_sidecar.errors import GolemError, failed_precondition, not_found
from golem_sidecar.paths import as_path, confine, kind

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# peft's special target that means "every linear layer but the output head".
ALL_LINEAR = "all-linear"
# The adapter types served, any mix of them on one base (lanes.py). LoRA includes its DoRA and
# rsLoRA variants.
SERVED_TYPES = ("LORA", "IA3", "LOHA", "LOKR", "ADALORA")
# Types peft has no 4-bit (bitsandbytes) layers for: on a 4-bit base peft would misread the
# packed weights' shape and refuse them as made for another base.
FULL_PRECISION_ONLY = ("LOHA", "LOKR")


@dataclass(frozen=True)
class AdapterFolder:
    """A checked adapter folder: it holds a PEFT config and weights we are allowed to load."""

    # As the caller wrote it; reported back unchanged.
    path: str
    resolved: Path
    peft_type: str
    base_model_name_or_path: str
    # The config's target_modules: a list of module names, one regex, or None (not a tuner
    # that targets modules, e.g. prompt tuning).
    target_modules: tuple[str, ...] | str | None = None
    # Tensor names in the safetensors header; None for pickle weights, which have no header.
    weight_keys: frozenset[str] | None = None
    # The weights file's resolved path, size and modification time: two folders (or two
    # spellings of one folder) with the same identity hold the same weights.
    identity: tuple[str, int, int] = ("", 0, 0)


def check_adapter_folder(
    path: str, allow_pickle: bool, roots: tuple[Path, ...] = (), field: str = "adapter_path"
) -> AdapterFolder:
    """Checks that ``path`` is a loadable adapter folder (a Trainer checkpoint folder counts).

    Refusals, in the order they are checked: PATH_OUTSIDE_ROOTS (PERMISSION_DENIED),
    ADAPTER_NOT_FOUND (NOT_FOUND), ADAPTER_NOT_A_DIRECTORY (INVALID_ARGUMENT), then
    FAILED_PRECONDITION with ADAPTER_CONFIG_MISSING, ADAPTER_CONFIG_INVALID,
    ADAPTER_TYPE_UNSUPPORTED, ADAPTER_PICKLE_REFUSED, ADAPTER_WEIGHTS_MISSING or
    ADAPTER_WEIGHTS_CORRUPT.
    """
    confine(path, roots, field)
    folder = as_path(path)
    found = kind(folder)
    if found is None:
        raise not_found(
            field,
            "ADAPTER_NOT_FOUND",
            f'no adapter at "{path}" (looked in {folder.absolute()})',
        )
    if found != "dir":
        raise GolemError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "ADAPTER_NOT_A_DIRECTORY",
            f'{field}: "{path}" is a file; give the adapter folder',
            field,
        )
    # The folder is inside the roots; its files may be symlinks, and must not lead out either.
    for name in (CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE) if roots else ():
        if kind(folder / name) is not None:
            confine(str(folder / name), roots, field)
    config = _read_adapter_config(folder, path, field)
    _check_served_type(config, path, field)
    weights = _check_weights(folder, path, allow_pickle, field)
    return AdapterFolder(
        path=path,
        resolved=folder.resolve(),
        peft_type=str(config["peft_type"]),
        base_model_name_or_path=str(config.get("base_model_name_or_path") or ""),
        target_modules=_target_modules(config.get("target_modules")),
        weight_keys=_read_header(weights, path, field) if weights.suffix != ".bin" else None,
        identity=_identity(weights),
    )


def _identity(weights: Path) -> tuple[str, int, int]:
    info = weights.stat()
    return (str(weights.resolve()), info.st_size, info.st_mtime_ns)


def _read_adapter_config(folder: Path, path: str, field: str) -> dict[str, object]:
    config_path = folder / CONFIG_FILE
    found = kind(config_path)
    if found == "other":
        raise failed_precondition(
            field,
            "ADAPTER_CONFIG_INVALID",
            f'{CONFIG_FILE} in "{path}" is not a regular file',
        )
    if found != "file":
        raise failed_precondition(field, "ADAPTER_CONFIG_MISSING", f'"{path}" has no {CONFIG_FILE}')
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        # ValueError covers both malformed JSON and bytes that are not UTF-8.
        raise failed_precondition(
            field,
            "ADAPTER_CONFIG_INVALID",
            f'{CONFIG_FILE} in "{path}" is not JSON: {exc}',
        ) from exc
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise failed_precondition(
            field,
            "ADAPTER_CONFIG_INVALID",
            f'{CONFIG_FILE} in "{path}" is not a PEFT config (no "peft_type")',
        )
    return config


def _check_served_type(config: dict[str, object], path: str, field: str) -> None:
    """Refuses, before anything loads, an adapter of a type golem does not serve, naming it."""
    peft_type = str(config["peft_type"])
    served = "LORA (with DoRA and rsLoRA), IA3, LOHA, LOKR and ADALORA"
    if peft_type in SERVED_TYPES and not config.get("alora_invocation_tokens"):
        return
    if peft_type == "LORA":
        why = "an activated LoRA (aLoRA, alora_invocation_tokens), which is not served"
    elif _is_prompt_learning(peft_type):
        why = (
            f"a {peft_type} adapter: prompt-learning adapters, which prepend learned virtual "
            "tokens instead of changing the base's layers, are not served"
        )
    else:
        why = f"a {peft_type} adapter, a type golem does not serve"
    raise failed_precondition(
        field, "ADAPTER_TYPE_UNSUPPORTED", f'"{path}" is {why}; golem serves {served}'
    )


def refuse_on_4bit(folder: AdapterFolder, model_name: str) -> None:
    """ADAPTER_TYPE_UNSUPPORTED for a type that cannot be applied to a 4-bit base."""
    if folder.peft_type in FULL_PRECISION_ONLY:
        raise failed_precondition(
            "adapter_path",
            "ADAPTER_TYPE_UNSUPPORTED",
            f'"{folder.path}" is a {folder.peft_type} adapter, which peft cannot apply to a 4-bit '
            f'base such as this "{model_name}"; ask for quantization.load_in_4bit=false',
        )


def _is_prompt_learning(peft_type: str) -> bool:
    if peft_type not in PeftType.__members__:
        return False
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType[peft_type])
    return config_class is not None and issubclass(config_class, PromptLearningConfig)


def _check_weights(folder: Path, path: str, allow_pickle: bool, field: str) -> Path:
    """The weights file to load: safetensors, or pickle when that is allowed and all there is.
    Only regular files count: anything else (a FIFO) would block whoever reads it."""
    weights = folder / SAFETENSORS_FILE
    if kind(weights) == "file":
        return weights
    if kind(folder / PICKLE_FILE) == "file":
        if allow_pickle:
            return folder / PICKLE_FILE
        raise failed_precondition(
            field,
            "ADAPTER_PICKLE_REFUSED",
            f'"{path}" holds only {PICKLE_FILE}, a pickle that can run code when loaded; '
            "convert it to safetensors, or set security.allowPickle in the config to load it",
        )
    raise failed_precondition(
        field, "ADAPTER_WEIGHTS_MISSING", f'"{path}" has no {SAFETENSORS_FILE} (a regular file)'
    )


def _read_header(weights: Path, path: str, field: str) -> frozenset[str]:
    """Reads only the header: safetensors checks that it is JSON and that its tensors cover the
    file exactly, so a truncated or overwritten file is caught here (ADAPTER_WEIGHTS_CORRUPT,
    FAILED_PRECONDITION) instead of halfway through attaching it to a base."""
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            return frozenset(tensors.keys())
    except (SafetensorError, OSError) as exc:
        raise failed_precondition(
            field,
            "ADAPTER_WEIGHTS_CORRUPT",
            f'{SAFETENSORS_FILE} in "{path}" is truncated or corrupt: {exc}',
        ) from exc


def _target_modules(value: object) -> tuple[str, ...] | str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def missing_targets(folder: AdapterFolder, module_names: Iterable[str]) -> list[str]:
    """The adapter's target modules that the base lacks, when that matters.

    peft itself refuses only an adapter none of whose targets exist, and silently drops the
    weights of the others. A target the base lacks matters when the adapter holds weights for it
    (they would be dropped) or when no target exists at all; a trainer's generic target list
    that names modules this architecture never had is harmless and passes.
    """
    targets = folder.target_modules
    if targets is None or targets == ALL_LINEAR:
        return []
    names = list(module_names)
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error:
            return []  # peft reports its own regex errors when it loads the adapter
        return [] if any(pattern.fullmatch(n) for n in names) else [targets]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if len(missing) == len(targets):
        return missing
    keys = folder.weight_keys
    return [t for t in missing if keys is None or any(f".{t}." in k for k in keys)]


def content_hash(folder: AdapterFolder) -> str:
    """A sha256 hex digest of the adapter's config and weights: the same for every copy and
    spelling of one adapter, different as soon as a byte of either file changes (a path or a
    modification time would say neither). Results of GradeExam are keyed by it."""
    digest = hashlib.sha256(b"golem-adapter-v1\n")
    for path in (folder.resolved / CONFIG_FILE, Path(folder.identity[0])):
        with path.open("rb") as f:
            # hashlib.file_digest reads in chunks: an adapter of any size costs little memory.
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()
