"""Lanes: which rows of a batch one forward pass can serve together, and how it serves them.

peft keeps one tuner type per wrapped model ("Cannot combine adapters with different peft
types"), and only plain LoRA routes each row of a batch to its own adapter (``adapter_names``).
So a base keeps one peft wrapper per adapter type (models.py), and a batch is cut into lanes:

- the bare base's rows, on the base itself;
- plain LoRA rows (rsLoRA included) and bare rows, together on the LoRA wrapper, each row
  routed to its adapter by ``adapter_names`` (the bare ones to peft's ``__base__``), or, in a
  forward pass whose rows all wear one adapter, with that adapter active (no per-row dispatch);
  rows wearing several adapters take the gathered forward (multilora.py) wherever it applies;
- one lane per adapter of every other kind (DoRA, IA3, LoHa, LoKr, AdaLoRA), on its type's
  wrapper with that adapter active, since peft cannot route rows among them.

Every row of a lane runs exactly as it would in a batch of its adapter alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from golem_sidecar.multilora import BASE_ADAPTER, can_gather, gathered_forward

T = TypeVar("T")


@dataclass(frozen=True)
class Lane:
    """A module to call and how it picks each row's adapter."""

    model: Any
    # Rows are routed one by one (``adapter_names``): the LoRA wrapper's mixed lane.
    routed: bool = False
    # The one peft adapter this lane's rows wear (set active before each forward pass).
    active: str | None = None

    @property
    def key(self) -> Hashable:
        return (id(self.model), self.routed, self.active)

    def __call__(self, adapters: list[str | None], **inputs: Any) -> Any:
        """One forward pass over rows wearing ``adapters`` (peft names, None for the bare base)."""
        lane = self.narrowed(adapters)
        if lane.active is not None and lane.model.active_adapter != lane.active:
            # Lanes of one wrapper take turns on the model thread, so the active adapter is
            # whichever lane ran last.
            lane.model.set_adapter(lane.active, inference_mode=True)
        if lane.routed:
            # One adapter costs peft's loop little; more are served in one gathered pass.
            if len(set(adapters) - {None}) > 1 and can_gather(lane.model, adapters):
                return gathered_forward(lane.model, adapters, **inputs)
            inputs["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
        return lane.model(**inputs)

    def narrowed(self, adapters: list[str | None]) -> Lane:
        """The lane one forward pass over ``adapters`` runs on: a routed lane whose rows all
        wear one adapter runs with that adapter active, peft's plain forward without the
        per-row dispatch of ``adapter_names``. Decided per pass, since rows join and leave a
        running batch (scheduler.py)."""
        if not self.routed:
            return self
        worn = set(adapters)
        if len(worn) != 1 or None in worn:
            return self
        return Lane(self.model, active=worn.pop())


def group_by_lane(
    items: list[T], adapter_of: Callable[[T], str | None], lane_of: Callable[[str | None], Lane]
) -> list[tuple[Lane, list[T]]]:
    """The items cut into lanes, first-come order kept within each. Bare rows ride in the
    routed LoRA lane when the batch has one (one pass fewer), else in a lane of their own."""
    lanes: dict[Hashable, tuple[Lane, list[T]]] = {}
    bare: list[T] = []
    for item in items:
        adapter = adapter_of(item)
        if adapter is None:
            bare.append(item)
            continue
        lane = lane_of(adapter)
        lanes.setdefault(lane.key, (lane, []))[1].append(item)
    if bare:
        routed = next((entry for entry in lanes.values() if entry[0].routed), None)
        if routed is not None:
            routed[1].extend(bare)
        else:
            lane = lane_of(None)
            lanes[lane.key] = (lane, bare)
    return list(lanes.values())
