"""A multi-node Ray cluster on this one machine, running the service as on GPU nodes.

Two shapes (the service's HTTP address is on loopback; Ray's nodes use the host's address):
  - `fixed_cluster`: Ray's `cluster_utils.Cluster`, a head and worker nodes started from this
    process. Each node is its own raylet with its own object store, so objects really cross
    between "nodes"; a node is removed by killing its processes, as a lost machine would be.
  - `autoscaling_cluster`: `ray start --head` with the real autoscaler driving Ray's fake
    multi-node provider, which launches and terminates worker raylets as it decides. It runs in
    its own session and temp dir and is stopped by killing that session's processes:
    `AutoscalingCluster.shutdown()` (`ray stop --force`) would kill every Ray on the machine.

Worker nodes declare GPUs they do not have; replicas that ask for `num_gpus: 1` are placed as on
a GPU cluster and run the model on the CPU (the replica logs one line saying so).

`cluster_service_args` derives the app's args from cluster/serve_config_gpu.yaml itself, shrunk
to the tiny preset: the deployments and the config's shape are production's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from service_helpers import SIZE, STEPS, blank_store_env, free_port

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "cluster" / "serve_config_gpu.yaml"
LOOPBACK = "127.0.0.1"
APP = "consistory"
# Every worker node's object store: far above a tiny cache, far below this machine's memory.
NODE_OBJECT_STORE_BYTES = 200 * 1024**2
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def cluster_service_args(store: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The GPU cluster's app args with the tiny model, small requests and CPU shares that fit
    this machine. GPUs per replica, codec, autoscaling fields and auth stay as production has
    them unless `overrides` (merged one level deep) say otherwise."""
    config = yaml.safe_load(GPU_CONFIG.read_text())
    args = config["applications"][0]["args"]
    args.update(
        model="preset:tiny",
        variant=None,
        torch_threads=1,
        defaults={**args["defaults"], "steps": STEPS, "height": SIZE, "width": SIZE},
        limits={**args["limits"], "max_height": 128, "max_width": 128, "max_steps": 10},
        store=store,
        cache_lru_bytes="64MB",
        cache_chunk_bytes="256KiB",  # several chunks even for a tiny cache, as at 1024 px
        object_fetch_timeout_s=30,
        retry_after_s=2,
        request_deadline_s=120,
        log_encoding="TEXT",
        auth={"enabled": False},
        compile=False,  # inductor on a CPU costs minutes of compiling and pays nothing
    )
    # One (logical) CPU per model replica and one per declared GPU on the workers, as in the
    # manifests, where model replicas fill a GPU node: the Ingress always lands on the head and
    # a lost GPU node never takes an Ingress with it. A worker here may keep a GPU free (room for
    # the AnchorStage), so the Ingress asks for more than that one CPU.
    args["ingress"] = {**args["ingress"], "num_cpus": 1.5, "min_replicas": 1, "max_replicas": 1}
    args["anchor_stage"] = {**args["anchor_stage"], "num_cpus": 1, "min_replicas": 1, "max_replicas": 1}
    args["generator"] = {**args["generator"], "num_cpus": 1}
    for key, value in overrides.items():
        args[key] = {**args[key], **value} if isinstance(value, dict) and isinstance(args.get(key), dict) else value
    return args


def start_serve(args: dict[str, Any], port: Optional[int] = None) -> str:
    """Serve on the head node only (every simulated node shares one address, so one proxy),
    the app deployed and ready; returns its base URL. With the `port` of a running Serve, the
    app is redeployed there with the new args."""
    from ray import serve

    from deployments.local import run_app

    if port is None:
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": LOOPBACK, "port": port})
    return run_app(args, name=APP, route_prefix="/", port=port, ready_timeout_s=300)


# --- fixed topology --------------------------------------------------------------------------
@contextlib.contextmanager
def fixed_cluster(head_cpus: float, workers: list[dict[str, Any]]) -> Iterator[Any]:
    """A head node and `workers` (RayParams keyword arguments each, e.g. num_gpus), with the
    driver connected. Yields the `ray.cluster_utils.Cluster`; shut down afterwards."""
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "gcs_server_port": free_port(), "dashboard_agent_listen_port": free_port(),
        "include_dashboard": False, "object_store_memory": NODE_OBJECT_STORE_BYTES,
    })
    # Cluster() records its address as this machine's "current" Ray, which any other `ray.init()`
    # here would then join; the driver below connects by address, so forget it.
    reset_ray_address()
    try:
        for worker in workers:
            add_worker(cluster, **worker)
        cluster.wait_for_nodes()
        with _driver(cluster.address):
            yield cluster
    finally:
        cluster.shutdown()


