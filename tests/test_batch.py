"""`consistory batch` and `consistory eval` on a local Ray with 2 model actors (tiny preset, 64 px,
2 steps): every output lands in DEST, a story's images are the library's, a rerun recomputes
nothing, a killed actor's story is retried on the other actor, bad lines are reported while the
others complete, and S3 destinations work on a loopback moto server."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import ray
from PIL import Image
from s3_server import DUMMY_AWS_ENV, aws_dummy_credentials, s3_bucket, s3_client, s3_endpoint  # noqa: F401

from consistory import ConsiStoryConfig
from consistory.cli.main import build_parser, main
from consistory_batch.runner import run_batch
from deployments.local import init_ray

TINY = ["--model", "tiny", "--steps", "2", "--height", "64", "--cpus-per-actor", "0.5", "--no-progress"]
CONFIG = ConsiStoryConfig(num_inference_steps=2, height=64, width=64)
GOOD = [
    {"id": "dog-park", "prompts": ["a dog in the park", "a dog on the beach", "a dog in the snow"], "subjects": ["dog"],
     "seed": 1},
    {"id": "cat-settings", "subjects": ["cat"], "settings": ["in a box", "on a sofa"], "seed": 2},
    {"id": "fox-plural", "prompts": ["a fox in the forest", "two foxes by a river"], "subjects": ["fox"], "seed": 3},
    {"id": "owl-night", "prompts": ["an owl at night", "an owl in a barn", "an owl on a branch"], "subjects": ["owl"]},
    {"id": "robot-city", "prompts": ["a robot in the city", "a robot in a garden"], "subjects": ["robot"], "seed": 9},
    {"id": "bear-ice", "prompts": ["a polar bear on the ice", "a polar bear in the sea"], "subjects": ["polar bear"],
     "seed": 4, "n_anchors": 1},
]
BAD_LINES = [
    json.dumps({"id": "no-subject", "prompts": ["a dog in the park", "a cat on a mat"], "subjects": ["dog"]}),
    "{this line is not JSON",
]


def write_jsonl(path, stories, extra_lines=()):
    path.write_text("\n".join([json.dumps(s) for s in stories] + list(extra_lines)) + "\n")
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def manifest_of(dest):
    return json.loads((dest / "manifest.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module, 2 CPUs; its workers get the moto server's dummy AWS keys
    (and nothing that could reach real credentials) for the S3 test."""
    worker_env = {**DUMMY_AWS_ENV, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    init_ray(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": worker_env})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """6 good stories and 2 bad lines on 2 actors."""
    root = tmp_path_factory.mktemp("batch")
    spec = write_jsonl(root / "stories.jsonl", GOOD, BAD_LINES)
    dest = root / "out"
    code = main(["batch", str(spec), "--out", str(dest), "--actors", "2", *TINY])
    return code, spec, dest


def test_every_story_lands_in_dest_with_the_manifest(first_run):
    code, _, dest = first_run
    manifest = manifest_of(dest)
    done = {s["id"]: s for s in manifest["stories"] if s["status"] == "done"}
    assert set(done) == {s["id"] for s in GOOD}
    for story in GOOD:
        folder = dest / "stories" / story["id"]
        count = len(story.get("prompts") or story.get("settings"))
        names = [f"{i:02d}.png" for i in range(count)]
        assert done[story["id"]]["files"] == names
        for name in names:
            assert Image.open(folder / name).size == (64, 64)
        assert Image.open(folder / "grid.png").size == (64 * count, 64)
        record = json.loads((folder / "story.json").read_text())
        assert record["key"] == done[story["id"]]["key"] and record["model"] == "preset:tiny:0"
        assert record["seeds"] == [story.get("seed", 0) + i for i in range(count)]
    assert done["cat-settings"]["prompts"] == ["A photo of a cat in a box", "A photo of a cat on a sofa"]
    assert done["cat-settings"]["alignment_texts"] == ["in a box", "on a sofa"]
    summary = manifest["summary"]
    assert summary["made"] == 6 and summary["images"] == 14 and summary["replicas"] == 2
    assert summary["images_per_s_per_replica"] > 0 and len(summary["per_replica"]) == 2


def test_a_bad_line_is_reported_while_the_others_complete(first_run, capsys):
    code, _, dest = first_run
    assert code == 1  # some stories failed: scripts can tell
    manifest = manifest_of(dest)
    failed = {s["id"]: s for s in manifest["stories"] if s["status"] == "failed"}
    assert "'a cat on a mat' contains none of the subjects" in failed["no-subject"]["error"]
    assert manifest["problems"] == [{"source": "line 8", "error": "line 8: not JSON (Expecting property name "
                                                                   "enclosed in double quotes at column 2)"}]
    assert manifest["summary"]["failed"] == 2 and not (dest / "stories" / "no-subject").exists()


@pytest.mark.parametrize("story", [GOOD[0], GOOD[1], GOOD[5]], ids=lambda s: s["id"])
def test_a_story_equals_generate_story(first_run, tiny_pipe, story):
    _, _, dest = first_run
    record = json.loads((dest / "stories" / story["id"] / "story.json").read_text())
    config = CONFIG.replace(n_anchors=story.get("n_anchors", 2))
    expected = tiny_pipe.generate_story(record["prompts"], story["subjects"], seed=story.get("seed", 0), config=config)
    for name, image in zip(record["files"], expected.images):
        # The same computation in another process (1 torch thread): at most 1 level of rounding.
        diff = np.abs(pixels(dest / "stories" / story["id"] / name) - np.asarray(image, dtype=np.int16))
        assert diff.max() <= 1


def test_a_rerun_recomputes_nothing(first_run, capsys):
    _, spec, dest = first_run
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in (dest / "stories").rglob("*")}
    assert main(["batch", str(spec), "--out", str(dest), "--actors", "2", *TINY]) == 1  # the bad lines again
    summary = manifest_of(dest)["summary"]
    assert summary["made"] == 0 and summary["already_done"] == 6 and summary["replicas"] == 0
    assert {p: p.stat().st_mtime_ns for p in (dest / "stories").rglob("*")} == stamps
    assert "0 to make" in capsys.readouterr().err


def test_a_changed_setting_remakes_only_that_story(first_run, tmp_path):
    _, _, dest = first_run
    copy = tmp_path / "out"
    shutil.copytree(dest, copy)
    changed = [dict(s, seed=50) if s["id"] == "owl-night" else s for s in GOOD]
    spec = write_jsonl(tmp_path / "changed.jsonl", changed)
    before = (copy / "stories" / "dog-park" / "00.png").stat().st_mtime_ns
    assert main(["batch", str(spec), "--out", str(copy), "--actors", "1", *TINY]) == 0
    manifest = manifest_of(copy)
    assert manifest["summary"]["made"] == 1 and manifest["summary"]["already_done"] == 5
    owl = json.loads((copy / "stories" / "owl-night" / "story.json").read_text())
    assert owl["seeds"] == [50, 51, 52]
    assert (copy / "stories" / "dog-park" / "00.png").stat().st_mtime_ns == before


def test_a_killed_actor_is_retried_on_the_other_actor(tmp_path):
    """SIGKILL an actor's process right after it is handed a story, once a story has finished."""
    spec = write_jsonl(tmp_path / "stories.jsonl", GOOD)
    args = build_parser().parse_args(["batch", str(spec), "--out", str(tmp_path / "out"), "--actors", "2", *TINY])
    pids, finished, killed = {}, [], []

    def on_event(event, **fields):
        if event == "actor_ready":
            pids[fields["actor"]] = fields["pid"]
        elif event == "done":
            finished.append(fields["story"])
        elif event == "started" and finished and not killed and fields["actor"] in pids:
            os.kill(pids[fields["actor"]], signal.SIGKILL)
            killed.append((fields["story"], fields["actor"]))

    assert run_batch(args, on_event=on_event) == 0
    assert killed, "no story started after the first one finished"
    story_id, actor = killed[0]
    manifest = manifest_of(tmp_path / "out")
    entries = {s["id"]: s for s in manifest["stories"]}
    assert all(s["status"] == "done" for s in entries.values()) and len(entries) == 6
    assert entries[story_id]["attempts"] == 2 and entries[story_id]["actors"] == [1 - actor]
    assert manifest["summary"]["retries"] == 1
    assert [r["deaths"] for r in manifest["summary"]["per_replica"]][actor] == 1


def test_anchors_mode_extends_from_the_cache_and_equals_generate_story(tmp_path, tiny_pipe):
    story = {"id": "dog-long", "subjects": ["dog"], "seed": 6,
             "prompts": ["a dog in the park", "a dog on the beach", "a dog in the snow", "a dog on a boat",
                         "a dog reading a book"]}
    spec = write_jsonl(tmp_path / "stories.jsonl", [story, GOOD[4]])
    dest = tmp_path / "out"
    argv = ["batch", str(spec), "--out", str(dest), "--actors", "2", "--mode", "anchors", "--extend-batch", "2", *TINY]
    assert main(argv) == 0
    record = json.loads((dest / "stories" / "dog-long" / "story.json").read_text())
    assert record["mode"] == "anchors" and record["n_anchors"] == 2
    expected = tiny_pipe.generate_story(story["prompts"], story["subjects"], seed=6, config=CONFIG).images
    for name, image in zip(record["files"], expected):
        assert np.abs(pixels(dest / "stories" / "dog-long" / name) - np.asarray(image, dtype=np.int16)).max() <= 1
    assert Image.open(dest / "stories" / "dog-long" / "grid.png").size == (5 * 64, 64)
    assert manifest_of(dest)["summary"]["images"] == 7


@pytest.mark.usefixtures("aws_dummy_credentials")
def test_an_s3_destination_on_a_loopback_server(tmp_path, s3_endpoint, s3_bucket, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("CONSISTORY_S3_ENDPOINT_URL", s3_endpoint)
    spec = write_jsonl(tmp_path / "stories.jsonl", GOOD[:2])
    dest = f"s3://{s3_bucket}/runs/first"
    assert main(["batch", str(spec), "--out", dest, "--actors", "1", *TINY]) == 0
    client = s3_client(s3_endpoint)
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/first/")["Contents"]}
    for story in GOOD[:2]:
        for name in ("00.png", "01.png", "grid.png", "story.json"):
            assert f"runs/first/stories/{story['id']}/{name}" in listed
    manifest = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/first/manifest.json")["Body"].read())
    assert [s["status"] for s in manifest["stories"]] == ["done", "done"]
    # A rerun reads the manifest from the bucket and makes nothing; eval reads the images there.
    assert main(["batch", str(spec), "--out", dest, "--actors", "1", *TINY]) == 0
    assert "2 already done, 0 to make" in capsys.readouterr().err
    assert main(["eval", dest, "--clip", "tiny", "--no-progress"]) == 0
    scores = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/first/eval/scores.json")["Body"].read())
    assert scores["overall"]["stories"] == 2
    png = client.get_object(Bucket=s3_bucket, Key="runs/first/eval/scatter.png")["Body"].read()
    assert png.startswith(b"\x89PNG")


def test_eval_scores_the_finished_stories(first_run, tmp_path):
    _, _, dest = first_run
    assert main(["eval", str(dest), "--clip", "tiny", "--no-progress"]) == 0
    report = json.loads((dest / "eval" / "scores.json").read_text())
    assert report["consistency_metric"] == "clip-image-cosine" and "dreamsim" in report["consistency_note"]
    assert [s["id"] for s in report["stories"]] == sorted(s["id"] for s in GOOD)
    by_id = {s["id"]: s for s in report["stories"]}
    assert by_id["cat-settings"]["alignment_source"] == "setting" and by_id["dog-park"]["alignment_source"] == "prompt"
    assert set(by_id["dog-park"]["alignment_per_image"]) == {"00.png", "01.png", "02.png"}
    for story in report["stories"]:
        assert -1.0 <= story["alignment"] <= 1.0 and -1.0 <= story["consistency"] <= 1.0 + 1e-9
    assert report["overall"]["images"] == 14
    assert Image.open(dest / "eval" / "scatter.png").format == "PNG"
    # Deterministic, and independent of the order the manifest lists stories and files in.
    shuffled = tmp_path / "shuffled"
    shutil.copytree(dest, shuffled)
    manifest = manifest_of(shuffled)
    manifest["stories"].reverse()
    for entry in manifest["stories"]:
        if entry["status"] == "done":
            order = list(reversed(range(len(entry["files"]))))
            entry["files"] = [entry["files"][i] for i in order]
            entry["alignment_texts"] = [entry["alignment_texts"][i] for i in order]
    (shuffled / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", str(shuffled), "--clip", "tiny", "--no-progress", "--report", str(tmp_path / "r")]) == 0
    again = json.loads((tmp_path / "r" / "scores.json").read_text())
    assert again["stories"] == report["stories"] and again["overall"] == report["overall"]
