"""Helpers for tests that run services as real processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def run_snippet(code: str, timeout: float = 120, env: Mapping[str, str] | None = None) -> Any:
    """Run ``code`` in a fresh interpreter with the repository on its path (and ``env``
    over this process's environment); the JSON its last printed line holds (what a test
    checks, sys.modules included)."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProc:
    """A service running as its own process."""

    name: str
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    credentials: grpc.ChannelCredentials | None = None  # TLS services: how to reach them

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials)
        return grpc.insecure_channel(self.target)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str = "", timeout: float = 1.0) -> str:
        try:
            with self.channel() as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout
                )
                return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
        except grpc.RpcError as exc:
            return f"UNREACHABLE ({exc.code().name})"

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the Prometheus samples ``name`` (with these labels) it exports now."""
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ).read()
        total = 0.0
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def wait_status(self, want: str = "SERVING", timeout: float = 60.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            status = self.health(service)
            if status == want:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} is {status}, not {want}:\n{self.log()[-4000:]}")

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_service(
    name: str,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    wait: str | None = "SERVING",
    timeout: float = 60.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServiceProc:
    """Start ``python -m services.<name>`` on free ports with its state under ``tmp_path``."""
    port = port or free_port()
    metrics_port = free_port()
    prefix = f"MERCATO_{name.upper()}_"
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MERCATO_HOME": str(tmp_path / "home"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        prefix + "PORT": str(port),
        prefix + "METRICS_PORT": str(metrics_port),
        prefix + "LOG_LEVEL": "INFO",
        **(env or {}),
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / f"{name}-{port}.log"
    with open(log_path, "ab") as log:
        # MERCATO_BENCH_CPROFILE_DIR (benchmarks only): each service runs under cProfile
        # and writes <dir>/<name>-<port>.prof when it exits (graceful stop).
        prof_dir = full_env.get("MERCATO_BENCH_CPROFILE_DIR")
        prof = ["-m", "cProfile", "-o", f"{prof_dir}/{name}-{port}.prof"] if prof_dir else []
        proc = subprocess.Popen(
            [sys.executable, *prof, "-m", f"services.{name}"],
            env=full_env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    svc = ServiceProc(name, port, metrics_port, proc, log_path, credentials)
    if wait:
        try:
            svc.wait_status(wait, timeout)
        except Exception:
            svc.kill()
            raise
    return svc