@contextlib.contextmanager
def _driver(address: str) -> Iterator[None]:
    """This process connected as the cluster's driver; Serve and the connection shut down after."""
    import ray
    from ray import serve

    ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": blank_store_env()})
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def add_worker(cluster: Any, **node_args: Any) -> Any:
    """One more worker node, by default with a logical CPU per GPU; returns its Node (for
    `cluster.remove_node`)."""
    defaults = {"num_cpus": node_args.get("num_gpus", 1), "object_store_memory": NODE_OBJECT_STORE_BYTES}
    return cluster.add_node(**{**defaults, **node_args})


def node_of(cluster: Any, node_id: str) -> Any:
    """The Node object of a worker, by Ray's node id (hex)."""
    for node in cluster.worker_nodes:
        if node.node_id == node_id:
            return node
    raise KeyError(f"no worker node {node_id}")


def created_bytes_by_node() -> dict[str, int]:
    """Bytes ever created in each alive node's object store, by node id. An object pulled from
    another node is created anew in the receiving store, so growth on a node that made nothing
    itself is what crossed the network to it."""
    import ray
    from ray._private.internal_api import node_stats

    created = {}
    for node in ray.nodes():
        if node["Alive"]:
            reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
            created[node["NodeID"]] = reply.store_stats.cumulative_created_bytes
    return created


# --- autoscaling -----------------------------------------------------------------------------
def _autoscaler_config(head: dict[str, float], worker_types: dict[str, Any], idle_timeout_minutes: float,
                       gcs_address: str) -> dict[str, Any]:
    """A cluster launcher config for Ray's fake multi-node provider (validated by the autoscaler
    against Ray's cluster schema, as any `ray up` config is)."""
    return {
        "cluster_name": "consistory-simulated",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        # Ray's fake multi-node provider, named as an external module: its built-in name
        # `fake_multinode` would load defaults from an example file the Ray wheel does not ship.
        "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs_address,
                     "disable_launch_config_check": True, "use_node_id_as_ip": True,
                     "disable_node_updaters": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class AutoscalingCluster:
    """A head started with `ray start --head --autoscaling-config`, in its own session."""

    def __init__(self, head: dict[str, float], worker_types: dict[str, Any], idle_timeout_minutes: float) -> None:
        self.port = free_port()
        self.address = f"{_host_address()}:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="cs-ray-", dir="/tmp")  # short: socket paths are capped
        self.config_path = Path(self.temp_dir) / "autoscaler.json"
        self.config_path.write_text(json.dumps(_autoscaler_config(head, worker_types, idle_timeout_minutes,
                                                                  self.address)))
        self.head = head
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        env = {
            **os.environ,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            # `ray start` turns on token authentication by default; the driver here is local.
            "RAY_AUTH_MODE": "disabled",
            **blank_store_env(),
        }
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            f"--port={self.port}", f"--temp-dir={self.temp_dir}",
            # Free ports rather than Ray's fixed defaults, which another Ray here may hold.
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={self.head.get('CPU', 1)}", "--num-gpus=0", "--include-dashboard=false",
            f"--object-store-memory={NODE_OBJECT_STORE_BYTES}",
            f"--autoscaling-config={self.config_path}",
        ]
        log = open(Path(self.temp_dir) / "ray-start.log", "wb")
        # A session of its own: every process it starts (raylets, workers, the autoscaler and the
        # nodes it launches) can be found and stopped, and nothing else is touched.
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 60
        while not _gcs_answers(self.address):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the simulated head did not start; see {log.name}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        session = self.process.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_members(session):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while _session_members(session) and time.monotonic() < deadline:
                time.sleep(0.2)
        self.process.wait(timeout=10)


def _host_address() -> str:
    """The address Ray gives this machine's nodes (what `ray start` and the fake provider use)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _session_members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == session:
                    members.append(int(entry))
    return members


def _gcs_answers(address: str) -> bool:
    import socket

    host, port = address.split(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


@contextlib.contextmanager
def autoscaling_cluster(head: dict[str, float], worker_types: dict[str, Any],
                        idle_timeout_minutes: float) -> Iterator[AutoscalingCluster]:
    """The autoscaling cluster with the driver connected; everything it started is stopped."""
    cluster = AutoscalingCluster(head, worker_types, idle_timeout_minutes)
    try:
        cluster.start()
        with _driver(cluster.address):
            yield cluster
    finally:
        cluster.stop()


def alive_worker_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)
