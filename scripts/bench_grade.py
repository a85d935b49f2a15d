"""GradeExam against the best plain transformers + peft a user writes by hand, side by side in
one run, on the embedded default (SmolLM2-135M-Instruct GGUF and the demo genre adapter).

    scripts/bench_grade [--repeat R] [--adapters K] [--out FILE]

The workload is the demo exam (data/exams/genres.jsonl, its header's scorers and
max_new_tokens) repeated R times under unique ids, graded by the bare base and the demo adapter
(and K perturbed copies of it). golem: an in-process sidecar with config/golem.json, base and
adapters loaded and warm, timed from the GradeExam call to its summary. Plain
(scripts/bench_grade_plain.py): the same base and dtype, each model in turn answering in padded
generate batches of 32 and scoring in padded teacher-forced batches of 32, timed likewise after
loading (its forward takes the log-softmax over every position, as a user writes it; golem's
keeps the answer positions only). Checks: every golem answer equals plain's, every mean_logprob
is within 1e-4 of plain's, every choice_accuracy is equal; anything else is printed (a differing
answer with plain's answer to its prompt alone, which tells batch-shape float differences apart)
and makes the exit status 1.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from bench import ROOT, perturbed_copies, progress
from bench_grade_plain import BASE, Item, generate, grade, load_model, read_exam, wearing
from bench_report import machine, table

from golem_sidecar.config import SidecarConfig, load_config
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.placement import default_placement
from golem_sidecar.server import Sidecar

EXAM = ROOT / "data" / "exams" / "genres.jsonl"
TOLERANCE = 1e-4
SHOWN_DIFFERENCES = 10


def repeated_exam(folder: Path, repeat: int) -> Path:
    """The demo exam ``repeat`` times over, each copy's ids suffixed, with the same header."""
    lines = [line for line in EXAM.read_text(encoding="utf-8").splitlines() if line.strip()]
    copies = [
        line.replace('{"id": "', f'{{"id": "r{k}-', 1) for k in range(repeat) for line in lines
    ]
    exam = folder / "genres.jsonl"
    exam.write_text("\n".join(copies) + "\n", encoding="utf-8")
    shutil.copy(EXAM.with_suffix(".yaml"), folder / "genres.yaml")
    return exam


async def golem_grade(
    config: SidecarConfig, exam: Path, adapters: list[str]
) -> tuple[float, dict[tuple[str, str], Any], Any]:
    """Wall time from the GradeExam call to its summary, the results by (item id, model), and
    the summary. The base is preloaded and every model warmed by a TakeExam call first."""
    server = Sidecar(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = exam_pb2_grpc.ExamServiceStub(channel)
            await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=2, disable_adapter=True))
            for adapter in adapters:
                await stub.TakeExam(
                    exam_pb2.TakeExamRequest(max_new_tokens=2, adapter_path=adapter)
                )
            request = exam_pb2.GradeExamRequest(
                exam_path=str(exam), include_base=True, adapters=adapters
            )
            started = time.perf_counter()
            responses = [r async for r in stub.GradeExam(request)]
            wall = time.perf_counter() - started
    finally:
        await server.stop(0)
    results = {(r.item.item_id, r.item.model): r.item for r in responses if r.HasField("item")}
    return wall, results, responses[-1].summary


Results = dict[tuple[str, str], Any]


def compare(golem: Results, plain: Results) -> dict[str, Any]:
    """The checks: equal answers, mean_logprob within TOLERANCE, equal choice_accuracy."""
    gaps = [
        abs(golem[key].scores["mean_logprob"] - scores["mean_logprob"])
        for key, (_, scores) in plain.items()
    ]
    choices = [key for key, (_, scores) in plain.items() if "choice_accuracy" in scores]
    return {
        "differing": [key for key in plain if golem[key].answer != plain[key][0]],
        "logprob_close": sum(gap <= TOLERANCE for gap in gaps),
        "largest_gap": max(gaps),
        "choices": len(choices),
        "choices_equal": sum(
            golem[key].scores["choice_accuracy"] == plain[key][1]["choice_accuracy"]
            for key in choices
        ),
    }


def explain(
    model: Any, tokenizer: Any, item: Item, label: str, answers: tuple[str, str], tokens: int
) -> str:
    """A differing answer and its likely cause: plain answering the prompt alone (batch of 1)
    tells padded-batch float differences apart from a real difference."""
    with wearing(model, label):
        alone = generate(model, tokenizer, [item.prompt], tokens)[0]
    golem, plain = answers
    if alone == golem:
        cause = "golem equals plain alone: float differences from the batch's shape"
    else:
        cause = f"plain alone: {alone!r}"
    return f"{item.id} / {_short(label)}: golem {golem!r}, plain {plain!r} ({cause})"


def _short(label: str) -> str:
    return label if label == BASE else Path(label).name


