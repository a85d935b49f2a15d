"""What a further adapter type costs on the embedded default (models.py keeps one peft wrapper
per type, each on a module tree that shares the base's weights).

Loads the default base in float32 through the sidecar's own ResidentModels, then attaches the
demo LoRA and one adapter of each other served type (built here with random weights on the same
target modules), printing RSS and the footprint ListAdapters reports after each step, as JSON lines.

Usage: .venv/bin/python scripts/measure_peft_types.py. Run it on an idle machine.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "inference_py"))

from peft import IA3Config, LoHaConfig, LoKrConfig, get_peft_model  # noqa: E402

from golem_sidecar.adapters import check_adapter_folder  # noqa: E402
from golem_sidecar.config import Security  # noqa: E402
from golem_sidecar.gate import ModelRef  # noqa: E402
from golem_sidecar.loading import load_model  # noqa: E402
from golem_sidecar.models import ResidentModels  # noqa: E402
from golem_sidecar.placement import Placement  # noqa: E402

GGUF = ROOT / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = ROOT / "models/adapters/genres/checkpoint-final"
CPU = Placement(device="cpu", dtype="float32", load_in_4bit=False)
TARGETS = ["q_proj", "v_proj"]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def build_others(ref: ModelRef, out: Path) -> dict[str, Path]:
    """IA3, LoHa and LoKr adapters for the default base, on the demo LoRA's modules (run in a
    child process, so the RSS measured here starts clean)."""
    configs = {
        "IA3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "LOHA": LoHaConfig(r=8, alpha=16, target_modules=TARGETS, init_weights=False),
        "LOKR": LoKrConfig(r=8, alpha=16, target_modules=TARGETS, init_weights=False),
    }
    paths = {}
    for kind, config in configs.items():
        model = get_peft_model(load_model(ref, CPU, Security()), config)
        model.peft_config["default"].base_model_name_or_path = GGUF.name
        model.save_pretrained(out / kind, safe_serialization=True)
        paths[kind] = out / kind
    return paths


def main() -> None:
    ref = ModelRef(str(GGUF), str(GGUF.resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            others = pool.apply(build_others, (ref, Path(tmp)))
        models = ResidentModels(Security())
        start = rss_mib()
        base, _ = models.base(ref, CPU)
        report = {
            "step": "base loaded (float32)",
            "rss_mib": round(rss_mib(), 1),
            "footprint_bytes": base.footprint_bytes(),
        }
        print(json.dumps({**report, "rss_before_mib": round(start, 1)}))
        for kind, path in [("LORA", LORA), *others.items()]:
            started = time.perf_counter()
            models.adapter(base, check_adapter_folder(str(path), allow_pickle=False))
            print(
                json.dumps(
                    {
                        "step": f"first {kind} adapter attached",
                        "rss_mib": round(rss_mib(), 1),
                        "footprint_bytes": base.footprint_bytes(),
                        "attach_ms": round((time.perf_counter() - started) * 1000),
                        "wrappers": sorted(base.wrappers),
                    }
                )
            )


if __name__ == "__main__":
    main()
