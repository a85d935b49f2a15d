"""Continuous batching: rows that join a running batch between steps, with prompts longer or
shorter than the rows already there, on other adapters or none, read in chunks or whole, answer
token for token as they do alone; a session answers each request the step it finishes."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from golem_sidecar import scheduler
from golem_sidecar.adapters import check_adapter_folder
from golem_sidecar.config import Limits, Security
from golem_sidecar.decoding import Row, eos_ids
from golem_sidecar.gen import exam_pb2
from golem_sidecar.lanes import group_by_lane
from golem_sidecar.models import ResidentBase, ResidentModels, peft_name
from golem_sidecar.placement import Placement
from golem_sidecar.prefill import Prefill, length_groups
from golem_sidecar.scheduler import Decoder, decode_batch
from tests.conftest import serving, tiny_config
from tests.test_generation import PROMPTS
from tests.tiny_models import SEED_PROMPT, local_model

CPU = Placement(device="cpu", dtype="float32", load_in_4bit=False)
LONG = "Books, genres, answers and questions. " * 12 + SEED_PROMPT


@pytest.fixture(scope="module")
def base(tiny: dict[str, str]) -> tuple[ResidentBase, list[str | None]]:
    """The tiny base with both tiny adapters attached; their peft names, and None (bare)."""
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), CPU)
    names: list[str | None] = []
    for key in ("adapter", "adapter_b"):
        name, _ = models.adapter(base, check_adapter_folder(tiny[key], allow_pickle=False))
        names.append(peft_name(name))
    return base, [*names, None]


def _row(base: ResidentBase, prompt: str, adapter: str | None, tokens: int) -> Row:
    return Row(list(base.tokenizer(prompt)["input_ids"]), adapter, tokens, threading.Event())


def _alone(base: ResidentBase, row: Row) -> list[int]:
    again = _row(base, "", row.adapter, row.max_new_tokens)
    again.prompt_ids = row.prompt_ids
    decode_batch(base.lane(row.adapter), base.tokenizer, [again], "cpu")
    return again.generated


def _admit(decoder: Decoder, base: ResidentBase, rows: list[Row]) -> None:
    for lane, members in group_by_lane(rows, lambda row: row.adapter, base.lane):
        decoder.admit(lane, members)


def _decoder(base: ResidentBase) -> Decoder:
    return Decoder(base.tokenizer, "cpu", eos_ids(base.model, base.tokenizer))


def _run(decoder: Decoder) -> None:
    while decoder.rows:
        decoder.step()


def test_rows_joining_a_running_batch_answer_as_they_do_alone(
    base: tuple[ResidentBase, list[str | None]],
) -> None:
    model, adapters = base
    first = [_row(model, p, adapters[i % 3], 12) for i, p in enumerate(PROMPTS)]
    # Wider and narrower than the running rows, on each adapter and on none.
    later = [
        _row(model, LONG, adapters[0], 10),
        _row(model, "Dune", adapters[1], 10),
        _row(model, "Books", None, 10),
        _row(model, LONG, adapters[2], 6),
    ]
    decoder = _decoder(model)
    _admit(decoder, model, first)
    for _ in range(3):
        decoder.step()
    assert all(len(row.generated) == 3 for row in first)
    _admit(decoder, model, later)
    _run(decoder)
    for row in [*first, *later]:
        assert row.generated == _alone(model, row), row.adapter


def test_a_long_newcomer_is_read_in_chunks_while_the_others_decode(
    base: tuple[ResidentBase, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler, "PREFILL_TOKENS_PER_STEP", 8)
    model, adapters = base
    newcomer = _row(model, LONG, adapters[1], 8)
    chunks = -(-len(newcomer.prompt_ids) // 8)
    running = [_row(model, p, adapters[0], chunks + 4) for p in PROMPTS[:2]]
    decoder = _decoder(model)
    _admit(decoder, model, running)
    decoder.step()
    _admit(decoder, model, [newcomer])
    for step in range(chunks):
        assert not newcomer.generated, "the prompt is still being read"
        before = len(running[0].generated)
        decoder.step()
        assert len(running[0].generated) == before + 1, f"the running rows went on at {step}"
    assert len(newcomer.generated) == 1, "its first token came the step its prompt was read"
    _run(decoder)
    for row in [*running, newcomer]:
        assert row.generated == _alone(model, row)


def test_a_batch_that_rows_keep_joining_and_leaving_holds_no_dead_columns(
    base: tuple[ResidentBase, list[str | None]],
) -> None:
    """Padding left by rows that finished is cut: a batch's cache is exactly as wide as its
    longest row, however long the batch has run."""
    model, adapters = base
    decoder = _decoder(model)
    rows = []
    for step in range(30):
        if step % 3 == 0:
            prompt = LONG if step % 9 == 0 else PROMPTS[step % len(PROMPTS)]
            rows.append(_row(model, prompt, adapters[step % 2], 4 + step % 5))
            _admit(decoder, model, rows[-1:])
        decoder.step()
        for batch in decoder.batches:
            longest = max(len(r.prompt_ids) + len(r.generated) for r in batch.rows)
            assert batch.mask.shape[1] == longest
    _run(decoder)
    for row in rows:
        assert row.generated == _alone(model, row)


async def test_requests_arriving_during_a_long_answer_join_it_and_finish_first(
    tiny: dict[str, str],
) -> None:
    """Through a real sidecar: short requests sent while a long answer streams are answered
    while it still runs (they joined its session), as they are alone."""
    config = tiny_config(tiny)
    config = replace(config, limits=Limits(max_new_tokens_cap=1500, batch_wait_ms=0))
    short = [exam_pb2.TakeExamRequest(prompt=p, max_new_tokens=4) for p in PROMPTS]
    async with serving(config) as stub:
        alone = [await stub.TakeExam(r) for r in short]
        # The bare base runs this prompt to its budget; the short ones wear the default adapter,
        # so their lane takes the bare row in.
        long = exam_pb2.TakeExamRequest(prompt=LONG, max_new_tokens=1500, disable_adapter=True)
        stream = stub.StreamExam(long)
        chunks = stream.__aiter__()
        await chunks.__anext__()  # the long answer is decoding
        together = await asyncio.gather(*(stub.TakeExam(r) for r in short))
        rest = [chunk async for chunk in chunks]
    final = rest[-1].final
    assert final.finish_reason == exam_pb2.FINISH_REASON_LENGTH, "it ran to its budget"
    assert len(rest) > 1, "the long answer was still streaming after the short ones returned"
    assert [r.answer for r in together] == [r.answer for r in alone]
    assert min(r.batch_size for r in together) >= 2, "each shared a step with the long request"


async def test_a_session_under_steady_load_lets_other_work_in(tiny: dict[str, str]) -> None:
    """Callers that keep a session full forever do not starve the model thread: an adapter load
    waiting for it makes the session stop admitting, finish its rows and end; the callers' next
    requests start the next session."""
    config = replace(tiny_config(tiny), limits=Limits(max_new_tokens_cap=64, batch_wait_ms=0))
    stop = asyncio.Event()
    answered = 0
    async with serving(config) as stub:

        async def caller(prompt: str, tokens: int) -> None:
            nonlocal answered
            request = exam_pb2.TakeExamRequest(prompt=prompt, max_new_tokens=tokens)
            while not stop.is_set():
                await stub.TakeExam(request)
                answered += 1

        # Staggered lengths, so that some row is always decoding.
        callers = [asyncio.ensure_future(caller(LONG, 8 + 2 * i)) for i in range(24)]
        await asyncio.sleep(0.5)
        request = exam_pb2.LoadAdapterRequest(name="late", adapter_path=tiny["adapter_b"])
        loaded = await asyncio.wait_for(stub.LoadAdapter(request), 30)
        before = answered
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*callers)
    assert loaded.adapter.name == "late"
    assert answered > before, "the callers went on being answered after the load"


def test_rows_sharing_a_prefix_read_it_once_per_adapter_and_answer_as_alone(
    base: tuple[ResidentBase, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template's shared beginning is read for one row per adapter and copied to the others:
    whole, and in chunks while other rows decode."""
    model, adapters = base
    template = "Books, genres, answers and questions. " * 4 + "Instruction: Which genre is {}?"
    titles = ["Dune", "the hobbit", "Dracula", "a tiny corpus", "The quick brown fox", "Books"]

    def rows() -> list[Row]:
        return [
            _row(model, template.format(title), adapters[i % 3], 6)
            for i, title in enumerate(titles * 2)
        ]

    shared = Prefill(model.lane(adapters[0]), rows(), 0, "cpu")
    assert shared.shared > 20, "the template is read once per adapter"
    assert shared.reading_rows == 3
    whole = rows()
    decoder = _decoder(model)
    _admit(decoder, model, whole)
    _run(decoder)
    monkeypatch.setattr(scheduler, "PREFILL_TOKENS_PER_STEP", 16)
    running = _row(model, PROMPTS[0], adapters[1], 40)
    chunked = rows()
    decoder = _decoder(model)
    _admit(decoder, model, [running])
    decoder.step()
    _admit(decoder, model, chunked)
    _run(decoder)
    for row in [*whole, *chunked, running]:
        assert row.generated == _alone(model, row), row.adapter
    assert [r.generated for r in whole] == [r.generated for r in chunked]


def test_prompts_of_very_different_lengths_are_read_in_groups() -> None:
    """Padding 10 short prompts to 10 long ones costs more than a pass of their own; prompts of
    one length stay together; every row is in exactly one group."""

    def rows(*lengths: int) -> list[Row]:
        return [Row([1] * n, None, 1, threading.Event()) for n in lengths]

    mixed = rows(*([5] * 10 + [100] * 10))
    groups = length_groups(mixed)
    assert sorted(len(g) for g in groups) == [10, 10]
    assert {len(r.prompt_ids) for r in groups[0]} == {5}
    assert len(length_groups(rows(*([12] * 64)))) == 1
    spread = rows(*range(1, 60))
    assert sorted(map(id, (r for g in length_groups(spread) for r in g))) == sorted(map(id, spread))
