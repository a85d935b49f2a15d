"""Exams as data (issue 10): a JSONL file of items and an optional YAML or JSON header, read and
validated here into a typed Exam. Every refusal is an ExamError naming the file, the line and the
field, raised before anything is graded. Nothing here is evaluated: JSON, yaml.safe_load, and
str.format with only {question} and {choices} allowed. The format is documented in docs/exams.md."""

from __future__ import annotations

import difflib
import hashlib
import json
import string
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from golem_sidecar.config import Defaults, Limits

DEFAULT_TEMPLATE = "Instruction: {question}\nResponse:"
# Used when the header names none: the seed graded by exact match first.
DEFAULT_SCORERS = ("exact_match",)
TEMPLATE_FIELDS = ("question", "choices")
HEADER_SUFFIXES = (".yaml", ".yml", ".json")
ITEM_KEYS = ("id", "question", "prompt", "answer", "answers", "choices")
HEADER_KEYS = ("name", "version", "template", "scorers", "generation")
GENERATION_KEYS = ("max_new_tokens", "stop")

# Bounds. An exam is a held-out set graded item by item through the base and each adapter, so
# 100,000 items is already hours of work; more is a data set, not an exam. The ids are kept to
# find duplicates, so this also bounds the memory of a streamed read.
MAX_ITEMS = 100_000
# One item is a question and its answers, not a document. Lines are read with this bound, so a
# file without newlines cannot make the reader hold the whole file.
MAX_LINE_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_TEMPLATE_CHARS = 4096
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 128
MAX_ANSWERS = 64
# Log-likelihood multiple-choice scoring costs one teacher-forced pass per choice.
MAX_CHOICES = 26
MAX_SCORERS = 16
# The same stop bounds as a TakeExam request's (exam.py imports them from here).
MAX_STOPS = 8
MAX_STOP_CHARS = 128
# Bumped when the hashed fields change, so old results files never match new exams.
HASH_FORMAT = "golem-exam-v1"


class ExamError(ValueError):
    """A refused exam: ``path``, ``line`` (1-based, None for the whole file or the header when
    unknown) and ``field`` (None for the whole line) say where; ``problem`` says what."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str) -> None:
        self.path, self.line, self.field, self.problem = path, line, field, problem
        where = path if line is None else f"{path}:{line}"
        what = problem if field is None else f'field "{field}": {problem}'
        super().__init__(f"{where}: {what}")


@dataclass(frozen=True)
class Generation:
    """How answers are generated for every item."""

    max_new_tokens: int = Defaults.max_new_tokens
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExamHeader:
    """The header's settings, defaults filled in."""

    name: str
    # None when the header gives no version.
    version: str | None = None
    template: str = DEFAULT_TEMPLATE
    # Names only; a scorer registry checks them through load_exam's known_scorers.
    scorers: tuple[str, ...] = DEFAULT_SCORERS
    generation: Generation = Generation()


@dataclass(frozen=True)
class ExamItem:
    """One question, its prompt rendered."""

    id: str
    # What the model is given: the item's own prompt, or the template filled in.
    prompt: str
    # None when the item gave a full prompt.
    question: str | None
    # Accepted answers, at least one; `answer` becomes a tuple of one.
    answers: tuple[str, ...]
    # For multiple-choice items; the answers are among them.
    choices: tuple[str, ...] | None
    # Its 1-based line in the JSONL file, for error messages and reports.
    line: int


@dataclass(frozen=True)
class Exam:
    name: str
    version: str | None
    template: str
    scorers: tuple[str, ...]
    generation: Generation
    items: tuple[ExamItem, ...]


@dataclass(frozen=True)
class _Where:
    """A place in a file, to raise errors from."""

    path: str
    line: int | None = None

    def error(self, field: str | None, problem: str) -> ExamError:
        return ExamError(self.path, self.line, field, problem)


