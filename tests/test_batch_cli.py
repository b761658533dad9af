"""`consistory batch` and `consistory eval` as a user runs them: a fresh process that starts its
own local Ray and shuts it down, a ConsiStory+ YAML prompt set, nothing on stderr but the
command's own lines."""

import json
import os
import subprocess
import sys

from PIL import Image

PROMPT_SET = """\
food:
  - subject: A plate of delicate French macarons
    concept_token: macaron
    style: A professional food photograph of
    settings:
      - an array of delicate macarons on a porcelain plate
      - in a bakery window
      - on a picnic blanket
animals:
  - subject: a fluffy orange cat
    concept_token: cat
    style: A watercolor illustration of
    settings: [in a garden, on a sofa]
"""


def consistory(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "consistory.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=timeout)


def test_a_prompt_set_from_the_command_line_then_its_scores(tmp_path):
    spec = tmp_path / "consistory+.yaml"
    spec.write_text(PROMPT_SET)
    dest = tmp_path / "out"
    done = consistory("batch", str(spec), "--out", str(dest), "--model", "tiny", "--steps", "2", "--height", "64",
                      "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "2 stories: 2 made, 0 already done, 0 failed; 5 images" in done.stdout
    assert [line for line in done.stderr.splitlines() if not line.startswith("consistory: ")] == [], done.stderr
    manifest = json.loads((dest / "manifest.json").read_text())
    food = manifest["stories"][0]
    assert food["id"] == "food-0" and food["files"] == ["00.png", "01.png", "02.png"]
    assert food["prompts"][0] == ("A professional food photograph of A plate of delicate French macarons "
                                  "an array of delicate macarons on a porcelain plate")
    assert Image.open(dest / "stories" / "animals-0" / "grid.png").size == (128, 64)

    scored = consistory("eval", str(dest), "--clip", "tiny", "--no-progress")
    assert scored.returncode == 0, scored.stderr
    report = json.loads((dest / "eval" / "scores.json").read_text())
    assert report["overall"]["stories"] == 2 and report["consistency_metric"] == "clip-image-cosine"
    assert "the dreamsim package is not installed" in report["consistency_note"]
    assert "clip-image-cosine" in scored.stdout and scored.stderr == ""


def test_a_bad_spec_or_destination_is_one_line(tmp_path):
    spec = tmp_path / "stories.txt"
    spec.write_text("{}")
    done = consistory("batch", str(spec), "--out", str(tmp_path / "out"), "--model", "tiny", timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "use .jsonl or .yaml" in done.stderr
    done = consistory("batch", str(spec), "--out", "s3:///no-bucket", "--model", "tiny", timeout=60)
    assert done.returncode == 2 and "names no bucket" in done.stderr and "Traceback" not in done.stderr
