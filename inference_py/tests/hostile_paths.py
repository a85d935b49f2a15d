"""Paths that are not what they claim, for the gate's file checks: FIFOs where files belong (a
reader would block forever), and model folders whose files lead out of the roots."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def build_hostile_paths(tiny: dict[str, str], bad: dict[str, str], root: Path) -> dict[str, str]:
    fifo_config = Path(shutil.copytree(tiny["adapter"], root / "fifo_config"))
    (fifo_config / "adapter_config.json").unlink()
    os.mkfifo(fifo_config / "adapter_config.json")
    fifo_weights = Path(shutil.copytree(tiny["adapter"], root / "fifo_weights"))
    (fifo_weights / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo_weights / "adapter_model.safetensors")
    fifo_model = Path(shutil.copytree(tiny["model"], root / "fifo_model"))
    os.mkfifo(fifo_model / "tokenizer_config.extra")
    # Inside the confined sidecar's model root, leading out of it.
    models = Path(bad["model_root"])
    leaky = Path(shutil.copytree(tiny["model"], models / "leaky_weights"))
    (leaky / "model.safetensors").unlink()
    (leaky / "model.safetensors").symlink_to(Path(tiny["model"]) / "model.safetensors")
    indexed = Path(shutil.copytree(tiny["model"], models / "leaky_index"))
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../../../elsewhere.safetensors"}}
    (indexed / "model.safetensors.index.json").write_text(json.dumps(index))
    return {
        "adapter_fifo_config": str(fifo_config),
        "adapter_fifo_weights": str(fifo_weights),
        "model_fifo": str(fifo_model),
        "model_leaky_weights": str(leaky),
        "model_leaky_index": str(indexed),
    }
