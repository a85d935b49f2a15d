"""The per-step pieces of the decoder against what they replace: the windowed detokenizer
against decoding the whole answer, the batch argmax against choose_next row by row, and the
one-adapter lane against peft's routed forward."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from golem_sidecar.adapters import check_adapter_folder
from golem_sidecar.config import Security
from golem_sidecar.decoding import Row
from golem_sidecar.detokenize import INCOMPLETE, Detokenizer
from golem_sidecar.lanes import Lane
from golem_sidecar.models import ResidentModels, peft_name
from golem_sidecar.placement import Placement
from golem_sidecar.sampling import SamplingParams, choose_next, greedy_picks
from golem_sidecar.scheduler import decode_batch
from tests.test_generation import PROMPTS
from tests.tiny_models import local_model

CPU = Placement(device="cpu", dtype="float32", load_in_4bit=False)
# Multi-byte characters, split across byte-level tokens, and plain text.
TEXTS = ["Fantasy", "Science fiction", "é😀 ü 中文 — ok", "Books\n\nand  spaces", "naïve café"]


def _ids(tokenizer: object, draw: st.DrawFn) -> list[int]:
    text = draw(st.sampled_from(TEXTS)) + draw(st.sampled_from(TEXTS))
    ids = list(tokenizer(text)["input_ids"])  # type: ignore[operator]
    # Random cuts too, so a window may start or end inside a character.
    return ids[: draw(st.integers(1, len(ids)))]


def _default_tokenizer() -> object | None:
    """SmolLM2's tokenizer from the embedded GGUF, when it is built (make models)."""
    from golem_sidecar.gate import ModelRef
    from golem_sidecar.loading import load_tokenizer
    from tests.test_default_model import MODEL

    if not MODEL.is_file():
        return None
    return load_tokenizer(ModelRef(str(MODEL), str(MODEL.resolve())), Security())


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_the_windowed_text_is_the_whole_decode_piece_by_piece(
    tiny: dict[str, str], which: str
) -> None:
    if which == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    else:
        tokenizer = _default_tokenizer()
        if tokenizer is None:
            pytest.skip("the embedded default is not built (make models)")

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        ids = _ids(tokenizer, data.draw)
        text = Detokenizer(tokenizer)
        pieces = [text.push(token) for token in ids]
        full = str(tokenizer.decode(ids, skip_special_tokens=True))
        assert "".join(pieces) == text.text
        assert full.startswith(text.text)
        # Only an unfinished last character may still be held back.
        assert full == text.text or full[len(text.text) :].endswith(INCOMPLETE)
        assert text.final() == full

    check()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.floats(-50, 50), min_size=5, max_size=5), min_size=1, max_size=6),
    st.lists(st.sampled_from(["ok", "nan", "inf", "tie"]), min_size=6, max_size=6),
)
def test_the_batch_argmax_is_choose_next_row_by_row(
    values: list[list[float]], kinds: list[str]
) -> None:
    logits = torch.tensor(values)
    for i, kind in enumerate(kinds[: len(values)]):
        if kind == "nan":
            logits[i, 1] = float("nan")
        elif kind == "inf":
            logits[i, 2] = float("inf")
        elif kind == "tie":
            logits[i, :] = 3.0
    picks, usable = greedy_picks(logits)
    for i in range(len(values)):
        try:
            expected = choose_next(logits[i], SamplingParams(), None, [])
        except ValueError:
            assert not usable[i]
            continue
        assert usable[i] and picks[i] == expected


def test_one_adapter_runs_as_the_active_adapter_and_answers_as_routed(
    tiny: dict[str, str],
) -> None:
    """A routed pass whose rows all wear one adapter runs as that adapter active (no
    adapter_names), and gives the greedy tokens that peft's routed forward gives."""
    models = ResidentModels(Security())
    base, _ = models.base(local_model(tiny["model"]), CPU)
    name, _ = models.adapter(base, check_adapter_folder(tiny["adapter"], allow_pickle=False))
    adapter = peft_name(name)
    lane = base.lane(adapter)
    assert lane.routed
    assert lane.narrowed([adapter, adapter]) == Lane(lane.model, active=adapter)
    assert lane.narrowed([adapter, None]) is lane, "an adapter and the bare base stay routed"

    def rows() -> list[Row]:
        return [
            Row(list(base.tokenizer(p)["input_ids"]), adapter, 10, threading.Event())
            for p in PROMPTS
        ]

    fast = rows()
    decode_batch(lane, base.tokenizer, fast, "cpu")
    # Beside a bare row that runs as long as they do, the same rows are routed every step.
    bare = Row(list(base.tokenizer(PROMPTS[0])["input_ids"]), None, 10, threading.Event())
    routed = [*rows(), bare]
    decode_batch(lane, base.tokenizer, routed, "cpu")
    assert bare.finish_reason == "length", "the bare row kept the pass routed to the end"
    assert [r.generated for r in fast] == [r.generated for r in routed[:-1]]
