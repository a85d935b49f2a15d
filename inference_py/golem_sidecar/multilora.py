"""Many plain LoRA adapters in one forward pass, at a cost that barely grows with their number
(the punica / S-LoRA idea, in plain torch).

peft's routed forward (``adapter_names``) loops, in every LoRA layer, over the batch's distinct
adapters and runs each one's rows apart: a handful of small operations per adapter per layer,
so a decode step over 16 adapters dispatches sixteen times the operations of one. Here the
wrapper runs with its LoRA layers switched off (each returns its base layer's output), and a
forward hook on each layer adds every row's own update ``scaling * (x @ A.T) @ B.T`` with five
operations, whatever the mix:

- the rows are gathered into one group per adapter (groups padded to the largest with a
  scaling of 0): ``[adapters, rows per adapter, in]``;
- two batched matmuls against the adapters' A and B, stacked per layer (zero-padded to the
  largest rank), with each group's scaling between them;
- the groups' updates are added back to their rows (``index_add``).

Each adapter's weights are read once and each row does one adapter's work; only uneven groups
cost padding. Two other forms were measured against one active adapter and dropped (CPU, one
thread, 32 rows, SmolLM2-135M): the stacked ranks side by side in two dense matmuls with a
per-row mask (work grows with the number of adapters: +18% step time at 16), and each row's own
A and B gathered out of the stacks (copies the weights per row: +14% to +22% at any mix).

The stacks are built once per adapter set and kept while the wrapper's adapters stay the same;
a batch wearing fewer adapters as its rows finish keeps using those of the set it started with.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper

# peft's placeholder in ``adapter_names`` for rows that wear no adapter.
BASE_ADAPTER = "__base__"
# Adapter sets whose stacks a wrapper keeps (each holds a copy of its adapters' LoRA weights).
_KEPT_SETS = 2


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

    # Their places in the set, in stack order.
    present: tuple[int, ...]
    # Their scalings in this layer, in stack order.
    scales: tuple[float, ...]
    # [n, r, in]: their lora_A weights, zero-padded to the largest rank r.
    a: torch.Tensor
    # [n, r, out]: their lora_B weights, transposed, zero-padded alike.
    b: torch.Tensor

    def add_update(self, x: torch.Tensor, out: torch.Tensor, groups: _Groups) -> torch.Tensor:
        """``out`` plus every row's own LoRA update of ``x`` ([rows, tokens, in]), computed in
        the stacks' dtype (as peft does) and cast to ``out``'s."""
        rows, scale = groups.of(self)
        if not rows.numel():
            # None of the rows wears an adapter that targets this layer.
            return out
        n, r, width = self.a.shape
        tokens = x.shape[1]
        grouped = x.index_select(0, rows).to(self.a.dtype).view(n, -1, width)
        hidden = torch.bmm(grouped, self.a.transpose(1, 2)).view(n, -1, tokens, r).mul_(scale)
        update = torch.bmm(hidden.view(n, -1, r), self.b).view(rows.shape[0], tokens, -1)
        # ``out`` is the base layer's fresh output (the LoRA layer is off): adding in place
        # spares a copy of it per layer.
        return out.index_add_(0, rows, update.to(out.dtype))


@dataclass
class _Groups:
    """One call's rows grouped by adapter, for the layers' stacks: per set of present adapters,
    the rows of each group (padded with row 0) and each entry's scaling (0 for padding)."""

    places: list[int]
    device: torch.device
    _made: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def of(self, stack: _LayerStack) -> tuple[torch.Tensor, torch.Tensor]:
        key = (stack.present, stack.scales, stack.a.dtype)
        made = self._made.get(key)
        if made is None:
            made = self._make(stack)
            self._made[key] = made
        return made

    def _make(self, stack: _LayerStack) -> tuple[torch.Tensor, torch.Tensor]:
        members = [[i for i, p in enumerate(self.places) if p == place] for place in stack.present]
        width = max(map(len, members))
        rows = [row for group in members for row in group + [0] * (width - len(group))]
        scale = [
            [s] * len(group) + [0.0] * (width - len(group))
            for group, s in zip(members, stack.scales, strict=True)
        ]
        return (
            torch.tensor(rows, dtype=torch.long, device=self.device),
            # [n, rows per group, 1, 1]: broadcast over tokens and ranks.
            torch.tensor(scale, dtype=stack.a.dtype, device=self.device)[:, :, None, None],
        )


@dataclass(frozen=True)
class _Stacks:
    """An adapter set's stacks over one wrapper."""

    names: tuple[str, ...]
    # peft's LoRA layers (untyped modules) and their stacks.
    layers: tuple[tuple[Any, _LayerStack], ...]
    # The wrapper's adapter configs when the stacks were built: kept alive so their ids, part
    # of the cache key, cannot be reused by an adapter attached later.
    configs: tuple[Any, ...]

    def groups(self, adapters: list[str | None]) -> _Groups:
        """Each row's place in the set; bare rows take one past the last, in no group."""
        place = {name: i for i, name in enumerate(self.names)}
        places = [place[a] if a else len(self.names) for a in adapters]
        device = self.layers[0][1].a.device if self.layers else torch.device("cpu")
        return _Groups(places, device)


class _Unsupported(Exception):
    """Some layer or wrapper piece of the set has no gathered form."""


# An adapter set, and the ids of its wrapper's adapter configs when its stacks were built.
_Key = tuple[tuple[str, ...], tuple[int, ...]]
# Per wrapper: its adapter sets' stacks (None: not gatherable), least recently used first.
_cache: weakref.WeakKeyDictionary[Any, OrderedDict[_Key, _Stacks | None]] = (
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
    with _lora_off(stacks, stacks.groups(adapters)):
        return wrapper(**inputs)


@contextlib.contextmanager
def _lora_off(stacks: _Stacks, groups: _Groups) -> Iterator[None]:
    """The LoRA layers return their base layer's output, and the hooks add each row's update,
    for the duration of one call."""
    handles = []
    try:
        for layer, stack in stacks.layers:
            # BaseTunerLayer's own flag: enable_adapters() would also flip requires_grad on
            # every adapter weight, per call.
            layer._disable_adapters = True
            handles.append(layer.register_forward_hook(_adder(stack, groups)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, _ in stacks.layers:
            layer._disable_adapters = False


def _adder(stack: _LayerStack, groups: _Groups) -> Any:
    def hook(_module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return stack.add_update(args[0], output, groups)

    return hook


def _stacks(wrapper: Any, adapters: list[str | None]) -> _Stacks | None:
    names = tuple(sorted({a for a in adapters if a}))
    configs = tuple(wrapper.peft_config.values())
    version = tuple(id(c) for c in configs)
    key: _Key = (names, version)
    kept = _cache.setdefault(wrapper, OrderedDict())
    # A batch whose rows finish wears fewer adapters step by step: the stacks of the set it
    # started with serve it on (the adapters it no longer wears get empty groups).
    wider = (
        k
        for k, v in kept.items()
        if v is not None and k[1] == version and set(names) <= set(v.names)
    )
    key = key if key in kept else next(wider, key)
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
    return _Stacks(names, tuple(layers), configs)


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
    with torch.no_grad():
        for slot, (weight_a, weight_b) in enumerate(zip(weights_a, weights_b, strict=True)):
            a[slot, : weight_a.shape[0]] = weight_a
            b[slot, : weight_b.shape[1]] = weight_b.T
    return _LayerStack(
        present=tuple(names.index(name) for name in present),
        scales=tuple(float(layer.scaling[name]) for name in present),
        a=a,
        b=b,
    )