def plain_mean(plain: Results, label: str, scorer: str) -> float:
    values = [s[scorer] for (_, model), (_, s) in plain.items() if model == label and scorer in s]
    return sum(values) / len(values)


def render(run: dict[str, Any], checks: dict[str, Any], summary: Any, plain: Results) -> str:
    n, golem_s, plain_s = run["results"], run["golem_s"], run["plain_s"]
    means = [
        [_short(m.model), s.scorer, f"{s.mean:.4f}", f"{plain_mean(plain, m.model, s.scorer):.4f}"]
        for m in summary.models
        for s in m.scores
    ]
    lines = [
        "# GradeExam against plain transformers + peft",
        "",
        "Run it on an otherwise idle machine: on 2 cores, two torch processes slow each other by"
        " 10x and more, so a run beside test suites gives meaningless figures.",
        "",
        f"Machine: {machine()}. Load average (1 min) {run['load_before']:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after: the figures are only as quiet as the machine was.",
        f"Command: `{run['command']}`.",
        f"Exam: {run['exam']}. Models: {', '.join(map(_short, run['labels']))}. "
        f"Base: {run['base']}.",
        "",
        table(
            ["run", "wall s", "results", "results/s"],
            [
                ["golem, one GradeExam call", f"{golem_s:.2f}", str(n), f"{n / golem_s:.1f}"],
                ["plain, batches of 32", f"{plain_s:.2f}", str(n), f"{n / plain_s:.1f}"],
                ["plain / golem", f"{plain_s / golem_s:.2f}x", "", ""],
            ],
        ),
        "",
        f"- answers equal to plain's: {n - len(checks['differing'])}/{n}",
        f"- mean_logprob within {TOLERANCE:g} of plain's: {checks['logprob_close']}/{n} "
        f"(largest difference {checks['largest_gap']:.1e})",
        f"- choice_accuracy equal to plain's: {checks['choices_equal']}/{checks['choices']}",
        *(f"- differs: {line}" for line in run["differences"]),
        "",
        table(["model", "scorer", "golem mean", "plain mean"], means),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=8, help="copies of the demo exam (25 items)")
    parser.add_argument("--adapters", type=int, default=0, help="perturbed adapter copies, 0..7")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    if args.repeat < 1 or not 0 <= args.adapters <= 7:
        parser.error("--repeat is at least 1, --adapters 0 to 7 (GradeExam takes 8 adapters)")
    config = load_config(str(ROOT / "config" / "golem.json"), None, "127.0.0.1:0")
    shown = config.defaults.model_name  # as config/golem.json names it
    model = str(ROOT / shown)
    adapter = str(ROOT / config.defaults.adapter_path)
    defaults = replace(config.defaults, model_name=model, adapter_path=adapter)
    config = replace(config, defaults=defaults)
    placement = default_placement(defaults)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="golem-bench-grade-") as tmp:
        exam = repeated_exam(Path(tmp), args.repeat)
        copies = perturbed_copies(Path(adapter), Path(tmp) / "copies", args.adapters)
        adapters, labels = [adapter, *copies], [BASE, adapter, *copies]
        progress("golem: GradeExam")
        golem_s, golem, summary = asyncio.run(golem_grade(config, exam, adapters))
        progress("plain: loading, then grading")
        items, header = read_exam(exam)
        peft_model, tokenizer = load_model(model, placement, adapters)
        tokens = header["generation"]["max_new_tokens"]
        generate(peft_model, tokenizer, [items[0].prompt] * 2, 2)  # warm-up
        started = time.perf_counter()
        plain = grade(peft_model, tokenizer, items, labels, header)
        plain_s = time.perf_counter() - started
        checks = compare(golem, plain)
        by_id = {item.id: item for item in items}
        differences = [
            explain(
                peft_model, tokenizer, by_id[i], m, (golem[i, m].answer, plain[i, m][0]), tokens
            )
            for i, m in checks["differing"][:SHOWN_DIFFERENCES]
        ]
    if len(checks["differing"]) > SHOWN_DIFFERENCES:
        differences.append(f"and {len(checks['differing']) - SHOWN_DIFFERENCES} more")
    choices = sum(bool(item.choices) for item in items)
    run = {
        "command": shlex.join(["scripts/bench_grade", *sys.argv[1:]]),
        "exam": f"{EXAM.relative_to(ROOT)} x {args.repeat} = {len(items)} items ({choices} "
        f"multiple choice), scorers {', '.join(header['scorers'])}, greedy, at most {tokens} "
        "new tokens",
        "labels": labels,
        "base": f"{shown}, {placement.device}, {placement.dtype}",
        "load_before": load_before,
        "results": len(plain),
        "golem_s": golem_s,
        "plain_s": plain_s,
        "differences": differences,
    }
    report = render(run, checks, summary, plain)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    n = len(plain)
    failed = checks["differing"] or checks["logprob_close"] < n
    return 1 if failed or checks["choices_equal"] < checks["choices"] else 0


if __name__ == "__main__":
    sys.exit(main())
