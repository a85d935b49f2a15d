"""Loading a base causal LM and its tokenizer from a hub id, a local folder or a ``.gguf`` file."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from golem_sidecar.config import Security
from golem_sidecar.errors import GolemError, failed_precondition, not_found
from golem_sidecar.gate import ModelRef
from golem_sidecar.paths import kind
from golem_sidecar.placement import Placement, fused_cpu_kernel, quantization_failed

log = logging.getLogger(__name__)
_4BIT_FAILURES = (ImportError, RuntimeError, ValueError)
# Out of memory is the machine's state, not the model's fault: it propagates as it is.
_NOT_THE_MODEL = (MemoryError, torch.cuda.OutOfMemoryError)


def _source(model: ModelRef) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained reads from, and the extra arguments that kind of source needs. The
    model was resolved and checked by the gate (gate.resolve_model): its key is read, never the
    caller's text again."""
    if model.key.endswith(".gguf"):
        path = Path(model.key)
        return str(path.parent), {"gguf_file": path.name}
    return model.key, {}


def check_no_pickle_only(source: str, security: Security) -> None:
    folder = Path(source)
    if security.allow_pickle or kind(folder) != "dir":
        return
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise failed_precondition(
            "model_name",
            "MODEL_PICKLE_REFUSED",
            f'"{source}" holds only pickle (.bin) weights, which can run code when loaded; '
            "convert them to safetensors, or set security.allowPickle in the config",
        )


def load_tokenizer(model: ModelRef, security: Security) -> PreTrainedTokenizerBase:
    """The tokenizer, ready for batched generation: a pad token and left padding."""
    source, extra = _source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=security.trust_remote_code, **extra
        )
    except Exception as exc:
        refusal = load_refusal(model.name, exc, None)
        if refusal is None:
            raise
        raise refusal from exc
    if "gguf_file" in extra:
        _fill_special_tokens_from_gguf(tokenizer, Path(source) / extra["gguf_file"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding keeps every prompt's last token next to its first generated one.
    tokenizer.padding_side = "left"
    return tokenizer


def _fill_special_tokens_from_gguf(tokenizer: PreTrainedTokenizerBase, gguf_path: Path) -> None:
    """Some transformers releases return a GGUF tokenizer without eos/bos/pad; the file's
    ``tokenizer.ggml.*_token_id`` metadata says which they are."""
    wanted = {
        "eos_token": "tokenizer.ggml.eos_token_id",
        "bos_token": "tokenizer.ggml.bos_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    missing = {attr: key for attr, key in wanted.items() if getattr(tokenizer, attr) is None}
    if not missing:
        return
    from gguf import GGUFReader  # only needed on this rare path

    fields = GGUFReader(str(gguf_path)).fields
    for attr, key in missing.items():
        if key in fields:
            token_id = int(fields[key].contents())
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
            log.info("took %s (id %d) from %s metadata", attr, token_id, gguf_path.name)


def load_model(model: ModelRef, placement: Placement, security: Security) -> PreTrainedModel:
    """The base model, on the placement's device, in eval mode."""
    source, extra = _source(model)
    check_no_pickle_only(source, security)
    kwargs: dict[str, Any] = {
        "trust_remote_code": security.trust_remote_code,
        "dtype": placement.torch_dtype,
        "device_map": placement.device_map,
    }
    if "gguf_file" not in extra and not security.allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        if not placement.load_in_4bit:
            loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs, **extra)
        elif "gguf_file" in extra:
            with _dequantized_gguf(source, extra, security) as folder:
                loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs, **_4bit(placement))
        else:
            loaded = AutoModelForCausalLM.from_pretrained(source, **kwargs, **_4bit(placement))
    except Exception as exc:
        refusal = load_refusal(model.name, exc, placement)
        if refusal is None:
            raise
        raise refusal from exc
    if placement.load_in_4bit and placement.device == "cpu" and fused_cpu_kernel():
        _check_fused_kernel_shapes(loaded, placement)
    loaded.eval()
    return loaded


def _4bit(placement: Placement) -> dict[str, Any]:
    """The seed script's BitsAndBytesConfig, with the placement's type and double quantization."""
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=getattr(torch, placement.compute_dtype),
            bnb_4bit_quant_type=placement.quant_type,
            bnb_4bit_use_double_quant=placement.double_quant,
        )
    }


