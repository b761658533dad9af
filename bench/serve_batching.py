"""Batched Generators under load (`python bench/serve_load.py --compare-batching`): the tiny
service with one Generator replica, one subject, N concurrent clients each asking for one new
image at a time over HTTP, with batching on (`max_batch_images` 8) and off (1).

Reports images/s for each, the ratio, and the images per UNet batch (the Generator replica's
count of its `generate_from_anchors` calls).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from typing import Any

import requests

ANCHORS = ["a photo of a corgi in the park", "a photo of a corgi on the beach"]
PROMPTS = ["a corgi in the snow", "a watercolor painting of a corgi", "a corgi reading a book",
           "a corgi on a skateboard", "a corgi wearing a red scarf", "a corgi in a spaceship"]
REQUEST_TIMEOUT_S = 300
BATCH_ON, BATCH_OFF = 8, 1


def service_args(root: str, args: argparse.Namespace, max_batch_images: int) -> dict[str, Any]:
    return {
        "model": "preset:tiny",
        "torch_threads": 1,
        "defaults": {"steps": args.steps, "height": args.size, "width": args.size},
        "store": {"kind": "local", "root": root},
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 64, "max_queued_requests": 256},
        "anchor_stage": {"num_cpus": 0.4, "max_ongoing_requests": 4, "max_queued_requests": 16},
        # Room for every client's request at once, whatever the batch: only batching differs.
        "generator": {"num_cpus": 0.4, "min_replicas": 1, "max_replicas": 1,
                      "max_ongoing_requests": 2 * BATCH_ON, "max_queued_requests": 256,
                      "max_batch_images": max_batch_images, "batch_wait_ms": args.batch_wait_ms},
    }


def _batch_sizes() -> dict[int, int]:
    from ray import serve

    stats = serve.get_deployment_handle("Generator", app_name="consistory").cache_stats.remote().result(timeout_s=60)
    return {int(size): n for size, n in stats["batch_sizes"].items()}


def _load(base: str, subject_id: str, clients: int, duration_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + duration_s
    lock = threading.Lock()
    done: list[float] = []
    errors: list[str] = []

    def client(index: int) -> None:
        with requests.Session() as session:
            session.trust_env = False  # loopback: never through an HTTP(S)_PROXY
            n = 0
            while time.monotonic() < deadline:
                body = {"prompts": [PROMPTS[(index + n) % len(PROMPTS)]], "seeds": [10_000 * index + n]}
                response = session.post(f"{base}/v1/subjects/{subject_id}/images", json=body,
                                        timeout=REQUEST_TIMEOUT_S)
                with lock:
                    if response.status_code == 200:
                        done.append(time.perf_counter())
                    else:
                        errors.append(f"{response.status_code} {response.text[:200]}")
                n += 1

    before = _batch_sizes()
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration_s + REQUEST_TIMEOUT_S + 30)
    wall = time.perf_counter() - started
    after = _batch_sizes()
    batches = {size: after.get(size, 0) - before.get(size, 0) for size in sorted(after)}
    batches = {size: n for size, n in batches.items() if n}
    calls = sum(batches.values())
    return {"clients": clients, "wall_s": wall, "images": len(done), "images_per_s": len(done) / wall,
            "unet_batches": batches, "images_per_unet_batch": (len(done) / calls) if calls else None,
            "errors": len(errors), "first_errors": errors[:5]}


def compare_batching(args: argparse.Namespace) -> dict[str, Any]:
    from deployments.local import start_local, stop_local

    runs: dict[str, Any] = {}
    for label, max_batch_images in (("on", BATCH_ON), ("off", BATCH_OFF)):
        with tempfile.TemporaryDirectory(prefix="consistory-bench-") as root:
            try:
                base = start_local(service_args(root, args, max_batch_images), port=args.port,
                                   num_cpus=args.num_cpus)
                with requests.Session() as session:
                    session.trust_env = False
                    created = session.post(f"{base}/v1/subjects", json={"prompts": ANCHORS, "subjects": ["corgi"]},
                                           timeout=REQUEST_TIMEOUT_S).json()
                    subject_id = created["subject_id"]
                    # The cache loaded on the Generator first: the figures are of new images only.
                    session.post(f"{base}/v1/subjects/{subject_id}/images", json={"prompts": PROMPTS[:1]},
                                 timeout=REQUEST_TIMEOUT_S).raise_for_status()
                runs[label] = {"max_batch_images": max_batch_images,
                               **_load(base, subject_id, args.clients, args.duration)}
            finally:
                stop_local()
        run = runs[label]
        print(f"--- batching {label} (max_batch_images {max_batch_images}): {run['clients']} clients, "
              f"{run['wall_s']:.1f} s: {run['images_per_s']:.2f} images/s, "
              f"{run['images_per_unet_batch'] or 0:.2f} images per UNet batch {run['unet_batches']}, "
              f"errors {run['errors']}")
    off = runs["off"]["images_per_s"]
    return {"preset": "tiny", "steps": args.steps, "size": args.size, "batch_wait_ms": args.batch_wait_ms,
            "runs": runs, "images_per_s_ratio_on_over_off": runs["on"]["images_per_s"] / off if off else None}
