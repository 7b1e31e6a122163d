"""The shared runtime in-process: error mapping, auth hook, settings, thread limits."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from mercato.v1 import diagnostics_pb2, diagnostics_pb2_grpc
from services.common import errors
from services.common.server import BaseService, serve
from services.common.settings import ServiceSettings
from services.profile.settings import ProfileSettings
from tests.procs import REPO, free_port, run_snippet


class _BoomService(BaseService):
    """A service whose one extra method fails with an unexpected exception."""

    name = "profile"

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise RuntimeError("secret internal detail")

        async def not_found(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise errors.NotFound("customer c1 not found")

        handler = grpc.method_handlers_generic_handler(
            "test.Boom",
            {
                "Fail": grpc.unary_unary_rpc_method_handler(fail),
                "Missing": grpc.unary_unary_rpc_method_handler(not_found),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        return ["test.Boom"]


def _auth(method: str, metadata: Sequence[tuple[str, Any]]) -> str | None:
    keys = dict(metadata)
    if keys.get("x-api-key") != "good":
        raise errors.Unauthenticated("missing or invalid API key (metadata x-api-key)")
    return "tester"


async def run_with(service: BaseService, check: Any) -> None:
    """Serve ``service`` in-process on loopback while ``check(channel)`` runs."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(service, stop))
    try:
        target = f"127.0.0.1:{service.settings.port}"
        async with grpc.aio.insecure_channel(target) as ch:
            await asyncio.wait_for(ch.channel_ready(), 10)
            await check(ch)
    finally:
        stop.set()
        await task


# Both server modes (#14): the asyncio server and the synchronous one with a thread pool
# must behave the same through the runtime.
MODES = pytest.mark.parametrize("mode", ["asyncio", "sync"])


@MODES
async def test_unexpected_error_is_internal_without_stack_trace(mode: str) -> None:
    settings = ServiceSettings(port=free_port(), metrics_port=0, log_json=True, server_mode=mode)
    service = _BoomService(settings)

    async def check(ch: grpc.aio.Channel) -> None:
        fail = ch.unary_unary("/test.Boom/Fail")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fail(b"", metadata=(("x-request-id", "rid-9"),))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        details = err.value.details() or ""
        assert "rid-9" in details
        assert "secret" not in details and "Traceback" not in details

        missing = ch.unary_unary("/test.Boom/Missing")
        with pytest.raises(grpc.aio.AioRpcError) as err2:
            await missing(b"")
        assert err2.value.code() == grpc.StatusCode.NOT_FOUND
        assert err2.value.details() == "customer c1 not found"

    await run_with(service, check)


@MODES
async def test_authenticator_guards_api_but_not_health(mode: str) -> None:
    settings = ServiceSettings(port=free_port(), metrics_port=0, server_mode=mode)
    service = _BoomService(settings)
    service.authenticator = _auth

    async def check(ch: grpc.aio.Channel) -> None:
        echo = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).Echo
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo(diagnostics_pb2.EchoRequest(payload=b"x"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await echo(
            diagnostics_pb2.EchoRequest(payload=b"x"), metadata=(("x-api-key", "good"),)
        )
        assert ok.payload == b"x"
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    await run_with(service, check)


@MODES
async def test_one_wrapper_per_method_reads_each_calls_metadata(mode: str) -> None:
    """The wrapped handler is built once per method (#14) and reused, yet every call
    gets its own request id and its own authentication."""
    settings = ServiceSettings(port=free_port(), metrics_port=0, server_mode=mode)
    service = _BoomService(settings)
    service.authenticator = _auth

    async def check(ch: grpc.aio.Channel) -> None:
        echo = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).Echo
        for n in range(3):
            call = echo(
                diagnostics_pb2.EchoRequest(payload=b"x"),
                metadata=(("x-api-key", "good"), ("x-request-id", f"rid-{n}")),
            )
            assert (await call).request_id == f"rid-{n}"
            assert ("x-request-id", f"rid-{n}") in list(await call.initial_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await echo(diagnostics_pb2.EchoRequest(payload=b"x"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    from services.common import interceptors

    built: list[str] = []
    cls: Any = (
        interceptors.SyncRuntimeInterceptor if mode == "sync" else interceptors.RuntimeInterceptor
    )
    original = cls._wrap_unary

    def counting(self, behavior, method, infra):  # type: ignore[no-untyped-def]
        built.append(method)
        return original(self, behavior, method, infra)

    cls._wrap_unary = counting
    try:
        await run_with(service, check)
    finally:
        cls._wrap_unary = original
    assert built.count("/mercato.v1.DiagnosticsService/Echo") == 1


def test_settings_read_service_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERCATO_PROFILE_PORT", "6001")
    monkeypatch.setenv("MERCATO_PROFILE_THREADS", "2")
    monkeypatch.setenv("MERCATO_RANKING_PORT", "7001")  # another service's: ignored
    s = ProfileSettings()
    assert s.resolved_port("profile") == 6001
    assert s.threads == 2
    assert ProfileSettings(port=0).resolved_port("profile") == 50052
    # The server each service runs by default, as measured (#14): the profile service's
    # reads are cheaper on the synchronous server's pool threads; the others stay asyncio.
    assert ProfileSettings(port=0).server_mode == "sync"
    assert ServiceSettings(port=0).server_mode == "asyncio"
    monkeypatch.setenv("MERCATO_PROFILE_PORT", "not-a-port")
    with pytest.raises(ValueError):
        ProfileSettings()


def test_thread_limits_apply_to_torch_and_blas() -> None:
    code = (
        "from services.common.threads import configure_threads\n"
        "configure_threads(1)\n"
        "import os, torch, faiss, multiprocessing\n"
        "configure_threads(1)\n"
        "print(torch.get_num_threads(), faiss.omp_get_max_threads(),"
        " os.environ['OPENBLAS_NUM_THREADS'], multiprocessing.get_start_method())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == ["1", "1", "1", "spawn"]


def test_thread_limits_reach_blas_loaded_before_the_runtime() -> None:
    """What a service process does: its server module imports numpy (and FAISS) before
    the runtime calls configure_threads. The BLAS and OpenMP pools those imports started
    (two threads each here, whatever the machine) must end at the configured one: an
    idle OpenBLAS worker spins between calls (#14)."""
    code = (
        "import json\n"
        "import services.ranking.server, services.retrieval.server  # numpy, FAISS\n"
        "from threadpoolctl import threadpool_info\n"
        "before = sorted({(p['internal_api'], p['num_threads']) for p in threadpool_info()})\n"
        "from services.common.threads import configure_threads\n"
        "configure_threads(1)\n"
        "after = sorted({(p['internal_api'], p['num_threads']) for p in threadpool_info()})\n"
        "print(json.dumps([before, after]))\n"
    )
    before, after = run_snippet(
        code,
        env={
            "OPENBLAS_NUM_THREADS": "2",
            "OMP_NUM_THREADS": "2",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        },
    )
    assert ["openblas", 2] in before  # numpy's OpenBLAS started with two
    assert {api for api, _ in after} >= {"openblas", "openmp"}
    assert all(n == 1 for _, n in after), after


def test_generated_stubs_are_fresh() -> None:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_protos.sh")],
        cwd=REPO,
        env={"PYTHON": sys.executable, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
