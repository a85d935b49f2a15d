"""The one path from a caller's request to a checked request.

Every RPC that names a model, an adapter or a prompt resolves it here, through the same rules:
text bounds, confinement to the configured roots (before anything reveals whether a path
exists), existence, regular files only, and a stable key for what was resolved. File checks run
on a small thread pool with a timeout, never on the event loop: a slow or hostile file system
cannot stall health checks or other calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from golem_sidecar.adapters import AdapterFolder, check_adapter_folder
from golem_sidecar.config import Security
from golem_sidecar.errors import GolemError, failed_precondition, invalid_argument, not_found
from golem_sidecar.paths import as_path, confine, confine_model_name, is_hub_id, kind

log = logging.getLogger(__name__)
T = TypeVar("T")

# Longer than any real path (Linux PATH_MAX); refused before it reaches the file system.
MAX_PATH_CHARS = 4096
# Caller text that is stored or echoed but never tokenised for the model (expected_answer):
# bounded so that a reply can always be sent.
MAX_TEXT_CHARS = 4096
# How long the file checks of one request may take before the call is refused.
FILE_CHECK_TIMEOUT_S = 10.0
# Files transformers reads from a model folder: the weights' index may name shards.
_INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: what the caller wrote, and the stable key it was resolved to (the
    absolute path, symlinks followed, of a local folder or .gguf file; the id of a hub model)."""

    name: str
    key: str


def text_field(field: str, value: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A caller's text that must not be blank and has a bound."""
    if not value.strip():
        raise invalid_argument(field, "must not be empty")
    if len(value) > max_chars:
        raise invalid_argument(field, f"must be at most {max_chars} characters, got {len(value)}")
    return value


def path_field(field: str, value: str) -> str:
    """A caller's path: not blank, bounded, and without NUL (no file system takes one)."""
    text_field(field, value, MAX_PATH_CHARS)
    if "\x00" in value:
        raise invalid_argument(field, "must not contain NUL characters")
    return value


def resolve_model(
    field: str, text: str, security: Security, is_resident: Callable[[str], bool]
) -> ModelRef:
    """Confines, checks and keys a model name. A local model that is resident keeps answering
    under its key even if its files have moved since it was loaded."""
    path_field(field, text)
    confine_model_name(text, security.model_roots, field)
    path = as_path(text)
    found = kind(path)
    if found is None and is_hub_id(text):
        # A hub id; whether it is available offline is known only when it is loaded.
        return ModelRef(text, text)
    key = _resolved(path)
    if key is None:
        raise not_found(field, "MODEL_NOT_FOUND", f'"{text}" cannot be resolved to a path')
    if is_resident(key):
        return ModelRef(text, key)
    if text.endswith(".gguf"):
        if found != "file":
            raise not_found(field, "MODEL_NOT_FOUND", f'no GGUF file at "{text}"')
    elif found == "dir":
        check_model_folder(field, text, Path(key), security)
    else:
        raise not_found(field, "MODEL_NOT_FOUND", f'no model folder at "{text}"')
    return ModelRef(text, key)


def _resolved(path: Path) -> str | None:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError, ValueError):
        return None


def check_model_folder(field: str, text: str, folder: Path, security: Security) -> None:
    """A local folder must hold a model, and nothing in it may lead out of the roots.

    MODEL_INVALID (FAILED_PRECONDITION) for an adapter folder, which transformers would quietly
    swap for the base its adapter_config.json names; MODEL_NOT_FOUND without a config.json.
    Every entry must be a regular file or folder (a FIFO would block the loader forever), a
    symlinked file must resolve inside the roots, and so must every shard a weights index names.
    """
    if kind(folder / "adapter_config.json") is not None:
        raise failed_precondition(
            field,
            "MODEL_INVALID",
            f'"{text}" is a PEFT adapter folder; give it as adapter_path and its base '
            "as model_name",
        )
    if kind(folder / "config.json") != "file":
        raise not_found(field, "MODEL_NOT_FOUND", f'"{text}" is a folder without config.json')
    for entry in sorted(folder.iterdir()):
        if kind(entry) == "other":
            raise failed_precondition(
                field, "MODEL_INVALID", f'"{text}" holds {entry.name}, which is not a regular file'
            )
        if security.model_roots and entry.is_symlink():
            confine(str(entry), security.model_roots, field)
        if entry.name.endswith(_INDEX_SUFFIX) and kind(entry) == "file":
            _check_index(field, text, folder, entry, security)


def _check_index(field: str, text: str, folder: Path, index: Path, security: Security) -> None:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = {str(shard) for shard in weight_map.values()}
    except (OSError, ValueError, AttributeError) as exc:
        raise failed_precondition(
            field, "MODEL_INVALID", f'{index.name} in "{text}" is not a weights index: {exc}'
        ) from exc
    roots = security.model_roots or (folder.resolve(),)
    for shard in sorted(shards):
        confine(str(folder / shard), roots, field)


def resolve_adapter(field: str, text: str, security: Security) -> AdapterFolder:
    """A checked adapter folder (see adapters.check_adapter_folder)."""
    path_field(field, text)
    return check_adapter_folder(text, security.allow_pickle, security.adapter_roots, field)


class FileChecks:
    """Runs a request's resolution (file system work) off the event loop, with a timeout. Its
    own small pool: a check stuck on a hung file system cannot starve other work."""

    def __init__(self, timeout_s: float = FILE_CHECK_TIMEOUT_S, workers: int = 4) -> None:
        self._timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="golem-files")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._pool, fn, *args), self._timeout_s
            )
        except TimeoutError:
            log.error("file checks timed out", extra={"timeout_s": self._timeout_s})
            raise GolemError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "FILE_CHECK_TIMEOUT",
                f"checking the request's files took longer than {self._timeout_s:g} s; "
                "the file system may be hung",
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
