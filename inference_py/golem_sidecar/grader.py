"""GradeExam's run: the exam checked whole, then graded window by window.

A window is as many items as fill one batch with every model's rows (the base's and each
adapter's), submitted together to the base's queue, so continuous batching decodes base and
adapters in the same passes; the log-likelihood scorers' continuations are then scored for the
whole window in one batched job. Results go out as each window finishes, item by item, models in
plan order. The file is read a window at a time (memory holds one window, the ids seen and the
resume index), never whole.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc

from golem_sidecar.adapters import content_hash
from golem_sidecar.config import SidecarConfig
from golem_sidecar.engine import Pair
from golem_sidecar.engines import Engines
from golem_sidecar.errors import GolemError
from golem_sidecar.exam import ExamSpec
from golem_sidecar.exams import ExamDigest, ExamError, ExamItem, iter_items
from golem_sidecar.gate import FileChecks
from golem_sidecar.gen import exam_pb2
from golem_sidecar.grade_spec import (
    BASE_LABEL,
    GradedModel,
    GradeSpec,
    exam_refused,
    model_settings,
    result_key,
)
from golem_sidecar.loglikelihood import continuation_for
from golem_sidecar.messages import FINISH_REASONS, quantization_info
from golem_sidecar.resume import ResumeIndex, read_index
from golem_sidecar.scorers import Observed, Target, compile_pattern
from golem_sidecar.scoring import Loglikelihood
from golem_sidecar.session import ExamResult
from golem_sidecar.summary import Tally

T = TypeVar("T")
# Windows graded at once: two keep the batch full across a window's end.
WINDOWS_IN_FLIGHT = 2


@dataclass(frozen=True)
class _Job:
    """One item answered by one model."""

    item: ExamItem
    model: GradedModel
    key: str


async def grade_exam(
    engine: Engines,
    files: FileChecks,
    config: SidecarConfig,
    spec: GradeSpec,
    cancelled: threading.Event,
) -> AsyncIterator[exam_pb2.GradeExamResponse]:
    """The plan, every item's result per model, then the summary."""
    spec = await _hash_registered(engine, files, spec)
    index = await _checked(asyncio.to_thread(read_index, spec.resume_path), "resume_path")
    settings = {model.label: model_settings(spec, model) for model in spec.models}
    items, resumed, exam_hash = await _checked(
        asyncio.to_thread(_check_exam, spec, settings, index), "exam_path"
    )
    device, dtype = await engine.base_info(spec.model, spec.placement)
    labels = [model.label for model in spec.models]
    scorers = [scorer.name for scorer in spec.scorers]
    yield exam_pb2.GradeExamResponse(
        plan=exam_pb2.ExamPlan(
            exam_name=spec.header.name,
            items=items,
            models=labels,
            scorers=scorers,
            results=items * len(labels),
            resumed=resumed,
        )
    )
    base = BASE_LABEL if labels[0] == BASE_LABEL else None
    tally = Tally(labels, scorers, base)
    digest = ExamDigest(spec.header.generation)
    windows = _windows(spec, settings, digest, _window_items(config, len(labels)))
    graded = 0
    async for results in _graded(engine, spec, windows, index, cancelled):
        for per_item in results:
            tally.add_item({r.model: r.scores for r in per_item})
            for result in per_item:
                graded += not result.resumed
                yield exam_pb2.GradeExamResponse(item=result)
    if digest.hexdigest() != exam_hash:
        raise GolemError(
            grpc.StatusCode.ABORTED,
            "EXAM_CHANGED",
            f"exam_path: {spec.exam_label} changed while it was graded; grade it again",
        )
    hashes = {model.label: model.adapter_hash for model in spec.models}
    yield exam_pb2.GradeExamResponse(
        summary=exam_pb2.ExamSummary(
            exam_name=spec.header.name,
            exam_version=spec.header.version or "",
            exam_hash=exam_hash,
            items=items,
            models=tally.models(hashes),
            deltas=tally.deltas(),
            graded=graded,
            resumed=items * len(labels) - graded,
            model=exam_pb2.ModelInfo(
                model_name=spec.model.name,
                device=device,
                dtype=dtype,
                quantization=quantization_info(spec.placement),
            ),
        )
    )


