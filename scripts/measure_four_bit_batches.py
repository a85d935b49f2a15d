"""How much batching changes 4-bit answers on the embedded default (README, 4-bit; the figures in
docs/benchmarks.md).

    PYTHONPATH=inference_py:scripts .venv/bin/python scripts/measure_four_bit_batches.py \
        [--quant-type fp4] [--compute float16] [--prompts 32]

golem's own loading (loading.load_model) and decoding (decoding.decode_batch, as the engine calls
it) on the story prompts of scripts/bench.py, 24 new tokens: each prompt alone, then all of them
in one left-padded batch. Prints each answer that differs, the step where it leaves the alone
answer and how close the alone run's two best tokens were there, and the largest difference of
the first step's logits between the batch and the prompts alone. ``--compute none`` measures
full precision (float32) for comparison.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import torch
from bench import ROOT, distinct_prompts
from peft import PeftModel

from golem_sidecar.config import Security, load_config
from golem_sidecar.decoding import Row
from golem_sidecar.gate import ModelRef
from golem_sidecar.lanes import Lane
from golem_sidecar.loading import load_model, load_tokenizer
from golem_sidecar.placement import Placement
from golem_sidecar.scheduler import decode_batch

TOKENS = 24


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quant-type", default="fp4", choices=("fp4", "nf4"))
    parser.add_argument("--compute", default="float16", help="float16, bfloat16, float32 or none")
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    config = load_config(str(ROOT / "config" / "golem.json"), None, None)
    path = ROOT / config.defaults.model_name
    ref = ModelRef(str(path), str(Path(path).resolve()))
    if args.compute == "none":
        placement = Placement("cpu", "float32", False)
    else:
        placement = Placement("cpu", args.compute, True, args.compute, args.quant_type, False)
    model = load_model(ref, placement, Security())
    adapter = str(ROOT / config.defaults.adapter_path)
    model = PeftModel.from_pretrained(model, adapter, adapter_name="a").eval()
    tokenizer = load_tokenizer(ref, Security())
    prompts = distinct_prompts()[: args.prompts]

    def rows() -> list[Row]:
        return [
            Row(list(tokenizer(p)["input_ids"]), "a", TOKENS, threading.Event()) for p in prompts
        ]

    alone = rows()
    for row in alone:
        decode_batch(Lane(model, routed=True), tokenizer, [row], "cpu")
    batched = rows()
    decode_batch(Lane(model, routed=True), tokenizer, batched, "cpu")
    differing = 0
    for index, (a, b) in enumerate(zip(alone, batched, strict=True)):
        if a.generated == b.generated:
            continue
        differing += 1
        pairs = zip(a.generated, b.generated, strict=False)
        step = next(
            (i for i, (x, y) in enumerate(pairs) if x != y), min(len(a.generated), len(b.generated))
        )
        with torch.inference_mode():
            ids = torch.tensor([a.prompt_ids + a.generated[:step]])
            top2 = torch.topk(model(input_ids=ids).logits[0, -1].float(), 2).values
        gap = float(top2[0] - top2[1])
        print(f"prompt {index}: leaves the alone answer at step {step} (top-two gap {gap:.4f})")
        print(f"  alone:   {a.answer!r}\n  batched: {b.answer!r}")
    padded = tokenizer(prompts, return_tensors="pt", padding=True)
    positions = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        together = model(**padded, position_ids=positions).logits[:, -1].float()
        apart = [model(**tokenizer(p, return_tensors="pt")).logits[0, -1].float() for p in prompts]
    deviation = float((together - torch.stack(apart)).abs().max())
    tokens = sum(len(row.generated) for row in alone)
    print(
        f"{args.quant_type if args.compute != 'none' else 'full precision'} {args.compute}: "
        f"{differing} of {len(prompts)} answers differ ({tokens} tokens alone); first-step "
        f"logits differ by at most {deviation:.4g}"
    )


if __name__ == "__main__":
    main()
