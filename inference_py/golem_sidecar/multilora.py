"""Many plain LoRA adapters in one forward pass, at a cost that does not grow with their number
(the punica / S-LoRA idea, in plain torch).

peft's routed forward (``adapter_names``) loops, in every LoRA layer, over the batch's distinct
adapters and runs each one's rows apart: a few small operations per adapter per layer, so a
decode step over 16 adapters dispatches sixteen times the operations of one. Here the wrapper
runs with its LoRA layers switched off (each returns its base layer's output), and a forward
hook on each layer adds every row's own update ``scaling * (x @ A.T) @ B.T`` at once, from the
adapters' A and B stacked per layer:

- dense: the stacked ranks side by side, ``(x @ A_all.T) * mask @ B_all`` with a per-row mask
  that keeps its adapter's block, scaled. Two plain matmuls; their work grows with the stacked
  rank, which stays small for the few adapters a batch holds.
- gathered: each row's own A and B picked out of the stacks (``index_select``), then two
  batched matmuls. Work per row is one adapter's, whatever the mix; used once the stacked rank
  is large enough that the dense matmuls would cost more (measured on CPU:
  scripts/measure_multilora.py).

The stacks are built once per adapter set and kept while the wrapper's adapters stay the same.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper

# peft's placeholder in ``adapter_names`` for rows that wear no adapter.
BASE_ADAPTER = "__base__"
# Largest stacked rank (adapters x rank) that a layer serves with the dense matmuls; beyond it
# the per-row gathered form is cheaper (on CPU, 32 rows: the two meet near 28 adapters of rank 8).
DENSE_RANK_LIMIT = 224
# Adapter sets whose stacks a wrapper keeps (each holds a copy of its adapters' LoRA weights).
_KEPT_SETS = 4


def _gatherable_types() -> tuple[type, ...]:
    """The LoRA layer classes whose forward is ``base(x) + lora_B(lora_A(x)) * scaling``."""
    kinds: list[type] = [LoraLinear]
    with contextlib.suppress(ImportError):
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

        kinds += [Linear4bit, Linear8bitLt]
    return tuple(kinds)


_GATHERABLE = _gatherable_types()


def _plain_linear(layer: Any) -> bool:
    return isinstance(layer, _GATHERABLE)


@dataclass(frozen=True)
class _LayerStack:
    """One LoRA layer's share of an adapter set: the adapters of the set that target it."""

    # [n, r, in]: each targeting adapter's lora_A weight, zero-padded to the largest rank r.
    a: torch.Tensor
    # [n, r, out]: each one's lora_B weight, transposed, zero-padded alike.
    b: torch.Tensor
    # Indexed by a row's place in the set (the last place: bare rows) ->
    # its adapter's slot among the n (0 where it does not target this layer) ...
    slots: torch.Tensor
    # ... and its scaling here (0 where it does not target this layer, and for bare rows).
    scales: torch.Tensor
    # [places, n * r]: the dense form's mask, each place's block holding its scaling.
    mask: torch.Tensor | None

    def delta(self, x: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """Every row's own LoRA update of ``x`` ([rows, tokens, in]) in the stacks' dtype."""
        x = x.to(self.a.dtype)
        if self.mask is not None:
            n, r, width = self.a.shape
            hidden = (x @ self.a.view(n * r, width).T) * self.mask.index_select(0, places)[:, None]
            return hidden @ self.b.view(n * r, -1)
        slots = self.slots.index_select(0, places)
        hidden = torch.bmm(self.a.index_select(0, slots), x.transpose(1, 2))
        hidden = hidden * self.scales.index_select(0, places)[:, None, None]
        return torch.bmm(hidden.transpose(1, 2), self.b.index_select(0, slots))


@dataclass(frozen=True)
class _Stacks:
    """An adapter set's stacks over one wrapper, or why it cannot have them."""

    names: tuple[str, ...]
    # peft's LoRA layers (untyped modules) and their stacks.
    layers: tuple[tuple[Any, _LayerStack], ...]
    # The wrapper's adapter configs when the stacks were built: kept alive so their ids, part
    # of the cache key, cannot be reused by an adapter attached later.
    configs: tuple[Any, ...]
    device: torch.device | None

    def places(self, adapters: list[str | None]) -> torch.Tensor:
        """Each row's place in the set; bare rows take the last one."""
        place = {name: i for i, name in enumerate(self.names)}
        indices = [place[a] if a else len(self.names) for a in adapters]
        return torch.tensor(indices, dtype=torch.long, device=self.device)


class _Unsupported(Exception):
    """Some layer or wrapper piece of the set has no gathered form."""


# Per wrapper: its adapter sets' stacks (None: not gatherable), least recently used first.
_cache: weakref.WeakKeyDictionary[Any, OrderedDict[Hashable, _Stacks | None]] = (
    weakref.WeakKeyDictionary()
)


def can_gather(wrapper: Any, adapters: list[str | None]) -> bool:
    """Whether the gathered forward gives these rows what peft's routed forward gives: every
    layer any of their adapters touches is a plain LoRA Linear (no DoRA, lora_bias, embedding
    or conv LoRA), and the wrapper has no modules_to_save or trainable tokens."""
    return _stacks(wrapper, adapters) is not None


def gathered_forward(wrapper: Any, adapters: list[str | None], **inputs: Any) -> Any:
    """What ``wrapper(**inputs, adapter_names=[a or "__base__" ...])`` gives, in one pass whose
    LoRA cost does not depend on how many adapters the rows wear (see can_gather first)."""
    stacks = _stacks(wrapper, adapters)
    assert stacks is not None, "call can_gather first"
    places = stacks.places(adapters)
    with _lora_off(stacks, places):
        return wrapper(**inputs)


@contextlib.contextmanager
def _lora_off(stacks: _Stacks, places: torch.Tensor) -> Iterator[None]:
    """The LoRA layers return their base layer's output, and the hooks add each row's update,
    for the duration of one call."""
    handles = []
    try:
        for layer, stack in stacks.layers:
            # BaseTunerLayer's own flag: enable_adapters() would also flip requires_grad on
            # every adapter weight, per call.
            layer._disable_adapters = True
            handles.append(layer.register_forward_hook(_adder(stack, places)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, _ in stacks.layers:
            layer._disable_adapters = False


def _adder(stack: _LayerStack, places: torch.Tensor) -> Any:
    def hook(_module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        # As peft: the update is computed in the adapter weights' dtype, then cast back.
        return output + stack.delta(args[0], places).to(output.dtype)

    return hook


def _stacks(wrapper: Any, adapters: list[str | None]) -> _Stacks | None:
    names = tuple(sorted({a for a in adapters if a}))
    configs = tuple(wrapper.peft_config.values())
    key = (names, tuple(id(c) for c in configs))
    kept = _cache.setdefault(wrapper, OrderedDict())
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    try:
        stacks: _Stacks | None = _build(wrapper, names, configs)
    except _Unsupported:
        stacks = None
    kept[key] = stacks
    while len(kept) > _KEPT_SETS:
        kept.popitem(last=False)
    return stacks


def _build(wrapper: Any, names: tuple[str, ...], configs: tuple[Any, ...]) -> _Stacks:
    layers = []
    for module in wrapper.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            # modules_to_save / trainable tokens route rows themselves; leave them to peft.
            raise _Unsupported
        if isinstance(module, LoraLayer) and any(name in module.r for name in names):
            layers.append((module, _layer_stack(module, names)))
    device = layers[0][1].a.device if layers else None
    return _Stacks(names, tuple(layers), configs, device)


def _layer_stack(layer: Any, names: tuple[str, ...]) -> _LayerStack:
    present = [name for name in names if name in layer.r]
    if not _plain_linear(layer) or layer.merged:
        raise _Unsupported
    for name in present:
        if layer.use_dora.get(name) or layer.lora_bias.get(name) or name in layer.lora_variant:
            raise _Unsupported
    weights_a: list[torch.Tensor] = [layer.lora_A[name].weight for name in present]
    weights_b: list[torch.Tensor] = [layer.lora_B[name].weight for name in present]
    if len({w.dtype for w in weights_a + weights_b}) != 1:
        raise _Unsupported
    rank = max(w.shape[0] for w in weights_a)
    first = weights_a[0]
    a = first.new_zeros(len(present), rank, first.shape[1])
    b = first.new_zeros(len(present), rank, weights_b[0].shape[0])
    slots = torch.zeros(len(names) + 1, dtype=torch.long, device=first.device)
    scales = first.new_zeros(len(names) + 1)
    with torch.no_grad():
        for slot, name in enumerate(present):
            r = layer.r[name]
            a[slot, :r] = layer.lora_A[name].weight
            b[slot, :r] = layer.lora_B[name].weight.T
            place = names.index(name)
            slots[place] = slot
            scales[place] = layer.scaling[name]
    mask = None
    if len(present) * rank <= DENSE_RANK_LIMIT:
        # Place p keeps block slots[p] of the stacked ranks, times its scaling.
        blocks = torch.nn.functional.one_hot(slots, len(present)).to(a.dtype) * scales[:, None]
        mask = blocks.repeat_interleave(rank, dim=1)
    return _LayerStack(a, b, slots, scales, mask)
