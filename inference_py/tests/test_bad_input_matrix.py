"""The bad-input matrix, sidecar side: each bad request straight at a real sidecar over gRPC, to
every RPC of ExamService, with its exact status code, ErrorInfo reason and BadRequest field;
after each, a good request still answers. To add a case, add a line to CASES; a method of the
service without a case fails test_every_rpc_has_cases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message

from golem_sidecar.config import Defaults, Limits, QuantizationDefault, Security, SidecarConfig
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.placement import bitsandbytes_installed, fused_cpu_kernel
from golem_sidecar.server import Sidecar
from golem_sidecar.wire import EXAM_SERVICE
from tests.conftest import CAP, ENGINES
from tests.hostile_paths import build_hostile_paths
from tests.rpc import failure

R = exam_pb2.TakeExamRequest
L = exam_pb2.LoadAdapterRequest
U = exam_pb2.UnloadAdapterRequest
C = exam_pb2.CompareAdaptersRequest
G = exam_pb2.GradeExamRequest
Q = exam_pb2.Quantization
Code = grpc.StatusCode
# Paths by name: the tiny fixtures' and tests/bad_inputs.py's.
Paths = dict[str, str]
# The confined sidecar also has a smaller message limit, to show the setting is applied.
CONFINED_MAX_MESSAGE = 65_536


@dataclass(frozen=True)
class Case:
    name: str
    # A message, or raw bytes for a request that cannot be parsed.
    request: Callable[[Paths], Message | bytes]
    code: grpc.StatusCode
    # None: a status gRPC itself sends, which has no details.
    reason: str | None
    field: str | None
    # Sent to a sidecar whose security.adapterRoots / modelRoots are set.
    confined: bool = False
    # What must also hold after the refusal.
    after: Callable[[Paths], bool] | None = None
    # The ExamService method the request goes to.
    rpc: str = "TakeExam"
    # Text the message must contain, by the case's paths.
    says: Callable[[Paths], tuple[str, ...]] | None = None
    # What a stream sent before the refusal, by each message's oneof: nothing for a request
    # refused before any work starts.
    streamed: tuple[str, ...] = ()


def invalid(name: str, field: str, **request: object) -> Case:
    """A field the sidecar refuses as it reads the request."""
    return Case(name, lambda p: R(**request), Code.INVALID_ARGUMENT, "INVALID_FIELD", field)


def model(
    name: str,
    key: str,
    code: grpc.StatusCode,
    reason: str,
    after: Callable[[Paths], bool] | None = None,
) -> Case:
    """model_name set to the path bad_inputs.py built under ``key``."""

    def request(p: Paths) -> exam_pb2.TakeExamRequest:
        return R(model_name=p[key], disable_adapter=True)

    return Case(name, request, code, reason, "model_name", after=after)


def adapter(name: str, key: str, code: grpc.StatusCode, reason: str) -> Case:
    """adapter_path set to the path bad_inputs.py built under ``key``."""
    return Case(name, lambda p: R(adapter_path=p[key]), code, reason, "adapter_path")


def escape(label: str, key: str, field: str, rpc: str = "TakeExam", **extra: object) -> Case:
    """A path out of the confined sidecar's roots, to any RPC that takes one."""

    def request(p: Paths) -> Message:
        value = [p[key]] if field == "adapters" else p[key]

        # "$key" stands for the fixture path of that key (lists too).
        def path(v: object) -> object:
            if isinstance(v, list):
                return [path(x) for x in v]
            return p[v[1:]] if isinstance(v, str) and v.startswith("$") else v

        fields = {k: path(v) for k, v in extra.items()}
        return getattr(exam_pb2, f"{rpc}Request", R)(**{field: value}, **fields)

    return Case(
        label, request, Code.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS", field, confined=True, rpc=rpc
    )


def other(
    rpc: str,
    name: str,
    request: Callable[[Paths], Message],
    code: grpc.StatusCode,
    reason: str | None,
    field: str | None,
    confined: bool = False,
) -> Case:
    """A case for an RPC other than TakeExam."""
    return Case(name, request, code, reason, field, confined=confined, rpc=rpc)


def grade(
    name: str,
    request: Callable[[Paths], Message],
    code: grpc.StatusCode,
    reason: str,
    field: str,
    says: Callable[[Paths], tuple[str, ...]] | None = None,
    confined: bool = False,
    streamed: tuple[str, ...] = (),
) -> Case:
    """A GradeExam case; the exam files are bad_exams.py's, by key."""
    return Case(
        f"grade: {name}",
        request,
        code,
        reason,
        field,
        confined=confined,
        rpc="GradeExam",
        says=says,
        streamed=streamed,
    )


