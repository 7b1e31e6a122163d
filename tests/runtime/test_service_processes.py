"""Every service runs as its own process with health, reflection, metrics and drain."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mercato.v1 import diagnostics_pb2, diagnostics_pb2_grpc
from tests.procs import ServiceProc, start_service

pytestmark = pytest.mark.slow  # starts services as processes

SERVICES = {
    "profile": "mercato.v1.ProfileService",
    "retrieval": "mercato.v1.RetrievalService",
    "ranking": "mercato.v1.RankingService",
    "gateway": "mercato.v1.GatewayService",
}
# Readiness without a trained model: retrieval cannot answer until one is promoted; the
# others can (ranking falls back to rules only, the gateway degrades per request).
READY = {
    "profile": "SERVING",
    "retrieval": "NOT_SERVING",
    "ranking": "SERVING",
    "gateway": "SERVING",
}


def _reflected_services(proc: ServiceProc) -> set[str]:
    with proc.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names: set[str] = set()
        for resp in responses:
            names.update(s.name for s in resp.list_services_response.service)
        return names


def _echo(proc: ServiceProc, **kwargs: object) -> diagnostics_pb2.EchoResponse:
    with proc.channel() as ch:
        stub = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch)
        return stub.Echo(diagnostics_pb2.EchoRequest(**kwargs), timeout=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["asyncio", "sync"])
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_process_lifecycle(name: str, mode: str, tmp_path: Path) -> None:
    # Retrieval and ranking need no model to start; model-dependent health is tested
    # with those services. server_mode=sync (#14): the same health, reflection, request
    # ids, errors, metrics and drain from the synchronous server.
    env = {f"MERCATO_{name.upper()}_SERVER_MODE": mode}
    proc = start_service(name, tmp_path, env, wait=None)
    try:
        # Liveness: retrieval is NOT_SERVING (readiness) until a model is promoted.
        proc.wait_status("SERVING", timeout=60, service="liveness")
        if name == "retrieval":  # NOT_SERVING is its state before the first look-up too
            deadline = time.monotonic() + 60
            while "no model loaded yet" not in proc.log():
                assert time.monotonic() < deadline, proc.log()[-3000:]
                time.sleep(0.1)
        proc.wait_status(READY[name], timeout=30, service=SERVICES[name])
        assert proc.health() == READY[name]  # the server as a whole
        assert proc.health("mercato.v1.DiagnosticsService") == READY[name]

        names = _reflected_services(proc)
        assert {SERVICES[name], "grpc.health.v1.Health", "mercato.v1.DiagnosticsService"} <= names

        # A request id sent by the caller comes back in metadata and in the echo.
        with proc.channel() as ch:
            stub = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch)
            resp, call = stub.Echo.with_call(
                diagnostics_pb2.EchoRequest(payload=b"ping"),
                metadata=(("x-request-id", "req-123"),),
                timeout=5,
            )
        assert resp.payload == b"ping"
        assert resp.service == name
        assert resp.request_id == "req-123"
        assert ("x-request-id", "req-123") in [(m.key, m.value) for m in call.initial_metadata()]

        # Malformed request: a clear INVALID_ARGUMENT, and the service keeps answering.
        with pytest.raises(grpc.RpcError) as err:
            _echo(proc, delay_ms=-5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "delay_ms" in (err.value.details() or "")
        assert _echo(proc, payload=b"again").payload == b"again"

        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert 'mercato_rpc_requests_total{code="INVALID_ARGUMENT"' in metrics
        assert f'method="/mercato.v1.DiagnosticsService/Echo",service="{name}"' in metrics
        assert "mercato_rpc_latency_seconds_bucket" in metrics

        # SIGTERM with a call in flight: the call completes, then the process exits 0.
        result: dict[str, object] = {}

        def slow_call() -> None:
            try:
                result["resp"] = _echo(proc, payload=b"slow", delay_ms=1500)
            except grpc.RpcError as exc:  # pragma: no cover - reported by the assert
                result["error"] = exc

        t = threading.Thread(target=slow_call)
        t.start()
        # Wait until the call is being handled (the in-flight gauge says so).

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5)
                .read()
                .decode()
            )
            if f'mercato_rpc_in_flight{{service="{name}"}} 1.0' in text:
                break
            time.sleep(0.02)
        assert proc.terminate(timeout=20) == 0
        t.join(10)
        assert "error" not in result, result.get("error")
        assert isinstance(result.get("resp"), diagnostics_pb2.EchoResponse)
        assert '"msg": "stopped"' in proc.log()
        assert f'"server_mode": "{mode}"' in proc.log()
    finally:
        proc.kill()


def test_oversized_message_is_rejected(tmp_path: Path) -> None:
    proc = start_service("profile", tmp_path, env={"MERCATO_PROFILE_MAX_MESSAGE_BYTES": "2048"})
    try:
        with pytest.raises(grpc.RpcError) as err:
            _echo(proc, payload=b"x" * 10_000)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _echo(proc, payload=b"small").payload == b"small"
    finally:
        proc.kill()


def test_second_server_on_same_port_fails(tmp_path: Path) -> None:
    first = start_service("ranking", tmp_path)
    try:
        second = start_service("ranking", tmp_path / "b", port=first.port, wait=None)
        assert second.process.wait(60) != 0
        assert first.health() == "SERVING"
    finally:
        first.kill()


def test_connections_are_recycled_after_max_age(tmp_path: Path) -> None:
    """Servers send GOAWAY after the max connection age, so a client behind a Service
    reconnects (and can land on a new replica); calls keep succeeding throughout."""
    proc = start_service(
        "ranking", tmp_path, env={"MERCATO_RANKING_MAX_CONNECTION_AGE_SECONDS": "1"}
    )
    states: list[grpc.ChannelConnectivity] = []
    try:
        with proc.channel() as ch:
            ch.subscribe(states.append)
            stub = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch)
            deadline = time.monotonic() + 6
            calls = 0
            while time.monotonic() < deadline:
                stub.Echo(diagnostics_pb2.EchoRequest(payload=b"x"), timeout=5)
                calls += 1
                time.sleep(0.1)
            ch.unsubscribe(states.append)
        ready = [s for s in states if s == grpc.ChannelConnectivity.READY]
        assert calls > 20
        assert len(ready) >= 2, states  # connected more than once
    finally:
        proc.kill()
