"""Where and how a base model is loaded: device, weight dtype and 4-bit quantization.

A placement is part of the resident-model key, so two requests that differ only in these load
two bases. 4-bit that cannot be honoured is refused; it never silently becomes full precision.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from golem_sidecar.config import (
    QUANT_TYPES,
    Defaults,
    QuantizationDefault,
    normalize_compute_dtype,
    normalize_quant_type,
)
from golem_sidecar.errors import GolemError, failed_precondition, invalid_argument

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class QuantizationRequest:
    """The request's quantization fields; None where the caller left them out."""

    load_in_4bit: bool | None = None
    compute_dtype: str | None = None
    quant_type: str | None = None
    double_quant: bool | None = None


@dataclass(frozen=True)
class Placement:
    """A resolved, loadable placement."""

    device: str
    dtype: str
    load_in_4bit: bool
    # Only meaningful with 4 bit; "" / False otherwise so equal placements compare equal.
    compute_dtype: str = ""
    quant_type: str = ""
    double_quant: bool = False

    @property
    def device_map(self) -> str:
        # "auto" lets accelerate spread a model over the visible GPUs, as the seed script did.
        return "auto" if self.device == "cuda" else self.device

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype


def resolve_device(requested: str) -> str:
    """ "auto" becomes cuda when a GPU is visible, else cpu; an unavailable device is refused."""
    name = requested.strip()
    if not _DEVICE.match(name):
        raise invalid_argument(
            "device", f'unknown device "{requested}"; use auto, cpu, cuda, cuda:N or mps'
        )
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise failed_precondition(
                "device",
                "DEVICE_UNAVAILABLE",
                f'"{name}" is not available: this machine has {count} CUDA device(s)',
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise failed_precondition("device", "DEVICE_UNAVAILABLE", '"mps" is not available here')
    return name


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _why_4bit_impossible() -> str | None:
    # bitsandbytes has CUDA, CPU and mps backends; what a backend cannot do (a layer shape the
    # fused CPU kernel does not take, a missing native library) is reported when loading.
    if not bitsandbytes_installed():
        return "4-bit loading needs bitsandbytes, which is not installed"
    return None


@functools.cache
def fused_cpu_kernel() -> bool:
    """Whether bitsandbytes computes 4-bit layers on this CPU with its fused AVX512-BF16 kernel.

    bitsandbytes 0.50 registers that kernel (backends/cpu/ops.py) when its native library loaded
    and the CPU has avx512_bf16; Linear4bit.forward then repacks the weights for it at the first
    forward pass in eval mode without gradients (how golem and plain generate() run), casts the
    input to bfloat16 and the output back: the products run in bfloat16 whatever compute dtype
    was asked for."""
    if not bitsandbytes_installed():
        return False
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    from bitsandbytes.functional import has_avx512bf16

    return not isinstance(lib, ErrorHandlerMockBNBNativeLibrary) and bool(has_avx512bf16())


def effective_compute_dtype(placement: Placement) -> str:
    """The dtype a 4-bit base's quantized layers really compute in; "" without 4 bit."""
    if not placement.load_in_4bit:
        return ""
    if placement.device == "cpu" and fused_cpu_kernel():
        return "bfloat16"
    return placement.compute_dtype


def _chosen(
    asked: str | None,
    default: str,
    normalize: Callable[[str], str | None],
    field: str,
    what: str,
    choices: str,
) -> str:
    """The request's value, normalized (INVALID_ARGUMENT naming ``field`` when it is none of
    ``choices``), or the config's default when the request left it out."""
    if asked is None:
        return default
    normalized = normalize(asked)
    if normalized is None:
        raise invalid_argument(field, f"unknown {what} {_shown(asked)}; use {choices}")
    return normalized


def resolve_placement(
    device_name: str, quant: QuantizationRequest, default: QuantizationDefault
) -> Placement:
    """Decides device, dtype and quantization for one request."""
    device = resolve_device(device_name)
    compute = _chosen(
        quant.compute_dtype,
        default.compute_dtype,
        normalize_compute_dtype,
        "quantization.bnb_4bit_compute_dtype",
        "dtype",
        "float16, bfloat16 or float32",
    )
    quant_type = _chosen(
        quant.quant_type,
        default.quant_type,
        normalize_quant_type,
        "quantization.bnb_4bit_quant_type",
        "4-bit type",
        " or ".join(QUANT_TYPES),
    )
    double_quant = default.double_quant if quant.double_quant is None else quant.double_quant
    if quant.load_in_4bit is not None:
        want_4bit = quant.load_in_4bit
    elif default.mode == "auto":
        want_4bit = device.startswith("cuda") and bitsandbytes_installed()
    else:
        want_4bit = default.mode == "4bit"
    if want_4bit:
        why = _why_4bit_impossible()
        if why is not None:
            raise _quantization_unavailable(why, device)
        return Placement(
            device=device,
            dtype=compute,
            load_in_4bit=True,
            compute_dtype=compute,
            quant_type=quant_type,
            double_quant=double_quant,
        )
    return Placement(device=device, dtype=_full_precision_dtype(device), load_in_4bit=False)


def _shown(value: str) -> str:
    # A caller's value, quoted and cut short: error messages travel in bounded trailers.
    return json.dumps(value if len(value) <= 40 else value[:40] + "...")


def default_placement(defaults: Defaults) -> Placement:
    """The placement of requests that name none (LoadAdapter, CompareAdapters, preloading)."""
    return resolve_placement(defaults.device, QuantizationRequest(), defaults.quantization)


def _quantization_unavailable(why: str, device: str) -> GolemError:
    return failed_precondition(
        "quantization.load_in_4bit",
        "QUANTIZATION_UNAVAILABLE",
        f"4-bit was asked for but cannot be done on {device}: {why}; "
        "ask for load_in_4bit=false to load in full precision",
    )


def quantization_failed(device: str, exc: Exception | str) -> GolemError:
    """bitsandbytes was present but loading in 4 bit failed (for example no CPU backend), or the
    loaded base has layers its kernel cannot compute."""
    why = exc if isinstance(exc, str) else f"bitsandbytes failed: {exc}"
    return _quantization_unavailable(why, device)


def _full_precision_dtype(device: str) -> str:
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    # CPU kernels for half precision are slow and lossy; float32 keeps answers faithful.
    return "float32"
