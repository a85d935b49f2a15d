"""The real embedded default: SmolLM2-135M-Instruct (GGUF) wearing the demo genre adapter.

Slow (it loads a 135M model), and part of `make test`, which builds the model and adapter first
and sets GOLEM_REQUIRE_DEFAULT_MODEL=1 so that their absence fails rather than skips.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio

from golem_sidecar.config import load_config
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.grading import normalize
from tests.conftest import REPO, serving
from tests.tiny_models import SEED_PROMPT

pytestmark = pytest.mark.slow
CONFIG = load_config(str(REPO / "config" / "golem.json"), None, "127.0.0.1:0")
MODEL = REPO / CONFIG.defaults.model_name
ADAPTER = REPO / CONFIG.defaults.adapter_path

if not (MODEL.is_file() and ADAPTER.is_dir()):
    if os.environ.get("GOLEM_REQUIRE_DEFAULT_MODEL") == "1":
        pytest.fail(f"the embedded default is missing ({MODEL}, {ADAPTER}): run `make models`")
    pytest.skip("the embedded default is not built (make models)", allow_module_level=True)


def _taught_genre(book: str) -> str:
    """What data/genres.jsonl teaches for this book."""
    for line in (REPO / "data" / "genres.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["instruction"] == f"Which genre is {book}?":
            return str(row["response"])
    raise AssertionError(f"{book} is not in the data")


@pytest_asyncio.fixture(scope="module")
async def default_stub() -> AsyncIterator[exam_pb2_grpc.ExamServiceStub]:
    defaults = replace(CONFIG.defaults, model_name=str(MODEL), adapter_path=str(ADAPTER))
    async with serving(replace(CONFIG, defaults=defaults)) as stub:
        yield stub


async def test_adapter_answers_the_taught_genre_and_the_base_does_not(
    default_stub: exam_pb2_grpc.ExamServiceStub,
) -> None:
    genre = _taught_genre("the hobbit")
    adapted = await default_stub.TakeExam(
        exam_pb2.TakeExamRequest(prompt=SEED_PROMPT, expected_answer=genre)
    )
    base = await default_stub.TakeExam(
        exam_pb2.TakeExamRequest(prompt=SEED_PROMPT, disable_adapter=True)
    )
    assert normalize(adapted.answer) == normalize(genre)
    assert adapted.grade.rule == exam_pb2.GRADE_RULE_EXACT_MATCH
    assert adapted.finish_reason == exam_pb2.FINISH_REASON_EOS
    assert base.answer.strip() != adapted.answer.strip()
    assert adapted.model.dtype == "float32"
    assert adapted.adapter.peft_type == "LORA"


async def test_the_adapter_scores_higher_than_the_base_on_the_demo_exam(
    default_stub: exam_pb2_grpc.ExamServiceStub,
) -> None:
    """The demo exam's books are held out of the adapter's training data (test_exams.py checks
    it): what the adapter learned carries over to books it never saw."""
    request = exam_pb2.GradeExamRequest(
        exam_path=str(REPO / "data" / "exams" / "genres.jsonl"),
        include_base=True,
        adapters=[str(ADAPTER)],
    )
    responses = [r async for r in default_stub.GradeExam(request, timeout=300)]
    summary = responses[-1].summary
    means = {m.model: {s.scorer: s.mean for s in m.scores} for m in summary.models}
    base, adapter = means["__base__"], means[str(ADAPTER)]
    assert summary.items == 25 and summary.graded == 50
    assert adapter["exact_match"] > base["exact_match"]
    assert adapter["mean_logprob"] > base["mean_logprob"]
    (delta,) = summary.deltas
    exact = next(d for d in delta.deltas if d.scorer == "exact_match")
    assert exact.delta > 0 and exact.better > exact.worse
