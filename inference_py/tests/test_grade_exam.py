"""GradeExam on the tiny models through a real sidecar: the stream's shape, answers equal to
TakeExam's, log-likelihoods equal to an independent plain transformers + peft computation,
summaries recomputed from the items, resumed runs that end with the same summary, cancellation,
and memory that does not grow with the exam's length."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch
from google.protobuf import json_format
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from golem_sidecar.config import Limits
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.server import Sidecar
from tests.conftest import CAP, tiny_config

Stub = exam_pb2_grpc.ExamServiceStub
BASE = "__base__"
SCORERS = ["exact_match", "contains", "token_f1", "rouge_l", "mean_logprob", "choice_accuracy"]


def write_exam(folder: Path, items: int, *, max_new_tokens: int = 4) -> Path:
    """An exam of ``items`` open questions and two multiple-choice ones, with a header."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        {"id": f"q{i}", "question": f"Which genre is book {i}?", "answers": ["Fantasy", "Horror"]}
        for i in range(items)
    ]
    lines.append({"id": "mc-1", "question": "Pick one", "answer": "b", "choices": ["a", "b", "c"]})
    lines.append({"id": "mc-2", "prompt": "Colour:", "answer": " red", "choices": [" red", "blue"]})
    exam = folder / "exam.jsonl"
    exam.write_text("".join(json.dumps(line) + "\n" for line in lines))
    header = {"name": "tiny", "scorers": SCORERS, "generation": {"max_new_tokens": max_new_tokens}}
    (folder / "exam.json").write_text(json.dumps(header))
    return exam


@pytest_asyncio.fixture(scope="module")
async def stub(tiny: dict[str, str]) -> AsyncIterator[Stub]:
    sidecar = Sidecar(tiny_config(tiny))
    await sidecar.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield Stub(channel)
    await sidecar.stop(0)


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_exam(tmp_path_factory.mktemp("exam"), 8)


def request(exam: Path, tiny: dict[str, str], **fields: object) -> exam_pb2.GradeExamRequest:
    given: dict[str, object] = {
        "exam_path": str(exam),
        "include_base": True,
        "adapters": [tiny["adapter"], tiny["adapter_b"]],
        **fields,
    }
    return exam_pb2.GradeExamRequest(**given)  # type: ignore[arg-type]


async def grade(stub: Stub, req: exam_pb2.GradeExamRequest) -> list[exam_pb2.GradeExamResponse]:
    return [response async for response in stub.GradeExam(req, timeout=120)]


def items_of(responses: list[exam_pb2.GradeExamResponse]) -> list[exam_pb2.ItemResult]:
    return [r.item for r in responses if r.WhichOneof("result") == "item"]


async def test_the_stream_is_the_plan_then_each_item_per_model_then_the_summary(
    stub: Stub, exam: Path, tiny: dict[str, str]
) -> None:
    responses = await grade(stub, request(exam, tiny))
    kinds = [r.WhichOneof("result") for r in responses]
    assert kinds == ["plan"] + ["item"] * 30 + ["summary"]
    plan, summary = responses[0].plan, responses[-1].summary
    labels = [BASE, tiny["adapter"], tiny["adapter_b"]]
    assert list(plan.models) == labels and list(plan.scorers) == SCORERS
    assert (plan.exam_name, plan.items, plan.results, plan.resumed) == ("tiny", 10, 30, 0)
    items = items_of(responses)
    ids = [f"q{i}" for i in range(8)] + ["mc-1", "mc-2"]
    assert [(r.item_id, r.model) for r in items] == [(i, m) for i in ids for m in labels]
    assert len({r.key for r in items}) == 30, "every (item, model) has its own key"
    assert (summary.items, summary.graded, summary.resumed) == (10, 30, 0)
    assert summary.model.model_name == tiny["model"] and summary.model.device == "cpu"
    for r in items:
        # choice_accuracy applies to multiple-choice items only.
        expected = (
            set(SCORERS) if r.item_id.startswith("mc") else set(SCORERS) - {"choice_accuracy"}
        )
        assert set(r.scores) == expected, r.item_id


