"""The benchmark's figures and the markdown report made of them (scripts/bench.py measures)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from golem_sidecar.config import Limits
from golem_sidecar.gen import exam_pb2

HOP_LEVELS = (1, 32)
THROUGHPUT_LEVELS = (1, 8, 32, 64)
ADAPTER_COUNTS = (1, 4, 16)
# The concurrency of the headline figures of sections 2 to 4.
LOAD = 32
# The sidecar keeps every copy of section 4 and the default adapter resident at once.
MAX_ADAPTERS = max(ADAPTER_COUNTS) + 1


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do (full or --quick)."""

    oneshot_runs: int
    warm_runs: int
    hop_requests: dict[int, int]
    # Rounds alternate sidecar-first and gateway-first; the report takes the medians.
    hop_rounds: int
    requests_at: Callable[[int], int]
    adapter_requests: int
    max_new_tokens: int
    matmul_repeats: int


FULL = Plan(3, 10, {1: 24, 32: 128}, 5, lambda c: max(2 * c, 8), 96, 24, 5)
QUICK = Plan(1, 3, {1: 6, 32: 32}, 1, lambda c: max(c, 4), 32, 8, 2)


@dataclass(frozen=True)
class Case:
    """A model the benchmark serves, with the adapter it wears."""

    label: str
    model: str
    adapter: str


@dataclass(frozen=True)
class Load:
    """One closed-loop run: ``concurrency`` callers sending the requests one after another."""

    wall_s: float
    latencies_s: list[float]
    responses: list[exam_pb2.TakeExamResponse]

    @property
    def tokens_per_s(self) -> float:
        return sum(r.answer_tokens for r in self.responses) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.responses) / self.wall_s

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000 if self.latencies_s else float("nan")

    @property
    def mean_tokens(self) -> float:
        count = len(self.responses)
        return sum(r.answer_tokens for r in self.responses) / count if count else float("nan")

    @property
    def mean_batch(self) -> float:
        """How many requests shared a batch, on average over requests (the sidecar says)."""
        count = len(self.responses)
        return sum(r.batch_size for r in self.responses) / count if count else float("nan")


@dataclass(frozen=True)
class Hop:
    """The same requests straight to the sidecar and through the gateway (medians of rounds)."""

    direct_p50_ms: float
    gateway_p50_ms: float
    direct_rps: float
    gateway_rps: float

    @property
    def added_p50(self) -> float:
        return self.gateway_p50_ms / self.direct_p50_ms - 1

    @property
    def added_per_request(self) -> float:
        return self.direct_rps / self.gateway_rps - 1


