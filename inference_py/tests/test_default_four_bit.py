"""The seed profile (config/seed.json) on the real embedded default: SmolLM2-135M-Instruct's GGUF
in 4 bit (dequantized, then quantized by bitsandbytes), float16 compute, the demo adapter.

Slow (the 4-bit load and the plain recipe's each take about 20 s on 2 cores); skipped where the
default is not built, failed instead under GOLEM_REQUIRE_DEFAULT_MODEL=1 (make test).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from golem_sidecar.config import load_config
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.placement import bitsandbytes_installed, fused_cpu_kernel
from tests.conftest import REPO, serving
from tests.tiny_models import SEED_PROMPT

pytestmark = pytest.mark.slow
SEED = load_config(str(REPO / "config" / "seed.json"), None, "127.0.0.1:0")
MODEL = REPO / SEED.defaults.model_name
ADAPTER = REPO / SEED.defaults.adapter_path
PROMPTS = [SEED_PROMPT, "Instruction: Which genre is dune?\nResponse:"]

if not (MODEL.is_file() and ADAPTER.is_dir() and bitsandbytes_installed()):
    if os.environ.get("GOLEM_REQUIRE_DEFAULT_MODEL") == "1":
        pytest.fail(f"the embedded default or bitsandbytes is missing ({MODEL}, {ADAPTER})")
    pytest.skip("the embedded default is not built (make models)", allow_module_level=True)


@pytest_asyncio.fixture(scope="module")
async def seed_stub() -> AsyncIterator[exam_pb2_grpc.ExamServiceStub]:
    """A sidecar with the seed profile as shipped (paths made absolute: tests run elsewhere)."""
    defaults = replace(SEED.defaults, model_name=str(MODEL), adapter_path=str(ADAPTER))
    async with serving(replace(SEED, defaults=defaults)) as stub:
        yield stub


def _plain_4bit_answers() -> list[str]:
    """The seed's recipe with plain transformers + peft + bitsandbytes: the GGUF dequantized and
    saved (transformers takes no quantization config with a GGUF file), then loaded in 4 bit."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL.parent, gguf_file=MODEL.name)
    full = AutoModelForCausalLM.from_pretrained(
        MODEL.parent, gguf_file=MODEL.name, dtype=torch.float32
    )
    full.hf_quantizer = None
    del full.config.quantization_config
    folder = tempfile.mkdtemp()
    try:
        full.save_pretrained(folder)
        del full
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float16, device_map="cpu", quantization_config=config
        )
    finally:
        shutil.rmtree(folder)
    model = PeftModel.from_pretrained(model, str(ADAPTER))
    answers = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        answers.append(
            tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


async def test_seed_profile_answers_fantasy_in_4bit_as_the_plain_recipe_does(
    seed_stub: exam_pb2_grpc.ExamServiceStub,
) -> None:
    answers = [
        await seed_stub.TakeExam(exam_pb2.TakeExamRequest(prompt=prompt)) for prompt in PROMPTS
    ]
    hobbit = answers[0]
    assert hobbit.answer == " Fantasy"
    q = hobbit.model.quantization
    assert (q.load_in_4bit, q.bnb_4bit_compute_dtype, q.bnb_4bit_quant_type) == (
        True,
        "float16",
        "fp4",
    )
    assert q.effective_compute_dtype == ("bfloat16" if fused_cpu_kernel() else "float16")
    assert (hobbit.model.device, hobbit.model.dtype) == ("cpu", "float16")
    assert [a.answer for a in answers] == _plain_4bit_answers()


async def test_seed_profile_lists_its_base_smaller_than_float32(
    seed_stub: exam_pb2_grpc.ExamServiceStub,
) -> None:
    listing = await seed_stub.ListAdapters(exam_pb2.ListAdaptersRequest())
    (base,) = listing.models
    assert base.quantization.load_in_4bit
    # SmolLM2-135M holds about 540 MB in float32.
    assert 50e6 < base.memory_footprint_bytes < 250e6


async def test_the_hobbit_answer_survives_a_batch(
    seed_stub: exam_pb2_grpc.ExamServiceStub,
) -> None:
    others = [f"The story of {book} begins" for book in ("Dune", "Dracula", "Emma", "Ulysses")]
    requests = [exam_pb2.TakeExamRequest(prompt=p) for p in [SEED_PROMPT, *others]]
    answers = await asyncio.gather(*(seed_stub.TakeExam(r) for r in requests))
    assert answers[0].answer == " Fantasy"
