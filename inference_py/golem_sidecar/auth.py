"""The bearer token a sidecar apart from its gateway asks of every ExamService call. It comes
from the environment variable that ``sidecar.authTokenEnv`` names, and only its digest is kept.
Health and reflection stay open, so probes (a kubelet, a load balancer) work without it."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from golem_sidecar.errors import GolemError
from golem_sidecar.wire import AUTHORIZATION_KEY

UNAUTHENTICATED = "UNAUTHENTICATED"
_BEARER = re.compile(r"^Bearer\s+(\S+)\s*$", re.IGNORECASE)


class BearerCheck:
    """Checks that a call's metadata carries ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = _digest(token)

    @classmethod
    def from_environment(
        cls, name: str, environ: Mapping[str, str] = os.environ
    ) -> BearerCheck | None:
        """A check for the token in ``environ[name]``; None when it is unset or empty."""
        token = environ.get(name, "")
        return cls(token) if token else None

    def verify(self, metadata: Sequence[tuple[str, Any]] | None) -> None:
        """Returns when the token matches; raises UNAUTHENTICATED otherwise."""
        header = next((v for k, v in metadata or () if k == AUTHORIZATION_KEY), None)
        match = _BEARER.match(header) if isinstance(header, str) else None
        # Fixed-length digests: the time taken does not depend on where the bytes differ, nor
        # on the length of what the caller sent.
        if match and hmac.compare_digest(_digest(match[1]), self._expected):
            return
        message = (
            "the bearer token is not valid"
            if match
            else 'this call needs metadata "authorization: Bearer <token>"'
        )
        raise GolemError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED, message)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()
