"""API keys for the public API: stored as SHA-256 hashes with a name, revocable by config,
each with its own token-bucket rate limit.

Keys file, in either of two formats (``from_file`` tells them apart). One line per key::

    # name  hash (64 hex digits)  options (optional)
    webshop sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 rate=200
    old-app sha256:...  revoked

or YAML/JSON::

    keys:
      - name: webshop
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        rate_per_second: 200     # sustained calls per second (0 = unlimited)
        burst: 400               # bucket size
      - name: old-app
        sha256: ...
        revoked: true

``mercato keys hash`` prints the hash of a new key. The file is re-read when it changes
(checked at most every ``reload_interval`` seconds, by modification time, size and
inode, which also catches a Kubernetes Secret update swapping the mounted file); a file
that no longer parses is logged and the keys in force stay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import ResourceExhausted, Unauthenticated

API_KEY_HEADER = "x-api-key"
RELOAD_INTERVAL_S = 2.0

log = logging.getLogger("mercato.gateway.auth")


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


def _line_entry(line: str, lineno: int) -> dict[str, Any]:
    """One ``name sha256:hex [rate=N] [burst=N] [revoked]`` line as a YAML-style entry."""
    tokens = line.split()
    if len(tokens) < 2 or not tokens[1].startswith("sha256:"):
        raise ValueError(f"line {lineno}: expected 'NAME sha256:HEX [rate=N] [burst=N] [revoked]'")
    entry: dict[str, Any] = {"name": tokens[0], "sha256": tokens[1][len("sha256:") :]}
    for opt in tokens[2:]:
        key, _, value = opt.partition("=")
        if key == "revoked" and not value:
            entry["revoked"] = True
        elif key in ("rate", "burst") and value:
            entry["rate_per_second" if key == "rate" else "burst"] = float(value)
        else:
            raise ValueError(f"line {lineno}: unknown option {opt!r}")
    return entry


def parse_keys(text: str, json_file: bool = False) -> list[ApiKey]:
    """Keys from a keys file's text: JSON, YAML ``keys: [...]`` or one line per key."""
    entries: list[dict[str, Any]]
    if json_file:
        entries = (json.loads(text) or {}).get("keys", [])
    else:
        data: Any = None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and "keys" in data:
            entries = data["keys"] or []
        else:
            entries = [
                _line_entry(line, n)
                for n, raw in enumerate(text.splitlines(), 1)
                if (line := raw.split("#", 1)[0].strip())
            ]
    keys = []
    for e in entries:
        digest = str(e.get("sha256", "")).lower()
        if len(digest) != 64 or not e.get("name"):
            raise ValueError(f"API key entries need a name and a sha256 hex digest: {e!r}")
        int(digest, 16)  # hex only
        keys.append(
            ApiKey(
                name=str(e["name"]),
                sha256=digest,
                rate_per_second=float(e.get("rate_per_second", 0)),
                burst=float(e.get("burst", 0)),
                revoked=bool(e.get("revoked", False)),
            )
        )
    return keys


def _file_stamp(path: Path) -> tuple[float, int, int]:
    st = os.stat(path)
    return (st.st_mtime, st.st_size, st.st_ino)


class ApiKeyAuthenticator:
    """Checks ``x-api-key`` against hashed keys and applies per-key rate limits."""

    def __init__(
        self,
        keys: Sequence[ApiKey],
        path: str | Path | None = None,
        reload_interval: float = RELOAD_INTERVAL_S,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.reload_interval = reload_interval
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = _file_stamp(self.path) if self.path is not None else None
        self.reloads = 0
        self._set_keys(keys)

    def _set_keys(self, keys: Sequence[ApiKey]) -> None:
        old = getattr(self, "by_hash", {})
        now = time.monotonic()
        for k in keys:
            prev = old.get(k.sha256.lower())
            if prev is not None and (prev.rate_per_second, prev.burst) == (
                k.rate_per_second,
                k.burst,
            ):
                k.tokens, k.updated = prev.tokens, prev.updated  # a reload keeps the bucket
            else:
                k.tokens = k.burst or k.rate_per_second
                k.updated = now
        self.by_hash = {k.sha256.lower(): k for k in keys}

    @classmethod
    def from_file(
        cls, path: str | Path, reload_interval: float = RELOAD_INTERVAL_S
    ) -> ApiKeyAuthenticator:
        """Keys from ``path``, re-read when the file changes."""
        return cls(cls._read(Path(path)), path=path, reload_interval=reload_interval)

    @staticmethod
    def _read(path: Path) -> list[ApiKey]:
        try:
            return parse_keys(path.read_text(), json_file=path.suffix == ".json")
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def maybe_reload(self) -> bool:
        """Re-read the keys file if it changed; True when new keys are in force."""
        if self.path is None:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.reload_interval:
                return False
            self._checked = now
            try:
                stamp = _file_stamp(self.path)
                if stamp == self._stamp:
                    return False
                keys = self._read(self.path)
            except (OSError, ValueError) as exc:
                log.error("API keys file not reloaded; keeping the keys in force: %s", exc)
                return False
            self._stamp = stamp
            self._set_keys(keys)
            self.reloads += 1
        log.info("API keys reloaded", extra={"keys": len(keys)})
        return True

    def __call__(self, method: str, metadata: Sequence[tuple[str, Any]]) -> str | None:
        self.maybe_reload()
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
