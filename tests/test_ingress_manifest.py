"""cluster/ingress-nginx.yaml against the service it fronts: the load balancer takes every body the
service takes and refuses larger ones, stops headers the service would refuse before Serve's
proxy reads them, waits as long as the service may take, streams events unbuffered, and points
at the RayService's serve Service. Plain YAML: nothing is started here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from deployments.edge.event_hub import KEEP_ALIVE_S
from deployments.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
ANNOTATION = "nginx.ingress.kubernetes.io/"
# What ingress-nginx adds to the client's headers on the way up: X-Request-ID, X-Real-IP,
# X-Forwarded-For/-Host/-Port/-Proto/-Scheme, X-Scheme (a client's own X-Forwarded-For line is
# also copied as X-Original-Forwarded-For: counted as one more buffer below).
NGINX_OWN_HEADER_BYTES = 1024


def nginx_size(text: str) -> int:
    """An nginx size ("21m", "4k", "512") in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", text.strip()).groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]


def manifests() -> dict[tuple[str, str], dict]:
    docs = yaml.safe_load_all((ROOT / "cluster" / "ingress-nginx.yaml").read_text())
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}


def rayservice() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())


def serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def settings() -> ServiceSettings:
    return ServiceSettings.from_args(serve_config()["applications"][0]["args"])


@pytest.fixture(scope="module")
def ingress() -> dict:
    return manifests()[("Ingress", "consistory")]


@pytest.fixture(scope="module")
def controller() -> dict[str, str]:
    """The controller's ConfigMap data (global nginx settings)."""
    return manifests()[("ConfigMap", "ingress-nginx-controller")]["data"]


def annotation(ingress: dict, name: str) -> str:
    return ingress["metadata"]["annotations"][ANNOTATION + name]


def test_every_body_the_service_takes_passes_and_no_larger_one(ingress, settings) -> None:
    body_size = nginx_size(annotation(ingress, "proxy-body-size"))
    assert settings.body_limit <= body_size < settings.body_limit + 2**20, (settings.body_limit, body_size)
    # nginx reads the body whole before it goes upstream: a slow client holds no Serve slot.
    assert annotation(ingress, "proxy-request-buffering") == "on"


def test_headers_larger_than_the_edge_takes_stop_at_the_load_balancer(controller, settings) -> None:
    """nginx reads a request's head into client-header-buffer-size, then into at most `number`
    buffers of `size` (each line within one); the most it can send up is all of those, a copied
    X-Forwarded-For line and its own headers: under edge.max_header_bytes, so a header the
    service would answer 431 never reaches Serve's proxy (400 from nginx instead)."""
    first = nginx_size(controller["client-header-buffer-size"])
    number, size = controller["large-client-header-buffers"].split()
    most_forwarded = first + (int(number) + 1) * nginx_size(size) + NGINX_OWN_HEADER_BYTES
    assert most_forwarded <= settings.edge.max_header_bytes, (most_forwarded, settings.edge.max_header_bytes)
    assert nginx_size(size) >= 2**10  # an Authorization line and a signed image URL fit


def test_slow_clients_are_cut_at_the_load_balancer_within_the_edges_allowance(controller, settings) -> None:
    edge = settings.edge
    assert int(controller["client-header-timeout"]) <= edge.body_allowance_s
    assert int(controller["client-body-timeout"]) <= edge.body_allowance_s
    # The largest body at the slowest rate the edge accepts is read well within the deadline.
    assert edge.body_allowance_s + settings.body_limit / edge.min_body_bytes_per_s < settings.request_deadline_s


def test_the_load_balancer_waits_longer_than_the_service_may_take(ingress, settings) -> None:
    """Between two reads from Serve nginx waits past the service's deadline and the proxy's
    timeout, so the service's own answer (503 + Retry-After) reaches the client, and past an
    event stream's keep-alive interval."""
    read_timeout = int(annotation(ingress, "proxy-read-timeout"))
    proxy_timeout = serve_config()["http_options"]["request_timeout_s"]
    assert settings.request_deadline_s < proxy_timeout < read_timeout
    assert read_timeout > KEEP_ALIVE_S


def test_event_streams_are_not_buffered(ingress) -> None:
    assert annotation(ingress, "proxy-buffering") == "off"


def test_one_client_ip_cannot_take_a_replicas_streams(ingress, controller, settings) -> None:
    edge, replica = settings.edge, settings.ingress
    connections = int(annotation(ingress, "limit-connections"))
    assert edge.event_streams_per_key(replica) <= connections < edge.event_streams(replica)
    assert controller["limit-conn-status-code"] == "429"


def test_the_ingress_points_at_the_rayservices_serve_service(ingress) -> None:
    service = rayservice()
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    assert backend["name"] == f"{service['metadata']['name']}-serve-svc"  # KubeRay's name for it
    port = serve_config()["http_options"]["port"]
    assert backend["port"]["number"] == port
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": port, "name": "serve"} in head["ports"]


def test_the_proxys_timeout_headers_are_stripped(controller) -> None:
    namespace, name = controller["proxy-set-headers"].split("/")
    stripped = manifests()[("ConfigMap", name)]
    assert stripped["metadata"]["namespace"] == namespace
    headers = {k.lower(): v for k, v in stripped["data"].items()}
    assert headers == {"x-request-timeout-seconds": "", "x-request-disconnect-disabled": ""}


def test_the_edges_pointer_to_the_runbook_names_a_section_that_exists() -> None:
    edge = (ROOT / "deployments" / "edge" / "http_edge.py").read_text()
    (section,) = re.findall(r'"([^"]+)"\s+in\s+cluster/README\.md', edge)
    assert f"\n## {section}\n" in (ROOT / "cluster" / "README.md").read_text()