async def _hash_registered(engine: Engines, files: FileChecks, spec: GradeSpec) -> GradeSpec:
    """Registered adapters keyed by their weights' content too, as folders are (grade_spec.py)."""
    models = []
    for model in spec.models:
        if model.registered is not None:
            folder = await engine.registered_folder(spec.model, spec.placement, model.registered)
            model = replace(model, adapter_hash=await files.run(content_hash, folder))
        models.append(model)
    return replace(spec, models=tuple(models))


async def _checked(work: Awaitable[T], field: str) -> T:
    """Awaits file work; an ExamError becomes INVALID_ARGUMENT naming ``field``."""
    try:
        result = await work
    except ExamError as error:
        raise exam_refused(error, field) from None
    return result


def _check_exam(
    spec: GradeSpec, settings: dict[str, bytes], index: ResumeIndex
) -> tuple[int, int, str]:
    """Reads the whole exam once before any work: every line valid, ids unique, regex answers
    compiled when the regex scorer runs. Returns the item count, how many results the resume
    file already holds, and the exam's hash."""
    digest = ExamDigest(spec.header.generation)
    regex = any(scorer.name == "regex" for scorer in spec.scorers)
    items = resumed = 0
    for item in iter_items(spec.exam_path, spec.header):
        items += 1
        digest.add(item)
        if regex:
            _compile_answers(spec, item)
        resumed += sum(result_key(s, item) in index for s in settings.values())
    return items, resumed, digest.hexdigest()


def _compile_answers(spec: GradeSpec, item: ExamItem) -> None:
    for answer in item.answers:
        try:
            compile_pattern(answer)
        except GolemError as error:
            problem = error.message.removeprefix("answer: ")
            raise ExamError(str(spec.exam_path), item.line, "answer", problem) from None


def _take(reader: Iterator[ExamItem], size: int, digest: ExamDigest) -> list[ExamItem]:
    window = list(itertools.islice(reader, size))
    for item in window:
        digest.add(item)
    return window


