"""Readiness from Serve's controller: ready while both model deployments have a running replica.

Asked of the controller, not through the models' request queues, so a busy service is still
ready; cached for a short time, so probes every second cost one controller call per interval.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from fastapi import HTTPException

from .responses import unavailable
from .schemas import ReadyOut

MODEL_DEPLOYMENTS = {"anchor_stage": "AnchorStage", "generator": "Generator"}


class Readiness:
    def __init__(self, cache_s: float) -> None:
        self.cache_s = cache_s
        self._answer: Optional[tuple[float, ReadyOut | HTTPException]] = None

    async def check(self, model_id: str, retry_after_s: float) -> ReadyOut:
        now = time.monotonic()
        if self._answer is None or now - self._answer[0] > self.cache_s:
            self._answer = (now, await asyncio.to_thread(self._ask, model_id, retry_after_s))
        answer = self._answer[1]
        if isinstance(answer, HTTPException):
            raise answer
        return answer

    @staticmethod
    def _ask(model_id: str, retry_after_s: float) -> ReadyOut | HTTPException:
        from ray import serve

        try:
            app = serve.status().applications[serve.get_replica_context().app_name]
        except Exception as error:  # the controller is away: not ready, whatever the reason
            return unavailable(f"not ready: Serve's controller did not answer ({type(error).__name__})", retry_after_s)
        replicas, missing = {}, []
        for name, deployment in MODEL_DEPLOYMENTS.items():
            overview = app.deployments.get(deployment)
            running = int(overview.replica_states.get("RUNNING", 0)) if overview else 0
            replicas[name] = {"running": running, "status": str(overview.status) if overview else "MISSING"}
            if running < 1:
                missing.append(deployment)
        if missing:
            return unavailable(f"not ready: no running replica of {', '.join(missing)} yet", retry_after_s)
        return ReadyOut(status="ready", model=model_id, replicas=replicas)
