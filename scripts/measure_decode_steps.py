"""Issue 9's natural-stop workload, in one process, side by side: 64 distinct genre prompts
("Instruction: Which genre is <book>?\\nResponse:"), at most 24 new tokens, stopping at eos, on
the embedded default wearing the demo adapter (float32, CPU).

- plain: transformers + peft, left-padded ``generate`` batches of 32 (what a user writes by hand);
- golem: the sidecar's own engine (no gRPC), all 64 submitted at once (batches of up to 32).

Prints one JSON line per repetition with both wall times and their ratio, and whether every
golem answer equals the plain batch's. Usage (on an idle machine):

    PYTHONPATH=inference_py .venv/bin/python scripts/measure_decode_steps.py [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "inference_py"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_oneshot import load_with_adapter  # noqa: E402

from golem_sidecar.config import load_config  # noqa: E402
from golem_sidecar.engine import ExamEngine  # noqa: E402
from golem_sidecar.exam import ExamSpec  # noqa: E402
from golem_sidecar.gate import resolve_adapter, resolve_model  # noqa: E402
from golem_sidecar.placement import default_placement  # noqa: E402

TOKENS = 24
BATCH = 32


def prompts() -> list[str]:
    books = [json.loads(line)["instruction"] for line in (ROOT / "data/genres.jsonl").open()]
    return [f"Instruction: {book}\nResponse:" for book in books[:64]]


def plain_batches(model, tokenizer, texts: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    for start in range(0, len(texts), BATCH):
        inputs = tokenizer(texts[start : start + BATCH], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
        width = inputs["input_ids"].shape[1]
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return answers


async def golem_all(engine: ExamEngine, specs: list[ExamSpec]) -> list[str]:
    results = await asyncio.gather(*(engine.take_exam(s, threading.Event()) for s in specs))
    return [r.generation.answer for r in results]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    config = load_config(str(ROOT / "config/golem.json"), None, "127.0.0.1:0")
    config = replace(config, defaults=replace(config.defaults, device="cpu"))
    defaults, security = config.defaults, config.security
    model_path, adapter_path = str(ROOT / defaults.model_name), str(ROOT / defaults.adapter_path)
    texts = prompts()
    engine = ExamEngine(config)
    model = resolve_model("model_name", model_path, security, engine.is_resident)
    adapter = resolve_adapter("adapter_path", adapter_path, security)
    template = ExamSpec(
        model=model,
        placement=default_placement(defaults),
        prompt="",
        max_new_tokens=TOKENS,
        adapter=adapter,
        expected_answer=None,
    )
    specs = [replace(template, prompt=text) for text in texts]
    await golem_all(engine, specs[:2])  # loads the base and adapter
    plain_model, tokenizer = load_with_adapter(model_path, adapter_path)
    plain_batches(plain_model, tokenizer, texts[:2])
    for rep in range(args.reps):
        started = time.perf_counter()
        plain = plain_batches(plain_model, tokenizer, texts)
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        ours = await golem_all(engine, specs)
        golem_s = time.perf_counter() - started
        print(
            json.dumps(
                {
                    "rep": rep,
                    "plain_batches_of_32_s": round(plain_s, 3),
                    "golem_s": round(golem_s, 3),
                    "plain_over_golem": round(plain_s / golem_s, 3),
                    "answers_equal": sum(a == b for a, b in zip(plain, ours, strict=True)),
                    "of": len(texts),
                }
            ),
            flush=True,
        )
    await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
