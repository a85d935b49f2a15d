"""Train golem's demo adapter: a small LoRA that teaches the default base to name a book's genre.

Runs on two CPU cores in about a minute and a half and is deterministic: the same data and seed
give the same adapter. The result lands in Trainer's checkpoint layout, OUTPUT/checkpoint-final/,
written to a temporary folder first and renamed into place, so an interrupted run leaves nothing
half-made.

    python scripts/train_demo_adapter.py --model models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data data/genres.jsonl --output models/adapters/genres/
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from golem_sidecar.config import Security
from golem_sidecar.gate import resolve_model
from golem_sidecar.loading import load_model, load_tokenizer
from golem_sidecar.placement import Placement

IGNORE_INDEX = -100
CHECKPOINT_NAME = "checkpoint-final"


@dataclass(frozen=True)
class TrainConfig:
    """What the run does; the defaults are the ones the demo adapter is made with."""

    model: Path
    """The base model's GGUF file."""
    data: Path
    """JSON lines with `instruction` and `response` fields."""
    output: Path
    """Folder that receives `checkpoint-final/`."""
    epochs: int = 6
    """Passes over the data."""
    batch_size: int = 8
    """Examples per optimizer step."""
    learning_rate: float = 2e-3
    """AdamW learning rate, decayed linearly to zero."""
    rank: int = 8
    """LoRA rank."""
    seed: int = 1234
    """Seeds the shuffling and the LoRA initialisation."""


def log(message: str) -> None:
    """Print progress to stderr."""
    print(f"train_demo_adapter: {message}", file=sys.stderr, flush=True)


def prompt_for(instruction: str) -> str:
    """The prompt format the adapter learns; golem's exams ask in the same words."""
    return f"Instruction: {instruction}\nResponse:"


def load_base(model_file: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF base (dequantized to float32) and its tokenizer, loaded exactly as the sidecar
    loads them, eos and pad included."""
    security = Security()
    # Resolved by the sidecar's own gate, as a request naming this file would be.
    base = resolve_model("model", str(model_file), security, is_resident=lambda key: False)
    tokenizer = load_tokenizer(base, security)
    model = load_model(base, Placement("cpu", "float32", load_in_4bit=False), security)
    return model, tokenizer


def read_examples(path: Path) -> list[tuple[str, str]]:
    """Read (instruction, response) pairs from a JSON-lines file."""
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("instruction") or not row.get("response"):
            raise SystemExit(f"{path}:{number}: needs non-empty 'instruction' and 'response'")
        examples.append((row["instruction"], row["response"]))
    if not examples:
        raise SystemExit(f"{path}: no examples")
    return examples


def encode(
    tokenizer: PreTrainedTokenizerBase, instruction: str, response: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels for `prompt + " " + response + eos`, the loss on the response only.

    The prompt is tokenized on its own, exactly as it is at inference, and the answer appended.
    """
    prompt_ids = tokenizer(prompt_for(instruction))["input_ids"]
    answer_ids = tokenizer(f" {response}", add_special_tokens=False)["input_ids"]
    answer_ids = [*answer_ids, tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(targets)] = torch.tensor(targets)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train(config: TrainConfig) -> Path:
    """Train the adapter and return the finished checkpoint folder."""
    torch.manual_seed(config.seed)  # the LoRA initialisation
    torch.use_deterministic_algorithms(True)

    started = time.monotonic()
    log(f"loading {config.model}")
    base, tokenizer = load_base(config.model)
    encoded = [encode(tokenizer, i, r) for i, r in read_examples(config.data)]
    log(f"loaded in {time.monotonic() - started:.1f}s; {len(encoded)} examples")

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=2 * config.rank,
        lora_dropout=0.0,
        # Every attention and MLP projection. A pattern, not a list: peft stores a list as a set,
        # whose order in adapter_config.json would change from run to run.
        target_modules=r".*\.(q|k|v|o|gate|up|down)_proj",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    # Record the base as the user named it, not the folder transformers loaded it from.
    model.peft_config["default"].base_model_name_or_path = str(config.model)

    steps_per_epoch = -(-len(encoded) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    shuffler = random.Random(config.seed)

    history: list[dict[str, float]] = []
    model.train()
    step = 0
    for epoch in range(config.epochs):
        order = list(range(len(encoded)))
        shuffler.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = collate(
                [encoded[i] for i in order[start : start + config.batch_size]],
                tokenizer.pad_token_id,
            )
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            history.append({"step": step, "epoch": epoch + 1, "loss": round(loss.item(), 6)})
        epoch_losses = [entry["loss"] for entry in history if entry["epoch"] == epoch + 1]
        log(
            f"epoch {epoch + 1}/{config.epochs}: mean loss "
            f"{sum(epoch_losses) / len(epoch_losses):.4f} "
            f"({time.monotonic() - started:.0f}s)"
        )

    checkpoint = save_atomically(model, config, history)
    log(f"wrote {checkpoint} in {time.monotonic() - started:.0f}s")
    return checkpoint


def save_atomically(model: PeftModel, config: TrainConfig, history: list[dict[str, float]]) -> Path:
    """Write the checkpoint into a temporary folder beside its destination, then rename it in."""
    config.output.mkdir(parents=True, exist_ok=True)
    final = config.output / CHECKPOINT_NAME
    staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}.", dir=config.output))
    try:
        # The embeddings are frozen; saying so spares peft a look for the base's config.json.
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        # peft also writes an unfilled model card template; the checkpoint does without it.
        (staging / "README.md").unlink(missing_ok=True)
        state = {
            "global_step": len(history),
            "num_train_epochs": config.epochs,
            "train_batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "log_history": history,
        }
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        # mkdtemp makes the folder private and the weights come out private too; others read them.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def main() -> None:
    """Parse the command line and train."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the base model's GGUF file")
    parser.add_argument("--data", type=Path, required=True, help="instruction/response JSONL")
    parser.add_argument("--output", type=Path, required=True, help="receives checkpoint-final/")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    args = parser.parse_args()
    for option, path in (("--model", args.model), ("--data", args.data)):
        if not path.is_file():
            parser.error(f"{option} {path}: no such file")
    train(TrainConfig(args.model, args.data, args.output, epochs=args.epochs, seed=args.seed))


if __name__ == "__main__":
    main()
