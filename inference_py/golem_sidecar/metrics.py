"""The sidecar's Prometheus metrics, handed to the gateway by SidecarMetricsService.Scrape, which
merges them with its own on its metrics port (docs/metrics.md).

Two kinds. Events are counted where they happen: calls in the interceptor, decode steps, tokens
and first tokens in the decode session. State (queues, rows running, KV cache, resident models
and adapters) is read when a scrape asks, from the engine's own structures (ExamEngine.load):
nothing to keep in step, and never stale.

Each sidecar has a registry of its own (tests run several in one process), holding golem's
metrics only: no process or GC collectors, which the gateway's would duplicate and which cost
time at a 50 ms scrape interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from golem_sidecar.auth import BearerCheck
from golem_sidecar.config import Limits
from golem_sidecar.errors import GolemError
from golem_sidecar.gen import metrics_pb2, metrics_pb2_grpc
from golem_sidecar.placement import Placement

# Seconds; from a health-check-sized call to a long generation.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The calls whose first generated token is timed: one answer each, so "first" means something.
TIMED_TO_FIRST_TOKEN = frozenset({"TakeExam", "StreamExam"})
# A scrape that races the model thread may find a container changed while copying it; it reads
# again rather than fail (see ExamEngine.load).
_READ_TRIES = 3

# Counters' *_created series double the lines of every scrape and nothing here reads them.
disable_created_metrics()


@dataclass(frozen=True)
class Arrival:
    """When a call reached the sidecar (perf_counter ns), and its method ("Service/Method")."""

    method: str
    at_ns: int


# Set by the interceptor for TakeExam and StreamExam, read when their request is queued
# (engine.take_exam): the request then carries its arrival to the model thread.
ARRIVAL: ContextVar[Arrival | None] = ContextVar("golem_arrival", default=None)


def mark_arrival(method: str) -> None:
    """Notes that a call of ``method`` ("Service/Method") arrived now, when its first token is
    to be timed."""
    if method.rpartition("/")[2] in TIMED_TO_FIRST_TOKEN:
        ARRIVAL.set(Arrival(method, time.perf_counter_ns()))


@dataclass(frozen=True)
class ResidentModel:
    model: str
    placement: str
    bytes: int


@dataclass(frozen=True)
class ResidentAdapter:
    model: str
    placement: str
    # Its name as LoadAdapter gave it, or its path when it was attached by path.
    adapter: str
    bytes: int


@dataclass(frozen=True)
class QueueDepth:
    model: str
    placement: str
    depth: int


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds at one moment (ExamEngine.load)."""

    # Requests queued or taken by a session and not decoding yet; rows decoding (or having
    # their prompt read).
    waiting: int = 0
    running: int = 0
    # KV-cache columns the running rows hold, padding included (rows x cache width per batch).
    cache_tokens: int = 0
    queues: tuple[QueueDepth, ...] = ()
    models: tuple[ResidentModel, ...] = ()
    adapters: tuple[ResidentAdapter, ...] = ()
    # Adapters queued requests ask for by path that are not attached yet.
    waiting_adapters: tuple[str, ...] = field(default=())


def placement_label(placement: Placement) -> str:
    """A placement in a label: "cpu/float32", "cuda/float16/4bit-nf4-float16"."""
    label = f"{placement.device}/{placement.dtype}"
    if placement.load_in_4bit:
        label += f"/4bit-{placement.quant_type}-{placement.compute_dtype}"
        label += "-double" if placement.double_quant else ""
    return label


def _listed(names: Iterable[str]) -> str:
    # The endpoint picker splits on commas; a comma inside a path must not split it.
    return ",".join(sorted({name.replace(",", "%2C") for name in names}))


def _powers_of_two(top: int) -> tuple[float, ...]:
    buckets = [1]
    while buckets[-1] < top:
        buckets.append(buckets[-1] * 2)
    return tuple(float(b) for b in buckets)


