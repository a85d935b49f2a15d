"""The bad-input matrix, sidecar side: each bad request straight at a real sidecar over gRPC, its
exact status code, ErrorInfo reason and BadRequest field; after each, a good request still
answers. To add a case, add a line to CASES."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from golem_sidecar.config import Defaults, Limits, QuantizationDefault, Security, SidecarConfig
from golem_sidecar.gen import exam_pb2, exam_pb2_grpc
from golem_sidecar.placement import bitsandbytes_installed
from golem_sidecar.server import Sidecar
from tests.conftest import CAP
from tests.rpc import failure

R = exam_pb2.TakeExamRequest
Q = exam_pb2.Quantization
Code = grpc.StatusCode
# Paths by name: the tiny fixtures' and tests/bad_inputs.py's.
Paths = dict[str, str]
# The confined sidecar also has a smaller message limit, to show the setting is applied.
CONFINED_MAX_MESSAGE = 65_536


@dataclass(frozen=True)
class Case:
    name: str
    request: Callable[[Paths], exam_pb2.TakeExamRequest]
    code: grpc.StatusCode
    # None: a status gRPC itself sends, which has no details.
    reason: str | None
    field: str | None
    # Sent to a sidecar whose security.adapterRoots / modelRoots are set.
    confined: bool = False
    # What must also hold after the refusal.
    after: Callable[[Paths], bool] | None = None


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


def escape(name: str, key: str, field: str) -> Case:
    """A path out of the confined sidecar's roots."""
    return Case(
        name,
        lambda p: R(**{field: p[key]}),
        Code.PERMISSION_DENIED,
        "PATH_OUTSIDE_ROOTS",
        field,
        confined=True,
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
    Case("4-bit where impossible", lambda p: R(device="cpu", quantization=Q(load_in_4bit=True)),
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
]
# fmt: on


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    if case.reason == "QUANTIZATION_UNAVAILABLE" and bitsandbytes_installed():
        return [pytest.mark.skip(reason="bitsandbytes is installed: 4-bit may work here")]
    return []


@pytest_asyncio.fixture(scope="module")
async def confined(bad: Paths) -> AsyncIterator[exam_pb2_grpc.ExamServiceStub]:
    """A sidecar that may read models and adapters only under the roots of bad_inputs.py."""
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
        ),
    )
    server = Sidecar(config)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield exam_pb2_grpc.ExamServiceStub(channel)
    await server.stop(0)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=_marks(c)) for c in CASES])
async def test_bad_request_is_refused_and_the_sidecar_still_answers(
    case: Case,
    tiny: Paths,
    bad: Paths,
    stub: exam_pb2_grpc.ExamServiceStub,
    confined: exam_pb2_grpc.ExamServiceStub,
) -> None:
    target = confined if case.confined else stub
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await target.TakeExam(case.request({**tiny, **bad}), timeout=60)
    got = failure(info.value)
    assert (got.code, got.reason) == (case.code, case.reason), got.message
    assert got.fields == ((case.field,) if case.field else ())
    assert got.message, "every refusal says why"
    assert case.after is None or case.after({**tiny, **bad})
    after = await target.TakeExam(R(max_new_tokens=2), timeout=60)
    assert after.answer_tokens > 0
