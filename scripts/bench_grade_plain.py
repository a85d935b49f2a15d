"""What a user writes by hand to grade an exam with plain transformers + peft, for
scripts/bench_grade.py: padded ``generate`` batches for the answers, a padded teacher-forced
forward for the log-likelihood scorers. The text scorers are golem's own functions
(golem_sidecar.scorers), so only the model work differs from GradeExam; the log-likelihoods
(lm-evaluation-harness's split and sum) are written here, not taken from golem.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from golem_sidecar.placement import Placement
from golem_sidecar.scorers import SCORERS, Observed, Target

BASE = "__base__"  # GradeExam's label for the bare base
BATCH = 32


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    answers: tuple[str, ...]
    choices: tuple[str, ...]


def read_exam(exam: Path) -> tuple[list[Item], dict[str, Any]]:
    """The exam's items (prompts rendered with the header's template) and its header."""
    header = yaml.safe_load(exam.with_suffix(".yaml").read_text(encoding="utf-8"))
    items = []
    for line in exam.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answers = tuple(row.get("answers", [row.get("answer")]))
        prompt = row.get("prompt") or header["template"].format(question=row["question"])
        items.append(Item(row["id"], prompt, answers, tuple(row.get("choices", ()))))
    return items, header


def load_model(
    model: str, placement: Placement, adapters: Sequence[str]
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The base loaded as golem's default placement loads it, wearing every adapter (each
    under its path as peft name); tokenizer with pad = eos and left padding."""
    if placement.load_in_4bit:
        raise SystemExit("bench_grade: the plain side is full precision only (scripts/bench_quant)")
    path = Path(model)
    extra = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **extra)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=placement.torch_dtype, device_map=placement.device_map, **extra
    )
    peft_model = PeftModel.from_pretrained(base, adapters[0], adapter_name=adapters[0])
    for adapter in adapters[1:]:
        peft_model.load_adapter(adapter, adapter_name=adapter)
    return peft_model.eval(), tokenizer


def generate(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy answers in left-padded batches of BATCH, decoded without special tokens."""
    answers: list[str] = []
    for start in range(0, len(prompts), BATCH):
        batch = list(prompts[start : start + BATCH])
        inputs = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers


def harness_split(
    tokenizer: PreTrainedTokenizerBase, context: str, answer: str
) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair`` for context + " " + answer: trailing whitespace
    of the context moves to the answer, and the answer's tokens are those of the joined text
    after the context's own."""
    continuation = answer if answer[:1].isspace() else " " + answer
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer.encode(stripped + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(stripped, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


def summed_logprobs(
    model: Any, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> list[tuple[float, int]]:
    """Each (context, answer) pair's summed answer log-probability and token count, teacher
    forced, in right-padded batches of BATCH."""
    found: list[tuple[float, int]] = []
    for start in range(0, len(pairs), BATCH):
        splits = [harness_split(tokenizer, c, a) for c, a in pairs[start : start + BATCH]]
        width = max(len(c) + len(a) for c, a in splits)
        ids = torch.full((len(splits), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (c, a) in enumerate(splits):
            ids[row, : len(c) + len(a)] = torch.tensor(c + a)
            mask[row, : len(c) + len(a)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
            logprobs = torch.log_softmax(logits.logits.float(), dim=-1).cpu()
        for row, (c, a) in enumerate(splits):
            # The token at position t is predicted at t - 1.
            rows = logprobs[row, len(c) - 1 : len(c) + len(a) - 1]
            picked = rows.gather(-1, torch.tensor(a).unsqueeze(-1))
            found.append((float(picked.sum()), len(a)))
    return found


def _scores(
    item: Item, answer: str, logprob: dict[str, tuple[float, int]], scorers: Sequence[str]
) -> dict[str, float]:
    """Every scorer that applies: text scorers by golem's functions, the log-likelihood ones
    by hand (the likeliest answer's mean; the harness's acc, first choice winning a tie)."""
    target, scores = Target(item.answers, item.choices), {}
    for name in scorers:
        if name == "mean_logprob":
            scores[name] = max(logprob[a][0] / logprob[a][1] for a in item.answers)
        elif name == "choice_accuracy":
            if item.choices:
                chosen = max(item.choices, key=lambda choice: logprob[choice][0])
                scores[name] = float(chosen in item.answers)
        else:
            scores[name] = SCORERS[name].score(target, Observed(output=answer))
    return scores


def _continuations(item: Item) -> list[str]:
    return list(dict.fromkeys(item.answers + item.choices))


def wearing(model: Any, label: str) -> contextlib.AbstractContextManager[Any]:
    """The context in which ``model`` answers as ``label``: the base with the adapter off."""
    if label == BASE:
        return model.disable_adapter()
    model.set_adapter(label)
    return contextlib.nullcontext()


def grade(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    labels: Sequence[str],
    header: dict[str, Any],
) -> dict[tuple[str, str], tuple[str, dict[str, float]]]:
    """(item id, model label) -> (answer, scores), each model in turn: answers, then scores."""
    scorers = header["scorers"]
    max_new_tokens = header["generation"]["max_new_tokens"]
    pairs = [(item.prompt, c) for item in items for c in _continuations(item)]
    results = {}
    for label in labels:
        with wearing(model, label):
            answers = generate(model, tokenizer, [i.prompt for i in items], max_new_tokens)
            logprob = dict(zip(pairs, summed_logprobs(model, tokenizer, pairs), strict=True))
        for item, answer in zip(items, answers, strict=True):
            mine = {c: logprob[(item.prompt, c)] for c in _continuations(item)}
            results[(item.id, label)] = (answer, _scores(item, answer, mine, scorers))
    return results
