"""The service on a simulated multi-node cluster (tests/simulated_cluster.py), tiny preset.

  python bench/cluster_scale.py [--json out.json]

Two figures:
  - scale-up: from the start of a load that needs one more Generator to that replica, on a node
    the autoscaler launched for it, answering; split into the node's start (Serve's decision and
    the autoscaler's launch included), the model load in the new replica, and its pull of the
    subject's cache from another node;
  - images/s with 1, 2 and 4 Generator replicas over 1 and 2 worker nodes (fixed cluster).
Every node runs on this machine: on a CPU the figures show the service's overhead and
scheduling, not GPU throughput.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
from service_helpers import http, post  # noqa: E402
from simulated_cluster import (  # noqa: E402
    NODE_OBJECT_STORE_BYTES,
    alive_worker_nodes,
    autoscaling_cluster,
    cluster_service_args,
    fixed_cluster,
    start_serve,
)

ANCHORS = ["a photo of a cat in the park", "a photo of a cat on the beach"]
SCENE = "a cat in the snow"


def create_subject(base_url: str) -> str:
    with http() as client:
        response = post(client, f"{base_url}/v1/subjects", {"prompts": ANCHORS, "subjects": ["cat"], "seed": 0})
        response.raise_for_status()
        return response.json()["subject_id"]


def generator_reports(count: int) -> dict[str, dict]:
    from ray import serve

    handle = serve.get_deployment_handle("Generator", app_name="consistory")
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 120
    while len(seen) < count and time.monotonic() < deadline:
        report = handle.cache_stats.remote().result(timeout_s=30)
        seen[report["replica"]] = report
    return seen


def clients(base_url: str, subject_id: str, concurrency: int, stop: threading.Event) -> list[float]:
    """`concurrency` clients sending one-image requests until `stop`; the times of the 200s."""
    done: list[float] = []
    failures: list[str] = []

    def one() -> None:
        with http() as session:
            seed = 0
            while not stop.is_set():
                body = {"prompts": [SCENE], "seeds": [seed % 8], "response_format": "b64_json"}
                try:
                    if post(session, f"{base_url}/v1/subjects/{subject_id}/images", body).status_code == 200:
                        done.append(time.monotonic())
                except requests.RequestException as error:
                    failures.append(repr(error))
                    stop.wait(1.0)
                seed += 1

    threads = [threading.Thread(target=one, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(timeout=120)
    if failures:
        print(f"{len(failures)} requests failed, e.g. {failures[0]}", flush=True)
    return done


def scale_up() -> dict:
    """One GPU per worker node, two nodes at rest (AnchorStage, one Generator), up to three."""
    worker = {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": NODE_OBJECT_STORE_BYTES},
              "node_config": {}, "min_workers": 2, "max_workers": 3}
    with TemporaryDirectory() as root, autoscaling_cluster({"CPU": 2}, {"gpu_worker": worker}, 0.5):
        while len(alive_worker_nodes()) < 2:
            time.sleep(0.2)
        args = cluster_service_args({"kind": "local", "root": root}, generator={
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 2})
        base_url = start_serve(args)
        subject_id = create_subject(base_url)
        nodes_before = {n["NodeID"] for n in alive_worker_nodes()}
        stop = threading.Event()
        started_at, t0 = time.time(), time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(clients, base_url, subject_id, 4, stop)
            new_node_at = None
            while new_node_at is None and time.monotonic() - t0 < 300:
                if {n["NodeID"] for n in alive_worker_nodes()} - nodes_before:
                    new_node_at = time.time()
                time.sleep(0.2)
            new = None
            while new is None and time.monotonic() - t0 < 400:
                reports = generator_reports(2)
                new = next((r for r in reports.values() if r["node_id"] not in nodes_before and r["first_image_at"]),
                           None)
                time.sleep(0.5)
            stop.set()
            load.result()
    if new_node_at is None or new is None:
        raise RuntimeError("the cluster did not scale up within the time allowed")
    print("new replica's report:", json.dumps(new), flush=True)
    return {
        "node_start_s": new_node_at - started_at,  # load start -> the launched node is alive
        "replica_start_s": new["started_at"] - new_node_at,  # node alive -> replica process runs
        "model_load_s": new["model_load_s"],
        "cache_pull_s": new["load_s"].get(subject_id),
        "first_image_s": new["first_image_at"] - started_at,  # load start -> new replica answered
    }


def throughput(seconds: float) -> dict:
    """Images/s at 1, 2 and 4 Generators: 1x1 on one node, 2 on two nodes, 2x2 on two nodes."""
    layouts = {"1 replica, 1 node": (1, 1), "2 replicas, 2 nodes": (2, 1), "4 replicas, 2 nodes": (4, 2)}
    figures = {}
    with TemporaryDirectory() as root, fixed_cluster(head_cpus=2, workers=[{"num_gpus": 3}] * 2):
        port = None
        for name, (replicas, per_node) in layouts.items():
            args = cluster_service_args({"kind": "local", "root": root}, generator={
                "min_replicas": replicas, "max_replicas": replicas, "max_replicas_per_node": per_node})
            base_url = start_serve(args, port)
            port = int(base_url.rsplit(":", 1)[1])
            subject_id = create_subject(base_url)
            warm = threading.Event()
            threading.Timer(10.0, warm.set).start()
            clients(base_url, subject_id, 2 * replicas, warm)  # every replica loads the cache
            stop = threading.Event()
            threading.Timer(seconds, stop.set).start()
            t0 = time.monotonic()
            done = clients(base_url, subject_id, 2 * replicas, stop)
            figures[name] = len([t for t in done if t - t0 <= seconds]) / seconds
            print(f"{name}: {figures[name]:.2f} images/s", flush=True)
            from ray import serve

            serve.delete("consistory")  # the next layout starts from fresh replicas
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="load per throughput layout")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "preset": "tiny"}
    results["scale_up"] = scale_up()
    print("scale-up:", json.dumps(results["scale_up"], indent=1), flush=True)
    results["images_per_s"] = throughput(args.seconds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
