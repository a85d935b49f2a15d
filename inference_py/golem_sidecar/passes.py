"""Splitting a batch into forward passes whose memory is bounded whatever the requests hold.

A pass of ``rows`` left-padded rows of ``width`` tokens holds activations that grow with
rows x width (hidden states, the KV cache) and attention scores that grow with rows x width^2
(CPU attention with a padding mask materialises them). Both are capped per pass; an item too
large for the caps alone still gets a pass of its own (the context check bounds it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
# Attention scores per pass, rows x width^2: 4M cells are about 150 MiB of float32 scores for
# SmolLM2's 9 heads.
MAX_ATTENTION_CELLS = 1 << 22


def fits(
    widths: list[int], max_rows: int, max_tokens: int, max_cells: int = MAX_ATTENTION_CELLS
) -> bool:
    """Whether rows of these widths (prompt + new tokens) may run in one pass: as many as
    ``max_rows``, ``max_tokens`` (rows x the widest) and ``max_cells`` (rows x the widest
    squared) allow."""
    rows, widest = len(widths), max(widths, default=0)
    return rows <= max_rows and rows * widest <= max_tokens and rows * widest * widest <= max_cells


def split_passes(
    items: list[T],
    width: Callable[[T], int],
    max_rows: int,
    max_tokens: int,
    max_cells: int = MAX_ATTENTION_CELLS,
) -> Iterator[list[T]]:
    """Consecutive items, as many per pass as ``fits`` allows; an item too large alone still
    gets a pass of its own."""
    group: list[T] = []
    widths: list[int] = []
    for item in items:
        if group and not fits([*widths, width(item)], max_rows, max_tokens, max_cells):
            yield group
            group, widths = [], []
        group.append(item)
        widths.append(width(item))
    if group:
        yield group
