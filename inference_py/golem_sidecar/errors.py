"""Errors that travel to callers as a gRPC status with google.rpc.Status details: one ErrorInfo
with an UPPER_SNAKE reason and, for a bad field, one BadRequest naming it."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from golem_sidecar.wire import ERROR_DOMAIN as DOMAIN

# Messages echo callers' input (paths, names). The status travels in trailers, twice (grpc-message
# percent-encoded, and grpc-status-details-bin), and gRPC clients drop a call whose trailers pass
# 8-16 KiB, so a message is cut to this many UTF-8 bytes.
MAX_MESSAGE_BYTES = 1024


class GolemError(Exception):
    """An error with the status code that tells the caller what to do about it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        message = _bounded(message)
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field
        self.metadata = metadata or {}
        # Sent as a google.rpc.RetryInfo: how long a caller should back off before retrying.
        self.retry_after_s = retry_after_s

    def to_status(self) -> grpc.Status:
        """The status the servicer aborts with; details ride in grpc-status-details-bin."""
        details = [
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=self.reason, domain=DOMAIN, metadata=self.metadata
                )
            )
        ]
        if self.field is not None:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.message
            )
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(proto)


def _bounded(text: str) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return text
    return encoded[: MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "\u2026"


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def invalid_argument(field: str, message: str, reason: str = "INVALID_FIELD") -> GolemError:
    """Bad input the caller must fix; never worth a retry."""
    return GolemError(grpc.StatusCode.INVALID_ARGUMENT, reason, f"{field}: {message}", field)


def not_found(field: str, reason: str, message: str) -> GolemError:
    return GolemError(grpc.StatusCode.NOT_FOUND, reason, f"{field}: {message}", field)


def failed_precondition(field: str | None, reason: str, message: str) -> GolemError:
    """The request is well formed but this daemon or machine cannot serve it as it stands."""
    text = f"{field}: {message}" if field else message
    return GolemError(grpc.StatusCode.FAILED_PRECONDITION, reason, text, field)


def already_exists(field: str, reason: str, message: str) -> GolemError:
    """The name is taken by something else; unload it first or choose another."""
    return GolemError(grpc.StatusCode.ALREADY_EXISTS, reason, f"{field}: {message}", field)


def caller_gone() -> GolemError:
    """The caller cancelled or its deadline passed; nobody reads this, but the log does."""
    return GolemError(grpc.StatusCode.CANCELLED, "CANCELLED", "the caller cancelled the call")
