"""The sidecar's typed configuration, read from golem's JSON config (the same file the gateway
reads) and validated at the edge: every error names the key that is wrong."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SEED_PROMPT = "Instruction: Which genre is the hobbit?\nResponse:"
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
# bitsandbytes' 4-bit data types; the first is BitsAndBytesConfig's default, so the seed's.
QUANT_TYPES = ("fp4", "nf4")
# The inference engines a base model can be served by; the first is the default.
ENGINES = ("transformers", "vllm")
# vLLM refuses any other --max-lora-rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# "": vLLM chooses (processes on one host); "ray" is the one that spans hosts.
VLLM_EXECUTOR_BACKENDS = ("", "mp", "ray")


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
    # BitsAndBytesConfig's own defaults, which the seed script used: fp4, no double quantization.
    quant_type: str = "fp4"
    double_quant: bool = False


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
    # On CPU a decode step of 64 rows costs far less than two of 32 (the weights are read once
    # per step); maxBatchTokens still bounds the memory of a pass.
    max_batch_size: int = 64
    # How long the first request of a batch waits for others to join.
    # Latecomers join a running batch at its next step (continuous batching), so waiting for
    # company only delays a lone request.
    batch_wait_ms: int = 0
    # Requests waiting per base model; beyond it, RESOURCE_EXHAUSTED at once.
    max_queue: int = 256
    # Adapters kept attached per base; beyond it the least recently used is evicted.
    max_adapters: int = 8
    # Bases kept resident; beyond it the least recently used is dropped.
    max_models: int = 2
    # Padded tokens one forward pass may hold (rows x longest row): batches, comparisons and
    # scoring are split to stay under it, so no request's size sets the memory peak.
    max_batch_tokens: int = 65_536
    # On SIGTERM/SIGINT, calls in flight get this long to finish before they are ended with
    # UNAVAILABLE (reason SHUTTING_DOWN).
    shutdown_grace_ms: int = 10_000
    # Largest request or response message; a bigger request is refused with RESOURCE_EXHAUSTED
    # by gRPC itself, before any of it is parsed.
    max_message_bytes: int = 1_048_576


@dataclass(frozen=True)
class Security:
    """Loading rules; the permissive ones stay off unless a deployer turns them on."""

    # Execute model code shipped with a hub repository.
    trust_remote_code: bool = False
    # Load pickle (.bin) weights; pickle can run arbitrary code, so safetensors only by default.
    allow_pickle: bool = False
    # Absolute folders an adapter_path must resolve into (symlinks followed); empty: anywhere.
    adapter_roots: tuple[Path, ...] = ()
    # The same for local model paths; hub ids are not paths and are unaffected.
    model_roots: tuple[Path, ...] = ()
    # The same for GradeExam's exam, header and resume files.
    exam_roots: tuple[Path, ...] = ()
    # Off: HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set before the libraries are imported, so
    # only files already on disk (or in the hub cache) are ever loaded.
    allow_hub_downloads: bool = False


@dataclass(frozen=True)
class Tracing:
    """Where the sidecar's spans go; both empty (the default): tracing is off and no
    instrumentation is installed."""

    # An OTLP/gRPC collector as a URL: http://HOST:4317 (plaintext) or https://... (TLS).
    otlp_endpoint: str = ""
    # A debug exporter: each finished span appended here as one JSON object per line (the SDK's
    # ConsoleSpanExporter), to look at traces without a collector.
    spans_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint or self.spans_file)


@dataclass(frozen=True)
class TlsKeyPair:
    """The PEM server certificate chain and private key, read once when the config is loaded."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)


@dataclass(frozen=True)
class Link:
    """How a gateway on another host reaches this sidecar (``sidecar.*`` keys of its config)."""

    # From sidecar.tlsCertFile and sidecar.tlsKeyFile; None: plaintext.
    tls: TlsKeyPair | None = None
    # The environment variable holding the token every ExamService call must carry; unset or
    # empty there: no token is asked. Health and reflection stay open either way.
    auth_token_env: str = "GOLEM_SIDECAR_TOKEN"
    # Plaintext on an address beyond loopback; off, such an address needs TLS.
    allow_insecure: bool = False


@dataclass(frozen=True)
class EngineChoice:
    """Which engine serves each base model (``engines.*`` keys)."""

    # The engine of a base that ``models`` does not name.
    default: str = "transformers"
    # (model name as configured, engine), in the config's order.
    models: tuple[tuple[str, str], ...] = ()

    def engine_for(self, name: str, key: str) -> str:
        """The engine of the base a request wrote as ``name`` and the gate resolved to ``key``
        (a local path resolved, a hub id as written). A configured name matches by its text, or
        by the path it resolves to, so ``./models/x.gguf`` and ``models/x.gguf`` are one model;
        an exact text match wins over a path match."""
        for configured, engine in self.models:
            if configured in (name, key):
                return engine
        for configured, engine in self.models:
            if _resolved_text(configured) == key:
                return engine
        return self.default

    @property
    def uses_vllm(self) -> bool:
        """Whether any base may be served by vLLM, so whether it must be importable."""
        return self.default == "vllm" or any(engine == "vllm" for _, engine in self.models)


