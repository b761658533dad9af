"""Story specifications: a JSONL file (one story per line) or a ConsiStory+ YAML prompt set.

JSONL, one JSON object per line (blank lines and lines starting with '#' are skipped)::

    {"id": "fox-1", "prompts": ["a red fox in the snow", "a red fox by a river"], "subjects": ["fox"], "seed": 7}
    {"id": "owl-1", "subjects": ["owl"], "style": "A watercolor of", "settings": ["at night", "in a barn"]}

with optional `n_anchors`, `steps`, `height`, `width`, `guidance`, `mask_dropout`. A line with
`settings` instead of `prompts` builds its prompts as `consistory generate --settings` does
(style, then the `subject` description or the first subject word with its article, then the
setting) and is scored against the settings by `consistory eval`.

YAML, the ConsiStory+ benchmark's format: a mapping from category to a list of entries, each a
story whose prompts are "{style} {subject} {setting}"::

    fantasy:
      - subject: A regal snow queen with icy beauty
        concept_token: snow queen
        style: A watercolor illustration of
        settings: [standing in a frozen forest, sitting on an ice throne]

`concept_token` and `subject` may be lists (several subjects; the prompt uses the first
description). Stories are named "<category>-<index>"; an entry may give its own `id` and `seed`.

A problem with one story (a missing field, a wrong type) is reported for that story alone; a
file that cannot be read at all is a UsageError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consistory.cli.options import DEFAULT_STYLE
from consistory.errors import UsageError
from consistory.cli.prompt_text import setting_prompt

# A story id names its directory in DEST (local or S3): keep it to safe characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Per-story sampling settings: the spec's name -> ConsiStoryConfig's field.
STORY_SETTINGS = {"n_anchors": "n_anchors", "steps": "num_inference_steps", "height": "height", "width": "width",
                  "guidance": "guidance_scale", "mask_dropout": "mask_dropout"}
_JSONL_FIELDS = {"id", "prompts", "subjects", "seed", "settings", "style", "subject", *STORY_SETTINGS}
_YAML_FIELDS = {"subject", "concept_token", "style", "settings", "id", "seed"}


@dataclass(frozen=True)
class StorySpec:
    id: str
    prompts: tuple[str, ...]
    subjects: tuple[str, ...]
    seed: int
    # What prompt alignment is scored against, one per prompt: the setting part where the spec
    # names it (the paper scores the setting, not the subject's description), else the prompt.
    alignment_texts: tuple[str, ...]
    alignment_source: str  # "setting" or "prompt"
    config_values: dict[str, Any] = field(default_factory=dict)  # ConsiStoryConfig field -> value
    source: str = ""  # where it was written: "line 3", "fantasy[0]"


@dataclass(frozen=True)
class SpecProblem:
    """A story that cannot run as written; `id` is None where the spec did not say one."""

    id: str | None
    source: str
    error: str


class _Bad(Exception):
    pass


def read_spec(path: str | Path, default_seed: int = 0) -> tuple[list[StorySpec], list[SpecProblem]]:
    """The stories of a .jsonl or .yaml/.yml file, in file order, and the problems found."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no spec file at {str(path)!r}; give a .jsonl file or a .yaml ConsiStory+ prompt set")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; a spec is JSONL or YAML") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        stories, problems = _read_jsonl(text, default_seed)
    elif suffix in (".yaml", ".yml"):
        stories, problems = _read_yaml(text, path, default_seed)
    else:
        raise UsageError(f"{path}: unknown spec format {suffix or '(no extension)'!r}; use .jsonl or .yaml")
    stories, problems = _unique_ids(stories, problems)
    if not stories and not problems:
        raise UsageError(f"{path} holds no stories")
    return stories, problems


# --- JSONL ---
def _read_jsonl(text: str, default_seed: int) -> tuple[list[StorySpec], list[SpecProblem]]:
    stories, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        source = f"line {number}"
        entry: Any = None
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise _Bad(f"expected a JSON object, got {type(entry).__name__}")
            stories.append(_jsonl_story(entry, source, default_seed))
        except json.JSONDecodeError as error:
            problems.append(SpecProblem(None, source, f"{source}: not JSON ({error.msg} at column {error.colno})"))
        except _Bad as error:
            story_id = entry.get("id") if isinstance(entry, dict) and isinstance(entry.get("id"), str) else None
            problems.append(SpecProblem(story_id, source, f"{source}: {error}"))
    return stories, problems


