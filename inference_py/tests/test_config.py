import json
from pathlib import Path

import pytest

from golem_sidecar.config import ConfigError, load_config, parse_config

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
