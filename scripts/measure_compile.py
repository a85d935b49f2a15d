"""Issue 9: does a preallocated KV cache, or torch.compile of the decode step, make golem's decode
step faster on CPU? Measured on the embedded default (float32, CPU) wearing the demo LoRA, loaded
through the sidecar's own ResidentModels and run on its one-adapter lane, for left-padded batches
of the first genre prompts ("Instruction: <book>\\nResponse:"), prompts read at once (prefill),
then --steps forced decode steps (eos ignored) with greedy tokens.

Variants:

- eager: what golem does now: prefill.Prefill and decoding.Batch (DynamicCache, mask and cache
  grow by a column a step);
- static: transformers' StaticCache, preallocated to prompt + steps columns, with a mask of that
  fixed width (columns not written yet are hidden by the causal mask), forward eager;
- compile-static: the peft wrapper's forward under torch.compile (dynamic=False) on the static
  cache, so every decode step has the same shapes; the prefill stays eager;
- compile-static-ro: the same with mode="reduce-overhead" (CUDA graphs; on CPU there are none to
  capture, so this shows whether the mode does anything else here);
- compile-static-dynamic: dynamic=True on the static cache (symbolic batch size);
- compile-dynamic: dynamic=True on golem's own path (Prefill/Batch, DynamicCache).

Each variant then shrinks its batch by one row a step for --shrink steps, as golem's batches do
when rows finish, and reports the graphs compiled meanwhile and those steps' times. Every variant
also runs the eager path in its own process and compares greedy tokens row by row.

Each (batch, variant) runs in a child process of its own, killed after --timeout seconds, with a
fresh Inductor cache; a variant that fails or runs out of time is reported as such. compile_s is
the first compiled decode step (trace, cold Inductor compile, one step); step_ms_median is over
the full-batch steps after the first. Prints one JSON line per variant, and one with a
torch.profiler breakdown of an eager decode step at --profile-batch. Usage (on an idle machine):

    PYTHONPATH=inference_py .venv/bin/python scripts/measure_compile.py [--batch 32 64]
        [--steps 24] [--shrink 4] [--variants eager static ...] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "inference_py"))

from transformers import StaticCache  # noqa: E402
from transformers.cache_utils import StaticLayer  # noqa: E402

from golem_sidecar.adapters import check_adapter_folder  # noqa: E402
from golem_sidecar.config import Security  # noqa: E402
from golem_sidecar.decoding import Batch, Row, pad_id  # noqa: E402
from golem_sidecar.gate import ModelRef  # noqa: E402
from golem_sidecar.lanes import Lane  # noqa: E402
from golem_sidecar.models import ResidentModels, peft_name  # noqa: E402
from golem_sidecar.placement import Placement  # noqa: E402
from golem_sidecar.prefill import Prefill  # noqa: E402
from golem_sidecar.sampling import greedy_picks  # noqa: E402

GGUF = ROOT / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = ROOT / "models/adapters/genres/checkpoint-final"
CPU = Placement(device="cpu", dtype="float32", load_in_4bit=False)
BOOKS = 64

# torch.compile settings of each compiled variant, and whether it decodes on the static cache.
COMPILED: dict[str, tuple[dict[str, Any], bool]] = {
    "compile-static": ({"dynamic": False}, True),
    "compile-static-ro": ({"dynamic": False, "mode": "reduce-overhead"}, True),
    "compile-static-dynamic": ({"dynamic": True}, True),
    "compile-dynamic": ({"dynamic": True}, False),
}
VARIANTS = ["eager", "static", *COMPILED]

# Profiler op names by kind, for "where a step goes".
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}
ATTENTION = ("scaled_dot_product", "attention", "softmax")
# Views only rewrite a tensor's shape and strides; their time is dispatch overhead.
VIEWS = {
    "aten::t",
    "aten::transpose",
    "aten::as_strided",
    "aten::reshape",
    "aten::view",
    "aten::_unsafe_view",
    "aten::slice",
    "aten::select",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::permute",
    "aten::narrow",
    "aten::alias",
    "aten::detach",
}
MEMORY = {
    "aten::cat",
    "aten::copy_",
    "aten::clone",
    "aten::_to_copy",
    "aten::to",
    "aten::index",
    "aten::index_select",
    "aten::index_copy_",
    "aten::constant_pad_nd",
    "aten::pad",
    "aten::empty",
    "aten::empty_strided",
    "aten::zeros",
    "aten::fill_",
    "aten::contiguous",
    "aten::embedding",
}
ELEMENTWISE = {
    "aten::add",
    "aten::mul",
    "aten::sub",
    "aten::neg",
    "aten::silu",
    "aten::rsqrt",
    "aten::pow",
    "aten::mean",
    "aten::div",
    "aten::cos",
    "aten::sin",
    "aten::exp",
    "aten::where",
    "aten::masked_fill",
    "aten::bitwise_and",
    "aten::bitwise_or",
    "aten::le",
    "aten::ge",
    "aten::lt",
    "aten::gt",
    "aten::eq",
    "aten::cumsum",
}


def prompts(count: int) -> list[str]:
    books = [json.loads(line)["instruction"] for line in (ROOT / "data/genres.jsonl").open()]
    return [f"Instruction: {book}\nResponse:" for book in books[:BOOKS]][:count]


@dataclass
class Loaded:
    """The default base with the demo adapter, and the lane its one-adapter rows run on."""

    lane: Lane
    adapter: str
    tokenizer: Any
    config: Any

    @property
    def model(self) -> Any:
        return self.lane.model


def load() -> Loaded:
    models = ResidentModels(Security())
    base, _ = models.base(ModelRef(str(GGUF), str(GGUF.resolve())), CPU)
    name, _ = models.adapter(base, check_adapter_folder(str(LORA), allow_pickle=False))
    adapter = peft_name(name)
    lane = base.lane(adapter).narrowed([adapter])
    assert lane.active == adapter, "the demo LoRA runs with its adapter active"
    lane.model.set_adapter(adapter, inference_mode=True)
    return Loaded(lane, adapter, base.tokenizer, base.model.config)


@dataclass
class Run:
    """One variant's decode of one batch."""

    tokens: list[list[int]]
    prefill_s: float
    # Seconds of each decode step at the full batch, then of each shrinking step.
    steps_s: list[float] = field(default_factory=list)
    shrink_s: list[float] = field(default_factory=list)
    # Graphs compiled (torch._dynamo's unique_graphs) in the first step, the other full-batch
    # steps and the shrinking steps.
    graphs: tuple[int, int, int] = (0, 0, 0)
    graph_breaks: int = 0


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _timed(call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    logits = call()
    return logits, time.perf_counter() - started


def _decode(
    prefill: Callable[[], torch.Tensor],
    step: Callable[[list[int]], torch.Tensor],
    shrink: Callable[[], None],
    steps: int,
    shrinks: int,
    between: Callable[[list[int]], None] | None = None,
) -> Run:
    """The common loop: prefill, ``steps`` full-batch decode steps, then ``shrinks`` steps each
    one row fewer. ``between`` runs after the full-batch steps (the profiler's turn)."""
    logits, prefill_s = _timed(prefill)
    picks = greedy_picks(logits)[0]
    run = Run([[t] for t in picks], prefill_s)
    counts = [_graphs()]
    for _ in range(steps):
        logits, took = _timed(lambda picks=picks: step(picks))  # type: ignore[misc]
        run.steps_s.append(took)
        picks = greedy_picks(logits)[0]
        for row, token in zip(run.tokens, picks, strict=True):
            row.append(token)
        counts.append(_graphs())
    if between is not None:
        between(picks)
    before_shrink = _graphs()
    for _ in range(min(shrinks, len(picks) - 1)):
        shrink()
        picks = picks[:-1]
        logits, took = _timed(lambda picks=picks: step(picks))  # type: ignore[misc]
        run.shrink_s.append(took)
        picks = greedy_picks(logits)[0]
    first = counts[1] - counts[0] if steps else 0
    run.graphs = (first, counts[-1] - counts[0] - first, _graphs() - before_shrink)
    return run


def golem_path(
    loaded: Loaded,
    texts: list[str],
    steps: int,
    shrinks: int,
    decode_lane: Lane | None = None,
    between: Callable[[Batch, list[int]], None] | None = None,
) -> Run:
    """golem's own Prefill and Batch (DynamicCache); ``decode_lane`` replaces the lane for the
    decode steps (a compiled forward), the prefill always runs eager."""
    rows = [
        Row(list(loaded.tokenizer(text)["input_ids"]), loaded.adapter, 10**6, threading.Event())
        for text in texts
    ]
    reading = Prefill(loaded.lane, rows, pad_id(loaded.tokenizer), "cpu")
    held: dict[str, Batch] = {}

    def prefill() -> torch.Tensor:
        while not reading.done:  # a shared prefix first, then each row's own tokens
            reading.advance(reading.width)
        batch = reading.decoding()
        if decode_lane is not None:
            batch.lane = decode_lane
        held["batch"] = batch
        return batch.logits

    def step(tokens: list[int]) -> torch.Tensor:
        held["batch"].step(tokens)
        return held["batch"].logits

    def shrink() -> None:
        # The last row finishes: drop_finished slices the cache and trims the mask, as in golem.
        held["batch"].rows[-1].finish_reason = "length"
        held["batch"].drop_finished()

    after = None if between is None else (lambda picks: between(held["batch"], picks))
    return _decode(prefill, step, shrink, steps, shrinks, after)


class StaticDecode:
    """Left-padded rows decoding on a StaticCache: one write column per step for every row (they
    are padded to one width), and an attention mask of the cache's fixed width, so a decode step
    has the same input shapes every time. Columns not written yet are hidden by the causal mask
    (their key index is past the query's), padding columns by the mask."""

    def __init__(self, loaded: Loaded, texts: list[str], max_len: int) -> None:
        self.loaded = loaded
        tokenizer = loaded.tokenizer
        ids = [list(tokenizer(text)["input_ids"]) for text in texts]
        width = max(len(row) for row in ids)
        self.ids = torch.full((len(ids), width), pad_id(tokenizer), dtype=torch.long)
        self.mask = torch.ones((len(ids), max_len), dtype=torch.long)
        for i, row in enumerate(ids):
            self.ids[i, width - len(row) :] = torch.tensor(row)
            self.mask[i, : width - len(row)] = 0
        self.positions = (self.mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        self.last = self.positions[:, -1:]
        self.cache = StaticCache(config=loaded.config, max_cache_len=max_len)

    def prefill(self) -> torch.Tensor:
        out = self.loaded.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def step(self, forward: Callable[..., Any], tokens: list[int]) -> torch.Tensor:
        self.last = self.last + 1
        out = forward(
            input_ids=torch.tensor(tokens).unsqueeze(1),
            attention_mask=self.mask,
            position_ids=self.last,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = out.logits[:, -1, :].clone()
        return logits

    def shrink(self) -> None:
        """Drops the last row, as golem drops a finished one."""
        keep = torch.arange(self.mask.shape[0] - 1)
        for layer in self.cache.layers:
            assert isinstance(layer, StaticLayer), "StaticCache(config) of a plain decoder"
            assert layer.keys is not None and layer.values is not None, "filled by the prefill"
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            layer.batch_size = len(keep)
        self.mask, self.last = self.mask[keep], self.last[keep]


def static_path(
    loaded: Loaded,
    texts: list[str],
    steps: int,
    shrinks: int,
    forward: Callable[..., Any] | None = None,
) -> Run:
    width = max(len(loaded.tokenizer(text)["input_ids"]) for text in texts)
    decode = StaticDecode(loaded, texts, width + steps + shrinks + 1)
    step_forward = loaded.model if forward is None else forward
    return _decode(
        decode.prefill,
        lambda tokens: decode.step(step_forward, tokens),
        decode.shrink,
        steps,
        shrinks,
    )


def profile_step(batch: Batch, picks: list[int]) -> dict[str, Any]:
    """Self CPU time by op of one eager decode step (after one unprofiled step)."""
    batch.step(picks)
    picks = greedy_picks(batch.logits)[0]
    activities = [torch.profiler.ProfilerActivity.CPU]
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        batch.step(picks)
    wall_ms = (time.perf_counter() - started) * 1000
    ops = [(e.key, e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()]
    total = sum(ms for _, ms, _ in ops)
    kinds = dict.fromkeys(["matmul", "attention", "elementwise", "memory", "views", "other"], 0.0)
    for name, ms, _ in ops:
        kinds[_kind(name)] += ms
    ops.sort(key=lambda op: -op[1])
    return {
        "rows": len(batch.rows),
        "cache_columns": int(batch.mask.shape[1]),
        "profiled_step_wall_ms": round(wall_ms, 2),
        "aten_self_cpu_ms": round(total, 2),
        "by_kind_ms": {kind: round(ms, 2) for kind, ms in kinds.items()},
        "by_kind_share": {kind: round(ms / total, 3) for kind, ms in kinds.items()},
        "top_ops": [
            {"op": name, "self_cpu_ms": round(ms, 3), "calls": calls}
            for name, ms, calls in ops[:15]
        ],
    }


def _kind(op: str) -> str:
    if op in MATMUL:
        return "matmul"
    if any(word in op for word in ATTENTION):
        return "attention"
    if op in MEMORY:
        return "memory"
    if op in VIEWS:
        return "views"
    # In-place forms (aten::mul_) count with their op.
    if op.rstrip("_") in ELEMENTWISE:
        return "elementwise"
    return "other"


def run_variant(variant: str, batch: int, steps: int, shrinks: int, profile: bool) -> None:
    """One variant at one batch size, in this (child) process; prints its JSON lines."""
    loaded = load()
    texts = prompts(batch)
    report: dict[str, Any] = {"variant": variant, "batch": batch, "steps": steps}
    compile_s = None
    try:
        with torch.inference_mode():
            profiled: dict[str, Any] = {}

            def keep_profile(batch_now: Batch, picks: list[int]) -> None:
                profiled.update(profile_step(batch_now, picks))

            reference = golem_path(
                loaded, texts, steps, shrinks, between=keep_profile if profile else None
            )
            if variant == "eager":
                run = reference
            elif variant == "static":
                run = static_path(loaded, texts, steps, shrinks)
            else:
                options, static = COMPILED[variant]
                torch._dynamo.reset()
                compiled = torch.compile(loaded.model, **options)
                if static:
                    run = static_path(loaded, texts, steps, shrinks, compiled)
                else:
                    run = golem_path(loaded, texts, steps, shrinks, Lane(compiled))
                compile_s = round(run.steps_s[0], 3)
                run.graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(json.dumps(report), flush=True)
        traceback.print_exc()
        return
    later = run.steps_s[1:] or run.steps_s
    equal = sum(a == b for a, b in zip(run.tokens, reference.tokens, strict=True))
    report |= {
        "prefill_s": round(run.prefill_s, 3),
        "step_ms_median": round(statistics.median(later) * 1000, 2),
        "step_ms_max": round(max(later) * 1000, 2),
        "first_step_ms": round(run.steps_s[0] * 1000, 2),
        "compile_s": compile_s,
        "tokens_equal": f"{equal}/{len(run.tokens)}",
        "graphs_first_step": run.graphs[0],
        "graphs_later_steps": run.graphs[1],
        "graphs_while_shrinking": run.graphs[2],
        "shrink_step_ms": [round(s * 1000, 1) for s in run.shrink_s],
        "graph_breaks": run.graph_breaks,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report), flush=True)
    if profiled:
        print(json.dumps({"variant": "profile-eager-step", "batch": batch, **profiled}), flush=True)


def supervise(args: argparse.Namespace) -> None:
    """Runs every (batch, variant) in a child process with a timeout and a fresh Inductor cache,
    and prints its JSON lines, or one saying how it failed."""
    for batch in args.batch:
        for variant in args.variants:
            command = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--batch",
                str(batch),
                "--steps",
                str(args.steps),
                "--shrink",
                str(args.shrink),
            ]
            if batch == args.profile_batch and variant == "eager":
                command.append("--profile")
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                _supervised(command, env, args.timeout, variant, batch)


def _supervised(
    command: list[str], env: dict[str, str], timeout: int, variant: str, batch: int
) -> None:
    started = time.perf_counter()
    child = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The child's own group: Inductor's compile workers go with it.
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        failed = {"error": f"timed out after {timeout} s"}
        print(json.dumps({"variant": variant, "batch": batch, **failed}), flush=True)
        return
    lines = [line for line in out.splitlines() if line.startswith("{")]
    for line in lines:
        print(line, flush=True)
    if child.returncode != 0 or not lines:
        tail = " | ".join(err.strip().splitlines()[-3:])
        failed = {"error": f"exit {child.returncode} after {time.perf_counter() - started:.0f} s"}
        print(json.dumps({"variant": variant, "batch": batch, **failed, "stderr": tail}))
    elif any('"error"' in line for line in lines):
        print(err.strip(), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=24, help="forced decode steps per row")
    parser.add_argument("--shrink", type=int, default=4, help="steps that drop one row each")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    parser.add_argument(
        "--profile-batch", type=int, default=32, help="profile an eager step at this batch"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if max(args.batch) > BOOKS or min(args.batch) < 1:
        parser.error(f"--batch takes 1 to {BOOKS} rows (the first {BOOKS} genre prompts)")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is the compile)")
    if args.child:
        run_variant(args.child, args.batch[0], args.steps, args.shrink, args.profile)
    else:
        supervise(args)


if __name__ == "__main__":
    main()
