"""The sidecar process and its parent: --exit-with-stdin ends it promptly when the gateway's end of
stdin closes (even mid-generation), --cleanup-dir removes the socket folder on every way out,
stderr that cannot be written to never stops it, and it is offline unless the config allows hub
downloads. Runs ``python -m golem_sidecar`` on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from golem_sidecar.config import parse_config
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
# adapter_b runs greedily to the full length, about 0.6 s a call, one call at a time on the
# model thread: four keep it busy for seconds.
SLOW_TOKENS = 500
SLOW_CALLS = 4


def _env_without_hub_settings() -> dict[str, str]:
    # The sidecar must turn the hub off by itself, so the test does not do it for it.
    drop = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _config(tiny: dict[str, str], **sections: dict[str, Any]) -> str:
    config: dict[str, Any] = {
        "logLevel": "info",
        "defaults": {"modelName": tiny["model"], "adapterPath": tiny["adapter"], "device": "cpu"},
    }
    config.update(sections)
    return json.dumps(config)


@contextmanager
def _sidecar(
    config_json: str, socket_dir: Path, stderr: IO[bytes], *flags: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m golem_sidecar`` on a Unix socket in ``socket_dir``, stdin a pipe we hold."""
    command = [sys.executable, "-m", "golem_sidecar", "--config-json", config_json]
    command += ["--listen", f"unix:{socket_dir / 'sidecar.sock'}", *flags]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=stderr,
        stderr=stderr,
        env=_env_without_hub_settings(),
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdin:
            process.stdin.close()


@asynccontextmanager
async def _serving(
    process: subprocess.Popen[bytes], socket_dir: Path, log: Path
) -> AsyncIterator[exam_pb2_grpc.ExamServiceStub]:
    """Waits for SERVING and yields a client."""
    address = f"unix:{socket_dir / 'sidecar.sock'}"
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text() if log.exists() else "exited"
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "the sidecar did not start"
            await asyncio.sleep(0.2)
        yield exam_pb2_grpc.ExamServiceStub(channel)


async def _exited(process: subprocess.Popen[bytes], within_s: float) -> int:
    deadline = time.monotonic() + within_s
    while process.poll() is None:
        assert time.monotonic() < deadline, f"still running {within_s} s later"
        await asyncio.sleep(0.05)
    return process.returncode


async def test_closing_stdin_ends_a_busy_sidecar_within_seconds_and_removes_its_folder(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    socket_dir = tmp_path / "golem-sock"
    socket_dir.mkdir()
    log = tmp_path / "sidecar.log"
    flags = ("--exit-with-stdin", "--cleanup-dir", str(socket_dir))
    with log.open("wb") as sink, _sidecar(_config(tiny), socket_dir, sink, *flags) as process:
        async with _serving(process, socket_dir, log) as stub:
            request = exam_pb2.TakeExamRequest(
                adapter_path=tiny["adapter_b"], max_new_tokens=SLOW_TOKENS
            )
            calls = [
                asyncio.ensure_future(stub.TakeExam(request, timeout=300))
                for _ in range(SLOW_CALLS)
            ]
            await asyncio.sleep(0.5)
            assert not all(call.done() for call in calls), "the model thread must be busy"
            assert process.stdin is not None
            process.stdin.close()
            closed = time.monotonic()
            assert await _exited(process, within_s=5) == 0
            assert time.monotonic() - closed < 5
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
    # It left mid-generation: not every call can have been answered.
    assert any(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)
    assert not socket_dir.exists()
    assert "the gateway is gone (stdin closed)" in log.read_text()


async def test_sigterm_removes_the_cleanup_dir(tiny: dict[str, str], tmp_path: Path) -> None:
    socket_dir = tmp_path / "golem-sock"
    socket_dir.mkdir()
    log = tmp_path / "sidecar.log"
    flags = ("--cleanup-dir", str(socket_dir))
    with log.open("wb") as sink, _sidecar(_config(tiny), socket_dir, sink, *flags) as process:
        async with _serving(process, socket_dir, log):
            process.send_signal(signal.SIGTERM)
            assert await _exited(process, within_s=30) == 0
    assert not socket_dir.exists()


def test_a_bad_config_still_removes_the_cleanup_dir(tmp_path: Path) -> None:
    socket_dir = tmp_path / "golem-sock"
    socket_dir.mkdir()
    bad = json.dumps({"limits": {"maxQueue": "many"}})
    flags = ("--cleanup-dir", str(socket_dir))
    with _sidecar(bad, socket_dir, subprocess.PIPE, *flags) as process:  # type: ignore[arg-type]
        _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert b"limits.maxQueue" in err
    assert not socket_dir.exists()


async def test_serves_and_answers_with_stderr_on_a_full_disk(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    socket_dir = tmp_path / "golem-sock"
    socket_dir.mkdir()
    # /dev/full fails every write with ENOSPC: every log line is lost, nothing else may be.
    with open("/dev/full", "wb") as full, _sidecar(_config(tiny), socket_dir, full) as process:
        async with _serving(process, socket_dir, tmp_path / "none.log") as stub:
            reply = await stub.TakeExam(exam_pb2.TakeExamRequest(max_new_tokens=2), timeout=60)
            assert reply.answer_tokens >= 1
            process.send_signal(signal.SIGTERM)
            assert await _exited(process, within_s=30) == 0


def _hub_policy_logged(tiny: dict[str, str], tmp_path: Path, allow: bool) -> dict[str, Any]:
    """Starts a sidecar that loads nothing, and returns its "hub downloads" log line."""
    config = _config(tiny, sidecar={"preload": False}, security={"allowHubDownloads": allow})
    socket_dir = tmp_path / f"golem-sock-{allow}"
    socket_dir.mkdir()
    log = tmp_path / f"sidecar-{allow}.log"
    with log.open("wb") as sink, _sidecar(config, socket_dir, sink) as process:
        deadline = time.monotonic() + 120
        while '"hub downloads"' not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no hub downloads line"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return next(line for line in lines if line["message"] == "hub downloads")


def test_offline_unless_the_config_allows_hub_downloads(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    # What huggingface_hub itself believes in the running sidecar, with neither variable set.
    offline = _hub_policy_logged(tiny, tmp_path, allow=False)
    assert (offline["allowed"], offline["hf_hub_offline"]) == (False, True)
    online = _hub_policy_logged(tiny, tmp_path, allow=True)
    assert (online["allowed"], online["hf_hub_offline"]) == (True, False)


def test_allow_hub_downloads_is_read_from_security_and_defaults_to_false() -> None:
    assert parse_config({}).security.allow_hub_downloads is False
    allowed = parse_config({"security": {"allowHubDownloads": True}})
    assert allowed.security.allow_hub_downloads is True
