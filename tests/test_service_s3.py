"""The service with its artifacts in S3: a real moto S3 server on loopback, real HTTP, presigned URLs."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from service_helpers import blank_store_env, free_port, http, image_pixels, ok_json, post, tiny_service_args
from s3_server import DUMMY_AWS_ENV, s3_bucket, s3_client, s3_endpoint  # noqa: F401 (fixtures)

from deployments.images import decode_png

SUBJECTS = ["cat"]
PROMPTS = ["a photo of a cat in the park", "a photo of a cat on the beach", "a cat in the snow"]


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}/"


@pytest.fixture(scope="module")
def service(s3_endpoint: str, s3_bucket: str, prefix: str):
    """The app with the S3 store; replicas get dummy AWS keys through the runtime env, exactly as
    a pod gets its keys from a secret. Serve and Ray are always shut down afterwards."""
    import ray
    from ray import serve

    from deployments.local import start_local

    env = {
        **blank_store_env(),
        **DUMMY_AWS_ENV,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    store = {"kind": "s3", "bucket": s3_bucket, "prefix": prefix, "endpoint_url": s3_endpoint}
    try:
        yield start_local(tiny_service_args(store, generators=1), port=free_port(), num_cpus=2, env_vars=env)
    finally:
        serve.shutdown()
        ray.shutdown()


def _keys(endpoint: str, bucket: str, prefix: str) -> set[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix):] for obj in listing.get("Contents", [])}


def test_story_urls_are_presigned_s3_urls(service, s3_endpoint, s3_bucket, prefix):
    client = http()
    answer = ok_json(post(client, f"{service}/v1/stories", {"prompts": PROMPTS, "subjects": SUBJECTS, "seed": 3}))
    subject_id = answer["subject_id"]
    for image in answer["images"]:
        assert image["url"].startswith(f"{s3_endpoint}/{s3_bucket}/{prefix}subjects/{subject_id}/")
        assert "X-Amz-Signature=" in image["url"]
        # Straight from the S3 server, not through the service.
        response = client.get(image["url"], timeout=30)
        assert response.status_code == 200
        assert decode_png(response.content).shape == (64, 64, 3)

    keys = _keys(s3_endpoint, s3_bucket, prefix)
    assert f"subjects/{subject_id}/record.json" in keys
    assert f"subjects/{subject_id}/anchor_cache.safetensors" in keys
    assert sum(k.endswith(".png") for k in keys if subject_id in k) == len(PROMPTS)

    record = s3_client(s3_endpoint).get_object(Bucket=s3_bucket, Key=f"{prefix}subjects/{subject_id}/record.json")
    stored = ok_json(client.get(f"{service}/v1/subjects/{subject_id}", timeout=30))
    assert json.loads(record["Body"].read()) == stored
    assert stored["prompts"] == PROMPTS[:2] and stored["seeds"] == [3, 4]


def test_subject_extend_and_delete_in_s3(service, s3_endpoint, s3_bucket, prefix):
    client = http()
    created = post(client, f"{service}/v1/subjects", {"prompts": PROMPTS[:2], "subjects": SUBJECTS, "seed": 7})
    subject_id = ok_json(created)["subject_id"]
    by_b64 = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images",
                          {"prompts": [PROMPTS[2]], "response_format": "b64_json"}))
    by_url = ok_json(post(client, f"{service}/v1/subjects/{subject_id}/images", {"prompts": [PROMPTS[2]]}))
    assert by_b64["images"][0]["seed"] == by_url["images"][0]["seed"] == 9
    assert (image_pixels(client, by_b64["images"][0]) == image_pixels(client, by_url["images"][0])).all()

    assert client.get(f"{service}/v1/artifacts/subjects/{subject_id}/record.json", timeout=30).status_code == 404
    assert ok_json(client.delete(f"{service}/v1/subjects/{subject_id}", timeout=30))["deleted"] is True
    assert not any(subject_id in key for key in _keys(s3_endpoint, s3_bucket, prefix))
    assert client.get(f"{service}/v1/subjects/{subject_id}", timeout=30).status_code == 404
