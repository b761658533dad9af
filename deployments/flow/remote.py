"""How the story flow calls the model deployments: retries, the service's errors, ordered fan-out.

Failures of a call map to ServiceErrors, answers a client can act on:
  full queue (Serve's BackPressureError)         503 + Retry-After (a job's call waits instead)
  deployment not running (yet)                   503 + Retry-After (a job's call waits instead)
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
import random
from typing import Awaitable, Callable, Iterable, TypeVar

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from consistory.errors import InputError

from ..artifact_store import ArtifactStoreError
from ..errors import NotNow, ServiceError, not_found, store_unavailable, unavailable, unprocessable
from ..request_ids import current_request_id
from .subjects import UnknownSubject

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

# A replica that died mid-call (crash, scale-down, node loss) is replaced by Serve within
# seconds; calls are idempotent (same subject id and seeds, same result), so retrying is safe.
_ATTEMPTS = 3
_BACKOFF_S = 1.0
_MAX_WAIT_S = 30.0  # a waiting job asks again at least this often


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


async def call(make: Callable[[], Awaitable[T]], what: str, retry_after_s: float, patient: bool = False) -> T:
    """Await `make()` (a handle call), retrying on lost replicas and raising ServiceErrors.
    `patient` (a job's calls): a full queue or a deployment not running yet is waited out
    instead of answered with 503; an accepted job waits for capacity, it never fails for it."""
    lost = 0
    while True:
        try:
            return await make()
        except BackPressureError as error:
            wait = error.retry_after_s if error.retry_after_s is not None else retry_after_s
            if not patient:
                raise unavailable(f"the {what} is at capacity ({error.message}); retry later", wait) from None
            await _wait_for_capacity(what, wait)
        except DeploymentUnavailableError:
            if not patient:
                raise unavailable(f"the {what} is not running; retry later", retry_after_s) from None
            await _wait_for_capacity(what, retry_after_s)
        except (RayActorError, ReplicaUnavailableError) as error:
            if not _lost_for_another_reason(error):
                logger.error("%s: a worker died while running the call [request %s]: %s", what, current_request_id(), error)
                raise unavailable(f"a {what} worker died while making this request; retry later", retry_after_s) from None
            lost += 1
            if lost == _ATTEMPTS:
                raise unavailable(f"the {what} lost its worker {lost} times; retry later", retry_after_s) from None
            logger.warning("%s call failed on a lost replica (%s); retrying", what, type(error).__name__)
            await asyncio.sleep(_BACKOFF_S * lost)
        except RayTaskError as error:
            raise _from_replica(original_error(error), what, retry_after_s) from None


async def _wait_for_capacity(what: str, wait_s: float) -> None:
    # Jittered: jobs turned away together do not all come back in the same instant.
    delay = min(max(wait_s, _BACKOFF_S), _MAX_WAIT_S) * random.uniform(0.5, 1.5)
    logger.info("%s is at capacity; a job's call waits %.1f s", what, delay)
    await asyncio.sleep(delay)


def _from_replica(cause: BaseException, what: str, retry_after_s: float) -> ServiceError:
    if isinstance(cause, UnknownSubject):
        return not_found(str(cause))
    if isinstance(cause, InputError):  # the request was wrong; any other error is ours
        return unprocessable(str(cause))
    if isinstance(cause, NotNow):
        return unavailable(str(cause), retry_after_s)
    if isinstance(cause, ArtifactStoreError):
        logger.error("%s: artifact store failed [request %s]: %s", what, current_request_id(), cause)
        return store_unavailable(retry_after_s)
    logger.error("%s failed [request %s]: %r", what, current_request_id(), cause)
    # Never the replica's message: it can carry paths and internals.
    return ServiceError(500, f"the {what} failed; report request id {current_request_id()}")


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
