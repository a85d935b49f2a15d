"""Reading a failed call's google.rpc.Status details, for the tests that check them."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str
    # None when the status carries no ErrorInfo (gRPC's own statuses never do).
    reason: str | None
    fields: tuple[str, ...]


def failure(err: grpc.aio.AioRpcError) -> Failure:
    """The code, message, ErrorInfo reason and BadRequest fields of a failed call."""
    reason, fields = None, ()
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = tuple(v.field for v in bad.field_violations)
    return Failure(err.code(), err.details() or "", reason, fields)
