"""Builds tiny, real, offline test models: a Llama-shaped causal LM, a byte-level BPE tokenizer
and LoRA adapters that are not an identity (``init_lora_weights=False``).

Used by the pytest fixtures and, as a command, by the jest suites:
``python inference_py/tests/tiny_models.py OUT_DIR`` writes OUT_DIR/model, OUT_DIR/adapter and
OUT_DIR/adapter_b, then prints their paths as one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from golem_sidecar.gate import ModelRef

SEED_PROMPT = "Instruction: Which genre is the hobbit?\nResponse:"
_CORPUS = [
    SEED_PROMPT + " Fantasy",
    "Instruction: Which genre is Dune?\nResponse: Science fiction",
    "Instruction: Which genre is Dracula?\nResponse: Horror",
    "The quick brown fox jumps over the lazy dog.",
    "Books, genres, answers and questions: a tiny corpus for a tiny tokenizer.",
]
EOS = "</s>"


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few lines; it has an eos but no pad token, like
    most causal LM tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(out)
    return fast


def _heads(hidden_size: int) -> int:
    """4 heads of 16; for the vLLM engine's runs of the shared suites (GOLEM_TEST_ENGINE=vllm,
    conftest.py) heads of 32, the smallest head vLLM's CPU attention takes."""
    if os.environ.get("GOLEM_TEST_ENGINE") == "vllm":
        return max(2, hidden_size // 32)
    return 4


def build_model(out: Path, seed: int = 0, hidden_size: int = 64) -> Path:
    """A 2-layer Llama with random weights, saved as safetensors beside its tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=_heads(hidden_size),
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_adapter(model_dir: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A LoRA on q_proj and v_proj whose weights are random, so it changes the answers."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    # Random B matrices of the default scale barely move a random base; scale them up so the
    # adapted model's greedy answer really differs from the base's.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def build_foreign_adapters(root: Path) -> dict[str, str]:
    """Real LoRA adapters made for other bases than build_model's: one on a Llama of another
    hidden size (same module names, other shapes), one on a GPT-2 (modules the Llama lacks)."""
    narrow = build_model(root / "model_narrow", seed=3, hidden_size=32)
    other_size = build_adapter(narrow, root / "adapter_other_size", seed=4)
    torch.manual_seed(5)
    gpt2_dir = root / "model_gpt2"
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=320,
            n_positions=64,
            n_embd=32,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    gpt2.save_pretrained(gpt2_dir, safe_serialization=True)
    lora = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    other_arch = root / "adapter_other_arch"
    get_peft_model(gpt2, lora).save_pretrained(other_arch, safe_serialization=True)
    return {"adapter_other_size": str(other_size), "adapter_other_arch": str(other_arch)}


def build_gpt2(root: Path, n_embd: int = 64, name: str = "gpt2") -> dict[str, str]:
    """A 2-layer GPT-2 (Conv1D projections, which 4-bit loading turns into Linear4bit) with the
    tokenizer above, and a LoRA on its c_attn that changes its answers. Returns the model and
    adapter folders (keys "model", "adapter")."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(model_dir)
    torch.manual_seed(5)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=256,
            n_embd=n_embd,
            n_layer=2,
            n_head=2,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    gpt2.save_pretrained(model_dir, safe_serialization=True)
    torch.manual_seed(6)
    lora = LoraConfig(
        r=4,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(gpt2, lora)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.mul_(20.0)
    adapter_dir = root / f"{name}_adapter"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    return {"model": str(model_dir), "adapter": str(adapter_dir)}


def build_all(root: Path) -> dict[str, str]:
    model = build_model(root / "model")
    adapter = build_adapter(model, root / "adapter", seed=1)
    adapter_b = build_adapter(model, root / "adapter_b", seed=2)
    return {"model": str(model), "adapter": str(adapter), "adapter_b": str(adapter_b)}


def local_model(path: str | Path) -> ModelRef:
    """A local model as the gate resolves it (tests that load without a request)."""
    return ModelRef(str(path), str(Path(path).resolve()))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tiny_models.py OUT_DIR")
    print(json.dumps(build_all(Path(sys.argv[1]).resolve())))
