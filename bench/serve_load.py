"""Load on a running ConsiStory service: N concurrent HTTP clients, a fixed request mix.

Each client repeats a fixed pattern of operations until the time (--duration) or the operation
budget (--requests) runs out:
  new subject       POST /v1/subjects (the anchors), then POST /v1/subjects/{id}/images with one
                    prompt; their summed latency is the time to a consistent subject
  existing subject  POST /v1/subjects/{id}/images with --images-per-request prompts, on one of
                    the client's subjects
One operation in --new-every is a new subject. Prints and writes (--json) images per second,
p50/p99 latency per request kind and the time to a consistent subject.

    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 4 --duration 60 --json out.json

With --compare-replicas the script starts the service itself (tiny preset, local store, via
deployments.local), once with 1 and once with 2 Generator replicas, loads each the same way,
shuts it down, and reports how throughput changes. With --compare-batching it starts it with one
Generator replica, batching on and off, and N clients (8 unless --clients) of one subject
(serve_batching.py).

    python bench/serve_load.py --compare-batching --duration 30 --json bench/results/serve-batching.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import numpy as np
import requests

SUBJECTS = ["corgi"]
ANCHORS = ["a photo of a corgi in the park", "a photo of a corgi on the beach"]
NEW_PROMPTS = [
    "a corgi in the snow",
    "a watercolor painting of a corgi",
    "a corgi reading a book",
    "a corgi on a skateboard",
    "a corgi wearing a red scarf",
    "a corgi in a spaceship",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
REQUEST_TIMEOUT_S = 300


@dataclass
class Tally:
    """What all clients observed; appended under a lock."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"create_subject": [], "images": []})
    ttcs: list[float] = field(default_factory=list)  # time to consistent subject
    images: int = 0  # every image answered (anchors included)
    new_images: int = 0  # images made from a cache
    operations: dict[str, int] = field(default_factory=lambda: {"new_subject": 0, "existing_subject": 0})
    rejected: int = 0  # 503 (overload), retried after Retry-After
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Budget:
    """Shared stop condition: a deadline and, optionally, a number of operations."""

    def __init__(self, duration_s: float, operations: Optional[int]) -> None:
        self.deadline = time.monotonic() + duration_s
        self.left = operations
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if time.monotonic() >= self.deadline or self.left == 0:
                return False
            if self.left is not None:
                self.left -= 1
            return True


def _post(session: requests.Session, url: str, body: dict, tally: Tally, kind: str) -> Optional[dict]:
    """One request; None when it was rejected (503, after waiting Retry-After) or failed."""
    started = time.perf_counter()
    try:
        response = session.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as error:
        with tally.lock:
            tally.errors.append(f"{kind}: {error!r}")
        return None
    elapsed = time.perf_counter() - started
    if response.status_code == 503:
        with tally.lock:
            tally.rejected += 1
        time.sleep(min(float(response.headers.get("Retry-After", 1)), 5.0))
        return None
    if response.status_code != 200:
        with tally.lock:
            tally.errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
        return None
    answer = response.json()
    with tally.lock:
        tally.latencies[kind].append(elapsed)
        tally.images += len(answer["images"])
        if kind == "images":
            tally.new_images += len(answer["images"])
    answer["_latency_s"] = elapsed
    return answer


def _client(index: int, base: str, args: argparse.Namespace, budget: Budget, tally: Tally) -> None:
    session = requests.Session()
    session.trust_env = False
    subjects: list[str] = []
    op = 0
    while budget.take():
        prompt_at = index * 7 + op
        if not subjects or op % args.new_every == 0:
            created = _post(session, f"{base}/v1/subjects",
                            {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": 1000 * index + op},
                            tally, "create_subject")
            if created is not None:
                first = _post(session, f"{base}/v1/subjects/{created['subject_id']}/images",
                              {"prompts": [NEW_PROMPTS[prompt_at % len(NEW_PROMPTS)]]}, tally, "images")
                if first is not None:
                    subjects.append(created["subject_id"])
                    with tally.lock:
                        tally.ttcs.append(created["_latency_s"] + first["_latency_s"])
                        tally.operations["new_subject"] += 1
        else:
            prompts = [NEW_PROMPTS[(prompt_at + k) % len(NEW_PROMPTS)] for k in range(args.images_per_request)]
            if _post(session, f"{base}/v1/subjects/{subjects[op % len(subjects)]}/images",
                     {"prompts": prompts}, tally, "images") is not None:
                with tally.lock:
                    tally.operations["existing_subject"] += 1
        op += 1
    session.close()


def _percentiles(values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "mean": None}
    array = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)),
            "mean": float(array.mean())}


