"""Prompts built from --style, the subject and --settings read as a person would write them."""

import pytest

from consistory.cli.prompt_text import setting_prompt


@pytest.mark.parametrize(
    "style, subject, expected",
    [
        ("A photo of", "dog", "A photo of a dog in the park"),
        ("A photo of ", "old wizard", "A photo of an old wizard in the park"),  # trailing space or not
        ("A photo of", "unicorn", "A photo of a unicorn in the park"),  # the sound, not the letter
        ("A photo of", "hourglass", "A photo of an hourglass in the park"),
        ("A photo of the", "dog", "A photo of the dog in the park"),  # the style chose the article
        ("A photo of", "my dog", "A photo of my dog in the park"),
        ("A photo of", "two dogs", "A photo of two dogs in the park"),
        ("A photo of", "cats", "A photo of cats in the park"),
        ("A photo of", "Sherlock Holmes", "A photo of Sherlock Holmes in the park"),  # a name
        ("A photo of", "glass vase", "A photo of a glass vase in the park"),
    ],
)
def test_setting_prompts_read_as_sentences(style, subject, expected):
    assert setting_prompt(style, subject, "in the park") == expected


def test_no_style_gives_the_subject_and_setting():
    assert setting_prompt("", "dog", "  on a boat ") == "a dog on a boat"
