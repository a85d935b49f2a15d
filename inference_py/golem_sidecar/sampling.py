"""Choosing each row's next token from its logits: greedy, or seeded sampling with temperature,
top-k, top-p and a repetition penalty.

Every row carries its own settings and its own random generator, so a request's answer does not
depend on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Temperatures below this are greedy: dividing logits by less can overflow them to infinity.
TEMPERATURE_FLOOR = 1e-5


class NonFiniteScores(ValueError):
    """A row's scores became NaN or +inf; ``stage`` says whether the model produced them
    ("model") or this request's sampling settings did ("sampling")."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; the defaults are greedy decoding."""

    # 0 means greedy (argmax); above 0, logits are divided by it before sampling.
    temperature: float = 0.0
    # Keep the smallest set of tokens whose probability reaches top_p (1 keeps all).
    top_p: float = 1.0
    # Keep the k most likely tokens (0 keeps all).
    top_k: int = 0
    # Seeds this request's own generator; None draws a fresh seed.
    seed: int | None = None
    # Above 1 discourages tokens already in the prompt or answer (the CTRL penalty).
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to adjust first: the batch's argmax is this row's token."""
        return self.greedy and self.repetition_penalty == 1.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded for this request, or None for greedy decoding."""
    if params.greedy:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def _penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def _filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, descending=True)
    cumulative = ordered.softmax(-1).cumsum(-1)
    # Drop a token when the ones before it already reach p; the most likely one always stays.
    drop = cumulative - ordered.softmax(-1) >= p
    return logits.scatter(0, order, ordered.masked_fill(drop, float("-inf")))


def choose_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: list[int],
) -> int:
    """The next token id for one row; ``logits`` is that row's last-position logits and ``seen``
    the ids of its prompt and answer so far."""
    logits = logits.float()
    _check_finite(logits, "model")
    if params.repetition_penalty != 1.0:
        seen_ids = torch.tensor(seen, device=logits.device)
        logits = _penalize_repeats(logits, seen_ids, params.repetition_penalty)
        _check_finite(logits, "sampling")
    if params.greedy:
        return int(logits.argmax())
    logits = _filter_top_p(_filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    _check_finite(logits, "sampling")
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy_picks(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Every row's argmax, and whether its scores are usable (no NaN, no +inf), in one pass over
    the batch's last-position logits; choose_next gives the same token for a plain greedy row."""
    usable = ~(torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1))
    return logits.argmax(-1).tolist(), usable.tolist()


def _check_finite(logits: torch.Tensor, stage: str) -> None:
    # -inf is a masked token and fine; NaN or +inf would make argmax or multinomial meaningless.
    if bool(torch.isnan(logits).any() or torch.isposinf(logits).any()):
        raise NonFiniteScores(stage)
