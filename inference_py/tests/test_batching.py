"""Many callers at once: dynamic batching over mixed adapters, sampling, stop sequences,
streaming, cancellation and backpressure, all on a real sidecar serving the tiny model."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from golem_sidecar.config import Limits
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.server import Sidecar
from tests.conftest import CAP, serving, tiny_config
from tests.test_generation import _decode, _plain_answer
from tests.tiny_models import SEED_PROMPT

Stub = exam_pb2_grpc.ExamServiceStub
PROMPTS = [SEED_PROMPT, "The quick brown", "Instruction: Which genre is Dune?\nResponse:", "Books"]


@pytest.fixture(scope="module")
def three_adapters(tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """adapter, adapter_b, and a third one: adapter_b's weights negated, so it differs again."""
    from safetensors.torch import load_file, save_file

    third = tmp_path_factory.mktemp("third") / "adapter_c"
    shutil.copytree(tiny["adapter_b"], third)
    weights = load_file(third / "adapter_model.safetensors")
    save_file({k: -v for k, v in weights.items()}, third / "adapter_model.safetensors")
    return [tiny["adapter"], tiny["adapter_b"], str(third)]


def _mixed_requests(adapters: list[str], count: int) -> list[exam_pb2.TakeExamRequest]:
    choices = [*adapters, None]  # None: the bare base
    requests = []
    for i in range(count):
        adapter = choices[i % len(choices)]
        request = exam_pb2.TakeExamRequest(
            prompt=PROMPTS[(i // len(choices)) % len(PROMPTS)], max_new_tokens=6 + i % 11
        )
        if adapter is None:
            request.disable_adapter = True
        else:
            request.adapter_path = adapter
        requests.append(request)
    return requests


async def test_64_concurrent_mixed_requests_answer_as_they_do_alone(
    stub: Stub, tiny: dict[str, str], three_adapters: list[str]
) -> None:
    requests = _mixed_requests(three_adapters, 64)
    alone = [await stub.TakeExam(r) for r in requests]
    together = await asyncio.gather(*(stub.TakeExam(r) for r in requests))
    assert [r.answer for r in together] == [r.answer for r in alone]
    assert [r.answer_tokens for r in together] == [r.answer_tokens for r in alone]
    assert max(r.batch_size for r in together) > 1, "concurrent requests share batches"
    # And alone means what plain peft gives, for one request of each adapter and the base.
    for request, response in list(zip(requests, alone, strict=True))[:4]:
        adapter = request.adapter_path if request.HasField("adapter_path") else None
        expected = _plain_answer(tiny["model"], adapter, request.prompt, request.max_new_tokens)
        assert response.answer == _decode(tiny["model"], expected)


async def test_a_seed_gives_the_same_sample_alone_or_in_a_batch(stub: Stub) -> None:
    def sampled(seed: int) -> exam_pb2.TakeExamRequest:
        return exam_pb2.TakeExamRequest(
            max_new_tokens=12, temperature=1.3, top_p=0.95, top_k=50, seed=seed
        )

    alone = (await stub.TakeExam(sampled(7))).answer
    crowd = await asyncio.gather(
        *(stub.TakeExam(sampled(s)) for s in [7, 8, 9, 7, 10, 11]), stub.TakeExam(sampled(7))
    )
    assert [crowd[0].answer, crowd[3].answer, crowd[6].answer] == [alone] * 3
    assert len({r.answer for r in crowd}) > 1, "different seeds sample differently"


async def test_stop_sequence_ends_the_answer_before_it(stub: Stub) -> None:
    full = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=20))
    stop = full.answer[len(full.answer) // 2 : len(full.answer) // 2 + 2]
    cut = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=20, stop=[stop]))
    assert cut.finish_reason == exam_pb2.FINISH_REASON_STOP
    assert cut.answer == full.answer[: full.answer.find(stop)]
    assert cut.full_text.endswith(cut.answer)


async def _stream(stub: Stub, request: exam_pb2.TakeExamRequest) -> tuple[str, exam_pb2.ExamChunk]:
    text, final = "", None
    async for chunk in stub.StreamExam(request):
        if chunk.WhichOneof("chunk") == "text":
            assert final is None, "text never follows the final chunk"
            text += chunk.text
        else:
            final = chunk
    assert final is not None
    return text, final


async def test_streamed_chunks_equal_the_unary_answer(stub: Stub, tiny: dict[str, str]) -> None:
    for request in _mixed_requests([tiny["adapter"], tiny["adapter_b"]], 3):
        unary = await stub.TakeExam(request)
        text, final = await _stream(stub, request)
        assert text == unary.answer == final.final.answer
        assert final.final.answer_tokens == unary.answer_tokens


async def test_stream_with_a_stop_sequence_never_shows_the_stop(stub: Stub) -> None:
    full = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=20))
    stop = full.answer[5:8]
    text, final = await _stream(stub, exam_pb2.TakeExamRequest(max_new_tokens=20, stop=[stop]))
    assert text == final.final.answer == full.answer[: full.answer.find(stop)]


