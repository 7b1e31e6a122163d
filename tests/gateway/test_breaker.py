"""The circuit breaker recovers even when its probe call is cancelled by the caller."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from services.gateway.breaker import CircuitBreaker
from services.gateway.downstream import Deadline, Downstream


def test_cancelled_probe_does_not_wedge_the_breaker() -> None:
    async def run() -> None:
        breaker = CircuitBreaker("t", failures=1, reset_seconds=0.05)
        breaker.failure()  # open
        assert breaker.is_open and not breaker.allow()
        time.sleep(0.06)
        channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never called
        down = Downstream("t", channel, breaker)

        async def hangs(request: Any, timeout: float, metadata: Any) -> None:
            await asyncio.sleep(10)

        probe = asyncio.create_task(down.call("t", hangs, None, Deadline(5), 5))
        await asyncio.sleep(0.01)
        assert not breaker.allow()  # the probe is in flight: nobody else goes through
        probe.cancel()  # its caller went away
        await asyncio.gather(probe, return_exceptions=True)
        assert breaker.allow()  # a new probe may go (before the fix: open for good)
        breaker.success()
        assert not breaker.is_open
        await channel.close()

    asyncio.run(run())