def exam_file(p: Paths, key: str) -> str:
    """The file as the sidecar names it in messages: resolved."""
    return str(Path(p[key]).resolve())


def bad_exam(name: str, key: str, line: int | None, *more: str) -> Case:
    """An exam file the sidecar refuses whole, naming the file, the line and ``more``."""
    where = ":" if line is None else f":{line}:"
    return grade(
        name,
        lambda p: G(exam_path=p[key], include_base=True),
        Code.INVALID_ARGUMENT,
        "INVALID_EXAM",
        "exam_path",
        lambda p: (exam_file(p, key) + where, *more),
    )


FP, NF = Code.FAILED_PRECONDITION, Code.NOT_FOUND
TOO_BIG = Limits.max_message_bytes + 1
# fmt: off
CASES = [
    # The prompt and max_new_tokens
    invalid("empty prompt", "prompt", prompt=""),
    invalid("whitespace prompt", "prompt", prompt=" \n\t "),
    Case("prompt longer than the context", lambda p: R(prompt="genre " * 2100, max_new_tokens=2),
         Code.INVALID_ARGUMENT, "PROMPT_TOO_LONG", "prompt"),
    Case("message above limits.maxMessageBytes", lambda p: R(prompt="x" * TOO_BIG),
         Code.RESOURCE_EXHAUSTED, None, None),
    invalid("max_new_tokens 0", "max_new_tokens", max_new_tokens=0),
    invalid("max_new_tokens negative", "max_new_tokens", max_new_tokens=-5),
    invalid("max_new_tokens above the cap", "max_new_tokens", max_new_tokens=CAP + 1),
    invalid("max_new_tokens int32 max", "max_new_tokens", max_new_tokens=2**31 - 1),
    # Placement
    Case("device cuda:7", lambda p: R(device="cuda:7"), FP, "DEVICE_UNAVAILABLE", "device"),
    invalid("device tpu", "device", device="tpu"),
    invalid("unknown compute dtype", "quantization.bnb_4bit_compute_dtype",
            quantization=Q(load_in_4bit=True, bnb_4bit_compute_dtype="int3")),
    invalid("unknown 4-bit quant type", "quantization.bnb_4bit_quant_type",
            quantization=Q(load_in_4bit=True, bnb_4bit_quant_type="nf8")),
    Case("4-bit without bitsandbytes", lambda p: R(device="cpu", quantization=Q(load_in_4bit=True)),
         FP, "QUANTIZATION_UNAVAILABLE", "quantization.load_in_4bit"),
    Case("4-bit layers the fused CPU kernel cannot take",
         lambda p: R(model_name=p["model_narrow_4bit"], disable_adapter=True,
                     quantization=Q(load_in_4bit=True)),
         FP, "QUANTIZATION_UNAVAILABLE", "quantization.load_in_4bit"),
    # The model
    invalid("empty model name", "model_name", model_name=""),
    invalid("model name with a NUL", "model_name", model_name="models/\x00/m"),
    Case("hub id not available offline",
         lambda p: R(model_name="golem-test/not-cached", disable_adapter=True),
         NF, "MODEL_NOT_FOUND", "model_name"),
    Case("local model path missing",
         lambda p: R(model_name="./no/such/model", disable_adapter=True),
         NF, "MODEL_NOT_FOUND", "model_name"),
    Case("model name neither a path nor a hub id",
         lambda p: R(model_name="not a model!", disable_adapter=True),
         NF, "MODEL_NOT_FOUND", "model_name"),
    model("model folder without config.json", "model_root", NF, "MODEL_NOT_FOUND"),
    model("model name is an adapter folder", "adapter", FP, "MODEL_INVALID"),
    model("model with a malformed config", "model_bad_config", FP, "MODEL_INVALID"),
    model("model with truncated weights", "model_truncated", FP, "MODEL_INVALID"),
    model("model with only pickle weights", "model_pickle_only", FP, "MODEL_PICKLE_REFUSED"),
    model("model that needs its own code", "model_remote_code", FP, "MODEL_REMOTE_CODE_REFUSED",
          after=lambda p: not Path(p["remote_code_marker"]).exists()),
    # The adapter folder
    Case("adapter path missing", lambda p: R(adapter_path="../Quest_2/results/checkpoint-250"),
         NF, "ADAPTER_NOT_FOUND", "adapter_path"),
    # Longer than any path can be (gate.MAX_PATH_CHARS): refused before the file system.
    Case("adapter path far too long", lambda p: R(adapter_path="a" * 5000),
         Code.INVALID_ARGUMENT, "INVALID_FIELD", "adapter_path"),
    # Every byte of it percent-encoded in the trailers, were the message not cut short.
    Case("adapter path of 3000 emoji", lambda p: R(adapter_path="\U0001f4da" * 3000),
         NF, "ADAPTER_NOT_FOUND", "adapter_path"),
    adapter("adapter path is a file", "adapter_file",
            Code.INVALID_ARGUMENT, "ADAPTER_NOT_A_DIRECTORY"),
    adapter("folder without adapter_config.json", "no_config", FP, "ADAPTER_CONFIG_MISSING"),
    adapter("adapter config not JSON", "config_not_json", FP, "ADAPTER_CONFIG_INVALID"),
    adapter("adapter config not a PEFT config", "config_not_peft", FP, "ADAPTER_CONFIG_INVALID"),
    adapter("adapter of a prompt-learning type", "prefix_tuning", FP, "ADAPTER_TYPE_UNSUPPORTED"),
    adapter("adapter safetensors missing", "no_weights", FP, "ADAPTER_WEIGHTS_MISSING"),
    adapter("adapter safetensors truncated", "truncated", FP, "ADAPTER_WEIGHTS_CORRUPT"),
    adapter("adapter safetensors corrupt", "corrupt", FP, "ADAPTER_WEIGHTS_CORRUPT"),
    adapter("adapter safetensors empty", "empty_weights", FP, "ADAPTER_WEIGHTS_CORRUPT"),
    adapter("adapter with only a pickle", "pickle_only", FP, "ADAPTER_PICKLE_REFUSED"),
    adapter("adapter for another base (shapes)", "adapter_other_size", FP, "ADAPTER_INCOMPATIBLE"),
    adapter("adapter targets modules the base lacks", "adapter_other_arch",
            FP, "ADAPTER_INCOMPATIBLE"),
    # A sidecar with security.adapterRoots / modelRoots set
    escape("adapter path escaping with ..", "adapter_dotdot", "adapter_path"),
    escape("adapter path escaping by symlink", "adapter_symlink", "adapter_path"),
    escape("adapter weights escaping by symlink", "adapter_leaky_weights", "adapter_path"),
    escape("missing adapter outside the roots", "adapter_outside_missing", "adapter_path"),
    escape("model path escaping with ..", "model_dotdot", "model_name"),
    escape("model path escaping by symlink", "model_symlink", "model_name"),
    escape("model path outside the roots", "model", "model_name"),
    Case("missing adapter inside the roots",
         lambda p: R(adapter_path=f"{p['adapter_root']}/missing"),
         NF, "ADAPTER_NOT_FOUND", "adapter_path", confined=True),
    Case("hub id with roots set (not a path, so not confined)",
         lambda p: R(model_name="golem-test/not-cached", disable_adapter=True),
         NF, "MODEL_NOT_FOUND", "model_name", confined=True),
    Case("message above a configured limits.maxMessageBytes",
         lambda p: R(prompt="x" * CONFINED_MAX_MESSAGE),
         Code.RESOURCE_EXHAUSTED, None, None, confined=True),
    # Files that are not what they claim: never opened (a FIFO would block its reader forever)
    adapter("adapter config is a FIFO", "adapter_fifo_config", FP, "ADAPTER_CONFIG_INVALID"),
    adapter("adapter weights are a FIFO", "adapter_fifo_weights", FP, "ADAPTER_WEIGHTS_MISSING"),
    model("model folder holding a FIFO", "model_fifo", FP, "MODEL_INVALID"),
    escape("model weights escaping by symlink", "model_leaky_weights", "model_name"),
    escape("model index naming a shard outside", "model_leaky_index", "model_name"),
    # Bounded text
    invalid("expected answer too long", "expected_answer", expected_answer="x" * 5000),
    invalid("model name too long", "model_name", model_name="m" * 5000),
    # StreamExam takes TakeExam's request and the same gate
    Case("stream: empty prompt", lambda p: R(prompt=""), Code.INVALID_ARGUMENT, "INVALID_FIELD",
         "prompt", rpc="StreamExam"),
    escape("stream: model outside the roots", "model", "model_name", rpc="StreamExam"),
    # LoadAdapter
    other("LoadAdapter", "load: bad name", lambda p: L(name="no spaces", adapter_path=p["adapter"]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "name"),
    other("LoadAdapter", "load: made-up name form",
          lambda p: L(name="~adapter-0", adapter_path=p["adapter"]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "name"),
    other("LoadAdapter", "load: missing folder", lambda p: L(name="a", adapter_path="/no/such"),
          NF, "ADAPTER_NOT_FOUND", "adapter_path"),
    other("LoadAdapter", "load: missing model", lambda p: L(
          name="a", adapter_path=p["adapter"], model_name="./no/such/model"),
          NF, "MODEL_NOT_FOUND", "model_name"),
    escape("load: adapter outside the roots", "adapter_dotdot", "adapter_path", rpc="LoadAdapter",
           name="a"),
    escape("load: model outside the roots", "model", "model_name", rpc="LoadAdapter",
           name="a", adapter_path="$confined_adapter"),
    # UnloadAdapter
    other("UnloadAdapter", "unload: bad name", lambda p: U(name="a b"),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "name"),
    other("UnloadAdapter", "unload: not loaded", lambda p: U(name="never-loaded"),
          NF, "ADAPTER_NOT_LOADED", "name"),
    escape("unload: model outside the roots", "model", "model_name", rpc="UnloadAdapter",
           name="a"),
    # ListAdapters takes nothing, so nothing in it can be bad: its case is the refusal of a
    # request too large to read, which gRPC itself answers.
    other("ListAdapters", "list: bytes that are no ListAdaptersRequest",
          lambda p: b"\xff\xff\xff", Code.INVALID_ARGUMENT, "REQUEST_UNREADABLE", None),
    # CompareAdapters
    other("CompareAdapters", "compare: no prompts", lambda p: C(adapters=[p["adapter"]]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "prompts"),
    other("CompareAdapters", "compare: blank prompt",
          lambda p: C(prompts=[" "], adapters=[p["adapter"]]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "prompts"),
    other("CompareAdapters", "compare: 9 prompts",
          lambda p: C(prompts=["q"] * 9, adapters=[p["adapter"]]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "prompts"),
    other("CompareAdapters", "compare: no adapters", lambda p: C(prompts=["q"]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "adapters"),
    other("CompareAdapters", "compare: 9 adapters",
          lambda p: C(prompts=["q"], adapters=[f"n{i}" for i in range(9)]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "adapters"),
    other("CompareAdapters", "compare: two spellings of one folder",
          lambda p: C(prompts=["q"], adapters=[p["adapter"], p["adapter"] + "/./"]),
          Code.INVALID_ARGUMENT, "DUPLICATE_ADAPTER", "adapters"),
    other("CompareAdapters", "compare: missing adapter folder",
          lambda p: C(prompts=["q"], adapters=["/no/such/adapter"]),
          NF, "ADAPTER_NOT_FOUND", "adapters"),
    other("CompareAdapters", "compare: unknown registered name",
          lambda p: C(prompts=["q"], adapters=["never-loaded"]),
          NF, "ADAPTER_NOT_LOADED", "adapters"),
    other("CompareAdapters", "compare: max_new_tokens 0",
          lambda p: C(prompts=["q"], adapters=[p["adapter"]], max_new_tokens=0),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "max_new_tokens"),
    other("CompareAdapters", "compare: prompt longer than the context",
          lambda p: C(prompts=["genre " * 2100], adapters=[p["adapter"]], max_new_tokens=2),
          Code.INVALID_ARGUMENT, "PROMPT_TOO_LONG", "prompt"),
    other("CompareAdapters", "compare: missing model",
          lambda p: C(prompts=["q"], adapters=[p["adapter"]], model_name="./no/such/model"),
          NF, "MODEL_NOT_FOUND", "model_name"),
    escape("compare: adapter outside the roots", "adapter_dotdot", "adapters",
           rpc="CompareAdapters", prompts=["q"]),
    escape("compare: model outside the roots", "model", "model_name", rpc="CompareAdapters",
           prompts=["q"], adapters=["$confined_adapter"]),
    # GradeExam: the exam file, checked whole before anything is sent, not even the plan
    bad_exam("line not JSON", "exam_not_json", 2, "not valid JSON"),
    bad_exam("answer a number", "exam_answer_number", 3, 'field "answer"'),
    bad_exam("exam without items", "exam_empty", None, "no items"),
    bad_exam("duplicate ids", "exam_duplicate_ids", 3, 'field "id"', "line 1"),
    grade("unknown scorer in the request",
          lambda p: G(exam_path=p["good_exam"], include_base=True, scorers=["exact_mach"]),
          Code.INVALID_ARGUMENT, "UNKNOWN_SCORER", "scorers",
          lambda p: ("'exact_mach'", "did you mean 'exact_match'")),
    # The header beside the exam (the request names none) stands for header_path.
    grade("unknown scorer in the header",
          lambda p: G(exam_path=p["exam_unknown_header_scorer"], include_base=True),
          Code.INVALID_ARGUMENT, "INVALID_EXAM", "header_path",
          lambda p: (exam_file(p, "header_unknown_scorer") + ":", 'field "scorers[0]"',
                     'did you mean "exact_match"')),
    grade("unknown template field in the header",
          lambda p: G(exam_path=p["good_exam"], header_path=p["header_unknown_template_field"],
                      include_base=True),
          Code.INVALID_ARGUMENT, "INVALID_EXAM", "header_path",
          lambda p: ('field "template"', "{questoin}", 'did you mean "question"')),
    grade("exam file missing", lambda p: G(exam_path=p["exam_missing"], include_base=True),
          NF, "EXAM_NOT_FOUND", "exam_path", lambda p: (p["exam_missing"],)),
    grade("missing exam inside the roots",
          lambda p: G(exam_path=p["exam_missing"], include_base=True),
          NF, "EXAM_NOT_FOUND", "exam_path", confined=True),
    grade("exam path a folder", lambda p: G(exam_path=p["exam_folder"], include_base=True),
          Code.INVALID_ARGUMENT, "EXAM_NOT_A_FILE", "exam_path"),
    escape("grade: exam outside the roots", "outside_exam", "exam_path", rpc="GradeExam",
           include_base=True),
    escape("grade: exam escaping by symlink", "exam_symlink", "exam_path", rpc="GradeExam",
           include_base=True),
    escape("grade: exam escaping with ..", "exam_dotdot", "exam_path", rpc="GradeExam",
           include_base=True),
    # The header found beside the exam is confined too: it stands for header_path.
    grade("header beside the exam escaping by symlink",
          lambda p: G(exam_path=p["exam_leaky_header"], include_base=True),
          Code.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS", "header_path", confined=True),
    escape("grade: header outside the roots", "outside_header", "header_path", rpc="GradeExam",
           exam_path="$good_exam", include_base=True),
    escape("grade: results outside the roots", "outside_results", "resume_path", rpc="GradeExam",
           exam_path="$good_exam", include_base=True),
    escape("grade: adapter outside the roots", "adapter_dotdot", "adapters", rpc="GradeExam",
           exam_path="$good_exam"),
    escape("grade: model outside the roots", "model", "model_name", rpc="GradeExam",
           exam_path="$good_exam", include_base=True),
    # GradeExam: the models
    grade("no model at all", lambda p: G(exam_path=p["good_exam"]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "adapters"),
    grade("9 adapters", lambda p: G(exam_path=p["good_exam"], adapters=[f"n{i}" for i in range(9)]),
          Code.INVALID_ARGUMENT, "INVALID_FIELD", "adapters"),
    grade("missing adapter folder",
          lambda p: G(exam_path=p["good_exam"], adapters=["/no/such/adapter"]),
          NF, "ADAPTER_NOT_FOUND", "adapters"),
    # GradeExam: the results file to resume from
    grade("results line not JSON, and not the last",
          lambda p: G(exam_path=p["good_exam"], include_base=True, resume_path=p["bad_results"]),
          Code.INVALID_ARGUMENT, "INVALID_EXAM", "resume_path",
          lambda p: (exam_file(p, "bad_results") + ":1:",)),
    grade("results line JSON but not an object",
          lambda p: G(exam_path=p["good_exam"], include_base=True,
                      resume_path=p["results_not_object"]),
          Code.INVALID_ARGUMENT, "INVALID_EXAM", "resume_path",
          lambda p: (exam_file(p, "results_not_object") + ":1:",)),
    # Found mid-run, as the item's window is graded: the plan went out first, and the short
    # item sharing the long one's window is never sent.
    grade("item prompt longer than the context",
          lambda p: G(exam_path=p["exam_long_prompt"], include_base=True,
                      adapters=[p["adapter"]]),
          Code.INVALID_ARGUMENT, "PROMPT_TOO_LONG", "exam_path",
          lambda p: (exam_file(p, "exam_long_prompt") + ":2:", "'long'"), streamed=("plan",)),
]
# fmt: on


@pytest.fixture(scope="module")
def hostile(tiny: Paths, bad: Paths, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return build_hostile_paths(tiny, bad, tmp_path_factory.mktemp("hostile"))


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    if case.name == "4-bit without bitsandbytes" and bitsandbytes_installed():
        return [pytest.mark.skip(reason="bitsandbytes is installed: 4-bit works here")]
    if case.name == "4-bit layers the fused CPU kernel cannot take" and not fused_cpu_kernel():
        return [pytest.mark.skip(reason="this CPU does not run bitsandbytes' fused kernel")]
    return []


@pytest_asyncio.fixture(scope="module")
async def confined(bad: Paths) -> AsyncIterator[grpc.aio.Channel]:
    """A sidecar that may read models, adapters and exams only under the roots of
    bad_inputs.py."""
    config = SidecarConfig(
        listen="127.0.0.1:0",
        defaults=Defaults(
            model_name=bad["confined_model"],
            adapter_path=bad["confined_adapter"],
            max_new_tokens=2,
            device="cpu",
            quantization=QuantizationDefault(mode="none"),
        ),
        limits=Limits(max_new_tokens_cap=CAP, max_message_bytes=CONFINED_MAX_MESSAGE),
        security=Security(
            adapter_roots=(Path(bad["adapter_root"]).resolve(),),
            model_roots=(Path(bad["model_root"]).resolve(),),
            exam_roots=(Path(bad["exam_root"]).resolve(),),
        ),
        engines=ENGINES,
    )
    server = Sidecar(config)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    await server.stop(0)


async def call(
    channel: grpc.aio.Channel, rpc: str, request: Message | bytes, streamed: list[str]
) -> None:
    """Calls any ExamService method with a message or raw bytes, reading a stream to its end;
    each streamed message's oneof (or type) goes into ``streamed``."""
    method = EXAM_SERVICE.methods_by_name[rpc]
    path = f"/{EXAM_SERVICE.full_name}/{rpc}"
    serialize = (lambda b: b) if isinstance(request, bytes) else type(request).SerializeToString
    if method.server_streaming:
        output = getattr(exam_pb2, method.output_type.name)
        stream = channel.unary_stream(
            path, request_serializer=serialize, response_deserializer=output.FromString
        )
        async for message in stream(request, timeout=60):
            oneofs = message.DESCRIPTOR.oneofs
            streamed.append(
                (message.WhichOneof(oneofs[0].name) or "") if oneofs else message.DESCRIPTOR.name
            )
    else:
        await channel.unary_unary(path, request_serializer=serialize)(request, timeout=60)


def test_every_rpc_has_cases() -> None:
    assert {c.rpc for c in CASES} == set(EXAM_SERVICE.methods_by_name)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=_marks(c)) for c in CASES])
async def test_bad_request_is_refused_and_the_sidecar_still_answers(
    case: Case,
    tiny: Paths,
    bad: Paths,
    hostile: Paths,
    channel: grpc.aio.Channel,
    confined: grpc.aio.Channel,
) -> None:
    paths = {**tiny, **bad, **hostile}
    target = confined if case.confined else channel
    streamed: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(target, case.rpc, case.request(paths), streamed)
    got = failure(info.value)
    assert (got.code, got.reason) == (case.code, case.reason), got.message
    assert got.fields == ((case.field,) if case.field else ())
    assert got.message, "every refusal says why"
    for text in case.says(paths) if case.says else ():
        assert text in got.message, (text, got.message)
    assert tuple(streamed) == case.streamed
    assert case.after is None or case.after(paths)
    stub = exam_pb2_grpc.ExamServiceStub(target)
    after = await stub.TakeExam(R(max_new_tokens=2), timeout=60)
    assert after.answer_tokens > 0
    if case.rpc == "GradeExam":
        graded = [
            m
            async for m in stub.GradeExam(
                G(exam_path=paths["good_exam"], include_base=True), timeout=60
            )
        ]
        assert graded[-1].summary.items == 2, graded[-1]
