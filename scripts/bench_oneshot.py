"""The seed's one-shot way, kept for the benchmark: load a base and a PEFT adapter with plain
transformers + peft, answer one prompt greedily, print the answer as one JSON line, exit.

    python scripts/bench_oneshot.py --model M --adapter A [--prompt P] [--max-new-tokens N]

scripts/bench.py times this whole process (imports included, as the seed paid them on every
question); scripts/bench_plain.py reuses ``load_with_adapter`` and ``generate_greedy`` for the
plain transformers + peft baselines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

SEED_PROMPT = "Instruction: Which genre is the hobbit?\nResponse:"


def load_with_adapter(model: str, adapter: str) -> tuple[Any, PreTrainedTokenizerBase]:
    """The base (a model folder or a ``.gguf`` file) wearing the adapter, in eval mode."""
    extra = {"gguf_file": Path(model).name} if model.endswith(".gguf") else {}
    source = str(Path(model).parent) if extra else model
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    base = AutoModelForCausalLM.from_pretrained(source, **extra)
    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def generate_greedy(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int
) -> list[int]:
    """The new token ids of one greedy ``generate`` call (it stops at eos, as golem does)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad
        )
    return [int(t) for t in output[0, inputs["input_ids"].shape[1] :]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a model folder or .gguf file")
    parser.add_argument("--adapter", required=True, help="a PEFT adapter folder")
    parser.add_argument("--prompt", default=SEED_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()
    model, tokenizer = load_with_adapter(args.model, args.adapter)
    tokens = generate_greedy(model, tokenizer, args.prompt, args.max_new_tokens)
    print(json.dumps({"answer": tokenizer.decode(tokens, skip_special_tokens=True)}))


if __name__ == "__main__":
    main()
