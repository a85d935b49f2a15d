"""Random TakeExamRequests thrown at the real sidecar over gRPC: every call ends, in time, either
with an answer or with one of the documented codes and an ErrorInfo reason; and the sidecar
still serves afterwards."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from tests.rpc import failure

DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Proto strings are UTF-8, which has no lone surrogates.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
WHITESPACE = st.text(" \t\n\r\u00a0\u2003", max_size=5)


def _maybe(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.none() | strategy


@st.composite
def requests(draw: st.DrawFn, paths: dict[str, str]) -> exam_pb2.TakeExamRequest:
    known_paths = st.sampled_from(
        [
            *paths.values(),
            "",
            ".",
            "..",
            "/",
            "../Quest_2/results/checkpoint-250",
            f"{paths['adapter']}/../adapter",
            f"{paths['model']}/../../missing",
            "/no/such/model.gguf",
            "golem-test/not-cached",
            "~",
            "a" * 300,
        ]
    )
    fields: dict[str, object] = {
        "model_name": draw(_maybe(st.sampled_from([paths["model"]]) | known_paths | TEXT)),
        "adapter_path": draw(_maybe(known_paths | TEXT | WHITESPACE)),
        "prompt": draw(_maybe(TEXT | WHITESPACE | st.just("Instruction: Which genre?"))),
        "max_new_tokens": draw(_maybe(st.integers(1, 4) | st.integers(-(2**31), 2**31 - 1))),
        "device": draw(
            _maybe(
                st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:7", "mps", "tpu", " cpu"])
                | TEXT
            )
        ),
        "expected_answer": draw(_maybe(TEXT | WHITESPACE)),
        "disable_adapter": draw(st.booleans()),
    }
    request = exam_pb2.TakeExamRequest(**{k: v for k, v in fields.items() if v is not None})
    if draw(st.booleans()):
        quantization = exam_pb2.Quantization()
        load = draw(_maybe(st.booleans()))
        if load is not None:
            quantization.load_in_4bit = bool(load)
        dtype = draw(
            _maybe(st.sampled_from(["float16", "torch.bfloat16", "float32", "int8"]) | TEXT)
        )
        if dtype is not None:
            quantization.bnb_4bit_compute_dtype = str(dtype)
        request.quantization.CopyFrom(quantization)
    return request


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
async def test_random_requests_end_in_an_answer_or_a_documented_refusal(
    channel: grpc.aio.Channel, tiny: dict[str, str], bad: dict[str, str], data: st.DataObject
) -> None:
    paths = {**tiny, **{k: v for k, v in bad.items() if not k.startswith("remote_code")}}
    request = data.draw(requests(paths), label="request")
    stub = exam_pb2_grpc.ExamServiceStub(channel)
    try:
        # A hang would end as DEADLINE_EXCEEDED, which is not a documented answer.
        response = await stub.TakeExam(request, timeout=30)
    except grpc.aio.AioRpcError as err:
        got = failure(err)
        assert got.code in DOCUMENTED, (got.code, got.message)
        assert got.reason, f"{got.code} without an ErrorInfo reason: {got.message}"
    else:
        assert 0 <= response.answer_tokens <= max(request.max_new_tokens, 8)
    health = health_pb2_grpc.HealthStub(channel)
    status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_sidecar_still_answers_after_the_random_requests(
    stub: exam_pb2_grpc.ExamServiceStub,
) -> None:
    after = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=2), timeout=30)
    assert after.answer_tokens > 0