def _window_items(config: SidecarConfig, models: int) -> int:
    """Items per window: every model's row of each fills one batch, and the windows in flight
    take at most half the base's bounded queue, leaving the rest to other callers."""
    limits = config.limits
    share = limits.max_queue // (2 * WINDOWS_IN_FLIGHT)
    rows = max(models, min(limits.max_batch_size, share))
    return max(1, rows // models)


async def _windows(
    spec: GradeSpec, settings: dict[str, bytes], digest: ExamDigest, size: int
) -> AsyncIterator[list[list[_Job]]]:
    """The exam's jobs a window at a time, read off the event loop."""
    reader = iter_items(spec.exam_path, spec.header)
    while window := await _checked(asyncio.to_thread(_take, reader, size, digest), "exam_path"):
        yield [
            [_Job(item, m, result_key(settings[m.label], item)) for m in spec.models]
            for item in window
        ]


async def _graded(
    engine: Engines,
    spec: GradeSpec,
    windows: AsyncIterator[list[list[_Job]]],
    index: ResumeIndex,
    cancelled: threading.Event,
) -> AsyncIterator[list[list[exam_pb2.ItemResult]]]:
    """Each window's results, in order. The next window's rows are queued while this one's
    decode: they join the running batch as its rows finish (continuous batching) instead of
    waiting for its last, longest answer, and its teacher-forced scoring runs between steps."""
    running: deque[asyncio.Task[list[list[exam_pb2.ItemResult]]]] = deque()
    try:
        async for jobs in windows:
            running.append(
                asyncio.ensure_future(_grade_window(engine, spec, jobs, index, cancelled))
            )
            if len(running) == WINDOWS_IN_FLIGHT:
                yield await running.popleft()
        while running:
            yield await running.popleft()
    finally:
        # Cancelled, failed or done: a window still running for nobody stops.
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _grade_window(
    engine: Engines,
    spec: GradeSpec,
    jobs: list[list[_Job]],
    index: ResumeIndex,
    cancelled: threading.Event,
) -> list[list[exam_pb2.ItemResult]]:
    fresh = [job for per_item in jobs for job in per_item if job.key not in index]
    answers = await _answers(engine, spec, fresh, cancelled)
    likelihoods = await _likelihoods(engine, spec, fresh, answers, cancelled)
    graded = {
        job.key: _result(spec, job, answers[job.key], likelihoods.get(job.key, {})) for job in fresh
    }
    # A resumed result is read back only now, one at a time: the index holds offsets only.
    return [
        [graded[job.key] if job.key in graded else index.read(job.key) for job in per_item]
        for per_item in jobs
    ]


async def _answers(
    engine: Engines, spec: GradeSpec, jobs: list[_Job], cancelled: threading.Event
) -> dict[str, ExamResult]:
    """Every job's answer, all submitted at once so that they share the base's batches."""
    tasks = [asyncio.ensure_future(_answer(engine, spec, job, cancelled)) for job in jobs]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        # One failed or the call was cancelled: the others' rows leave their batch too.
        cancelled.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return {job.key: result for job, result in zip(jobs, results, strict=True)}


async def _answer(
    engine: Engines, spec: GradeSpec, job: _Job, cancelled: threading.Event
) -> ExamResult:
    model, generation = job.model, spec.header.generation
    exam_spec = ExamSpec(
        model=spec.model,
        adapter=model.folder,
        prompt=job.item.prompt,
        max_new_tokens=generation.max_new_tokens,
        placement=spec.placement,
        expected_answer=None,
        stop=generation.stop,
        adapter_name=model.registered,
    )
    try:
        return await engine.take_exam(exam_spec, cancelled)
    except GolemError as error:
        raise _item_error(spec, job.item, error) from None


def _item_error(spec: GradeSpec, item: ExamItem, error: GolemError) -> GolemError:
    """A refusal of one item's prompt (too long for the model, say) names the item's line."""
    if error.code != grpc.StatusCode.INVALID_ARGUMENT:
        return error
    where = f"{spec.exam_label}:{item.line}"
    metadata = {"path": str(spec.exam_path), "line": str(item.line), "field": error.field or ""}
    message = f"exam_path: {where}: item {item.id!r}: {error.message}"
    return GolemError(error.code, error.reason, message, "exam_path", metadata)


async def _likelihoods(
    engine: Engines,
    spec: GradeSpec,
    jobs: list[_Job],
    answers: dict[str, ExamResult],
    cancelled: threading.Event,
) -> dict[str, dict[str, Loglikelihood]]:
    """The continuations the log-likelihood scorers ask for, per job, scored in one batched
    job for the whole window."""
    wanted: list[tuple[str, str]] = []
    pairs: list[Pair] = []
    for job in jobs:
        target = _target(job.item)
        texts = {
            text
            for scorer in spec.scorers
            if scorer.kind == "loglikelihood" and scorer.applies(target)
            for text in scorer.continuations(target)
        }
        for text in sorted(texts):
            wanted.append((job.key, text))
            pairs.append((job.item.prompt, continuation_for(text), job.model))
    if not pairs:
        return {}
    scores = await engine.loglikelihoods(spec.model, spec.placement, pairs, cancelled)
    found: dict[str, dict[str, Loglikelihood]] = {}
    for (key, text), score in zip(wanted, scores, strict=True):
        found.setdefault(key, {})[text] = score
    return found


def _target(item: ExamItem) -> Target:
    return Target(item.answers, item.choices or ())


def _result(
    spec: GradeSpec, job: _Job, answer: ExamResult, likelihoods: dict[str, Loglikelihood]
) -> exam_pb2.ItemResult:
    target = _target(job.item)
    generation = answer.generation
    observed = Observed(output=generation.answer, likelihoods=likelihoods)
    return exam_pb2.ItemResult(
        item_id=job.item.id,
        model=job.model.label,
        key=job.key,
        answer=generation.answer,
        answer_tokens=generation.answer_tokens,
        finish_reason=FINISH_REASONS[generation.finish_reason],
        scores={
            scorer.name: scorer.score(target, observed)
            for scorer in spec.scorers
            if scorer.applies(target)
        },
    )