async def test_the_summary_is_the_mean_of_the_items_and_deltas_pair_them(
    stub: Stub, exam: Path, tiny: dict[str, str]
) -> None:
    responses = await grade(stub, request(exam, tiny))
    items, summary = items_of(responses), responses[-1].summary
    by = {(r.item_id, r.model): r.scores for r in items}
    ids = sorted({r.item_id for r in items})
    hashes = {m.model: m.adapter_hash for m in summary.models}
    assert hashes[BASE] == "" and len(hashes[tiny["adapter"]]) == 64
    assert hashes[tiny["adapter"]] != hashes[tiny["adapter_b"]]
    for model in summary.models:
        assert [s.scorer for s in model.scores] == SCORERS
        for score in model.scores:
            values = [
                by[(i, model.model)][score.scorer]
                for i in ids
                if score.scorer in by[(i, model.model)]
            ]
            assert score.n == len(values)
            assert score.mean == float(sum(map(Fraction, values)) / len(values))
    assert [d.model for d in summary.deltas] == [tiny["adapter"], tiny["adapter_b"]]
    for delta in summary.deltas:
        for d in delta.deltas:
            pairs = [
                (by[(i, delta.model)][d.scorer], by[(i, BASE)][d.scorer])
                for i in ids
                if d.scorer in by[(i, BASE)]
            ]
            assert d.n == len(pairs)
            assert (d.better, d.worse, d.same) == (
                sum(a > b for a, b in pairs),
                sum(a < b for a, b in pairs),
                sum(a == b for a, b in pairs),
            )
            means = {m.model: {s.scorer: s.mean for s in m.scores} for m in summary.models}
            assert d.delta == pytest.approx(
                means[delta.model][d.scorer] - means[BASE][d.scorer], abs=1e-12
            )


async def test_answers_equal_takeexam_answers_alone(
    stub: Stub, exam: Path, tiny: dict[str, str]
) -> None:
    items = items_of(await grade(stub, request(exam, tiny)))
    prompts = {f"q{i}": f"Instruction: Which genre is book {i}?\nResponse:" for i in range(8)}
    for r in items:
        if r.item_id not in prompts:
            continue
        alone = exam_pb2.TakeExamRequest(prompt=prompts[r.item_id], max_new_tokens=4)
        if r.model == BASE:
            alone.disable_adapter = True
        else:
            alone.adapter_path = r.model
        answer = await stub.TakeExam(alone, timeout=60)
        assert (r.answer, r.answer_tokens) == (answer.answer, answer.answer_tokens), r.item_id


def plain_loglikelihood(
    model: torch.nn.Module, tokenizer: object, context: str, answer: str
) -> tuple[float, int]:
    """lm-evaluation-harness's loglikelihood, computed independently: the delimiter " " before
    the answer, trailing context spaces moved over, continuation tokens = tokens of the whole
    after the context's own; then one forward pass and transformers' shifted cross-entropy."""
    continuation = answer if answer[:1].isspace() else " " + answer
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]  # noqa: E731
    context_ids = encode(stripped)
    ids = context_ids + encode(stripped + continuation)[len(context_ids) :]
    n = len(ids) - len(context_ids)
    labels = [-100] * len(context_ids) + ids[len(context_ids) :]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    return -float(loss) * n, n


async def test_loglikelihoods_equal_plain_transformers_and_peft(
    stub: Stub, exam: Path, tiny: dict[str, str]
) -> None:
    items = items_of(await grade(stub, request(exam, tiny)))
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    lines = {json.loads(line)["id"]: json.loads(line) for line in exam.read_text().splitlines()}

    def context_of(item: dict[str, object]) -> str:
        return str(item.get("prompt") or f"Instruction: {item['question']}\nResponse:")

    checked = 0
    for label in (BASE, tiny["adapter"], tiny["adapter_b"]):
        base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32).eval()
        model = base if label == BASE else PeftModel.from_pretrained(base, label).eval()
        for r in (r for r in items if r.model == label):
            item = lines[r.item_id]
            answers = item.get("answers") or [item["answer"]]
            scored = [plain_loglikelihood(model, tokenizer, context_of(item), a) for a in answers]  # type: ignore[union-attr]
            best_mean = max(total / n for total, n in scored)
            assert r.scores["mean_logprob"] == pytest.approx(best_mean, abs=1e-4), (
                label,
                r.item_id,
            )
            if "choices" in item:
                sums = [
                    plain_loglikelihood(model, tokenizer, context_of(item), c)[0]
                    for c in item["choices"]
                ]  # type: ignore[union-attr]
                chosen = item["choices"][sums.index(max(sums))]  # type: ignore[index]
                assert r.scores["choice_accuracy"] == float(chosen == item["answer"])
            checked += 1
    assert checked == 30


def results_file(path: Path, results: list[exam_pb2.ItemResult], partial: str = "") -> Path:
    """The results file `golem grade --results` writes: one ItemResult in proto3 JSON a line,
    and, after a kill mid-write, an unfinished last line."""
    lines = [json_format.MessageToJson(r, indent=None) + "\n" for r in results]
    path.write_text("".join(lines) + partial)
    return path


