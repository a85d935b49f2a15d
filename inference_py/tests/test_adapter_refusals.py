"""Adapters that cannot be applied: refused with a message naming what differs, before or while
loading, and the base keeps answering exactly what plain transformers + peft answer."""

from __future__ import annotations

import threading

import grpc
import pytest
from peft import PeftModel

from golem_sidecar.adapters import check_adapter_folder
from golem_sidecar.config import Security
from golem_sidecar.decoding import Row
from golem_sidecar.errors import GolemError
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.models import ResidentModels
from golem_sidecar.placement import Placement
from golem_sidecar.scheduler import decode_batch
from tests.rpc import failure
from tests.test_generation import _decode, _plain_answer
from tests.tiny_models import SEED_PROMPT, local_model

Stub = exam_pb2_grpc.ExamServiceStub
CPU = Placement(device="cpu", dtype="float32", load_in_4bit=False)


async def _refusal(stub: Stub, adapter_path: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.TakeExam(exam_pb2.TakeExamRequest(adapter_path=adapter_path), timeout=60)
    got = failure(info.value)
    assert (got.code, got.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE")
    return got.message


async def test_adapter_for_another_hidden_size_names_module_and_shapes(
    stub: Stub, bad: dict[str, str]
) -> None:
    message = await _refusal(stub, bad["adapter_other_size"])
    assert "model.layers.0.self_attn.q_proj" in message
    assert "lora_A.weight" in message
    # rank 8 by hidden 32 in the adapter; the base's hidden size is 64
    assert "[8, 32] in the adapter but the base needs [8, 64]" in message
    assert "more tensors differ" in message


async def test_adapter_for_modules_the_base_lacks_names_them(
    stub: Stub, bad: dict[str, str]
) -> None:
    message = await _refusal(stub, bad["adapter_other_arch"])
    assert "targets modules the base lacks: c_attn" in message


async def test_after_refusals_answers_still_equal_plain_peft(
    stub: Stub, tiny: dict[str, str], bad: dict[str, str]
) -> None:
    for foreign in ("adapter_other_size", "adapter_other_arch", "truncated", "corrupt"):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.TakeExam(exam_pb2.TakeExamRequest(adapter_path=bad[foreign]), timeout=60)
    for adapter in (None, "adapter", "adapter_b"):
        expected = _plain_answer(tiny["model"], tiny[adapter] if adapter else None, SEED_PROMPT, 8)
        request = exam_pb2.TakeExamRequest(prompt=SEED_PROMPT, max_new_tokens=8)
        if adapter is None:
            request.disable_adapter = True
        else:
            request.adapter_path = tiny[adapter]
        got = await stub.TakeExam(request, timeout=60)
        assert got.answer == _decode(tiny["model"], expected), adapter


def test_a_failed_first_attach_leaves_no_half_loaded_base(
    tiny: dict[str, str], bad: dict[str, str]
) -> None:
    """peft injects the first adapter into a copy of the base's module tree (models.py); when it
    fails halfway that copy is dropped, and the base itself answers on, untouched."""
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), CPU)
    foreign = check_adapter_folder(bad["adapter_other_size"], allow_pickle=False)
    with pytest.raises(GolemError) as info:
        models.adapter(base, foreign)
    assert info.value.reason == "ADAPTER_INCOMPATIBLE"
    again, load_ns = models.base(local_model(tiny["model"]), CPU)
    assert again is base and load_ns == 0, "the base was never touched, so it stays resident"
    assert not isinstance(again.model, PeftModel) and not again.wrappers
    assert not any("lora" in name for name, _ in again.model.named_modules())
    expected = _plain_answer(tiny["model"], None, SEED_PROMPT, 8)
    row = Row(list(again.tokenizer(SEED_PROMPT)["input_ids"]), None, 8, threading.Event())
    decode_batch(again.lane(None), again.tokenizer, [row], "cpu")
    assert row.answer == _decode(tiny["model"], expected)


def test_missing_targets_are_checked_before_peft_touches_the_base(
    tiny: dict[str, str], bad: dict[str, str]
) -> None:
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), CPU)
    foreign = check_adapter_folder(bad["adapter_other_arch"], allow_pickle=False)
    with pytest.raises(GolemError):
        models.adapter(base, foreign)
    same, load_ns = models.base(local_model(tiny["model"]), CPU)
    assert same is base and load_ns == 0, "nothing was touched, so nothing is reloaded"
    assert not isinstance(same.model, PeftModel) and not same.wrappers
