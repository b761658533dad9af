"""The application builder: `import_path: deployments.app:build_app` in serve_config.yaml.

`args` (a mapping) are the ServiceSettings; each deployment's Serve options (CPUs, GPUs,
replicas, autoscaling, queue bounds) come from them too, so one file says how the service runs.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.serve import Application

from .edge.ingress import Ingress
from .replicas.anchor_stage import AnchorStage
from .replicas.generator import Generator
from .settings import ServiceSettings


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    settings = ServiceSettings.from_args(args)
    shared = settings.model_dump(mode="json")  # plain data: what each replica is built from
    wait = settings.retry_after_s
    logs = {"logging_config": {"encoding": settings.log_encoding}}
    anchor_stage = AnchorStage.options(**settings.anchor_stage.deployment_options(wait), **logs).bind(shared)
    generator = Generator.options(**settings.generator.deployment_options(wait), **logs).bind(shared)
    return Ingress.options(**settings.ingress.deployment_options(wait), **logs).bind(anchor_stage, generator, shared)
