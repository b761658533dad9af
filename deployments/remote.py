"""How the Ingress calls the model deployments: retries, HTTP errors, ordered fan-out.

Failures of a call map to answers a client can act on:
  full queue (Serve's BackPressureError)         503 + Retry-After
  replica or its node gone (retried twice)       503 + Retry-After
  replica process died during this call          503 + Retry-After, not retried (the request
                                                 may be what killed it: out of memory, say)
  the artifact store failed                      503 + Retry-After, generic detail
  bad input found by the library (InputError)    422 with the library's message
  unknown subject (deleted meanwhile)            404
  anything else raised in a replica              500 with the request id (details in the log)
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Iterable, Optional, TypeVar

from fastapi import HTTPException
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from consistory.errors import InputError

from .artifact_store import ArtifactStoreError
from .http_edge import current_request_id
from .responses import store_unavailable, unavailable
from .subjects import UnknownSubject

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

# A replica that died mid-call (crash, scale-down, node loss) is replaced by Serve within
# seconds; calls are idempotent (same subject id and seeds, same result), so retrying is safe.
_ATTEMPTS = 3
_BACKOFF_S = 1.0


def original_error(error: BaseException) -> BaseException:
    """The exception raised in the replica, without Ray's RayTaskError wrapper."""
    if isinstance(error, RayTaskError) and getattr(error, "cause", None) is not None:
        return error.cause
    return error


def _lost_for_another_reason(error: BaseException) -> bool:
    """Whether a replica was lost to something other than the call itself: its node died or was
    drained, it was stopped (scale-down, ray.kill), or it was not reachable. A worker process
    that died while running the call is not retried: the call may be what killed it."""
    if isinstance(error, (ReplicaUnavailableError, ActorUnavailableError)) or getattr(error, "preempted", False):
        return True
    message = str(error)
    return any(sign in message for sign in ("its node has died", "killed by `ray.kill`"))


async def call(make: Callable[[], Awaitable[T]], what: str, retry_after_s: float) -> T:
    """Await `make()` (a handle call), retrying on lost replicas and mapping errors to HTTP."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return await make()
        except BackPressureError as error:
            wait = error.retry_after_s if error.retry_after_s is not None else retry_after_s
            raise unavailable(f"the {what} is at capacity ({error.message}); retry later", wait) from None
        except DeploymentUnavailableError:
            raise unavailable(f"the {what} is not running; retry later", retry_after_s) from None
        except (RayActorError, ReplicaUnavailableError) as error:
            if not _lost_for_another_reason(error):
                logger.error("%s: a worker died while running the call [request %s]: %s", what, current_request_id(), error)
                raise unavailable(f"a {what} worker died while making this request; retry later", retry_after_s) from None
            if attempt == _ATTEMPTS:
                raise unavailable(f"the {what} lost its worker {attempt} times; retry later", retry_after_s) from None
            logger.warning("%s call failed on a lost replica (%s); retrying", what, type(error).__name__)
            await asyncio.sleep(_BACKOFF_S * attempt)
        except RayTaskError as error:
            raise _from_replica(original_error(error), what, retry_after_s) from None
    raise AssertionError("unreachable")


def _from_replica(cause: BaseException, what: str, retry_after_s: float) -> HTTPException:
    if isinstance(cause, UnknownSubject):
        return HTTPException(status_code=404, detail=str(cause))
    if isinstance(cause, InputError):  # the request was wrong; any other error is ours
        return HTTPException(status_code=422, detail=str(cause))
    if isinstance(cause, ArtifactStoreError):
        logger.error("%s: artifact store failed [request %s]: %s", what, current_request_id(), cause)
        return store_unavailable(retry_after_s)
    logger.error("%s failed [request %s]: %r", what, current_request_id(), cause)
    # Never the replica's message: it can carry paths and internals.
    return HTTPException(status_code=500, detail=f"the {what} failed; report request id {current_request_id()}")


async def gather_in_order(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Results in the given order; on the first failure the others are cancelled, so a failed
    request does not keep replicas busy with images nobody will receive."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class CacheRefs:
    """The anchor caches' handles this Ingress holds, newest last, at most `capacity`.

    Holding a handle keeps its chunks in Ray's object store; dropping old ones bounds that memory.
    A subject whose handle was dropped (or lost with its owner) is loaded from the artifact store.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._refs: OrderedDict[str, Any] = OrderedDict()

    def put(self, subject_id: str, refs: Any) -> None:
        if self.capacity <= 0:
            return
        self._refs[subject_id] = refs
        self._refs.move_to_end(subject_id)
        while len(self._refs) > self.capacity:
            self._refs.popitem(last=False)

    def get(self, subject_id: str) -> Optional[Any]:
        refs = self._refs.get(subject_id)
        if refs is not None:
            self._refs.move_to_end(subject_id)
        return refs

    def drop(self, subject_id: str) -> None:
        self._refs.pop(subject_id, None)
