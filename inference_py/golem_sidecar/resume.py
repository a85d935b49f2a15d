"""Resuming an interrupted GradeExam: the results file that `golem grade --results` appends to
(one ItemResult in proto3 JSON per line) is indexed by result key, and a result whose key the
new run would produce again is taken from the file instead of being graded.

Only the byte offset of each line is kept, so the index costs a few dozen bytes per result and
the records are read back one at a time as the run reaches them. A run killed mid-write leaves
an unfinished last line (no newline): it is not a result and is ignored, so that item is graded
again. Any other bad line is refused, naming the file and the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from golem_sidecar.comparison import MAX_ADAPTERS
from golem_sidecar.exams import MAX_ITEMS, MAX_LINE_BYTES, ExamError
from golem_sidecar.gen import exam_pb2

# One result per item and model: more lines than that cannot all belong to one exam's run.
MAX_RESULTS = MAX_ITEMS * (MAX_ADAPTERS + 1)


@dataclass(frozen=True)
class ResumeIndex:
    path: Path | None
    # Result key -> byte offset of its line; the first line of a key wins.
    offsets: dict[str, int]

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def read(self, key: str) -> exam_pb2.ItemResult:
        """The result stored under ``key``, marked as resumed."""
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(self.offsets[key])
            line = f.readline(MAX_LINE_BYTES + 1)
        result = json_format.Parse(line, exam_pb2.ItemResult(), ignore_unknown_fields=True)
        result.resumed = True
        return result


def read_index(path: Path | None) -> ResumeIndex:
    """Indexes the results file at ``path``; None, or a file that does not exist, is empty."""
    if path is None or not path.exists():
        return ResumeIndex(path, {})
    offsets: dict[str, int] = {}
    try:
        with path.open("rb") as f:
            _index_lines(f, str(path), offsets)
    except OSError as e:
        raise ExamError(str(path), None, None, f"cannot be read ({e.strerror})") from None
    return ResumeIndex(path, offsets)


def _index_lines(f: Any, name: str, offsets: dict[str, int]) -> None:
    number, offset = 0, 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if not raw.endswith(b"\n"):
            if len(raw) > MAX_LINE_BYTES:
                raise ExamError(
                    name, number, None, f"the line is longer than {MAX_LINE_BYTES} bytes"
                )
            # The unfinished last line of an interrupted write.
            return
        if raw.strip():
            if number > MAX_RESULTS:
                raise ExamError(name, number, None, f"a results file has at most {MAX_RESULTS}")
            offsets.setdefault(_key(raw, name, number), offset)
        offset += len(raw)


def _key(raw: bytes, name: str, number: int) -> str:
    try:
        record = json.loads(raw)
        # ParseDict takes any JSON value and fails on a non-object with a TypeError.
        if not isinstance(record, dict):
            raise ValueError("a line must be a JSON object")
        json_format.ParseDict(record, exam_pb2.ItemResult(), ignore_unknown_fields=True)
    except (ValueError, json_format.ParseError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExamError(name, number, None, f"not an ItemResult in JSON ({problem})") from None
    key = record.get("key")
    if not isinstance(key, str) or not key:
        raise ExamError(name, number, "key", "must be a non-empty string")
    return key
