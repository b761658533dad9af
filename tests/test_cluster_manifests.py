"""The cluster manifests, checked with Ray's own schemas and against each other: what the serve
config asks of a node (GPUs, CPUs, replicas, object-store bytes, time) is what the node groups of
cluster/rayservice.yaml and cluster/cluster-launcher.yaml give. Nothing is started here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
# Dense FP16 tensor-core peak of NVIDIA's A10 (125 TFLOP/s); AWS's A10G in the launcher's g5
# nodes has less tensor throughput, so time at this rate is a lower bound on a request's time.
A10_PEAK_FLOPS = 125e12
# UNet forwards of a ConsiStory image per vanilla SDXL image at 50 steps (bench/overhead.py:
# query mixing's vanilla forward and pass 2 from step S // 10).
FORWARD_RATIO = 2.02
SUBJECT_MASK_FRACTION = 0.5  # a subject filling half of each anchor: a large cache


@dataclass(frozen=True)
class WorkerGroup:
    """What one GPU worker node gives, and how many there may be."""

    gpus: float
    cpus: float
    object_store_bytes: int
    shm_bytes: int
    memory_bytes: int | None
    min_nodes: int
    max_nodes: int


def quantity(text: str | int) -> float:
    """A Kubernetes quantity ("64Gi", "8", "500m") or a docker size ("24g") as a number."""
    units = {"": 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "g": 2**30}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text)).groups()
    return float(number) * units[unit]


def rayservice() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())


def launcher() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "cluster-launcher.yaml").read_text())


def serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def settings() -> ServiceSettings:
    return ServiceSettings.from_args(serve_config()["applications"][0]["args"])


def kuberay_workers() -> WorkerGroup:
    (group,) = rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    (shm,) = [v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm"]
    params = group["rayStartParams"]
    assert float(params["num-gpus"]) == float(limits["nvidia.com/gpu"])
    assert float(params["num-cpus"]) <= quantity(limits["cpu"])
    return WorkerGroup(float(limits["nvidia.com/gpu"]), float(params["num-cpus"]), int(params["object-store-memory"]),
                       int(quantity(shm)), int(quantity(limits["memory"])), group["minReplicas"], group["maxReplicas"])


def launcher_workers() -> WorkerGroup:
    config = launcher()
    node = config["available_node_types"]["gpu_worker"]
    start = " ".join(config["worker_start_ray_commands"])
    (store,) = re.findall(r"--object-store-memory=(\d+)", start)
    (shm,) = [o.split("=", 1)[1] for o in config["docker"]["run_options"] if o.startswith("--shm-size=")]
    return WorkerGroup(node["resources"]["GPU"], node["resources"]["CPU"], int(store), int(quantity(shm)), None,
                       node["min_workers"], node["max_workers"])


GROUPS = {"rayservice": kuberay_workers, "cluster-launcher": launcher_workers}


@pytest.fixture(scope="module")
def full_unet():
    import torch
    from diffusers import UNet2DConditionModel

    from consistory.presets.sdxl import unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config("full"))


def test_serve_config_v2_is_valid_for_ray_serve() -> None:
    ServeDeploySchema.model_validate(serve_config())
    settings()  # and for the app builder: every field known, every value in range


def test_cluster_launcher_is_valid_for_the_ray_autoscaler() -> None:
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher()
    validate_config(prepare_config(config))  # what `ray up` checks, against ray-schema.json
    config["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo is caught
    with pytest.raises(ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("manifest", GROUPS)
def test_every_model_replica_fits_a_worker_node_and_no_ingress_does(manifest: str) -> None:
    """A GPU node's logical CPUs are what its model replicas ask for: an Ingress never lands on
    one, so losing a GPU node never cuts the requests in flight through an Ingress."""
    workers, s = GROUPS[manifest](), settings()
    for deployment in (s.anchor_stage, s.generator):
        assert 0 < deployment.num_gpus <= workers.gpus and deployment.num_cpus <= workers.cpus
        replicas_per_node = math.floor(workers.gpus / deployment.num_gpus)
        assert workers.cpus - replicas_per_node * deployment.num_cpus < s.ingress.num_cpus


def test_ingress_fits_the_head_node() -> None:
    s = settings()
    head = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert s.ingress.num_gpus == 0 and head["rayStartParams"]["num-gpus"] == "0"
    assert s.ingress.num_cpus <= quantity(head["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert s.ingress.num_cpus <= launcher()["available_node_types"]["head"]["resources"]["CPU"]


@pytest.mark.parametrize("manifest", GROUPS)
def test_autoscaling_bounds_match_the_node_group_bounds(manifest: str) -> None:
    """At rest the minimum replicas are placed without waiting for a node; at the top every
    replica Serve may add has a GPU, and no node the group may add would stay empty."""
    workers, s = GROUPS[manifest](), settings()
    models = (s.anchor_stage, s.generator)
    assert sum(d.min_replicas * d.num_gpus for d in models) <= workers.min_nodes * workers.gpus
    assert sum(d.max_replicas * d.num_gpus for d in models) == workers.max_nodes * workers.gpus


@pytest.mark.parametrize("manifest", GROUPS)
def test_object_store_holds_the_caches_a_node_keeps(manifest: str, full_unet) -> None:
    """A worker's object store holds the caches its replicas keep (each LRU's bytes: they hold
    the chunks they read) and, on an AnchorStage's node, the chunks every Ingress replica keeps
    of recent subjects; and it fits in the node's shared memory and leaves room for the model."""
    from consistory import ConsiStoryConfig
    from consistory.cache.size import MaskStats, count_cache_bytes

    workers, s = GROUPS[manifest](), settings()
    d = s.defaults
    config = ConsiStoryConfig(height=d.height, width=d.width, num_inference_steps=d.steps,
                              n_anchors=d.n_anchors, mask_dropout=d.mask_dropout)
    subject = count_cache_bytes(full_unet, config, MaskStats.assumed(SUBJECT_MASK_FRACTION, config),
                                s.cache_codec)["total"]
    replicas_per_node = math.floor(workers.gpus / s.generator.num_gpus)
    needed = replicas_per_node * s.cache_lru_bytes + s.ingress.max_replicas * s.ingress_cache_refs * subject
    assert needed <= workers.object_store_bytes <= workers.shm_bytes, (needed, workers)
    if workers.memory_bytes is not None:
        assert workers.object_store_bytes <= 0.5 * workers.memory_bytes


