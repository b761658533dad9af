"""Autoscaling end to end on a simulated cluster: under a ramp of requests Generator replicas scale
up, the autoscaler adds a GPU node for the ones that cannot be placed, and when the load stops
both go back down. Every answer is an image equal to the library's or a 503 with Retry-After.

The cluster (tests/simulated_cluster.py) is Ray's real autoscaler driving its fake multi-node
provider: a CPU head and a `gpu_worker` node type declaring one GPU, as in cluster/rayservice.yaml
and cluster/cluster-launcher.yaml; two nodes to start with (the AnchorStage and one Generator)
and at most four.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from service_helpers import http, post
from simulated_cluster import (
    NODE_OBJECT_STORE_BYTES,
    alive_worker_nodes,
    autoscaling_cluster,
    cluster_service_args,
    running_replicas,
    start_serve,
)
from test_cluster_nodes import SCENES, check_answers, create_subject

pytestmark = pytest.mark.cluster

WORKER = {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": NODE_OBJECT_STORE_BYTES},  # as the manifests
          "node_config": {}, "min_workers": 2, "max_workers": 4}
IDLE_TIMEOUT_MINUTES = 0.1  # an idle node goes after 6 s (production: 10 minutes)
MAX_GENERATORS = 3  # with the AnchorStage, the GPUs of all four nodes
START, PEAK = (1, 2), (MAX_GENERATORS, 4)  # (Generator replicas, GPU nodes)


class Trajectory:
    """(seconds, Generator replicas running, GPU worker nodes alive), sampled every half second."""

    def __init__(self) -> None:
        self.points: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "Trajectory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.points.append((time.monotonic() - self._started, running_replicas("Generator"),
                                len(alive_worker_nodes())))
            self._stop.wait(0.5)

    def wait_for(self, predicate, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.points and predicate(self.points[-1])):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not reached in {timeout_s} s; trajectory {self.compact()}")
            time.sleep(0.5)

    def compact(self) -> list[tuple[float, int, int]]:
        """The points where replicas or nodes changed."""
        out = []
        for point in self.points:
            if not out or point[1:] != out[-1][1:]:
                out.append((round(point[0], 1), *point[1:]))
        return out


def ramp(base_url: str, subject_id: str, stop: threading.Event) -> list[Any]:
    """Concurrent clients added one every 2 s up to 8, each sending one-image requests back to
    back until `stop`; every answer as (status, headers, body)."""
    answers: list[Any] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        seed = number
        with http() as session:
            while not stop.is_set():
                # Eight distinct images in all, so that each is checked against the library once.
                body = {"prompts": [SCENES[seed % len(SCENES)]], "seeds": [seed % 8]}
                response = post(session, f"{base_url}/v1/subjects/{subject_id}/images", body)
                with lock:
                    answers.append((response.status_code, response.headers,
                                    response.json() if response.ok else response.text))
                seed += 1
                if response.status_code == 503:
                    stop.wait(float(response.headers.get("Retry-After", 1)))

    with ThreadPoolExecutor(8) as pool:
        for number in range(8):
            pool.submit(client, number)
            if stop.wait(2.0):
                break
    return answers


def test_generators_and_nodes_scale_up_under_load_and_back_down(tmp_path: Path, tiny_pipe) -> None:
    store = {"kind": "local", "root": str(tmp_path / "artifacts")}
    args = cluster_service_args(store, generator={
        "min_replicas": 1, "max_replicas": MAX_GENERATORS, "target_ongoing_requests": 1,
        "max_ongoing_requests": 2, "upscale_delay_s": 2, "downscale_delay_s": 10,
    })
    with autoscaling_cluster({"CPU": 2}, {"gpu_worker": WORKER}, IDLE_TIMEOUT_MINUTES):
        deadline = time.monotonic() + 120
        while len(alive_worker_nodes()) < WORKER["min_workers"]:  # the autoscaler's first launches
            assert time.monotonic() < deadline, "the autoscaler started no worker node"
            time.sleep(0.5)
        base_url = start_serve(args)
        with http() as client:
            subject_id = create_subject(client, base_url, seed=0)["subject_id"]

        with Trajectory() as trajectory:
            trajectory.wait_for(lambda p: p[1:] == START, timeout_s=60)
            stop = threading.Event()
            with ThreadPoolExecutor(1) as pool:
                load = pool.submit(ramp, base_url, subject_id, stop)
                try:
                    trajectory.wait_for(lambda p: p[1:] == PEAK, timeout_s=240)
                    time.sleep(5)  # the new node's replicas serve a while
                finally:
                    stop.set()
                answers = load.result(timeout=300)
            trajectory.wait_for(lambda p: p[1:] == START, timeout_s=240)
        # Fetched from the URLs the answers gave, after the replicas that made them are gone.
        images = check_answers(answers, tiny_pipe, seed_of_subject=0)

    points = trajectory.compact()
    print("trajectory (s, generators, GPU nodes):", points)
    peak = max(range(len(points)), key=lambda i: (points[i][1], points[i][2]))
    assert points[0][1:] == START and points[peak][1:] == PEAK and points[-1][1:] == START
    # It rose, then fell: replicas never dropped before the peak, nor rose after the load stopped.
    assert all(a[1] <= b[1] for a, b in zip(points[:peak], points[1:peak + 1])), points
    assert all(a[1] >= b[1] for a, b in zip(points[peak:], points[peak + 1:])), points

    assert images >= 10, f"{images} images in {len(answers)} answers"
