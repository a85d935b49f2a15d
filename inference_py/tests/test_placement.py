"""Device, dtype and quantization decisions on this CPU-only machine."""

import grpc
import pytest
import torch

from golem_sidecar.config import QuantizationDefault
from golem_sidecar.errors import GolemError
from golem_sidecar.placement import (
    QuantizationRequest,
    bitsandbytes_installed,
    resolve_device,
    resolve_placement,
)

needs_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks what a machine without CUDA answers"
)


@needs_cpu_only
def test_auto_is_cpu_in_full_precision_here() -> None:
    placement = resolve_placement("auto", QuantizationRequest(), QuantizationDefault("auto"))
    assert (placement.device, placement.dtype, placement.load_in_4bit) == ("cpu", "float32", False)


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "", "CPU "])
def test_unknown_devices_are_invalid(name: str) -> None:
    with pytest.raises(GolemError) as info:
        resolve_device(name)
    assert (info.value.code, info.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "device")


@needs_cpu_only
def test_cuda_on_a_cpu_machine_is_a_failed_precondition() -> None:
    with pytest.raises(GolemError) as info:
        resolve_device("cuda:7")
    assert (info.value.code, info.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEVICE_UNAVAILABLE",
    )


@pytest.mark.skipif(bitsandbytes_installed(), reason="checks the refusal without bitsandbytes")
@pytest.mark.parametrize(
    ("request_", "default"),
    [
        (QuantizationRequest(load_in_4bit=True), QuantizationDefault("none")),
        (QuantizationRequest(), QuantizationDefault("4bit")),
    ],
)
def test_impossible_4bit_is_refused_never_downgraded(
    request_: QuantizationRequest, default: QuantizationDefault
) -> None:
    with pytest.raises(GolemError) as info:
        resolve_placement("cpu", request_, default)
    err = info.value
    assert (err.code, err.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "QUANTIZATION_UNAVAILABLE",
    )
    assert err.field == "quantization.load_in_4bit"
    assert "bitsandbytes" in err.message


def test_explicit_full_precision_beats_a_4bit_default() -> None:
    placement = resolve_placement(
        "cpu", QuantizationRequest(load_in_4bit=False), QuantizationDefault("4bit")
    )
    assert placement.load_in_4bit is False


@pytest.mark.parametrize("dtype", ["int8", "fp16", "torch.int4"])
def test_unknown_compute_dtype_is_invalid(dtype: str) -> None:
    with pytest.raises(GolemError) as info:
        resolve_placement("cpu", QuantizationRequest(compute_dtype=dtype), QuantizationDefault())
    assert info.value.field == "quantization.bnb_4bit_compute_dtype"


@pytest.mark.parametrize("value", ["nf8", "int4", "", "fp4x"])
def test_unknown_quant_type_is_invalid_and_named(value: str) -> None:
    with pytest.raises(GolemError) as info:
        resolve_placement(
            "cpu", QuantizationRequest(load_in_4bit=True, quant_type=value), QuantizationDefault()
        )
    assert (info.value.code, info.value.field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "quantization.bnb_4bit_quant_type",
    )


@pytest.mark.skipif(not bitsandbytes_installed(), reason="needs bitsandbytes")
def test_4bit_settings_come_from_the_request_else_the_config() -> None:
    default = QuantizationDefault("4bit", compute_dtype="bfloat16", quant_type="nf4")
    placement = resolve_placement("cpu", QuantizationRequest(), default)
    assert (placement.load_in_4bit, placement.compute_dtype, placement.quant_type) == (
        True,
        "bfloat16",
        "nf4",
    )
    asked = QuantizationRequest(quant_type="FP4", double_quant=True, compute_dtype="float32")
    placement = resolve_placement("cpu", asked, default)
    assert (placement.quant_type, placement.double_quant, placement.dtype) == (
        "fp4",
        True,
        "float32",
    )


def test_4bit_settings_do_not_split_full_precision_bases() -> None:
    """Without 4 bit the 4-bit settings mean nothing, so they never make another resident base."""
    a = resolve_placement("cpu", QuantizationRequest(load_in_4bit=False), QuantizationDefault())
    b = resolve_placement(
        "cpu",
        QuantizationRequest(load_in_4bit=False, quant_type="nf4", double_quant=True),
        QuantizationDefault(),
    )
    assert a == b
