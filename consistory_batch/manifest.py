"""DEST/manifest.json: every story of the spec, done or failed, and the last run's summary.

A story is done when its story.json is stored with the story's key; the manifest gathers those
records in one object so that a rerun (and `consistory eval`) reads one file instead of one per
story. It is written every MANIFEST_EVERY_S seconds and at the end; a story finished after the
last write is still found on rerun through its story.json.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from .destination import MANIFEST_KEY, STORY_RECORD, read_json, story_file, write_json
from .plans import StoryPlan
from .specs import SpecProblem

FORMAT = 1
MANIFEST_EVERY_S = 30.0
# Stories checked for a story.json at once on resume (HEAD/GET requests on S3).
_RESUME_THREADS = 16


class Manifest:
    def __init__(self, store, spec: str, previous: dict[str, Any] | None = None) -> None:
        self.store = store
        self.spec = spec
        previous = previous if isinstance(previous, dict) and previous.get("format") == FORMAT else {}
        # Stories of earlier runs stay listed (their files are still in DEST) unless this run redoes them.
        self.stories: dict[str, dict[str, Any]] = {s["id"]: s for s in previous.get("stories", []) if "id" in s}
        self.problems: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    @classmethod
    def load(cls, store, spec: str) -> "Manifest":
        return cls(store, spec, read_json(store, MANIFEST_KEY))

    # --- resume ---
    def finished(self, plans: list[StoryPlan]) -> set[str]:
        """Ids of the plans already made with the same key: listed as done here, or (finished
        after the manifest was last written) holding a story.json with that key."""
        done = {p.id for p in plans if self._done_with(self.stories.get(p.id), p.key)}
        unknown = [p for p in plans if p.id not in done]
        with ThreadPoolExecutor(_RESUME_THREADS) as pool:
            records = pool.map(lambda p: read_json(self.store, story_file(p.id, STORY_RECORD)), unknown)
            for plan, record in zip(unknown, records):
                if isinstance(record, dict) and record.get("key") == plan.key:
                    self.record_done(record, attempts=None)
                    done.add(plan.id)
        return done

    @staticmethod
    def _done_with(entry: dict[str, Any] | None, key: str) -> bool:
        return bool(entry) and entry.get("status") == "done" and entry.get("key") == key

    # --- what happened ---
    def record_done(self, record: dict[str, Any], attempts: int | None, actors: Iterable[int] = ()) -> None:
        entry = {
            "id": record["id"], "status": "done", "key": record["key"], "source": record.get("source"),
            "dir": story_file(record["id"], "").rstrip("/"), "files": record["files"], "grid": record["grid"],
            "prompts": record["prompts"], "subjects": record["subjects"], "seeds": record["seeds"],
            "alignment_texts": record["alignment_texts"], "alignment_source": record["alignment_source"],
            "seconds": round(float(sum(v for k, v in record.get("timings", {}).items() if k == "total_s")), 3),
        }
        if attempts is not None:
            entry["attempts"] = attempts
        if actors:
            entry["actors"] = sorted(set(actors))
        self.stories[record["id"]] = entry

    def record_failed(self, story_id: str, source: str, error: str, key: str | None = None,
                      attempts: int = 0) -> None:
        self.stories[story_id] = {"id": story_id, "status": "failed", "key": key, "source": source, "error": error,
                                  "attempts": attempts}

    def record_problem(self, problem: SpecProblem) -> None:
        """A spec line that could not be read as a story (no usable id): kept by its source."""
        if problem.id is not None:
            self.record_failed(problem.id, problem.source, problem.error)
        else:
            self.problems.append({"source": problem.source, "error": problem.error})

    def order(self, ids: list[str]) -> None:
        """This spec's stories first, in spec order; earlier runs' others after them."""
        ordered = {i: self.stories[i] for i in ids if i in self.stories}
        ordered.update({i: s for i, s in self.stories.items() if i not in ordered})
        self.stories = ordered

    def write(self) -> None:
        write_json(self.store, MANIFEST_KEY, {
            "format": FORMAT, "spec": self.spec, "summary": self.summary,
            "stories": list(self.stories.values()), "problems": self.problems,
        })
