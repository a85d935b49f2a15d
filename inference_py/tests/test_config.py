import importlib.util
import json
import re
from pathlib import Path

import pytest

from golem_sidecar.config import (
    ConfigError,
    EngineChoice,
    VllmSettings,
    load_config,
    parse_config,
)
from tests.engine_configs import FULL, GGUF, REFUSED

REPO_CONFIGS = ["config/golem.json", "config/seed.json"]


@pytest.mark.parametrize("name", REPO_CONFIGS)
def test_shipped_configs_parse(name: str) -> None:
    from tests.conftest import REPO

    config = load_config(str(REPO / name), None, None)
    assert config.defaults.max_new_tokens == 20
    assert config.security.allow_pickle is False
    assert config.security.trust_remote_code is False
    assert config.tracing.enabled is False


def test_seed_profile_restores_the_seed_defaults() -> None:
    from tests.conftest import REPO

    config = load_config(str(REPO / "config/seed.json"), None, None)
    # The seed's settings on a local base (no hub here): 4-bit, float16 compute, auto, 20 tokens.
    assert config.defaults.model_name == "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert config.defaults.adapter_path == "models/adapters/genres/checkpoint-final"
    q = config.defaults.quantization
    assert (q.mode, q.compute_dtype, q.quant_type, q.double_quant) == (
        "4bit",
        "float16",
        "fp4",
        False,
    )
    assert (config.defaults.device, config.defaults.max_new_tokens) == ("auto", 20)


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"defaults": {"maxNewTokens": "20"}}, "defaults.maxNewTokens"),
        ({"defaults": {"maxNewTokens": True}}, "defaults.maxNewTokens"),
        ({"defaults": []}, "defaults"),
        ({"defaults": {"quantization": "8bit"}}, "defaults.quantization"),
        (
            {"defaults": {"quantization": {"loadIn4Bit": True, "bnb4BitComputeDtype": "int8"}}},
            "defaults.quantization.bnb4BitComputeDtype",
        ),
        (
            {"defaults": {"quantization": {"loadIn4Bit": True, "bnb4BitQuantType": "nf8"}}},
            "defaults.quantization.bnb4BitQuantType",
        ),
        (
            {"defaults": {"quantization": {"loadIn4Bit": True, "bnb4BitUseDoubleQuant": "yes"}}},
            "defaults.quantization.bnb4BitUseDoubleQuant",
        ),
        (
            {"defaults": {"quantization": {"loadIn4bit": True}}},
            "defaults.quantization.loadIn4bit",
        ),
        ({"limits": {"maxNewTokensCap": 0}}, "limits.maxNewTokensCap"),
        ({"defaults": {"maxNewTokens": 99}, "limits": {"maxNewTokensCap": 10}}, "maxNewTokensCap"),
        ({"security": {"allowPickle": "yes"}}, "security.allowPickle"),
        ({"tracing": {"otlpEndpoint": "collector:4317"}}, "tracing.otlpEndpoint"),
        ({"tracing": {"sidecarSpansFile": 1}}, "tracing.sidecarSpansFile"),
        ({"tracing": "on"}, "tracing"),
    ],
)
def test_bad_values_name_the_key(raw: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse_config(raw)


def test_tracing_takes_an_otlp_url_and_a_spans_file() -> None:
    raw = {"tracing": {"otlpEndpoint": " http://127.0.0.1:4317 ", "sidecarSpansFile": "s.jsonl"}}
    tracing = parse_config(raw).tracing
    assert (tracing.otlp_endpoint, tracing.spans_file) == ("http://127.0.0.1:4317", "s.jsonl")
    assert tracing.enabled
    assert parse_config({"tracing": {"sidecarSpansFile": "s.jsonl"}}).tracing.enabled


def test_inline_json_that_is_not_json_is_refused() -> None:
    with pytest.raises(ConfigError, match="--config-json"):
        load_config(None, "{not json", None)


def test_listen_flag_wins_over_config() -> None:
    raw = json.dumps({"sidecar": {"listen": "127.0.0.1:1"}})
    assert load_config(None, raw, "unix:/tmp/x.sock").listen == "unix:/tmp/x.sock"


def test_torch_prefixed_dtype_is_accepted() -> None:
    raw = {
        "defaults": {"quantization": {"loadIn4Bit": True, "bnb4BitComputeDtype": "torch.bfloat16"}}
    }
    assert parse_config(raw).defaults.quantization.compute_dtype == "bfloat16"


def test_4bit_object_takes_quant_type_and_double_quant() -> None:
    raw = {
        "defaults": {
            "quantization": {
                "loadIn4Bit": True,
                "bnb4BitQuantType": "nf4",
                "bnb4BitUseDoubleQuant": True,
            }
        }
    }
    q = parse_config(raw).defaults.quantization
    assert (q.mode, q.compute_dtype, q.quant_type, q.double_quant) == (
        "4bit",
        "float16",
        "nf4",
        True,
    )


def test_4bit_left_out_settings_are_bitsandbytes_defaults() -> None:
    q = parse_config({"defaults": {"quantization": "4bit"}}).defaults.quantization
    assert (q.quant_type, q.double_quant) == ("fp4", False)


@pytest.mark.parametrize(
    ("side", "names"),
    [
        ({"tlsCertFile": "cert.pem"}, "sidecar.tlsKeyFile"),
        ({"tlsKeyFile": "key.pem"}, "sidecar.tlsCertFile"),
        ({"authTokenEnv": " "}, "sidecar.authTokenEnv"),
        ({"allowInsecure": "yes"}, "sidecar.allowInsecure"),
    ],
)
def test_half_configured_link_names_the_key(side: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse_config({"sidecar": side})


@pytest.mark.parametrize("listen", ["0.0.0.0:50052", "10.200.0.2:50052", "gpu-host:50052"])
def test_plaintext_beyond_loopback_is_refused_unless_allowed(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"sidecar\.tlsCertFile: listening beyond loopback"):
        load_config(None, None, listen)
    allowed = parse_config({"sidecar": {"allowInsecure": True}}, listen)
    assert allowed.link.tls is None and allowed.link.allow_insecure


def test_tls_files_are_read_once_and_kept_out_of_repr(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"SECRET-KEY")
    side = {"tlsCertFile": str(tmp_path / "cert.pem"), "tlsKeyFile": str(tmp_path / "key.pem")}
    config = parse_config({"sidecar": side}, "0.0.0.0:50052")
    assert config.link.tls is not None
    assert (config.link.tls.cert_chain, config.link.tls.private_key) == (b"CERT", b"SECRET-KEY")
    assert "SECRET-KEY" not in repr(config)


def test_unreadable_tls_file_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    side = {"tlsCertFile": str(tmp_path / "cert.pem"), "tlsKeyFile": str(tmp_path / "gone.pem")}
    with pytest.raises(ConfigError, match=r"sidecar\.tlsKeyFile: cannot read .*gone\.pem"):
        parse_config({"sidecar": side})


def test_engines_and_vllm_default_to_transformers_and_vllms_own_settings() -> None:
    config = parse_config({})
    assert config.engines == EngineChoice(default="transformers", models=())
    assert not config.engines.uses_vllm
    assert config.vllm == VllmSettings(
        kv_cache_gib=1,
        gpu_memory_utilization=0.9,
        max_lora_rank=16,
        max_model_len=0,
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        distributed_executor_backend="",
    )


def test_engines_and_vllm_take_every_key() -> None:
    config = parse_config(FULL)
    assert config.engines == EngineChoice(
        default="vllm",
        models=((GGUF, "transformers"), ("HuggingFaceTB/SmolLM2-135M", "vllm")),
    )
    assert config.engines.uses_vllm
    assert config.vllm == VllmSettings(
        kv_cache_gib=2,
        gpu_memory_utilization=0.5,
        max_lora_rank=320,
        max_model_len=2048,
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        distributed_executor_backend="ray",
    )


def test_one_model_on_vllm_is_enough_to_need_it() -> None:
    assert parse_config({"engines": {"models": {GGUF: "vllm"}}}).engines.uses_vllm


@pytest.mark.parametrize(("raw", "message"), REFUSED)
def test_bad_engine_and_vllm_values_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(raw)


def test_vllm_numbers_refuse_what_json_parse_would(tmp_path: Path) -> None:
    # Python's json reads Infinity; the gateway's JSON.parse refuses it, so the sidecar must too.
    with pytest.raises(ConfigError, match=r"vllm\.kvCacheGiB: "):
        load_config(None, '{"vllm": {"kvCacheGiB": Infinity}}', None)


def test_engine_for_matches_the_name_as_written(tmp_path: Path) -> None:
    engines = EngineChoice(models=(("gguf/x.gguf", "vllm"),))
    assert engines.engine_for("gguf/x.gguf", str(tmp_path / "elsewhere.gguf")) == "vllm"


def test_engine_for_matches_a_local_path_however_it_is_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.gguf").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    key = str((tmp_path / "models" / "x.gguf").resolve())
    engines = parse_config({"engines": {"models": {"./models/x.gguf": "vllm"}}}).engines
    assert engines.engine_for("models/x.gguf", key) == "vllm"
    assert engines.engine_for(key, key) == "vllm"
    assert (
        engines.engine_for("models/y.gguf", str(tmp_path / "models" / "y.gguf")) == "transformers"
    )


def test_engine_for_expands_home_as_the_gate_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    engines = EngineChoice(models=(("~/x.gguf", "vllm"),))
    assert engines.engine_for(str(tmp_path / "x.gguf"), str((tmp_path / "x.gguf").resolve())) == (
        "vllm"
    )


def test_engine_for_matches_a_hub_id_by_its_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    hub = "HuggingFaceTB/SmolLM2-135M"
    engines = EngineChoice(models=((hub, "vllm"),))
    assert engines.engine_for(hub, hub) == "vllm"
    assert engines.engine_for("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M") == (
        "transformers"
    )


def test_engine_for_falls_back_to_the_default() -> None:
    engines = EngineChoice(default="vllm", models=(("a.gguf", "transformers"),))
    assert engines.engine_for("b.gguf", "/srv/b.gguf") == "vllm"
    assert engines.engine_for("a.gguf", "/srv/a.gguf") == "transformers"


def test_engine_for_prefers_the_exact_name_to_a_path_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    key = str(tmp_path / "x.gguf")
    engines = EngineChoice(models=(("./x.gguf", "transformers"), ("x.gguf", "vllm")))
    assert engines.engine_for("x.gguf", key) == "vllm"
    assert engines.engine_for("./x.gguf", key) == "transformers"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_an_engine_this_python_cannot_run_is_refused_at_start_naming_the_key() -> None:
    from golem_sidecar.environment import check_environment

    check_environment(EngineChoice())
    with pytest.raises(
        ConfigError, match=r"^engines\.default: \"vllm\" is not installed .*make vllm-env"
    ):
        check_environment(EngineChoice(default="vllm"))
    with pytest.raises(
        ConfigError, match=r'^engines\.models\["m\.gguf"\]: "vllm" is not installed'
    ):
        check_environment(EngineChoice(models=(("m.gguf", "vllm"),)))
