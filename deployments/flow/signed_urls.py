"""Signed, expiring URLs for images in the local artifact store (S3 presigns its own).

A URL is `<base>/v1/artifacts/<key>?expires=<unix time>&signature=<hex>`, the signature an
HMAC-SHA256 of the key and the expiry under the service's signing key, so nobody can forge one
for another key or stretch its lifetime. `<base>` is the configured public base URL, never the
request's Host header (which a client chooses); without one the URL is a path on this service.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Optional
from urllib.parse import quote

from ..numbers import ascii_integer

# Unix times have 10 digits until the year 2286; a longer `expires` is not one this service wrote.
EXPIRES_DIGITS = 12
_SIGNATURE = re.compile(r"[0-9a-f]{64}")  # what `signature` writes; compare_digest takes only ASCII text


def signature(secret: bytes, key: str, expires: int) -> str:
    return hmac.new(secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(secret: bytes, base: Optional[str], prefix: str, key: str, expires_s: int, now: Optional[float] = None) -> str:
    expires = int((time.time() if now is None else now) + expires_s)
    path = f"{prefix.rstrip('/')}/{quote(key)}?expires={expires}&signature={signature(secret, key, expires)}"
    return (base.rstrip("/") if base else "") + path


def check_signature(secret: bytes, key: str, expires: Optional[str], given: Optional[str],
                    now: Optional[float] = None) -> Optional[str]:
    """None if the URL is valid now, else why not (for the 403's detail)."""
    when = ascii_integer(expires, EXPIRES_DIGITS)
    if when is None or not given or not _SIGNATURE.fullmatch(given):
        return "the URL has no valid signature; use the url the service answered with"
    if when < (time.time() if now is None else now):
        return "the URL has expired; ask for the image again"
    if not hmac.compare_digest(signature(secret, key, when), given):
        return "the URL's signature does not match; use the url the service answered with"
    return None
