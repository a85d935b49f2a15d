"""Generation and fidelity: the sidecar answers exactly what plain transformers + peft answer."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from golem_sidecar.decoding import FINISH_CANCELLED, FINISH_EOS, Row
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.lanes import Lane
from golem_sidecar.scheduler import decode_batch
from tests.tiny_models import SEED_PROMPT

PROMPTS = [SEED_PROMPT, "Instruction: Which genre is Dune?\nResponse:", "The quick brown"]


def _plain_answer(model_dir: str, adapter_dir: str | None, prompt: str, n: int) -> list[int]:
    """The seed script's way: from_pretrained, PeftModel.from_pretrained, greedy generate."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


def _decode(model_dir: str, ids: list[int]) -> str:
    return str(AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True))


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_adapter_answer_equals_plain_peft_token_for_token(
    stub: exam_pb2_grpc.ExamServiceStub, tiny: dict[str, str], prompt: str
) -> None:
    for adapter in ("adapter", "adapter_b"):
        expected = _plain_answer(tiny["model"], tiny[adapter], prompt, 12)
        got = await stub.TakeExam(
            exam_pb2.TakeExamRequest(prompt=prompt, adapter_path=tiny[adapter], max_new_tokens=12)
        )
        assert got.answer_tokens == len(expected)
        assert got.answer == _decode(tiny["model"], expected)


async def test_bare_base_equals_plain_transformers_and_differs_from_the_adapter(
    stub: exam_pb2_grpc.ExamServiceStub, tiny: dict[str, str]
) -> None:
    base_ids = _plain_answer(tiny["model"], None, SEED_PROMPT, 12)
    adapted_ids = _plain_answer(tiny["model"], tiny["adapter"], SEED_PROMPT, 12)
    assert base_ids != adapted_ids, "the fixture adapter must change the answer"
    base = await stub.TakeExam(
        exam_pb2.TakeExamRequest(prompt=SEED_PROMPT, disable_adapter=True, max_new_tokens=12)
    )
    adapted = await stub.TakeExam(exam_pb2.TakeExamRequest(prompt=SEED_PROMPT, max_new_tokens=12))
    assert base.answer == _decode(tiny["model"], base_ids)
    assert adapted.answer == _decode(tiny["model"], adapted_ids)
    assert base.answer != adapted.answer
    assert not base.HasField("adapter")


def _row(tokenizer: Any, max_new_tokens: int, flag: threading.Event | None = None) -> Row:
    return Row(
        prompt_ids=list(tokenizer(SEED_PROMPT)["input_ids"]),
        adapter=None,
        max_new_tokens=max_new_tokens,
        cancelled=flag or threading.Event(),
    )


def test_a_set_cancel_flag_stops_generation_at_the_next_token(tiny: dict[str, str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    steps = []
    model.register_forward_hook(lambda *_: steps.append(1))
    flag = threading.Event()
    flag.set()
    row = _row(tokenizer, 50, flag)
    decode_batch(Lane(model), tokenizer, [row], "cpu")
    assert row.finish_reason == FINISH_CANCELLED
    assert row.generated == []
    assert len(steps) == 1, "the prompt's forward pass, then the flag ends the row"


def test_finish_reason_is_eos_when_the_model_stops(tiny: dict[str, str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    # Make eos the most likely next token everywhere: greedy decoding must stop at once.
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[tokenizer.eos_token_id] = 1e4
    row = _row(tokenizer, 10)
    decode_batch(Lane(model), tokenizer, [row], "cpu")
    assert (row.finish_reason, len(row.generated), row.answer) == (FINISH_EOS, 1, "")
