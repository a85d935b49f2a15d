"""The processes the benchmark measures: a Python sidecar and the TypeScript gateway in front of
it (``sidecar.address`` set, so the gateway spawns nothing), each on a free loopback port, both
stopped when the ``running_stack`` block ends, however it ends."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "golem.exam.v1.ExamService"
START_TIMEOUT_S = 900.0
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class Stack:
    """Where to reach the sidecar directly, and the gateway in front of it."""

    sidecar: str
    gateway: str
    # The sidecar's process id, for its memory (/proc/PID/status).
    sidecar_pid: int = 0


def free_port() -> int:
    """A port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(
    model: str,
    adapter: str,
    listen: str,
    sidecar: str,
    quantization: Any,
    python: str,
    engine: str,
) -> dict[str, Any]:
    """golem's config shape (config/golem.json) with this stack's model, addresses, sidecar
    interpreter and engine."""
    return {
        "listen": listen,
        "logLevel": "info",
        "production": False,
        "sidecar": {"address": sidecar, "python": python, "startTimeoutMs": 600000},
        "engines": {"default": engine},
        "defaults": {
            "modelName": model,
            "adapterPath": adapter,
            "prompt": "Instruction: Which genre is the hobbit?\nResponse:",
            "maxNewTokens": 20,
            "device": "cpu",
            "quantization": quantization,
        },
        "limits": {"maxNewTokensCap": 512, "requestTimeoutMs": 300000},
        "security": {"trustRemoteCode": False, "allowPickle": False},
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Polls grpc.health.v1 until the exam service is SERVING; fails if the process dies."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{_tail(log)}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"{address} not SERVING after {START_TIMEOUT_S:.0f} s (log: {log})")


@contextlib.contextmanager
def running_stack(
    root: Path,
    model: str,
    adapter: str,
    workdir: Path,
    max_adapters: int,
    quantization: Any = "auto",
    python: str | None = None,
    engine: str = "transformers",
) -> Iterator[Stack]:
    """Starts a sidecar for ``model`` (its default adapter resident) and a gateway in front of
    it; both logs go to ``workdir``. The sidecar runs on ``python`` (this interpreter unless
    given: the vLLM engine needs its own venv) and serves every base with ``engine``; it
    imports golem_sidecar through the PYTHONPATH it inherits (scripts/bench sets it). The
    sidecar's config adds limits the gateway does not know (its schema is strict), so each
    gets its own file."""
    workdir.mkdir(parents=True, exist_ok=True)
    sidecar = f"127.0.0.1:{free_port()}"
    gateway = f"127.0.0.1:{free_port()}"
    interpreter = python or sys.executable
    config = _config(model, adapter, gateway, sidecar, quantization, interpreter, engine)
    (workdir / "gateway.json").write_text(json.dumps(config))
    config["limits"]["maxAdapters"] = max_adapters
    (workdir / "sidecar.json").write_text(json.dumps(config))
    python_m, golem = [interpreter, "-m", "golem_sidecar"], str(root / "bin" / "golem.js")
    commands = {
        sidecar: [*python_m, "--listen", sidecar, "--config", str(workdir / "sidecar.json")],
        gateway: ["node", golem, "serve", "--config", str(workdir / "gateway.json")],
    }
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    with contextlib.ExitStack() as stack:
        for address, command in commands.items():
            log = workdir / f"{'sidecar' if address == sidecar else 'gateway'}.log"
            out = stack.enter_context(log.open("wb"))
            # A session of their own: a Ctrl-C reaches only us, and we stop them in order.
            proc = subprocess.Popen(
                command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            stack.callback(_stop, proc)
            started.append((proc, log))
            _wait_serving(address, proc, log)
        try:
            yield Stack(sidecar=sidecar, gateway=gateway, sidecar_pid=started[0][0].pid)
        except Exception:
            # Say which process died under the run before its log goes with the temp dir.
            for proc, log in started:
                if proc.poll() is not None:
                    message = f"{proc.args!r} exited with {proc.returncode} during the run"
                    print(f"bench: {message}; its log ends:\n{_tail(log)}", file=sys.stderr)
            raise