class SidecarMetrics:
    """The sidecar's instruments and its registry."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.registry = CollectorRegistry()
        labels = ["method", "code"]
        self._calls = Counter(
            "golem_sidecar_requests",
            "ExamService calls the sidecar finished, by method and status code.",
            labels,
            registry=self.registry,
        )
        self._durations = Histogram(
            "golem_sidecar_request_duration_seconds",
            "Time from a call's arrival at the sidecar to its status, by method.",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._first_token = Histogram(
            "golem_time_to_first_token_seconds",
            "Time from a TakeExam or StreamExam call's arrival at the sidecar to its first "
            "generated token, by method.",
            ["method"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self._batch_rows = Histogram(
            "golem_batch_rows",
            "Rows in each decode step (continuous batching): how full the batches run.",
            buckets=_powers_of_two(self.limits.max_batch_size),
            registry=self.registry,
        )
        self._tokens = Counter(
            "golem_generated_tokens",
            "Tokens generated for TakeExam, StreamExam and GradeExam's answers.",
            registry=self.registry,
        )
        # Which adapters this replica serves, as a mesh hashing on x-golem-adapter sends them:
        # the resident gauges say what is held, not what is asked for.
        self._adapter_requests = Counter(
            "golem_adapter_requests",
            "Requests queued for generation with an adapter, by the adapter's LoadAdapter name "
            "or its path as the request gave it.",
            ["adapter"],
            registry=self.registry,
        )

    def watch(self, read: Callable[[], EngineLoad]) -> None:
        """Reads the engine's state at every scrape through ``read``."""
        self.registry.register(_LiveState(read, self.limits))

    def call_finished(self, method: str, code: grpc.StatusCode, started: float) -> None:
        """Counts a call with its status; ``started`` is its perf_counter() at arrival."""
        self._calls.labels(method, code.name).inc()
        self._durations.labels(method).observe(time.perf_counter() - started)

    def adapter_request(self, adapter: str) -> None:
        """Counts a request queued for ``adapter`` (a LoadAdapter name or a folder as given)."""
        self._adapter_requests.labels(adapter).inc()

    def decode_step(self, rows: int, tokens: int) -> None:
        """Counts one decode step of ``rows`` rows that generated ``tokens`` tokens."""
        if rows:
            self._batch_rows.observe(rows)
        if tokens:
            self._tokens.inc(tokens)

    def first_token(self, arrival: Arrival, now_ns: int) -> None:
        self._first_token.labels(arrival.method).observe((now_ns - arrival.at_ns) / 1e9)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of everything, read now."""
        return generate_latest(self.registry).decode()


class _LiveState(Collector):
    """The engine's state as gauges, read at each scrape. The model server protocol's names
    (vLLM's, which the Inference Extension's endpoint picker reads) come first."""

    def __init__(self, read: Callable[[], EngineLoad], limits: Limits) -> None:
        self._read, self._limits = read, limits

    def collect(self) -> Iterator[Metric]:
        load = _read_settled(self._read)
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Requests queued and not decoding yet (model server protocol).",
            value=load.waiting,
        )
        yield GaugeMetricFamily(
            "vllm:num_requests_running",
            "Requests decoding now, their prompts being read included (model server protocol).",
            value=load.running,
        )
        usage = min(1.0, load.cache_tokens / self._limits.max_batch_tokens)
        for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
            yield GaugeMetricFamily(
                name,
                "KV-cache columns (padding included) of the rows decoding now over "
                "limits.maxBatchTokens, 0 to 1 (model server protocol).",
                value=usage,
            )
        yield self._lora_info(load)
        yield from self._resident(load)

    def _lora_info(self, load: EngineLoad) -> Metric:
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters resident and ready, and those queued requests wait for; the value is the "
            "Unix time of this reading (model server protocol).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        running = _listed(a.adapter for a in load.adapters)
        info.add_metric(
            [str(self._limits.max_adapters), running, _listed(load.waiting_adapters)], time.time()
        )
        return info

    def _resident(self, load: EngineLoad) -> Iterator[Metric]:
        queues = GaugeMetricFamily(
            "golem_queue_depth",
            "Requests waiting in each base's queue, not yet taken by a decode session.",
            labels=["model", "placement"],
        )
        for queue in load.queues:
            queues.add_metric([queue.model, queue.placement], queue.depth)
        models = GaugeMetricFamily(
            "golem_resident_model_bytes",
            "Bytes each resident base holds (its adapters included), as of its last load, "
            "attach or detach.",
            labels=["model", "placement"],
        )
        for model in load.models:
            models.add_metric([model.model, model.placement], model.bytes)
        adapters = GaugeMetricFamily(
            "golem_resident_adapter_bytes",
            "Each resident adapter, by the size of its weights file.",
            labels=["model", "placement", "adapter"],
        )
        for adapter in load.adapters:
            adapters.add_metric([adapter.model, adapter.placement, adapter.adapter], adapter.bytes)
        yield from (queues, models, adapters)


def _read_settled(read: Callable[[], EngineLoad]) -> EngineLoad:
    for _ in range(_READ_TRIES - 1):
        try:
            return read()
        except RuntimeError:  # a dict or deque changed size while it was being copied
            continue
    return read()


class MetricsServicer(metrics_pb2_grpc.SidecarMetricsServiceServicer):
    """SidecarMetricsService: the gateway's way to read this sidecar's metrics. It asks for the
    sidecar's bearer token as ExamService does: its labels name models and adapter paths."""

    def __init__(self, metrics: SidecarMetrics, bearer: BearerCheck | None = None) -> None:
        self._metrics = metrics
        self._bearer = bearer

    async def Scrape(
        self, request: metrics_pb2.ScrapeRequest, context: grpc.aio.ServicerContext
    ) -> metrics_pb2.ScrapeResponse:
        if self._bearer is not None:
            try:
                self._bearer.verify(context.invocation_metadata())
            except GolemError as refused:
                await context.abort_with_status(refused.to_status())
        return metrics_pb2.ScrapeResponse(text=self._metrics.render())
