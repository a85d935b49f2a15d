"""Exam scorers (scorers.py) on hand-made cases, and the harness's log-likelihood
(loglikelihood.py) against an independent computation with plain transformers + peft."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from golem_sidecar.errors import GolemError
from golem_sidecar.lanes import Lane
from golem_sidecar.loglikelihood import continuation_ids, pair_item
from golem_sidecar.scorers import (
    MAX_PATTERN_CHARS,
    SCORERS,
    Observed,
    Target,
    get_scorer,
    known_scorers,
    normalize,
)
from golem_sidecar.scoring import Loglikelihood, loglikelihoods


def text_score(name: str, output: str, *answers: str) -> float:
    return get_scorer(name).score(Target(answers), Observed(output=output))


def test_normalize_follows_squad() -> None:
    assert normalize("  The Hobbit, an  Adventure!  ") == "hobbit adventure"
    # Articles go only as whole words.
    assert normalize("Theater") == "theater"


@pytest.mark.parametrize(
    ("output", "answer", "expected"),
    [
        ("Fantasy.", "fantasy", 1.0),
        ("The fantasy", "a Fantasy", 1.0),
        ("Fantasy novel", "fantasy", 0.0),
    ],
)
def test_exact_match_is_normalised(output: str, answer: str, expected: float) -> None:
    assert text_score("exact_match", output, answer) == expected


@pytest.mark.parametrize(
    ("output", "answer", "expected"),
    [
        ("It is a Science-Fiction novel.", "science fiction", 0.0),
        ("It is a science fiction novel.", "Science Fiction", 1.0),
        ("It is fantasyland.", "fantasy", 0.0),
        ("Horror", "horror!", 1.0),
    ],
)
def test_contains_reads_whole_normalised_words(output: str, answer: str, expected: float) -> None:
    # Normalising drops the hyphen, joining "sciencefiction": a different word, so not contained.
    assert text_score("contains", output, answer) == expected


def test_regex_searches_the_raw_output() -> None:
    assert text_score("regex", "Published in 1965.", r"\b(19|20)\d{2}\b") == 1.0
    assert text_score("regex", "Published long ago.", r"\b(19|20)\d{2}\b") == 0.0
    # Not normalised: the pattern decides about case.
    assert text_score("regex", "FANTASY", "fantasy") == 0.0
    assert text_score("regex", "FANTASY", "(?i)fantasy") == 1.0


@pytest.mark.parametrize(
    ("pattern", "words"), [("a" * (MAX_PATTERN_CHARS + 1), "at most"), ("(fantasy", "not a valid")]
)
def test_regex_refuses_long_and_invalid_patterns(pattern: str, words: str) -> None:
    with pytest.raises(GolemError, match=words) as caught:
        text_score("regex", "anything", pattern)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == "answer"


@pytest.mark.parametrize(
    ("output", "answer", "expected"),
    [
        # Tokens after normalising: [cat, sat] against [cat, sat, down]: P=1, R=2/3.
        ("The cat sat.", "a cat sat down", 0.8),
        ("cat cat", "cat", 2 * 0.5 * 1 / 1.5),
        ("dog", "cat", 0.0),
        ("The", "a", 1.0),
        ("fantasy", "the", 0.0),
    ],
)
def test_token_f1_values(output: str, answer: str, expected: float) -> None:
    assert text_score("token_f1", output, answer) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("output", "answer", "expected"),
    [
        # LCS of [the cat lay on a mat] and [the cat sat on the mat] is [the cat on mat]: 4/6, 4/6.
        ("the cat lay on a mat", "the cat sat on the mat", 2 / 3),
        # One token of three, all of it in order: P=1, R=1/3, F=0.5.
        ("testing", "testing one two", 0.5),
        ("Fantasy", "fantasy", 1.0),
        ("horror", "fantasy", 0.0),
    ],
)
def test_rouge_l_is_the_library_f_measure(output: str, answer: str, expected: float) -> None:
    assert text_score("rouge_l", output, answer) == pytest.approx(expected)


def test_text_scorers_take_the_best_answer() -> None:
    answers = ("science fiction", "sci-fi", r"^SF$")
    assert text_score("exact_match", "Sci-fi", *answers) == 1.0
    assert text_score("contains", "it is sci-fi", *answers) == 1.0
    assert text_score("regex", "SF", *answers) == 1.0
    assert text_score("token_f1", "science", *answers) == pytest.approx(2 / 3)
    assert text_score("rouge_l", "fiction", *answers) == pytest.approx(2 / 3)


def test_loglikelihood_scorers_read_the_likelihoods_they_ask_for() -> None:
    target = Target(answers=("Dune",), choices=("Dracula", "Dune", "Emma"))
    likelihoods = {
        "Dracula": Loglikelihood(-3.0, False, 2),
        "Dune": Loglikelihood(-2.0, True, 1),
        "Emma": Loglikelihood(-2.5, False, 1),
    }
    observed = Observed(likelihoods=likelihoods)
    assert get_scorer("mean_logprob").continuations(target) == ("Dune",)
    assert get_scorer("choice_accuracy").continuations(target) == target.choices
    assert get_scorer("exact_match").continuations(target) == ()
    assert get_scorer("mean_logprob").score(target, observed) == -2.0
    assert get_scorer("choice_accuracy").score(target, observed) == 1.0
    # Summed, not per token: Dracula's -1.5 per token does not win over Dune's -2.0.
    wrong = Target(answers=("Dracula",), choices=target.choices)
    assert get_scorer("choice_accuracy").score(wrong, observed) == 0.0
    # With several accepted answers the likeliest per token counts.
    both = Target(answers=("Dune", "Dracula"))
    assert get_scorer("mean_logprob").score(both, observed) == -1.5


def test_registry_lists_every_scorer_with_its_kind() -> None:
    assert known_scorers() == sorted(SCORERS)
    kinds = {name: scorer.kind for name, scorer in SCORERS.items()}
    assert kinds == {
        "exact_match": "text",
        "contains": "text",
        "regex": "text",
        "token_f1": "text",
        "rouge_l": "text",
        "mean_logprob": "loglikelihood",
        "choice_accuracy": "loglikelihood",
    }


def test_unknown_scorer_is_invalid_argument_with_a_suggestion() -> None:
    with pytest.raises(GolemError) as caught:
        get_scorer("exact_mach")
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "scorers"
    assert error.reason == "UNKNOWN_SCORER"
    assert "'exact_mach'" in error.message
    assert "did you mean 'exact_match'?" in error.message


# The seed-style prompt of the tiny model's corpus, so its tokenizer has real merges for it.
CONTEXT = "Instruction: Which genre is Dune?\nResponse:"


@pytest.fixture(scope="module")
def adapted(tiny: dict[str, str]) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, tiny["adapter"]).eval(), tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_trailing_context_space_moves_to_the_continuation(
    adapted: tuple[PeftModel, PreTrainedTokenizerBase],
) -> None:
    _, tokenizer = adapted
    context_ids, cont_ids = continuation_ids(tokenizer, CONTEXT + " ", "Science fiction")
    assert context_ids == encode(tokenizer, CONTEXT)
    # Byte-level BPE glues the space to the next word: the continuation starts with " Science".
    assert cont_ids == encode(tokenizer, " Science fiction")
    assert tokenizer.decode(cont_ids) == " Science fiction"


def test_empty_context_scores_after_the_prefix_token(
    adapted: tuple[PeftModel, PreTrainedTokenizerBase],
) -> None:
    _, tokenizer = adapted
    context_ids, cont_ids = continuation_ids(tokenizer, "", "Horror")
    assert context_ids == [tokenizer.bos_token_id or tokenizer.eos_token_id]
    assert cont_ids == encode(tokenizer, "Horror")


def loglikelihood(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> Loglikelihood:
    """The pair scored as the engine scores it (scoring.loglikelihoods), alone in its pass, on
    the model as it stands (the adapter active)."""
    item = pair_item(tokenizer, context, continuation, None)
    lane = Lane(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    found = loglikelihoods(lambda _: lane, [item], pad, "cpu", (8, 4096), threading.Event())
    return found[0]


def logits_of(model: PeftModel) -> Callable[[list[int]], torch.Tensor]:
    """The plain model: token ids in, logits per position out."""

    def model_call(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0]

    return model_call


@pytest.mark.parametrize(
    ("context", "continuation"),
    [
        (CONTEXT, " Science fiction"),
        (CONTEXT + " ", "Science fiction"),
        (CONTEXT + "  ", "Fantasy"),
        ("The quick brown", " fox jumps over the lazy dog."),
    ],
)
def test_loglikelihood_equals_plain_peft_loss(
    adapted: tuple[PeftModel, PreTrainedTokenizerBase], context: str, continuation: str
) -> None:
    model, tokenizer = adapted
    got = loglikelihood(model, tokenizer, context, continuation)

    # Independently: one forward over the whole sequence, transformers' own shifted cross-entropy
    # over the continuation positions (context positions masked with -100), and argmax per position.
    stripped = context.rstrip()
    n_context = len(encode(tokenizer, stripped))
    whole = encode(tokenizer, context + continuation)
    ids = encode(tokenizer, stripped) + whole[n_context:]
    n_tokens = len(ids) - n_context
    labels = [-100] * n_context + ids[n_context:]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    expected_sum = -float(out.loss) * n_tokens
    predicted = out.logits[0, n_context - 1 : -1].argmax(dim=-1).tolist()

    assert got.n_tokens == n_tokens
    assert got.sum_logprob == pytest.approx(expected_sum, abs=1e-5)
    assert got.is_greedy == (predicted == ids[n_context:])


def test_a_trailing_space_scores_as_a_leading_one(
    adapted: tuple[PeftModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = adapted
    moved = loglikelihood(model, tokenizer, CONTEXT + " ", "Science fiction")
    leading = loglikelihood(model, tokenizer, CONTEXT, " Science fiction")
    assert moved == leading


def test_greedy_continuation_is_reported_greedy(
    adapted: tuple[PeftModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = adapted
    model_call = logits_of(model)

    def round_trips(context: str, token_id: int) -> bool:
        # A lone byte decodes to U+FFFD, which does not re-tokenise to itself.
        text = tokenizer.decode([token_id])
        return continuation_ids(tokenizer, context, text)[1] == [token_id]

    contexts = ("The quick brown", "The quick brown fox", CONTEXT, "Books, genres")
    for context in contexts:
        ranked = model_call(encode(tokenizer, context))[-1].argsort(descending=True).tolist()
        if round_trips(context, ranked[0]):
            break
    else:
        pytest.fail("no context's greedy next token re-tokenises to itself")
    runner_up = next(token for token in ranked[1:] if round_trips(context, token))
    greedy = loglikelihood(model, tokenizer, context, tokenizer.decode([ranked[0]]))
    other = loglikelihood(model, tokenizer, context, tokenizer.decode([runner_up]))
    assert greedy.is_greedy
    assert not other.is_greedy
    assert greedy.sum_logprob > other.sum_logprob
