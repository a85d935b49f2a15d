"""Any mix of PEFT types on one base: LoRA (plain, DoRA, rsLoRA), IA3, LoHa, LoKr and AdaLoRA
adapters serve side by side, interleaved and concurrently, each answering exactly as plain
peft does with that adapter alone, whatever was loaded first. Prompt-learning types are
refused by name before anything loads."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from golem_sidecar.adapters import check_adapter_folder
from golem_sidecar.config import Security
from golem_sidecar.errors import GolemError
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.loading import memory_footprint_bytes
from golem_sidecar.models import ResidentModels
from golem_sidecar.placement import Placement
from tests.conftest import serving, tiny_config
from tests.peft_kinds import SERVED_KINDS, build_prompt_learning
from tests.rpc import failure
from tests.test_generation import PROMPTS, _plain_answer
from tests.tiny_models import local_model

CPU = Placement(device="cpu", dtype="float32", load_in_4bit=False)
NEW_TOKENS = 8
# Six prompts of different lengths, so the batches are padded.
MIXED_PROMPTS = [*PROMPTS, "Books", "Instruction: Which genre is Dracula?\nResponse:", "fox"]
BARE = "bare"
PEFT_TYPE = {
    "lora": "LORA",
    "dora": "LORA",
    "rslora": "LORA",
    "ia3": "IA3",
    "loha": "LOHA",
    "lokr": "LOKR",
    "adalora": "ADALORA",
}


@pytest.fixture(scope="session")
def expected(tiny: dict[str, str], kinds: dict[str, str]) -> dict[tuple[str, str], list[int]]:
    """Plain peft's greedy answer for every (kind, prompt): each adapter alone on a fresh base."""
    answers = {}
    for kind in (BARE, *SERVED_KINDS):
        adapter = None if kind == BARE else kinds[kind]
        for prompt in MIXED_PROMPTS:
            answers[kind, prompt] = _plain_answer(tiny["model"], adapter, prompt, NEW_TOKENS)
    return answers


def test_every_kind_changes_the_answers(expected: dict[tuple[str, str], list[int]]) -> None:
    """Otherwise a test that mixed the adapters up could not notice."""
    for kind in SERVED_KINDS:
        changed = [p for p in MIXED_PROMPTS if expected[kind, p] != expected[BARE, p]]
        assert changed, f"the {kind} adapter answers like the bare base"
    distinct = {tuple(expected[kind, MIXED_PROMPTS[0]]) for kind in SERVED_KINDS}
    assert len(distinct) >= len(SERVED_KINDS) - 1, "the adapters should mostly answer apart"


@pytest_asyncio.fixture
async def fresh_stub(tiny: dict[str, str]) -> AsyncIterator[exam_pb2_grpc.ExamServiceStub]:
    """A sidecar of its own, with no adapter loaded yet, so load order is the test's."""
    config = tiny_config(tiny)
    limits = replace(config.limits, batch_wait_ms=50, max_batch_size=32)
    async with serving(replace(config, limits=limits)) as stub:
        yield stub


def kind_request(
    kind: str,
    prompt: str,
    kinds: dict[str, str],
    max_new_tokens: int = NEW_TOKENS,
    **fields: object,
) -> exam_pb2.TakeExamRequest:
    """A TakeExam wearing the adapter of that kind (BARE: none), with any other fields."""
    request = exam_pb2.TakeExamRequest(prompt=prompt, max_new_tokens=max_new_tokens, **fields)
    if kind == BARE:
        request.disable_adapter = True
    else:
        request.adapter_path = kinds[kind]
    return request


@pytest.mark.parametrize("order", ["forward", "reversed"])
async def test_48_interleaved_requests_of_mixed_types_each_equal_plain_peft(
    fresh_stub: exam_pb2_grpc.ExamServiceStub,
    tiny: dict[str, str],
    kinds: dict[str, str],
    expected: dict[tuple[str, str], list[int]],
    order: str,
) -> None:
    """8 kinds (7 adapter types and the bare base) x 6 prompts, interleaved kind by kind and
    sent at once; in reverse the first type to load is another one."""
    all_kinds = [BARE, *SERVED_KINDS]
    cases = [(k, p) for p, k in itertools.product(MIXED_PROMPTS, all_kinds)]
    if order == "reversed":
        cases.reverse()
    assert len(cases) == 48
    responses = await asyncio.gather(
        *(fresh_stub.TakeExam(kind_request(k, p, kinds), timeout=300) for k, p in cases)
    )
    tokenizer_decode = _decoder(tiny["model"])
    for (kind, prompt), response in zip(cases, responses, strict=True):
        want = tokenizer_decode(expected[kind, prompt])
        assert response.answer == want, (kind, prompt)
        if kind != BARE:
            assert response.adapter.peft_type == PEFT_TYPE[kind]
    assert max(r.batch_size for r in responses) > 1, "the requests should have shared batches"