async def test_a_cancelled_stream_stops_its_generation_and_spares_the_others(
    stub: Stub, tiny: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    others = _mixed_requests([tiny["adapter"]], 6)
    alone = [await stub.TakeExam(r) for r in others]
    caplog.set_level(logging.INFO, logger="golem_sidecar.session")
    long_request = exam_pb2.TakeExamRequest(max_new_tokens=CAP, prompt="genre " * 50)
    stream = stub.StreamExam(long_request)
    running = [asyncio.ensure_future(stub.TakeExam(r)) for r in others]
    async for _ in stream:
        stream.cancel()  # after the first piece of text
        break
    done = await asyncio.gather(*running)
    assert [r.answer for r in done] == [r.answer for r in alone]
    for _ in range(100):
        stopped = [r for r in caplog.records if r.getMessage() == "exam cancelled while decoding"]
        if stopped:
            break
        await asyncio.sleep(0.05)
    assert stopped, "the sidecar saw the cancellation while decoding"
    assert stopped[0].answer_tokens < CAP  # type: ignore[attr-defined]


@pytest_asyncio.fixture
async def tiny_queue_stub(tiny: dict[str, str]) -> AsyncIterator[Stub]:
    config = tiny_config(tiny)
    limits = Limits(max_new_tokens_cap=CAP, max_batch_size=1, batch_wait_ms=0, max_queue=2)
    sidecar = Sidecar(replace(config, limits=limits))
    await sidecar.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield exam_pb2_grpc.ExamServiceStub(channel)
    await sidecar.stop(0)


async def test_a_full_queue_refuses_at_once_with_a_retry_hint(tiny_queue_stub: Stub) -> None:
    request = exam_pb2.TakeExamRequest(max_new_tokens=CAP, prompt="genre " * 50)
    calls = [tiny_queue_stub.TakeExam(request) for _ in range(12)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    answered = [o for o in outcomes if isinstance(o, exam_pb2.TakeExamResponse)]
    assert refused and answered and len(refused) + len(answered) == 12
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
        assert retry.retry_delay.seconds >= 1
    assert all(a.answer_tokens > 0 for a in answered)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 101.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 9}, "stop"),
    ],
)
async def test_bad_sampling_options_are_named(
    stub: Stub, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.TakeExam(exam_pb2.TakeExamRequest(**fields))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")


def test_limits_reach_the_sidecar_config() -> None:
    from golem_sidecar.config import ConfigError, parse_config

    parsed = parse_config({"limits": {"maxBatchSize": 4, "batchWaitMs": 0, "maxQueue": 9}})
    assert (parsed.limits.max_batch_size, parsed.limits.batch_wait_ms, parsed.limits.max_queue) == (
        4,
        0,
        9,
    )
    with pytest.raises(ConfigError, match=r"limits\.maxQueue"):
        parse_config({"limits": {"maxQueue": 0}})


async def test_a_queue_gathering_a_batch_is_not_idle() -> None:
    """Requests taken out of the queue while a batch gathers are still this queue's work: were it
    called idle then, its base's eviction would stop it and leave them unanswered."""
    import threading

    from golem_sidecar.batching import BatchLimits, BatchQueue, Pending, Take

    ran: list[int] = []

    async def run_batch(batch: list[Pending], take: Take) -> None:
        ran.append(len(batch))
        for pending in batch:
            pending.future.set_result(None)

    queue = BatchQueue(BatchLimits(max_batch_size=4, batch_wait_s=0.3, max_queue=8), run_batch)
    loop = asyncio.get_running_loop()
    pending = Pending(None, threading.Event(), loop.create_future())
    queue.submit(pending)
    await asyncio.sleep(0.05)  # the queue's task has taken it and waits for company
    assert not queue.idle
    await pending.future
    assert ran == [1]
    await asyncio.sleep(0)
    assert queue.idle
    await queue.close()


async def test_bases_evicting_each_other_under_load_answer_every_call(
    tiny: dict[str, str],
) -> None:
    """One resident base at most, and requests for two placements of the tiny model (float32 and
    4 bit) interleaved: every call is answered while the bases evict each other, none waits for
    its deadline (a gathering batch's queue used to be stopped with its requests in it)."""
    config = tiny_config(tiny)
    limits = replace(config.limits, max_models=1, batch_wait_ms=20)
    four_bit = exam_pb2.Quantization(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    async with serving(replace(config, limits=limits)) as stub:
        calls = [
            stub.TakeExam(
                exam_pb2.TakeExamRequest(
                    prompt=PROMPTS[i % len(PROMPTS)],
                    max_new_tokens=2,
                    **({"quantization": four_bit} if i % 2 else {}),
                ),
                timeout=60,
            )
            for i in range(24)
        ]
        responses = await asyncio.gather(*calls)
    assert [r.model.quantization.load_in_4bit for r in responses] == [i % 2 == 1 for i in range(24)]
