from golem_sidecar.grading import CONTAINS, EXACT_MATCH, TOKEN_F1, grade, normalize


def test_normalize_drops_case_punctuation_articles_and_spaces() -> None:
    assert normalize("  The Hobbit,  is A   Fantasy! ") == "hobbit is fantasy"


def test_exact_match_after_normalisation_scores_one() -> None:
    g = grade(" Fantasy.", "fantasy")
    assert (g.score, g.rule) == (1.0, EXACT_MATCH)


def test_contains_match_is_word_bounded() -> None:
    assert grade("It is a fantasy novel", "Fantasy").rule == CONTAINS
    assert grade("It is a fantasy novel", "Fantasy").score == 1.0
    assert grade("fantasyland", "fantasy").rule == TOKEN_F1


def test_otherwise_token_f1_in_unit_interval() -> None:
    g = grade("science fiction", "fiction horror")
    assert g.rule == TOKEN_F1
    assert g.score == 0.5
    assert grade("horror", "romance").score == 0.0
    assert grade("", "romance").score == 0.0
