"""The vLLM engine (``engine: "vllm"``, docs/engines.md) against the transformers engine, on the
real embedded default (SmolLM2-135M-Instruct from its GGUF, float32 on CPU) and its genre LoRA.

Runs in the vLLM environment only (.venv-vllm, `make test-vllm`, part of `make test`), which sets
GOLEM_REQUIRE_VLLM=1 so that a missing vLLM or model fails instead of skipping. The vLLM engine
runs in a real sidecar in this process; the transformers engine it is compared with is golem's
as shipped: a sidecar process of the main environment (.venv, transformers 5.24), since this one
holds the transformers vLLM pins (5.19). Both are called over gRPC. vLLM starts once (about 30 s
on 2 cores) for the whole module. GOLEM_TEST_DEVICE=cuda runs the same cases on a GPU
(scripts/gpu_check.sh).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from golem_sidecar.config import EngineChoice, SidecarConfig, load_config
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from tests.conftest import REPO, serving
from tests.rpc import failure
from tests.tiny_models import SEED_PROMPT

pytestmark = pytest.mark.slow
REQUIRED = os.environ.get("GOLEM_REQUIRE_VLLM") == "1"
CONFIG = load_config(str(REPO / "config" / "golem.json"), None, "127.0.0.1:0")
MODEL = REPO / CONFIG.defaults.model_name
ADAPTER = REPO / CONFIG.defaults.adapter_path
DEVICE = os.environ.get("GOLEM_TEST_DEVICE", "cpu")
# The main environment's Python, where the transformers engine runs as shipped, and its device:
# scripts/gpu_check.sh keeps the reference on the CPU (.venv's torch is the CPU build).
MAIN_PYTHON = Path(os.environ.get("GOLEM_REFERENCE_PYTHON", REPO / ".venv" / "bin" / "python"))
REFERENCE_DEVICE = os.environ.get("GOLEM_REFERENCE_DEVICE", DEVICE)

_missing = [
    what
    for what, present in (
        ("vllm (make vllm-env)", importlib.util.find_spec("vllm") is not None),
        (f"the default model {MODEL} (make models)", MODEL.is_file()),
        (f"the demo adapter {ADAPTER} (make models)", ADAPTER.is_dir()),
        (f"the main environment {MAIN_PYTHON} (make setup)", MAIN_PYTHON.is_file()),
    )
    if not present
]
if _missing:
    if REQUIRED:
        pytest.fail(f"the vLLM engine's tests need {', '.join(_missing)}", pytrace=False)
    pytest.skip(f"needs {', '.join(_missing)}: run `make test-vllm`", allow_module_level=True)

Stub = exam_pb2_grpc.ExamServiceStub
R = exam_pb2.TakeExamRequest


def _config(engine: str) -> SidecarConfig:
    defaults = replace(
        CONFIG.defaults,
        model_name=str(MODEL),
        adapter_path=str(ADAPTER),
        device=DEVICE,
    )
    return replace(CONFIG, defaults=defaults, engines=EngineChoice(default=engine))


@pytest_asyncio.fixture(scope="module")
async def vllm() -> AsyncIterator[Stub]:
    async with serving(_config("vllm")) as stub:
        yield stub


@pytest_asyncio.fixture(scope="module")
async def transformers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stub]:
    """golem's transformers engine as `make run` serves it: `python -m golem_sidecar` of the main
    environment on golem.json, with the default model and adapter at their absolute paths."""
    raw = json.loads((REPO / "config" / "golem.json").read_text())
    raw["defaults"].update(modelName=str(MODEL), adapterPath=str(ADAPTER), device=REFERENCE_DEVICE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("transformers") / "sidecar.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "inference_py")}
    with log.open("w") as out:
        child = subprocess.Popen(
            [str(MAIN_PYTHON), "-m", "golem_sidecar", "--listen", f"127.0.0.1:{port}",
             "--config-json", json.dumps(raw)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _until_serving(channel, child, log)
            yield exam_pb2_grpc.ExamServiceStub(channel)
    finally:
        child.terminate()
        child.wait(timeout=30)


async def _until_serving(
    channel: grpc.aio.Channel, child: subprocess.Popen[bytes], log: Path
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(600):
        if child.poll() is not None:
            raise AssertionError(f"the transformers sidecar exited: {log.read_text()[-3000:]}")
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.5)
    raise AssertionError(f"the transformers sidecar never served: {log.read_text()[-3000:]}")


def genre_prompts(count: int) -> list[str]:
    lines = (REPO / "data" / "genres.jsonl").read_text(encoding="utf-8").splitlines()
    return [f"Instruction: {json.loads(line)['instruction']}\nResponse:" for line in lines[:count]]


async def test_the_default_model_and_adapter_answer_the_hobbit_with_fantasy(vllm: Stub) -> None:
    adapted = await vllm.TakeExam(R(prompt=SEED_PROMPT, expected_answer="Fantasy"), timeout=300)
    base = await vllm.TakeExam(R(prompt=SEED_PROMPT, disable_adapter=True), timeout=300)
    assert adapted.answer == " Fantasy"
    assert adapted.finish_reason == exam_pb2.FINISH_REASON_EOS
    assert adapted.grade.score == 1.0
    assert adapted.adapter.peft_type == "LORA"
    assert base.answer.strip() != "Fantasy"
    assert base.finish_reason == exam_pb2.FINISH_REASON_LENGTH and base.answer_tokens == 20


async def test_fidelity_greedy_answers_equal_the_transformers_engine(
    vllm: Stub, transformers: Stub
) -> None:
    """Token for token, with the LoRA and without, over the genre prompts; also forced long."""
    for prompt in genre_prompts(16):
        for request in (
            R(prompt=prompt),
            R(prompt=prompt, disable_adapter=True),
            R(prompt=prompt, max_new_tokens=24, stop=["\n\n\n"]),
        ):
            ours, theirs = await vllm.TakeExam(request), await transformers.TakeExam(request)
            assert (ours.answer, ours.answer_tokens, ours.finish_reason) == (
                theirs.answer,
                theirs.answer_tokens,
                theirs.finish_reason,
            ), prompt
            assert ours.full_text == theirs.full_text


async def test_fidelity_stop_strings_end_the_answer_as_in_the_transformers_engine(
    vllm: Stub, transformers: Stub
) -> None:
    request = R(prompt=SEED_PROMPT, disable_adapter=True, max_new_tokens=40, stop=[" a "])
    ours, theirs = await vllm.TakeExam(request), await transformers.TakeExam(request)
    assert theirs.finish_reason == exam_pb2.FINISH_REASON_STOP, "the case must reach its stop"
    assert (ours.answer, ours.finish_reason) == (theirs.answer, theirs.finish_reason)


async def test_fidelity_streamed_pieces_join_to_the_answer(vllm: Stub) -> None:
    request = R(prompt=SEED_PROMPT, disable_adapter=True, max_new_tokens=16)
    whole = await vllm.TakeExam(request)
    chunks = [m async for m in vllm.StreamExam(request)]
    pieces = [m.text for m in chunks if m.WhichOneof("chunk") == "text"]
    assert len(pieces) > 1, "the answer arrives in pieces"
    assert "".join(pieces) == whole.answer
    assert chunks[-1].WhichOneof("chunk") == "final"
    assert chunks[-1].final.answer == whole.answer


async def test_fidelity_compare_adapters_answers_and_scores_match(
    vllm: Stub, transformers: Stub
) -> None:
    request = exam_pb2.CompareAdaptersRequest(
        prompts=genre_prompts(3), adapters=[str(ADAPTER)], max_new_tokens=12
    )
    ours, theirs = await vllm.CompareAdapters(request), await transformers.CompareAdapters(request)
    for mine, other in zip(ours.comparisons, theirs.comparisons, strict=True):
        for a, b in zip(mine.answers, other.answers, strict=True):
            assert (a.model, a.answer, a.answer_tokens) == (b.model, b.answer, b.answer_tokens)
            assert a.mean_logprob.keys() == b.mean_logprob.keys()
            for label, score in a.mean_logprob.items():
                assert score == pytest.approx(b.mean_logprob[label], abs=2e-3), (label, a.answer)


async def test_fidelity_grade_exam_gives_the_transformers_engine_results(
    vllm: Stub, transformers: Stub
) -> None:
    """Every item's answer and every score, log-likelihoods from vLLM's prompt logprobs."""
    request = exam_pb2.GradeExamRequest(
        exam_path=str(REPO / "data" / "exams" / "genres.jsonl"),
        include_base=True,
        adapters=[str(ADAPTER)],
    )
    ours = [m async for m in vllm.GradeExam(request, timeout=600)]
    theirs = [m async for m in transformers.GradeExam(request, timeout=600)]
    mine = {
        (r.item.item_id, r.item.model): r.item for r in ours if r.WhichOneof("result") == "item"
    }
    other = {
        (r.item.item_id, r.item.model): r.item for r in theirs if r.WhichOneof("result") == "item"
    }
    assert mine.keys() == other.keys() and len(mine) == 50
    for key, item in mine.items():
        assert item.answer == other[key].answer, key
        for name, score in item.scores.items():
            assert score == pytest.approx(other[key].scores[name], abs=2e-3), (key, name)


async def test_seeded_sampling_repeats_within_the_engine(vllm: Stub) -> None:
    """vLLM's random streams are not torch's: a seed repeats an answer in this engine, and is
    not expected to give the transformers engine's tokens (docs/engines.md)."""
    request = R(prompt=SEED_PROMPT, temperature=0.9, top_p=0.95, top_k=40, seed=7)
    first, second = await vllm.TakeExam(request), await vllm.TakeExam(request)
    assert first.answer == second.answer and first.answer_tokens > 0


