"""The ExamService over real gRPC, on a real sidecar serving the tiny model."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from tests.conftest import CAP
from tests.rpc import failure

Stub = exam_pb2_grpc.ExamServiceStub


async def _error(call: object) -> tuple[grpc.aio.AioRpcError, str, list[str]]:
    """The error a call ended with, its ErrorInfo reason and the fields its BadRequest names."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    err = info.value
    assert rpc_status.from_call(err) is not None, "every error carries google.rpc.Status details"  # type: ignore[arg-type]
    found = failure(err)
    return err, found.reason or "", list(found.fields)


async def test_answers_with_the_defaults_and_reports_what_it_used(
    stub: Stub, tiny: dict[str, str]
) -> None:
    response = await stub.TakeExam(exam_pb2.TakeExamRequest())
    assert response.full_text.startswith("Instruction: Which genre is the hobbit?\nResponse:")
    assert response.full_text.endswith(response.answer)
    assert response.prompt_tokens > 0
    assert 0 < response.answer_tokens <= 8
    assert response.model.model_name == tiny["model"]
    assert (response.model.device, response.model.dtype) == ("cpu", "float32")
    assert response.model.quantization.HasField("load_in_4bit")
    assert response.model.quantization.load_in_4bit is False
    assert response.adapter.path == tiny["adapter"]
    assert response.adapter.base_model_name_or_path == tiny["model"]
    assert response.adapter.peft_type == "LORA"
    assert response.finish_reason in (exam_pb2.FINISH_REASON_LENGTH, exam_pb2.FINISH_REASON_EOS)
    assert response.timings.generate_ns > 0
    assert not response.HasField("grade")


async def test_resident_model_and_adapter_are_not_loaded_again(
    stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    # A copy in a fresh folder is an adapter this sidecar has never seen.
    fresh = shutil.copytree(tiny["adapter_b"], tmp_path / "fresh")
    request = exam_pb2.TakeExamRequest(adapter_path=str(fresh), max_new_tokens=2)
    first = await stub.TakeExam(request)
    second = await stub.TakeExam(request)
    assert first.timings.load_ns > 0, "the first use of adapter_b attaches it"
    assert second.timings.load_ns == 0


async def test_grade_when_expected_answer_is_given(stub: Stub) -> None:
    plain = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=4))
    graded = await stub.TakeExam(
        exam_pb2.TakeExamRequest(max_new_tokens=4, expected_answer=plain.answer.upper())
    )
    assert graded.answer == plain.answer
    assert graded.HasField("grade")
    if graded.grade.normalized_answer:
        assert graded.grade.rule == exam_pb2.GRADE_RULE_EXACT_MATCH
        assert graded.grade.score == 1.0
    missed = await stub.TakeExam(
        exam_pb2.TakeExamRequest(max_new_tokens=4, expected_answer="Science fiction")
    )
    assert 0.0 <= missed.grade.score <= 1.0


async def test_missing_adapter_is_not_found_with_details(stub: Stub) -> None:
    err, reason, fields = await _error(
        stub.TakeExam(exam_pb2.TakeExamRequest(adapter_path="../Quest_2/results/checkpoint-250"))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert reason == "ADAPTER_NOT_FOUND"
    assert fields == ["adapter_path"]
    assert "checkpoint-250" in (err.details() or "")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (exam_pb2.TakeExamRequest(max_new_tokens=0), "max_new_tokens"),
        (exam_pb2.TakeExamRequest(max_new_tokens=-3), "max_new_tokens"),
        (exam_pb2.TakeExamRequest(max_new_tokens=CAP + 1), "max_new_tokens"),
        (exam_pb2.TakeExamRequest(prompt="   "), "prompt"),
        (exam_pb2.TakeExamRequest(model_name=""), "model_name"),
        (exam_pb2.TakeExamRequest(device="tpu"), "device"),
        (
            exam_pb2.TakeExamRequest(
                quantization=exam_pb2.Quantization(bnb_4bit_compute_dtype="int3")
            ),
            "quantization.bnb_4bit_compute_dtype",
        ),
    ],
)
async def test_invalid_fields_are_named(
    stub: Stub, request_: exam_pb2.TakeExamRequest, field: str
) -> None:
    err, reason, fields = await _error(stub.TakeExam(request_))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason
    assert fields == [field]


async def test_unknown_local_model_is_not_found(stub: Stub) -> None:
    err, reason, fields = await _error(
        stub.TakeExam(exam_pb2.TakeExamRequest(model_name="./no/such/model", disable_adapter=True))
    )
    assert (err.code(), reason, fields) == (
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        ["model_name"],
    )


async def test_hub_id_unreachable_offline_is_not_found(stub: Stub) -> None:
    err, reason, _ = await _error(
        stub.TakeExam(
            exam_pb2.TakeExamRequest(model_name="golem-test/not-cached", disable_adapter=True)
        )
    )
    assert (err.code(), reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert "offline" in (err.details() or "")


async def test_prompt_longer_than_the_context_is_refused(stub: Stub) -> None:
    err, reason, fields = await _error(
        stub.TakeExam(exam_pb2.TakeExamRequest(prompt="genre " * 2100, max_new_tokens=2))
    )
    assert (err.code(), reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PROMPT_TOO_LONG",
        ["prompt"],
    )


async def test_health_is_serving_and_answers_during_a_generation(
    stub: Stub, channel: grpc.aio.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    long_exam = asyncio.ensure_future(
        stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=CAP, prompt="genre " * 100))
    )
    checks = 0
    while not long_exam.done():
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="golem.exam.v1.ExamService"), timeout=1
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        checks += 1
        await asyncio.sleep(0.005)
    await long_exam
    assert checks >= 1


async def test_a_caller_past_its_deadline_does_not_stop_the_service(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=CAP), timeout=0.001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=2))
    assert after.answer_tokens > 0


async def test_reflection_lists_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = []
    async for reply in stub.ServerReflectionInfo(requests()):
        names = [s.name for s in reply.list_services_response.service]
    assert "golem.exam.v1.ExamService" in names
    assert "grpc.health.v1.Health" in names