def load_exam(
    path: str | Path,
    header_path: str | Path | None = None,
    *,
    known_scorers: Collection[str] | None = None,
    max_new_tokens_cap: int = Limits.max_new_tokens_cap,
) -> Exam:
    """Reads and validates a whole exam.

    Without ``header_path`` the header is ``<stem>.yaml``, ``.yml`` or ``.json`` beside the
    JSONL, if one exists (two of them are refused as ambiguous); without one, the defaults.
    ``known_scorers``, when given, refuses any other scorer name.
    """
    exam_path = Path(path)
    if header_path is None:
        header_path = default_header_path(exam_path)
    if header_path is None:
        header = ExamHeader(name=exam_path.stem)
    else:
        header = read_header(
            header_path,
            default_name=exam_path.stem,
            known_scorers=known_scorers,
            max_new_tokens_cap=max_new_tokens_cap,
        )
    items = tuple(iter_items(exam_path, header))
    return Exam(
        header.name, header.version, header.template, header.scorers, header.generation, items
    )


def default_header_path(exam_path: Path) -> Path | None:
    """The header beside ``exam_path`` (same stem), or None when there is none."""
    found = [p for p in (exam_path.with_suffix(s) for s in HEADER_SUFFIXES) if p.is_file()]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ExamError(str(exam_path), None, None, f"more than one header beside it ({names})")
    return found[0] if found else None


# --- the header ---------------------------------------------------------------------------


def read_header(
    path: str | Path,
    *,
    default_name: str,
    known_scorers: Collection[str] | None = None,
    max_new_tokens_cap: int = Limits.max_new_tokens_cap,
) -> ExamHeader:
    """Reads a YAML (.yaml, .yml) or JSON (.json) header; every key is optional."""
    where = _Where(str(path))
    raw = _parse_header(Path(path), where)
    _refuse_unknown_keys(raw, HEADER_KEYS, where, prefix="")
    return ExamHeader(
        name=_text(raw, "name", where, MAX_NAME_CHARS) if "name" in raw else default_name,
        version=_version(raw["version"], where) if "version" in raw else None,
        template=_template(raw["template"], where) if "template" in raw else DEFAULT_TEMPLATE,
        scorers=(
            _scorers(raw["scorers"], where, known_scorers) if "scorers" in raw else DEFAULT_SCORERS
        ),
        generation=(
            _generation(raw["generation"], where, max_new_tokens_cap)
            if "generation" in raw
            else Generation()
        ),
    )


