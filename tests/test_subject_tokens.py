"""Subject token positions: single tokens, sub-word pieces, phrases, and a missing subject."""

import pytest

from consistory.method.subject_tokens import find_subject_tokens
from consistory.presets.tokenizer import build_local_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_local_clip_tokenizer()


def _pieces(tokenizer, prompt, positions):
    ids = tokenizer(prompt.lower())["input_ids"]
    return tokenizer.decode([ids[p] for p in positions]).replace(" ", "")


def test_single_token_subject(tokenizer):
    tokens = find_subject_tokens(tokenizer, ["A photo of a Dog in the park"], ["dog"])
    (positions,) = tokens.positions[0]
    assert len(positions) == 1 and _pieces(tokenizer, "A photo of a Dog in the park", positions) == "dog"
    w = tokens.weights()
    assert w.shape == (1, 1, 77) and abs(float(w.sum()) - 1.0) < 1e-6


def test_multi_piece_subject_uses_all_pieces(tokenizer):
    prompt = "a zorblax hedgehogzz in the snow"
    (positions,) = find_subject_tokens(tokenizer, [prompt], ["hedgehogzz"]).positions[0]
    assert len(positions) > 1
    assert _pieces(tokenizer, prompt, positions) == "hedgehogzz"


def test_phrase_and_reworded_phrase(tokenizer):
    tokens = find_subject_tokens(
        tokenizer, ["a polar bear on the ice", "the hat of an old wizard"], ["polar bear", "wizard hat"]
    )
    bear, hat = tokens.positions[0]
    assert _pieces(tokenizer, "a polar bear on the ice", bear) == "polarbear" and hat == ()
    bear2, hat2 = tokens.positions[1]
    assert bear2 == () and _pieces(tokenizer, "the hat of an old wizard", hat2) == "hatwizard"
    assert tokens.present.tolist() == [[True, False], [False, True]]


def test_a_subject_is_not_found_inside_a_longer_word(tokenizer):
    tokens = find_subject_tokens(tokenizer, ["a hotdog next to a dog"], ["dog"])
    (positions,) = tokens.positions[0]
    assert _pieces(tokenizer, "a hotdog next to a dog", positions) == "dog"
    with pytest.raises(ValueError, match="hotdog"):
        find_subject_tokens(tokenizer, ["a hotdog on a plate"], ["dog"])


def test_a_prompt_without_any_subject_is_rejected_by_name(tokenizer):
    with pytest.raises(ValueError, match="a cat on a sofa") as info:
        find_subject_tokens(tokenizer, ["a dog in the park", "a cat on a sofa"], ["dog"])
    assert "dog" in str(info.value)


@pytest.mark.parametrize("subjects", [[], [""], ["  "]])
def test_empty_subjects_are_rejected(tokenizer, subjects):
    with pytest.raises(ValueError, match="subjects"):
        find_subject_tokens(tokenizer, ["a dog"], subjects)


@pytest.mark.parametrize(
    "subject, prompt, spelled",
    [
        ("macaron", "an array of delicate macarons on a porcelain plate", "macarons"),  # as a new user wrote it
        ("macarons", "a macaron on a plate", "macaron"),  # and the other way round
        ("box", "three boxes on a shelf", "boxes"),
        ("puppy", "two puppies playing", "puppies"),
        ("polar bear", "two polar bears on the ice", "polarbears"),
        ("wizard hat", "the hats of two old wizards", "hatswizards"),
    ],
)
def test_a_subject_matches_its_plural(tokenizer, subject, prompt, spelled):
    (positions,) = find_subject_tokens(tokenizer, [prompt], [subject]).positions[0]
    assert _pieces(tokenizer, prompt, positions) == spelled


@pytest.mark.parametrize(
    "subject, prompt",
    [("dog", "a hotdog on a plate"), ("dog", "a dogma of the church"), ("hat", "a cat hates the rain"),
     ("cat", "a catalog of toys")],
)
def test_longer_words_that_contain_the_subject_do_not_match(tokenizer, subject, prompt):
    with pytest.raises(ValueError, match="contains none of the subjects"):
        find_subject_tokens(tokenizer, [prompt], [subject])