def test_timeouts_cover_the_largest_request(full_unet) -> None:
    """The service's own deadline ends a request before the proxy's timeout cuts it, and the
    largest story the limits allow at the default size can finish within it on one GPU: its
    UNet work at the GPU's peak rate (a lower bound on the real time) is under the deadline."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config, s = serve_config(), settings()
    proxy_timeout = config["http_options"]["request_timeout_s"]
    assert s.request_deadline_s < proxy_timeout

    height, width = s.defaults.height // 8, s.defaults.width // 8
    meta = {"device": "meta", "dtype": torch.float16}
    with FlopCounterMode(display=False) as counter:
        full_unet.half()(torch.empty(1, 4, height, width, **meta), torch.tensor([999], device="meta"),
                         torch.empty(1, 77, 2048, **meta),
                         added_cond_kwargs={"text_embeds": torch.empty(1, 1280, **meta),
                                            "time_ids": torch.empty(1, 6, **meta)})
    per_forward = counter.get_total_flops()
    assert 5e12 < per_forward < 9e12  # SDXL's UNet at 1024 px: ~6.8 TFLOP per image and step
    largest = s.limits.max_prompts * s.defaults.steps * 2 * FORWARD_RATIO * per_forward  # 2: CFG
    assert largest / A10_PEAK_FLOPS < s.request_deadline_s


def test_the_two_manifests_describe_the_same_cluster() -> None:
    """KubeRay and the cluster launcher are two ways to run one design: same Ray, same worker
    node shape and bounds, same object store."""
    kuberay, vms = kuberay_workers(), launcher_workers()
    assert (kuberay.gpus, kuberay.min_nodes, kuberay.max_nodes) == (vms.gpus, vms.min_nodes, vms.max_nodes)
    assert kuberay.object_store_bytes == vms.object_store_bytes
    assert kuberay.shm_bytes == vms.shm_bytes
    ray_version = rayservice()["spec"]["rayClusterConfig"]["rayVersion"]
    assert launcher()["docker"]["image"].startswith(f"rayproject/ray:{ray_version}-")
    assert f"rayproject/ray:{ray_version}-" in (ROOT / "cluster" / "README.md").read_text()


def test_generators_scale_on_batches_and_hold_one_while_the_next_gathers() -> None:
    """A Generator makes up to max_batch_images images of a subject in one UNet batch, so its
    useful concurrency is a batch, not one request: autoscaling adds a replica only once the
    replicas hold a batch each (a target of 1 would scale out at a single request and leave every
    replica making batches of one), and Serve lets a replica hold a batch being made and the
    next one gathering."""
    generator = settings().generator
    assert generator.max_batch_images > 1 and generator.batch_wait_ms > 0
    assert generator.target_ongoing_requests >= generator.max_batch_images
    assert generator.max_ongoing_requests >= 2 * generator.max_batch_images
    assert generator.batch_size == generator.max_batch_images
    assert settings().compile and settings().warm_up  # compiled before a replica takes requests


def test_the_ingress_takes_far_more_requests_than_the_edge_admits() -> None:
    # A request the edge refuses still holds one of the replica's Serve slots while it is
    # answered. With slots to spare, a storm of them never fills the replica and the probes never
    # wait in the proxy's queue (tests/test_service_soak.py: probes' p99 0.11 s with 512 slots for
    # 60 admitted, 0.3-2 s with 64).
    s = settings()
    assert s.ingress.max_ongoing_requests >= 4 * s.edge.admitted(s.ingress)
