"""Calls from the gateway to the internal services: per-hop deadlines derived from the
caller's, bounded retries for idempotent calls, a circuit breaker per downstream, the
request id forwarded, and per-hop metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from prometheus_client import Histogram

from services.common.logs import request_id_var
from services.common.metrics import LATENCY_BUCKETS
from services.gateway.breaker import CircuitBreaker

HOP_LATENCY = Histogram(
    "mercato_gateway_hop_latency_seconds",
    "Time of each gateway -> downstream call, by hop and outcome.",
    ["hop", "outcome"],
    buckets=LATENCY_BUCKETS,
)

T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


class HopError(Exception):
    """A downstream call failed or was skipped; ``reason`` says why, for `degraded`."""

    def __init__(self, hop: str, reason: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{hop}: {reason}")
        self.hop = hop
        self.reason = reason
        self.code = code


class Deadline:
    """The caller's time budget; hops get the smaller of their own timeout and what is left."""

    def __init__(self, seconds: float, reserve: float = 0.0) -> None:
        self.end = time.monotonic() + seconds
        self.reserve = reserve

    def remaining(self) -> float:
        return self.end - time.monotonic() - self.reserve

    def for_hop(self, hop_timeout: float) -> float:
        return min(hop_timeout, self.remaining())


class Downstream:
    """One internal service as the gateway sees it."""

    def __init__(self, name: str, channel: grpc.aio.Channel, breaker: CircuitBreaker) -> None:
        self.name = name
        self.channel = channel
        self.breaker = breaker
        # Called when a hop ran out of time (its deadline passed, or none was left to
        # start it): the gateway's admission bound counts it as a call past its target.
        self.on_timeout: Callable[[], None] | None = None

    async def call(
        self,
        hop: str,
        method: Callable[..., Awaitable[T]],
        request: Any,
        deadline: Deadline,
        hop_timeout: float,
        retries: int = 0,
    ) -> T:
        """Call ``method(request)``; raise :class:`HopError` instead of any failure.

        ``retries`` extra attempts are made on UNAVAILABLE, only within the deadline; pass
        0 for calls that are not idempotent.
        """
        attempt = 0
        while True:
            timeout = deadline.for_hop(hop_timeout)
            if timeout <= 0.001:
                HOP_LATENCY.labels(hop, "no_time").observe(0)
                if self.on_timeout is not None:
                    self.on_timeout()
                raise HopError(hop, "no time left in the caller's deadline")
            probe = self.breaker.is_open
            if not self.breaker.allow():
                HOP_LATENCY.labels(hop, "breaker_open").observe(0)
                raise HopError(hop, f"circuit breaker open for {self.name}")
            started = time.perf_counter()
            try:
                metadata = (("x-request-id", request_id_var.get()),)
                response = await method(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                HOP_LATENCY.labels(hop, exc.code().name).observe(time.perf_counter() - started)
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.on_timeout:
                    self.on_timeout()
                # Bad input is the caller's fault, not the downstream's health.
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                    self.breaker.success()
                else:
                    self.breaker.failure()
                if exc.code() in _RETRYABLE and attempt < retries:
                    attempt += 1
                    await asyncio.sleep(min(0.01 * attempt, max(0.0, deadline.remaining() / 4)))
                    continue
                raise HopError(hop, f"{exc.code().name}: {exc.details()}", exc.code()) from exc
            except asyncio.CancelledError:
                # The caller went away (its deadline passed): no verdict on the downstream.
                self.breaker.abandon(probe)
                raise
            HOP_LATENCY.labels(hop, "OK").observe(time.perf_counter() - started)
            self.breaker.success()
            return response
