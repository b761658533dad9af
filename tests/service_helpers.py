"""Shared pieces of the service suites: settings of the tiny test service, an HTTP client that
talks to it as any client would, and handles on its Ray replicas for failure injection."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Iterator

import numpy as np
import pytest
import requests

from consistory import ConsiStoryConfig
from deployments.images import decode_png, from_b64

# 64 px, 3 steps: a whole story takes well under a second per image on one CPU core.
STEPS, SIZE = 3, 64
# No request may hang a test; every call is bounded by this: the service's own request deadline
# (600 s), which a machine shared with other heavy work can come near.
REQUEST_TIMEOUT_S = 600
APP = "consistory"  # the app name `local_service` deploys under
SUBJECTS = ["cat"]
ANCHORS = ["a photo of a cat in the park", "a photo of a cat on the beach"]
CONFIG = ConsiStoryConfig(num_inference_steps=STEPS, height=SIZE, width=SIZE)  # the service's defaults


# Fixtures a service suite imports: its own store for the module, and the library in-process.
@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def library(tiny_pipe):
    """The same tiny model in this process: what the service must agree with."""
    return tiny_pipe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_service_args(store: dict[str, Any], generators: int = 2, **overrides: Any) -> dict[str, Any]:
    """Builder args for the tiny preset on a 2-core machine: small CPU shares for every replica,
    one torch thread each, so two apps and the test process fit side by side."""
    args: dict[str, Any] = {
        "model": "preset:tiny",
        "torch_threads": 1,
        "defaults": {"steps": STEPS, "height": SIZE, "width": SIZE},
        "limits": {"max_prompts": 6, "max_height": 128, "max_width": 128, "max_steps": 10},
        "store": store,
        "retry_after_s": 2,
        "ingress": {"num_cpus": 0.05, "max_ongoing_requests": 32, "max_queued_requests": 64},
        "anchor_stage": {"num_cpus": 0.2, "max_ongoing_requests": 4, "max_queued_requests": 16},
        "generator": {
            "num_cpus": 0.2,
            "min_replicas": generators,
            "max_replicas": generators,
            "max_ongoing_requests": 2,
            "max_queued_requests": 32,
        },
    }
    args.update(overrides)
    return args


@contextlib.contextmanager
def local_service(args: dict[str, Any], **options: Any) -> Iterator[str]:
    """A local Ray + Serve app on a free loopback port (its base URL), shut down afterwards."""
    import ray
    from ray import serve

    from deployments.local import start_local

    try:
        yield start_local(args, port=free_port(), num_cpus=2, env_vars=blank_store_env(), **options)
    finally:
        serve.shutdown()
        ray.shutdown()


def blank_store_env() -> dict[str, str]:
    """Env vars for the replicas that blank any CONSISTORY_* store setting of the outer
    environment (the store reads env first, and treats an empty value as unset)."""
    return {name: "" for name in os.environ if name.startswith("CONSISTORY_")}


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only: never through an HTTP(S)_PROXY
    return session


def post(session: requests.Session, url: str, body: Any) -> requests.Response:
    return session.post(url, json=body, timeout=REQUEST_TIMEOUT_S)


def ok_json(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.status_code}: {response.text[:500]}"
    return response.json()


def create_subject(session: requests.Session, base_url: str, seed: int) -> dict[str, Any]:
    """A subject of ANCHORS, as POST /v1/subjects answers it."""
    return ok_json(post(session, f"{base_url}/v1/subjects", {"prompts": ANCHORS, "subjects": SUBJECTS, "seed": seed}))


def image_pixels(session: requests.Session, image: dict[str, Any]) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of one answered image, by URL or base64."""
    if "b64_json" in image:
        assert "url" not in image
        return decode_png(from_b64(image["b64_json"]))
    response = session.get(image["url"], timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, f"GET {image['url']}: {response.status_code}"
    assert response.headers["content-type"] == "image/png"
    return decode_png(response.content)


def assert_same_pixels(service: np.ndarray, library_image: Any) -> None:
    """The service's PNG equals the library's image within one level of 255 per pixel."""
    expected = np.asarray(library_image.convert("RGB"))
    assert service.shape == expected.shape
    diff = np.abs(service.astype(np.int16) - expected.astype(np.int16)).max()
    assert diff <= 1, f"service and library differ by {diff}/255"


# --- Ray side: replicas of the running app ---
def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Serve names its replica actors 'SERVE_REPLICA::<app>#<deployment>#<id>' in namespace 'serve'."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def kill_replicas(app: str, deployment: str, timeout_s: float = 300) -> int:
    """Kill every replica of a deployment the way a crash would (Serve then starts new ones),
    and return only once Ray's control store lists each as gone: ray.kill merely sends the
    order, and an object its owner still serves while dying is not lost yet."""
    import ray

    names = replica_actor_names(app, deployment)
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + timeout_s
    while set(names) & set(replica_actor_names(app, deployment)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{deployment} replicas still listed {timeout_s} s after ray.kill")
        time.sleep(0.1)
    return len(names)


def wait_replaced(app: str, deployment: str, dead: set[str], base_url: str, timeout_s: float = 600) -> None:
    """Wait until the deployment has a replica that is not one of `dead` and the app is ready."""
    deadline = time.monotonic() + timeout_s
    session = http()
    while time.monotonic() < deadline:
        alive = set(replica_actor_names(app, deployment)) - dead
        if alive:
            try:
                if session.get(f"{base_url}/readyz", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"{deployment} of app {app} was not replaced within {timeout_s} s")


def replace_replicas(app: str, deployment: str, base_url: str, expected: int | None = None) -> None:
    """Kill every replica of a deployment and wait until Serve has replaced them: by then Ray
    has long released the objects they owned (right after a kill, a same-node reader may still
    find a dying owner's object in shared memory). `expected`: how many there must have been."""
    dead = set(replica_actor_names(app, deployment))
    killed = kill_replicas(app, deployment)
    assert expected is None or killed == expected, f"{killed} {deployment} replicas, expected {expected}"
    wait_replaced(app, deployment, dead, base_url)
