"""API keys for the public API: stored as SHA-256 hashes with a name, revocable by config,
each with its own token-bucket rate limit.

Keys file (YAML or JSON)::

    keys:
      - name: webshop
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        rate_per_second: 200     # sustained calls per second (0 = unlimited)
        burst: 400               # bucket size
      - name: old-app
        sha256: ...
        revoked: true

``mercato keys hash`` prints the hash of a new key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import ResourceExhausted, Unauthenticated

API_KEY_HEADER = "x-api-key"


def hash_key(key: str) -> str:
    """The SHA-256 hex digest stored for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class ApiKey:
    """One configured key."""

    name: str
    sha256: str
    rate_per_second: float = 0.0
    burst: float = 0.0
    revoked: bool = False
    tokens: float = 0.0
    updated: float = 0.0

    def take(self) -> bool:
        """Take one token; False when the rate limit is exceeded."""
        if self.rate_per_second <= 0:
            return True
        now = time.monotonic()
        capacity = self.burst or self.rate_per_second
        self.tokens = min(capacity, self.tokens + (now - self.updated) * self.rate_per_second)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ApiKeyAuthenticator:
    """Checks ``x-api-key`` against hashed keys and applies per-key rate limits."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.by_hash = {k.sha256.lower(): k for k in keys}
        now = time.monotonic()
        for k in keys:
            k.tokens = k.burst or k.rate_per_second
            k.updated = now

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeyAuthenticator:
        text = Path(path).read_text()
        data: Any = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        entries = (data or {}).get("keys", [])
        keys = []
        for e in entries:
            digest = str(e.get("sha256", "")).lower()
            if len(digest) != 64 or not e.get("name"):
                raise ValueError(f"API key entries need a name and a sha256 hex digest: {e!r}")
            keys.append(
                ApiKey(
                    name=str(e["name"]),
                    sha256=digest,
                    rate_per_second=float(e.get("rate_per_second", 0)),
                    burst=float(e.get("burst", 0)),
                    revoked=bool(e.get("revoked", False)),
                )
            )
        return cls(keys)

    def __call__(self, method: str, metadata: Sequence[tuple[str, Any]]) -> str | None:
        presented = ""
        for key, value in metadata or ():
            if key == API_KEY_HEADER:
                presented = value if isinstance(value, str) else value.decode()
        if not presented:
            raise Unauthenticated(f"missing API key: send it in the '{API_KEY_HEADER}' metadata")
        digest = hash_key(presented)
        entry = None
        for stored, candidate in self.by_hash.items():
            if hmac.compare_digest(stored, digest):
                entry = candidate
        if entry is None or entry.revoked:
            raise Unauthenticated("invalid or revoked API key")
        if not entry.take():
            raise ResourceExhausted(
                f"rate limit of key '{entry.name}' exceeded ({entry.rate_per_second:g}/s)"
            )
        return entry.name
