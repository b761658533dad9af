"""The service across nodes: a subject's cache crosses to a node once and is shared there, and lost
nodes lose no answered work.

One simulated cluster for the module (tests/simulated_cluster.py): a CPU head (proxy, Ingress)
and two worker nodes declaring 3 GPUs each, running the GPU cluster's config with the tiny
model: one AnchorStage and four Generators at most two per node, so each node holds two.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from service_helpers import STEPS, SIZE, assert_same_pixels, http, image_pixels, ok_json, post
from simulated_cluster import (
    add_worker,
    cluster_service_args,
    created_bytes_by_node,
    fixed_cluster,
    node_of,
    start_serve,
)

from consistory import ConsiStoryConfig, ConsiStoryPipeline

pytestmark = pytest.mark.cluster

SUBJECTS = ["cat"]
ANCHORS = ["a photo of a cat in the park", "a photo of a cat on the beach"]
SCENES = ["a cat in the snow", "a cat reading a book", "a cat on a boat", "a cat in a cafe"]
CONFIG = ConsiStoryConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)
GENERATORS = 4
GPUS_PER_NODE = 3  # two Generators and the AnchorStage fit on one node


@pytest.fixture(scope="module")
def library(tiny_pipe) -> ConsiStoryPipeline:
    return tiny_pipe


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    store = {"kind": "local", "root": str(tmp_path_factory.mktemp("artifacts"))}
    args = cluster_service_args(store, generator={
        "min_replicas": GENERATORS, "max_replicas": GENERATORS, "max_replicas_per_node": 2,
    })
    with fixed_cluster(head_cpus=2, workers=[{"num_gpus": GPUS_PER_NODE}] * 2) as ray_cluster:
        yield ray_cluster, start_serve(args)


def generator_stats(replicas: int = GENERATORS, timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    """Each Generator replica's cache report, by replica id (asked until every one answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("Generator", app_name="consistory")
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {replicas} Generator replicas answered")
        stats = handle.cache_stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
    return seen


