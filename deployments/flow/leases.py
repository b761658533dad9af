"""Leases in the artifact store: one holder at a time across every replica of the service.

A lease is an object at a key holding its owner and an expiry; the store's create-if-absent
decides who gets it. A holder that dies stops renewing it, and once it has expired the next
caller takes it over. Two callers taking over the same expired lease at once can both succeed,
so what a lease guards must be safe to do twice. A holder renews and releases only while the lease
is still its own (read, then written: this narrows the overlap to one store round trip, it does
not close it), and a job runner whose lease was taken over stops. The service holds three:

  subjects/<id>/rebuild.lease   one Generator rebuilds a lost cache; the others wait for it
  jobs/<id>/runner.lease        one Ingress replica runs a job, renewing it while it works
  service/retention.lease       one Ingress replica collects per interval; it is never
                                released, so it also marks when the collector last ran
"""

from __future__ import annotations

import json
import time

from ..artifact_store import ArtifactNotFound, ArtifactStore

RUNNER_LEASE_S = 30.0  # a job runner that stops renewing for this long is presumed dead
RETENTION_KEY = "service/retention.lease"


class Lease:
    def __init__(self, store: ArtifactStore, key: str, owner: str, ttl_s: float) -> None:
        self.store, self.key, self.owner, self.ttl_s = store, key, owner, ttl_s

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires_at": time.time() + self.ttl_s}).encode()

    def _read(self) -> dict | None:
        """What the lease holds: None when there is none, {} when it cannot be read."""
        try:
            held = json.loads(self.store.get(self.key))
        except ArtifactNotFound:
            return None
        except ValueError:
            return {}
        return held if isinstance(held, dict) else {}

    @staticmethod
    def _lapsed(held: dict) -> bool:
        try:
            return float(held.get("expires_at", 0)) < time.time()
        except (TypeError, ValueError):
            return True  # unreadable: taken over like an expired one

    def acquire(self) -> bool:
        """Whether this owner holds the lease now (it was free, or its holder's had expired)."""
        if self.store.create_exclusive(self.key, self._body(), "application/json"):
            return True
        held = self._read()
        if held is None or self._lapsed(held):  # released meanwhile, expired, or unreadable
            self.store.delete_prefix(self.key)
            return self.store.create_exclusive(self.key, self._body(), "application/json")
        return False

    def holder(self) -> str | None:
        """Who holds it now, or None (free, or unreadable)."""
        return (self._read() or {}).get("owner")

    def renew(self) -> bool:
        """Pushes the expiry `ttl_s` into the future while this owner still holds the lease;
        False, writing nothing, once another has taken it over (this holder stalled past its
        expiry) or it was released: the holder must then stop what the lease guards."""
        if self.holder() != self.owner:
            return False
        self.store.put(self.key, self._body(), "application/json")
        return True

    def release(self) -> None:
        """Gives the lease up if this owner still holds it (not another's that took it over)."""
        if self.holder() == self.owner:
            self.store.delete_prefix(self.key)

    def held(self) -> bool:
        """Whether the lease exists (held, or left by a holder that died: see `expired`)."""
        return self.store.exists(self.key)

    def expired(self) -> bool:
        """Whether its holder let it lapse (it died, or stalled): the next `acquire` takes it.
        False once released: there is nothing to take over."""
        held = self._read()
        return held is not None and self._lapsed(held)


def rebuild_lease_key(subject_id: str) -> str:
    return f"subjects/{subject_id}/rebuild.lease"


def runner_lease_key(job_id: str) -> str:
    return f"jobs/{job_id}/runner.lease"


def rebuild_lease(store: ArtifactStore, subject_id: str, owner: str, ttl_s: float) -> Lease:
    """Whoever holds it rebuilds the subject's cache (rebuilding twice gives the same cache)."""
    return Lease(store, rebuild_lease_key(subject_id), owner, ttl_s)


def runner_lease(store: ArtifactStore, job_id: str, owner: str) -> Lease:
    """Whoever holds it runs the job (a job run twice stores the same images again)."""
    return Lease(store, runner_lease_key(job_id), owner, RUNNER_LEASE_S)


def retention_lease(store: ArtifactStore, owner: str, interval_s: float) -> Lease:
    return Lease(store, RETENTION_KEY, owner, interval_s)
