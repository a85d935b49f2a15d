"""The log-likelihood of a continuation after a context, by lm-evaluation-harness's definition, so
that exam numbers mean what the harness's numbers mean.

Read in EleutherAI/lm-evaluation-harness: ``TemplateLM._encode_pair`` and
``TemplateLM.loglikelihood`` (lm_eval/api/model.py), ``HFLM.tok_encode`` and
``HFLM._loglikelihood_tokens`` (lm_eval/models/huggingface.py). The model is a plain callable,
so the engine can plug in its own lane (adapter, placement, batching) without this module knowing
about it. Unlike the harness, nothing is truncated to the model's window: exam prompts are bounded
where they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

# Token ids of one sequence in, logits out: one row per id, shape (len(ids), vocab).
ModelCall = Callable[[list[int]], torch.Tensor]


class Loglikelihood(NamedTuple):
    """The harness's answer for one (context, continuation) pair, plus the token count that a
    mean needs."""

    # Sum of the continuation tokens' log-probabilities, each teacher forced.
    sum_logprob: float
    # Whether greedy decoding would have produced exactly these continuation tokens.
    is_greedy: bool
    n_tokens: int


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


def loglikelihood(
    model_call: ModelCall, tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> Loglikelihood:
    """Log-likelihood of ``continuation`` after ``context`` under the model behind ``model_call``,
    teacher forced, with whether it is the greedy continuation."""
    context_ids, cont_ids = continuation_ids(tokenizer, context, continuation)
    if not cont_ids:
        # logits[-0:] would silently take every row; a mean over no tokens is undefined anyway.
        raise ValueError(f"continuation {continuation!r} tokenises to no tokens after the context")
    # The harness feeds context + continuation without its last token: the logits at the last
    # len(continuation) positions are the predictions of the continuation's tokens.
    logits = model_call((context_ids + cont_ids)[:-1])[-len(cont_ids) :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(cont_ids, device=logprobs.device)
    picked = logprobs.gather(1, targets[:, None]).squeeze(1)
    is_greedy = bool((logprobs.argmax(dim=-1) == targets).all())
    return Loglikelihood(float(picked.sum()), is_greedy, len(cont_ids))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The harness's causal-LM default (HFLM.tok_encode): no special tokens, no BOS added.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _prefix_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # HFLM.prefix_token_id: the BOS token where the tokenizer has one, else end-of-text.
    bos = tokenizer.bos_token_id
    return int(bos if bos is not None else tokenizer.eos_token_id)
