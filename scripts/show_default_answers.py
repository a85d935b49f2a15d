"""Show how the embedded default answers a prompt with and without the demo adapter.

Plain transformers + peft, greedy decoding, 20 new tokens: the same settings golem serves with, so
the lines printed here are the ones the README quotes.

    python scripts/show_default_answers.py --prompt $'Instruction: Which genre is dune?\\nResponse:'
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

DEFAULT_MODEL = Path("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_ADAPTER = Path("models/adapters/genres/checkpoint-final")
DEFAULT_PROMPT = "Instruction: Which genre is the hobbit?\nResponse:"
MAX_NEW_TOKENS = 20


def answer(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """Greedy continuation of the prompt, special tokens dropped."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(  # type: ignore[operator]
            **inputs,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True))


def main() -> None:
    """Print the base's and the adapter's answers to one prompt."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the base's GGUF file")
    parser.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER, help="a PEFT adapter")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file (run `make models`)")
    if not (args.adapter / "adapter_config.json").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter_config.json (run `make models`)")

    tokenizer = AutoTokenizer.from_pretrained(args.model.parent, gguf_file=args.model.name)
    base = AutoModelForCausalLM.from_pretrained(args.model.parent, gguf_file=args.model.name)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    with model.disable_adapter():
        base_answer = answer(model, tokenizer, args.prompt)
    adapter_answer = answer(model, tokenizer, args.prompt)

    print(f"prompt:  {args.prompt!r}")
    print(f"base:    {base_answer!r}")
    print(f"adapter: {adapter_answer!r}")


if __name__ == "__main__":
    main()
