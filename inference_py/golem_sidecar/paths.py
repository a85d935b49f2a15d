"""Callers' paths: confinement to the configured roots, and existence checks that never raise.

A path is confined before anything else looks at it, so a refusal reads the same whether or not
the path exists: a caller cannot use the sidecar to probe the file system outside the roots.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import grpc

from golem_sidecar.errors import GolemError

# "name" or "owner/name", as the Hugging Face hub spells repository ids (at most 96 characters).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HUB_ID_MAX = 96


def is_hub_id(name: str) -> bool:
    """Whether ``name`` could be a hub repository id; anything else can only be a local path."""
    return (
        len(name) <= _HUB_ID_MAX
        and bool(_HUB_ID.match(name))
        and ".." not in name
        and not name.endswith(".gguf")
    )


def as_path(text: str) -> Path:
    """The caller's text as a path, ``~`` expanded where a home folder is known."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def kind(path: Path) -> str | None:
    """ "dir", "file" (a regular file), "other" (a FIFO, socket or device: never opened, since
    reading a FIFO blocks forever), or None when nothing readable is there. Odd paths (too long,
    a parent that cannot be searched, a symlink loop) count as nothing rather than raising."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def confine(text: str, roots: tuple[Path, ...], field: str) -> None:
    """Raises PERMISSION_DENIED, reason PATH_OUTSIDE_ROOTS, when ``text`` (symlinks followed,
    ``..`` resolved) lies in none of ``roots``; no roots means no confinement."""
    if not roots:
        return
    try:
        resolved = as_path(text).resolve()
    except (OSError, RuntimeError, ValueError):
        # Unresolvable (a symlink loop, say): it cannot be shown to be inside, so it is not.
        resolved = None
    if resolved is not None and any(resolved.is_relative_to(root) for root in roots):
        return
    allowed = ", ".join(str(root) for root in roots)
    raise GolemError(
        grpc.StatusCode.PERMISSION_DENIED,
        "PATH_OUTSIDE_ROOTS",
        f'{field}: "{text}" is outside the folders this sidecar may read ({allowed})',
        field,
    )


def confine_model_name(name: str, roots: tuple[Path, ...], field: str = "model_name") -> None:
    """Confines a model name that is a local path; hub ids are not paths and pass.

    transformers reads a local folder whose name equals a hub id in preference to the hub, so a
    hub-shaped name that exists as a local path is confined too. That reveals, for hub-shaped
    names only, whether such a path exists under the working directory; nothing more.
    """
    if not roots:
        return
    if not is_hub_id(name) or kind(as_path(name)) is not None:
        confine(name, roots, field)
