"""Keeping bitsandbytes' 4-bit weights intact while peft attaches or detaches adapters.

On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weights and scales for
its fused kernel on the layer's first forward pass. Two things then go wrong for an adapter
attached later, which plain peft (attaching before the first forward pass) never meets:

- peft reads a layer's shape from its weight, and a packed weight has another shape (a LoHa or
  LoKr adapter is then refused as made for another base);
- peft takes a ``state_dict()`` while loading, which unpacks the weights but leaves the scales
  (``absmax``) transposed, so the next forward pass packs them wrongly: every layer whose input
  is wider than one quantization block (64) then computes with other blocks' scales.

So around every peft change the packed layers are unpacked (with their scales in their loaded
order), and afterwards put back exactly as they were (the same tensors: nothing is copied).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse


def packed_weights(model: Any) -> list[Any]:
    """The 4-bit weights bitsandbytes has packed for its fused CPU kernel."""
    found = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            found[id(weight)] = weight
    return list(found.values())


def _unpack(weight: Any) -> None:
    """The weight and scales as bitsandbytes loaded them (bitsandbytes' own inverse, then the
    scales back in block order: packing stored them transposed, [blocks per row, rows])."""
    nested = weight.quant_state.original_nested
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
        weight.data, weight.quant_state
    )
    if not nested:
        state = weight.quant_state
        state.absmax = state.absmax.T.reshape(-1).to(state.dtype).contiguous()


@contextlib.contextmanager
def as_loaded(model: Any) -> Iterator[None]:
    """Runs the body with every packed 4-bit layer as bitsandbytes loaded it, then puts each
    back as it was before."""
    packed = packed_weights(model)
    kept = [(w, w.data, w.quant_state, dict(vars(w.quant_state))) for w in packed]
    try:
        for weight in packed:
            _unpack(weight)
        yield
    finally:
        for weight, data, state, fields in kept:
            weight.data = data
            weight.quant_state = state
            vars(state).clear()
            vars(state).update(fields)