def _decoder(model_dir: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))


async def test_a_comparison_mixing_types_answers_and_scores_as_each_alone(
    fresh_stub: exam_pb2_grpc.ExamServiceStub,
    tiny: dict[str, str],
    kinds: dict[str, str],
    expected: dict[tuple[str, str], list[int]],
) -> None:
    """CompareAdapters decodes and scores lane by lane; each model's answers and scores equal
    those of a comparison of that adapter alone."""
    chosen = ["ia3", "lora", "loha", "dora"]
    prompts = MIXED_PROMPTS[:2]
    mixed = await fresh_stub.CompareAdapters(
        exam_pb2.CompareAdaptersRequest(
            prompts=prompts, adapters=[kinds[k] for k in chosen], max_new_tokens=NEW_TOKENS
        ),
        timeout=300,
    )
    decode = _decoder(tiny["model"])
    for prompt, comparison in zip(prompts, mixed.comparisons, strict=True):
        for kind, answer in zip(chosen, comparison.answers[1:], strict=True):
            assert answer.answer == decode(expected[kind, prompt]), kind
    for kind in chosen:
        alone = await fresh_stub.CompareAdapters(
            exam_pb2.CompareAdaptersRequest(
                prompts=prompts, adapters=[kinds[kind]], max_new_tokens=NEW_TOKENS
            ),
            timeout=300,
        )
        index = chosen.index(kind) + 1
        for got, want in zip(mixed.comparisons, alone.comparisons, strict=True):
            assert got.answers[index].answer == want.answers[1].answer
            for label in (got.answers[0].model, kinds[kind]):
                assert got.answers[index].mean_logprob[label] == pytest.approx(
                    want.answers[1].mean_logprob[label], abs=1e-5
                )


@pytest.mark.parametrize("first", ["lora", "ia3"])
def test_either_type_may_load_first_and_wrappers_share_the_base_weights(
    tiny: dict[str, str], kinds: dict[str, str], first: str
) -> None:
    """No type blocks another; every wrapper's base weights are the base's own tensors."""
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), CPU)
    weights = {id(p) for p in base.model.parameters()}
    for kind in (first, *(k for k in SERVED_KINDS if k != first)):
        models.adapter(base, check_adapter_folder(kinds[kind], allow_pickle=False))
    assert set(base.wrappers) == {"LORA", "IA3", "LOHA", "LOKR", "ADALORA"}
    for wrapper in base.wrappers.values():
        shared = [p for p in wrapper.parameters() if id(p) in weights]
        assert len(shared) == len(weights), "each wrapper wears the base's weights, uncopied"
    bare = memory_footprint_bytes(base.model)
    assert bare < base.footprint_bytes() < 2 * bare, "adapters add their own tensors only"


def test_unloading_the_last_adapter_of_a_type_drops_its_wrapper(
    tiny: dict[str, str], kinds: dict[str, str]
) -> None:
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), CPU)
    for kind in ("lora", "rslora", "ia3"):
        models.adapter(base, check_adapter_folder(kinds[kind], allow_pickle=False), name=kind)
    models.unload(base, "ia3")
    assert set(base.wrappers) == {"LORA"}
    models.unload(base, "lora")
    assert set(base.wrappers) == {"LORA"}, "rslora still wears the LoRA wrapper"
    models.unload(base, "rslora")
    assert base.wrappers == {}


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
async def test_prompt_learning_is_refused_by_name_before_anything_loads(
    stub: exam_pb2_grpc.ExamServiceStub,
    tiny: dict[str, str],
    tmp_path: Path,
    kind: str,
) -> None:
    folder = build_prompt_learning(Path(tiny["model"]), tmp_path)[kind]
    before = await stub.ListAdapters(exam_pb2.ListAdaptersRequest(), timeout=60)
    for call in (
        stub.TakeExam(exam_pb2.TakeExamRequest(adapter_path=folder), timeout=60),
        stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="p", adapter_path=folder), timeout=60),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        got = failure(info.value)
        assert (got.code, got.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ADAPTER_TYPE_UNSUPPORTED",
        )
        peft_type = "PREFIX_TUNING" if kind == "prefix" else "PROMPT_TUNING"
        assert peft_type in got.message and "prompt-learning" in got.message
        assert got.fields == ("adapter_path",)
    after = await stub.ListAdapters(exam_pb2.ListAdaptersRequest(), timeout=60)
    assert list(after.adapters) == list(before.adapters)


def test_an_unserved_type_is_refused_by_the_folder_check(tmp_path: Path) -> None:
    folder = tmp_path / "oft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "OFT"}')
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(GolemError) as info:
        check_adapter_folder(str(folder), allow_pickle=False)
    assert info.value.reason == "ADAPTER_TYPE_UNSUPPORTED" and "OFT" in str(info.value)
