"""The log-likelihood of a continuation after a context, by lm-evaluation-harness's definition, so
that exam numbers mean what the harness's numbers mean.

Read in EleutherAI/lm-evaluation-harness: ``TemplateLM._encode_pair`` and
``TemplateLM.loglikelihood`` (lm_eval/api/model.py), ``HFLM.tok_encode`` and
``HFLM._loglikelihood_tokens`` (lm_eval/models/huggingface.py). The pairs become ScoreItems,
which scoring.py scores in batched, teacher-forced passes: the harness's sum and greedy flag.
Unlike the harness, nothing is truncated to the model's window: the engine checks each pair
against the model's context first.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from golem_sidecar.scoring import ScoreItem

# What the harness puts between a context and an answer it scores (a task's target_delimiter,
# " " by default): "Response:" and "Fantasy" are scored as "Response:" + " Fantasy".
TARGET_DELIMITER = " "


def continuation_for(answer: str) -> str:
    """An exam answer as the continuation scored after its prompt: the target delimiter
    first, unless the answer starts with whitespace of its own."""
    return answer if answer[:1].isspace() else TARGET_DELIMITER + answer


def continuation_ids(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """The context's tokens and the continuation's tokens, split as the harness splits them.

    Trailing whitespace of the context moves to the front of the continuation (BPE tokenizers
    attach a space to the word after it). The continuation's tokens are those of the whole string,
    tokenised together, after as many tokens as the context alone has; so a merge across the
    boundary is read as the model would see the joined text.
    """
    if context == "":
        # The harness scores an unconditioned continuation after a prefix token alone.
        return [_prefix_id(tokenizer)], _encode(tokenizer, continuation)
    stripped = context.rstrip()
    moved = context[len(stripped) :]
    context, continuation = stripped, moved + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def pair_item(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, adapter: str | None
) -> ScoreItem:
    """The (context, continuation) pair as an item that scoring.loglikelihoods scores under
    ``adapter`` (a peft name, None for the bare base): the harness feeds context plus
    continuation, and the continuation's tokens are the ones scored."""
    context_ids, cont_ids = continuation_ids(tokenizer, context, continuation)
    if not cont_ids:
        # A mean over no tokens is undefined, and the harness would score nothing.
        raise ValueError(f"continuation {continuation!r} tokenises to no tokens after the context")
    return ScoreItem(context_ids, cont_ids, adapter)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The harness's causal-LM default (HFLM.tok_encode): no special tokens, no BOS added.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _prefix_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # HFLM.prefix_token_id: the BOS token where the tokenizer has one, else end-of-text.
    bos = tokenizer.bos_token_id
    return int(bos if bos is not None else tokenizer.eos_token_id)
