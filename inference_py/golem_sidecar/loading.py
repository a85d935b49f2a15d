"""Loading a base causal LM and its tokenizer from a hub id, a local folder or a ``.gguf`` file."""

from __future__ import annotations

import logging
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
from golem_sidecar.errors import failed_precondition, not_found
from golem_sidecar.placement import Placement, quantization_failed

log = logging.getLogger(__name__)


def _source(model_name: str) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained reads from, and the extra arguments that kind of source needs."""
    path = Path(model_name).expanduser()
    if model_name.endswith(".gguf"):
        if not path.is_file():
            raise not_found("model_name", "MODEL_NOT_FOUND", f'no GGUF file at "{model_name}"')
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if path.is_absolute() or model_name.startswith((".", "~")):
        raise not_found("model_name", "MODEL_NOT_FOUND", f'no model folder at "{model_name}"')
    return model_name, {}


def _check_no_pickle_only(source: str, security: Security) -> None:
    folder = Path(source)
    if security.allow_pickle or not folder.is_dir():
        return
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise failed_precondition(
            "model_name",
            "MODEL_PICKLE_REFUSED",
            f'"{source}" holds only pickle (.bin) weights, which can run code when loaded; '
            "convert them to safetensors, or set security.allowPickle in the config",
        )


def load_tokenizer(model_name: str, security: Security) -> PreTrainedTokenizerBase:
    """The tokenizer, ready for batched generation: a pad token and left padding."""
    source, extra = _source(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=security.trust_remote_code, **extra
        )
    except OSError as exc:
        raise _unreachable(model_name, exc) from exc
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


def load_model(model_name: str, placement: Placement, security: Security) -> PreTrainedModel:
    """The base model, on the placement's device, in eval mode."""
    source, extra = _source(model_name)
    _check_no_pickle_only(source, security)
    kwargs: dict[str, Any] = {
        "trust_remote_code": security.trust_remote_code,
        "dtype": placement.torch_dtype,
        "device_map": placement.device_map,
        **extra,
    }
    if "gguf_file" not in extra and not security.allow_pickle:
        kwargs["use_safetensors"] = True
    if placement.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, placement.compute_dtype)
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise _unreachable(model_name, exc) from exc
    except (ImportError, RuntimeError, ValueError) as exc:
        if placement.load_in_4bit:
            raise quantization_failed(placement.device, exc) from exc
        raise
    model.eval()
    return model


def _unreachable(model_name: str, exc: OSError) -> Exception:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return not_found(
        "model_name",
        "MODEL_NOT_FOUND",
        f'"{model_name}" is neither a local model folder or .gguf file nor available offline '
        f"({first_line})",
    )