def _parse_header(path: Path, where: _Where) -> dict[str, Any]:
    if path.suffix not in HEADER_SUFFIXES:
        raise where.error(None, f"a header must end in {', '.join(HEADER_SUFFIXES)}")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_HEADER_BYTES + 1)
    except OSError as e:
        raise where.error(None, f"cannot be read ({e.strerror})") from None
    if len(data) > MAX_HEADER_BYTES:
        raise where.error(None, f"is larger than {MAX_HEADER_BYTES} bytes")
    text = _decode(data, where)
    try:
        # safe_load builds only plain data (no Python objects), so a header cannot run code.
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise _Where(where.path, e.lineno).error(None, f"not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or "syntax error"
        raise _Where(where.path, line).error(None, f"not valid YAML ({problem})") from None
    if raw is None:  # an empty YAML file: all defaults
        return {}
    if not isinstance(raw, dict):
        raise where.error(None, f"must be a mapping of settings, got {_kind(raw)}")
    return raw


def _version(value: Any, where: _Where) -> str:
    # YAML reads `version: 3` as an int; 1.0 (a float) is refused, as it would read back as "1.0"
    # or "1" depending on the writer.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip() and len(value) <= MAX_NAME_CHARS:
        return value
    raise where.error("version", f"must be a non-empty string or an integer, got {_kind(value)}")


def _template(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.error("template", f"must be a non-empty string, got {_kind(value)}")
    if len(value) > MAX_TEMPLATE_CHARS:
        raise where.error("template", f"must be at most {MAX_TEMPLATE_CHARS} characters")
    fields = _template_fields(value, where)
    if "question" not in fields:
        raise where.error("template", "must contain {question}")
    return value


def _template_fields(template: str, where: _Where) -> frozenset[str]:
    """The fields a template uses; only bare {question} and {choices} are allowed, so that
    formatting can never reach an attribute, an index or a format spec."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        hint = "write a literal brace as {{ or }}"
        raise where.error("template", f"malformed ({e}); {hint}") from None
    fields = set()
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            allowed = " and ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            raise where.error(
                "template",
                f"unknown field {{{name}}}{_suggestion(name, TEMPLATE_FIELDS)}; "
                f"only {allowed} are allowed",
            )
        if spec or conversion:
            raise where.error("template", f"{{{name}}} takes no conversion or format spec")
        fields.add(name)
    return frozenset(fields)


def _scorers(value: Any, where: _Where, known: Collection[str] | None) -> tuple[str, ...]:
    names = _strings(value, "scorers", where, MAX_SCORERS, allow_empty_list=False)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise where.error(f"scorers[{i}]", f'"{name}" is named twice')
        if known is not None and name not in known:
            raise where.error(f"scorers[{i}]", f'unknown scorer "{name}"{_suggestion(name, known)}')
    return names


def _generation(value: Any, where: _Where, cap: int) -> Generation:
    if not isinstance(value, dict):
        raise where.error("generation", f"must be a mapping, got {_kind(value)}")
    _refuse_unknown_keys(value, GENERATION_KEYS, where, prefix="generation.")
    tokens = value.get("max_new_tokens", Defaults.max_new_tokens)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= cap:
        raise where.error(
            "generation.max_new_tokens", f"must be an integer in 1..{cap}, got {tokens!r}"
        )
    stop = _strings(value.get("stop", []), "generation.stop", where, MAX_STOPS)
    for i, s in enumerate(stop):
        if len(s) > MAX_STOP_CHARS:
            raise where.error(
                f"generation.stop[{i}]", f"must be at most {MAX_STOP_CHARS} characters"
            )
    return Generation(tokens, stop)


# --- the items ----------------------------------------------------------------------------


def iter_items(path: str | Path, header: ExamHeader) -> Iterator[ExamItem]:
    """Validates and yields the items one line at a time, so memory holds one line and the
    ids seen (to refuse duplicates). Raises ExamError at the first bad line, and at the end when
    there are no items."""
    name = str(path)
    try:
        with Path(path).open("rb") as f:
            yield from _checked_items(f, name, header)
    except OSError as e:
        raise ExamError(name, None, None, f"cannot be read ({e.strerror})") from None


def _checked_items(f: BinaryIO, name: str, header: ExamHeader) -> Iterator[ExamItem]:
    uses_choices = "choices" in _template_fields(header.template, _Where(name))
    first_line: dict[str, int] = {}
    for number, text in _lines(f, name):
        if not text.strip():
            continue
        item = _item(text, _Where(name, number), header.template, uses_choices)
        if item.id in first_line:
            raise ExamError(
                name, number, "id", f'"{item.id}" is also the id on line {first_line[item.id]}'
            )
        if len(first_line) == MAX_ITEMS:
            raise ExamError(name, number, None, f"an exam has at most {MAX_ITEMS} items")
        first_line[item.id] = number
        yield item
    if not first_line:
        raise ExamError(name, None, None, "the exam has no items")


def _lines(f: BinaryIO, name: str) -> Iterator[tuple[int, str]]:
    number = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise ExamError(name, number, None, f"the line is longer than {MAX_LINE_BYTES} bytes")
        text = _decode(raw, _Where(name, number))
        # Editors on Windows start UTF-8 files with a byte-order mark.
        yield number, text.removeprefix("\ufeff") if number == 1 else text


def _item(text: str, where: _Where, template: str, uses_choices: bool) -> ExamItem:
    raw = _json_object(text, where)
    _refuse_unknown_keys(raw, ITEM_KEYS, where, prefix="")
    item_id = _text(raw, "id", where, MAX_ID_CHARS)
    question, prompt = _one_of(raw, "question", "prompt", where)
    answers = _answers(raw, where)
    choices = _choices(raw, answers, where) if "choices" in raw else None
    if prompt is None:
        if uses_choices and choices is None:
            raise where.error("choices", "the template uses {choices} but this item has none")
        prompt = render(template, question or "", choices)
    return ExamItem(item_id, prompt, question, answers, choices, where.line or 0)


def render(template: str, question: str, choices: tuple[str, ...] | None) -> str:
    """The template filled in; {choices} becomes the choices, one per line."""
    return template.format_map({"question": question, "choices": "\n".join(choices or ())})


def _json_object(text: str, where: _Where) -> dict[str, Any]:
    try:
        raw = json.loads(text, object_pairs_hook=lambda pairs: _no_repeats(pairs, where))
    except json.JSONDecodeError as e:
        raise where.error(None, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise where.error(None, "not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise where.error(None, f"must be a JSON object, got {_kind(raw)}")
    return raw


def _no_repeats(pairs: list[tuple[str, Any]], where: _Where) -> dict[str, Any]:
    # json.loads would keep the last of two equal keys silently; one of them is a mistake.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise where.error(key, "is given twice")
        seen[key] = value
    return seen


def _one_of(raw: dict[str, Any], a: str, b: str, where: _Where) -> tuple[str | None, str | None]:
    if (a in raw) == (b in raw):
        raise where.error(a, f'give exactly one of "{a}" and "{b}"')
    return (_text(raw, a, where), None) if a in raw else (None, _text(raw, b, where))


def _answers(raw: dict[str, Any], where: _Where) -> tuple[str, ...]:
    if ("answer" in raw) == ("answers" in raw):
        raise where.error("answer", 'give exactly one of "answer" and "answers"')
    if "answer" in raw:
        return (_text(raw, "answer", where),)
    return _strings(raw["answers"], "answers", where, MAX_ANSWERS, allow_empty_list=False)


def _choices(raw: dict[str, Any], answers: tuple[str, ...], where: _Where) -> tuple[str, ...]:
    choices = _strings(raw["choices"], "choices", where, MAX_CHOICES, allow_empty_list=False)
    if len(choices) < 2:
        raise where.error("choices", "a multiple-choice item needs at least 2 choices")
    if len(set(choices)) < len(choices):
        raise where.error("choices", "each choice must be different")
    missing = [a for a in answers if a not in choices]
    if missing:
        field = "answer" if "answer" in raw else "answers"
        raise where.error(field, f'"{missing[0]}" is not one of the choices')
    return choices


# --- shared checks ------------------------------------------------------------------------


def _text(raw: dict[str, Any], key: str, where: _Where, limit: int = MAX_LINE_BYTES) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise where.error(key, f"must be a non-empty string, got {_kind(value)}")
    if len(value) > limit:
        raise where.error(key, f"must be at most {limit} characters")
    return value


def _strings(
    value: Any, field: str, where: _Where, limit: int, *, allow_empty_list: bool = True
) -> tuple[str, ...]:
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if not ok or (not value and not allow_empty_list):
        qualifier = "" if allow_empty_list else "non-empty "
        raise where.error(field, f"must be a {qualifier}list of non-empty strings")
    if len(value) > limit:
        raise where.error(field, f"must have at most {limit} entries, got {len(value)}")
    return tuple(value)


def _refuse_unknown_keys(
    raw: dict[str, Any], known: Collection[str], where: _Where, prefix: str
) -> None:
    for key in raw:
        if key not in known:
            raise where.error(f"{prefix}{key}", f"unknown field{_suggestion(str(key), known)}")


def _suggestion(name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _decode(data: bytes, where: _Where) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise where.error(None, f"not UTF-8 (byte {e.start})") from None


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "nothing"
    name = type(value).__name__
    return names.get(type(value), f"{'an' if name[0] in 'aeiou' else 'a'} {name}")


# --- identity -----------------------------------------------------------------------------


def content_hash(exam: Exam) -> str:
    """A sha256 hex digest of what decides the answers (ExamDigest), for a whole exam."""
    digest = ExamDigest(exam.generation)
    for item in exam.items:
        digest.add(item)
    return digest.hexdigest()


class ExamDigest:
    """A sha256 of what decides the answers: each item's id, rendered prompt, accepted answers
    and choices, in file order, and the generation settings. Formatting, line numbers, key order,
    answer vs answers, the name, the version and the scorers (which score answers but do not
    change them) leave it unchanged. Fed item by item, so a streamed exam is hashed too."""

    def __init__(self, generation: Generation) -> None:
        self._digest = hashlib.sha256(HASH_FORMAT.encode())
        settings = {"max_new_tokens": generation.max_new_tokens, "stop": generation.stop}
        self._digest.update(canonical(settings))

    def add(self, item: ExamItem) -> None:
        self._digest.update(canonical(item_fields(item)))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def item_fields(item: ExamItem) -> list[Any]:
    """What of an item decides its answers and scores."""
    return [item.id, item.prompt, item.answers, item.choices]


def canonical(value: Any) -> bytes:
    # One JSON text per record, newline-ended: JSON escapes newlines, so records cannot run into
    # each other.
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text.encode() + b"\n"
