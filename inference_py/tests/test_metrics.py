"""The sidecar's metrics as the gateway reads them (SidecarMetricsService.Scrape), parsed by
prometheus_client's own parser, scraped while a real sidecar answers exams on the tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from golem_sidecar.gen import exam_pb2, exam_pb2_grpc, metrics_pb2, metrics_pb2_grpc
from golem_sidecar.server import Sidecar
from tests.conftest import CAP, tiny_config

TAKE = "golem.exam.v1.ExamService/TakeExam"
STREAM = "golem.exam.v1.ExamService/StreamExam"
# Every family the sidecar exposes (counters by their name without _total, as parsed).
NAMES = {
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
    "golem_sidecar_requests",
    "golem_sidecar_request_duration_seconds",
    "golem_time_to_first_token_seconds",
    "golem_queue_depth",
    "golem_batch_rows",
    "golem_generated_tokens",
    "golem_resident_model_bytes",
    "golem_resident_adapter_bytes",
    "golem_adapter_requests",
}


@dataclass(frozen=True)
class Scrape:
    families: dict[str, Metric]

    def value(self, name: str, suffix: str = "", **labels: str) -> float:
        """The sample of family ``name`` (sample name ``name + suffix``) with these labels."""
        found = [
            s.value
            for s in self.families[name].samples
            if s.name == name + suffix and labels.items() <= s.labels.items()
        ]
        assert len(found) == 1, f"{name}{suffix}{labels}: {found}"
        return found[0]

    def total(self, name: str) -> float:
        """The sum of a gauge's samples (0 when it has none yet)."""
        return sum(s.value for s in self.families[name].samples)

    def lora(self, label: str) -> list[str]:
        (sample,) = self.families["vllm:lora_requests_info"].samples
        return [name for name in sample.labels[label].split(",") if name]


async def scrape(stub: metrics_pb2_grpc.SidecarMetricsServiceStub) -> Scrape:
    response = await stub.Scrape(metrics_pb2.ScrapeRequest())
    return Scrape({f.name: f for f in text_string_to_metric_families(response.text)})


@pytest.fixture
async def small_batches(
    tiny: dict[str, str],
) -> AsyncIterator[
    tuple[exam_pb2_grpc.ExamServiceStub, metrics_pb2_grpc.SidecarMetricsServiceStub]
]:
    """A sidecar of its own whose batches hold two rows, so that a few calls make a queue."""
    config = tiny_config(tiny)
    server = Sidecar(replace(config, limits=replace(config.limits, max_batch_size=2)))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield (
                exam_pb2_grpc.ExamServiceStub(channel),
                metrics_pb2_grpc.SidecarMetricsServiceStub(channel),
            )
    finally:
        await server.stop(0)


async def _stream(exams: exam_pb2_grpc.ExamServiceStub) -> exam_pb2.TakeExamResponse:
    request = exam_pb2.TakeExamRequest(prompt="Dune is", max_new_tokens=CAP, adapter_name="genres")
    async for chunk in exams.StreamExam(request):
        if chunk.HasField("final"):
            return chunk.final
    raise AssertionError("the stream ended without its final chunk")


