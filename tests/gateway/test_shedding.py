"""Load shedding in the gateway (#14), with real processes: past MAX_IN_FLIGHT calls in
progress a Recommend is answered at once (cached popular items named degraded, or
RESOURCE_EXHAUSTED as configured) instead of queueing behind the slow ones.

Retrieval is a socket that accepts connections and never answers (a hung dependency:
the one fault here that cannot be caused with a real service), so every admitted call
waits for its retrieval deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mercato.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.popular_profile import start_popular_profile
from tests.procs import ServiceProc, free_port, start_service

RETRIEVAL_TIMEOUT_S = 1.5
BURST = 12
LIMIT = 2


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    tmp: Path = tmp_path_factory.mktemp("shed")
    proc = start_popular_profile(tmp, [f"p{k}" for k in range(8)], 8)
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def hung_target() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # accepted by the kernel, never answered
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _gateway(tmp: Path, profile: ServiceProc, hung: str, answer: str) -> ServiceProc:
    return start_service(
        "gateway",
        tmp,
        {
            "MERCATO_GATEWAY_PROFILE_TARGET": profile.target,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": hung,
            "MERCATO_GATEWAY_RANKING_TARGET": f"127.0.0.1:{free_port()}",
            "MERCATO_GATEWAY_RETRIEVAL_TIMEOUT_MS": str(RETRIEVAL_TIMEOUT_S * 1000),
            "MERCATO_GATEWAY_READ_RETRIES": "0",
            "MERCATO_GATEWAY_BREAKER_FAILURES": "1000",  # keep every call on the slow path
            "MERCATO_GATEWAY_MAX_IN_FLIGHT": str(LIMIT),
            "MERCATO_GATEWAY_OVERLOAD_ANSWER": answer,
        },
    )


def _burst(
    stub: gateway_pb2_grpc.GatewayServiceStub,
) -> list[tuple[float, gateway_pb2.RecommendResponse | grpc.RpcError]]:
    """BURST concurrent Recommends; (seconds to answer, response or error) each."""
    req = gateway_pb2.RecommendRequest(customer_id="c1", k=3)
    started = time.perf_counter()
    futures = [stub.Recommend.future(req, timeout=10) for _ in range(BURST)]
    out: list[tuple[float, gateway_pb2.RecommendResponse | grpc.RpcError]] = []
    pending = dict(enumerate(futures))
    done: dict[int, tuple[float, gateway_pb2.RecommendResponse | grpc.RpcError]] = {}
    while pending:
        for i, f in list(pending.items()):
            if f.done():
                err = f.exception()
                done[i] = (time.perf_counter() - started, err if err is not None else f.result())
                del pending[i]
        time.sleep(0.005)
    out = [done[i] for i in range(BURST)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("answer", ["degraded", "resource_exhausted"])
def test_calls_past_the_bound_are_answered_at_once(
    profile: ServiceProc, hung_target: str, tmp_path: Path, answer: str
) -> None:
    gw = _gateway(tmp_path, profile, hung_target, answer)
    try:
        with grpc.insecure_channel(gw.target, options=[("grpc.enable_retries", 0)]) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            # One call alone is admitted: slow (retrieval hangs), answered from trending.
            t0 = time.perf_counter()
            first = stub.Recommend(gateway_pb2.RecommendRequest(customer_id="c1", k=3), timeout=10)
            assert time.perf_counter() - t0 >= RETRIEVAL_TIMEOUT_S * 0.9
            assert {d.stage for d in first.degraded} == {"retrieval", "ranking"}
            assert len(first.items) == 3

            results = _burst(stub)
            admitted = [
                (t, r)
                for t, r in results
                if isinstance(r, gateway_pb2.RecommendResponse)
                and "gateway" not in {d.stage for d in r.degraded}
            ]
            shed = [(t, r) for t, r in results if (t, r) not in admitted]
            assert len(admitted) == LIMIT, [type(r).__name__ for _, r in results]
            assert len(shed) == BURST - LIMIT
            for t, _ in admitted:
                assert t >= RETRIEVAL_TIMEOUT_S * 0.9
            for t, r in shed:
                assert t < RETRIEVAL_TIMEOUT_S * 0.6  # did not wait for the slow calls
                if answer == "degraded":
                    assert isinstance(r, gateway_pb2.RecommendResponse)
                    (deg,) = r.degraded
                    assert (deg.stage, deg.fallback) == ("gateway", "popular_items")
                    assert "overloaded" in deg.reason
                    assert [i.item.item_id for i in r.items] == [
                        i.item.item_id for i in first.items
                    ]
                else:
                    assert isinstance(r, grpc.RpcError)
                    assert r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert f"limit of {LIMIT} calls in progress" in (r.details() or "")

            # The bound frees up: the next call is admitted again.
            after = stub.Recommend(gateway_pb2.RecommendRequest(customer_id="c1", k=3), timeout=10)
            assert {d.stage for d in after.degraded} == {"retrieval", "ranking"}
    finally:
        gw.terminate()