def _resolved_text(name: str) -> str | None:
    # Resolved at each call, from the sidecar's working directory and ~ expanded, as the gate
    # resolves a request's model_name.
    try:
        return str(Path(name).expanduser().resolve())
    except (OSError, RuntimeError, ValueError):
        return None


@dataclass(frozen=True)
class VllmSettings:
    """How the vLLM engine is started (``vllm.*`` keys); unused while no base is served by it."""

    # The KV cache on CPU, in whole GiB (VLLM_CPU_KVCACHE_SPACE, which vLLM reads with int()).
    kv_cache_gib: int = 1
    # The share of each GPU's memory vLLM may take (CUDA only).
    gpu_memory_utilization: float = 0.9
    # The largest LoRA rank an adapter may have. vLLM sizes its adapter slots by it, and on CPU
    # every step pays for the whole slot: with the demo adapter (r=8) on 2 cores, 8 gives 186
    # tokens/s, 16 (vLLM's own default, and this one) 143, 64 only 34 (docs/engines.md).
    max_lora_rank: int = 16
    # Context length; 0: the model's own.
    max_model_len: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # "", "mp" or "ray" (see VLLM_EXECUTOR_BACKENDS).
    distributed_executor_backend: str = ""


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
    tracing: Tracing = field(default_factory=Tracing)
    # Load the default base (and its adapter) before reporting SERVING.
    preload: bool = True
    link: Link = field(default_factory=Link)
    engines: EngineChoice = field(default_factory=EngineChoice)
    vllm: VllmSettings = field(default_factory=VllmSettings)

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


