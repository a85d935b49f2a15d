"""Names that travel on the wire, in one place: metadata keys, the error domain, service names.
The gateway's src/wire.ts holds the same names for TypeScript."""

from __future__ import annotations

from golem_sidecar.gen import exam_pb2

# Metadata: the caller's request id (echoed, and carried into every log line of the call).
REQUEST_ID_KEY = "x-request-id"
# Metadata: "Bearer <token>" on every ExamService call to a sidecar that asks for a token.
AUTHORIZATION_KEY = "authorization"
# google.rpc.ErrorInfo.domain of every golem error.
ERROR_DOMAIN = "golem.dev"
EXAM_SERVICE = exam_pb2.DESCRIPTOR.services_by_name["ExamService"]
EXAM_SERVICE_NAME = EXAM_SERVICE.full_name
