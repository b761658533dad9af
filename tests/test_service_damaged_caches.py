"""Damaged and lost anchor caches, on a real local Ray Serve app over HTTP (tiny preset, two
Generators): whatever happened to a stored cache, the next image of its subject is rebuilt from
the subject record and equals the library's, and concurrent requests rebuild it once across
the replicas."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
from pathlib import Path

import pytest
from service_helpers import (
    ANCHORS, APP, CONFIG, SUBJECTS, assert_same_pixels, create_subject, http, image_pixels, local_service,
    ok_json, post, replace_replicas, tiny_service_args
)
from service_helpers import library, store_root  # noqa: F401 (fixtures)

PROMPT = "a cat in the snow"
SLOW_REQUEST_S = 900  # within the service's own 600 s deadline, whatever the machine's load


@pytest.fixture(scope="module")
def service(store_root: Path):
    with local_service(tiny_service_args({"kind": "local", "root": str(store_root)})) as base_url:
        yield base_url


def _create(client, service, seed: int) -> str:
    return create_subject(client, service, seed)["subject_id"]


def _expected(library, seed: int):
    cache = library.create_anchors(ANCHORS, SUBJECTS, seed=seed, config=CONFIG).cache
    return library.generate_from_anchors(cache, [PROMPT]).images[0]


def _image(client, service, subject_id: str):
    """One new image, as a patient client gets it: fresh replicas loading models and a rebuild on a
    machine shared with other heavy work can take minutes, and a full queue says when to retry."""
    url = f"{service}/v1/subjects/{subject_id}/images"
    for _ in range(30):
        response = client.post(url, json={"prompts": [PROMPT]}, timeout=SLOW_REQUEST_S)
        if response.status_code != 503:
            break
        time.sleep(int(response.headers["retry-after"]))
    return image_pixels(client, ok_json(response)["images"][0])


def _record(client, service, subject_id: str) -> dict:
    return ok_json(client.get(f"{service}/v1/subjects/{subject_id}", timeout=30))


def _drop_cache_objects_and_loaded_caches(service: str) -> None:
    """Kill the AnchorStage (the owner of every cache object) and the Generators (what they
    loaded), and wait for fresh ones: the next images must come from the artifact store."""
    replace_replicas(APP, "AnchorStage", service, expected=1)
    replace_replicas(APP, "Generator", service)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    meta = header["__metadata__"]
    if how == "flipped byte":
        data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "huge header":
        data = (2**62).to_bytes(8, "little") + data[8:]
    else:
        if how == "metadata not JSON":
            meta["consistory"] = "{not json"
        elif how == "unknown metadata key":
            meta["consistory"] = json.dumps({**json.loads(meta["consistory"]), "surprise": 1})
        elif how == "invalid config":
            values = json.loads(meta["consistory"])
            values["config"]["height"] = 7
            meta["consistory"] = json.dumps(values)
        elif how == "misshapen tensor":
            key = next(k for k in header if k.startswith("shared/"))
            header[key]["shape"] = [header[key]["shape"][1], header[key]["shape"][0]]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        data = len(text).to_bytes(8, "little") + text + data[8 + length:]
    path.write_bytes(data)


DAMAGE = ["flipped byte", "truncated", "huge header", "metadata not JSON", "unknown metadata key",
          "invalid config", "misshapen tensor"]


def test_every_damaged_cache_is_rebuilt(client, service, library, store_root):
    """Damage the sha256 in the record catches (bytes changed after it was taken), and damage it
    does not (the record's checksum taken of the damaged file): both end in a rebuild."""
    seeds = {how: 100 + i for i, how in enumerate(DAMAGE)}
    ids = {how: _create(client, service, seed) for how, seed in seeds.items()}
    for how, subject_id in ids.items():
        folder = store_root / "subjects" / subject_id
        _damage(folder / "anchor_cache.safetensors", how)
        if how not in ("flipped byte", "truncated"):
            record = json.loads((folder / "record.json").read_text())
            record["cache_sha256"] = hashlib.sha256((folder / "anchor_cache.safetensors").read_bytes()).hexdigest()
            (folder / "record.json").write_text(json.dumps(record))
    _drop_cache_objects_and_loaded_caches(service)
    for how, subject_id in ids.items():
        assert_same_pixels(_image(client, service, subject_id), _expected(library, seeds[how]))
        assert _record(client, service, subject_id)["rebuilds"] >= 1, how


def test_a_lost_cache_is_rebuilt_once_for_concurrent_requests(client, service, library, store_root):
    subject_id = _create(client, service, seed=200)
    (store_root / "subjects" / subject_id / "anchor_cache.safetensors").unlink()
    _drop_cache_objects_and_loaded_caches(service)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        images = list(pool.map(lambda _: _image(http(), service, subject_id), range(4)))
    for image in images:
        assert_same_pixels(image, _expected(library, 200))
    assert _record(client, service, subject_id)["rebuilds"] == 1
