"""Issue 7's memory checks against a real sidecar on the embedded default, each with its RSS:

1. 6,000 TakeExam requests naming distinct missing models (half local paths, half hub ids):
   RSS before and after;
2. CompareAdapters with a 1,500-token prompt and eight spellings of one adapter folder;
3. the same prompt compared against the adapter once (the sidecar's RSS peak while it runs).

Usage: .venv/bin/python scripts/measure_gate.py [--requests 6000]. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference_py"))
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "models/adapters/genres/checkpoint-final"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakSampler:
    """Samples a process's RSS every 10 ms while a block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> PeakSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def wait_serving(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            try:
                got = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("sidecar never served")


async def main(requests: int) -> dict[str, object]:
    config = json.loads((ROOT / "config" / "golem.json").read_text())
    sock = Path(tempfile.mkdtemp()) / "s.sock"
    address = f"unix:{sock}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "golem_sidecar",
            "--listen",
            address,
            "--config-json",
            json.dumps(config),
        ],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_serving(address)
        results: dict[str, object] = {}
        async with grpc.aio.insecure_channel(address) as channel:
            stub = exam_pb2_grpc.ExamServiceStub(channel)
            await stub.TakeExam(exam_pb2.TakeExamRequest(), timeout=120)
            # Warm up first (a few of each kind), so the baseline is the steady state.
            for i in range(-20, 0):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.TakeExam(
                        exam_pb2.TakeExamRequest(
                            model_name=f"golem-test/warm{i}", disable_adapter=True
                        ),
                        timeout=120,
                    )
            before = rss_mib(proc.pid)
            started = time.perf_counter()
            codes: dict[str, int] = {}
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                name = f"./missing/model-{i}" if i % 2 else f"golem-test/missing-{i}"
                async with sem:
                    try:
                        await stub.TakeExam(
                            exam_pb2.TakeExamRequest(model_name=name, disable_adapter=True),
                            timeout=120,
                        )
                        codes["OK"] = codes.get("OK", 0) + 1
                    except grpc.aio.AioRpcError as err:
                        codes[err.code().name] = codes.get(err.code().name, 0) + 1

            await asyncio.gather(*(one(i) for i in range(requests)))
            after = rss_mib(proc.pid)
            results["missing_models"] = {
                "requests": requests,
                "codes": codes,
                "rss_before_mib": round(before, 1),
                "rss_after_mib": round(after, 1),
                "change_percent": round(100 * (after - before) / before, 2),
                "seconds": round(time.perf_counter() - started, 1),
            }
            # About 1,500 tokens of SmolLM2's tokenizer.
            prompt = "Instruction: Which genre is " + "the hobbit, " * 500 + "?\nResponse:"
            spellings = [
                ADAPTER,
                f"./{ADAPTER}",
                f"{ADAPTER}/",
                f"{ADAPTER}/.",
                f"models/../{ADAPTER}",
                "./models/./adapters/genres/checkpoint-final",
                f"{ADAPTER}//",
                str((ROOT / ADAPTER).resolve()),
            ]
            before = rss_mib(proc.pid)
            with PeakSampler(proc.pid) as peak:
                try:
                    await stub.CompareAdapters(
                        exam_pb2.CompareAdaptersRequest(
                            prompts=[prompt], adapters=spellings, max_new_tokens=20
                        ),
                        timeout=600,
                    )
                    outcome = "answered"
                except grpc.aio.AioRpcError as err:
                    outcome = f"{err.code().name}: {err.details()}"
            results["eight_spellings"] = {
                "outcome": outcome,
                "rss_before_mib": round(before),
                "rss_peak_mib": round(peak.peak),
            }
            before = rss_mib(proc.pid)
            started = time.perf_counter()
            with PeakSampler(proc.pid) as peak:
                reply = await stub.CompareAdapters(
                    exam_pb2.CompareAdaptersRequest(
                        prompts=[prompt], adapters=[ADAPTER], max_new_tokens=20
                    ),
                    timeout=600,
                )
            scored = reply.comparisons[0].answers[0].mean_logprob
            results["one_adapter_1500_tokens"] = {
                "rss_before_mib": round(before),
                "rss_peak_mib": round(peak.peak),
                "growth_mib": round(peak.peak - before),
                "seconds": round(time.perf_counter() - started, 1),
                "scored_models": len(scored),
            }
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6000)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(asyncio.run(main(args.requests)), indent=2))
