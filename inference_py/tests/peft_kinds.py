"""Builds one real adapter of every PEFT type golem serves (and two it refuses) for the tiny
Llama of tiny_models.py, offline. Every served adapter's weights are random and large enough
that it changes the base's greedy answers, so a test that mixes them up would notice.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import LlamaForCausalLM

_TARGETS = ["q_proj", "v_proj"]


def _served() -> dict[str, PeftConfig]:
    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS, init_lora_weights=False),
        "dora": LoraConfig(
            r=4, lora_alpha=8, target_modules=_TARGETS, use_dora=True, init_lora_weights=False
        ),
        "rslora": LoraConfig(
            r=4, lora_alpha=8, target_modules=_TARGETS, use_rslora=True, init_lora_weights=False
        ),
        "ia3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=_TARGETS, init_weights=False),
        "lokr": LoKrConfig(r=4, alpha=8, target_modules=_TARGETS, init_weights=False),
        "adalora": AdaLoraConfig(
            init_r=4, target_r=4, target_modules=_TARGETS, total_step=10, init_lora_weights=False
        ),
    }


SERVED_KINDS = tuple(_served())


def _perturb(model: torch.nn.Module, kind: str, seed: int) -> None:
    """Random adapter weights, scaled so the adapter really changes the answers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default" not in name:
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if kind == "ia3":
                # IA3 scales activations: a vector of ones is the identity.
                param.copy_(1.0 + noise)
            elif "magnitude" in name:
                # DoRA's magnitudes: keep them positive and near the weights' norms.
                param.mul_(1.0 + 0.5 * noise.abs())
            else:
                param.copy_(noise * 0.5)


def build_kind(model_dir: Path, out: Path, kind: str, seed: int) -> Path:
    """One adapter of a served kind, saved as safetensors."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, _served()[kind])
    _perturb(peft_model, kind, seed)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def build_prompt_learning(model_dir: Path, root: Path) -> dict[str, str]:
    """A prefix-tuning and a prompt-tuning adapter: types golem refuses by name."""
    configs = {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    paths = {}
    for kind, config in configs.items():
        base = LlamaForCausalLM.from_pretrained(model_dir)
        out = root / f"adapter_{kind}"
        get_peft_model(base, config).save_pretrained(out, safe_serialization=True)
        paths[kind] = str(out)
    return paths


def build_kinds(model_dir: Path, root: Path) -> dict[str, str]:
    """Every served kind, by kind name ("lora", "dora", ...)."""
    return {
        kind: str(build_kind(model_dir, root / f"adapter_{kind}", kind, seed=10 + i))
        for i, kind in enumerate(SERVED_KINDS)
    }
