"""Overload that stays fast (#14, item 5), with real processes: the gateway in front of
a real profile service and a retrieval + ranking of fixed capacity
(``limited_downstream.py``: one worker, 10 ms per Recommend, so 100 Recommend/s, and no
deadline checks: a saturated service), driven open loop at twice that capacity by a
client without retries. Every call is counted.

With the adaptive admission bound (the default) the calls the gateway admits keep
their latency low and get full answers at about the downstream's capacity (goodput),
and the rest are answered at once (popular items named degraded, or RESOURCE_EXHAUSTED
before a popular list is cached), in both server modes (the synchronous one decides and
sheds on its pool threads, session 24). With a fixed bound of 64, the admitted calls queue in
the downstream past their hop deadlines and the downstream spends its capacity on calls
nobody waits for."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mercato.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.popular_profile import start_popular_profile
from tests.procs import REPO, ServiceProc, free_port, start_service

ITEMS = [f"p{k}" for k in range(40)]
CAPACITY = 100.0  # Recommend/s of the limited downstream: 1000 / (8 + 2) ms
RATE = 2 * CAPACITY
SECONDS = 5.0
DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    tmp: Path = tmp_path_factory.mktemp("overload")
    proc = start_popular_profile(tmp, ITEMS, 20)
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def limited() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests/gateway/limited_downstream.py"),
            *("--port", str(port), "--retrieve-ms", "8", "--rank-ms", "2"),
            *("--items", *ITEMS),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _drive(stub: gateway_pb2_grpc.GatewayServiceStub) -> list[tuple[float, object]]:
    """RATE calls per second for SECONDS, each with a DEADLINE_S deadline; (latency
    from the scheduled send time, response or error) of every call."""
    req = gateway_pb2.RecommendRequest(customer_id="u1", k=5)
    out: list[tuple[float, object]] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)
    total = int(RATE * SECONDS)

    def record(scheduled: float, fut: grpc.Future) -> None:
        latency = time.perf_counter() - scheduled
        err = fut.exception()
        with lock:
            out.append((latency, err if err is not None else fut.result()))
        done.release()

    started = time.perf_counter()
    for i in range(total):
        scheduled = started + i / RATE
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        fut = stub.Recommend.future(req, timeout=DEADLINE_S)
        fut.add_done_callback(lambda f, s=scheduled: record(s, f))
    for _ in range(total):
        assert done.acquire(timeout=DEADLINE_S + 10)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _run(
    tmp: Path, profile: ServiceProc, limited: str, admission: str, mode: str
) -> dict[str, object]:
    gw = start_service(
        "gateway",
        tmp,
        {
            "MERCATO_GATEWAY_PROFILE_TARGET": profile.target,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": limited,
            "MERCATO_GATEWAY_RANKING_TARGET": limited,
            "MERCATO_GATEWAY_READ_RETRIES": "0",
            "MERCATO_GATEWAY_ADMISSION": admission,
            "MERCATO_GATEWAY_SERVER_MODE": mode,
            "MERCATO_GATEWAY_LOG_LEVEL": "WARNING",
        },
    )
    try:
        with grpc.insecure_channel(gw.target, options=[("grpc.enable_retries", 0)]) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            stub.Recommend(gateway_pb2.RecommendRequest(customer_id="u1", k=5), timeout=5)
            results = _drive(stub)
        # the loop-lag ticker ran in the real gateway (ADMIT_LAG_MS's default)
        lag_ticks = gw.metric("mercato_gateway_loop_lag_seconds_count")
    finally:
        gw.terminate()
    full, admitted, shed, errors = [], [], [], []
    for latency, r in results:
        if isinstance(r, gateway_pb2.RecommendResponse):
            stages = {d.stage for d in r.degraded}
            if "gateway" in stages:
                assert len(r.items) == 5  # popular items, not an empty answer
                shed.append(latency)
            else:
                admitted.append(latency)
                if not stages:
                    full.append(latency)
        elif isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            shed.append(latency)
        else:
            errors.append(r)
    return {
        "calls": len(results),
        "errors": errors,
        "goodput": len(full) / SECONDS,
        "admitted_p99": _pct(admitted, 0.99),
        "shed": len(shed),
        "shed_p99": _pct(shed, 0.99),
        "lag_ticks": lag_ticks,
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "asyncio"])
def test_at_twice_the_capacity_answers_stay_fast_and_goodput_holds(
    profile: ServiceProc, limited: str, tmp_path: Path, mode: str
) -> None:
    r = _run(tmp_path, profile, limited, "adaptive", mode)
    assert r["calls"] == int(RATE * SECONDS)
    assert r["errors"] == [], r  # no DEADLINE_EXCEEDED: every call answered in time
    assert r["shed"] >= 0.3 * int(RATE * SECONDS), r  # the excess was shed ...
    assert r["shed_p99"] < 0.25, r  # ... at once, not after queueing
    assert r["admitted_p99"] < 0.5, r  # admitted calls did not queue either
    assert r["goodput"] >= 0.6 * CAPACITY, r  # full answers near the capacity
    assert r["lag_ticks"] > 100, r  # 5 ms ticks over the run fed the bound the loop's lag
