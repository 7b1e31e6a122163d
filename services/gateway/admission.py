"""How many recommendation calls the gateway runs at once: an adaptive bound (AIMD on
the latency of the calls it admitted), so that under overload the calls it admits stay
fast and the rest are answered at once (see :class:`~services.gateway.server.GatewayServicer`).

A fixed bound does not do this on its own: at a capacity of about 225 Recommend/s, 64
calls in progress are about 280 ms of queueing by construction (Little's law), and on a
machine whose cores are saturated every admitted call runs past its caller's deadline
while the shed answers queue behind them for a core. The adaptive bound follows the
latency the admitted calls see instead:

- the calls' latencies are gathered in windows of ``window_s`` (at least
  ``min_samples`` calls);
- a window whose share of calls slower than ``target_s`` is above ``slow_share``
  (its p90 above the target, with the defaults) cuts the bound by ``backoff``; a
  downstream call that ran out of time counts as such a call (:meth:`timed_out`);
- a window within the target in which the calls in progress came near the bound
  raises it by one (nothing is learnt about a bound the load never reached);
- the bound stays within ``[min_limit, max_limit]``;
- with ``lag_target_s`` set, the event loop's lag counts too (:func:`watch_loop_lag`:
  how late a ticker task wakes): a window in which more than ``slow_share`` of the
  ticks woke later than ``lag_target_s`` cuts the bound even if the admitted calls were
  fast, provided half the bound was in use in it. The latency above is measured from
  the handler's start, so it does not see the calls waiting in front of it: grpc.aio
  takes each new call from the core on the event loop (one per method per pass of its
  ``_server_main_loop``) and runs every call's callbacks there, so while the loop lags
  the calls queue in the core.

This is the AIMD limit of Netflix's concurrency-limits library, with its per-call
decision replaced by one per window (single slow calls on a shared machine do not halve
the bound). ``docs/gateway.md`` has the measurements that chose the defaults.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable


class AdaptiveLimit:
    """AIMD bound on the calls in progress, from their latency. Thread-safe (a lock per
    update): with the synchronous server the pool threads decide and report, while the
    event loop's lag ticker reports too."""

    def __init__(
        self,
        max_limit: int,
        target_s: float,
        min_limit: int = 4,
        initial: int = 16,
        window_s: float = 0.05,
        min_samples: int = 5,
        slow_share: float = 0.1,
        backoff: float = 0.8,
        lag_target_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit ({min_limit}) <= max_limit ({max_limit})")
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.target_s = target_s
        self.window_s = window_s
        self.min_samples = min_samples
        self.slow_share = slow_share
        self.backoff = backoff
        self.lag_target_s = lag_target_s
        self.clock = clock
        self._limit = float(min(max(initial, min_limit), max_limit))
        self._window_start = clock()
        self._n = 0
        self._slow = 0
        self._peak = 0
        self._ticks = 0
        self._late_ticks = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return int(self._limit)

    def admit(self, in_flight: int) -> bool:
        """Whether one more call may start with ``in_flight`` in progress."""
        with self._lock:
            if in_flight + 1 > self._peak:
                self._peak = in_flight + 1
            return in_flight < self._limit

    def timed_out(self) -> None:
        """A downstream call of an admitted call ran out of time: counted as one call
        past the target (a hop deadline is shorter than the call's, and its fallback
        may still answer the call in time)."""
        with self._lock:
            self._n += 1
            self._slow += 1
            self._decide()

    def done(self, latency_s: float) -> None:
        """An admitted call ended after ``latency_s`` (successful or not)."""
        with self._lock:
            self._n += 1
            if latency_s > self.target_s:
                self._slow += 1
            self._decide()

    def lag(self, lag_s: float) -> None:
        """The event loop ran a ticker ``lag_s`` later than it asked to be woken
        (ignored unless ``lag_target_s`` is set)."""
        if self.lag_target_s <= 0:
            return
        with self._lock:
            self._ticks += 1
            if lag_s > self.lag_target_s:
                self._late_ticks += 1
            self._decide()

    def _decide(self) -> None:
        now = self.clock()
        if now - self._window_start < self.window_s:
            return
        # the loop's lag counts only with half the bound in use: a loop slowed by other
        # processes while few calls are in progress is not the gateway's backlog
        lagging = self._late_ticks > self.slow_share * self._ticks and 2 * self._peak >= self._limit
        if not lagging and self._n < self.min_samples:
            if self._ticks:  # the loop kept up: its next window starts (calls carry on)
                self._window_start = now
                self._ticks = self._late_ticks = 0
            return
        if lagging or self._slow > self.slow_share * self._n:
            self._limit = max(self.min_limit, self._limit * self.backoff)
        elif self._peak >= 0.8 * self._limit:
            self._limit = min(self.max_limit, self._limit + 1)
        self._window_start = now
        self._n = self._slow = self._peak = self._ticks = self._late_ticks = 0


async def watch_loop_lag(
    limit: AdaptiveLimit, observe: Callable[[float], None], interval_s: float = 0.005
) -> None:
    """Until cancelled: sleep ``interval_s`` on the running loop and tell ``limit`` and
    ``observe`` how much later than that it woke (the time callbacks and new calls
    queued ahead of it)."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        lag = loop.time() - asked
        observe(lag)
        limit.lag(lag)
