"""The adapter registry (LoadAdapter, UnloadAdapter, ListAdapters) and CompareAdapters."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from golem_sidecar.config import Limits
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.server import Sidecar
from tests.conftest import CAP, tiny_config
from tests.tiny_models import SEED_PROMPT, build_adapter, build_model

Stub = exam_pb2_grpc.ExamServiceStub


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


def _copies(tiny: dict[str, str], root: Path, count: int) -> list[str]:
    """Fresh folders (new to any sidecar) holding the tiny adapters."""
    sources = [tiny["adapter"], tiny["adapter_b"]]
    return [str(shutil.copytree(sources[i % 2], root / f"copy_{i}")) for i in range(count)]


@pytest_asyncio.fixture
async def two_slot_stub(tiny: dict[str, str]) -> AsyncIterator[Stub]:
    """A sidecar that keeps at most two adapters resident."""
    limits = Limits(max_new_tokens_cap=CAP, max_adapters=2)
    sidecar = Sidecar(replace(tiny_config(tiny), limits=limits))
    await sidecar.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield exam_pb2_grpc.ExamServiceStub(channel)
    await sidecar.stop(0)


async def test_a_named_adapter_answers_like_its_path(
    stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    (path,) = _copies(tiny, tmp_path, 1)
    loaded = await stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="genre-a", adapter_path=path))
    assert loaded.adapter.name == "genre-a" and loaded.load_ns > 0
    by_name = await stub.TakeExam(exam_pb2.TakeExamRequest(adapter_name="genre-a"))
    by_path = await stub.TakeExam(exam_pb2.TakeExamRequest(adapter_path=tiny["adapter"]))
    assert by_name.answer == by_path.answer
    assert by_name.adapter.path == path
    listed = await stub.ListAdapters(exam_pb2.ListAdaptersRequest())
    entry = next(a for a in listed.adapters if a.name == "genre-a")
    assert entry.uses >= 1 and entry.adapter.peft_type == "LORA"
    await stub.UnloadAdapter(exam_pb2.UnloadAdapterRequest(name="genre-a"))
    code, _ = await _code(stub.TakeExam(exam_pb2.TakeExamRequest(adapter_name="genre-a")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_least_recently_used_adapter_is_evicted(
    two_slot_stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    a, b, c = _copies(tiny, tmp_path, 3)
    # The default adapter was preloaded: it is the least recently used now.
    for name, path in (("a", a), ("b", b)):
        await two_slot_stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name=name, adapter_path=path))
    await two_slot_stub.TakeExam(exam_pb2.TakeExamRequest(adapter_name="a", max_new_tokens=1))
    await two_slot_stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="c", adapter_path=c))
    listed = await two_slot_stub.ListAdapters(exam_pb2.ListAdaptersRequest())
    assert [x.name for x in listed.adapters] == ["a", "c"]
    code, details = await _code(two_slot_stub.TakeExam(exam_pb2.TakeExamRequest(adapter_name="b")))
    assert code == grpc.StatusCode.NOT_FOUND and "LoadAdapter" in details


async def test_names_are_checked(stub: Stub, tiny: dict[str, str]) -> None:
    code, details = await _code(
        stub.LoadAdapter(
            exam_pb2.LoadAdapterRequest(name="no spaces", adapter_path=tiny["adapter"])
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("name:")
    await stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="taken", adapter_path=tiny["adapter"]))
    # Other weights under a taken name: refused (issue 7: a name never changes its weights).
    code, _ = await _code(
        stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="taken", adapter_path=tiny["adapter_b"]))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    # The same weights again, under the same name: nothing to do.
    again = await stub.LoadAdapter(
        exam_pb2.LoadAdapterRequest(name="taken", adapter_path=tiny["adapter"] + "/")
    )
    assert again.load_ns == 0
    code, _ = await _code(
        stub.TakeExam(exam_pb2.TakeExamRequest(adapter_name="taken", adapter_path=tiny["adapter"]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await stub.UnloadAdapter(exam_pb2.UnloadAdapterRequest(name="taken"))


async def test_an_adapter_for_another_base_is_refused_and_serving_goes_on(
    stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    wider = build_model(tmp_path / "wider", hidden_size=96)
    foreign = build_adapter(wider, tmp_path / "foreign", seed=3)
    before = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=8))
    code, _ = await _code(
        stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="foreign", adapter_path=str(foreign)))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    after = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=8))
    assert after.answer == before.answer
    listed = await stub.ListAdapters(exam_pb2.ListAdaptersRequest())
    assert "foreign" not in [a.name for a in listed.adapters]


async def test_unloading_an_adapter_in_use_spares_the_running_request(
    stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    (path,) = _copies(tiny, tmp_path, 1)
    await stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="busy", adapter_path=path))
    long_exam = exam_pb2.TakeExamRequest(adapter_name="busy", max_new_tokens=CAP, prompt="a " * 40)
    alone = await stub.TakeExam(long_exam)
    running = asyncio.ensure_future(stub.TakeExam(long_exam))
    await asyncio.sleep(0.02)
    await stub.UnloadAdapter(exam_pb2.UnloadAdapterRequest(name="busy"))
    assert (await running).answer == alone.answer


def _plain_mean_logprob(tiny: dict[str, str], prompt: str, answer_ids: list[int]) -> float:
    """Teacher-forced mean log-probability of answer_ids after prompt, under the bare base."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    picked = logprobs[len(prompt_ids) - 1 :].gather(-1, ids[0, len(prompt_ids) :, None])
    return float(picked.mean())


