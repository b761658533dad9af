"""What one Ingress replica's routes use, made once per replica from its settings and kept on its
FastAPI app's state; routes reach it through the `services` dependency."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request

from ..artifact_store import ArtifactStore, artifact_store_from_config
from ..flow.cache_refs import CacheRefs
from ..flow.image_links import ImageLinks
from ..flow.job_board import JobBoard
from ..flow.retention import collect_forever
from ..flow.story_flow import StoryFlow
from ..metrics import log_metrics_address
from ..settings import ServiceSettings
from .access import Access
from .event_hub import EventHub
from .planning import Planner
from .readiness import Readiness


@dataclass
class Services:
    settings: ServiceSettings
    store: ArtifactStore
    planner: Planner
    flow: StoryFlow
    jobs: JobBoard
    links: ImageLinks
    access: Access
    readiness: Readiness
    events: EventHub
    replica: str  # host:pid, the owner named in the leases this replica takes

    @classmethod
    def build(cls, anchor_stage: Any, generator: Any, settings: ServiceSettings) -> "Services":
        """From the model deployments' handles and the settings; starts nothing."""
        store = artifact_store_from_config(settings.store)
        replica = f"{socket.gethostname()}:{os.getpid()}"
        links = ImageLinks(store, settings)
        flow = StoryFlow(anchor_stage, generator, store, CacheRefs(settings.ingress_cache_refs), settings.retry_after_s)
        return cls(settings=settings, store=store, planner=Planner(settings, store), flow=flow,
                   jobs=JobBoard(flow, links, replica, settings.jobs), links=links, access=Access(settings.auth),
                   readiness=Readiness(settings.ready_cache_s, settings.ready_timeout_s),
                   events=EventHub(store, settings.edge.event_streams(settings.ingress),
                                   settings.edge.event_streams_per_key(settings.ingress)),
                   replica=replica)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The replica's background work while its app runs: taking over jobs whose runner
        died, and the retention collector (on a thread: it lists the whole store)."""
        stop = threading.Event()
        collector = threading.Thread(target=collect_forever, name="retention", daemon=True,
                                     args=(self.store, self.settings.retention, self.replica, stop))
        collector.start()
        sweeper = asyncio.ensure_future(self.jobs.sweep_forever())
        asyncio.ensure_future(asyncio.to_thread(log_metrics_address))
        try:
            yield
        finally:
            stop.set()
            sweeper.cancel()
            self.events.close()


def services(request: Request) -> Services:
    """FastAPI dependency: the services of the replica that got the request."""
    return request.app.state.services