def wait_listed_dead(node_id: str, timeout_s: float = 120) -> None:
    """Until Ray's health checks list a removed node as dead (Serve reschedules only then)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "the removed node is still listed as alive"
        time.sleep(1)


def anchor_stage_node() -> str:
    """The node of the AnchorStage replica: the process there owns the caches it makes."""
    from ray._private import state

    for actor in state.actors().values():
        if actor["State"] == "ALIVE" and actor["Name"].startswith("SERVE_REPLICA::consistory#AnchorStage#"):
            return actor["Address"]["NodeID"]
    raise LookupError("no AnchorStage replica alive")


def create_subject(client, base_url: str, seed: int) -> dict[str, Any]:
    body = {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": seed}
    subject_id = ok_json(post(client, f"{base_url}/v1/subjects", body))["subject_id"]
    return ok_json(client.get(f"{base_url}/v1/subjects/{subject_id}", timeout=30))


def request_images(base_url: str, subject_id: str, seeds: list[int]) -> list[Any]:
    """One image per request, all at once; each answer as (status, headers, body or None)."""

    def one(seed: int):
        with http() as client:
            body = {"prompts": [SCENES[seed % len(SCENES)]], "seeds": [seed]}
            response = post(client, f"{base_url}/v1/subjects/{subject_id}/images", body)
            return response.status_code, response.headers, response.json() if response.ok else response.text

    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(one, seeds))


def check_answers(answers, library, seed_of_subject: int) -> int:
    """Every answer is an image (equal to the library's, fetched from its URL) or a 503 with
    Retry-After; returns how many images there were."""
    cache = library.create_anchors(ANCHORS, SUBJECTS, seed=seed_of_subject, config=CONFIG,
                                   cache_codec="compact").cache
    expected: dict[tuple[str, int], Any] = {}
    images = 0
    with http() as client:
        for status, headers, body in answers:
            if status == 503:
                assert int(headers["Retry-After"]) > 0
                continue
            assert status == 200, f"{status}: {body}"
            for image in body["images"]:
                key = (image["prompt"], image["seed"])
                if key not in expected:
                    expected[key] = library.generate_from_anchors(cache, [key[0]], [key[1]]).images[0]
                assert_same_pixels(image_pixels(client, image), expected[key])
                images += 1
    return images


def load_on_every_replica(base_url: str, subject_id: str, first_seed: int) -> tuple[list[Any], dict[str, dict]]:
    """Rounds of concurrent requests, each more than there are replicas, until every replica
    has used the subject's cache; the answers, and the replicas' reports."""
    answers, seed = [], first_seed
    for _ in range(6):
        answers += request_images(base_url, subject_id, list(range(seed, seed + 3 * GENERATORS)))
        seed += 3 * GENERATORS
        stats = generator_stats()
        if all(subject_id in s["loads"] for s in stats.values()):
            break
    return answers, stats


def test_a_cache_crosses_to_each_node_once_and_its_replicas_share_it(cluster, library) -> None:
    _, base_url = cluster
    with http() as client:
        # A first subject: what crosses to a node once whatever the subject (replica set-up on
        # first contact) is not counted against the second.
        warm_up = create_subject(client, base_url, seed=3)["subject_id"]
        load_on_every_replica(base_url, warm_up, 1000)
        record = create_subject(client, base_url, seed=0)
    subject_id, cache_bytes = record["subject_id"], record["cache_nbytes"]
    owner_node = anchor_stage_node()
    before = created_bytes_by_node()
    answers, stats = load_on_every_replica(base_url, subject_id, 0)
    after = created_bytes_by_node()
    assert check_answers(answers, library, seed_of_subject=0) == len(answers) >= 3 * GENERATORS

    by_node: dict[str, list[dict[str, Any]]] = {}
    for s in stats.values():
        by_node.setdefault(s["node_id"], []).append(s)
    assert sorted(len(replicas) for replicas in by_node.values()) == [2, 2] and owner_node in by_node
    for node_id, replicas in by_node.items():
        loads = [r["loads"][subject_id] for r in replicas]
        # Each replica took the cache from the object store once, and nothing from elsewhere.
        assert all(load == {"object_store": 1} for load in loads), loads
        crossed = after[node_id] - before[node_id]
        print(f"node {node_id[:8]} ({'owner' if node_id == owner_node else 'pulled'}): {crossed} bytes "
              f"for a {cache_bytes}-byte cache, {len(answers)} requests")
        if node_id == owner_node:
            # Read in place from the shared memory the AnchorStage wrote it to.
            assert crossed < 0.05 * cache_bytes, (crossed, cache_bytes)
        else:
            # Two replicas, many requests: one copy pulled into this node's object store.
            assert 0.95 * cache_bytes <= crossed < 1.25 * cache_bytes, (crossed, cache_bytes)


def test_losing_a_node_under_load_loses_no_answered_image(cluster, library) -> None:
    ray_cluster, base_url = cluster
    with http() as client:
        subject_id = create_subject(client, base_url, seed=1)["subject_id"]
    request_images(base_url, subject_id, [0, 1, 2, 3])  # every replica warm: the loss hits work
    owner_node = anchor_stage_node()
    (victim,) = [n for n in ray_cluster.worker_nodes if n.node_id != owner_node]

    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(request_images, base_url, subject_id, list(range(100, 100 + 4 * GENERATORS)))
        time.sleep(1.0)  # requests in flight on every replica
        ray_cluster.remove_node(victim, allow_graceful=False)
        answers = load.result(timeout=300)
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= len(answers) // 2, statuses  # most were retried on other replicas
    check_answers(answers, library, seed_of_subject=1)
    wait_listed_dead(victim.node_id)

    # A new node (what the autoscaler would add) takes the lost replicas.
    add_worker(ray_cluster, num_gpus=GPUS_PER_NODE)
    generator_stats(timeout_s=180)
    check_answers(request_images(base_url, subject_id, [7, 8]), library, seed_of_subject=1)


def test_losing_the_node_that_owns_a_cache_reloads_it_from_the_artifact_store(cluster, library) -> None:
    ray_cluster, base_url = cluster
    with http() as client:
        subject_id = create_subject(client, base_url, seed=2)["subject_id"]
    owner = node_of(ray_cluster, anchor_stage_node())
    # Its replicas go with it; a node takes their place.
    ray_cluster.remove_node(owner, allow_graceful=False)
    wait_listed_dead(owner.node_id)
    add_worker(ray_cluster, num_gpus=GPUS_PER_NODE)
    generator_stats(timeout_s=300)

    answers = request_images(base_url, subject_id, list(range(2 * GENERATORS)))
    assert [status for status, _, _ in answers] == [200] * len(answers)
    check_answers(answers, library, seed_of_subject=2)
    loads = [s["loads"][subject_id] for s in generator_stats().values() if subject_id in s["loads"]]
    assert loads and all(set(load) == {"artifact_store"} for load in loads), loads


def test_a_replica_given_a_gpu_without_cuda_runs_on_the_cpu_and_says_so(cluster) -> None:
    from ray import serve

    ray_cluster, _ = cluster
    ready = serve.get_deployment_handle("Generator", app_name="consistory").ready.remote().result(timeout_s=60)
    assert ready["device"] == "cpu"
    logs = Path(ray_cluster.head_node.get_session_dir_path()) / "logs" / "serve"
    lines = [line for log in logs.glob("replica_consistory_Generator_*.log") for line in log.read_text().splitlines()
             if "Ray assigned GPU" in line]
    # One line per replica started so far (four at first, more after the node losses above).
    assert len(lines) >= GENERATORS and all("no CUDA device; running the model on the CPU" in line for line in lines)
