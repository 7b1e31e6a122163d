"""Local process supervisor: runs the four services as separate OS processes.

Each service starts as a fresh interpreter (``python -m services.<name>``), never a fork
of this process, so no thread pool of torch or FAISS is inherited. The supervisor waits
until every service reports SERVING over gRPC health, prints where they listen, and on
Ctrl-C, SIGTERM or ``mercato down`` stops them with SIGTERM (they drain in-flight calls)
and SIGKILL only after a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.settings import DEFAULT_PORTS, mercato_home

SERVICES = ("profile", "retrieval", "ranking", "gateway")
# Services that run but are not ready (NOT_SERVING) until a model is registered and
# promoted; they count as started when their liveness health name is SERVING.
WAITS_FOR_MODEL = frozenset({"retrieval"})
NO_MODEL_STATUS = "NOT_SERVING (no model yet: mercato train retrieval && mercato promote)"
LIVENESS = "liveness"


def ports_from_env(env: Mapping[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """Service ports, overridden by ``MERCATO_<SERVICE>_PORT`` / ``_METRICS_PORT``."""
    env = os.environ if env is None else env
    ports: dict[str, tuple[int, int]] = {}
    for name, (port, metrics) in DEFAULT_PORTS.items():
        prefix = f"MERCATO_{name.upper()}_"
        ports[name] = (
            int(env.get(prefix + "PORT") or port),
            int(env.get(prefix + "METRICS_PORT") or metrics),
        )
    return ports


@dataclass
class ServiceProcess:
    """A started service process and where it listens."""

    name: str
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    status: str = "STARTING"


@dataclass
class Supervisor:
    """Starts, watches and stops a set of service processes."""

    services: Iterable[str] = SERVICES
    host: str = "127.0.0.1"
    ports: Mapping[str, tuple[int, int]] = field(default_factory=ports_from_env)
    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    processes: list[ServiceProcess] = field(default_factory=list)

    def start(self) -> list[ServiceProcess]:
        """Start every service process (does not wait for health)."""
        for name in self.services:
            port, metrics_port = self.ports[name]
            prefix = f"MERCATO_{name.upper()}_"
            env = {
                **os.environ,
                **self.env,
                prefix + "HOST": self.host,
                prefix + "PORT": str(port),
                prefix + "METRICS_PORT": str(metrics_port),
            }
            for other, (other_port, _) in self.ports.items():
                env.setdefault(
                    f"MERCATO_GATEWAY_{other.upper()}_TARGET", f"{self.host}:{other_port}"
                )
            if "profile" in self.ports:  # ranking's item table follows the catalogue
                env.setdefault(
                    "MERCATO_RANKING_CATALOG_TARGET", f"{self.host}:{self.ports['profile'][0]}"
                )
            stdout: int | object = subprocess.DEVNULL
            log_path = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log_path = self.log_dir / f"{name}.log"
                stdout = open(log_path, "ab")  # noqa: SIM115 - owned by the child
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env=env,
                stdout=stdout,  # type: ignore[arg-type]
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops children
            )
            self.processes.append(ServiceProcess(name, port, metrics_port, proc, log_path))
        return self.processes

    def wait_healthy(self, timeout: float = 60.0) -> bool:
        """Wait until every service reports SERVING (or exits). True when all serve.

        A service of ``WAITS_FOR_MODEL`` that is alive but has no model yet counts as
        started: its status says so (it turns SERVING once a model is promoted)."""
        deadline = time.monotonic() + timeout
        pending = {p.name: p for p in self.processes}
        while pending and time.monotonic() < deadline:
            for name, proc in list(pending.items()):
                if proc.process.poll() is not None:
                    proc.status = f"EXITED ({proc.process.returncode})"
                    del pending[name]
                    continue
                target = f"{self.host}:{proc.port}"
                proc.status = health_status(target)
                if proc.status == "SERVING":
                    del pending[name]
                elif (
                    proc.status == "NOT_SERVING"
                    and name in WAITS_FOR_MODEL
                    and health_status(target, LIVENESS) == "SERVING"
                ):
                    proc.status = NO_MODEL_STATUS
                    del pending[name]
            if pending:
                time.sleep(0.2)
        return all(p.status in ("SERVING", NO_MODEL_STATUS) for p in self.processes)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process, then SIGKILL those still alive after ``timeout``."""
        for proc in self.processes:
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.process.wait(remaining)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()
            proc.status = "STOPPED"


def health_status(target: str, service: str = "", timeout: float = 1.0) -> str:
    """The gRPC health status of ``target`` as a string, or UNREACHABLE."""
    from services.common.channels import client_credentials
    from services.common.settings import ClientTlsSettings

    tls = ClientTlsSettings()  # MERCATO_CLIENT_TLS_*: the services run with TLS
    creds = client_credentials(tls)
    options = (
        [("grpc.ssl_target_name_override", tls.server_name_override)]
        if tls.server_name_override
        else []
    )
    try:
        with (
            grpc.insecure_channel(target)
            if creds is None
            else grpc.secure_channel(target, creds, options=options)
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    except grpc.RpcError:
        return "UNREACHABLE"


def pid_file() -> Path:
    """Where ``mercato up --detach`` records the service pids."""
    return mercato_home() / "run" / "services.json"


def write_pid_file(processes: Iterable[ServiceProcess]) -> Path:
    """Record running processes so ``mercato down`` can stop them."""
    path = pid_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({p.name: {"pid": p.process.pid, "port": p.port} for p in processes}, indent=2)
    )
    return path


def stop_from_pid_file(timeout: float = 15.0) -> list[str]:
    """Stop the processes recorded by ``mercato up --detach``; returns the stopped names."""
    path = pid_file()
    if not path.exists():
        return []
    entries = json.loads(path.read_text())
    stopped: list[str] = []
    for name, entry in entries.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry["pid"]), signal.SIGTERM)
            stopped.append(name)
    deadline = time.monotonic() + timeout
    for entry in entries.values():
        pid = int(entry["pid"])
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True