def _roots(raw: dict[str, Any], key: str) -> tuple[Path, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(
            f"security.{key}: expected a list of folder paths, got {json.dumps(value)}"
        )
    # Resolved once, from the sidecar's working directory, so later checks compare real paths.
    return tuple(Path(v).expanduser().resolve() for v in value)


def _within(limits: Limits, key: str, attr: str, minimum: int, maximum: int = 2**31 - 1) -> None:
    # gRPC takes its sizes as 32-bit ints; the same bound keeps every limit sane.
    value = getattr(limits, attr)
    if not minimum <= value <= maximum:
        raise ConfigError(f"limits.{key}: must be between {minimum} and {maximum}, got {value}")


def _quantization(value: Any) -> QuantizationDefault:
    if value == "auto" or value == "none" or value == "4bit":
        return QuantizationDefault(mode=value)
    if not isinstance(value, dict):
        raise ConfigError(
            'defaults.quantization: expected "auto", "none", "4bit" or '
            "{loadIn4Bit, bnb4BitComputeDtype?, bnb4BitQuantType?, bnb4BitUseDoubleQuant?}, "
            f"got {json.dumps(value)}"
        )
    where = "defaults.quantization"
    _refuse_unknown(value, where, _QUANTIZATION_KEYS)
    base = QuantizationDefault()
    load = _get(value, "loadIn4Bit", where, bool, False)
    dtype = normalize_compute_dtype(_get(value, "bnb4BitComputeDtype", where, str, "float16"))
    if dtype is None:
        raise ConfigError(
            f"{where}.bnb4BitComputeDtype: expected one of "
            f"{', '.join(COMPUTE_DTYPES)}, got {json.dumps(value.get('bnb4BitComputeDtype'))}"
        )
    quant_type = normalize_quant_type(_get(value, "bnb4BitQuantType", where, str, base.quant_type))
    if quant_type is None:
        raise ConfigError(
            f"{where}.bnb4BitQuantType: expected one of {', '.join(QUANT_TYPES)}, "
            f"got {json.dumps(value.get('bnb4BitQuantType'))}"
        )
    return QuantizationDefault(
        mode="4bit" if load else "none",
        compute_dtype=dtype,
        quant_type=quant_type,
        double_quant=_get(value, "bnb4BitUseDoubleQuant", where, bool, base.double_quant),
    )


_QUANTIZATION_KEYS = (
    "loadIn4Bit",
    "bnb4BitComputeDtype",
    "bnb4BitQuantType",
    "bnb4BitUseDoubleQuant",
)


def _refuse_unknown(section: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    # Only for sections the sidecar reads whole; shared ones hold the gateway's keys as well.
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; use {', '.join(known)}")


def _engine(value: Any, where: str) -> str:
    if value not in ENGINES:
        raise ConfigError(f'{where}: must be "transformers" or "vllm", got {json.dumps(value)}')
    return str(value)


def _engines(raw: dict[str, Any]) -> EngineChoice:
    section = _section(raw, "engines")
    _refuse_unknown(section, "engines", ("default", "models"))
    models = section.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(
            f"engines.models: expected an object of model name to engine, got {json.dumps(models)}"
        )
    pairs = []
    for name, engine in models.items():
        where = f"engines.models[{json.dumps(name)}]"
        if not name.strip():
            raise ConfigError(f"{where}: model name must not be blank")
        pairs.append((name, _engine(engine, where)))
    default = _engine(section.get("default", EngineChoice.default), "engines.default")
    return EngineChoice(default=default, models=tuple(pairs))


_VLLM_KEYS = (
    "kvCacheGiB",
    "gpuMemoryUtilization",
    "maxLoraRank",
    "maxModelLen",
    "tensorParallelSize",
    "pipelineParallelSize",
    "distributedExecutorBackend",
)


def _vllm(raw: dict[str, Any]) -> VllmSettings:
    section = _section(raw, "vllm")
    _refuse_unknown(section, "vllm", _VLLM_KEYS)
    base = VllmSettings()
    kv_cache = _at_least(section, "kvCacheGiB", 1, base.kv_cache_gib)
    share = _number(section, "gpuMemoryUtilization", base.gpu_memory_utilization)
    if not 0 < share <= 1:
        raise ConfigError(
            f"vllm.gpuMemoryUtilization: must be above 0 and at most 1, got {json.dumps(share)}"
        )
    rank = _get(section, "maxLoraRank", "vllm", int, base.max_lora_rank)
    if rank not in VLLM_LORA_RANKS:
        raise ConfigError(
            f"vllm.maxLoraRank: must be one of {', '.join(map(str, VLLM_LORA_RANKS))}, got {rank}"
        )
    backend = _get(section, "distributedExecutorBackend", "vllm", str, "")
    if backend not in VLLM_EXECUTOR_BACKENDS:
        raise ConfigError(
            f'vllm.distributedExecutorBackend: must be "", "mp" or "ray", got {json.dumps(backend)}'
        )
    return VllmSettings(
        kv_cache_gib=kv_cache,
        gpu_memory_utilization=share,
        max_lora_rank=rank,
        max_model_len=_at_least(section, "maxModelLen", 0, base.max_model_len),
        tensor_parallel_size=_at_least(section, "tensorParallelSize", 1, 1),
        pipeline_parallel_size=_at_least(section, "pipelineParallelSize", 1, 1),
        distributed_executor_backend=backend,
    )


def _number(section: dict[str, Any], key: str, default: float) -> float:
    value = section.get(key, default)
    # Python's json reads NaN and Infinity, which JSON.parse (the gateway) refuses.
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ConfigError(f"vllm.{key}: expected a number, got {json.dumps(value)}")
    return value


def _at_least(section: dict[str, Any], key: str, minimum: int, default: int) -> int:
    value: int = _get(section, key, "vllm", int, default)
    if value < minimum:
        raise ConfigError(f"vllm.{key}: must be at least {minimum}, got {value}")
    return value


def _tracing(raw: dict[str, Any]) -> Tracing:
    section = _section(raw, "tracing")
    endpoint = _get(section, "otlpEndpoint", "tracing", str, "").strip()
    # The exporter would take "host:4317" too, but silently guess plaintext or TLS: make it say.
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(
            "tracing.otlpEndpoint: expected a URL such as http://127.0.0.1:4317 "
            f"(http: plaintext, https: TLS), got {json.dumps(endpoint)}"
        )
    spans_file = _get(section, "sidecarSpansFile", "tracing", str, "")
    return Tracing(otlp_endpoint=endpoint, spans_file=spans_file)


def normalize_compute_dtype(name: str) -> str | None:
    """ "torch.float16" and "float16" name the same dtype; None when it is not one we accept."""
    short = name.strip().removeprefix("torch.")
    return short if short in COMPUTE_DTYPES else None


def normalize_quant_type(name: str) -> str | None:
    """ "nf4" or "fp4" (any case); None when it is neither."""
    short = name.strip().lower()
    return short if short in QUANT_TYPES else None


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
        max_models=_get(lim, "maxModels", "limits", int, Limits.max_models),
        max_batch_tokens=_get(lim, "maxBatchTokens", "limits", int, Limits.max_batch_tokens),
        shutdown_grace_ms=_get(lim, "shutdownGraceMs", "limits", int, Limits.shutdown_grace_ms),
        max_message_bytes=_get(lim, "maxMessageBytes", "limits", int, Limits.max_message_bytes),
    )
    _within(limits, "maxNewTokensCap", "max_new_tokens_cap", 1)
    _within(limits, "maxBatchSize", "max_batch_size", 1)
    _within(limits, "batchWaitMs", "batch_wait_ms", 0)
    _within(limits, "maxQueue", "max_queue", 1)
    _within(limits, "maxAdapters", "max_adapters", 1)
    _within(limits, "maxModels", "max_models", 1)
    _within(limits, "maxBatchTokens", "max_batch_tokens", 256)
    _within(limits, "shutdownGraceMs", "shutdown_grace_ms", 0)
    # Below this even an ordinary answer or error status would not fit.
    _within(limits, "maxMessageBytes", "max_message_bytes", 4096)
    sec = _section(raw, "security")
    security = Security(
        trust_remote_code=_get(sec, "trustRemoteCode", "security", bool, False),
        allow_pickle=_get(sec, "allowPickle", "security", bool, False),
        adapter_roots=_roots(sec, "adapterRoots"),
        model_roots=_roots(sec, "modelRoots"),
        exam_roots=_roots(sec, "examRoots"),
        allow_hub_downloads=_get(sec, "allowHubDownloads", "security", bool, False),
    )
    side = _section(raw, "sidecar")
    listen = listen or _get(side, "listen", "sidecar", str, SidecarConfig.listen)
    return SidecarConfig(
        listen=listen,
        log_level=_get(raw, "logLevel", "config", str, "info"),
        production=_get(raw, "production", "config", bool, False),
        defaults=defaults,
        limits=limits,
        security=security,
        tracing=_tracing(raw),
        preload=_get(side, "preload", "sidecar", bool, True),
        link=_link(side, listen),
        engines=_engines(raw),
        vllm=_vllm(raw),
    )


def _link(side: dict[str, Any], listen: str) -> Link:
    cert = _get(side, "tlsCertFile", "sidecar", str, "")
    key = _get(side, "tlsKeyFile", "sidecar", str, "")
    if bool(cert) != bool(key):
        missing, given = ("tlsKeyFile", "tlsCertFile") if cert else ("tlsCertFile", "tlsKeyFile")
        raise ConfigError(
            f"sidecar.{missing}: must be set together with sidecar.{given} (TLS needs both)"
        )
    allow_insecure = _get(side, "allowInsecure", "sidecar", bool, False)
    # Plaintext beyond loopback would carry the token and every prompt in the clear.
    if not cert and not allow_insecure and not is_loopback(listen):
        raise ConfigError(
            f"sidecar.tlsCertFile: listening beyond loopback ({listen}) needs TLS: set "
            "sidecar.tlsCertFile and sidecar.tlsKeyFile, or sidecar.allowInsecure: true "
            "to serve plaintext"
        )
    token_env = _get(side, "authTokenEnv", "sidecar", str, Link.auth_token_env).strip()
    if not token_env:
        raise ConfigError("sidecar.authTokenEnv: must name an environment variable")
    tls = None
    if cert:
        tls = TlsKeyPair(_read_pem(cert, "tlsCertFile"), _read_pem(key, "tlsKeyFile"))
    return Link(tls=tls, auth_token_env=token_env, allow_insecure=allow_insecure)


def _read_pem(path: str, key: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"sidecar.{key}: cannot read {path}: {exc.strerror}") from None


def load_config(path: str | None, inline_json: str | None, listen: str | None) -> SidecarConfig:
    """Reads the config from a file or an inline JSON string (the gateway passes the latter)."""
    if inline_json is not None:
        text, origin = inline_json, "--config-json"
    elif path is not None:
        text, origin = Path(path).read_text(encoding="utf-8"), path
    else:
        # No file: every default, still checked (a bare --listen beyond loopback needs TLS).
        return parse_config({}, listen)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{origin}: not valid JSON ({exc})") from exc
    return parse_config(raw, listen)


def is_loopback(listen: str) -> bool:
    """Whether only this machine can reach ``listen`` (HOST:PORT, [V6]:PORT or unix:PATH)."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rpartition(":")[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to anything: treat it as reachable.
        return False


def confined_beyond_loopback(config: SidecarConfig) -> SidecarConfig:
    """A sidecar reachable from other machines with no roots set would let any caller make it
    read any folder, so there adapters and models default to ./models and exams to
    ./data/exams."""
    sec = config.security
    if is_loopback(config.listen) or sec.adapter_roots or sec.model_roots or sec.exam_roots:
        return config
    models, exams = Path("models").resolve(), Path("data/exams").resolve()
    log.warning(
        "listening beyond loopback with no security.adapterRoots, modelRoots or examRoots: "
        "confining all three",
        extra={"listen": config.listen, "root": str(models), "exam_root": str(exams)},
    )
    security = replace(sec, adapter_roots=(models,), model_roots=(models,), exam_roots=(exams,))
    return replace(config, security=security)
