"""Generated protobuf and gRPC code for golem.exam.v1 and golem.sidecar.v1 (written by
`make gen`, never edited).

protoc writes absolute imports (``from golem.exam.v1 import exam_pb2``), so this folder goes on
``sys.path`` for the generated package ``golem`` to resolve; the modules are re-exported here.
"""

import os
import sys

_here = os.path.dirname(__file__)
if _here not in sys.path:
    sys.path.append(_here)

from golem.exam.v1 import exam_pb2, exam_pb2_grpc  # noqa: E402
from golem.sidecar.v1 import metrics_pb2, metrics_pb2_grpc  # noqa: E402

__all__ = ["exam_pb2", "exam_pb2_grpc", "metrics_pb2", "metrics_pb2_grpc"]
