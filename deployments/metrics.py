"""The service's own metrics, exported in Prometheus form through Ray's metrics agent (each
node's `metrics_export_port`; Prometheus prefixes every name with `ray_`).

  consistory_requests_total{route, status}             HTTP answers by route template and status
  consistory_images_total{kind}                        images made: anchor, new
  consistory_time_to_consistent_subject_seconds        request start to its first consistent image
                                                       (the anchors for a subject, the first new
                                                       image of a story)
  consistory_stage_seconds{stage}                      anchors, cache_load, generation, store
  consistory_cache_uses_total{source}                  where a Generator's cache came from: replica,
                                                       object_store, artifact_store, rebuilt
  consistory_cache_resident_bytes{replica}             anchor-cache bytes a Generator replica holds
  consistory_generator_batch_images                    images per generate_from_anchors call (one
                                                       UNet batch) of the Generators
  consistory_jobs_total{status}                        jobs by the state they reached: queued (made),
                                                       running (started or taken over), succeeded,
                                                       failed, cancelled

Queue depth and ongoing requests per deployment are Ray Serve's own
(`ray_serve_deployment_queued_queries`, `ray_serve_replica_processing_queries`).
Where: every Ingress replica logs its node's endpoint when it starts (`metrics_address`): Ray
picks a free port unless the node was started with `ray start --metrics-export-port`.
Metrics are made on first use in each replica process (Ray's metric objects need a connected
worker), and record nothing where Ray is not running.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

logger = logging.getLogger("ray.serve")

# Seconds: from a 64 px tiny-preset image on a CPU to a 16-prompt 1024 px story on one GPU.
LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600]
# Images per Generator batch: a bucket per size up to 8 (the GPU configs' batch), then coarser.
BATCH_BOUNDARIES = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32]


@functools.lru_cache(maxsize=1)
def _metrics() -> Optional[dict]:
    try:
        import ray
        from ray.util.metrics import Counter, Gauge, Histogram

        if not ray.is_initialized():
            return None
        return {
            "requests": Counter("consistory_requests", "HTTP answers by route and status",
                                tag_keys=("route", "status")),
            "images": Counter("consistory_images", "Images made, by kind (anchor, new)", tag_keys=("kind",)),
            "ttcs": Histogram("consistory_time_to_consistent_subject_seconds",
                              "From a request's start to its first image of the consistent subject",
                              boundaries=LATENCY_BOUNDARIES),
            "stage": Histogram("consistory_stage_seconds", "Latency of each stage of a request",
                               boundaries=LATENCY_BOUNDARIES, tag_keys=("stage",)),
            "cache_uses": Counter("consistory_cache_uses", "Where a Generator's anchor cache came from",
                                  tag_keys=("source",)),
            "jobs": Counter("consistory_jobs", "Jobs by the state they reached", tag_keys=("status",)),
            "batch_images": Histogram("consistory_generator_batch_images",
                                      "Images per generate_from_anchors call of a Generator replica",
                                      boundaries=BATCH_BOUNDARIES),
            "cache_bytes": Gauge("consistory_cache_resident_bytes", "Anchor-cache bytes a Generator replica holds",
                                 tag_keys=("replica",)),
        }
    except Exception:  # metrics must never break a request
        logger.exception("metrics are off: could not create them")
        return None


def metrics_address() -> Optional[str]:
    """The URL of this Ray node's metrics endpoint (None where Ray is not running)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        here = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == here)
        return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    except Exception:  # only a log line depends on it
        logger.exception("could not find this node's metrics endpoint")
        return None


def log_metrics_address() -> None:
    """Says where Prometheus finds this node's metrics: on a laptop the port is otherwise a
    random one nobody was told (the service's own port has no /metrics)."""
    address = metrics_address()
    if address is not None:
        logger.info("metrics of this node (Prometheus text, names prefixed ray_): %s", address)


def count_request(route: str, status: int) -> None:
    if (m := _metrics()) is not None:
        m["requests"].inc(1, tags={"route": route, "status": str(status)})


def count_images(kind: str, n: int = 1) -> None:
    if (m := _metrics()) is not None and n > 0:
        m["images"].inc(n, tags={"kind": kind})


def observe_time_to_consistent_subject(seconds: float) -> None:
    if (m := _metrics()) is not None:
        m["ttcs"].observe(seconds)


def observe_stage(stage: str, seconds: float) -> None:
    if (m := _metrics()) is not None:
        m["stage"].observe(seconds, tags={"stage": stage})


def count_cache_use(source: str) -> None:
    if (m := _metrics()) is not None:
        m["cache_uses"].inc(1, tags={"source": source})


def count_job(status: str) -> None:
    if (m := _metrics()) is not None:
        m["jobs"].inc(1, tags={"status": status})


def observe_batch(images: int) -> None:
    if (m := _metrics()) is not None:
        m["batch_images"].observe(images)


def set_cache_bytes(nbytes: int, replica: str) -> None:
    if (m := _metrics()) is not None:
        m["cache_bytes"].set(nbytes, tags={"replica": replica})


class RequestMetrics:
    """ASGI middleware counting answers by route template (`/v1/subjects/{subject_id}`, never
    the id itself, which would make a time series per subject) and status."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client sees if nothing answers

        async def recording(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            count_request(route, status)