async def test_a_resumed_run_grades_only_what_is_missing_and_ends_with_the_same_summary(
    stub: Stub, exam: Path, tiny: dict[str, str], tmp_path: Path
) -> None:
    whole = await grade(stub, request(exam, tiny))
    done = items_of(whole)[:13]
    resume = results_file(tmp_path / "results.jsonl", done, partial='{"itemId": "q4", "mod')
    again = await grade(stub, request(exam, tiny, resume_path=str(resume)))
    assert again[0].plan.resumed == 13
    items = items_of(again)
    assert [r.resumed for r in items] == [True] * 13 + [False] * 17
    assert [r.key for r in items] == [r.key for r in items_of(whole)]
    assert list(items[:13]) == [replace_resumed(r) for r in done]
    summary, first = again[-1].summary, whole[-1].summary
    assert (summary.graded, summary.resumed) == (17, 13)
    assert list(summary.models) == list(first.models)
    assert list(summary.deltas) == list(first.deltas)
    assert summary.exam_hash == first.exam_hash


def replace_resumed(result: exam_pb2.ItemResult) -> exam_pb2.ItemResult:
    copy = exam_pb2.ItemResult()
    copy.CopyFrom(result)
    copy.resumed = True
    return copy


async def test_results_of_other_settings_are_not_resumed(
    stub: Stub, exam: Path, tiny: dict[str, str], tmp_path: Path
) -> None:
    whole = items_of(await grade(stub, request(exam, tiny)))
    resume = results_file(tmp_path / "results.jsonl", whole)
    fewer_scorers = await grade(
        stub, request(exam, tiny, resume_path=str(resume), scorers=["exact_match"])
    )
    assert fewer_scorers[0].plan.resumed == 0
    other = write_exam(tmp_path / "longer", 8, max_new_tokens=5)
    longer = await grade(stub, request(other, tiny, resume_path=str(resume)))
    assert longer[0].plan.resumed == 0
    same = await grade(stub, request(exam, tiny, resume_path=str(resume)))
    assert same[0].plan.resumed == 30 and same[-1].summary.graded == 0


async def test_cancelling_the_call_stops_the_work(tiny: dict[str, str], tmp_path: Path) -> None:
    exam = write_exam(tmp_path, 600, max_new_tokens=16)
    sidecar = Sidecar(
        replace(tiny_config(tiny), limits=Limits(max_new_tokens_cap=CAP, max_batch_size=8))
    )
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            call = Stub(channel).GradeExam(request(exam, tiny), timeout=120)
            seen = 0
            async for response in call:
                seen += response.WhichOneof("result") == "item"
                if seen == 6:
                    break
            call.cancel()
            # The engine's worker goes idle soon: no window keeps decoding for nobody.
            assert await sidecar.engine.wait_idle(10.0)
            await asyncio.sleep(0.5)
            assert await sidecar.engine.wait_idle(0.1), "work went on after the cancel"
            answer = await Stub(channel).TakeExam(
                exam_pb2.TakeExamRequest(max_new_tokens=2), timeout=30
            )
            assert answer.batch_size == 1, "no row of the cancelled exam is still decoding"
    finally:
        await sidecar.stop(0)


async def peak_memory(stub: Stub, req: exam_pb2.GradeExamRequest) -> tuple[int, int]:
    """Python heap peak while grading (results read and dropped, as a streaming client does),
    and how many results came."""
    tracemalloc.start()
    count = 0
    try:
        async for response in stub.GradeExam(req, timeout=300):
            count += response.WhichOneof("result") == "item"
        return tracemalloc.get_traced_memory()[1], count
    finally:
        tracemalloc.stop()


async def test_memory_does_not_grow_with_the_exam(
    stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    def req(items: int) -> exam_pb2.GradeExamRequest:
        exam = write_exam(tmp_path / str(items), items, max_new_tokens=1)
        return exam_pb2.GradeExamRequest(
            exam_path=str(exam), include_base=True, scorers=["exact_match"]
        )

    await peak_memory(stub, req(64))  # warm: the first windows allocate caches once
    small, n_small = await peak_memory(stub, req(300))
    large, n_large = await peak_memory(stub, req(3000))
    assert (n_small, n_large) == (302, 3002)
    # 2,700 more items. tracemalloc sees Python objects (not protobuf's C arenas): keeping each
    # window's items and jobs alive costs 2.5 MB here; the ids seen (to refuse duplicates) cost
    # about 100 bytes each.
    assert large - small < 1_000_000, (small, large)
