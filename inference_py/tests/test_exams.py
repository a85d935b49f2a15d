"""The exam file format (exams.py): the demo exam, every refusal with its file, line and field,
the template, and the content hash."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from golem_sidecar.config import SEED_PROMPT
from golem_sidecar.exams import (
    DEFAULT_SCORERS,
    DEFAULT_TEMPLATE,
    MAX_LINE_BYTES,
    Exam,
    ExamError,
    content_hash,
    load_exam,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "exams" / "genres.jsonl"
TRAINING = REPO / "data" / "genres.jsonl"
# The names the scorer registry will hold (issue 10).
SCORERS = (
    "exact_match",
    "contains",
    "regex",
    "token_f1",
    "rouge_l",
    "mean_logprob",
    "choice_accuracy",
)
GOOD = {"id": "q1", "question": "Which genre is emma?", "answer": "Romance"}


def write_exam(folder: Path, *lines: Any, name: str = "exam.jsonl") -> Path:
    """Each line a dict (written as JSON) or a str (written as is)."""
    path = folder / name
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    path.write_text(text, encoding="utf-8")
    return path


def write_header(folder: Path, text: str, name: str = "exam.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path, **kwargs: Any) -> ExamError:
    with pytest.raises(ExamError) as caught:
        load_exam(path, **kwargs)
    return caught.value


# --- the demo exam ------------------------------------------------------------------------


def test_demo_exam_loads_with_its_header_and_the_registry_names() -> None:
    exam = load_exam(DEMO, known_scorers=SCORERS)
    assert (exam.name, exam.version, exam.template) == ("genres", "1", DEFAULT_TEMPLATE)
    assert "mean_logprob" in exam.scorers
    assert 20 <= len(exam.items) <= 30
    assert any(item.choices for item in exam.items)
    first = exam.items[0]
    assert first.prompt == DEFAULT_TEMPLATE.format(question=first.question)


def test_demo_exam_is_held_out_and_asks_only_trained_genres() -> None:
    training = [json.loads(line) for line in TRAINING.read_text().splitlines() if line.strip()]
    trained_genres = {row["response"] for row in training}
    trained_titles = {_title(row["instruction"]) for row in training}
    exam = load_exam(DEMO)
    for item in exam.items:
        assert item.question is not None
        assert _title(item.question) not in trained_titles, item.id
        assert item.id.replace("-", " ") not in trained_titles, item.id
        assert set(item.answers) <= trained_genres, item.id
    assert len({item.answers for item in exam.items}) >= 6


def _title(question: str) -> str:
    """'Which genre is the hobbit?' and 'What is the genre of the hobbit?' -> 'the hobbit'."""
    return re.sub(r"^(which genre is|what genre is|what is the genre of) ", "", question.lower())[
        :-1
    ]


# --- items --------------------------------------------------------------------------------


def test_answer_becomes_a_tuple_and_prompt_items_skip_the_template(tmp_path: Path) -> None:
    path = write_exam(
        tmp_path,
        GOOD,
        "",
        {"id": "q2", "prompt": "Genre of dune:", "answers": ["Science fiction", "SF"]},
    )
    exam = load_exam(path)
    one, two = exam.items
    assert (one.answers, one.line, one.prompt) == (
        ("Romance",),
        1,
        "Instruction: Which genre is emma?\nResponse:",
    )
    assert (two.question, two.prompt, two.answers, two.line) == (
        None,
        "Genre of dune:",
        ("Science fiction", "SF"),
        3,
    )
    assert (exam.name, exam.version, exam.scorers) == ("exam", None, DEFAULT_SCORERS)


def test_default_template_is_the_seed_prompt() -> None:
    assert DEFAULT_TEMPLATE.format(question="Which genre is the hobbit?") == SEED_PROMPT


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "must be a JSON object, got a list"),
        ('"text"', None, "must be a JSON object, got a string"),
        ({**GOOD, "answr": "x"}, "answr", 'unknown field (did you mean "answer"?)'),
        ({"question": "q", "answer": "a"}, "id", "must be a non-empty string, got nothing"),
        ({**GOOD, "id": 7}, "id", "must be a non-empty string, got an int"),
        ({**GOOD, "id": ""}, "id", "must be a non-empty string"),
        ({"id": "a", "answer": "x"}, "question", 'exactly one of "question" and "prompt"'),
        ({**GOOD, "prompt": "p"}, "question", 'exactly one of "question" and "prompt"'),
        ({"id": "a", "question": "q"}, "answer", 'exactly one of "answer" and "answers"'),
        ({**GOOD, "answers": ["x"]}, "answer", 'exactly one of "answer" and "answers"'),
        ({"id": "a", "question": "q", "answers": []}, "answers", "must be a non-empty list"),
        ({"id": "a", "question": "q", "answers": "x"}, "answers", "must be a non-empty list"),
        ({"id": "a", "question": "q", "answers": ["x", 3]}, "answers", "list of non-empty str"),
        ({**GOOD, "answer": ["x"]}, "answer", "must be a non-empty string, got a list"),
        ({**GOOD, "choices": ["Romance"]}, "choices", "at least 2 choices"),
        ({**GOOD, "choices": "Romance"}, "choices", "must be a non-empty list"),
        ({**GOOD, "choices": ["Romance", "Romance"]}, "choices", "each choice must be different"),
        ({**GOOD, "choices": ["Horror", "Mystery"]}, "answer", '"Romance" is not one of'),
        ('{"id": "a", "id": "b", "question": "q", "answer": "x"}', "id", "is given twice"),
    ],
)
def test_a_bad_item_is_refused_naming_file_line_and_field(
    tmp_path: Path, line: Any, field: str | None, message: str
) -> None:
    # Line 3, after a good item and a blank line, so the number is not a lucky 1.
    path = write_exam(tmp_path, GOOD, "   ", line)
    error = refusal(path)
    assert (error.path, error.line, error.field) == (str(path), 3, field)
    assert message in error.problem
    assert str(error).startswith(f"{path}:3: ")
    if field is not None:
        assert f'field "{field}": ' in str(error)


def test_the_message_reads_file_line_field(tmp_path: Path) -> None:
    path = write_exam(tmp_path, {"id": "a", "question": "q", "answers": []})
    assert str(refusal(path)) == (
        f'{path}:1: field "answers": must be a non-empty list of non-empty strings'
    )


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD, {**GOOD, "id": "q2"}, "", {**GOOD, "answer": "Horror"})
    error = refusal(path)
    assert (error.line, error.field) == (4, "id")
    assert error.problem == '"q1" is also the id on line 1'


@pytest.mark.parametrize("lines", [(), ("",), ("  ", "\t")])
def test_an_empty_exam_is_refused(tmp_path: Path, lines: tuple[str, ...]) -> None:
    path = write_exam(tmp_path, *lines)
    error = refusal(path)
    assert (error.line, error.field, error.problem) == (None, None, "the exam has no items")


def test_a_line_over_the_bound_is_refused_without_reading_on(tmp_path: Path) -> None:
    long = {**GOOD, "question": "x" * MAX_LINE_BYTES}
    path = write_exam(tmp_path, GOOD, long)
    error = refusal(path)
    assert (error.line, error.field) == (2, None)
    assert f"longer than {MAX_LINE_BYTES} bytes" in error.problem


def test_a_line_at_the_bound_is_accepted(tmp_path: Path) -> None:
    padding = MAX_LINE_BYTES - len(json.dumps({**GOOD, "question": ""}))
    path = write_exam(tmp_path, {**GOOD, "question": "x" * padding})
    assert len(path.read_bytes()) == MAX_LINE_BYTES + 1  # the line and its newline
    assert len(load_exam(path).items) == 1


def test_bytes_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "exam.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"id": "\xff"}\n')
    error = refusal(path)
    assert (error.line, error.field) == (2, None)
    assert "not UTF-8" in error.problem


def test_a_missing_exam_file_is_refused(tmp_path: Path) -> None:
    error = refusal(tmp_path / "nowhere.jsonl")
    assert (error.line, error.field) == (None, None)
    assert "cannot be read" in error.problem


# --- the template -------------------------------------------------------------------------


def test_a_template_with_choices_lists_them_one_per_line(tmp_path: Path) -> None:
    path = write_exam(tmp_path, {**GOOD, "choices": ["Horror", "Romance"]})
    write_header(tmp_path, 'template: "Q: {question}\\nOptions:\\n{choices}\\nA:"\n')
    (item,) = load_exam(path).items
    assert item.prompt == "Q: Which genre is emma?\nOptions:\nHorror\nRomance\nA:"
    assert item.choices == ("Horror", "Romance")


def test_literal_braces_are_written_doubled(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD)
    write_header(tmp_path, 'template: "{{json}} {question}"\n')
    assert load_exam(path).items[0].prompt == "{json} Which genre is emma?"


def test_a_template_with_choices_needs_them_on_every_templated_item(tmp_path: Path) -> None:
    path = write_exam(tmp_path, {**GOOD, "choices": ["Horror", "Romance"]}, {**GOOD, "id": "q2"})
    write_header(tmp_path, 'template: "{question} {choices}"\n')
    error = refusal(path)
    assert (error.line, error.field) == (2, "choices")
    assert "uses {choices}" in error.problem


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{foo}", "unknown field {foo}"),
        ("{questoin}", 'unknown field {questoin} (did you mean "question"?)'),
        ("{question.__class__}", "unknown field {question.__class__}"),
        ("{question[0]}", "unknown field {question[0]}"),
        ("{} {question}", "unknown field {}"),
        ("{0}", "unknown field {0}"),
        ("{question!r}", "takes no conversion or format spec"),
        ("{question:>10}", "takes no conversion or format spec"),
        ("{question", "malformed"),
        ("question}", "malformed"),
        ("no field at all", "must contain {question}"),
        ("", "must be a non-empty string"),
    ],
)
def test_a_bad_template_is_refused(tmp_path: Path, template: str, message: str) -> None:
    path = write_exam(tmp_path, GOOD)
    header = write_header(tmp_path, json.dumps({"template": template}), name="exam.json")
    error = refusal(path)
    assert (error.path, error.line, error.field) == (str(header), None, "template")
    assert message in error.problem


# --- the header ---------------------------------------------------------------------------


def test_a_full_yaml_header_is_read(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD)
    write_header(
        tmp_path,
        "name: demo\nversion: '2024-01'\nscorers: [contains, rouge_l]\n"
        'generation: {max_new_tokens: 8, stop: ["\\n", "."]}\n',
        name="exam.yml",
    )
    exam = load_exam(path, known_scorers=SCORERS)
    assert (exam.name, exam.version, exam.scorers) == ("demo", "2024-01", ("contains", "rouge_l"))
    assert (exam.generation.max_new_tokens, exam.generation.stop) == (8, ("\n", "."))


def test_an_explicit_header_path_is_used_instead_of_the_one_beside(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD)
    write_header(tmp_path, "name: beside\n")
    elsewhere = write_header(tmp_path, json.dumps({"name": "chosen"}), name="other.json")
    assert load_exam(path, elsewhere).name == "chosen"
    assert load_exam(path).name == "beside"


def test_two_headers_beside_the_exam_are_ambiguous(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD)
    write_header(tmp_path, "name: a\n")
    write_header(tmp_path, "{}", name="exam.json")
    error = refusal(path)
    assert (error.path, error.field) == (str(path), None)
    assert "exam.yaml, exam.json" in error.problem


def test_an_empty_yaml_header_means_all_defaults(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD)
    write_header(tmp_path, "# nothing set\n")
    exam = load_exam(path)
    assert (exam.name, exam.template, exam.scorers) == ("exam", DEFAULT_TEMPLATE, DEFAULT_SCORERS)


@pytest.mark.parametrize(
    ("header", "field", "message"),
    [
        ({"nmae": "x"}, "nmae", 'unknown field (did you mean "name"?)'),
        ({"name": 3}, "name", "must be a non-empty string, got an int"),
        ({"version": 1.5}, "version", "a non-empty string or an integer, got a float"),
        ({"version": True}, "version", "got a boolean"),
        ({"scorers": []}, "scorers", "must be a non-empty list"),
        ({"scorers": "exact_match"}, "scorers", "must be a non-empty list"),
        ({"scorers": ["contains", ""]}, "scorers", "list of non-empty strings"),
        ({"scorers": ["contains", "contains"]}, "scorers[1]", "named twice"),
        ({"generation": 5}, "generation", "must be a mapping, got an int"),
        ({"generation": {"temperature": 0}}, "generation.temperature", "unknown field"),
        ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens", "in 1..512"),
        ({"generation": {"max_new_tokens": 513}}, "generation.max_new_tokens", "in 1..512"),
        ({"generation": {"max_new_tokens": "8"}}, "generation.max_new_tokens", "got '8'"),
        ({"generation": {"max_new_tokens": True}}, "generation.max_new_tokens", "got True"),
        ({"generation": {"stop": "\n"}}, "generation.stop", "list of non-empty strings"),
        ({"generation": {"stop": ["x" * 129]}}, "generation.stop[0]", "at most 128"),
        ({"generation": {"stop": ["a"] * 9}}, "generation.stop", "at most 8 entries"),
    ],
)
def test_a_bad_header_is_refused_naming_the_field(
    tmp_path: Path, header: dict[str, Any], field: str, message: str
) -> None:
    path = write_exam(tmp_path, GOOD)
    header_path = write_header(tmp_path, json.dumps(header), name="exam.json")
    error = refusal(path)
    assert (error.path, error.line, error.field) == (str(header_path), None, field)
    assert message in error.problem


def test_unknown_scorers_are_refused_only_against_a_registry(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD)
    write_header(tmp_path, "scorers: [exact_match, rougel]\n")
    assert load_exam(path).scorers == ("exact_match", "rougel")
    error = refusal(path, known_scorers=SCORERS)
    assert (error.field, error.problem) == (
        "scorers[1]",
        'unknown scorer "rougel" (did you mean "rouge_l"?)',
    )


def test_the_cap_on_max_new_tokens_is_the_callers(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD)
    write_header(tmp_path, "generation: {max_new_tokens: 64}\n")
    assert load_exam(path, max_new_tokens_cap=64).generation.max_new_tokens == 64
    assert refusal(path, max_new_tokens_cap=63).field == "generation.max_new_tokens"


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("exam.yaml", "name: [unclosed\n", 2),
        ("exam.yaml", "- a list\n", None),
        ("exam.json", '{\n  "name": "x",\n}', 3),
        ("exam.yaml", "!!python/object/apply:os.system ['true']\n", 1),
    ],
)
def test_a_header_that_does_not_parse_to_a_mapping_is_refused(
    tmp_path: Path, name: str, text: str, line: int | None
) -> None:
    path = write_exam(tmp_path, GOOD)
    header = write_header(tmp_path, text, name=name)
    error = refusal(path)
    assert (error.path, error.line, error.field) == (str(header), line, None)


def test_a_header_of_another_kind_is_refused(tmp_path: Path) -> None:
    path = write_exam(tmp_path, GOOD)
    header = write_header(tmp_path, "name = 'x'\n", name="exam.toml")
    with pytest.raises(ExamError, match=r"must end in \.yaml, \.yml, \.json"):
        load_exam(path, header)


# --- the content hash ---------------------------------------------------------------------


def _hash(folder: Path, *lines: Any, header: str | None = None) -> str:
    folder.mkdir()
    path = write_exam(folder, *lines)
    if header is not None:
        write_header(folder, header)
    return content_hash(load_exam(path))


def test_the_hash_ignores_formatting(tmp_path: Path) -> None:
    plain = _hash(tmp_path / "a", GOOD, {**GOOD, "id": "q2"})
    reordered = '{ "answer" : "Romance",   "question": "Which genre is emma?", "id": "q1" }'
    as_list = {"id": "q2", "answers": ["Romance"], "question": GOOD["question"]}
    reformatted = _hash(tmp_path / "b", "", reordered, "   ", as_list, "")
    renamed = _hash(tmp_path / "c", GOOD, {**GOOD, "id": "q2"}, header="name: x\nversion: 9\n")
    assert plain == reformatted == renamed
    assert re.fullmatch(r"[0-9a-f]{64}", plain)


def test_the_hash_follows_what_changes_answers(tmp_path: Path) -> None:
    base = _hash(tmp_path / "a", GOOD)
    changed = [
        _hash(tmp_path / "b", {**GOOD, "answer": "Horror"}),
        _hash(tmp_path / "c", GOOD, header='template: "Q: {question}\\nA:"\n'),
        _hash(tmp_path / "d", GOOD, header="generation: {max_new_tokens: 5}\n"),
        _hash(
            tmp_path / "e",
            {"id": "q1", "question": GOOD["question"], "answers": ["Romance", "Love"]},
        ),
        _hash(tmp_path / "f", {**GOOD, "choices": ["Romance", "Horror"]}),
        _hash(tmp_path / "g", {**GOOD, "id": "other"}),
    ]
    assert len({base, *changed}) == 1 + len(changed)


def test_the_hash_is_stable_across_loads() -> None:
    exam: Exam = load_exam(DEMO)
    assert content_hash(exam) == content_hash(load_exam(DEMO))
