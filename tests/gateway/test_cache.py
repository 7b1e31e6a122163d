"""The gateway's short-lived caches expire and stay bounded."""

from __future__ import annotations

from services.gateway.cache import TtlCache


def test_ttl_cache_expires_and_evicts_least_recent() -> None:
    now = [0.0]
    cache: TtlCache[str, int] = TtlCache("t", max_entries=2, ttl=2.0, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # "a" was stored first: evicted although it was read
    assert cache.get("a") is None and cache.get("b") == 2 and cache.get("c") == 3
    assert cache.get_many(["b", "x", "c"]) == ({"b": 2, "c": 3}, ["x"])
    now[0] = 2.5
    assert cache.get("b") is None and cache.get_many(["b"]) == ({}, ["b"])
    assert cache.get_stale("b") == 2 and cache.get_stale("a") is None  # stale-if-error
    off: TtlCache[str, int] = TtlCache("off", max_entries=10, ttl=0.0)
    off.put("a", 1)
    assert not off.enabled and off.get("a") is None