@contextmanager
def _dequantized_gguf(source: str, extra: dict[str, Any], security: Security) -> Iterator[str]:
    """A .gguf base for 4-bit loading: transformers refuses to combine gguf_file with a
    quantization config, so the file is dequantized to float32 (as for a full-precision load),
    saved as safetensors in a private temporary folder, and quantized from there by
    bitsandbytes. The folder is removed once the 4-bit model is loaded. This costs load time
    (the save and the quantizing load: about 1.5 s for SmolLM2-135M on 2 cores) and float32's
    memory while it runs; answers are those of the same weights saved as safetensors and loaded
    with plain transformers."""
    folder = tempfile.mkdtemp(prefix="golem-gguf-")
    try:
        save_dequantized_gguf(source, extra, security, Path(folder))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_dequantized_gguf(
    source: str, extra: dict[str, Any], security: Security, folder: Path
) -> None:
    """Saves a .gguf base's weights, dequantized to float32, as safetensors in ``folder``: for
    4-bit loading here, and for the vLLM engine, whose GGUF loader takes no LoRA."""
    full: Any = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, trust_remote_code=security.trust_remote_code, **extra
    )
    # transformers marks a model read from GGUF as quantized by "gguf"; it holds plain float32
    # tensors now, and save_pretrained must not record a quantization.
    full.hf_quantizer = None
    if hasattr(full.config, "quantization_config"):
        del full.config.quantization_config
    full.save_pretrained(str(folder), safe_serialization=True)


def _check_fused_kernel_shapes(model: PreTrainedModel, placement: Placement) -> None:
    """bitsandbytes' fused CPU kernel (see placement.fused_cpu_kernel) repacks each 4-bit weight in
    blocks of 32 output rows and one scale per quantization block of a row, so it fails at the
    first forward pass on a layer whose sizes are not multiples of those. Refused at load, with
    the layer named, instead of failing every generation."""
    from bitsandbytes.nn import Linear4bit

    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        state: Any = getattr(module.weight, "quant_state", None)
        out_features, in_features = state.shape
        if out_features % 32 or in_features % state.blocksize:
            raise quantization_failed(
                placement.device,
                f"layer {name} is {in_features} -> {out_features}, and bitsandbytes' fused "
                "AVX512-BF16 kernel on this CPU needs inputs in multiples of "
                f"{state.blocksize} and outputs in multiples of 32",
            )


def memory_footprint_bytes(*models: Any) -> int:
    """Bytes held by resident models' tensors now: parameters and buffers (attached adapters'
    included) and bitsandbytes' 4-bit scales, which live outside both. Each storage counts once
    (tied weights, and a base's weights that its peft wrappers share). Unlike transformers'
    get_memory_footprint it sees the 4-bit scales and the fused CPU kernel's repacking after the
    first forward pass."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()

    tensors = [t for model in models for t in (*model.parameters(), *model.buffers())]
    for tensor in tensors:
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            add(state.absmax)
            add(state.code)
            state = getattr(state, "state2", None)
    return total


def load_refusal(model_name: str, exc: Exception, placement: Placement | None) -> GolemError | None:
    """What a failed from_pretrained means to the caller; None for running out of memory, which
    propagates as it is (the servicer answers RESOURCE_EXHAUSTED)."""
    if isinstance(exc, OSError):
        return _unreachable(model_name, exc)
    refused = _remote_code_refused(model_name, exc)
    if refused is not None:
        return refused
    if isinstance(exc, _NOT_THE_MODEL):
        return None
    if placement is not None and placement.load_in_4bit and isinstance(exc, _4BIT_FAILURES):
        return quantization_failed(placement.device, exc)
    # MODEL_INVALID (FAILED_PRECONDITION): the files are there but are no loadable causal LM.
    # from_pretrained says so in many types (ValueError, KeyError, SafetensorError,
    # huggingface_hub's config validation errors, ...), so every other failure means this.
    return failed_precondition(
        "model_name",
        "MODEL_INVALID",
        f'"{model_name}" could not be loaded as a causal language model: '
        f"{type(exc).__name__}: {_first_line(exc)}",
    )


def _remote_code_refused(model_name: str, exc: Exception) -> GolemError | None:
    """MODEL_REMOTE_CODE_REFUSED (FAILED_PRECONDITION): the model's config maps it to code shipped
    with the model (``auto_map``) and security.trustRemoteCode is off, so transformers refused
    to run it. None when ``exc`` is some other failure."""
    if not isinstance(exc, ValueError) or "trust_remote_code" not in str(exc):
        return None
    return failed_precondition(
        "model_name",
        "MODEL_REMOTE_CODE_REFUSED",
        f'"{model_name}" needs code shipped with the model to load, which is never run unless '
        "security.trustRemoteCode is set in the config",
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unreachable(model_name: str, exc: OSError) -> GolemError:
    first_line = _first_line(exc)
    return not_found(
        "model_name",
        "MODEL_NOT_FOUND",
        f'"{model_name}" is neither a local model folder or .gguf file nor available offline '
        f"({first_line})",
    )