@dataclass
class Figures:
    """Everything measured on one model; filled in section by section."""

    case: Case
    params: int = 0
    oneshot_s: float = 0.0
    oneshot_answer: str = ""
    warm_ms: float = 0.0
    warm_answer: str = ""
    hop: dict[int, Hop] = field(default_factory=dict)
    throughput: dict[int, Load] = field(default_factory=dict)
    sequential_tokens_per_s: float = 0.0
    sequential_mean_tokens: float = 0.0
    adapters: dict[str, Load] = field(default_factory=dict)

    def share(self, tokens_per_s: float, peak_flops: float) -> str:
        """The fraction of the machine's matmul FLOP/s that this many tokens/s use."""
        return f"{100 * tokens_per_s * 2 * self.params / peak_flops:.2f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine() -> str:
    """nproc, CPU model, torch and its threads: what the figures depend on."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), "?")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"{len(os.sched_getaffinity(0))} CPUs (nproc), {cpu}, GPU {gpu}; torch {torch.__version__}"
        f" with {torch.get_num_threads()} threads; Python {platform.python_version()}"
    )


def _shown(answer: str) -> str:
    """An answer fit for a table cell: escaped, short (the tiny model's answers are noise)."""
    text = ascii(answer)
    return (text if len(text) <= 40 else text[:37] + "...").replace("|", "\\|")


def _oneshot(figures: list[Figures], plan: Plan) -> list[str]:
    rows = []
    for f in figures:
        same = "same" if f.warm_answer == f.oneshot_answer else f"daemon: {_shown(f.warm_answer)}"
        ratio = f.oneshot_s * 1000 / f.warm_ms
        answer = f"{_shown(f.oneshot_answer)} ({same})"
        rows.append([f.case.label, f"{f.oneshot_s:.2f} s", f"{f.warm_ms:.1f} ms", f"{ratio:.0f}x"])
        rows[-1].append(answer)
    return [
        "## 1. The seed's one-shot process vs the warm daemon",
        "",
        "The hobbit prompt, greedy, 20 new tokens. One-shot: a fresh Python process that loads "
        f"base and adapter with plain transformers + peft, answers and exits (median of "
        f"{plan.oneshot_runs}). Warm: the same request through the gateway, one at a time "
        f"(median of {plan.warm_runs}).",
        "",
        table(["model", "one-shot process", "warm daemon", "ratio", "answer"], rows),
    ]


def _hop(figures: list[Figures], plan: Plan) -> list[str]:
    rows = []
    for f in figures:
        for level, h in f.hop.items():
            rows.append(
                [
                    f.case.label,
                    f"{level} ({plan.hop_requests[level]} requests)",
                    f"{h.direct_p50_ms:.1f} / {h.gateway_p50_ms:.1f}",
                    f"{100 * h.added_p50:+.1f}%",
                    f"{h.direct_rps:.1f} / {h.gateway_rps:.1f}",
                    f"{100 * h.added_per_request:+.1f}%",
                ]
            )
    header = ["model", "concurrency", "p50 ms: sidecar / gateway", "p50 added"]
    header += ["req/s: sidecar / gateway", "time per request added"]
    return [
        "## 2. The gateway hop",
        "",
        f"max_new_tokens=1; the same requests straight to the sidecar and through the gateway, "
        f"{plan.hop_rounds} alternating round(s), medians.",
        "",
        table(header, rows),
    ]


def _throughput(figures: list[Figures], plan: Plan, peak: float) -> list[str]:
    header = ["concurrency"]
    for f in figures:
        header += [f"{f.case.label}: tokens/s", "new tokens/req", "mean batch", "p50 s"]
        header += ["of matmul peak"]
    rows = []
    for level in THROUGHPUT_LEVELS:
        row = [f"{level} ({plan.requests_at(level)} requests)"]
        for f in figures:
            load = f.throughput[level]
            row += [f"{load.tokens_per_s:.1f}", f"{load.mean_tokens:.1f}"]
            row += [f"{load.mean_batch:.1f}", f"{load.p50_ms / 1000:.2f}"]
            row += [f.share(load.tokens_per_s, peak)]
        rows.append(row)
    row = [f"sequential transformers + peft loop (same {plan.requests_at(LOAD)} prompts)"]
    for f in figures:
        loop = f.sequential_tokens_per_s
        row += [f"{loop:.1f}", f"{f.sequential_mean_tokens:.1f}", "1", "", f.share(loop, peak)]
    rows.append(row)
    row = [f"ratio: concurrency {LOAD} / loop"]
    for f in figures:
        ratio = f.throughput[LOAD].tokens_per_s / f.sequential_tokens_per_s
        row += [f"{ratio:.1f}x", "", "", "", ""]
    rows.append(row)
    return [
        "## 3. Throughput",
        "",
        f"Generated tokens/s through the gateway, max_new_tokens={plan.max_new_tokens}, distinct "
        "prompts (requests stop early at eos, so new tokens/req is what was really generated; "
        "mean batch is how many requests shared a decode pass, as the sidecar reports); the loop "
        f"is plain `generate` calls one after another on the prompts of concurrency {LOAD}.",
        "",
        table(header, rows),
    ]


def _adapters(figures: list[Figures], plan: Plan, peak: float) -> list[str]:
    header = ["adapters"]
    for f in figures:
        header += [f"{f.case.label}: tokens/s", "new tokens/req", "vs 1 adapter", "of matmul peak"]
    rows = []
    for key in ["base", *map(str, ADAPTER_COUNTS)]:
        row = ["none (disable_adapter)" if key == "base" else key]
        for f in figures:
            load, one = f.adapters[key], f.adapters["1"].tokens_per_s
            row += [f"{load.tokens_per_s:.1f}", f"{load.mean_tokens:.1f}"]
            row += [f"{100 * load.tokens_per_s / one:.0f}%", f.share(load.tokens_per_s, peak)]
        rows.append(row)
    return [
        "## 4. Many adapters",
        "",
        f"Concurrency {LOAD}, {plan.adapter_requests} requests spread round-robin over distinct "
        f"adapters (copies of the model's adapter, each weight perturbed), "
        f"max_new_tokens={plan.max_new_tokens}, through the gateway.",
        "",
        table(header, rows),
    ]


def _limit(figures: list[Figures], plan: Plan, flops: dict[int, float]) -> list[str]:
    sizes = ", ".join(f"n={n}: {v / 1e9:.1f} GFLOP/s" for n, v in flops.items())
    params = ", ".join(f"{f.case.label} {f.params / 1e6:.3f} M" for f in figures)
    return [
        "## 5. The machine's own limit",
        "",
        f"float32 square matmuls (torch, {torch.get_num_threads()} threads, best of "
        f"{plan.matmul_repeats}): {sizes}; peak {max(flops.values()) / 1e9:.1f} GFLOP/s. "
        f"Parameters (base, without LoRA): {params}. 'of matmul peak' = tokens/s x 2 x "
        "parameters / peak.",
    ]


def _targets(figures: list[Figures]) -> list[str]:
    def verdict(value: float, met: bool, text: str) -> str:
        return f"{text.format(value)} {'met' if met else '**short**'}"

    rows = [["warm daemon >= 50x faster than one-shot"], [], [], []]
    rows[1] = [f"gateway adds <= 5% at concurrency {LOAD} (worse of p50, time per request)"]
    rows[2] = [f"concurrency {LOAD} >= 8x the sequential loop's tokens/s"]
    rows[3] = ["16 adapters keep >= 80% of 1 adapter's tokens/s"]
    for f in figures:
        ratio = f.oneshot_s * 1000 / f.warm_ms
        added = max(f.hop[LOAD].added_p50, f.hop[LOAD].added_per_request)
        speedup = f.throughput[LOAD].tokens_per_s / f.sequential_tokens_per_s
        kept = f.adapters["16"].tokens_per_s / f.adapters["1"].tokens_per_s
        rows[0].append(verdict(ratio, ratio >= 50, "{:.0f}x"))
        rows[1].append(verdict(100 * added, added <= 0.05, "{:+.1f}%"))
        rows[2].append(verdict(speedup, speedup >= 8, "{:.1f}x"))
        rows[3].append(verdict(100 * kept, kept >= 0.8, "{:.1f}%"))
    return ["## Targets", "", table(["target", *(f.case.label for f in figures)], rows)]


def render(
    figures: list[Figures], flops: dict[int, float], plan: Plan, quick: bool, load_before: float
) -> str:
    """The whole report, in markdown."""
    peak = max(flops.values())
    limits = Limits()
    run = f"{'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')}"
    head = [
        f"# golem benchmark ({run})",
        "",
        f"Machine: {machine()}. Load average (1 min) {load_before:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after: the figures are only as quiet as the machine was. "
        f"Sidecar limits: maxBatchSize {limits.max_batch_size}, "
        f"batchWaitMs {limits.batch_wait_ms}, maxQueue {limits.max_queue} (the defaults); "
        f"maxAdapters {MAX_ADAPTERS} (default {limits.max_adapters}) so that section 4's adapters "
        "stay resident.",
    ]
    parts = [
        head,
        _oneshot(figures, plan),
        _hop(figures, plan),
        _throughput(figures, plan, peak),
        _adapters(figures, plan, peak),
        _limit(figures, plan, flops),
        _targets(figures),
    ]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"
