"""The gathered multi-LoRA forward against peft's routed forward: the same logits within float
tolerance (prefill and a cached decode step), over adapters of different ranks, alphas and
targets, rsLoRA and bare rows mixed in, in uneven groups; greedy batches equal each row decoded
alone by plain peft; a name re-attached with other weights answers with them; what it cannot
gather is left to peft."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import DynamicCache, LlamaForCausalLM

from golem_sidecar.adapters import check_adapter_folder
from golem_sidecar.config import Security
from golem_sidecar.decoding import Row
from golem_sidecar.lanes import BASE_ADAPTER, Lane, group_by_lane
from golem_sidecar.models import ResidentBase, ResidentModels, peft_name
from golem_sidecar.multilora import can_gather, gathered_forward
from golem_sidecar.placement import Placement, bitsandbytes_installed
from golem_sidecar.prefill import left_pad
from golem_sidecar.scheduler import decode_batch
from tests.test_peft_types import MIXED_PROMPTS
from tests.tiny_models import local_model

CPU = Placement(device="cpu", dtype="float32", load_in_4bit=False)
TOKENS = 8
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Different ranks, alphas and targets; one rsLoRA; one with a rank and an alpha of its own in
# one layer.
CONFIGS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=4, target_modules=ATTENTION + MLP),
    "rs2": dict(r=2, lora_alpha=8, target_modules=["k_proj", "down_proj"], use_rslora=True),
    "mlp16": dict(
        r=16,
        lora_alpha=32,
        target_modules=MLP,
        rank_pattern={"layers.1.mlp.up_proj": 4},
        alpha_pattern={"layers.1.mlp.up_proj": 2},
    ),
}
# Rows in this order, cycled over the prompts: every adapter and bare rows side by side.
WORN: list[str | None] = ["qv4", None, "all8", "rs2", "mlp16", "qv4"]


def build_lora(model_dir: str, out: Path, seed: int, **config: Any) -> str:
    """A LoRA whose A and B are random, large enough to change the answers."""
    torch.manual_seed(seed)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(model_dir),
        LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **config),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture(scope="module")
def loras(tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multilora")
    return {
        name: build_lora(tiny["model"], root / name, seed=30 + i, **config)
        for i, (name, config) in enumerate(CONFIGS.items())
    }


def attached(tiny: dict[str, str], loras: dict[str, str]) -> ResidentBase:
    """A fresh base (so fresh stacks) with every LoRA attached under its own name."""
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), CPU)
    for name, path in loras.items():
        models.adapter(base, check_adapter_folder(path, allow_pickle=False), name=name)
    return base


def padded(base: ResidentBase, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded inputs with positions counting real tokens, as decoding.py makes them."""
    ids, mask = left_pad([list(base.tokenizer(p)["input_ids"]) for p in prompts], 0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": mask.cumsum(-1) - 1}


def rows_of(count: int) -> tuple[list[str | None], list[str]]:
    worn = [WORN[i % len(WORN)] for i in range(count)]
    adapters = [peft_name(a) if a else None for a in worn]
    return adapters, [MIXED_PROMPTS[i % len(MIXED_PROMPTS)] for i in range(count)]


def two_steps(call: Any, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The logits of a prefill and of one cached decode step after it."""
    cache = DynamicCache()
    first = call(**inputs, cache=cache, use_cache=True).logits
    assert cache.get_seq_length() == inputs["input_ids"].shape[1], "the step reads the cache"
    token = first[:, -1].argmax(-1, keepdim=True)
    step = {
        "input_ids": token,
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1),
        "position_ids": inputs["position_ids"][:, -1:] + 1,
    }
    second = call(**step, cache=cache, use_cache=True).logits
    return [first, second]


def gathered_as_routed(
    wrapper: Any, adapters: list[str | None], inputs: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """The gathered forward's logits (prefill and a cached step), checked against peft's
    routed forward's within float tolerance; returned for further checks."""
    assert can_gather(wrapper, adapters)
    routed_names = [a or BASE_ADAPTER for a in adapters]
    with torch.inference_mode():
        want = two_steps(lambda **kw: wrapper(**kw, adapter_names=routed_names), inputs)
        got = two_steps(lambda **kw: gathered_forward(wrapper, adapters, **kw), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    return got


def test_logits_equal_peft_routed_prefill_and_decode_step(
    tiny: dict[str, str], loras: dict[str, str]
) -> None:
    base = attached(tiny, loras)
    wrapper = base.wrappers["LORA"]
    adapters, prompts = rows_of(12)
    inputs = padded(base, prompts)
    got = gathered_as_routed(wrapper, adapters, inputs)
    with torch.inference_mode():
        bare = base.model(**inputs).logits
    # Rows of two of the adapters only: served by the stacks of the wider set just built
    # (o_proj, which only all8 targets, gets no update).
    fewer = [a if a in (peft_name("qv4"), peft_name("rs2")) else None for a in adapters]
    with torch.inference_mode():
        narrow = gathered_forward(wrapper, fewer, **inputs).logits
        routed = wrapper(**inputs, adapter_names=[a or BASE_ADAPTER for a in fewer]).logits
    torch.testing.assert_close(narrow, routed, rtol=1e-5, atol=1e-5)
    for i, adapter in enumerate(adapters):
        changed = not torch.allclose(got[0][i], bare[i], atol=1e-3)
        assert changed == (adapter is not None), f"row {i} ({adapter}) wears the wrong update"
    assert not any(m.disable_adapters for m in wrapper.modules() if isinstance(m, LoraLayer))


@pytest.fixture(scope="module")
def alone(tiny: dict[str, str], loras: dict[str, str]) -> dict[tuple[str | None, str], list[int]]:
    """Plain peft's greedy answer for every (adapter, prompt), each adapter alone."""
    from tests.test_generation import _plain_answer

    return {
        (name, prompt): _plain_answer(tiny["model"], loras[name] if name else None, prompt, TOKENS)
        for name in [None, *CONFIGS]
        for prompt in MIXED_PROMPTS
    }


def decode_rows(
    base: ResidentBase, worn: list[str | None], prompts: list[str], budgets: list[int] | None = None
) -> list[Row]:
    """Greedy rows decoded together in the lane group_by_lane gives them."""
    rows = [
        Row(
            list(base.tokenizer(p)["input_ids"]),
            peft_name(a) if a else None,
            budget,
            threading.Event(),
        )
        for a, p, budget in zip(worn, prompts, budgets or [TOKENS] * len(worn), strict=True)
    ]
    [(lane, members)] = group_by_lane(rows, lambda row: row.adapter, base.lane)
    assert lane.routed and can_gather(lane.model, [r.adapter for r in members])
    decode_batch(lane, base.tokenizer, members, "cpu")
    return rows


def test_greedy_batches_answer_as_each_row_alone(
    tiny: dict[str, str],
    loras: dict[str, str],
    alone: dict[tuple[str | None, str], list[int]],
) -> None:
    base = attached(tiny, loras)
    count = 2 * len(MIXED_PROMPTS)
    worn = [WORN[i % len(WORN)] for i in range(count)]
    prompts = [MIXED_PROMPTS[(i // 2) % len(MIXED_PROMPTS)] for i in range(count)]
    # Some adapters' rows finish early, so the batch wears fewer adapters as it goes.
    budgets = [{"all8": 2, "rs2": 5}.get(a or "", TOKENS) for a in worn]
    rows = decode_rows(base, worn, prompts, budgets)
    for adapter, prompt, budget, row in zip(worn, prompts, budgets, rows, strict=True):
        assert row.generated == alone[adapter, prompt][:budget], (adapter, prompt)
    distinct = {tuple(alone[a, MIXED_PROMPTS[0]]) for a in [None, *CONFIGS]}
    assert len(distinct) >= 4, "the adapters should answer apart, or a mix-up would pass"


def test_a_name_attached_again_with_other_weights_answers_with_them(
    tiny: dict[str, str],
    loras: dict[str, str],
    alone: dict[tuple[str | None, str], list[int]],
) -> None:
    """The stacks of the first weights must not outlive them."""
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), CPU)
    for name in ("qv4", "rs2"):
        models.adapter(base, check_adapter_folder(loras[name], allow_pickle=False), name=name)
    prompts = MIXED_PROMPTS[:2]
    before = decode_rows(base, ["qv4", "rs2"], prompts)
    assert before[0].generated == alone["qv4", prompts[0]]
    models.unload(base, "qv4")
    # "qv4" now names the weights of all8 (another rank, other targets).
    models.adapter(base, check_adapter_folder(loras["all8"], allow_pickle=False), name="qv4")
    after = decode_rows(base, ["qv4", "rs2"], prompts)
    assert after[0].generated == alone["all8", prompts[0]]
    assert after[1].generated == alone["rs2", prompts[1]]


def test_what_it_cannot_gather_is_left_to_peft(
    tiny: dict[str, str], loras: dict[str, str], tmp_path: Path
) -> None:
    """An embedding LoRA has no gathered form: the lane routes those rows through peft, and
    answers as peft does."""
    embedding = build_lora(
        tiny["model"], tmp_path / "emb", seed=40, r=4, target_modules=["embed_tokens", "q_proj"]
    )
    base = attached(tiny, {**loras, "emb": embedding})
    wrapper = base.wrappers["LORA"]
    adapters = [peft_name("qv4"), peft_name("emb"), None]
    assert not can_gather(wrapper, adapters)
    assert can_gather(wrapper, [peft_name("qv4"), peft_name("all8")])
    inputs = padded(base, MIXED_PROMPTS[:3])
    with torch.inference_mode():
        got = Lane(wrapper, routed=True)(adapters, **inputs).logits
        want = wrapper(**inputs, adapter_names=[a or BASE_ADAPTER for a in adapters]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not bitsandbytes_installed(), reason="needs bitsandbytes")
def test_on_a_four_bit_base_it_equals_peft_routed_and_plain_peft_alone(
    tiny: dict[str, str], loras: dict[str, str]
) -> None:
    """peft's bnb Linear4bit LoRA layers: the hooks see the layer's input and its 4-bit base
    output."""
    from peft.tuners.lora.bnb import Linear4bit

    from tests.test_peft_types_four_bit import FOUR_BIT, _plain

    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), FOUR_BIT)
    for name in ("qv4", "all8", "rs2"):
        models.adapter(base, check_adapter_folder(loras[name], allow_pickle=False), name=name)
    wrapper = base.wrappers["LORA"]
    assert any(isinstance(m, Linear4bit) for m in wrapper.modules())
    worn: list[str | None] = ["qv4", None, "all8", "rs2"]
    adapters = [peft_name(a) if a else None for a in worn]
    prompts = MIXED_PROMPTS[: len(worn)]
    gathered_as_routed(wrapper, adapters, padded(base, prompts))
    rows = decode_rows(base, worn, prompts)
    for adapter, prompt, row in zip(worn, prompts, rows, strict=True):
        assert row.generated == _plain(tiny["model"], loras[adapter] if adapter else None, prompt)
