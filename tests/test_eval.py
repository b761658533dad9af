"""`consistory eval`'s scores on a tiny random CLIP built locally: the values mean nothing, but
the shapes, the determinism and the identities hold (identical images are consistent to 1, and
no score depends on the order of files or stories)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from consistory.cli.main import main
from consistory.errors import UsageError
from consistory_batch.clip_scores import ClipEmbedder
from consistory_batch.consistency import CLIP_IMAGE, consistency_embedder, mean_pairwise_similarity
from consistory_batch.evaluate import score_stories


@pytest.fixture(scope="module")
def clip():
    return ClipEmbedder.tiny()


def noise_image(seed, size=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def story(story_id, images, texts):
    names = [f"{i:02d}.png" for i in range(len(images))]
    return {"id": story_id, "files": names, "alignment_texts": texts, "alignment_source": "setting"}, dict(zip(names, images))


def score(stories, clip):
    entries = [s for s, _ in stories]
    files = {s["id"]: images for s, images in stories}
    return score_stories(entries, lambda story_id, name: files[story_id][name], clip, clip)


def test_the_tiny_clip_is_built_locally_and_deterministic(clip):
    images = [noise_image(i) for i in range(3)]
    again = ClipEmbedder.tiny()
    vectors = clip.images(images)
    assert vectors.shape == (3, 16) and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.equal(vectors, again.images(images))
    texts = clip.texts(["in the park", "on a boat"])
    assert texts.shape == (2, 16) and torch.equal(texts, again.texts(["in the park", "on a boat"]))


def test_identical_images_have_consistency_one(clip):
    same = noise_image(5)
    report = score([story("same", [same, same.copy(), same.copy()], ["a", "b", "c"])], clip)
    assert report["stories"][0]["consistency"] == pytest.approx(1.0, abs=1e-6)
    assert report["overall"]["consistency"] == pytest.approx(1.0, abs=1e-6)


def test_scores_do_not_depend_on_the_order_of_files_or_stories(clip):
    images = [noise_image(i) for i in range(4)]
    texts = ["in the park", "on a boat", "at night", "in the snow"]
    other = story("b", [noise_image(9), noise_image(10)], ["x", "y"])
    first = score([story("a", images, texts), other], clip)
    names = [f"{i:02d}.png" for i in range(4)]
    shuffled_story = {"id": "a", "files": [names[i] for i in (2, 0, 3, 1)],
                      "alignment_texts": [texts[i] for i in (2, 0, 3, 1)], "alignment_source": "setting"}
    second = score([other, (shuffled_story, dict(zip(names, images)))], clip)
    assert first == second
    vectors = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    assert mean_pairwise_similarity(vectors) == pytest.approx(mean_pairwise_similarity(vectors[[4, 2, 0, 1, 3]]), abs=1e-12)


def test_shapes_of_a_report(clip):
    report = score([story("a", [noise_image(1), noise_image(2)], ["p", "q"]), story("solo", [noise_image(3)], ["r"])],
                   clip)
    by_id = {s["id"]: s for s in report["stories"]}
    assert set(by_id["a"]["alignment_per_image"]) == {"00.png", "01.png"}
    assert by_id["solo"]["consistency"] is None  # one image has no pair
    assert report["overall"]["consistency"] == by_id["a"]["consistency"]  # single-image stories left out
    assert report["overall"] == {"stories": 2, "images": 3, "alignment": pytest.approx(
        (by_id["a"]["alignment"] + by_id["solo"]["alignment"]) / 2), "consistency": by_id["a"]["consistency"]}


def test_dreamsim_only_where_it_is_installed_with_its_weights(clip, tmp_path):
    embedder, metric, note = consistency_embedder("auto", clip, torch.device("cpu"), str(tmp_path))
    assert embedder is clip and metric == CLIP_IMAGE and "DreamSim not used" in note
    with pytest.raises(UsageError, match="--consistency dreamsim"):
        consistency_embedder("dreamsim", clip, torch.device("cpu"), str(tmp_path))


def test_eval_of_a_directory_without_a_batch_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--clip", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no manifest.json" in err and "consistory batch" in err


def test_eval_of_a_batch_directory_writes_scores_and_a_scatter_plot(tmp_path, capsys):
    """A DEST as `consistory batch` leaves it (files on disk), scored from the command line."""
    folder = tmp_path / "stories" / "dog"
    folder.mkdir(parents=True)
    for i in range(3):
        noise_image(i).save(folder / f"{i:02d}.png")
    entry = {"id": "dog", "status": "done", "files": ["00.png", "01.png", "02.png"],
             "alignment_texts": ["in the park", "on a boat", "at night"], "alignment_source": "setting"}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "stories": [entry], "problems": []}))
    assert main(["eval", str(tmp_path), "--clip", "tiny", "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert report["clip"] == "tiny" and report["overall"]["images"] == 3
    assert Image.open(tmp_path / "eval" / "scatter.png").size[0] > 0
    assert "subject consistency" in capsys.readouterr().out


def test_a_clip_checkpoint_that_cannot_be_had_is_one_line(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "stories": [
        {"id": "a", "status": "done", "files": ["00.png"], "alignment_texts": ["x"]}]}))
    # The test session runs with HF_HUB_OFFLINE=1 and nothing cached.
    assert main(["eval", str(tmp_path), "--clip", "someorg/some-clip"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "someorg/some-clip" in err and "--clip tiny" in err
