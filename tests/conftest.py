"""Test-wide settings that must hold before any test module imports diffusers or transformers."""

import os

# huggingface_hub reads this once at import: with it set, any attempt to reach the Hub fails
# loudly instead of silently downloading, which proves the offline presets need no network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny preset wrapped by ConsiStoryPipeline, shared by the library tests."""
    from consistory import ConsiStoryPipeline

    pipe = ConsiStoryPipeline.from_preset("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def client():
    """An HTTP session to a service on loopback, as the service suites' clients use."""
    from service_helpers import http

    with http() as session:
        yield session
