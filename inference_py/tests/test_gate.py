"""The gate that every ExamService call passes: walked over the service's own descriptor, so a
method added later without it fails here. Also what the gate bounds: a degenerate row fails
alone, a caller's adapter name keeps its weights, unloadable model names leave no state behind,
resident bases are capped, and a resident model keeps answering when its folder moves."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message

from golem_sidecar.config import Limits, Security
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.server import Sidecar
from golem_sidecar.wire import EXAM_SERVICE, REQUEST_ID_KEY
from tests.bad_exams import build_bad_exams
from tests.conftest import CAP, tiny_config
from tests.rpc import failure

Stub = exam_pb2_grpc.ExamServiceStub
# Request fields that name a model, an adapter or an exam's file: each must be confined on every
# method, by field name to the key of its good path in the walk's fixtures.
PATH_FIELDS = {
    "model_name": "model",
    "adapter_path": "adapter",
    "adapters": "adapter",
    "exam_path": "exam",
    "header_path": "header",
    "resume_path": "results",
}
# A missing resume file means nothing to resume: only confinement applies to it.
MAY_BE_MISSING = ("resume_path",)


def _request(method_name: str, paths: dict[str, str], **hostile: object) -> Message:
    """A request for any method, valid except for ``hostile``: filled by field name, so a
    method added later gets a request without editing this test."""
    method = EXAM_SERVICE.methods_by_name[method_name]
    cls = getattr(exam_pb2, method.input_type.name)
    fill: dict[str, object] = {
        "prompt": "Instruction: Which genre is dune?\nResponse:",
        "prompts": ["Instruction: Which genre is dune?\nResponse:"],
        "name": "walker",
        "adapter_path": paths["adapter"],
        "adapters": [paths["adapter"]],
        "max_new_tokens": 2,
        "exam_path": paths["exam"],
        "header_path": paths["header"],
        "resume_path": paths["results"],
        "include_base": True,
    }
    fields = {f.name for f in method.input_type.fields}
    values = {k: v for k, v in {**fill, **hostile}.items() if k in fields}
    message: Message = cls(**values)
    return message


async def _call(channel: grpc.aio.Channel, method_name: str, request: Message) -> None:
    method = EXAM_SERVICE.methods_by_name[method_name]
    path = f"/{EXAM_SERVICE.full_name}/{method_name}"
    serialize = type(request).SerializeToString
    metadata = ((REQUEST_ID_KEY, f"walk-{method_name}"),)
    if method.server_streaming:
        stream = channel.unary_stream(path, request_serializer=serialize)
        async for _ in stream(request, timeout=60, metadata=metadata):
            pass
    else:
        await channel.unary_unary(path, request_serializer=serialize)(
            request, timeout=60, metadata=metadata
        )


def _walk_exam(root: Path) -> dict[str, str]:
    """The good exam of bad_exams.py, its header and a results file not written yet, by the
    keys _request fills GradeExam from; ``outside_exam`` lies beyond their folder."""
    exams = build_bad_exams(root / "exams")
    return {
        "exam": exams["good_exam"],
        "header": exams["good_header"],
        "results": exams["new_results"],
        "outside_exam": exams["outside_exam"],
    }


@pytest_asyncio.fixture(scope="module")
async def confined(tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A sidecar whose roots hold copies of the tiny model and adapter, and the walk's exam
    files (_walk_exam); the originals and ``outside_exam`` are outside them."""
    root = tmp_path_factory.mktemp("walk")
    inside = {
        "model": str(shutil.copytree(tiny["model"], root / "models" / "model")),
        "adapter": str(shutil.copytree(tiny["adapter"], root / "adapters" / "adapter")),
        **_walk_exam(root),
    }
    config = replace(
        tiny_config(tiny),
        security=Security(
            adapter_roots=((root / "adapters").resolve(),),
            model_roots=((root / "models").resolve(),),
            exam_roots=(Path(inside["exam"]).parent.resolve(),),
        ),
    )
    config = replace(
        config,
        defaults=replace(
            config.defaults, model_name=inside["model"], adapter_path=inside["adapter"]
        ),
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield channel, inside, sidecar
    await sidecar.stop(0)


@pytest.mark.parametrize("method", list(EXAM_SERVICE.methods_by_name))
async def test_every_method_passes_the_gate(
    method: str,
    confined: tuple[grpc.aio.Channel, dict[str, str], Sidecar],
    tiny: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel, inside, _ = confined
    with caplog.at_level(logging.INFO, logger="golem_sidecar.interceptors"):
        try:
            await _call(channel, method, _request(method, inside))
        except grpc.aio.AioRpcError as err:
            # Some methods refuse a walker's request (UnloadAdapter of a name never loaded);
            # what matters is that the refusal came through the gate.
            assert failure(err).reason is not None, err.details()
    finished = [r for r in caplog.records if r.getMessage() == "call finished"]
    assert any(getattr(r, "method", None) == method for r in finished), "no interceptor line"
    fields = {f.name for f in EXAM_SERVICE.methods_by_name[method].input_type.fields}
    outsides = {"model": tiny["model"], "adapter": tiny["adapter_b"]}
    for field in sorted(fields & set(PATH_FIELDS)):
        key = PATH_FIELDS[field]
        outside = outsides.get(key, inside["outside_exam"])
        hostile = {field: [outside] if field == "adapters" else outside}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(channel, method, _request(method, inside, **hostile))
        got = failure(info.value)
        assert (got.code, got.reason, got.fields) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "PATH_OUTSIDE_ROOTS",
            (field,),
        ), f"{field}: {got.message}"
        nothing = inside[key] + "/../nothing"
        missing = {field: [nothing] if field == "adapters" else nothing}
        if field in MAY_BE_MISSING:
            await _call(channel, method, _request(method, inside, **missing))
            continue
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(channel, method, _request(method, inside, **missing))
        got = failure(info.value)
        assert (got.code, got.fields) == (grpc.StatusCode.NOT_FOUND, (field,)), got.message


async def test_every_method_is_refused_once_shutdown_begins(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    paths = {**tiny, **_walk_exam(tmp_path)}
    sidecar = Sidecar(tiny_config(tiny))
    await sidecar.start()
    try:
        await sidecar.gate.close(0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            for method in EXAM_SERVICE.methods_by_name:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _call(channel, method, _request(method, paths))
                got = failure(info.value)
                assert (got.code, got.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    finally:
        await sidecar.stop(0)


@pytest_asyncio.fixture
async def batching_stub(tiny: dict[str, str]) -> AsyncIterator[Stub]:
    """A sidecar whose batches wait long enough that concurrent requests share one."""
    sidecar = Sidecar(
        replace(tiny_config(tiny), limits=Limits(max_new_tokens_cap=CAP, batch_wait_ms=300))
    )
    await sidecar.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield Stub(channel)
    await sidecar.stop(0)


async def test_a_degenerate_row_fails_alone(batching_stub: Stub) -> None:
    """A repetition penalty that validation accepts but that overflows the scores fails its own
    request; a temperature below the floor is greedy; the rest of the batch answers as alone."""
    prompt = "Instruction: Which genre is dune?\nResponse:"
    alone = await batching_stub.TakeExam(exam_pb2.TakeExamRequest(prompt=prompt))
    good = [exam_pb2.TakeExamRequest(prompt=prompt) for _ in range(3)]
    tiny_temperature = exam_pb2.TakeExamRequest(prompt=prompt, temperature=1e-45)
    degenerate = exam_pb2.TakeExamRequest(prompt=prompt, repetition_penalty=1e-45)
    outcomes = await asyncio.gather(
        *(batching_stub.TakeExam(r) for r in [*good, tiny_temperature, degenerate]),
        return_exceptions=True,
    )
    *answers, failed = outcomes
    assert isinstance(failed, grpc.aio.AioRpcError)
    got = failure(failed)
    assert (got.code, got.reason, got.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "SAMPLING_DEGENERATE",
        ("repetition_penalty",),
    )
    for answer in answers:
        assert isinstance(answer, exam_pb2.TakeExamResponse), answer
        assert answer.answer == alone.answer
    assert max(a.batch_size for a in answers if isinstance(a, exam_pb2.TakeExamResponse)) == 5


async def test_a_callers_adapter_name_keeps_its_weights(
    stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    """Adapters used by path get names no caller can choose, so a caller's name is never
    re-pointed at other weights, however many adapters other callers use by path."""
    mine = str(shutil.copytree(tiny["adapter"], tmp_path / "mine"))
    prompt = "Instruction: Which genre is the hobbit?\nResponse:"
    expected = await stub.TakeExam(exam_pb2.TakeExamRequest(prompt=prompt, adapter_path=mine))
    await stub.LoadAdapter(exam_pb2.LoadAdapterRequest(name="adapter-0", adapter_path=mine))
    others = [str(shutil.copytree(tiny["adapter_b"], tmp_path / f"other_{i}")) for i in range(3)]
    for path in others:
        await stub.TakeExam(exam_pb2.TakeExamRequest(prompt=prompt, adapter_path=path))
    listed = await stub.ListAdapters(exam_pb2.ListAdaptersRequest())
    made_up = [a.name for a in listed.adapters if a.adapter.path in others]
    assert made_up and all(n.startswith("~") for n in made_up), made_up
    by_name = await stub.TakeExam(exam_pb2.TakeExamRequest(prompt=prompt, adapter_name="adapter-0"))
    assert by_name.answer == expected.answer and by_name.adapter.path == mine
    # A made-up name can be unloaded, never chosen.
    await stub.UnloadAdapter(exam_pb2.UnloadAdapterRequest(name=made_up[0]))
    await stub.UnloadAdapter(exam_pb2.UnloadAdapterRequest(name="adapter-0"))


async def test_unloadable_model_names_leave_no_state(sidecar: Sidecar, stub: Stub) -> None:
    engine = sidecar.engine.by_kind("transformers")
    queues = dict(engine._queues)
    for i in range(20):
        for name in (f"./missing/model-{i}", f"golem-test/missing-{i}"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.TakeExam(exam_pb2.TakeExamRequest(model_name=name, disable_adapter=True))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert engine._queues == queues
    assert [b.model_name for b in engine._models.resident()] == [sidecar.config.defaults.model_name]


async def test_resident_bases_are_capped(tiny: dict[str, str], tmp_path: Path) -> None:
    """limits.maxModels: the least recently used base goes, and comes back on its next use."""
    second = str(shutil.copytree(tiny["model"], tmp_path / "second"))
    config = replace(tiny_config(tiny), limits=Limits(max_new_tokens_cap=CAP, max_models=1))
    sidecar = Sidecar(config)
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = Stub(channel)
            first = await stub.TakeExam(exam_pb2.TakeExamRequest(disable_adapter=True))
            other = await stub.TakeExam(
                exam_pb2.TakeExamRequest(model_name=second, disable_adapter=True)
            )
            assert other.answer == first.answer and other.timings.load_ns > 0
            assert [
                b.model_name for b in sidecar.engine.by_kind("transformers")._models.resident()
            ] == [second]
            again = await stub.TakeExam(exam_pb2.TakeExamRequest(disable_adapter=True))
            assert again.answer == first.answer and again.timings.load_ns > 0
            assert len(sidecar.engine.by_kind("transformers")._models.resident()) == 1
            assert len(sidecar.engine.by_kind("transformers")._queues) == 1, (
                "the evicted base's idle queue is gone"
            )
    finally:
        await sidecar.stop(0)


async def test_a_resident_model_answers_after_its_folder_moves(
    stub: Stub, tiny: dict[str, str], tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny["model"], tmp_path / "movable"))
    request = exam_pb2.TakeExamRequest(model_name=str(folder), disable_adapter=True)
    before = await stub.TakeExam(request)
    folder.rename(tmp_path / "moved")
    after = await stub.TakeExam(request)
    assert after.answer == before.answer and after.timings.load_ns == 0


async def test_seed_takes_the_whole_uint64_range(stub: Stub) -> None:
    for seed in (2**53 + 1, 2**63, 2**64 - 1):
        request = exam_pb2.TakeExamRequest(temperature=0.9, seed=seed, max_new_tokens=4)
        first, second = await stub.TakeExam(request), await stub.TakeExam(request)
        assert first.answer == second.answer


async def test_comparison_rows_count_against_the_queue(tiny: dict[str, str]) -> None:
    """A comparison holds one place of the bounded queue per row it decodes."""
    limits = Limits(max_new_tokens_cap=CAP, max_queue=3)
    sidecar = Sidecar(replace(tiny_config(tiny), limits=limits))
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = Stub(channel)
            fits = exam_pb2.CompareAdaptersRequest(prompts=["a"], adapters=[tiny["adapter"]])
            assert len((await stub.CompareAdapters(fits)).comparisons) == 1
            too_many = exam_pb2.CompareAdaptersRequest(
                prompts=["a", "b"], adapters=[tiny["adapter"]]
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CompareAdapters(too_many)
            got = failure(info.value)
            assert (got.code, got.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
    finally:
        await sidecar.stop(0)