async def test_a_scrape_during_load_shows_every_name_with_values_that_move(
    small_batches: tuple[exam_pb2_grpc.ExamServiceStub, metrics_pb2_grpc.SidecarMetricsServiceStub],
    tiny: dict[str, str],
) -> None:
    exams, metrics = small_batches
    await exams.LoadAdapter(
        exam_pb2.LoadAdapterRequest(name="genres", adapter_path=tiny["adapter"])
    )
    before = await scrape(metrics)
    assert set(before.families) == NAMES
    # The default adapter (preloaded, used by path) and the same weights under a name.
    assert before.lora("running_lora_adapters") == sorted(["genres", tiny["adapter"]])
    # Four calls on the named adapter fill the two rows and the queue; two more ask by path for
    # an adapter that is not resident, and wait for it in the queue.
    calls = [
        exams.TakeExam(
            exam_pb2.TakeExamRequest(prompt=f"Book {i}", max_new_tokens=CAP, adapter_name="genres")
        )
        for i in range(3)
    ]
    calls += [
        exams.TakeExam(
            exam_pb2.TakeExamRequest(prompt=f"Genre {i}", max_new_tokens=CAP, adapter_path=path)
        )
        for i, path in enumerate([tiny["adapter_b"]] * 2)
    ]
    load = asyncio.gather(*calls, _stream(exams))
    during: list[Scrape] = []
    while not load.done():
        during.append(await scrape(metrics))
        await asyncio.sleep(0.002)
    answers = await load
    after = await scrape(metrics)

    assert all(set(s.families) == NAMES for s in during)
    assert max(s.value("vllm:num_requests_waiting") for s in during) > 0
    assert max(s.value("vllm:num_requests_running") for s in during) > 0
    # Never more rows than a batch holds; the cache is in use while rows decode, within 0..1.
    assert max(s.value("vllm:num_requests_running") for s in during) <= 2
    usage = [s.value("vllm:kv_cache_usage_perc") for s in during]
    assert max(usage) > 0 and all(0 <= u <= 1 for u in usage)
    assert usage == [s.value("vllm:gpu_cache_usage_perc") for s in during]
    assert any(s.lora("waiting_lora_adapters") == [tiny["adapter_b"]] for s in during)
    assert max(s.total("golem_queue_depth") for s in during) > 0

    # Every generated token is counted, once.
    tokens = after.value("golem_generated_tokens", "_total")
    assert tokens - before.value("golem_generated_tokens", "_total") == sum(
        a.answer_tokens for a in answers
    )
    assert after.value("golem_sidecar_requests", "_total", method=TAKE, code="OK") == 5
    assert after.value("golem_sidecar_requests", "_total", method=STREAM, code="OK") == 1
    ttft = "golem_time_to_first_token_seconds"
    assert after.value(ttft, "_count", method=TAKE) == 5
    assert after.value(ttft, "_count", method=STREAM) == 1
    assert (
        0
        < after.value(ttft, "_sum", method=TAKE)
        <= after.value("golem_sidecar_request_duration_seconds", "_sum", method=TAKE)
    )
    steps = after.value("golem_batch_rows", "_count")
    assert steps > 0 and after.value("golem_batch_rows", "_bucket", le="2.0") == steps

    # Idle again: nothing waits or runs; adapter_b is resident now, under its path.
    assert after.value("vllm:num_requests_waiting") == 0
    assert after.value("vllm:num_requests_running") == 0
    assert after.value("vllm:kv_cache_usage_perc") == 0
    assert after.lora("waiting_lora_adapters") == []
    running = sorted(["genres", tiny["adapter"], tiny["adapter_b"]])
    assert after.lora("running_lora_adapters") == running
    (info,) = after.families["vllm:lora_requests_info"].samples
    assert info.labels["max_lora"] == "8"
    assert info.value >= before.families["vllm:lora_requests_info"].samples[0].value
    assert after.value("golem_resident_model_bytes", model=tiny["model"]) > 0
    assert after.value("golem_resident_adapter_bytes", adapter="genres") > 0


async def test_requests_are_counted_by_adapter_name_or_path_and_bare_base_ones_not_at_all(
    small_batches: tuple[exam_pb2_grpc.ExamServiceStub, metrics_pb2_grpc.SidecarMetricsServiceStub],
    tiny: dict[str, str],
) -> None:
    exams, metrics = small_batches
    await exams.LoadAdapter(
        exam_pb2.LoadAdapterRequest(name="genres", adapter_path=tiny["adapter"])
    )
    before = await scrape(metrics)
    by_path = exam_pb2.TakeExamRequest(
        prompt="Dune", max_new_tokens=2, adapter_path=tiny["adapter_b"]
    )
    await asyncio.gather(
        exams.TakeExam(
            exam_pb2.TakeExamRequest(prompt="Dune", max_new_tokens=2, adapter_name="genres")
        ),
        _stream(exams),
        exams.TakeExam(by_path),
        exams.TakeExam(by_path),
        exams.TakeExam(by_path),
        exams.TakeExam(
            exam_pb2.TakeExamRequest(prompt="Dune", max_new_tokens=2, disable_adapter=True)
        ),
    )
    after = await scrape(metrics)

    assert before.families["golem_adapter_requests"].samples == []
    assert after.value("golem_adapter_requests", "_total", adapter="genres") == 2
    assert after.value("golem_adapter_requests", "_total", adapter=tiny["adapter_b"]) == 3
    # The bare base is no adapter: five counted of the six calls.
    assert after.total("golem_adapter_requests") == 5


async def test_refused_calls_are_counted_by_their_code(
    small_batches: tuple[exam_pb2_grpc.ExamServiceStub, metrics_pb2_grpc.SidecarMetricsServiceStub],
) -> None:
    exams, metrics = small_batches
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await exams.TakeExam(exam_pb2.TakeExamRequest(adapter_name="never-loaded"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    after = await scrape(metrics)
    assert after.value("golem_sidecar_requests", "_total", method=TAKE, code="NOT_FOUND") == 1
    # Refused before it was queued: no token, no first token.
    assert after.value("golem_generated_tokens", "_total") == 0
    assert after.families["golem_time_to_first_token_seconds"].samples == []
