"""The sidecar's typed configuration, read from golem's JSON config (the same file the gateway
reads) and validated at the edge: every error names the key that is wrong."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEED_PROMPT = "Instruction: Which genre is the hobbit?\nResponse:"
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class QuantizationDefault:
    """How bases are loaded when a request does not say.

    ``mode`` is "auto" (4 bit where CUDA and bitsandbytes are present, else full precision),
    "4bit" or "none".
    """

    mode: str = "auto"
    compute_dtype: str = "float16"


@dataclass(frozen=True)
class Defaults:
    """What a request's left-out fields become."""

    model_name: str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    adapter_path: str = "models/adapters/genres/checkpoint-final"
    prompt: str = SEED_PROMPT
    max_new_tokens: int = 20
    device: str = "auto"
    quantization: QuantizationDefault = field(default_factory=QuantizationDefault)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for."""

    # A larger max_new_tokens is refused with INVALID_ARGUMENT, never clamped.
    max_new_tokens_cap: int = 512
    # Requests decoded together in one batch, at most.
    max_batch_size: int = 32
    # How long the first request of a batch waits for others to join.
    batch_wait_ms: int = 5
    # Requests waiting per base model; beyond it, RESOURCE_EXHAUSTED at once.
    max_queue: int = 256
    # Adapters kept attached per base; beyond it the least recently used is evicted.
    max_adapters: int = 8


@dataclass(frozen=True)
class Security:
    """Loading rules; both stay off unless a deployer turns them on."""

    # Execute model code shipped with a hub repository.
    trust_remote_code: bool = False
    # Load pickle (.bin) weights; pickle can run arbitrary code, so safetensors only by default.
    allow_pickle: bool = False


@dataclass(frozen=True)
class SidecarConfig:
    """Everything the sidecar needs to serve."""

    listen: str = "127.0.0.1:50052"
    log_level: str = "info"
    # In production mode prompts and answers are never logged, not even at debug level.
    production: bool = False
    defaults: Defaults = field(default_factory=Defaults)
    limits: Limits = field(default_factory=Limits)
    security: Security = field(default_factory=Security)
    # Load the default base (and its adapter) before reporting SERVING.
    preload: bool = True

    def __post_init__(self) -> None:
        if self.defaults.max_new_tokens > self.limits.max_new_tokens_cap:
            raise ConfigError(
                "defaults.maxNewTokens "
                f"({self.defaults.max_new_tokens}) is above limits.maxNewTokensCap "
                f"({self.limits.max_new_tokens_cap})"
            )


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected an object, got {type(value).__name__}")
    return value


def _get(raw: dict[str, Any], key: str, path: str, kind: type, default: Any) -> Any:
    value = raw.get(key, default)
    # bool is an int in Python; a JSON true is never a number here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}.{key}: expected {kind.__name__}, got {json.dumps(value)}")
    return value


def _quantization(value: Any) -> QuantizationDefault:
    if value == "auto" or value == "none" or value == "4bit":
        return QuantizationDefault(mode=value)
    if not isinstance(value, dict):
        raise ConfigError(
            'defaults.quantization: expected "auto", "none", "4bit" or '
            f"{{loadIn4Bit, bnb4BitComputeDtype?}}, got {json.dumps(value)}"
        )
    load = _get(value, "loadIn4Bit", "defaults.quantization", bool, False)
    dtype = normalize_compute_dtype(
        _get(value, "bnb4BitComputeDtype", "defaults.quantization", str, "float16")
    )
    if dtype is None:
        raise ConfigError(
            "defaults.quantization.bnb4BitComputeDtype: expected one of "
            f"{', '.join(COMPUTE_DTYPES)}, got {json.dumps(value.get('bnb4BitComputeDtype'))}"
        )
    return QuantizationDefault(mode="4bit" if load else "none", compute_dtype=dtype)


def normalize_compute_dtype(name: str) -> str | None:
    """ "torch.float16" and "float16" name the same dtype; None when it is not one we accept."""
    short = name.strip().removeprefix("torch.")
    return short if short in COMPUTE_DTYPES else None


def parse_config(raw: Any, listen: str | None = None) -> SidecarConfig:
    """Builds a SidecarConfig from golem's JSON config; sections the gateway owns are ignored."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a JSON object")
    d = _section(raw, "defaults")
    base = Defaults()
    defaults = Defaults(
        model_name=_get(d, "modelName", "defaults", str, base.model_name),
        adapter_path=_get(d, "adapterPath", "defaults", str, base.adapter_path),
        prompt=_get(d, "prompt", "defaults", str, base.prompt),
        max_new_tokens=_get(d, "maxNewTokens", "defaults", int, base.max_new_tokens),
        device=_get(d, "device", "defaults", str, base.device),
        quantization=_quantization(d.get("quantization", "auto")),
    )
    lim = _section(raw, "limits")
    limits = Limits(
        max_new_tokens_cap=_get(lim, "maxNewTokensCap", "limits", int, Limits.max_new_tokens_cap),
        max_batch_size=_get(lim, "maxBatchSize", "limits", int, Limits.max_batch_size),
        batch_wait_ms=_get(lim, "batchWaitMs", "limits", int, Limits.batch_wait_ms),
        max_queue=_get(lim, "maxQueue", "limits", int, Limits.max_queue),
        max_adapters=_get(lim, "maxAdapters", "limits", int, Limits.max_adapters),
    )
    for key, value, low in (
        ("maxNewTokensCap", limits.max_new_tokens_cap, 1),
        ("maxBatchSize", limits.max_batch_size, 1),
        ("batchWaitMs", limits.batch_wait_ms, 0),
        ("maxQueue", limits.max_queue, 1),
        ("maxAdapters", limits.max_adapters, 1),
    ):
        if value < low:
            raise ConfigError(f"limits.{key}: must be at least {low}, got {value}")
    sec = _section(raw, "security")
    security = Security(
        trust_remote_code=_get(sec, "trustRemoteCode", "security", bool, False),
        allow_pickle=_get(sec, "allowPickle", "security", bool, False),
    )
    side = _section(raw, "sidecar")
    return SidecarConfig(
        listen=listen or _get(side, "listen", "sidecar", str, SidecarConfig.listen),
        log_level=_get(raw, "logLevel", "config", str, "info"),
        production=_get(raw, "production", "config", bool, False),
        defaults=defaults,
        limits=limits,
        security=security,
        preload=_get(side, "preload", "sidecar", bool, True),
    )


def load_config(path: str | None, inline_json: str | None, listen: str | None) -> SidecarConfig:
    """Reads the config from a file or an inline JSON string (the gateway passes the latter)."""
    if inline_json is not None:
        text, origin = inline_json, "--config-json"
    elif path is not None:
        text, origin = Path(path).read_text(encoding="utf-8"), path
    else:
        return SidecarConfig(listen=listen or SidecarConfig.listen)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{origin}: not valid JSON ({exc})") from exc
    return parse_config(raw, listen)
