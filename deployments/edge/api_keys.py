"""API keys: who is calling, and what they may do.

Keys are bearer tokens (`Authorization: Bearer <token>`). The service is configured with their
SHA-256 hashes only, so a leaked config or store never reveals a usable key; a presented token is
hashed and compared with every configured hash in constant time. Each key has a name (the owner
recorded on what it makes), an optional admin flag (sees and deletes everything), and optional
quotas (`max_subjects`, `requests_per_minute`).

Make a key with ``python -m deployments.edge.api_keys NAME [--admin]``: it prints the token (give it to
the client, once) and the entry for the config (the hash).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ..settings import ApiKey, AuthSettings

KEYS_FILE_ENV = "CONSISTORY_API_KEYS_FILE"
TOKEN_PREFIX = "cs_"


@dataclass(frozen=True)
class Caller:
    """Who a request comes from. With auth off every caller is `OPEN`: it sees everything."""

    name: Optional[str]
    admin: bool
    key: Optional[ApiKey] = None

    def may_see(self, owner: Optional[str]) -> bool:
        return self.admin or self.name == owner

    @property
    def max_subjects(self) -> Optional[int]:
        return self.key.max_subjects if self.key is not None else None


OPEN = Caller(name=None, admin=True)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = list(keys)

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> "KeyRing":
        keys = list(auth.keys)
        path = os.environ.get(KEYS_FILE_ENV) or auth.keys_file
        if path:
            keys += load_keys_file(Path(path))
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"API key names must be unique across the config and {path}; got {names}")
        if auth.enabled and not keys:
            raise ValueError("auth is enabled but no API keys are configured; add auth.keys or auth.keys_file "
                             "(make one with: python -m deployments.edge.api_keys NAME)")
        return cls(keys)

    def identify(self, token: str) -> Optional[ApiKey]:
        """The key whose hash matches, comparing with every key so timing says nothing."""
        digest = hash_token(token)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found


def load_keys_file(path: Path) -> list[ApiKey]:
    try:
        entries = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read the API keys file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"the API keys file {path} is not YAML or JSON: {error}") from None
    if isinstance(entries, dict) and "keys" in entries:
        entries = entries["keys"]
    if not isinstance(entries, list):
        raise ValueError(f"the API keys file {path} must hold a list of keys (name, sha256, ...)")
    return [ApiKey.model_validate(entry) for entry in entries]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.edge.api_keys",
                                     description="Make an API key: prints the token and its config entry.")
    parser.add_argument("name", help="the key's name: the owner recorded on what it makes")
    parser.add_argument("--admin", action="store_true", help="may list and delete everything")
    parser.add_argument("--max-subjects", type=int, default=None)
    parser.add_argument("--requests-per-minute", type=float, default=None)
    args = parser.parse_args(argv)
    token = new_token()
    entry = ApiKey(name=args.name, sha256=hash_token(token), admin=args.admin, max_subjects=args.max_subjects,
                   requests_per_minute=args.requests_per_minute)
    print(f"token (give it to the client; it is not stored anywhere): {token}")
    print("config entry (auth.keys, or a line of the keys file):")
    print(json.dumps(entry.model_dump(exclude_none=True)))


if __name__ == "__main__":
    main()
