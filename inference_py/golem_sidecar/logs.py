"""JSON-line logs on stderr, each line carrying the request id of the call it belongs to."""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import os
import sys
import time
import warnings
from typing import TextIO, cast

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": "sidecar",
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _UnfailingStream(io.TextIOBase):
    """A text stream that drops what it cannot write (disk full, reader gone) instead of raising:
    a log line lost is better than a request, or the process, failing for it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()


def keep_stderr_from_failing() -> None:
    """Makes every write to stderr, logging's included, survive a failed write."""
    # Without this, logging reports a failed write by writing a traceback to the same stderr.
    logging.raiseExceptions = False
    if not isinstance(sys.stderr, _UnfailingStream):
        sys.stderr = cast(TextIO, _UnfailingStream(sys.stderr))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (progress bars, deprecation notes) stays out of the service's log, and
    # the warnings that remain arrive as JSON lines too.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("transformers", "peft", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
