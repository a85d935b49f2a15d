"""Graceful shutdown of the sidecar process alone: SIGTERM turns health NOT_SERVING, refuses new
calls, lets calls in flight finish within limits.shutdownGraceMs, ends the rest with UNAVAILABLE
(SHUTTING_DOWN) and exits 0. Runs ``python -m golem_sidecar`` on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from tests.rpc import failure

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    stub: exam_pb2_grpc.ExamServiceStub
    health: health_pb2_grpc.HealthStub
    log: Path

    async def health_status(self) -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        return int(reply.status)

    async def exited(self, within_s: float) -> int:
        deadline = time.monotonic() + within_s
        while self.process.poll() is None:
            assert time.monotonic() < deadline, f"still running {within_s}s later"
            await asyncio.sleep(0.05)
        return self.process.returncode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start(tiny: dict[str, str], tmp_path: Path, grace_ms: int) -> AsyncIterator[Running]:
    port = _free_port()
    config = {
        "defaults": {"modelName": tiny["model"], "adapterPath": tiny["adapter"], "device": "cpu"},
        "limits": {"shutdownGraceMs": grace_ms},
    }
    log = tmp_path / "sidecar.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "golem_sidecar"),
                *("--listen", f"127.0.0.1:{port}", "--config-json", json.dumps(config)),
            ],
            stdout=sink,
            stderr=sink,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            running = Running(
                process,
                exam_pb2_grpc.ExamServiceStub(channel),
                health_pb2_grpc.HealthStub(channel),
                log,
            )
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log.read_text()
                try:
                    if await running.health_status() == SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, "the sidecar did not start"
                await asyncio.sleep(0.2)
            yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# adapter_b runs greedily to the full length: about 0.6 s each on an idle 2-core machine, and
# the model thread takes one at a time, so four calls keep the sidecar busy for seconds.
SLOW_TOKENS = 500
SLOW_CALLS = 4


def _slow_calls(
    running: Running, tiny: dict[str, str]
) -> list[asyncio.Future[exam_pb2.TakeExamResponse]]:
    request = exam_pb2.TakeExamRequest(adapter_path=tiny["adapter_b"], max_new_tokens=SLOW_TOKENS)
    return [
        asyncio.ensure_future(running.stub.TakeExam(request, timeout=300))
        for _ in range(SLOW_CALLS)
    ]


async def _sigterm(
    running: Running, calls: list[asyncio.Future[exam_pb2.TakeExamResponse]]
) -> float:
    """Lets the calls reach the sidecar, sends SIGTERM, returns when it was sent."""
    await asyncio.sleep(0.3)
    assert not all(call.done() for call in calls), "some calls must still be in flight"
    running.process.send_signal(signal.SIGTERM)
    return time.monotonic()


async def test_sigterm_lets_calls_in_flight_finish_refuses_new_ones_and_exits_0(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    async for running in _start(tiny, tmp_path, grace_ms=240_000):
        calls = _slow_calls(running, tiny)
        await _sigterm(running, calls)
        while await running.health_status() != NOT_SERVING:
            await asyncio.sleep(0.02)
        assert not all(call.done() for call in calls), "health goes NOT_SERVING first"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=1), timeout=10)
        got = failure(refused.value)
        assert (got.code, got.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        answers = await asyncio.gather(*calls)
        assert [a.answer_tokens for a in answers] == [SLOW_TOKENS] * SLOW_CALLS
        assert await running.exited(within_s=30) == 0


async def test_calls_still_running_when_the_grace_ends_get_shutting_down(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    async for running in _start(tiny, tmp_path, grace_ms=300):
        calls = _slow_calls(running, tiny)
        sent = await _sigterm(running, calls)
        cut_short = 0
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, grpc.aio.AioRpcError):
                got = failure(outcome)
                assert (got.code, got.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
                cut_short += 1
        assert cut_short >= 1, "seconds of work cannot all finish in 0.3 s"
        assert await running.exited(within_s=15) == 0
        # The running generation stops at its next token; nothing waits for the queued ones.
        assert time.monotonic() - sent < 10
        assert "calls ended by shutdown" in running.log.read_text()
