"""Batched Generators over HTTP: a real local Serve app on the tiny preset with one Generator
replica, which makes concurrent images of one subject in one `generate_from_anchors` call.

What a user relies on: concurrent requests are made in fewer UNet batches than images, and
each image is still the one the library makes alone for its prompt and seed; a client that
leaves does not fail the others of its batch; two subjects are never mixed in one batch.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier

import numpy as np
import pytest
import requests
from service_helpers import (
    ANCHORS,
    APP,
    CONFIG,
    REQUEST_TIMEOUT_S,
    SUBJECTS,
    assert_same_pixels,
    create_subject,
    http,
    image_pixels,
    library,  # noqa: F401 (a fixture)
    local_service,
    ok_json,
    post,
    store_root,  # noqa: F401 (a fixture)
    tiny_service_args,
)

BATCH = 4
# Long enough for requests sent together to meet on a loaded 2-core machine; a service keeps
# this at a few milliseconds (its HTTP calls arrive within microseconds of each other).
WAIT_MS = 400
SLOW_STEPS = 50  # a batch that runs for seconds, so a client can leave in the middle of it
PROMPTS = ["a cat in the snow", "a cat reading a book", "a cat on a skateboard", "a cat in a spaceship"]


@pytest.fixture(scope="module")
def service(store_root: Path):
    args = tiny_service_args({"kind": "local", "root": str(store_root)}, generators=1)
    args["limits"] = {**args["limits"], "max_steps": SLOW_STEPS}
    args["generator"] = {**args["generator"], "max_ongoing_requests": 2 * BATCH,
                         "max_batch_images": BATCH, "batch_wait_ms": WAIT_MS}
    with local_service(args) as base_url:
        yield base_url


def _batches() -> Counter:
    """The Generator replica's generate_from_anchors calls so far, by images in each."""
    from ray import serve

    stats = serve.get_deployment_handle("Generator", app_name=APP).cache_stats.remote().result(timeout_s=60)
    return Counter({int(size): n for size, n in stats["batch_sizes"].items()})


def _made_since(before: Counter) -> Counter:
    return _batches() - before


def _together(calls: list) -> list:
    """Runs each call on its own thread, all released at once; their results in order."""
    barrier = Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _images_request(base_url: str, subject_id: str, prompts: list[str], seeds: list[int], timeout=REQUEST_TIMEOUT_S):
    def call():
        with http() as session:
            response = session.post(f"{base_url}/v1/subjects/{subject_id}/images",
                                    json={"prompts": prompts, "seeds": seeds}, timeout=timeout)
            answer = ok_json(response)
            return [image_pixels(session, image) for image in answer["images"]]
    return call


def _alone(library, seed: int, prompt: str, image_seed: int, config=CONFIG):
    cache = library.create_anchors(ANCHORS, SUBJECTS, seed=seed, config=config).cache
    return library.generate_from_anchors(cache, [prompt], seeds=[image_seed]).images[0]


def test_a_batch_makes_the_images_the_library_makes_alone(library):
    """What lets the service batch at all: a row of a batch is the image made alone."""
    cache = library.create_anchors(ANCHORS, SUBJECTS, seed=3, config=CONFIG).cache
    seeds = [20, 21, 22, 23]
    batch = library.generate_from_anchors(cache, PROMPTS, seeds=seeds, output_type="np").images
    for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        alone = library.generate_from_anchors(cache, [prompt], seeds=[seed], output_type="np").images[0]
        assert np.abs(batch[i] - alone).max() <= 1e-4


def test_concurrent_requests_of_one_subject_share_batches_and_get_their_own_images(client, service, library):
    subject_id = create_subject(client, service, seed=5)["subject_id"]
    seeds = [100, 101, 102, 103]
    before = _batches()
    answers = _together([_images_request(service, subject_id, [p], [s]) for p, s in zip(PROMPTS, seeds)])
    made = _made_since(before)
    assert sum(size * n for size, n in made.items()) == BATCH
    assert sum(made.values()) < BATCH, f"4 concurrent requests were made in batches of {dict(made)}"
    for (pixels,), prompt, seed in zip(answers, PROMPTS, seeds):
        assert_same_pixels(pixels, _alone(library, 5, prompt, seed))

    # One request of several prompts fans out to the Generator and is batched the same way.
    before = _batches()
    (answer,) = _together([_images_request(service, subject_id, PROMPTS, [s + 10 for s in seeds])])
    made = _made_since(before)
    assert sum(made.values()) < BATCH, f"one request of 4 prompts was made in batches of {dict(made)}"
    assert_same_pixels(answer[2], _alone(library, 5, PROMPTS[2], seeds[2] + 10))


def test_a_client_that_leaves_does_not_fail_the_others_of_its_batch(client, service, library):
    body = {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 7, "steps": SLOW_STEPS}
    subject_id = ok_json(post(client, f"{service}/v1/subjects", body))["subject_id"]
    slow = CONFIG.replace(num_inference_steps=SLOW_STEPS)
    seeds = [200, 201, 202, 203]
    calls = [_images_request(service, subject_id, [p], [s]) for p, s in zip(PROMPTS[:3], seeds)]
    # The fourth client gives up after 3 s, while the batch it joined is being made (a batch of
    # 4 at 50 steps takes several seconds here).
    leaver = _images_request(service, subject_id, [PROMPTS[3]], [seeds[3]], timeout=(10, 3))

    def leave():
        with pytest.raises(requests.exceptions.ReadTimeout):
            leaver()

    before = _batches()
    answers = _together(calls + [leave])
    for (pixels,), prompt, seed in zip(answers[:3], PROMPTS, seeds):
        assert_same_pixels(pixels, _alone(library, 7, prompt, seed, slow))
    made = _made_since(before)
    assert max(made) >= 3, f"the requests were made in batches of {dict(made)}"
    # The service goes on answering the subject (the batch is not left running for nobody).
    (after,) = _images_request(service, subject_id, [PROMPTS[3]], [seeds[3]])()
    assert_same_pixels(after, _alone(library, 7, PROMPTS[3], seeds[3], slow))


def test_two_subjects_are_batched_apart(client, service, library):
    first, second = (create_subject(client, service, seed=s)["subject_id"] for s in (9, 10))
    before = _batches()
    answers = _together([_images_request(service, first, PROMPTS[:2], [1, 2]),
                         _images_request(service, second, PROMPTS[2:], [3, 4])])
    made = _made_since(before)
    assert sum(size * n for size, n in made.items()) == 4 and max(made) <= 2, dict(made)
    for (images, seed, prompts, seeds) in ((answers[0], 9, PROMPTS[:2], [1, 2]), (answers[1], 10, PROMPTS[2:], [3, 4])):
        for pixels, prompt, image_seed in zip(images, prompts, seeds):
            assert_same_pixels(pixels, _alone(library, seed, prompt, image_seed))
