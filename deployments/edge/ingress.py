"""Ingress: the v1 HTTP API (FastAPI), on a CPU with no model.

A request's way through the service reads one way:

    route (routes/)  ->  Planner: checked, decoded, a Plan  ->  StoryFlow: anchors, fan-out, store
                                                                (flow/, calling the model replicas)

The deployment itself only holds the replica's services and builds its app from them when Serve
asks (`__serve_build_asgi_app__`), so nothing is shared between replicas through module state.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..settings import ServiceSettings
from .app_factory import build_asgi_app
from .services import Services


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, anchor_stage: DeploymentHandle, generator: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.services = Services.build(anchor_stage, generator, ServiceSettings.model_validate(settings))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_asgi_app(self.services)
