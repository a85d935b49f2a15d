"""Builds the broken, foreign and escaping model and adapter folders that the bad-input tests
throw at the sidecar, each from the tiny models of tiny_models.py."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tests.tiny_models import build_foreign_adapters

WEIGHTS = "adapter_model.safetensors"


def _adapter_copy(tiny: dict[str, str], out: Path) -> Path:
    return Path(shutil.copytree(tiny["adapter"], out))


def _broken_adapters(tiny: dict[str, str], root: Path) -> dict[str, str]:
    made: dict[str, Path] = {}
    made["adapter_file"] = root / "adapter.safetensors"
    made["adapter_file"].write_bytes(b"not a folder")

    made["no_config"] = _adapter_copy(tiny, root / "no_config")
    (made["no_config"] / "adapter_config.json").unlink()
    made["config_not_json"] = _adapter_copy(tiny, root / "config_not_json")
    (made["config_not_json"] / "adapter_config.json").write_text("{not json")
    made["config_not_peft"] = _adapter_copy(tiny, root / "config_not_peft")
    (made["config_not_peft"] / "adapter_config.json").write_text(json.dumps({"r": 8}))

    made["no_weights"] = _adapter_copy(tiny, root / "no_weights")
    (made["no_weights"] / WEIGHTS).unlink()
    made["truncated"] = _adapter_copy(tiny, root / "truncated")
    data = (made["truncated"] / WEIGHTS).read_bytes()
    (made["truncated"] / WEIGHTS).write_bytes(data[: len(data) // 2])
    made["corrupt"] = _adapter_copy(tiny, root / "corrupt")
    noise = random.Random(0).randbytes(len(data))
    (made["corrupt"] / WEIGHTS).write_bytes(noise)
    made["empty_weights"] = _adapter_copy(tiny, root / "empty_weights")
    (made["empty_weights"] / WEIGHTS).write_bytes(b"")
    made["pickle_only"] = _adapter_copy(tiny, root / "pickle_only")
    (made["pickle_only"] / WEIGHTS).rename(made["pickle_only"] / "adapter_model.bin")
    return {name: str(path) for name, path in made.items()}


def build_remote_code_model(model_dir: str, out: Path) -> tuple[Path, Path]:
    """A copy of the tiny model whose config maps it to code shipped beside it (``auto_map``,
    an unknown ``model_type``); that code leaves a marker file when it runs. Returns the folder
    and the marker's path."""
    folder = Path(shutil.copytree(model_dir, out))
    marker = out.parent / f"{out.name}.ran"
    (folder / "golem_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class GolemConfig(LlamaConfig):\n    model_type = 'golem_custom'\n\n"
        "class GolemModel(LlamaForCausalLM):\n    config_class = GolemConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "golem_custom"
    config["auto_map"] = {
        "AutoConfig": "golem_custom.GolemConfig",
        "AutoModelForCausalLM": "golem_custom.GolemModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def _broken_models(tiny: dict[str, str], root: Path) -> dict[str, str]:
    remote, marker = build_remote_code_model(tiny["model"], root / "model_remote_code")
    pickled = root / "model_pickle_only"
    pickled.mkdir()
    for item in Path(tiny["model"]).iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, pickled / item.name)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    bad_config = Path(shutil.copytree(tiny["model"], root / "model_bad_config"))
    (bad_config / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    truncated = Path(shutil.copytree(tiny["model"], root / "model_truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {
        "model_remote_code": str(remote),
        "remote_code_marker": str(marker),
        "model_pickle_only": str(pickled),
        "model_bad_config": str(bad_config),
        "model_truncated": str(truncated),
    }


def _confined(tiny: dict[str, str], root: Path) -> dict[str, str]:
    """Roots for a confined sidecar, a good model and adapter inside them, and ways out."""
    models, adapters = root / "roots" / "models", root / "roots" / "adapters"
    model = Path(shutil.copytree(tiny["model"], models / "model"))
    adapter = _adapter_copy(tiny, adapters / "adapter")
    outside_adapter = _adapter_copy(tiny, root / "outside_adapter")
    (adapters / "escape").symlink_to(tiny["adapter_b"], target_is_directory=True)
    (models / "escape").symlink_to(tiny["model"], target_is_directory=True)
    # A folder inside the roots whose weights file leads out of them.
    leaky = _adapter_copy(tiny, adapters / "leaky_weights")
    (leaky / WEIGHTS).unlink()
    (leaky / WEIGHTS).symlink_to(outside_adapter / WEIGHTS)
    return {
        "model_root": str(models),
        "adapter_root": str(adapters),
        "confined_model": str(model),
        "confined_adapter": str(adapter),
        "adapter_dotdot": f"{adapters}/../../outside_adapter",
        "adapter_symlink": str(adapters / "escape"),
        "adapter_leaky_weights": str(leaky),
        "adapter_outside_missing": str(root / "no" / "such" / "adapter"),
        "model_dotdot": f"{models}/../../../{Path(tiny['model']).parent.name}/model",
        "model_symlink": str(models / "escape"),
    }


def build_bad_inputs(tiny: dict[str, str], root: Path) -> dict[str, str]:
    """Every bad path by name, plus the folders of a confined sidecar (see _confined)."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        **_broken_adapters(tiny, root),
        **build_foreign_adapters(root / "foreign"),
        **_broken_models(tiny, root),
        **_confined(tiny, root),
    }
