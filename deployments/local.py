"""Running the service on a local Ray from Python (tests, benchmarks), as `serve run` would.

    base_url = start_local(args, port=8000)   # ray.init + serve.run + wait for /readyz
    ...
    stop_local()                               # serve.shutdown() + ray.shutdown()
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import requests

from .app import build_app
from .metrics import metrics_address

logger = logging.getLogger(__name__)


def start_local(
    args: dict[str, Any],
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    num_cpus: Optional[float] = None,
    env_vars: Optional[dict[str, str]] = None,
    ready_timeout_s: float = 300.0,
    metrics_export_port: Optional[int] = None,
) -> str:
    """Start Ray (if not running) and Serve on host:port, deploy the app, wait until ready.
    `metrics_export_port`: where the node serves Prometheus metrics (`/metrics`); unset, Ray
    picks a free port, which is logged with the service's address."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        extra: dict[str, Any] = {}
        if metrics_export_port is not None:
            extra["_metrics_export_port"] = metrics_export_port
        init_ray(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
            log_to_driver=False,  # replica logs stay in /tmp/ray/session_latest/logs
            **extra,
        )
    serve.start(http_options={"host": host, "port": port})
    base_url = run_app(args, name="consistory", route_prefix="/", host=host, port=port, ready_timeout_s=ready_timeout_s)
    logger.info("service at %s; metrics at %s", base_url, metrics_address())
    return base_url


RAY_START_ATTEMPTS = 3


def init_ray(**options: Any) -> None:
    """`ray.init`, again if the node missed Ray's own startup deadline: Ray gives its raylet a
    fixed 30 s to register with the GCS, which a machine busy with other work can miss."""
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(**options)
            return
        except Exception as error:
            if "timed out during startup" not in str(error) or attempt == RAY_START_ATTEMPTS:
                raise
            logger.warning("Ray's node missed its startup deadline (attempt %d of %d); starting it again",
                           attempt, RAY_START_ATTEMPTS)
            ray.shutdown()
            time.sleep(5.0)


def run_app(
    args: dict[str, Any],
    *,
    name: str,
    route_prefix: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready_timeout_s: float = 300.0,
) -> str:
    """Deploy one more app on the running Serve instance; returns its base URL once ready."""
    from ray import serve

    base_url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    # Image URLs of the local store start with the address this app is reached at.
    args = {"public_base_url": base_url, **args}
    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    wait_ready(base_url, ready_timeout_s)
    return base_url


def wait_ready(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with requests.Session() as session:
        session.trust_env = False  # loopback: never through an HTTP(S)_PROXY
        while time.monotonic() < deadline:
            try:
                response = session.get(f"{base_url}/readyz", timeout=10)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except requests.RequestException as error:
                last = repr(error)
            time.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:.0f} s: {last}")


def stop_local() -> None:
    """Shut down Serve, then Ray; each step runs even if the one before failed."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
