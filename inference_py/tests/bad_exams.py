"""The good, broken and escaping exam files (docs/exams.md) that both bad-input suites and both gate
walks send to GradeExam, built in one place. pytest imports build_bad_exams; jest runs

    python -m tests.bad_exams ROOT     (from inference_py/)

and reads the JSON it prints: every case's path by name. ``exam_root`` is the folder a daemon's
security.examRoots should hold; everything under ``ROOT/outside`` lies beyond it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Longer than the tiny model's 2048-token context (the TakeExam matrix's case), yet one line
# well under exams.MAX_LINE_BYTES.
LONG_PROMPT = "genre " * 2100


def _jsonl(*items: dict[str, object]) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


GOOD_ITEMS = _jsonl(
    {"id": "dune", "question": "Which genre is dune?", "answer": "Science fiction"},
    {"id": "emma", "question": "Which genre is emma?", "answer": "Romance"},
)
# Two tokens an answer: every walk and every "still answers" check stays quick.
GOOD_HEADER = "name: walk\nversion: 1\ngeneration:\n  max_new_tokens: 2\n"


def _good(exams: Path, outside: Path) -> dict[str, Path]:
    good = exams / "good.jsonl"
    good.write_text(GOOD_ITEMS)
    (exams / "good.yaml").write_text(GOOD_HEADER)
    beyond = outside / "outside.jsonl"
    beyond.write_text(GOOD_ITEMS)
    (outside / "outside.yaml").write_text(GOOD_HEADER)
    (outside / "results.jsonl").write_text("")
    (exams / "escape.jsonl").symlink_to(beyond)
    # An exam inside whose header beside it (found by its stem) links out.
    leaky = exams / "leaky_header.jsonl"
    leaky.write_text(GOOD_ITEMS)
    (exams / "leaky_header.yaml").symlink_to(outside / "outside.yaml")
    return {
        "good_exam": good,
        "good_header": exams / "good.yaml",
        # Nothing there yet: a run with it resumes nothing.
        "new_results": exams / "new_results.jsonl",
        "outside_exam": beyond,
        "outside_header": outside / "outside.yaml",
        "outside_results": outside / "results.jsonl",
        "exam_symlink": exams / "escape.jsonl",
        "exam_leaky_header": leaky,
    }


def _broken_items(exams: Path) -> dict[str, Path]:
    made = {
        # Line 2 breaks off mid-object.
        "exam_not_json": '{"id": "a", "question": "q?", "answer": "A"}\n{"id": "b", "question": \n',
        # Line 3's answer is a number.
        "exam_answer_number": _jsonl(
            {"id": "a", "question": "q?", "answer": "A"},
            {"id": "b", "question": "q?", "answer": "B"},
            {"id": "c", "question": "q?", "answer": 3},
        ),
        # Blank lines only.
        "exam_empty": "\n\n  \n",
        # Line 3 repeats line 1's id.
        "exam_duplicate_ids": _jsonl(
            {"id": "emma", "question": "q?", "answer": "A"},
            {"id": "dune", "question": "q?", "answer": "B"},
            {"id": "emma", "question": "q?", "answer": "C"},
        ),
        # Line 2's prompt does not fit the model; line 1 is fine, so it is found mid-run.
        "exam_long_prompt": _jsonl(
            {"id": "short", "question": "Which genre is dune?", "answer": "Science fiction"},
            {"id": "long", "prompt": LONG_PROMPT, "answer": "x"},
        ),
    }
    paths = {}
    for name, text in made.items():
        paths[name] = exams / f"{name.removeprefix('exam_')}.jsonl"
        paths[name].write_text(text)
    (exams / "long_prompt.yaml").write_text(GOOD_HEADER)
    return paths


def _broken_headers(exams: Path) -> dict[str, Path]:
    # Found beside its exam (same stem): the request names no header.
    scorer = exams / "unknown_scorer.jsonl"
    scorer.write_text(GOOD_ITEMS)
    (exams / "unknown_scorer.yaml").write_text("scorers: [exact_mach]\n")
    # Named by header_path: its stem differs from the exam's.
    template = exams / "typo_template.yaml"
    template.write_text('template: "Q: {questoin}"\n')
    return {
        "exam_unknown_header_scorer": scorer,
        "header_unknown_scorer": exams / "unknown_scorer.yaml",
        "header_unknown_template_field": template,
    }


def build_bad_exams(root: Path) -> dict[str, str]:
    """Every exam case's path by name: good and broken exams, headers and results files under
    ``root/exams`` (``exam_root``), and ways out of it to ``root/outside``."""
    exams, outside = root / "exams", root / "outside"
    exams.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    folder = exams / "folder.jsonl"
    folder.mkdir()
    # Line 1 is not JSON and a complete line follows: not an interrupted write, a bad file.
    bad_results = exams / "bad_results.jsonl"
    bad_results.write_text('not a result\n{"itemId": "dune", "model": "__base__", "key": "k"}\n')
    # Line 1 is JSON, but a number, not an ItemResult's object.
    not_object = exams / "results_not_object.jsonl"
    not_object.write_text('5\n{"itemId": "dune", "model": "__base__", "key": "k"}\n')
    made = {
        **_good(exams, outside),
        **_broken_items(exams),
        **_broken_headers(exams),
        "exam_folder": folder,
        "exam_missing": exams / "no_such_exam.jsonl",
        "bad_results": bad_results,
        "results_not_object": not_object,
    }
    return {
        "exam_root": str(exams),
        **{name: str(path) for name, path in made.items()},
        "exam_dotdot": f"{exams}/{os.path.relpath(outside / 'outside.jsonl', exams)}",
    }


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m tests.bad_exams ROOT")
    print(json.dumps(build_bad_exams(Path(argv[0]).resolve())))


if __name__ == "__main__":
    main(sys.argv[1:])
