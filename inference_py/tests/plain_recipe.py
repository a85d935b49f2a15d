"""The recipe golem replaces, as a reference for the 4-bit tests: ``from_pretrained`` with a
``BitsAndBytesConfig``, the adapter attached with ``PeftModel.from_pretrained`` before any
forward pass, greedy ``generate()`` one prompt at a time."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig


@cache
def four_bit_model(model_dir: str, adapter_dir: str | None, quant_type: str, compute: str) -> Any:
    """A 4-bit base with the adapter (if any) on it, kept for the session."""
    dtype = getattr(torch, compute)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type=quant_type
        ),
    )
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir)


def greedy(model: Any, model_dir: str, prompt: str, tokens: int) -> tuple[list[int], list[float]]:
    """The new token ids, and at each step the gap between the two highest scores (how near a
    tie that step was)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    ids = [int(t) for t in out.sequences[0, inputs["input_ids"].shape[1] :]]
    top2 = [torch.topk(step[0].float(), 2).values for step in out.scores]
    return ids, [float(t[0] - t[1]) for t in top2]
