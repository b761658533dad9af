"""The serve configs that start the service: valid for Ray Serve and for the app builder, and the
KubeRay manifest embeds the cluster config unchanged. No Ray is started here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app
from deployments.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "serve_config.yaml", ROOT / "cluster" / "serve_config_gpu.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid_and_builds(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    ServiceSettings.from_args(app["args"])
    build_app(app["args"])  # builds deployments only; no model is loaded


def test_laptop_config_fits_two_cores() -> None:
    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    settings = ServiceSettings.from_args(args)
    assert settings.model == "preset:tiny" and settings.store["kind"] == "local"
    cpus = (
        settings.ingress.num_cpus * settings.ingress.max_replicas
        + settings.anchor_stage.num_cpus * settings.anchor_stage.max_replicas
        + settings.generator.num_cpus * settings.generator.max_replicas
    )
    assert cpus <= 2
    assert settings.generator.max_queued_requests >= settings.limits.max_prompts
    # A replica holds a full batch of one subject's images, and compiling does not pay on a CPU.
    assert settings.generator.max_ongoing_requests >= settings.generator.max_batch_images > 1
    assert not settings.compile


def test_rayservice_embeds_the_cluster_serve_config() -> None:
    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "cluster" / "serve_config_gpu.yaml").read_text())
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any(
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in workers
    )
    gpu_settings = ServiceSettings.from_args(embedded["applications"][0]["args"])
    assert gpu_settings.anchor_stage.num_gpus == gpu_settings.generator.num_gpus == 1


def test_settings_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="stepz"):
        ServiceSettings.from_args({"defaults": {"stepz": 3}})
    with pytest.raises(ValidationError, match="above its limit"):
        ServiceSettings.from_args({"defaults": {"height": 2048}})
    with pytest.raises(ValidationError, match="multiple of 8"):
        ServiceSettings.from_args({"defaults": {"height": 100}, "limits": {"max_height": 128}})
    with pytest.raises(ValidationError, match="min_replicas"):
        ServiceSettings.from_args({"generator": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValidationError, match="cache_memory"):
        ServiceSettings.from_args({"cache_memory": "gpu"})


def _documents(name: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((ROOT / "cluster" / name).read_text())}


def test_rayservice_uses_what_access_yaml_creates_and_no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    access = _documents("access.yaml")
    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        spec = pod["spec"]
        assert ("ServiceAccount", spec["serviceAccountName"]) in access
        container = spec["containers"][0]
        for source in container.get("envFrom", []):
            assert ("ConfigMap", source["configMapRef"]["name"]) in access and "secretRef" not in source
        assert not any(e["name"].startswith("AWS_") for e in container.get("env", [])), "keys come from IRSA"
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = access[("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])]
                assert "ReadWriteMany" in claim["spec"]["accessModes"]  # every GPU pod mounts it
    head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    policy = access[("NetworkPolicy", "consistory-head")]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= head_labels.items()

    # The ConfigMap is the environment the store reads: it must build the bucket's store.
    from deployments.artifact_store import S3ArtifactStore, artifact_store_from_config

    for name, value in access[("ConfigMap", "consistory-store")]["data"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONSISTORY_STORE", "s3")
    store = artifact_store_from_config()
    assert isinstance(store, S3ArtifactStore) and "my-bucket" in store.describe()


def test_s3_lifecycle_rule_covers_the_store_prefix() -> None:
    import json

    rules = json.loads((ROOT / "cluster" / "s3-lifecycle.json").read_text())["Rules"]
    prefix = _documents("access.yaml")[("ConfigMap", "consistory-store")]["data"]["CONSISTORY_S3_PREFIX"]
    (rule,) = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert rule["Status"] == "Enabled" and prefix.startswith(rule["Filter"]["Prefix"])


def test_grafana_dashboard_queries_metrics_that_exist() -> None:
    """Every series the dashboard plots is one the service defines (deployments/metrics.py) or
    one of Ray Serve's own, so a renamed metric cannot silently blank a panel."""
    import json
    import re

    from deployments import metrics

    source = (ROOT / "deployments" / "metrics.py").read_text()
    ours = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(consistory_[a-z_]+)"', source))
    assert len(ours) == 8
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bray_[a-z_]+", target["expr"])}
    serve_own = {"ray_serve_deployment_queued_queries", "ray_serve_deployment_replica_healthy"}
    for name in queried - serve_own:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name.removeprefix("ray_"))
        assert base in ours, f"the dashboard queries {name}, which deployments/metrics.py does not define"
    assert {re.sub(r"_(total|bucket)$", "", n.removeprefix("ray_")) for n in queried - serve_own} == ours
    assert metrics.LATENCY_BOUNDARIES == sorted(metrics.LATENCY_BOUNDARIES)


KEY = {"name": "alice", "sha256": "0" * 64}


def test_configured_keys_turn_auth_on_and_keys_with_auth_off_are_refused() -> None:
    from deployments.edge.access import Access
    from deployments.errors import ServiceError

    access = Access(ServiceSettings.from_args({"auth": {"keys": [KEY]}}).auth)
    assert access.enabled
    with pytest.raises(ServiceError) as refused:
        access.caller(None)
    assert refused.value.status_code == 401
    with pytest.raises(ValidationError, match="auth.enabled is false but API keys are configured"):
        ServiceSettings.from_args({"auth": {"enabled": False, "keys": [KEY]}})
    assert not Access(ServiceSettings.from_args({}).auth).enabled  # no key: the laptop's open service


def test_the_per_request_subject_limit_has_its_own_name_and_the_old_one_still_works() -> None:
    with pytest.warns(FutureWarning, match="max_subjects_per_request"):
        old = ServiceSettings.from_args({"limits": {"max_subjects": 2}})
    assert old.limits.max_subjects_per_request == 2
    with pytest.raises(ValidationError, match="keep only max_subjects_per_request"):
        ServiceSettings.from_args({"limits": {"max_subjects": 2, "max_subjects_per_request": 2}})
    for path in CONFIGS + [ROOT / "cluster" / "rayservice.yaml"]:
        assert "max_subjects:" not in path.read_text(), f"{path.name} still uses limits.max_subjects"


def test_the_laptop_config_says_its_urls_follow_its_port() -> None:
    """public_base_url is not derived from http_options.port: the file says to change both."""
    text = (ROOT / "serve_config.yaml").read_text()
    config = yaml.safe_load(text)
    args = config["applications"][0]["args"]
    assert args["public_base_url"].endswith(f":{config['http_options']['port']}")
    port_line = next(line for line in text.splitlines() if line.strip().startswith("port:"))
    assert "public_base_url" in port_line


def test_compile_reaches_the_model_replicas_pipeline() -> None:
    """`compile` is the library's own switch on each model replica's pipeline; its warm-up then
    makes the graphs before the replica is ready."""
    from deployments.replicas.model_replica import load_pipeline

    assert load_pipeline(ServiceSettings.from_args({"compile": True})).compile
    assert not load_pipeline(ServiceSettings.from_args({})).compile
