"""How the story flow calls replicas (deployments/flow/remote.py), against real Ray actors: a
call whose worker process dies while running it is not retried (the call may be what killed it),
while a worker stopped from outside is retried on a fresh one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from deployments.errors import ServiceError  # noqa: E402
from deployments.flow.remote import call  # noqa: E402
from deployments.local import init_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote(num_cpus=0.1, max_restarts=0)  # as Serve starts replicas: its controller replaces them
class Worker:
    def __init__(self, log: str) -> None:
        self.log = Path(log)

    def run(self, how: str) -> str:
        with self.log.open("a") as f:
            f.write(how + "\n")
        if how == "dies":
            os._exit(1)  # what an out-of-memory kill looks like from the caller
        if how == "slow":
            import time

            time.sleep(30)
        return "done"


def _attempts(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_call_that_kills_its_worker_is_not_retried(local_ray, tmp_path: Path) -> None:
    log = tmp_path / "calls"
    worker = Worker.remote(str(log))
    with pytest.raises(ServiceError) as raised:
        asyncio.run(call(lambda: worker.run.remote("dies"), "Generator", retry_after_s=7))
    assert raised.value.status_code == 503 and raised.value.headers["Retry-After"] == "7"
    assert "died while making this request" in raised.value.detail
    assert _attempts(log) == 1


def test_a_worker_stopped_from_outside_is_retried(local_ray, tmp_path: Path) -> None:
    log = tmp_path / "calls"
    worker = Worker.remote(str(log))
    assert ray.get(worker.run.remote("warm")) == "done"

    async def stopped_then_fine():
        first = [True]

        def make():
            if first[0]:
                first[0] = False
                ref = worker.run.remote("slow")
                # Stopped while the call runs, as a scale-down or a drained node would.
                asyncio.get_running_loop().call_later(1.0, lambda: ray.kill(worker))
                return ref
            return Worker.remote(str(log)).run.remote("fine")  # Serve routes the retry to a live replica

        return await call(make, "Generator", retry_after_s=7)

    assert asyncio.run(stopped_then_fine()) == "done"
    assert log.read_text().splitlines()[-2:] == ["slow", "fine"]
