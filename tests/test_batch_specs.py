"""Batch specs as users write them: JSONL lines and ConsiStory+ YAML prompt sets, each story's
problems reported on their own, and the key that decides what a rerun skips."""

import pytest

from consistory.cli.main import build_parser
from consistory.errors import UsageError
from consistory.presets.tokenizer import build_local_clip_tokenizer
from consistory_batch.plans import plan_stories, story_key
from consistory_batch.specs import read_spec

CONSISTORY_PLUS = """\
food:
  - subject: A plate of delicate French macarons
    concept_token: macaron
    style: A professional food photograph of
    settings:
      - an array of delicate macarons on a porcelain plate
      - in a bakery window
fantasy:
  - subject: [A regal snow queen with icy beauty, a small white fox]
    concept_token: [snow queen, fox]
    style: A watercolor illustration of
    settings: [standing in a frozen forest, beside a fox on an ice throne]
  - concept_token: dragon
    settings: [over a castle]
"""


def batch_args(*extra):
    return build_parser().parse_args(["batch", "spec.jsonl", "--out", "out", "--model", "tiny", *extra])


def test_a_consistory_plus_prompt_set_becomes_stories(tmp_path):
    path = tmp_path / "consistory+.yaml"
    path.write_text(CONSISTORY_PLUS)
    stories, problems = read_spec(path, default_seed=7)
    assert [s.id for s in stories] == ["food-0", "fantasy-0"]
    food, queen = stories
    assert food.prompts == (
        "A professional food photograph of A plate of delicate French macarons an array of delicate macarons on a "
        "porcelain plate",
        "A professional food photograph of A plate of delicate French macarons in a bakery window",
    )
    assert food.subjects == ("macaron",) and food.seed == 7
    assert food.alignment_texts == ("an array of delicate macarons on a porcelain plate", "in a bakery window")
    assert queen.subjects == ("snow queen", "fox") and queen.alignment_source == "setting"
    assert queen.prompts[0].startswith("A watercolor illustration of A regal snow queen with icy beauty standing")
    assert [(p.id, p.source) for p in problems] == [("fantasy-1", "fantasy[1]")]
    assert "missing 'subject'" in problems[0].error


def test_every_story_of_the_prompt_set_passes_the_subject_check(tmp_path):
    """Subjects as the benchmark writes them, plurals included ("macaron" in "... macarons ...")."""
    path = tmp_path / "set.yaml"
    path.write_text(CONSISTORY_PLUS)
    stories, _ = read_spec(path)
    plans, problems = plan_stories(stories, batch_args(), "tiny", "float32", build_local_clip_tokenizer())
    assert problems == [] and [p.id for p in plans] == ["food-0", "fantasy-0"]


def test_bad_jsonl_lines_are_reported_one_by_one(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join([
        '{"id": "ok", "prompts": ["a dog", "a dog running"], "subjects": ["dog"]}',
        '{"id": "typo", "promts": ["a dog"], "subjects": ["dog"]}',
        '{"prompts": ["a dog"], "subjects": ["dog"]}',
        '# a comment, then a blank line',
        '',
        '{"id": "ok", "prompts": ["a cat", "a cat asleep"], "subjects": ["cat"]}',
        '{"id": "both", "prompts": ["a dog"], "settings": ["in a park"], "subjects": ["dog"]}',
        '{"id": "bad-seed", "prompts": ["a dog"], "subjects": ["dog"], "seed": "7"}',
        '{"id": "../escape", "prompts": ["a dog"], "subjects": ["dog"]}',
    ]))
    stories, problems = read_spec(path)
    assert [s.id for s in stories] == ["ok"]
    by_source = {p.source: p for p in problems}
    assert "unknown field(s) promts" in by_source["line 2"].error and by_source["line 2"].id == "typo"
    assert "'id' must be" in by_source["line 3"].error and by_source["line 3"].id is None
    assert "already used at line 1" in by_source["line 6"].error and by_source["line 6"].id is None
    assert "either 'prompts' or 'settings'" in by_source["line 7"].error
    assert "'seed' must be an integer" in by_source["line 8"].error
    assert "'id' must be" in by_source["line 9"].error


@pytest.mark.parametrize("name, text, fragment", [
    ("s.txt", "{}", "unknown spec format '.txt'"),
    ("s.yaml", "- just\n- a list\n", "mapping from category"),
    ("s.yaml", "a: [b\n", "not valid YAML"),
    ("s.jsonl", "\n\n", "holds no stories"),
])
def test_an_unreadable_spec_is_a_usage_error(tmp_path, name, text, fragment):
    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match=fragment):
        read_spec(tmp_path / name)
    with pytest.raises(UsageError, match="no spec file"):
        read_spec(tmp_path / "missing.jsonl")


def test_a_story_that_cannot_run_is_refused_before_any_model_loads(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join([
        '{"id": "one-prompt", "prompts": ["a dog"], "subjects": ["dog"], "n_anchors": 2}',
        '{"id": "no-subject", "prompts": ["a dog", "a cat"], "subjects": ["dog"]}',
        '{"id": "odd-size", "prompts": ["a dog", "a dog running"], "subjects": ["dog"], "height": 65}',
        '{"id": "fine", "prompts": ["a dog"], "subjects": ["dog"], "n_anchors": 1}',
        '{"id": "default-anchors", "prompts": ["a dog"], "subjects": ["dog"]}',
    ]))
    stories, _ = read_spec(path)
    plans, problems = plan_stories(stories, batch_args(), "tiny", "float32", build_local_clip_tokenizer())
    assert [p.id for p in plans] == ["fine", "default-anchors"]
    assert plans[1].config.n_anchors == 1  # as the CLI and the service: all the prompts it has
    errors = {p.id: p.error for p in problems}
    assert "n_anchors is 2 but the story has 1 prompt(s)" in errors["one-prompt"]
    assert "'a cat' contains none of the subjects" in errors["no-subject"]
    assert "height must be a multiple of 8" in errors["odd-size"]


def test_the_key_follows_what_shapes_the_images(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "prompts": ["a dog", "a dog running"], "subjects": ["dog"], "seed": 1}\n')
    (story,), _ = read_spec(path)
    (plan,), _ = plan_stories([story], batch_args(), "tiny", "float32", None)
    same = plan_stories([story], batch_args("--mode", "anchors", "--actors", "3"), "tiny", "float32", None)[0][0]
    assert same.key == plan.key  # how the work is spread does not change the images
    for changed in (batch_args("--steps", "3"), batch_args("--seed", "1", "--no-freeu")):
        assert plan_stories([story], changed, "tiny", "float32", None)[0][0].key != plan.key
    assert story_key("preset:tiny:1", "float32", story, plan.config) != plan.key
    assert story_key("tiny", "float16", story, plan.config) != plan.key


def test_a_story_that_sets_only_its_height_keeps_the_command_lines_width(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join([
        '{"id": "tall", "prompts": ["a dog", "a dog running"], "subjects": ["dog"], "height": 96}',
        '{"id": "wide", "prompts": ["a dog", "a dog running"], "subjects": ["dog"], "width": 96}',
    ]))
    stories, _ = read_spec(path)
    plans, _ = plan_stories(stories, batch_args("--width", "64"), "tiny", "float32", build_local_clip_tokenizer())
    assert [(p.config.height, p.config.width) for p in plans] == [(96, 64), (128, 96)]
    plans, _ = plan_stories(stories, batch_args(), "tiny", "float32", build_local_clip_tokenizer())
    assert [(p.config.height, p.config.width) for p in plans] == [(96, 96), (128, 96)]
