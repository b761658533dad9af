"""Whether a hub model can be loaded, answered in seconds before anything tries to load it.

Without this, a machine with no route to the Hugging Face Hub retries every file with backoff for
minutes and then fails somewhere unrelated (an empty tokenizer, say). One quick request tells
"online" from "use the local cache" from "cannot be had", and the last gets one line saying what
to do instead.
"""

from __future__ import annotations

from .errors import UsageError

PROBE_TIMEOUT_S = 5.0


def _hint(option: str) -> str:
    return (f"use {option} tiny for an offline run, a local directory holding the weights, "
            "or HF_HUB_OFFLINE=1 with the model in the local Hugging Face cache")


class ModelUnavailable(Exception):
    """A hub model that cannot be loaded from here; the message names it and says what to do."""


def is_cached(model_id: str, filename: str = "model_index.json") -> bool:
    """Whether the local Hugging Face cache holds `filename` of `model_id` (a hub id)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, filename), str)
    except ValueError:  # not a valid repo id
        raise UsageError(f"{model_id!r} is neither a local directory nor a hub id like org/name") from None


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One request to the hub's endpoint, no retries: any HTTP answer means it is reachable."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:  # DNS, refused, timeout, TLS, proxy: all mean "not reachable from here"
        return False
    return True


def cache_only(model_id: str, filename: str = "model_index.json", option: str = "--model") -> bool:
    """For a hub id: False to load it from the hub, True to load it from the local cache only.

    Raises ModelUnavailable when neither can work, naming `option` (the command-line option
    that chose the model) in its advice. `filename` is a file every copy of the model has.
    """
    from huggingface_hub import constants

    cached = is_cached(model_id, filename)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise ModelUnavailable(f"model {model_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                               f"and HF_HUB_OFFLINE is set; {_hint(option)}")
    if hub_reachable():
        return False
    if cached:
        return True
    raise ModelUnavailable(f"cannot load model {model_id!r}: the Hugging Face Hub ({constants.ENDPOINT}) could not "
                           f"be reached and the model is not in the local cache; {_hint(option)}")
