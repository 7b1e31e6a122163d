"""Faults with real processes: SIGKILL of the service in the middle of a stream of
acknowledged batches (SQLite and Redis), and Redis going away and coming back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc
from services.profile.logic import ProfileConfig, recompute_profile
from services.profile.store.base import ProfileStore
from services.profile.store.redis import RedisStore
from services.profile.store.sqlite import SqliteStore
from tests.procs import free_port, start_service
from tests.profile.factory import DAY_US, NOW_US, catalog, random_events
from tests.profile.redis_proc import RedisProc

pytestmark = pytest.mark.slow  # profile service and redis-server killed and restarted

BATCH = 20


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProc]:
    proc = RedisProc(tmp_path / "redis").start()
    yield proc
    proc.stop()


def _request(events: list[common_pb2.Event]) -> profile_pb2.ProfileServiceTrackEventsRequest:
    return profile_pb2.ProfileServiceTrackEventsRequest(events=events)


@dataclass
class Stream:
    """What a stream of batches did: which were acknowledged, which calls were cut off."""

    acked: set[int] = field(default_factory=set)
    cut: dict[int, str] = field(default_factory=dict)  # batch -> the failure it got


def _stream_until(
    target: str, batches: list[list[common_pb2.Event]], kill: Callable[[], None]
) -> Stream:
    """Send batches from 4 client threads (no retries: a failure is a failure); call
    ``kill`` once ~40% are acknowledged, while calls are in flight. A thread stops at its
    first failed call, whatever the exception."""
    out = Stream()
    lock = threading.Lock()
    cursor = iter(range(len(batches)))
    options = [("grpc.enable_retries", 0)]

    def worker() -> None:
        with grpc.insecure_channel(target, options=options) as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            for n in cursor:
                try:
                    stub.TrackEvents(_request(batches[n]), timeout=10)
                except Exception as exc:  # every failure counts, gRPC or not
                    is_rpc = isinstance(exc, grpc.RpcError)
                    with lock:
                        out.cut[n] = exc.code().name if is_rpc else f"{type(exc).__name__}: {exc}"
                    return
                with lock:
                    out.acked.add(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(out.acked) < len(batches) * 0.4 and not out.cut and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not out.cut, f"calls failed before the kill: {out.cut}"
    kill()  # while calls are in flight
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a client thread hung"
    assert 0 < len(out.acked) < len(batches), "the kill did not land mid-stream"
    assert out.cut, "no call was cut off: the kill did not land while calls were in flight"
    assert set(out.cut.values()) == {"UNAVAILABLE"}, out.cut
    return out


async def _verify(
    store: ProfileStore, cfg: ProfileConfig, batches: list[list[common_pb2.Event]], acked: set[int]
) -> None:
    await store.open()
    try:
        log = [e async for e in store.iter_log(500)]
        ids = [e.event_id for e in log]
        assert len(ids) == len(set(ids)), "an event was logged twice"
        logged = set(ids)
        for n, batch in enumerate(batches):
            present = {e.event_id for e in batch} & logged
            if n in acked:
                assert len(present) == len(batch), f"acknowledged batch {n} lost events"
            else:
                assert len(present) in (0, len(batch)), f"batch {n} is half-written"
        states = {}
        async for part in store.scan_states():
            states.update(part)
        assert set(states) == {e.customer_id for e in log}
        for cid, state in states.items():
            assert state == recompute_profile([e for e in log if e.customer_id == cid], cfg)
    finally:
        await store.close()


def _crash_and_restart(tmp_path: Path, env: dict[str, str], make_store: object) -> None:
    cfg = ProfileConfig()
    items = catalog(30)
    events = random_events(99, 60 * BATCH, customers=40, items=30, start_us=NOW_US - 61 * DAY_US)
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    port = free_port()
    svc = start_service("profile", tmp_path, env, port=port)
    with svc.channel() as ch:
        profile_pb2_grpc.ProfileServiceStub(ch).UpsertItems(
            profile_pb2.UpsertItemsRequest(items=items), timeout=10
        )
    acked = _stream_until(svc.target, batches, svc.kill).acked
    again = start_service("profile", tmp_path, env, port=port)
    try:
        with again.channel() as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            # Every acknowledged event is there: resending any of them is a duplicate.
            for n in sorted(acked)[:10]:
                resp = stub.TrackEvents(_request(batches[n]), timeout=10)
                assert (resp.accepted, resp.duplicates) == (0, BATCH)
        asyncio.run(_verify(make_store(cfg), cfg, batches, acked))  # type: ignore[operator]
    finally:
        assert again.terminate() == 0


def test_sigkill_mid_stream_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "profile.db"
    _crash_and_restart(
        tmp_path, {"MERCATO_PROFILE_SQLITE_PATH": str(db)}, lambda cfg: SqliteStore(db, cfg)
    )


def test_sigkill_mid_stream_redis(tmp_path: Path, own_redis: RedisProc) -> None:
    env = {"MERCATO_PROFILE_BACKEND": "redis", "MERCATO_PROFILE_REDIS_URL": own_redis.url}
    _crash_and_restart(tmp_path, env, lambda cfg: RedisStore(own_redis.url, cfg))


def test_redis_sigkill_mid_stream(tmp_path: Path, own_redis: RedisProc) -> None:
    """redis-server (appendfsync always) is SIGKILLed while the profile service writes
    batches into it: every batch the service acknowledged is in Redis after the restart,
    exactly once, and every batch cut off is there whole or not at all."""
    cfg = ProfileConfig()
    env = {
        "MERCATO_PROFILE_BACKEND": "redis",
        "MERCATO_PROFILE_REDIS_URL": own_redis.url,
        "MERCATO_PROFILE_REDIS_TIMEOUT_SECONDS": "2",
    }
    events = random_events(77, 60 * BATCH, customers=40, items=30, start_us=NOW_US - 61 * DAY_US)
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    svc = start_service("profile", tmp_path, env)
    try:
        with svc.channel() as ch:
            profile_pb2_grpc.ProfileServiceStub(ch).UpsertItems(
                profile_pb2.UpsertItemsRequest(items=catalog(30)), timeout=10
            )
        stream = _stream_until(svc.target, batches, own_redis.kill)
        assert svc.process.poll() is None  # the service outlives its store
        own_redis.start()  # same port, same append-only file
        svc.wait_status("SERVING", timeout=30)
        with svc.channel() as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            for n in sorted(stream.acked)[:10]:
                resp = stub.TrackEvents(_request(batches[n]), timeout=10)
                assert (resp.accepted, resp.duplicates) == (0, BATCH)
    finally:
        assert svc.terminate() == 0
    asyncio.run(_verify(RedisStore(own_redis.url, cfg), cfg, batches, stream.acked))


@pytest.mark.parametrize("mode", ["asyncio", "sync"])
def test_redis_outage_unavailable_then_recovery(
    tmp_path: Path, own_redis: RedisProc, mode: str
) -> None:
    # server_mode=sync: the reads run on pool threads through the store's synchronous
    # Redis client, which must map the outage to UNAVAILABLE and reconnect the same way.
    env = {
        "MERCATO_PROFILE_SERVER_MODE": mode,
        "MERCATO_PROFILE_BACKEND": "redis",
        "MERCATO_PROFILE_REDIS_URL": own_redis.url,
        "MERCATO_PROFILE_STORE_CHECK_SECONDS": "0.2",
        "MERCATO_PROFILE_REDIS_TIMEOUT_SECONDS": "1",
    }
    svc = start_service("profile", tmp_path, env)
    events = random_events(5, 40, customers=3, items=10)
    try:
        with svc.channel() as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            stub.UpsertItems(profile_pb2.UpsertItemsRequest(items=catalog(10)), timeout=5)
            assert stub.TrackEvents(_request(events[:20]), timeout=5).accepted == 20
            cid = events[0].customer_id
            before = stub.GetProfile(profile_pb2.GetProfileRequest(customer_id=cid), timeout=5)

            own_redis.kill()  # crash: only the fsynced append-only file survives
            for call in (
                lambda: stub.TrackEvents(_request(events[20:]), timeout=5),
                lambda: stub.GetProfile(profile_pb2.GetProfileRequest(customer_id=cid), timeout=5),
                lambda: stub.GetItems(profile_pb2.GetItemsRequest(item_ids=["i1"]), timeout=5),
                lambda: stub.GetCart(profile_pb2.GetCartRequest(customer_id=cid), timeout=5),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "unreachable" in info.value.details()
                assert own_redis.url.split("//")[1].split("/")[0] in info.value.details()
            svc.wait_status("NOT_SERVING", timeout=10)
            assert svc.process.poll() is None  # the service stays up

            own_redis.start()  # same port, same append-only file
            svc.wait_status("SERVING", timeout=20)
            after = stub.GetProfile(profile_pb2.GetProfileRequest(customer_id=cid), timeout=5)
            assert after.profile.recent_items == before.profile.recent_items
            items = stub.GetItems(profile_pb2.GetItemsRequest(item_ids=["i1"]), timeout=5)
            assert [i.item_id for i in items.items] == ["i1"]
            resp = stub.TrackEvents(_request(events), timeout=5)
            assert (resp.accepted, resp.duplicates) == (20, 20)
    finally:
        assert svc.terminate() == 0
