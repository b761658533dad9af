"""The Ray side of a batch: joining or starting a cluster, and what it has room for."""

from __future__ import annotations

import logging
import os

import ray

from consistory.errors import UsageError

# Ray notes, each time it starts a local instance, that the instance is protected by a token
# (the safe default). Nothing to do about it; its warning that auth is *disabled* still shows.
_AUTH_ENABLED_NOTE = "Token authentication is enabled for this Ray cluster"


class _DropAuthEnabledNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _AUTH_ENABLED_NOTE not in record.getMessage()


def connect(address: str | None) -> bool:
    """Join the cluster (`address`, else RAY_ADDRESS as `ray job submit` sets it, else a running
    local cluster) or start a local Ray. True when this call started Ray (so it shuts it down)."""
    if ray.is_initialized():
        return False
    local = not address and not os.environ.get("RAY_ADDRESS")
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DropAuthEnabledNote())
    # Ray's own start-up lines are of no use on a terminal; warnings and errors still show.
    ray.init(address=address or None, logging_level="WARNING", **({"include_dashboard": False} if local else {}))
    return True


def choose_device(requested: str) -> str:
    gpus = ray.cluster_resources().get("GPU", 0)
    if requested == "auto":
        return "cuda" if gpus else "cpu"
    if requested == "cuda" and not gpus:
        raise UsageError("--device cuda, but the Ray cluster has no GPUs; leave --device out to run on CPUs")
    return requested


def default_actor_count(device: str) -> int:
    """One model actor per GPU of the cluster (one pipeline per GPU); one on CPUs."""
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if device == "cuda" else 1


def check_room(actors: int, cpus_each: float, gpus_each: int, strict: bool) -> None:
    """A local Ray started for this run never grows: refuse a pool it cannot place, which would
    otherwise wait forever. A cluster may add nodes (autoscaling), so there it is only a note."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if actors * cpus_each <= cpus + 1e-9 and actors * gpus_each <= gpus:
        return
    message = (f"{actors} actor(s) x {cpus_each:g} CPU{f' x {gpus_each} GPU' if gpus_each else ''} do not fit the "
               f"Ray cluster's {cpus:g} CPUs and {gpus:g} GPUs; lower --actors or --cpus-per-actor")
    if strict:
        raise UsageError(message)
    print(f"consistory: note: {message} (waiting for the cluster to grow)", flush=True)
