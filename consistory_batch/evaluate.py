"""`consistory eval DEST`: a finished batch scored the way the paper scores its method.

- Prompt alignment: the cosine between an image's CLIP embedding and that of the setting part of
  its prompt (the whole prompt where the spec did not name a setting), averaged per story.
- Subject consistency: the mean similarity over every pair of a story's images (DreamSim where
  present, else CLIP image cosine; see `consistency`).
- Overall: the mean of the stories' scores, each story weighing the same.

Stories are scored in id order and a story's images in file order, whatever order the manifest
lists them in, so a report depends only on the images and the texts.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from PIL import Image

from consistory.errors import UsageError
from consistory.loading import resolve_device

from .consistency import mean_pairwise_similarity
from .destination import EVAL_PREFIX, MANIFEST_KEY, parse_destination, read_json, story_file

REPORT_NAME, SCATTER_NAME = "scores.json", "scatter.png"


def score_stories(stories: Iterable[dict[str, Any]], load_image: Callable[[str, str], Image.Image], clip,
                  consistency, progress: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Per-story and overall scores of finished stories (manifest entries with `files` and
    `alignment_texts`); `load_image(story_id, file_name)` reads an image."""
    scored = []
    for story in sorted(stories, key=lambda s: s["id"]):
        pairs = sorted(zip(story["files"], story["alignment_texts"]))
        images = [load_image(story["id"], name) for name, _ in pairs]
        image_vectors = clip.images(images)
        cosines = (image_vectors * clip.texts([text for _, text in pairs])).sum(dim=-1)  # (N,)
        set_vectors = image_vectors if consistency is clip else consistency.images(images)
        scored.append({
            "id": story["id"],
            "images": len(images),
            "alignment": float(cosines.double().mean()),
            "consistency": mean_pairwise_similarity(set_vectors),
            "alignment_source": story.get("alignment_source", "prompt"),
            "alignment_per_image": {name: float(c) for (name, _), c in zip(pairs, cosines)},
        })
        progress(len(images))
    with_sets = [s["consistency"] for s in scored if s["consistency"] is not None]
    overall = {
        "stories": len(scored),
        "images": sum(s["images"] for s in scored),
        "alignment": sum(s["alignment"] for s in scored) / len(scored) if scored else None,
        "consistency": sum(with_sets) / len(with_sets) if with_sets else None,
    }
    return {"overall": overall, "stories": scored}


def run_eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .consistency import consistency_embedder

    destination = parse_destination(args.dest)
    store = destination.open()
    manifest = read_json(store, MANIFEST_KEY)
    if not isinstance(manifest, dict):
        raise UsageError(f"no manifest.json in {args.dest}; run `consistory batch SPEC --out {args.dest}` first")
    stories = [s for s in manifest.get("stories", []) if s.get("status") == "done"]
    if not stories:
        raise UsageError(f"{args.dest} holds no finished story to score")
    device = resolve_device(args.device)
    clip = _load_clip(args.clip, device)
    embedder, metric, note = consistency_embedder(args.consistency, clip, device, args.dreamsim_cache)

    def load_image(story_id: str, name: str) -> Image.Image:
        from deployments.artifact_store import ArtifactNotFound

        try:
            return Image.open(io.BytesIO(store.get(story_file(story_id, name)))).convert("RGB")
        except ArtifactNotFound:
            raise UsageError(f"{args.dest}: the manifest lists {name} of story {story_id!r}, "
                             "which is not there") from None

    with tqdm(total=sum(len(s["files"]) for s in stories), unit="image", disable=args.no_progress,
              desc="scoring") as bar:
        report = score_stories(stories, load_image, clip, embedder, bar.update)
    report = {
        "clip": args.clip,
        "alignment_metric": "clip-image-text-cosine",
        "consistency_metric": metric,
        "consistency_note": note,
        "dest": args.dest,
        **report,
    }
    where = _write(report, args.report, store, args.dest)
    overall = report["overall"]
    consistency = "n/a" if overall["consistency"] is None else f"{overall['consistency']:.4f}"
    print(f"{overall['stories']} stories, {overall['images']} images: prompt alignment {overall['alignment']:.4f} "
          f"(CLIP {args.clip}), subject consistency {consistency} ({report['consistency_metric']}: {note})")
    print(f"wrote {where}{REPORT_NAME} and {where}{SCATTER_NAME}")
    return 0


def _load_clip(name: str, device: torch.device):
    from consistory.hub_access import cache_only
    from consistory.loading import is_local_model

    from .clip_scores import ClipEmbedder

    if name == "tiny":
        return ClipEmbedder.tiny(device=device)
    if is_local_model(name):
        return ClipEmbedder.load(str(Path(name).expanduser().resolve()), device)
    return ClipEmbedder.load(name, device, cache_only=cache_only(name, filename="config.json", option="--clip"))


def _write(report: dict[str, Any], report_dir: str | None, store, dest: str) -> str:
    from .scatter import scatter_png

    text = json.dumps(report, indent=2) + "\n"
    png = scatter_png(report)
    if report_dir:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_NAME).write_text(text)
        (out / SCATTER_NAME).write_bytes(png)
        return f"{out}/"
    store.put(EVAL_PREFIX + REPORT_NAME, text.encode(), "application/json")
    store.put(EVAL_PREFIX + SCATTER_NAME, png, "image/png")
    return f"{dest.rstrip('/')}/{EVAL_PREFIX}"

