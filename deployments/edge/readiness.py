"""Readiness from Serve's controller: ready while both model deployments have a running replica.

Asked of the controller, not through the models' request queues, so a busy service is still
ready; cached for a short time, so probes every second cost one controller call per interval.
A probe never waits on the controller while an answer no older than `cache_s + timeout_s` is
at hand: that answer is given and a fresh one asked for in the background, one call at a time,
on a thread of its own (the default pool may be busy with the routes' work). Past that age a
probe waits up to `timeout_s` for the controller, and is answered 503 if it does not answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Optional

from ..errors import ServiceError, unavailable
from .schemas import ReadyOut

MODEL_DEPLOYMENTS = {"anchor_stage": "AnchorStage", "generator": "Generator"}


class Readiness:
    def __init__(self, cache_s: float, timeout_s: float = 5.0) -> None:
        self.cache_s, self.timeout_s = cache_s, timeout_s
        self._answer: Optional[tuple[float, ReadyOut | ServiceError]] = None
        self._asking: Optional[asyncio.Future] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="readiness")

    async def check(self, model_id: str, retry_after_s: float) -> ReadyOut:
        age = time.monotonic() - self._answer[0] if self._answer is not None else float("inf")
        if age > self.cache_s:
            if self._asking is None:
                self._asking = asyncio.ensure_future(self._refresh(model_id, retry_after_s))
            if age > self.cache_s + self.timeout_s:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        await asyncio.shield(self._asking)
                except TimeoutError:
                    raise unavailable(f"not ready: Serve's controller did not answer within {self.timeout_s:g} s",
                                      retry_after_s) from None
                except Exception as error:  # not even asked (the replica is stopping)
                    raise unavailable(f"not ready: Serve's controller could not be asked ({type(error).__name__})",
                                      retry_after_s) from None
        answer = self._answer[1]
        if isinstance(answer, ServiceError):
            raise answer
        return answer

    async def _refresh(self, model_id: str, retry_after_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(self._executor, self._ask, model_id, retry_after_s)
            self._answer = (time.monotonic(), answer)
        finally:
            self._asking = None

    @staticmethod
    def _ask(model_id: str, retry_after_s: float) -> ReadyOut | ServiceError:
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
