"""Photo anchors and ControlNet controls over HTTP: a real local Serve app on the tiny preset
with the tiny ControlNet, whose images must equal the library's for the same inputs.

One app serves the module (one Generator; the Ingress keeps one cache handle, so making a
second subject sends the first one's new images to the store or to a rebuild).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_helpers import (
    SIZE,
    STEPS,
    assert_same_pixels,
    image_pixels,
    local_service,
    ok_json,
    post,
    tiny_service_args,
)

from consistory import ConsiStoryConfig, ConsiStoryPipeline

SUBJECTS = ["cat"]
ANCHORS = ["a photo of a cat in the park", "a photo of a cat on the beach"]
NEW = ["a cat in the snow", "a cat reading a book"]
CONFIG = ConsiStoryConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
MAX_IMAGE_BYTES, MAX_PIXELS = 20_000, 96 * 96


def _picture(seed: int, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.NEAREST)


def _control(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, SIZE - 16, 2)
        pixels[y:y + 16, x:x + 4] = 255
    return Image.fromarray(pixels)


def _b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


PHOTO, CONTROL_A, CONTROL_B = _picture(1), _control(2), _control(3)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def service(store_root: Path):
    args = tiny_service_args({"kind": "local", "root": str(store_root)}, generators=1, controlnet="preset:tiny",
                             ingress_cache_refs=1)
    args["limits"] = {**args["limits"], "max_image_bytes": MAX_IMAGE_BYTES, "max_image_pixels": MAX_PIXELS}
    with local_service(args) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def library() -> ConsiStoryPipeline:
    """The tiny model with the ControlNet the service's `controlnet: preset:tiny` builds."""
    from consistory.loading import load_controlnet

    pipe = ConsiStoryPipeline.from_preset("tiny", seed=0)
    pipe.controlnet = load_controlnet("preset:tiny:0", pipe.sdxl.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(client, answer: dict) -> list[np.ndarray]:
    return [image_pixels(client, image) for image in answer["images"]]


def test_photo_subject_and_controlled_new_images_equal_the_librarys(client, service, library, store_root):
    body = {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 7, "images": [_b64(PHOTO), None],
            "response_format": "b64_json"}
    made = ok_json(post(client, f"{service}/v1/subjects", body))
    expected = library.create_anchors(ANCHORS, SUBJECTS, 7, CONFIG, images=[PHOTO, None])
    for got, want in zip(_pixels(client, made), expected.images):
        assert_same_pixels(got, want)
    subject_id = made["subject_id"]
    record = ok_json(client.get(f"{service}/v1/subjects/{subject_id}", timeout=60))
    assert record["photos"][1] is None and len(record["photos"][0]["sha256"]) == 64
    assert (store_root / record["photos"][0]["key"]).is_file()

    more = {"prompts": NEW, "controls": [_b64(CONTROL_A), None], "controlnet_conditioning_scale": 0.8}
    images = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", more))
    want = library.generate_from_anchors(expected.cache, NEW, seeds=[9, 10], control_images=[CONTROL_A, None],
                                         controlnet_conditioning_scale=0.8)
    got = _pixels(client, images)
    for image, reference in zip(got, want.images):
        assert_same_pixels(image, reference)
    plain = library.generate_from_anchors(expected.cache, NEW[:1], seeds=[9])
    assert np.abs(got[0].astype(int) - np.asarray(plain.images[0]).astype(int)).max() > 1, "the control had no effect"

    ok_json(client.delete(f"{service}/v1/subjects/{subject_id}", timeout=60))
    assert not (store_root / "subjects" / subject_id).exists(), "the subject's photos outlived it"


def test_a_story_with_per_prompt_controls_equals_the_librarys(client, service, library):
    prompts = ANCHORS + NEW[:1]
    body = {"prompts": prompts, "subjects": SUBJECTS, "seed": 3, "n_anchors": 2,
            "controls": [_b64(CONTROL_A), None, _b64(CONTROL_B, "JPEG")]}
    story = ok_json(post(client, f"{service}/v1/stories", body))
    control_b = Image.open(io.BytesIO(base64.b64decode(body["controls"][2]))).convert("RGB")
    anchors = library.create_anchors(ANCHORS, SUBJECTS, 3, CONFIG, control_images=[CONTROL_A, None])
    new = library.generate_from_anchors(anchors.cache, NEW[:1], seeds=[5], control_images=[control_b])
    for got, want in zip(_pixels(client, story), anchors.images + new.images):
        assert_same_pixels(got, want)


def test_a_photo_subject_whose_cache_is_gone_is_rebuilt_with_its_photo(client, service, library, store_root):
    body = {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 21, "images": [None, _b64(PHOTO, "JPEG")],
            "controls": [_b64(CONTROL_B), None]}
    subject_id = ok_json(post(client, f"{service}/v1/subjects", body))["subject_id"]
    (store_root / "subjects" / subject_id / "anchor_cache.safetensors").unlink()
    # Another subject takes the Ingress's only cache handle: the Generator must rebuild.
    ok_json(post(client, f"{service}/v1/subjects", {"prompts": ANCHORS[:1], "subjects": SUBJECTS, "seed": 1}))
    got = _pixels(client, ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": NEW[:1]})))
    photo = Image.open(io.BytesIO(base64.b64decode(body["images"][1]))).convert("RGB")
    anchors = library.create_anchors(ANCHORS, SUBJECTS, 21, CONFIG, images=[None, photo],
                                     control_images=[CONTROL_B, None])
    assert_same_pixels(got[0], library.generate_from_anchors(anchors.cache, NEW[:1], seeds=[23]).images[0])
    record = ok_json(client.get(f"{service}/v1/subjects/{subject_id}", timeout=60))
    assert record["rebuilds"] == 1 and record["control_scale"] == 1.0


def test_a_photo_subject_without_its_cache_or_its_photo_says_so(client, service, store_root):
    body = {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 31, "images": [_b64(PHOTO), None]}
    subject_id = ok_json(post(client, f"{service}/v1/subjects", body))["subject_id"]
    folder = store_root / "subjects" / subject_id
    (folder / "anchor_cache.safetensors").unlink()
    (folder / "inputs" / "photo-000.png").unlink()
    ok_json(post(client, f"{service}/v1/subjects", {"prompts": ANCHORS[:1], "subjects": SUBJECTS, "seed": 2}))
    _bad(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": NEW[:1]}, 422, "cannot be rebuilt",
         "photo-000.png is missing")


def _bad(client, url: str, body: dict, status: int, *words: str) -> None:
    response = post(client, url, body)
    assert response.status_code == status, f"{response.status_code}: {response.text[:300]}"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and all(w in detail for w in words), detail


def test_bad_images_get_clear_4xx_and_the_service_still_answers(client, service):
    url = f"{service}/v1/subjects"

    def subject(images=None, **more) -> dict:
        return {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 1, "images": images, **more}

    _bad(client, url, subject(["not base64!", None]), 422, "images[0]", "base64")
    _bad(client, url, subject([None, base64.b64encode(b"hello, not an image").decode()]), 422, "images[1]", "PNG or JPEG")
    truncated = base64.b64encode(base64.b64decode(_b64(PHOTO))[:200]).decode()
    _bad(client, url, subject([truncated, None]), 422, "images[0]")
    _bad(client, url, subject([_b64(PHOTO)]), 422, "1 images for 2 anchor prompts")
    _bad(client, url, subject([_b64(_picture(4, 128)), None]), 413, "images[0]", str(MAX_PIXELS))
    noise = Image.fromarray(np.random.default_rng(5).integers(0, 256, (90, 90, 3), dtype=np.uint8))
    _bad(client, url, subject([None, _b64(noise)]), 413, "images[1]", str(MAX_IMAGE_BYTES))
    _bad(client, url, subject(controls=[_b64(CONTROL_A)]), 422, "1 controls for 2 prompts")
    _bad(client, f"{service}/v1/jobs", {"subject": subject(["@@", None])}, 422, "images[0]")
    assert client.get(f"{service}/healthz", timeout=10).status_code == 200
    ok_json(post(client, url, subject([_b64(PHOTO), None])))


def test_controls_on_a_service_without_a_controlnet_are_refused():
    from deployments.edge.schemas import ImagesRequest
    from deployments.settings import ServiceSettings
    from deployments.edge.uploads import decode_uploads
    from deployments.errors import ServiceError

    for fields in ({"controls": [_b64(CONTROL_A)]}, {"controlnet_conditioning_scale": 0.5}):
        body = ImagesRequest(prompts=NEW[:1], **fields)
        with pytest.raises(ServiceError) as raised:
            decode_uploads(body, 0, ServiceSettings(), (64, 64))
        assert raised.value.status_code == 422 and "no ControlNet configured" in raised.value.detail


def test_a_story_job_with_a_photo_and_controls_equals_the_librarys(client, service, library):
    import time

    story = {"prompts": ANCHORS + NEW[:1], "subjects": SUBJECTS, "seed": 11, "n_anchors": 2,
             "images": [_b64(PHOTO), None], "controls": [None, None, _b64(CONTROL_A)], "response_format": "b64_json"}
    response = post(client, f"{service}/v1/jobs", {"story": story})
    assert response.status_code == 202, response.text[:300]
    job_url = f"{service}/v1/jobs/{response.json()['job_id']}"
    deadline = time.monotonic() + 120
    while (state := ok_json(client.get(job_url, timeout=30)))["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the job did not finish in 120 s"
        time.sleep(0.5)
    assert state["status"] == "succeeded", state
    anchors = library.create_anchors(ANCHORS, SUBJECTS, 11, CONFIG, images=[PHOTO, None])
    new = library.generate_from_anchors(anchors.cache, NEW[:1], seeds=[13], control_images=[CONTROL_A])
    for got, want in zip(_pixels(client, state["result"]), anchors.images + new.images):
        assert_same_pixels(got, want)
