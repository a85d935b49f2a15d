"""Greedy generation for one prompt, as the seed script did it: attention mask, max_new_tokens,
decode without special tokens. Runs on the model worker thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from golem_sidecar.errors import caller_gone

FINISH_LENGTH = "length"
FINISH_EOS = "eos"


@dataclass(frozen=True)
class Generation:
    """What one generate call produced."""

    answer: str
    full_text: str
    prompt_tokens: int
    answer_tokens: int
    finish_reason: str
    generate_ns: int


class StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the caller has gone (cancelled or past deadline)."""

    def __init__(self, flag: threading.Event) -> None:
        self._flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> Any:
        return torch.full((input_ids.shape[0],), self._flag.is_set(), dtype=torch.bool)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, device: Any) -> Any:
    return tokenizer(prompt, return_tensors="pt").to(device)


def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Any,
    max_new_tokens: int,
    cancelled: threading.Event,
) -> Generation:
    """Greedy continuation of an encoded prompt."""
    started = time.perf_counter_ns()
    prompt_len = int(encoded["input_ids"].shape[1])
    with torch.inference_mode():
        output = model.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([StopWhenSet(cancelled)]),
        )
    elapsed = time.perf_counter_ns() - started
    if cancelled.is_set():
        raise caller_gone()
    new_tokens = output[0, prompt_len:]
    eos_ids = _eos_ids(model, tokenizer)
    finished_on_eos = len(new_tokens) > 0 and int(new_tokens[-1]) in eos_ids
    return Generation(
        answer=str(tokenizer.decode(new_tokens, skip_special_tokens=True)),
        full_text=str(tokenizer.decode(output[0], skip_special_tokens=True)),
        prompt_tokens=prompt_len,
        answer_tokens=len(new_tokens),
        finish_reason=FINISH_EOS if finished_on_eos else FINISH_LENGTH,
        generate_ns=elapsed,
    )


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return set(configured) if isinstance(configured, list) else {int(configured)}
