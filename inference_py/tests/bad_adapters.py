"""The broken, foreign and escaping adapter folders that both bad-input suites throw at golem, built
in one place from the tiny models of tiny_models.py. pytest imports build_bad_adapters; jest runs

    python -m tests.bad_adapters TINY_JSON INSIDE OUTSIDE     (from inference_py/)

and reads the JSON it prints: every case's path by name. INSIDE is a folder the daemon's adapter
roots hold; OUTSIDE is a folder beyond them."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

from tests.tiny_models import build_foreign_adapters, build_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _copy(source: str | Path, out: Path) -> Path:
    return Path(shutil.copytree(source, out))


def _broken_config(adapter: str, inside: Path) -> dict[str, Path]:
    made: dict[str, Path] = {}
    made["no_config"] = _copy(adapter, inside / "no_config")
    (made["no_config"] / CONFIG).unlink()
    made["config_not_json"] = _copy(adapter, inside / "config_not_json")
    (made["config_not_json"] / CONFIG).write_text("{not json")
    made["config_not_peft"] = _copy(adapter, inside / "config_not_peft")
    (made["config_not_peft"] / CONFIG).write_text(json.dumps({"r": 8}))
    # A LoRA config naming modules the Llama base lacks; its weights are the Llama's.
    made["missing_targets"] = _copy(adapter, inside / "missing_targets")
    config = json.loads((made["missing_targets"] / CONFIG).read_text())
    config["target_modules"] = ["c_attn"]
    (made["missing_targets"] / CONFIG).write_text(json.dumps(config))
    # A prompt-learning type, refused by its config alone (the weights are never read).
    made["prefix_tuning"] = _copy(adapter, inside / "prefix_tuning")
    (made["prefix_tuning"] / CONFIG).write_text(
        json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
    )
    return made


def _broken_weights(adapter: str, inside: Path) -> dict[str, Path]:
    made: dict[str, Path] = {}
    made["no_weights"] = _copy(adapter, inside / "no_weights")
    (made["no_weights"] / WEIGHTS).unlink()
    made["truncated"] = _copy(adapter, inside / "truncated")
    data = (made["truncated"] / WEIGHTS).read_bytes()
    (made["truncated"] / WEIGHTS).write_bytes(data[: len(data) // 2])
    made["corrupt"] = _copy(adapter, inside / "corrupt")
    (made["corrupt"] / WEIGHTS).write_bytes(random.Random(0).randbytes(len(data)))
    made["empty_weights"] = _copy(adapter, inside / "empty_weights")
    (made["empty_weights"] / WEIGHTS).write_bytes(b"")
    made["pickle_only"] = _copy(adapter, inside / "pickle_only")
    (made["pickle_only"] / WEIGHTS).rename(made["pickle_only"] / "adapter_model.bin")
    return made


def _escaping(adapter: str, inside: Path, outside: Path) -> dict[str, str]:
    """A good adapter beyond the roots, and ways from inside the roots to it."""
    beyond = _copy(adapter, outside / "adapter")
    (inside / "escape").symlink_to(beyond, target_is_directory=True)
    # A folder inside the roots whose weights file leads out of them.
    leaky = _copy(adapter, inside / "leaky_weights")
    (leaky / WEIGHTS).unlink()
    (leaky / WEIGHTS).symlink_to(beyond / WEIGHTS)
    return {
        "outside_adapter": str(beyond),
        "adapter_symlink": str(inside / "escape"),
        "adapter_dotdot": f"{inside}/{os.path.relpath(beyond, inside)}",
        "adapter_leaky_weights": str(leaky),
        "adapter_outside_missing": str(outside / "no" / "such" / "adapter"),
    }


def build_bad_adapters(tiny: dict[str, str], inside: Path, outside: Path) -> dict[str, str]:
    """Every bad adapter by name: broken ones, foreign ones (made for other bases) and a missing one
    under ``inside``; escapes from ``inside`` to ``outside``; and ``unloaded_model``, a base that
    no daemon has loaded yet (asking for it means loading it). It is wide (hidden size 1024, about
    80 MB) so that loading it takes far longer than the deadline case's 30 ms: the tiny base loads
    in under 20 ms from a warm page cache, and the case then saw an answer, not the deadline."""
    inside.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    adapter_file = inside / "adapter.safetensors"
    adapter_file.write_bytes(b"not a folder")
    made = {
        **_broken_config(tiny["adapter"], inside),
        **_broken_weights(tiny["adapter"], inside),
        "adapter_file": adapter_file,
        "adapter_missing": inside / "no_such_adapter",
        "unloaded_model": build_model(inside / "unloaded_model", hidden_size=1024),
    }
    return {
        **{name: str(path) for name, path in made.items()},
        **build_foreign_adapters(inside / "foreign"),
        **_escaping(tiny["adapter"], inside, outside),
    }


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit("usage: python -m tests.bad_adapters TINY_JSON INSIDE OUTSIDE")
    tiny = json.loads(argv[0])
    built = build_bad_adapters(tiny, Path(argv[1]).resolve(), Path(argv[2]).resolve())
    print(json.dumps(built))


if __name__ == "__main__":
    main(sys.argv[1:])
