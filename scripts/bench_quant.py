"""4-bit against float32 on the embedded default, the measurement behind its quantization.

    scripts/bench_quant [--quick] [--out FILE] [--only fp4|nf4|float32]

For each quantization, a fresh sidecar + gateway (scripts/bench_stack.py) serving the embedded
default: the time until SERVING, generated tokens/s through the gateway at concurrency 1 and 32
(distinct prompts, as scripts/bench.py section 3), the sidecar's resident memory once warm
(VmRSS) and its peak (VmHWM, which includes loading), the footprint ListAdapters reports, and
whether its answers equal plain transformers + peft (+ bitsandbytes) with the same settings,
alone (concurrency 1) and in batches (the same prompts inside the concurrency-32 run). Last,
issue 9's natural-stop workload (scripts/bench.py section 2) in each quantization: the 64 genre
prompts, at most 24 tokens, golem at concurrency 32 against plain left-padded batches of 32 with
the same settings (run while the daemon idles).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from bench import ROOT, Tally, distinct_prompts, drive, genre_prompts, progress
from bench_oneshot import SEED_PROMPT
from bench_plain import padded_batches
from bench_stack import running_stack
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from golem_sidecar.config import load_config
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc

VARIANTS: dict[str, Any] = {
    "float32 (no quantization)": {"loadIn4Bit": False},
    "4-bit fp4, float16 compute (the seed's)": {
        "loadIn4Bit": True,
        "bnb4BitComputeDtype": "float16",
    },
    "4-bit nf4, float32 compute": {
        "loadIn4Bit": True,
        "bnb4BitComputeDtype": "float32",
        "bnb4BitQuantType": "nf4",
    },
}


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _plain_model(model: str, adapter: str, quantization: dict[str, Any]) -> tuple[Any, Any]:
    """The plain recipe with the same settings. transformers refuses a .gguf file with a
    quantization config, so for 4 bit the file is dequantized and saved first, as golem does."""
    path = Path(model)
    extra = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **extra)
    base = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **extra)
    if quantization["loadIn4Bit"]:
        compute = getattr(torch, quantization["bnb4BitComputeDtype"])
        base.hf_quantizer = None
        del base.config.quantization_config
        folder = tempfile.mkdtemp()
        base.save_pretrained(folder)
        del base
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_type=quantization.get("bnb4BitQuantType", "fp4"),
        )
        base = AutoModelForCausalLM.from_pretrained(
            folder, dtype=compute, device_map="cpu", quantization_config=config
        )
        shutil.rmtree(folder)
    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def _plain_answers(model: Any, tokenizer: Any, prompts: list[str], tokens: int) -> list[str]:
    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            pad = tokenizer.eos_token_id
            out = model.generate(**inputs, do_sample=False, max_new_tokens=tokens, pad_token_id=pad)
        ids = out[0, inputs["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(ids, skip_special_tokens=True))
    return answers


def measure(name: str, quantization: dict[str, Any], quick: bool, workdir: Path) -> dict[str, Any]:
    config = load_config(str(ROOT / "config" / "golem.json"), None, None)
    model = str(ROOT / config.defaults.model_name)
    adapter = str(ROOT / config.defaults.adapter_path)
    tokens, requests_1, requests_32 = (8, 4, 32) if quick else (24, 8, 64)
    prompts = distinct_prompts()
    tally = Tally()
    row: dict[str, Any] = {"variant": name, "quantization": quantization}

    def exam(prompt: str, n: int) -> exam_pb2.TakeExamRequest:
        return exam_pb2.TakeExamRequest(
            model_name=model, adapter_path=adapter, prompt=prompt, max_new_tokens=n
        )

    progress(f"{name}: starting")
    started = time.perf_counter()
    with running_stack(ROOT, model, adapter, workdir, 8, quantization) as stack:
        row["start_s"] = time.perf_counter() - started
        hobbit = drive(stack.gateway, [exam(SEED_PROMPT, 20)], 1, tally).responses[0]
        row["hobbit"] = hobbit.answer
        row["reported"] = json.loads(_json(hobbit.model.quantization))
        drive(stack.gateway, [exam(p, tokens) for p in prompts[:2]], 1, tally)  # warm-up
        progress(f"{name}: concurrency 1")
        one = drive(stack.gateway, [exam(p, tokens) for p in prompts[:requests_1]], 1, tally)
        progress(f"{name}: concurrency 32")
        many = drive(stack.gateway, [exam(p, tokens) for p in prompts[:requests_32]], 32, tally)
        row["tokens_per_s_1"] = one.tokens_per_s
        row["tokens_per_s_32"] = many.tokens_per_s
        row["mean_batch_32"] = many.mean_batch
        row.update(_memory_kib(stack.sidecar_pid))
        with grpc.insecure_channel(stack.sidecar) as channel:
            listing = exam_pb2_grpc.ExamServiceStub(channel).ListAdapters(
                exam_pb2.ListAdaptersRequest()
            )
        row["footprint_bytes"] = max(m.memory_footprint_bytes for m in listing.models)
        row["alone"] = [answer_to(one, p) for p in prompts[:requests_1]]
        row["batched"] = [answer_to(many, p) for p in prompts[:requests_1]]
        progress(f"{name}: natural stop, concurrency 32")
        genres = genre_prompts()[: 16 if quick else 64]
        natural = drive(stack.gateway, [exam(p, NATURAL_TOKENS) for p in genres], 32, tally)
        row["natural_golem_s"] = natural.wall_s
        natural_answers = [answer_to(natural, p) for p in genres]
    row["failures"] = tally.failures
    progress(f"{name}: the plain recipe")
    plain, tokenizer = _plain_model(model, adapter, quantization)
    row["plain"] = _plain_answers(plain, tokenizer, prompts[:requests_1], tokens)
    row["plain_hobbit"] = _plain_answers(plain, tokenizer, [SEED_PROMPT], 20)[0]
    padded_batches(plain, tokenizer, genres[:2], 32, NATURAL_TOKENS)  # warm-up
    batches = padded_batches(plain, tokenizer, genres, 32, NATURAL_TOKENS)
    row["natural_plain_s"] = batches.wall_s
    pairs = zip(natural_answers, batches.answers, strict=True)
    row["natural_equal"] = sum(a == b for a, b in pairs)
    row["natural_n"] = len(genres)
    return row


# As scripts/bench.py section 2.
NATURAL_TOKENS = 24


def answer_to(load: Any, prompt: str) -> str:
    """The answer a run gave to ``prompt``, found by its full text (the prompts are distinct and
    none begins another)."""
    for response in load.responses:
        if response.full_text.startswith(prompt):
            return str(response.answer)
    raise LookupError(prompt)


def _json(message: Any) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(message, preserving_proto_field_name=True)


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| quantization | start s | tokens/s c=1 | tokens/s c=32 (mean batch) | RSS MiB warm | "
        "peak RSS MiB | footprint MB | hobbit | = plain alone | = plain in batches | "
        "natural stop: plain batches of 32 s / golem c32 s (= plain) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same_alone = sum(a == p for a, p in zip(r["alone"], r["plain"], strict=True))
        same_batched = sum(a == p for a, p in zip(r["batched"], r["plain"], strict=True))
        n = len(r["plain"])
        differs = "" if r["hobbit"] == r["plain_hobbit"] else " (plain differs)"
        hobbit = repr(r["hobbit"]) + differs
        lines.append(
            f"| {r['variant']} | {r['start_s']:.1f} | {r['tokens_per_s_1']:.1f} | "
            f"{r['tokens_per_s_32']:.1f} ({r['mean_batch_32']:.1f}) | {r['VmRSS'] / 1024:.0f} | "
            f"{r['VmHWM'] / 1024:.0f} | {r['footprint_bytes'] / 1e6:.1f} | {hobbit} | "
            f"{same_alone}/{n} | {same_batched}/{n} | {r['natural_plain_s']:.2f} / "
            f"{r['natural_golem_s']:.2f} = {r['natural_plain_s'] / r['natural_golem_s']:.2f}x "
            f"({r['natural_equal']}/{r['natural_n']}) |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests")
    parser.add_argument("--out", type=Path, help="also write the rows (markdown) and JSON here")
    parser.add_argument("--only", help="measure only the variants whose name contains this")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, quantization) in enumerate(VARIANTS.items()):
            if args.only is not None and args.only not in name:
                continue
            rows.append(measure(name, quantization, args.quick, Path(tmp) / str(index)))
    report = render(rows)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    failures = [f for r in rows for f in r["failures"]]
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
