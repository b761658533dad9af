"""The denoising loop never waits for the device: no host synchronisation per step.

On a GPU, reading a value back (`.item()`, `.tolist()`, `nonzero`, a boolean mask as an index,
`if tensor:`) makes the host wait until the device has drained its queue, and the device then
idles while the host prepares the next kernels. The CPU has no such queue, so these tests count
the calls themselves, made inside each denoising pass: a few per pass are allowed (reading the
timesteps, finding the injection sources between the passes), none per step.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from story_prompts import ANCHORS, CONFIG, NEW, SUBJECTS

from consistory.method import passes

READBACKS = ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
PER_PASS_LIMIT = 4


def _is_boolean_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def counted_passes(monkeypatch):
    """Counts, per call of `denoise_pass`, the calls that would read a value back from a GPU."""
    passes_seen: list[collections.Counter] = []
    active: list[collections.Counter] = []

    def count(name):
        if active:
            active[-1][name] += 1

    def wrap(owner, name, key=None, when=None):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if when is None or when(*args, **kwargs):
                count(key or name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for name in READBACKS:
        wrap(torch.Tensor, name)
    wrap(torch, "nonzero", "torch.nonzero")
    wrap(torch.cuda, "synchronize", "cuda.synchronize")
    wrap(torch.Tensor, "__getitem__", "boolean index", lambda self, index: _is_boolean_index(index))
    wrap(torch.Tensor, "__setitem__", "boolean index", lambda self, index, value: _is_boolean_index(index))

    denoise_pass = passes.denoise_pass

    def counted_pass(*args, **kwargs):
        active.append(collections.Counter())
        try:
            return denoise_pass(*args, **kwargs)
        finally:
            passes_seen.append(active.pop())

    monkeypatch.setattr(passes, "denoise_pass", counted_pass)
    yield passes_seen


def _story_passes(pipe, monkeypatch, steps: int):
    with monkeypatch.context() as patch, counted_passes(patch) as seen:
        pipe.generate_story(ANCHORS + NEW[:1], SUBJECTS, seed=3, config=CONFIG.replace(num_inference_steps=steps),
                            output_type="latent")
    return seen


def test_a_story_reads_nothing_back_per_step(tiny_pipe, monkeypatch):
    short, long = (_story_passes(tiny_pipe, monkeypatch, steps) for steps in (10, 14))
    assert len(short) == len(long) == 2  # pass 1, pass 2
    for few, many in zip(short, long):
        assert few == many, f"host reads grow with the number of steps: {dict(few)} -> {dict(many)}"
        assert sum(many.values()) <= PER_PASS_LIMIT, dict(many)


@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_new_images_from_a_cache_read_nothing_back_per_step(tiny_pipe, monkeypatch, codec):
    reads = []
    for steps in (10, 14):
        config = CONFIG.replace(num_inference_steps=steps)
        cache = tiny_pipe.create_anchors(ANCHORS, SUBJECTS, seed=3, config=config, output_type="latent",
                                         cache_codec=codec).cache
        tiny_pipe.generate_from_anchors(cache, NEW[:1], output_type="latent")  # a cache's first use reads its index
        with monkeypatch.context() as patch, counted_passes(patch) as seen:
            tiny_pipe.generate_from_anchors(cache, NEW[1:2], output_type="latent")
        reads.append(seen)
    for few, many in zip(*reads):
        assert few == many, f"host reads grow with the number of steps: {dict(few)} -> {dict(many)}"
        assert sum(many.values()) <= PER_PASS_LIMIT, dict(many)
