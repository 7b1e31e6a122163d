"""The profile service's reads off the event loop (#14, item 3): with the synchronous
server (``SERVER_MODE=sync``) GetProfile, BatchGetProfiles, GetCart and GetItems run whole
on the pool thread that took the call, through the store's thread-safe reads.

The service runs in-process on loopback (a real gRPC server, a real SQLite file), so
the test can hold its event loop busy for a while, as a burst of writes or the store
check would: the reads must answer meanwhile. A read without its synchronous twin runs
on the loop and waits the whole time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc
from services.profile.server import ProfileService
from services.profile.settings import ProfileSettings
from tests.procs import free_port
from tests.profile.factory import catalog, event
from tests.runtime.test_runtime import run_with

BLOCK_S = 1.5


def _reads_while_the_loop_is_busy(
    target: str, loop: asyncio.AbstractEventLoop
) -> dict[str, tuple[float, Any]]:
    """Hold the loop for BLOCK_S, then make each read once: (seconds, answer) by method."""
    with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        reads: dict[str, Callable[[], Any]] = {
            "GetProfile": lambda: stub.GetProfile(
                profile_pb2.GetProfileRequest(customer_id="c1"), timeout=10
            ),
            "BatchGetProfiles": lambda: stub.BatchGetProfiles(
                profile_pb2.BatchGetProfilesRequest(customer_ids=["c1", "c2"]), timeout=10
            ),
            "GetCart": lambda: stub.GetCart(
                profile_pb2.GetCartRequest(customer_id="c1"), timeout=10
            ),
            "GetItems": lambda: stub.GetItems(
                profile_pb2.GetItemsRequest(item_ids=["i1", "ghost"]), timeout=10
            ),
        }
        loop.call_soon_threadsafe(time.sleep, BLOCK_S)
        time.sleep(0.05)
        out: dict[str, tuple[float, Any]] = {}
        for name, read in reads.items():
            started = time.perf_counter()
            answer = read()
            out[name] = (time.perf_counter() - started, answer)
        return out


async def test_reads_answer_while_the_event_loop_is_busy(tmp_path: Path) -> None:
    settings = ProfileSettings(
        port=free_port(),
        metrics_port=0,
        log_level="WARNING",
        server_mode="sync",
        sqlite_path=str(tmp_path / "profile.db"),
    )
    service = ProfileService(settings)
    reads: dict[str, tuple[float, Any]] = {}

    async def check(ch: grpc.aio.Channel) -> None:
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        while (await health.Check(health_pb2.HealthCheckRequest())).status != serving:
            await asyncio.sleep(0.05)  # the store opens after the port is bound
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        await stub.UpsertItems(profile_pb2.UpsertItemsRequest(items=catalog(5)))
        add = event("e1", "c1", common_pb2.EVENT_TYPE_ADD_TO_CART, "i1", quantity=2)
        track = profile_pb2.ProfileServiceTrackEventsRequest(events=[add])
        assert (await stub.TrackEvents(track)).accepted == 1
        loop = asyncio.get_running_loop()
        target = f"127.0.0.1:{settings.port}"
        reads.update(await loop.run_in_executor(None, _reads_while_the_loop_is_busy, target, loop))

    await run_with(service, check)
    assert reads["GetProfile"][1].profile.customer_id == "c1"
    assert [p.customer_id for p in reads["BatchGetProfiles"][1].profiles] == ["c1", "c2"]
    assert [line.item_id for line in reads["GetCart"][1].cart.lines] == ["i1"]
    assert [i.item_id for i in reads["GetItems"][1].items] == ["i1"]
    assert list(reads["GetItems"][1].missing_item_ids) == ["ghost"]
    # at once, not once the loop is back (BLOCK_S after the first read)
    assert max(seconds for seconds, _ in reads.values()) < 0.5, {
        name: seconds for name, (seconds, _) in reads.items()
    }