async def test_compare_answers_like_single_exams_and_scores_each_answer(
    stub: Stub, tiny: dict[str, str]
) -> None:
    prompts = [SEED_PROMPT, "The quick brown"]
    await stub.LoadAdapter(
        exam_pb2.LoadAdapterRequest(name="cmp-b", adapter_path=tiny["adapter_b"])
    )
    compared = await stub.CompareAdapters(
        exam_pb2.CompareAdaptersRequest(
            prompts=prompts, adapters=[tiny["adapter"], "cmp-b"], max_new_tokens=8
        )
    )
    assert [c.prompt for c in compared.comparisons] == prompts
    labels = ["__base__", tiny["adapter"], "cmp-b"]
    for comparison in compared.comparisons:
        assert [a.model for a in comparison.answers] == labels
        singles = [
            exam_pb2.TakeExamRequest(
                prompt=comparison.prompt, max_new_tokens=8, disable_adapter=True
            ),
            exam_pb2.TakeExamRequest(
                prompt=comparison.prompt, max_new_tokens=8, adapter_path=tiny["adapter"]
            ),
            exam_pb2.TakeExamRequest(
                prompt=comparison.prompt, max_new_tokens=8, adapter_name="cmp-b"
            ),
        ]
        for answer, single in zip(comparison.answers, singles, strict=True):
            assert answer.answer == (await stub.TakeExam(single)).answer
            assert set(answer.mean_logprob) == set(labels)
            assert all(math.isfinite(v) and v <= 0 for v in answer.mean_logprob.values())
    # The base's answer scored under the base, against plain transformers.
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    first = compared.comparisons[0].answers[0]
    ids = tokenizer(SEED_PROMPT + first.answer)["input_ids"][
        len(tokenizer(SEED_PROMPT)["input_ids"]) :
    ]
    if len(ids) == first.answer_tokens:  # the text re-tokenizes to the same ids
        expected = _plain_mean_logprob(tiny, SEED_PROMPT, ids)
        assert first.mean_logprob["__base__"] == pytest.approx(expected, abs=1e-4)
    await stub.UnloadAdapter(exam_pb2.UnloadAdapterRequest(name="cmp-b"))


async def test_compare_checks_its_lists(stub: Stub, tiny: dict[str, str]) -> None:
    for request, field in [
        (exam_pb2.CompareAdaptersRequest(adapters=[tiny["adapter"]]), "prompts"),
        (exam_pb2.CompareAdaptersRequest(prompts=["x"]), "adapters"),
        (
            exam_pb2.CompareAdaptersRequest(prompts=["x"], adapters=[tiny["adapter"]] * 2),
            "adapters",
        ),
        (exam_pb2.CompareAdaptersRequest(prompts=["x"], adapters=["never-loaded"]), "adapters"),
    ]:
        code, details = await _code(stub.CompareAdapters(request))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert details.startswith(field)


async def test_an_adapter_recording_another_base_is_refused_and_detached(
    stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    (path,) = _copies(tiny, tmp_path, 1)
    config = Path(path) / "adapter_config.json"
    config.write_text(config.read_text().replace(tiny["model"], "other-org/other-model"))
    before = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=8, disable_adapter=True))
    code, details = await _code(
        stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="elsewhere", adapter_path=path))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "other-org/other-model" in details
    code, _ = await _code(stub.TakeExam(exam_pb2.TakeExamRequest(adapter_path=path)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    after = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=8, disable_adapter=True))
    assert after.answer == before.answer
    listed = await stub.ListAdapters(exam_pb2.ListAdaptersRequest())
    assert all(a.adapter.path != path for a in listed.adapters)


@pytest.mark.parametrize(
    ("recorded", "model", "same"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "models/SmolLM2-135M-Instruct.Q4_1.gguf", True),
        ("models/a/model", "/elsewhere/model", True),
        ("", "anything", True),
        ("distilgpt2", "gpt2", False),
        ("org/llama-7b", "org/mistral-7b", False),
    ],
)
def test_same_base_ignores_folders_formats_and_quantization(
    recorded: str, model: str, same: bool
) -> None:
    from golem_sidecar.models import same_base

    assert same_base(recorded, model) is same
