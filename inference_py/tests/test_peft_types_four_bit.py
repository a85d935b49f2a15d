"""Any mix of PEFT types on a 4-bit base: each adapter answers as plain transformers + peft +
bitsandbytes does with it alone (attached before the first forward pass, as plain peft does),
whenever golem attached it, and in mixed, concurrent batches. LoHa and LoKr, which peft cannot apply
to 4-bit layers, are refused by name."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from golem_sidecar.adapters import check_adapter_folder
from golem_sidecar.bnb_state import packed_weights
from golem_sidecar.config import QuantizationDefault, Security
from golem_sidecar.decoding import Row
from golem_sidecar.errors import GolemError
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.models import ResidentBase, ResidentModels, peft_name
from golem_sidecar.placement import Placement, fused_cpu_kernel
from golem_sidecar.scheduler import decode_batch
from tests.conftest import serving, tiny_config
from tests.plain_recipe import four_bit_model, greedy
from tests.test_peft_types import BARE, MIXED_PROMPTS, kind_request
from tests.tiny_models import local_model

Stub = exam_pb2_grpc.ExamServiceStub
TOKENS = 8
# The seed's quant type, and float32 compute so the unfused parts round as in full precision.
QUANT = "nf4"
COMPUTE = "float32"
FOUR_BIT = Placement("cpu", COMPUTE, True, COMPUTE, QUANT, False)
KINDS_4BIT = ("lora", "dora", "rslora", "ia3", "adalora")
QUANTIZATION = exam_pb2.Quantization(
    load_in_4bit=True, bnb_4bit_compute_dtype=COMPUTE, bnb_4bit_quant_type=QUANT
)


def _plain(model_dir: str, adapter_dir: str | None, prompt: str) -> list[int]:
    """The plain recipe alone: the adapter attached before any forward pass, greedy."""
    model = four_bit_model(model_dir, adapter_dir, QUANT, COMPUTE)
    return greedy(model, model_dir, prompt, TOKENS)[0]


def _alone(base: ResidentBase, adapter: str | None, prompt: str) -> list[int]:
    row = Row(list(base.tokenizer(prompt)["input_ids"]), adapter, TOKENS, threading.Event())
    decode_batch(base.lane(adapter), base.tokenizer, [row], "cpu")
    return row.generated


def test_adapters_attached_after_the_base_ran_answer_as_plain_peft(
    tiny: dict[str, str], kinds: dict[str, str]
) -> None:
    """bitsandbytes' fused CPU kernel repacks 4-bit layers on their first forward pass; peft
    attaching later would scramble their scales (bnb_state.py). Here the base answers first, then
    every type is attached, and each answer (and the bare base's, again) equals the plain
    recipe's token for token, since one row alone has no batch to differ from."""
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), FOUR_BIT)
    prompt = MIXED_PROMPTS[1]
    assert _alone(base, None, prompt) == _plain(tiny["model"], None, prompt)
    if fused_cpu_kernel():
        assert packed_weights(base.model), "the fused kernel packed the layers: the case tested"
    for kind in KINDS_4BIT:
        name, _ = models.adapter(base, check_adapter_folder(kinds[kind], allow_pickle=False))
        got = _alone(base, peft_name(name), prompt)
        assert got == _plain(tiny["model"], kinds[kind], prompt), kind
    assert _alone(base, None, prompt) == _plain(tiny["model"], None, prompt)


@pytest_asyncio.fixture
async def four_bit_stub(tiny: dict[str, str]) -> AsyncIterator[Stub]:
    """A fresh sidecar whose default is the tiny base in 4 bit, nothing attached yet."""
    config = tiny_config(tiny)
    quantization = QuantizationDefault(mode="4bit", compute_dtype=COMPUTE, quant_type=QUANT)
    config = replace(
        config,
        defaults=replace(config.defaults, quantization=quantization),
        limits=replace(config.limits, batch_wait_ms=50, max_batch_size=32),
        preload=False,
    )
    async with serving(config) as stub:
        yield stub


@pytest.mark.parametrize("order", ["forward", "reversed"])
async def test_48_interleaved_4bit_requests_of_mixed_types_answer_as_plain_alone(
    four_bit_stub: Stub, tiny: dict[str, str], kinds: dict[str, str], order: str
) -> None:
    """6 kinds (5 adapter types and the bare base) x 8 prompts at once, in both orders, each
    answer equal to plain peft's alone token for token. With float32 compute a batch moves the
    tiny base's 4-bit logits by nothing (test_four_bit.py measures the other compute dtypes,
    where a batch may take the other token at a near tie)."""
    prompts = [*MIXED_PROMPTS, "Instruction:", "The quick brown fox jumps"]
    cases = [(k, p) for p, k in itertools.product(prompts, (BARE, *KINDS_4BIT))]
    if order == "reversed":
        cases.reverse()
    assert len(cases) == 48
    responses = await asyncio.gather(
        *(
            four_bit_stub.TakeExam(
                kind_request(k, p, kinds, TOKENS, quantization=QUANTIZATION), timeout=300
            )
            for k, p in cases
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    for (kind, prompt), response in zip(cases, responses, strict=True):
        assert response.model.quantization.load_in_4bit
        ids = _plain(tiny["model"], None if kind == BARE else kinds[kind], prompt)
        assert response.answer == tokenizer.decode(ids, skip_special_tokens=True), (kind, prompt)
    assert max(r.batch_size for r in responses) > 1, "the requests should have shared batches"


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_are_refused_on_a_4bit_base_by_name(
    tiny: dict[str, str], kinds: dict[str, str], kind: str
) -> None:
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), FOUR_BIT)
    with pytest.raises(GolemError) as info:
        models.adapter(base, check_adapter_folder(kinds[kind], allow_pickle=False))
    assert info.value.reason == "ADAPTER_TYPE_UNSUPPORTED"
    assert kind.upper() in str(info.value) and "load_in_4bit=false" in str(info.value)
    assert not base.wrappers, "refused before peft touched anything"
