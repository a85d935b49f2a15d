"""The baselines golem is measured against: plain transformers + peft as a user writes it by
hand, one ``generate`` per prompt or left-padded ``generate`` batches, timed in this process
(scripts/bench.py runs them while the daemon idles)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from bench_oneshot import generate_greedy
from transformers import PreTrainedTokenizerBase

from golem_sidecar.decoding import eos_ids


@dataclass(frozen=True)
class Plain:
    """One timed plain run: each prompt's answer text and its new-token count, in prompt order."""

    wall_s: float
    answers: list[str]
    tokens: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.wall_s


def answer_length(new_ids: Sequence[int], eos: set[int]) -> int:
    """The new tokens up to and including the first eos, as golem counts answer_tokens (a
    batch's finished rows go on with padding that nobody asked for)."""
    return next((i + 1 for i, token in enumerate(new_ids) if token in eos), len(new_ids))


def one_by_one(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> Plain:
    """One greedy ``generate`` call per prompt, one after another."""
    answers, tokens = [], []
    started = time.perf_counter()
    for prompt in prompts:
        new_ids = generate_greedy(model, tokenizer, prompt, max_new_tokens)
        answers.append(str(tokenizer.decode(new_ids, skip_special_tokens=True)))
        tokens.append(len(new_ids))
    return Plain(time.perf_counter() - started, answers, tokens)


def padded_batches(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
) -> Plain:
    """Greedy ``generate`` over left-padded batches of ``batch`` prompts (padding with eos when
    the tokenizer has no pad token): the recipe every transformers tutorial gives."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = eos_ids(model, tokenizer)
    answers, tokens = [], []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        inputs = tokenizer(list(prompts[start : start + batch]), return_tensors="pt", padding=True)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in output[:, inputs["input_ids"].shape[1] :].tolist():
            answers.append(str(tokenizer.decode(row, skip_special_tokens=True)))
            tokens.append(answer_length(row, eos))
    return Plain(time.perf_counter() - started, answers, tokens)
