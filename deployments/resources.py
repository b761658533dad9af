"""Serve options of one deployment, from the service's settings (settings.py), and what clients may
hold of the Ingress deployment's replicas."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DeploymentResources(BaseModel):
    """Serve options of one deployment. `min_replicas < max_replicas` turns on autoscaling on
    ongoing requests; equal bounds give a fixed replica count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(1.0, gt=0)
    max_ongoing_requests: int = Field(2, ge=1)
    # Requests waiting at each caller (proxy or handle) beyond this get 503 + Retry-After;
    # -1 means unbounded, which under overload turns into hangs rather than answers.
    max_queued_requests: int = Field(-1, ge=-1)
    # Serve's defaults wait 30 s before adding and 600 s before removing replicas; a replica on a
    # new GPU node costs minutes, so bursts shorter than the delays are better absorbed in queues.
    upscale_delay_s: Optional[float] = Field(None, ge=0)
    downscale_delay_s: Optional[float] = Field(None, ge=0)
    # At most this many replicas of the deployment on one node (multi-GPU nodes): a node's loss
    # then takes out only that share, and its replicas share that node's copy of each cache.
    max_replicas_per_node: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> "DeploymentResources":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    def deployment_options(self, retry_after_s: float) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            # Serve adds Retry-After itself to the 503s it answers for a full queue.
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
        }
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if self.min_replicas == self.max_replicas:
            options["num_replicas"] = self.max_replicas
        else:
            autoscaling: dict[str, Any] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
            for name in ("upscale_delay_s", "downscale_delay_s"):
                if getattr(self, name) is not None:
                    autoscaling[name] = getattr(self, name)
            options["autoscaling_config"] = autoscaling
        return options


class GeneratorResources(DeploymentResources):
    """The Generator's Serve options, and how its replicas batch: concurrent requests of one
    subject (one `ImageRequest.batch_key`) are made by one `generate_from_anchors` call of up to
    `max_batch_images` images, the first of them waiting at most `batch_wait_ms` for the others.
    On a GPU a UNet forward at a small batch is launch-bound, so a batch costs little more than
    one image. A batch is never larger than `max_ongoing_requests`, the requests Serve lets one
    replica hold: at 2 x max_batch_images the next batch gathers while one is made."""

    max_batch_images: int = Field(4, ge=1)
    batch_wait_ms: float = Field(10.0, ge=0)

    @property
    def batch_size(self) -> int:
        """Images one batch may hold: what the replica can have at once, at most."""
        return min(self.max_batch_images, self.max_ongoing_requests)


# Slots of an Ingress replica kept for /healthz and /readyz: Serve queues a request at the proxy
# once a replica holds max_ongoing_requests, and a probe queued behind user requests would time
# out and get a healthy pod restarted.
PROBE_ROOM = 4


class EdgeSettings(BaseModel):
    """`edge` in the service's args: what clients may hold of one Ingress replica (applied by
    edge/http_edge.py and edge/event_hub.py). With N Ingress replicas, N times as much."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Requests in flight, event streams included, past which a request gets 503 + Retry-After at
    # once; the probes never count. Unset: the Ingress's max_ongoing_requests less PROBE_ROOM.
    max_requests: Optional[int] = Field(None, ge=1)
    # Event streams held at once, in all and per API key (429 past either); each is a request in
    # flight for as long as it lasts. Unset: half of max_requests, so other routes keep the rest.
    max_event_streams: Optional[int] = Field(None, ge=1)
    max_event_streams_per_key: Optional[int] = Field(None, ge=1)  # unset: 4, or max_event_streams if fewer
    # Request headers, names and values, larger than this get 431.
    max_header_bytes: int = Field(16 * 2**10, ge=1024)
    # A body must keep up with min_body_bytes_per_s after the first body_allowance_s, or it gets
    # 408: a client cannot hold a slot by trickling its body, and the largest body the service
    # takes may take body_allowance_s + its size / min_body_bytes_per_s.
    body_allowance_s: float = Field(10.0, gt=0)
    min_body_bytes_per_s: int = Field(256 * 2**10, ge=1)

    def admitted(self, ingress: DeploymentResources) -> int:
        """Requests one Ingress replica takes at once, probes aside."""
        return self.max_requests if self.max_requests is not None else ingress.max_ongoing_requests - PROBE_ROOM

    def event_streams(self, ingress: DeploymentResources) -> int:
        """Event streams one Ingress replica holds at once."""
        return self.max_event_streams if self.max_event_streams is not None else max(1, self.admitted(ingress) // 2)

    def event_streams_per_key(self, ingress: DeploymentResources) -> int:
        """Event streams one API key holds at once on one Ingress replica."""
        if self.max_event_streams_per_key is not None:
            return self.max_event_streams_per_key
        return min(4, self.event_streams(ingress))

    def check_fits(self, ingress: DeploymentResources) -> None:
        """The probes' room and the other routes' share are kept whatever is configured."""
        admitted, streams = self.admitted(ingress), self.event_streams(ingress)
        if admitted + PROBE_ROOM > ingress.max_ongoing_requests:
            raise ValueError(f"edge.max_requests ({admitted}) must leave {PROBE_ROOM} of the Ingress's "
                             f"max_ongoing_requests ({ingress.max_ongoing_requests}) to the probes")
        if streams > admitted // 2:
            raise ValueError(f"edge.max_event_streams ({streams}) may take at most half of the {admitted} "
                             "requests an Ingress replica admits")
        if self.max_event_streams_per_key is not None and self.max_event_streams_per_key > streams:
            raise ValueError(f"edge.max_event_streams_per_key ({self.max_event_streams_per_key}) exceeds "
                             f"max_event_streams ({streams})")
