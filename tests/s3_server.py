"""A real S3-protocol server on loopback for tests: moto's standalone server as a subprocess.

Reuse from any test module::

    from s3_server import aws_dummy_credentials, s3_bucket, s3_endpoint  # noqa: F401 (fixtures)

``s3_endpoint`` (session) is the server's URL, ``s3_bucket`` (session) a bucket created on it,
``aws_dummy_credentials`` (function) points boto3's default credential chain at dummy keys so
code under test builds its client exactly as in production. Outside pytest, use
``with moto_s3_server() as endpoint_url: ...``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

# moto accepts any credentials; these only keep boto3 from looking for real ones.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe the instance-metadata endpoint
}
# Variables that could route boto3 to real credentials or another endpoint.
_AWS_ENV_TO_CLEAR = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_until_answering(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    """True once the server answers HTTP; False if the process died first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with requests.Session() as session:
                session.trust_env = False  # loopback: never through an HTTP(S)_PROXY
                session.get(url, timeout=1)
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.05)
            continue
        # Something answered: make sure it is our process, not another holder of the port.
        time.sleep(0.05)
        return proc.poll() is None
    raise TimeoutError(f"moto server at {url} did not answer within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def moto_s3_server(host: str = "127.0.0.1", startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Start ``python -m moto.server`` on a free loopback port; yield its endpoint URL.

    The process is terminated on exit, whatever happened inside the block.
    """
    env = {k: v for k, v in os.environ.items() if k not in _AWS_ENV_TO_CLEAR}
    env.update(DUMMY_AWS_ENV)
    with tempfile.TemporaryDirectory(prefix="moto-s3-") as logdir:
        log_path = Path(logdir) / "moto.log"
        # Another process can take the port between _free_port and bind: retry on a new one.
        for _attempt in range(3):
            port = _free_port(host)
            endpoint = f"http://{host}:{port}"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            try:
                if _wait_until_answering(endpoint, proc, startup_timeout_s):
                    break
            except BaseException:
                _stop(proc)
                raise
        else:
            raise RuntimeError(
                f"moto server failed to start; last log:\n{log_path.read_text(errors='replace')}"
            )
        try:
            yield endpoint
        finally:
            _stop(proc)


def s3_client(endpoint_url: str):
    """A boto3 client for the test harness itself (bucket setup, raw listings)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=DUMMY_AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server running for the whole test session."""
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the session's server; tests share it, so use unique prefixes."""
    name = f"consistory-test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def aws_dummy_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy keys in the environment, and nothing that could reach real AWS credentials."""
    for name in _AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["local", "s3"])
def each_store(request: pytest.FixtureRequest, tmp_path: Path):
    """The artifact store, once as a local directory and once on the moto server (its own
    prefix per test, so tests sharing the bucket stay independent)."""
    from deployments.artifact_store import LocalArtifactStore, S3ArtifactStore

    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    request.getfixturevalue("aws_dummy_credentials")
    return S3ArtifactStore(request.getfixturevalue("s3_bucket"), prefix=f"t-{uuid.uuid4().hex[:8]}/",
                           endpoint_url=request.getfixturevalue("s3_endpoint"))