def _jsonl_story(entry: dict[str, Any], source: str, default_seed: int) -> StorySpec:
    unknown = sorted(set(entry) - _JSONL_FIELDS)
    if unknown:
        raise _Bad(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_JSONL_FIELDS))}")
    story_id = _story_id(entry.get("id"))
    subjects = _texts(entry.get("subjects"), "subjects", allow_single=True)
    if ("prompts" in entry) == ("settings" in entry):
        raise _Bad("give either 'prompts' or 'settings' (with an optional 'style' and 'subject')")
    if "prompts" in entry:
        prompts = _texts(entry["prompts"], "prompts")
        texts, alignment = prompts, "prompt"
    else:
        settings = _texts(entry["settings"], "settings")
        style = _text(entry.get("style", DEFAULT_STYLE), "style", allow_empty=True)
        subject = _text(entry.get("subject", subjects[0]), "subject")
        prompts = [setting_prompt(style, subject, setting) for setting in settings]
        texts, alignment = settings, "setting"
    return StorySpec(
        id=story_id, prompts=tuple(prompts), subjects=tuple(subjects), seed=_seed(entry.get("seed", default_seed)),
        alignment_texts=tuple(texts), alignment_source=alignment, config_values=_story_settings(entry), source=source,
    )


# --- ConsiStory+ YAML ---
def _read_yaml(text: str, path: Path, default_seed: int) -> tuple[list[StorySpec], list[SpecProblem]]:
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path}: a ConsiStory+ prompt set is a mapping from category to a list of stories")
    stories, problems = [], []
    for category, entries in document.items():
        if not isinstance(entries, list):
            problems.append(SpecProblem(None, str(category), f"category {category!r}: expected a list of stories"))
            continue
        for index, entry in enumerate(entries):
            source = f"{category}[{index}]"
            default_id = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{category}-{index}").lstrip("._-") or f"story-{index}"
            try:
                if not isinstance(entry, dict):
                    raise _Bad(f"expected a mapping, got {type(entry).__name__}")
                stories.append(_yaml_story(entry, source, default_id, default_seed))
            except _Bad as error:
                problems.append(SpecProblem(default_id, source, f"{source}: {error}"))
    return stories, problems


def _yaml_story(entry: dict[str, Any], source: str, default_id: str, default_seed: int) -> StorySpec:
    unknown = sorted(set(entry) - _YAML_FIELDS)
    if unknown:
        raise _Bad(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_YAML_FIELDS))}")
    for name in ("subject", "concept_token", "settings"):
        if name not in entry:
            raise _Bad(f"missing {name!r}")
    subjects = _texts(entry["concept_token"], "concept_token", allow_single=True)
    descriptions = _texts(entry["subject"], "subject", allow_single=True)
    style = _text(entry.get("style", ""), "style", allow_empty=True)
    settings = _texts(entry["settings"], "settings")
    # The benchmark's own rule, word for word: "{style} {subject} {setting}".
    prompts = [" ".join(p for p in (style.strip(), descriptions[0].strip(), s.strip()) if p) for s in settings]
    return StorySpec(
        id=_story_id(entry.get("id", default_id)), prompts=tuple(prompts), subjects=tuple(subjects),
        seed=_seed(entry.get("seed", default_seed)), alignment_texts=tuple(settings), alignment_source="setting",
        source=source,
    )


# --- fields ---
def _story_id(value: Any) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise _Bad(f"'id' must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (got {value!r})")
    return value


def _text(value: Any, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise _Bad(f"{name!r} must be a non-empty string (got {value!r})")
    return value


def _texts(value: Any, name: str, allow_single: bool = False) -> list[str]:
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _Bad(f"{name!r} must be a non-empty list of strings (got {value!r})")
    return [_text(v, name) for v in value]


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**63 - 1:
        raise _Bad(f"'seed' must be an integer in [0, 2**63 - 1] (got {value!r})")
    return value


def _story_settings(entry: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for name, config_field in STORY_SETTINGS.items():
        if name in entry:
            value = entry[name]
            numeric = (int, float) if name in ("guidance", "mask_dropout") else (int,)
            if isinstance(value, bool) or not isinstance(value, numeric):
                raise _Bad(f"{name!r} must be a number (got {value!r})")
            values[config_field] = value
    return values


def _unique_ids(stories: list[StorySpec], problems: list[SpecProblem]) -> tuple[list[StorySpec], list[SpecProblem]]:
    """The first story of an id runs; a later one with the same id is a problem (both would
    write DEST/stories/<id>/)."""
    seen: dict[str, str] = {}
    kept = []
    for story in stories:
        if story.id in seen:
            problems.append(SpecProblem(None, story.source,
                                        f"{story.source}: id {story.id!r} is already used at {seen[story.id]}"))
        else:
            seen[story.id] = story.source
            kept.append(story)
    return kept, problems