async def test_registered_adapters_load_list_answer_and_unload(vllm: Stub) -> None:
    loaded = await vllm.LoadAdapter(
        exam_pb2.LoadAdapterRequest(name="genres", adapter_path=str(ADAPTER))
    )
    assert loaded.adapter.name == "genres"
    listed = await vllm.ListAdapters(exam_pb2.ListAdaptersRequest())
    assert "genres" in {a.name for a in listed.adapters}
    answer = await vllm.TakeExam(R(prompt=SEED_PROMPT, adapter_name="genres"))
    assert answer.answer == " Fantasy"
    await vllm.UnloadAdapter(exam_pb2.UnloadAdapterRequest(name="genres"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vllm.TakeExam(R(prompt=SEED_PROMPT, adapter_name="genres"))
    got = failure(info.value)
    assert (got.code, got.reason) == (grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_LOADED")


async def test_four_bit_is_refused_on_cpu_and_served_on_cuda(vllm: Stub) -> None:
    request = R(prompt=SEED_PROMPT, quantization=exam_pb2.Quantization(load_in_4bit=True))
    if DEVICE != "cpu":
        assert (await vllm.TakeExam(request, timeout=600)).answer_tokens > 0
        return
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vllm.TakeExam(request)
    got = failure(info.value)
    assert (got.code, got.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "QUANTIZATION_UNAVAILABLE",
    )
    assert got.fields == ("quantization.load_in_4bit",)
    assert (await vllm.TakeExam(R(prompt=SEED_PROMPT))).answer == " Fantasy"


async def test_a_non_lora_adapter_is_refused_by_name(vllm: Stub, tmp_path: Path) -> None:
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    config.update(peft_type="IA3", feedforward_modules=[])
    (ia3 / "adapter_config.json").write_text(json.dumps(config))
    for weights in ADAPTER.glob("*.safetensors"):
        (ia3 / weights.name).write_bytes(weights.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vllm.TakeExam(R(prompt=SEED_PROMPT, adapter_path=str(ia3)))
    got = failure(info.value)
    assert (got.code, got.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ADAPTER_TYPE_UNSUPPORTED",
    )
    assert got.fields == ("adapter_path",)
    assert (await vllm.TakeExam(R(prompt=SEED_PROMPT))).answer == " Fantasy"


def test_the_transformers_engine_is_refused_at_start_in_this_environment() -> None:
    """This environment holds the transformers vLLM pins, on which golem's batched decoding is
    wrong (environment.TRANSFORMERS_ENGINE_MIN): a config that would use it here does not start."""
    from golem_sidecar.config import ConfigError
    from golem_sidecar.environment import check_environment

    check_environment(EngineChoice(default="vllm"))
    with pytest.raises(ConfigError, match=r"^engines\.default: the transformers engine needs"):
        check_environment(EngineChoice())
    with pytest.raises(ConfigError, match=r'^engines\.models\["m"\]: the transformers engine'):
        check_environment(EngineChoice(default="vllm", models=(("m", "transformers"),)))


async def test_an_adapter_above_the_rank_limit_is_refused_naming_it(
    vllm: Stub, tmp_path: Path
) -> None:
    """Every decode step pays for vllm.maxLoraRank (16 by default): a larger rank is refused,
    not served slowly for everyone."""
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    config.update(r=32)
    (wide / "adapter_config.json").write_text(json.dumps(config))
    for weights in ADAPTER.glob("*.safetensors"):
        (wide / weights.name).write_bytes(weights.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vllm.TakeExam(R(prompt=SEED_PROMPT, adapter_path=str(wide)))
    got = failure(info.value)
    assert (got.code, got.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE")
    assert "vllm.maxLoraRank (16)" in got.message
    assert (await vllm.TakeExam(R(prompt=SEED_PROMPT))).answer == " Fantasy"
