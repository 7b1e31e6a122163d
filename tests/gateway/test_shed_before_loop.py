"""Shedding before the event loop (#14, session 24): with the synchronous server
(``SERVER_MODE=sync``), a recommendation call past the admission bound is answered by
the pool thread that took it, without waiting for the gateway's event loop.

The gateway runs in-process on loopback (a real gRPC server), so the test can hold its
event loop busy for a second, as the admitted calls' downstream callbacks do under
overload: one call is admitted and waits for the loop, and the calls after it, past the
bound of one, must be refused at once. With the decision on the loop (grpc.aio, or a
handler without its synchronous twin) they wait the whole second."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from mercato.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.server import GatewayService
from services.gateway.settings import GatewaySettings
from tests.procs import free_port
from tests.runtime.test_runtime import run_with

BLOCK_S = 1.5


def _settings(**over: object) -> GatewaySettings:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the admitted call's hops fail
    return GatewaySettings(
        port=free_port(),
        metrics_port=0,
        log_level="WARNING",
        profile_target=dead,
        retrieval_target=dead,
        ranking_target=dead,
        exposures_enabled=False,
        admission="fixed",
        max_in_flight=1,
        overload_answer="resource_exhausted",
        **over,  # type: ignore[arg-type]
    )


def _calls_while_the_loop_is_busy(
    target: str, loop: asyncio.AbstractEventLoop, method: str
) -> list[tuple[float, grpc.StatusCode | None]]:
    """Hold the loop for BLOCK_S, start one call (admitted: it waits for the loop), then
    five more one after the other: (seconds, status) of those five."""
    with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        calls = {
            "Recommend": lambda t: stub.Recommend(
                gateway_pb2.RecommendRequest(customer_id="u1", k=5), timeout=t
            ),
            "GetRelatedItems": lambda t: stub.GetRelatedItems(
                gateway_pb2.GetRelatedItemsRequest(
                    item_id="p1", kind=common_pb2.RELATION_KIND_SIMILAR, k=5
                ),
                timeout=t,
            ),
        }
        call = calls[method]
        loop.call_soon_threadsafe(time.sleep, BLOCK_S)
        time.sleep(0.05)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(call, 10.0)  # admitted, then waits for the loop
            time.sleep(0.1)
            out: list[tuple[float, grpc.StatusCode | None]] = []
            for _ in range(5):
                started = time.perf_counter()
                code = None
                try:
                    call(10.0)
                except grpc.RpcError as exc:
                    code = exc.code()
                out.append((time.perf_counter() - started, code))
            first.exception(timeout=15)  # it ends once the loop is back
        return out


@pytest.mark.parametrize("method", ["Recommend", "GetRelatedItems"])
async def test_calls_past_the_bound_are_refused_while_the_loop_is_busy(method: str) -> None:
    service = GatewayService(_settings(server_mode="sync"))
    shed: list[tuple[float, grpc.StatusCode | None]] = []

    async def check(ch: grpc.aio.Channel) -> None:
        loop = asyncio.get_running_loop()
        target = f"127.0.0.1:{service.settings.port}"
        shed.extend(
            await loop.run_in_executor(None, _calls_while_the_loop_is_busy, target, loop, method)
        )

    await run_with(service, check)
    assert [code for _, code in shed] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5, shed
    # at once, not once the loop is back (BLOCK_S after the first call)
    assert max(seconds for seconds, _ in shed) < 0.3, shed
