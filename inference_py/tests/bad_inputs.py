"""Builds the broken and escaping model folders that the bad-input tests throw at the sidecar, from
the tiny models of tiny_models.py, and lays the adapters of bad_adapters.py and the exams of
bad_exams.py (both shared with the gateway's suite) inside a confined sidecar's roots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.bad_adapters import build_bad_adapters
from tests.bad_exams import build_bad_exams
from tests.tiny_models import build_gpt2


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
        # Layers of 32 inputs: bitsandbytes' fused AVX512-BF16 CPU kernel cannot compute them.
        "model_narrow_4bit": build_gpt2(root, n_embd=32, name="model_narrow_4bit")["model"],
    }


def _confined(tiny: dict[str, str], root: Path) -> dict[str, str]:
    """Roots for a confined sidecar with a good model and adapter inside them, every bad adapter of
    bad_adapters.py inside the adapter root too (escapes lead to ``root/outside``), every exam of
    bad_exams.py in its exam root (``exam_root``), and ways out for models."""
    models, adapters = root / "roots" / "models", root / "roots" / "adapters"
    model = Path(shutil.copytree(tiny["model"], models / "model"))
    bad_adapters = build_bad_adapters(tiny, adapters, root / "outside")
    adapter = Path(shutil.copytree(tiny["adapter"], adapters / "adapter"))
    (models / "escape").symlink_to(tiny["model"], target_is_directory=True)
    return {
        **bad_adapters,
        **build_bad_exams(root / "exam_files"),
        "model_root": str(models),
        "adapter_root": str(adapters),
        "confined_model": str(model),
        "confined_adapter": str(adapter),
        "model_dotdot": f"{models}/../../../{Path(tiny['model']).parent.name}/model",
        "model_symlink": str(models / "escape"),
    }


def build_bad_inputs(tiny: dict[str, str], root: Path) -> dict[str, str]:
    """Every bad path by name (the adapters' from bad_adapters.py), plus the folders of a confined
    sidecar (see _confined)."""
    root.mkdir(parents=True, exist_ok=True)
    return {**_broken_models(tiny, root), **_confined(tiny, root)}
