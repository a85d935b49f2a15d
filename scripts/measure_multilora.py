"""Decode steps of one batch of 32 rows spread round-robin over 1, 4 and 16 adapters, on the
embedded default (float32, CPU) wearing noisy copies of the demo adapter (bench.py's
perturbed_copies): peft's routed forward (``adapter_names``) against the gathered forward
(multilora.py), and one adapter set active (``Lane(active=...)``, the fast
path of a one-adapter batch) as the mark to keep up with.

Prints one JSON line per case: the median and the fastest step time over the timed steps of
every round, and the tokens per second each gives the batch. Usage (timings are only as quiet
as the machine):

    PYTHONPATH=inference_py .venv/bin/python scripts/measure_multilora.py [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "inference_py"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import perturbed_copies  # noqa: E402

from golem_sidecar.adapters import check_adapter_folder  # noqa: E402
from golem_sidecar.config import Defaults, Security  # noqa: E402
from golem_sidecar.gate import resolve_model  # noqa: E402
from golem_sidecar.lanes import BASE_ADAPTER, Lane  # noqa: E402
from golem_sidecar.models import ResidentBase, ResidentModels, peft_name  # noqa: E402
from golem_sidecar.multilora import gathered_forward  # noqa: E402
from golem_sidecar.placement import default_placement  # noqa: E402
from golem_sidecar.prefill import left_pad  # noqa: E402

ROWS = 32
COUNTS = (1, 4, 16)
Forward = Callable[..., Any]


def prompts() -> list[str]:
    books = [json.loads(line)["instruction"] for line in (ROOT / "data/genres.jsonl").open()]
    return [f"Instruction: {book}\nResponse:" for book in books[:ROWS]]


def left_padded(base: ResidentBase) -> dict[str, torch.Tensor]:
    ids, mask = left_pad([list(base.tokenizer(p)["input_ids"]) for p in prompts()], 0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": mask.cumsum(-1) - 1}


def step_seconds(forward: Forward, inputs: dict[str, torch.Tensor], steps: int) -> list[float]:
    """A prefill, then ``steps`` greedy decode steps of the whole batch; each step's time."""
    cache = DynamicCache()
    mask, positions = inputs["attention_mask"], inputs["position_ids"][:, -1:]
    logits = forward(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits
    times = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions + 1
        started = time.perf_counter()
        logits = forward(
            input_ids=token,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        times.append(time.perf_counter() - started)
    return times


def cases(base: ResidentBase, names: list[str]) -> list[tuple[str, int, Forward]]:
    wrapper = base.wrappers["LORA"]
    found = []
    for count in COUNTS:
        worn: list[str | None] = [names[i % count] for i in range(ROWS)]
        routed = [a or BASE_ADAPTER for a in worn]
        found.append(("peft_routed", count, _routed(wrapper, routed)))
        found.append(("gathered", count, _gathered(wrapper, worn)))
    lane = Lane(wrapper, active=names[0])
    found.append(("one_adapter_active", 1, lambda **inputs: lane([names[0]] * ROWS, **inputs)))
    return found


def _routed(wrapper: Any, routed: list[str]) -> Forward:
    return lambda **inputs: wrapper(**inputs, adapter_names=routed)


def _gathered(wrapper: Any, worn: list[str | None]) -> Forward:
    return lambda **inputs: gathered_forward(wrapper, worn, **inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    defaults = Defaults()
    security = Security()
    models = ResidentModels(security, max_adapters=max(COUNTS))
    model = resolve_model("model_name", str(ROOT / defaults.model_name), security, lambda _: False)
    base, _ = models.base(model, default_placement(defaults))
    with tempfile.TemporaryDirectory() as workdir:
        copies = perturbed_copies(ROOT / defaults.adapter_path, Path(workdir), max(COUNTS))
        for i, copy in enumerate(copies):
            models.adapter(base, check_adapter_folder(copy, allow_pickle=False), name=f"c{i:02d}")
    names = [peft_name(f"c{i:02d}") for i in range(max(COUNTS))]
    inputs = left_padded(base)
    found = cases(base, names)
    times: dict[tuple[str, int], list[float]] = {(name, count): [] for name, count, _ in found}
    with torch.inference_mode():
        # Rounds over every case in turn, so a burst of other work on a shared machine falls
        # on all cases alike rather than on one.
        for _ in range(args.rounds):
            for name, count, forward in found:
                # The first step warms up (and builds the gathered stacks); it is not counted.
                times[name, count] += step_seconds(forward, inputs, args.steps + 1)[1:]
    for (name, count), seconds in times.items():
        step, best = statistics.median(seconds), min(seconds)
        line = {
            "case": name,
            "adapters": count,
            "rows": ROWS,
            "step_ms": round(1000 * step, 1),
            "tokens_per_s": round(ROWS / step, 1),
            # The least disturbed step: on a shared machine, nearer what the code costs.
            "best_step_ms": round(1000 * best, 1),
            "best_tokens_per_s": round(ROWS / best, 1),
            "steps": len(seconds),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