def run_load(base: str, args: argparse.Namespace) -> dict[str, Any]:
    tally = Tally()
    budget = Budget(args.duration, args.requests)
    threads = [threading.Thread(target=_client, args=(i, base, args, budget, tally), daemon=True)
               for i in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        # Every request is bounded by REQUEST_TIMEOUT_S, so the clients end soon after the budget.
        thread.join(timeout=args.duration + REQUEST_TIMEOUT_S + 30)
    wall = time.perf_counter() - started
    return {
        "url": base,
        "clients": args.clients,
        "wall_s": wall,
        "operations": tally.operations,
        "images": tally.images,
        "new_images": tally.new_images,
        "images_per_s": tally.images / wall,
        "new_images_per_s": tally.new_images / wall,
        "latency_s": {kind: _percentiles(values) for kind, values in tally.latencies.items()},
        "time_to_consistent_subject_s": _percentiles(tally.ttcs),
        "rejected_503": tally.rejected,
        "errors": len(tally.errors),
        "first_errors": tally.errors[:5],
    }


def compare_replicas(args: argparse.Namespace) -> dict[str, Any]:
    """Start the tiny service with 1, then 2 Generator replicas, load each the same way."""
    from deployments.local import start_local, stop_local

    runs: dict[str, Any] = {}
    for generators in (1, 2):
        with tempfile.TemporaryDirectory(prefix="consistory-bench-") as root:
            service_args = {
                "model": "preset:tiny",
                "torch_threads": 1,
                "defaults": {"steps": args.steps, "height": args.size, "width": args.size},
                "store": {"kind": "local", "root": root},
                "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 64, "max_queued_requests": 256},
                "anchor_stage": {"num_cpus": 0.4, "max_ongoing_requests": 8, "max_queued_requests": 64},
                "generator": {"num_cpus": 0.4, "min_replicas": generators, "max_replicas": generators,
                              "max_ongoing_requests": 2, "max_queued_requests": 256},
            }
            try:
                base = start_local(service_args, port=args.port, num_cpus=args.num_cpus)
                _warm_up(base)
                runs[str(generators)] = run_load(base, args)
            finally:
                stop_local()
        _print(f"{generators} Generator replica(s)", runs[str(generators)])
    one, two = runs["1"], runs["2"]
    return {
        "preset": "tiny",
        "steps": args.steps,
        "size": args.size,
        "runs": runs,
        "images_per_s_ratio_2_over_1": two["images_per_s"] / one["images_per_s"] if one["images_per_s"] else None,
        "new_images_per_s_ratio_2_over_1": (
            two["new_images_per_s"] / one["new_images_per_s"] if one["new_images_per_s"] else None
        ),
    }


def _warm_up(base: str) -> None:
    """One subject and one image first, so the figures leave out first-call costs."""
    with requests.Session() as session:
        session.trust_env = False
        created = session.post(f"{base}/v1/subjects", json={"prompts": ANCHORS, "subjects": SUBJECTS},
                               timeout=REQUEST_TIMEOUT_S).json()
        session.post(f"{base}/v1/subjects/{created['subject_id']}/images", json={"prompts": NEW_PROMPTS[:2]},
                     timeout=REQUEST_TIMEOUT_S)


def _print(title: str, result: dict[str, Any]) -> None:
    def fmt(stats: dict) -> str:
        if not stats["n"]:
            return "n=0"
        return f"p50 {stats['p50']:.3f} s  p99 {stats['p99']:.3f} s  (n={stats['n']})"

    print(f"--- {title}: {result['clients']} clients, {result['wall_s']:.1f} s")
    print(f"  images/s {result['images_per_s']:.2f} (from caches {result['new_images_per_s']:.2f}); "
          f"operations {result['operations']}; 503s {result['rejected_503']}; errors {result['errors']}")
    for kind, stats in result["latency_s"].items():
        print(f"  {kind:<15} {fmt(stats)}")
    print(f"  time to consistent subject {fmt(result['time_to_consistent_subject_s'])}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running service")
    parser.add_argument("--clients", type=int, default=None, help="4; 8 with --compare-batching")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (always bounded)")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many operations")
    parser.add_argument("--new-every", type=int, default=4, help="one operation in this many is a new subject")
    parser.add_argument("--images-per-request", type=int, default=2)
    parser.add_argument("--json", dest="json_path", default=None, help="write the figures here")
    parser.add_argument("--allow-remote", action="store_true", help="allow a URL that is not loopback")
    parser.add_argument("--compare-replicas", action="store_true",
                        help="start the tiny service itself with 1 then 2 Generator replicas")
    parser.add_argument("--compare-batching", action="store_true",
                        help="start the tiny service itself with batching on, then off")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="--compare-batching: batch_wait_ms")
    parser.add_argument("--port", type=int, default=8000, help="--compare-*: HTTP port to serve on")
    parser.add_argument("--steps", type=int, default=10, help="--compare-*: denoising steps")
    parser.add_argument("--size", type=int, default=64, help="--compare-*: image height and width")
    parser.add_argument("--num-cpus", type=float, default=None, help="--compare-*: CPUs Ray may use")
    args = parser.parse_args(argv)
    args.clients = args.clients or (8 if args.compare_batching else 4)
    if args.clients < 1 or args.duration <= 0 or args.new_every < 1 or args.images_per_request < 1:
        parser.error("--clients, --duration, --new-every and --images-per-request must be positive")

    if args.compare_batching:
        from serve_batching import compare_batching

        result = compare_batching(args)
        ratio = result["images_per_s_ratio_on_over_off"]
        print(f"=== images/s, batching on over off: {ratio:.2f}" if ratio else "=== no images with batching off")
    elif args.compare_replicas:
        result = compare_replicas(args)
        ratio = result["images_per_s_ratio_2_over_1"]
        print(f"=== images/s, 2 Generator replicas over 1: {ratio:.2f}" if ratio else "=== no images with 1 replica")
    else:
        host = urlparse(args.url).hostname or ""
        if host not in LOOPBACK and not args.allow_remote:
            parser.error(f"{args.url} is not a loopback address; pass --allow-remote to load it anyway")
        base = args.url.rstrip("/")
        _warm_up(base)
        result = run_load(base, args)
        _print("load", result)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
