"""Short-lived caches of the gateway: catalog details and trending lists.

Item details (title, price, category, stock) and the trending ranking change slowly
compared with request rates: reading them for every request made the profile service the
bottleneck of Recommend (hundreds of item records decoded per call). Both are cached for
a few seconds (``MERCATO_GATEWAY_DETAILS_CACHE_SECONDS``, ``..._TRENDING_CACHE_SECONDS``;
0 disables), bounded in entries. Profiles are never cached: the next recommendation must
see the customer's last event.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from prometheus_client import Counter

CACHE_LOOKUPS = Counter(
    "mercato_gateway_cache_lookups_total",
    "Gateway cache lookups by cache and result.",
    ["cache", "result"],
)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Entries expire ``ttl`` seconds after they were stored; beyond ``max_entries`` the
    oldest stored entry is evicted first."""

    def __init__(
        self,
        name: str,
        max_entries: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._hit = CACHE_LOOKUPS.labels(name, "hit")
        self._miss = CACHE_LOOKUPS.labels(name, "miss")

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.max_entries > 0

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None or entry[0] <= self.clock():
            self._miss.inc()
            return None
        self._hit.inc()
        return entry[1]

    def get_stale(self, key: K) -> V | None:
        """The last value stored for ``key``, however old (expired entries stay until
        evicted by size): a last resort when the source is down (stale-if-error)."""
        entry = self._data.get(key)
        return None if entry is None else entry[1]

    def get_many(self, keys: list[K]) -> tuple[dict[K, V], list[K]]:
        """Fresh entries of ``keys`` and the keys without one (metrics counted once)."""
        now = self.clock()
        found: dict[K, V] = {}
        missing: list[K] = []
        data = self._data
        for key in keys:
            entry = data.get(key)
            if entry is not None and entry[0] > now:
                found[key] = entry[1]
            else:
                missing.append(key)
        if found:
            self._hit.inc(len(found))
        if missing:
            self._miss.inc(len(missing))
        return found, missing

    def put(self, key: K, value: V) -> None:
        if not self.enabled:
            return
        self._data[key] = (self.clock() + self.ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
