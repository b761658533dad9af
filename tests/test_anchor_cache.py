"""The anchor cache: "cached equals batch", independence of new images, safetensors round trips."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from story_prompts import ANCHORS, CONFIG, NEW, SUBJECTS

from consistory import AnchorCache, AnchorCacheError, ConsiStoryPipeline

TOL = 1e-4


@pytest.fixture(scope="module")
def story(tiny_pipe):
    return tiny_pipe.generate_story(ANCHORS + NEW, SUBJECTS, seed=3, config=CONFIG, output_type="np")


@pytest.fixture(scope="module")
def anchors(tiny_pipe):
    return tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, output_type="np")


@pytest.fixture(scope="module")
def extension(tiny_pipe, anchors):
    return tiny_pipe.generate_from_anchors(anchors.cache, NEW, output_type="np")


def test_cached_equals_batch(story, anchors, extension):
    assert anchors.seeds == story.seeds[:2] and extension.seeds == story.seeds[2:]
    assert np.abs(anchors.images - story.images[:2]).max() <= TOL
    assert np.abs(extension.images - story.images[2:]).max() <= TOL
    for a, b in zip(anchors.subject_masks + extension.subject_masks, story.subject_masks):
        assert np.array_equal(a, b)


def test_new_images_are_independent_of_each_other(tiny_pipe, anchors, extension):
    for i, (prompt, seed) in enumerate(zip(NEW, extension.seeds)):
        alone = tiny_pipe.generate_from_anchors(anchors.cache, [prompt], seeds=[seed], output_type="np")
        assert np.abs(alone.images[0] - extension.images[i]).max() <= TOL


def test_saved_and_loaded_cache_gives_the_same_images(tiny_pipe, anchors, extension, tmp_path):
    path = anchors.cache.save(tmp_path / "dog.cache")
    loaded = AnchorCache.load(path, device="cpu")
    assert loaded.nbytes == anchors.cache.nbytes > 0
    assert loaded.subjects == SUBJECTS and loaded.anchor_prompts == ANCHORS and loaded.config == CONFIG
    again = tiny_pipe.generate_from_anchors(loaded, NEW, output_type="np")
    assert np.abs(again.images - extension.images).max() <= TOL
    from_bytes = AnchorCache.from_bytes(anchors.cache.to_bytes())
    assert set(from_bytes.tensors) == set(anchors.cache.tensors)


def test_cache_is_plain_safetensors_in_the_model_dtype(anchors, tmp_path):
    path = anchors.cache.save(tmp_path / "dog.cache")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["consistory"])
        k = f.get_tensor(next(key for key in keys if key.startswith("shared/")))
    assert meta["anchor_prompts"] == ANCHORS and meta["seeds"] == [3, 4]
    assert any(key.startswith("inject/") for key in keys) and "anchor/dift" in keys
    assert str(k.dtype) == "torch.float32" == f"torch.{anchors.cache.dtype}"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic save leaves no temp file


def test_two_subject_cache(tiny_pipe):
    subjects = ["dog", "wizard hat"]
    prompts = ["a dog wearing a wizard hat", "the hat of an old wizard on a dog", "a dog in a wizard hat in the snow"]
    story = tiny_pipe.generate_story(prompts, subjects, seed=9, config=CONFIG, output_type="np")
    made = tiny_pipe.create_anchors(prompts[:2], subjects, seed=9, config=CONFIG, output_type="np")
    cache = AnchorCache.from_bytes(made.cache.to_bytes())
    new = tiny_pipe.generate_from_anchors(cache, prompts[2:], output_type="np")
    assert np.abs(made.images - story.images[:2]).max() <= TOL
    assert np.abs(new.images - story.images[2:]).max() <= TOL


def test_cache_from_another_model_or_size_is_refused(anchors):
    other = ConsiStoryPipeline.from_preset("tiny", seed=1)
    with pytest.raises(AnchorCacheError, match="model"):
        other.generate_from_anchors(anchors.cache, NEW[:1])


def test_other_config_and_bad_files_are_refused(tiny_pipe, anchors, tmp_path):
    with pytest.raises(AnchorCacheError, match="height"):
        tiny_pipe.generate_from_anchors(anchors.cache, NEW[:1], config=CONFIG.replace(height=128))
    with pytest.raises(AnchorCacheError, match="not an anchor cache"):
        AnchorCache.from_bytes(b"definitely not safetensors")
    from safetensors.torch import save

    future = save({"x": anchors.cache.dift}, metadata={**anchors.cache.metadata(), "format_version": "999"})
    with pytest.raises(AnchorCacheError, match="version 999"):
        AnchorCache.from_bytes(future)
    with pytest.raises(FileNotFoundError):
        AnchorCache.load(tmp_path / "missing.cache")
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny_pipe.generate_from_anchors(anchors.cache, NEW[:2], seeds=[1])


def _with_tensors(cache: AnchorCache, tensors: dict) -> AnchorCache:
    return AnchorCache(cache.subjects, cache.anchor_prompts, cache.seeds, cache.config, cache.model_id,
                       cache.model_fingerprint, cache.dtype, cache.codec, tensors)


def test_a_damaged_cache_is_refused_before_generating(tiny_pipe, anchors):
    tensors = dict(anchors.cache.tensors)
    half0 = next(k for k, t in tensors.items() if "/h0/" in k and t.shape[0] > 0)
    broken = {
        "lacks 1 tensors": {k: t for k, t in tensors.items() if k != half0},
        "does not make": {**tensors, half0.replace("/h0/", "/h7/"): tensors[half0]},
        "not torch.float32": {**tensors, half0: tensors[half0][:, :-8]},
        "disagree": {**tensors, half0: tensors[half0][1:]},  # one CFG half lost a token row
    }
    for message, damaged in broken.items():
        with pytest.raises(AnchorCacheError, match=message):
            tiny_pipe.generate_from_anchors(_with_tensors(anchors.cache, damaged), NEW[:1])


def test_cache_offloaded_to_cpu_replays_the_same(tiny_pipe, anchors, extension):
    offloaded = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG, output_type="np", cache_device="cpu")
    again = tiny_pipe.generate_from_anchors(offloaded.cache.to("cpu"), NEW, output_type="np")
    assert np.abs(again.images - extension.images).max() <= TOL


def test_half_precision_cache_keeps_the_model_dtype_and_equals_batch():
    import torch

    pipe = ConsiStoryPipeline.from_preset("tiny", torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    config = CONFIG.replace(width=64)
    story = pipe.generate_story(ANCHORS + NEW[:1], SUBJECTS, seed=2, config=config, output_type="np")
    made = pipe.create_anchors(ANCHORS, SUBJECTS, seed=2, config=config, output_type="np", cache_device="cpu")
    cache = AnchorCache.from_bytes(made.cache.to_bytes())
    assert cache.dtype == "float16"
    assert {str(t.dtype) for k, t in cache.tensors.items() if k.startswith(("shared/", "inject/"))} == {"torch.float16"}
    new = pipe.generate_from_anchors(cache, NEW[:1], output_type="np")
    assert np.isfinite(new.images).all()
    # In the story a new image's softmax also spans the anchors' masked padding tokens; in half
    # precision that rounds differently from the cache's unpadded keys: within one 8-bit level.
    assert np.abs(new.images - story.images[2:]).max() <= 1 / 255
