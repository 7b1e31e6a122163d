"""The gateway's hop machinery against a real gRPC server on loopback (in-process): the
circuit breaker's states, per-hop deadlines, which failures are retried and which count
against the downstream, the request id forwarded, and the hop metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.logs import request_id_var
from services.gateway.breaker import CircuitBreaker
from services.gateway.downstream import Deadline, Downstream, HopError

METHOD = "/mercato.test.Scripted/Call"


@dataclass
class Scripted:
    """A server that answers each call with the next status of ``script`` (then OK) and
    records what it saw."""

    script: list[grpc.StatusCode] = field(default_factory=list)
    delay_s: float = 0.0
    calls: int = 0
    seen_timeouts: list[float] = field(default_factory=list)
    seen_request_ids: list[str] = field(default_factory=list)

    async def handle(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        self.seen_timeouts.append(context.time_remaining() or 0.0)
        md = dict(context.invocation_metadata() or ())
        self.seen_request_ids.append(str(md.get("x-request-id", "")))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.script:
            code = self.script.pop(0)
            if code != grpc.StatusCode.OK:
                await context.abort(code, f"scripted {code.name}")
        return b"ok:" + request


@dataclass
class Rig:
    server: Scripted
    channel: grpc.aio.Channel
    method: grpc.aio.UnaryUnaryMultiCallable

    def downstream(self, breaker: CircuitBreaker) -> Downstream:
        return Downstream(breaker.name, self.channel, breaker)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    scripted = Scripted()
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "mercato.test.Scripted",
        {"Call": grpc.unary_unary_rpc_method_handler(scripted.handle)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    method = channel.unary_unary(METHOD)
    try:
        yield Rig(scripted, channel, method)
    finally:
        await channel.close()
        await server.stop(None)


def _hops(hop: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "mercato_gateway_hop_latency_seconds_count", {"hop": hop, "outcome": outcome}
    )
    return value or 0.0


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("mercato_gateway_breaker_open", {"target": name})


# ------------------------------------------------------------------------- breaker


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker("b-consecutive", failures=3, reset_seconds=60)
    assert b.threshold == 3 and b.reset_seconds == 60 and b.name == "b-consecutive"
    b.failure()
    b.failure()
    assert not b.is_open and b.allow() and b.consecutive_failures == 2
    b.success()  # a success in between: the count starts again
    assert b.consecutive_failures == 0
    b.failure()
    b.failure()
    assert not b.is_open
    b.failure()
    assert b.is_open and not b.allow()
    assert _gauge("b-consecutive") == 1.0
    b.success()
    assert not b.is_open and b.allow() and b.opened_at is None
    assert _gauge("b-consecutive") == 0.0


def test_breaker_lets_one_probe_through_after_the_reset_time() -> None:
    b = CircuitBreaker("b-probe", failures=1, reset_seconds=0.2)
    b.failure()
    opened = b.opened_at
    assert opened is not None and not b.allow()
    time.sleep(0.21)
    assert b.allow()  # the probe
    assert not b.allow() and not b.allow()  # nobody else while it is out
    b.failure()  # the probe failed: open again, for a fresh reset time
    assert b.is_open and b.opened_at is not None and b.opened_at > opened
    assert not b.allow()
    time.sleep(0.21)
    assert b.allow()
    b.abandon(was_probe=False)  # another call's cancellation frees nothing
    assert not b.allow()
    b.abandon(was_probe=True)  # the probe's own cancellation frees the slot
    assert b.allow()
    b.success()
    assert not b.is_open and b.allow() and b.allow()


def test_breaker_defaults() -> None:
    b = CircuitBreaker("b-defaults")
    assert (b.threshold, b.reset_seconds) == (5, 2.0)
    for _ in range(4):
        b.failure()
    assert not b.is_open
    b.failure()
    assert b.is_open


# ------------------------------------------------------------------------ deadline


def test_deadline_gives_each_hop_the_smaller_of_its_timeout_and_what_is_left() -> None:
    d = Deadline(1.0, reserve=0.25)
    assert 0.7 < d.remaining() <= 0.75
    assert d.for_hop(0.1) == 0.1
    assert 0.7 < d.for_hop(5.0) <= 0.75
    assert Deadline(1.0).remaining() > 0.95  # no reserve by default


# ------------------------------------------------------------------------ downstream


async def test_a_call_goes_through_with_the_hop_timeout_and_the_request_id(rig: Rig) -> None:
    breaker = CircuitBreaker("d-ok", failures=2)
    breaker.failure()
    token = request_id_var.set("req-42")
    try:
        before = _hops("d-ok", "OK")
        got = await rig.downstream(breaker).call("d-ok", rig.method, b"x", Deadline(10), 0.5)
    finally:
        request_id_var.reset(token)
    assert got == b"ok:x"
    assert rig.server.calls == 1
    assert 0.3 < rig.server.seen_timeouts[0] <= 0.55  # the hop timeout, not the deadline
    assert rig.server.seen_request_ids == ["req-42"]
    assert breaker.consecutive_failures == 0  # a success resets the count
    assert _hops("d-ok", "OK") == before + 1


async def test_the_callers_deadline_caps_the_hop_timeout(rig: Rig) -> None:
    await rig.downstream(CircuitBreaker("d-cap")).call("d-cap", rig.method, b"", Deadline(0.4), 5)
    assert 0.2 < rig.server.seen_timeouts[0] <= 0.45


async def test_no_call_without_time_left(rig: Rig) -> None:
    breaker = CircuitBreaker("d-late", failures=1)
    down = rig.downstream(breaker)
    for deadline in (Deadline(0.0), Deadline(1.0, reserve=1.0), Deadline(0.0005)):
        with pytest.raises(HopError, match="no time left") as err:
            await down.call("d-late", rig.method, b"", deadline, 1.0)
        assert err.value.hop == "d-late" and err.value.code is None
    assert rig.server.calls == 0
    assert not breaker.is_open  # running out of time is not the downstream's fault
    assert _hops("d-late", "no_time") >= 3


async def test_an_open_breaker_skips_the_call(rig: Rig) -> None:
    breaker = CircuitBreaker("d-open", failures=1, reset_seconds=60)
    breaker.failure()
    with pytest.raises(HopError) as err:
        await rig.downstream(breaker).call("d-open", rig.method, b"", Deadline(5), 1.0)
    assert err.value.reason == "circuit breaker open for d-open"
    assert str(err.value) == "d-open: circuit breaker open for d-open"
    assert rig.server.calls == 0
    assert _hops("d-open", "breaker_open") >= 1


async def test_unavailable_is_retried_within_the_budget(rig: Rig) -> None:
    rig.server.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    breaker = CircuitBreaker("d-retry", failures=5)
    started = time.monotonic()
    got = await rig.downstream(breaker).call(
        "d-retry", rig.method, b"y", Deadline(5), 1.0, retries=2
    )
    elapsed = time.monotonic() - started
    assert got == b"ok:y" and rig.server.calls == 3
    assert breaker.consecutive_failures == 0
    assert 0.03 <= elapsed < 1.0  # backoff 0.01 then 0.02 s, not more
    assert _hops("d-retry", "UNAVAILABLE") >= 2


async def test_retries_run_out_and_every_failure_counts(rig: Rig) -> None:
    rig.server.script = [grpc.StatusCode.UNAVAILABLE] * 3
    breaker = CircuitBreaker("d-out", failures=10)
    with pytest.raises(HopError) as err:
        await rig.downstream(breaker).call("d-out", rig.method, b"", Deadline(5), 1.0, retries=2)
    assert rig.server.calls == 3
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.reason == "UNAVAILABLE: scripted UNAVAILABLE"
    assert err.value.hop == "d-out"
    assert breaker.consecutive_failures == 3


async def test_no_retry_without_retries(rig: Rig) -> None:
    rig.server.script = [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(HopError):
        await rig.downstream(CircuitBreaker("d-once")).call(
            "d-once", rig.method, b"", Deadline(5), 1.0
        )
    assert rig.server.calls == 1


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND])
async def test_the_callers_mistakes_are_not_retried_nor_held_against_the_downstream(
    rig: Rig, code: grpc.StatusCode
) -> None:
    rig.server.script = [code]
    breaker = CircuitBreaker(f"d-{code.name}", failures=2)
    breaker.failure()
    with pytest.raises(HopError) as err:
        await rig.downstream(breaker).call(
            f"d-{code.name}", rig.method, b"", Deadline(5), 1.0, retries=3
        )
    assert err.value.code == code and rig.server.calls == 1
    assert breaker.consecutive_failures == 0 and not breaker.is_open


async def test_other_failures_open_the_breaker_and_are_not_retried(rig: Rig) -> None:
    rig.server.script = [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED]
    breaker = CircuitBreaker("d-fail", failures=2, reset_seconds=60)
    down = rig.downstream(breaker)
    with pytest.raises(HopError) as err:
        await down.call("d-fail", rig.method, b"", Deadline(5), 1.0, retries=3)
    assert err.value.code == grpc.StatusCode.INTERNAL and rig.server.calls == 1
    assert not breaker.is_open
    rig.server.delay_s = 0.3  # slower than the hop timeout: DEADLINE_EXCEEDED
    with pytest.raises(HopError) as err:
        await down.call("d-fail", rig.method, b"", Deadline(5), 0.1, retries=3)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and rig.server.calls == 2
    assert breaker.is_open


async def test_a_cancelled_probe_frees_the_breaker_and_a_cancelled_call_does_not_count(
    rig: Rig,
) -> None:
    rig.server.delay_s = 5.0
    breaker = CircuitBreaker("d-cancel", failures=1, reset_seconds=0.05)
    down = rig.downstream(breaker)
    call = asyncio.create_task(down.call("d-cancel", rig.method, b"", Deadline(10), 10))
    await asyncio.sleep(0.2)
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    assert breaker.consecutive_failures == 0 and not breaker.is_open  # no verdict
    breaker.failure()
    await asyncio.sleep(0.06)
    probe = asyncio.create_task(down.call("d-cancel", rig.method, b"", Deadline(10), 10))
    await asyncio.sleep(0.2)
    assert not breaker.allow()  # the probe is out
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
    assert breaker.allow()  # freed for the next probe
