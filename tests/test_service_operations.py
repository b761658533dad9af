"""What an operator relies on, on a real local Ray Serve app over HTTP (tiny preset): API keys,
ownership and per-key quotas (what belongs to one key is invisible to another, an admin key sees
everything, keys are configured as hashes only), and the service's metrics scraped in Prometheus
form from Ray's metrics endpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from service_helpers import REQUEST_TIMEOUT_S, free_port, http, local_service, ok_json, tiny_service_args

from deployments.edge.api_keys import hash_token, new_token

TOKENS = {name: new_token() for name in ("alice", "bob", "root", "hasty")}
KEYS = [
    {"name": "alice", "sha256": hash_token(TOKENS["alice"]), "max_subjects": 2},
    {"name": "bob", "sha256": hash_token(TOKENS["bob"])},
    {"name": "root", "sha256": hash_token(TOKENS["root"]), "admin": True},
    {"name": "hasty", "sha256": hash_token(TOKENS["hasty"]), "requests_per_minute": 3},
]
METRICS_PORT = free_port()
SUBJECT = {"prompts": ["a photo of a cat in the park", "a photo of a cat on the beach"], "subjects": ["cat"], "seed": 1}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def service(store_root: Path, tmp_path_factory: pytest.TempPathFactory):
    # bob's key comes from a keys file (a mounted Secret in a cluster), the others from the config.
    keys_file = tmp_path_factory.mktemp("secret") / "keys.yaml"
    keys_file.write_text("- " + str(KEYS[1]).replace("'", '"') + "\n")
    args = tiny_service_args({"kind": "local", "root": str(store_root)}, generators=1,
                             auth={"enabled": True, "keys": [KEYS[0], KEYS[2], KEYS[3]], "keys_file": str(keys_file)},
                             log_encoding="JSON")
    with local_service(args, metrics_export_port=METRICS_PORT) as base_url:
        yield base_url


def as_key(name: str) -> requests.Session:
    session = http()
    session.headers["Authorization"] = f"Bearer {TOKENS[name]}"
    return session


def _create(service: str, name: str) -> str:
    return ok_json(as_key(name).post(f"{service}/v1/subjects", json=SUBJECT, timeout=REQUEST_TIMEOUT_S))["subject_id"]


def test_no_key_or_a_wrong_one_is_401_and_probes_stay_open(service):
    anonymous = http()
    for headers in ({}, {"Authorization": "Bearer cs_not-a-key"}, {"Authorization": "Basic YWxpY2U6eA=="}):
        response = anonymous.post(f"{service}/v1/subjects", json=SUBJECT, headers=headers, timeout=30)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["detail"]
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert anonymous.get(service + path, timeout=30).status_code == 200, path
    schema = anonymous.get(f"{service}/openapi.json", timeout=30).json()
    assert any(s.get("scheme") == "bearer" for s in schema["components"]["securitySchemes"].values())
    assert "401" in schema["paths"]["/v1/subjects/{subject_id}"]["get"]["responses"]


def test_a_subject_belongs_to_its_key(service):
    subject_id = _create(service, "alice")
    alice, bob, root = as_key("alice"), as_key("bob"), as_key("root")
    assert ok_json(alice.get(f"{service}/v1/subjects/{subject_id}", timeout=30))["owner"] == "alice"
    unknown = bob.get(f"{service}/v1/subjects/{'0' * 32}", timeout=30)
    for response in (
        bob.get(f"{service}/v1/subjects/{subject_id}", timeout=30),
        bob.post(f"{service}/v1/subjects/{subject_id}/images", json={"prompts": ["a cat"]}, timeout=30),
        bob.delete(f"{service}/v1/subjects/{subject_id}", timeout=30),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] == unknown.json()["detail"].replace("0" * 32, subject_id)
    assert subject_id in ok_json(alice.get(f"{service}/v1/subjects", timeout=30))["subject_ids"]
    assert subject_id not in ok_json(bob.get(f"{service}/v1/subjects", timeout=30))["subject_ids"]
    # The images URL of alice's image opens for anyone who has it: the signature is the permission.
    image = ok_json(alice.post(f"{service}/v1/subjects/{subject_id}/images", json={"prompts": ["a cat in the snow"]},
                               timeout=REQUEST_TIMEOUT_S))["images"][0]
    assert http().get(image["url"], timeout=30).status_code == 200
    # An admin key sees and deletes everything.
    assert subject_id in ok_json(root.get(f"{service}/v1/subjects", timeout=30))["subject_ids"]
    assert ok_json(root.delete(f"{service}/v1/subjects/{subject_id}", timeout=30))["deleted"] is True
    assert alice.get(f"{service}/v1/subjects/{subject_id}", timeout=30).status_code == 404


def test_a_key_over_its_subject_quota_gets_429_until_it_deletes_one(service):
    alice = as_key("alice")
    for subject_id in ok_json(alice.get(f"{service}/v1/subjects", timeout=30))["subject_ids"]:
        alice.delete(f"{service}/v1/subjects/{subject_id}", timeout=30)
    first, _second = _create(service, "alice"), _create(service, "alice")
    over = alice.post(f"{service}/v1/stories", json=SUBJECT, timeout=REQUEST_TIMEOUT_S)
    # No Retry-After: waiting does not help, deleting a subject does (the detail says so).
    assert over.status_code == 429 and "retry-after" not in over.headers
    assert "limit is 2" in over.json()["detail"] and "DELETE /v1/subjects" in over.json()["detail"]
    assert _create(service, "bob")  # the limit is alice's alone
    ok_json(alice.delete(f"{service}/v1/subjects/{first}", timeout=30))
    assert _create(service, "alice")


def test_a_key_over_its_request_rate_gets_429_with_retry_after(service):
    hasty = as_key("hasty")
    statuses = [hasty.get(f"{service}/v1/subjects", timeout=30) for _ in range(5)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = statuses[3]
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 20
    assert as_key("bob").get(f"{service}/v1/subjects", timeout=30).status_code == 200  # others unaffected
    time.sleep(int(limited.headers["retry-after"]))
    assert hasty.get(f"{service}/v1/subjects", timeout=30).status_code == 200


def test_tokens_are_stored_nowhere(service, store_root):
    _create(service, "bob")
    for path in store_root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(token.encode() in data for token in TOKENS.values()), path


def _scrape() -> dict[str, float]:
    """Sample name with labels -> value, from the node's Prometheus endpoint."""
    text = http().get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("ray_consistory_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _matching(samples: dict[str, float], name: str, **labels: str) -> float:
    return sum(v for k, v in samples.items()
               if k.split("{")[0] == name and all(f'{key}="{value}"' in k for key, value in labels.items()))


def test_metrics_count_requests_images_stages_and_cache_sources(service):
    root = as_key("root")
    story = {"prompts": ["a photo of a cat in the park", "a photo of a cat on the beach", "a cat in the snow"],
             "subjects": ["cat"], "seed": 3}
    before = _scrape()
    ok_json(root.post(f"{service}/v1/stories", json=story, timeout=REQUEST_TIMEOUT_S))
    http().get(f"{service}/v1/subjects", timeout=30)  # a 401
    expected = {  # (name, labels): at least this much more than before the story
        ("ray_consistory_requests_total", (("route", "/v1/stories"), ("status", "200"))): 1,
        ("ray_consistory_requests_total", (("route", "/v1/subjects"), ("status", "401"))): 1,
        ("ray_consistory_images_total", (("kind", "anchor"),)): 2,
        ("ray_consistory_images_total", (("kind", "new"),)): 1,
        ("ray_consistory_time_to_consistent_subject_seconds_count", ()): 1,
        ("ray_consistory_cache_uses_total", (("source", "object_store"),)): 1,
        **{("ray_consistory_stage_seconds_count", (("stage", stage),)): 1
           for stage in ("anchors", "cache_load", "generation", "store")},
    }

    def missing(samples: dict[str, float]) -> list:
        return [(name, labels) for (name, labels), more in expected.items()
                if _matching(samples, name, **dict(labels)) - _matching(before, name, **dict(labels)) < more]

    deadline = time.monotonic() + 60
    while missing(samples := _scrape()) and time.monotonic() < deadline:  # Ray reports every few seconds
        time.sleep(1)
    assert not missing(samples), missing(samples)
    assert _matching(samples, "ray_consistory_cache_resident_bytes") > 0
    # Never one time series per subject: routes are templates.
    assert not any("subject_id=" in k or "/v1/subjects/0" in k for k in samples)


def test_logs_are_json_lines_carrying_the_request_id(service):
    import json

    import ray

    response = as_key("bob").get(f"{service}/v1/subjects/{'0' * 32}", headers={"X-Request-ID": "trace-me-42"}, timeout=30)
    assert response.status_code == 404 and response.headers["x-request-id"] == "trace-me-42"
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 30
    found = []
    while not found and time.monotonic() < deadline:
        for path in logs.glob("replica_consistory_Ingress_*.log"):
            for line in path.read_text().splitlines():
                if "trace-me-42" in line:
                    found.append(json.loads(line))  # every line is one JSON object
        time.sleep(0.5)
    assert found and all(entry["request_id"] == "trace-me-42" for entry in found)


def test_the_metrics_endpoint_is_told_where_it_is(service):
    """Ray picks the metrics port unless told one: each Ingress replica logs its node's address,
    and `metrics_address` finds it, so a local run's metrics can be found."""
    import ray

    from deployments.metrics import metrics_address

    assert metrics_address().endswith(f":{METRICS_PORT}/metrics")
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        told = [line for path in logs.glob("replica_consistory_Ingress_*.log")
                for line in path.read_text().splitlines() if "metrics of this node" in line]
        if told:
            break
        time.sleep(0.5)
    assert told and f":{METRICS_PORT}/metrics" in told[0]
