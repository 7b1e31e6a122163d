"""A Kubernetes overlay run as local processes: ``mercato cluster up --overlay prod``.

The overlay is rendered with kustomize (``kubectl kustomize``, as ``make k8s-validate``
does) and what it describes is started on loopback, from the rendered objects:

* each Deployment of the four services and MLflow: its container's command and args (the
  image's entrypoint is ``mercato``), and its environment (ConfigMaps, literal values,
  ``$(VAR)`` expansion, Secrets from a local table, ``resourceFieldRef`` as 1 CPU);
  init containers first (MLflow's ``mlflow db upgrade``);
* ``replicas`` processes of each stateless service (its HPA's minimum is not used: 2 by
  default), each on its own ports, with its own folders for the pod's ``emptyDir``
  volumes; ConfigMap volumes are written to files, the gateway's API-keys Secret gets a
  key generated here (:attr:`LocalCluster.api_key`);
* Service names in URIs become the replicas' loopback addresses: ``dns:///ranking:50054``
  becomes ``ipv4:127.0.0.1:P1,127.0.0.1:P2`` (the gateway's round_robin channel balances
  over them as over a headless Service's pod addresses), ``http://mlflow:5000`` the MLflow
  server's address;
* the StatefulSets are replaced by local servers: Redis by a ``redis-server`` on a free
  port (profiles and offer state, as in the cluster), PostgreSQL by a database of its own
  on the machine's PostgreSQL (created here, dropped at ``down``);
* the nightly retrain CronJob runs on demand (:meth:`LocalCluster.run_job`) as a process
  with its container's script and environment, talking to MLflow over HTTP only.

What a real cluster adds and this does not: NetworkPolicies (checked statically by
``make k8s-validate``), probes by a kubelet, scheduling, the Ingress.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
STATELESS = ("profile", "retrieval", "ranking", "gateway")
SERVICE_ORDER = ("profile", "retrieval", "ranking", "gateway")
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_overlay(overlay: Path, kubectl: str | None = None) -> list[Obj]:
    """``kubectl kustomize overlay`` (kubectl from $KUBECTL, the PATH or the venv)."""
    kubectl = (
        kubectl
        or os.environ.get("KUBECTL")
        or shutil.which("kubectl")
        or str(Path(sys.executable).with_name("kubectl"))
    )
    out = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _find(objs: list[Obj], kind: str, name: str) -> Obj:
    for o in objs:
        if o.get("kind") == kind and o["metadata"]["name"] == name:
            return o
    raise KeyError(f"{kind}/{name} is not in the overlay")


def _template(obj: Obj) -> Obj:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        return dict(spec["jobTemplate"]["spec"]["template"])
    return dict(spec["template"])


def _expand(text: str, env: Mapping[str, str]) -> str:
    return VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


@dataclass
class Replica:
    """One process of a workload."""

    service: str
    index: int
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class LocalCluster:
    """The processes of one rendered overlay; :meth:`up`, then :meth:`down`."""

    objs: list[Obj]
    workdir: Path
    replicas: int = 2
    pg_dsn: str = "postgresql://postgres@127.0.0.1:5432"
    redis_server: str = field(default_factory=lambda: shutil.which("redis-server") or "")
    api_key: str = field(default_factory=lambda: secrets.token_hex(16))
    procs: dict[str, list[Replica]] = field(default_factory=dict)
    redis: subprocess.Popen[bytes] | None = None
    redis_port: int = 0
    mlflow_port: int = 0
    db_name: str = field(default_factory=lambda: f"mercato_cluster_{uuid.uuid4().hex[:10]}")
    _db_created: bool = False

    # ---------------------------------------------------------------- addresses

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def secret(self, name: str, key: str) -> str:
        """The local value of a Secret key the manifests reference."""
        pg_user = re.sub(r"^postgresql://([^@:/]*).*$", r"\1", self.pg_dsn) or "postgres"
        table = {
            ("mercato-redis", "url"): self.redis_url,
            ("mercato-redis", "password"): "",
            ("mercato-postgres", "username"): pg_user,
            ("mercato-postgres", "password"): "",
        }
        if (name, key) not in table:
            raise KeyError(f"no local value for Secret {name} key {key}")
        return table[(name, key)]

    def _service_addresses(self) -> dict[tuple[str, int], list[str]]:
        """(Service name, port) -> local host:port of each replica behind it."""
        out: dict[tuple[str, int], list[str]] = {}
        for svc in (o for o in self.objs if o.get("kind") == "Service"):
            name = svc["metadata"]["name"]
            for p in svc["spec"].get("ports") or []:
                if name in self.procs:
                    grpc_port = p.get("name") != "metrics"
                    out[(name, int(p["port"]))] = [
                        f"127.0.0.1:{r.port if grpc_port else r.metrics_port}"
                        for r in self.procs[name]
                    ]
        if self.mlflow_port:
            out[("mlflow", 5000)] = [f"127.0.0.1:{self.mlflow_port}"]
        if self.redis_port:
            out[("redis", 6379)] = [f"127.0.0.1:{self.redis_port}"]
        return out

    def _rewrite(self, value: str) -> str:
        """Service names in a URI or target -> the local addresses of their replicas."""
        addresses = self._service_addresses()

        def sub(m: re.Match[str]) -> str:
            dns, host, port = m.group(1), m.group(2), int(m.group(4))
            found = addresses.get((host, port))
            if not found:
                return m.group(0)
            if dns:
                return "ipv4:" + ",".join(found)
            return found[0]

        return re.sub(
            r"(dns:///)?\b([a-z][a-z0-9-]*)(\.[a-z0-9.-]+)?:(\d+)\b",
            sub,
            value,
        )

    # ---------------------------------------------------------------- environment

    def container_env(
        self, container: Obj, mounts: Mapping[str, Path], extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The container's environment as the kubelet builds it, then localised."""
        configmaps = {o["metadata"]["name"]: o for o in self.objs if o.get("kind") == "ConfigMap"}
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            ref = source.get("configMapRef")
            if ref:
                data = configmaps[ref["name"]].get("data") or {}
                env.update({source.get("prefix", "") + k: str(v) for k, v in data.items()})
        for var in container.get("env") or []:
            value_from = var.get("valueFrom")
            if value_from is None:
                env[var["name"]] = _expand(str(var.get("value", "")), env)
            elif "secretKeyRef" in value_from:
                ref = value_from["secretKeyRef"]
                env[var["name"]] = self.secret(ref["name"], ref["key"])
            elif "configMapKeyRef" in value_from:
                ref = value_from["configMapKeyRef"]
                env[var["name"]] = str(configmaps[ref["name"]]["data"][ref["key"]])
            elif "resourceFieldRef" in value_from:
                env[var["name"]] = "1"  # one CPU each here
        # The in-cluster PostgreSQL is this machine's, in a database of its own.
        if "MLFLOW_DB_HOST" in env:
            host_port = self.pg_dsn.rpartition("@")[2]
            env["MLFLOW_DB_HOST"], _, port = host_port.partition(":")
            env["MLFLOW_DB_PORT"] = port or "5432"
            env["MLFLOW_DB_NAME"] = self.db_name
        for key, value in list(env.items()):
            value = self._rewrite(value)
            for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == mount or value.startswith(mount + "/"):
                    value = str(local) + value[len(mount) :]
                    break  # the longest mount only
            env[key] = value
        env.update(extra or {})
        return env

    def _mounts(self, template: Obj, container: Obj, home: Path) -> dict[str, Path]:
        """mountPath -> a local folder: emptyDir and claims empty, ConfigMaps and the
        API-keys Secret written out."""
        configmaps = {o["metadata"]["name"]: o for o in self.objs if o.get("kind") == "ConfigMap"}
        volumes = {v["name"]: v for v in template["spec"].get("volumes") or []}
        out: dict[str, Path] = {}
        for m in container.get("volumeMounts") or []:
            vol = volumes.get(m["name"], {})
            local = home / "volumes" / m["name"]
            if m["mountPath"] == "/dev/shm":
                continue
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                for k, v in (configmaps[vol["configMap"]["name"]].get("data") or {}).items():
                    (local / k).write_text(str(v))
            if "secret" in vol and vol["secret"]["secretName"] == "mercato-gateway-api-keys":
                digest = hashlib.sha256(self.api_key.encode()).hexdigest()
                (local / "api-keys").write_text(f"local-cluster sha256:{digest}\n")
            out[m["mountPath"]] = local
        return out

    def _command(
        self, container: Obj, env: Mapping[str, str], mounts: Mapping[str, Path]
    ) -> list[str]:
        bindir = Path(sys.executable).parent
        words = [str(w) for w in (container.get("command") or ["mercato"])]
        words += [str(w) for w in container.get("args") or []]
        out = []
        for w in words:
            w = self._rewrite(_expand(w, env))
            for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                flag, eq, value = w.partition("=")
                if eq and (value == mount or value.startswith(mount + "/")):
                    w = f"{flag}={local}{value[len(mount) :]}"
                    break  # the longest mount only
            out.append(w)
        if out[0] in ("mercato", "mlflow"):
            out[0] = str(bindir / out[0])
        return out

    def _spawn(
        self, name: str, index: int, argv: list[str], env: Mapping[str, str], cwd: Path
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.workdir / "logs" / f"{name}-{index}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HOME": str(cwd),
            **env,
        }
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                env=full_env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log_path

    # ---------------------------------------------------------------- lifecycle

    def _start_redis(self) -> None:
        self.redis_port = free_port()
        data = self.workdir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.redis, _ = self._spawn(
            "redis",
            0,
            [
                self.redis_server,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--protected-mode",
                "no",
                "--maxmemory",
                "256mb",
                "--maxmemory-policy",
                "noeviction",
            ],
            {},
            data,
        )
        _wait(lambda: _tcp_open(self.redis_port), 20, "redis-server")

    def _create_db(self) -> None:
        import psycopg2

        conn = psycopg2.connect(f"{self.pg_dsn}/postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.db_name}"')
            self._db_created = True
        finally:
            conn.close()

    def _drop_db(self) -> None:
        if not self._db_created:
            return
        import psycopg2

        conn = psycopg2.connect(f"{self.pg_dsn}/postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        finally:
            conn.close()

    def _start_mlflow(self) -> None:
        dep = _find(self.objs, "Deployment", "mlflow")
        template = _template(dep)
        home = self.workdir / "mlflow"
        self.mlflow_port = free_port()
        for c in template["spec"].get("initContainers") or []:
            mounts = self._mounts(template, c, home)
            env = self.container_env(c, mounts)
            argv = self._command(c, env, mounts)
            proc, log = self._spawn(f"mlflow-{c['name']}", 0, argv, env, home)
            if proc.wait(300) != 0:
                raise RuntimeError(
                    f"mlflow init container {c['name']} failed:\n{log.read_text()[-3000:]}"
                )
        c = template["spec"]["containers"][0]
        mounts = self._mounts(template, c, home)
        env = self.container_env(c, mounts)
        argv = [
            re.sub(
                r"^--host=.*",
                "--host=127.0.0.1",
                re.sub(r"^--port=.*", f"--port={self.mlflow_port}", a),
            )
            for a in self._command(c, env, mounts)
        ]
        proc, log = self._spawn("mlflow", 0, argv, env, home)
        self.procs["mlflow"] = [Replica("mlflow", 0, self.mlflow_port, 0, proc, log)]
        _wait(lambda: _http_ok(f"{self.mlflow_url}/health") or _died(proc, log), 180, "mlflow")

    def _start_service(self, name: str) -> None:
        dep = _find(self.objs, "Deployment", name)
        template = _template(dep)
        c = next(c for c in template["spec"]["containers"] if c["name"] == name)
        replicas = self.replicas if name in STATELESS else 1
        if dep["spec"].get("replicas") == 1:
            replicas = 1  # a single-writer workload (SQLite on a volume) stays single
        self.procs[name] = []
        for i in range(replicas):
            home = self.workdir / f"{name}-{i}"
            mounts = self._mounts(template, c, home)
            port, metrics = free_port(), free_port()
            prefix = f"MERCATO_{name.upper()}_"
            env = self.container_env(
                c,
                mounts,
                {
                    prefix + "HOST": "127.0.0.1",
                    prefix + "PORT": str(port),
                    prefix + "METRICS_HOST": "127.0.0.1",
                    prefix + "METRICS_PORT": str(metrics),
                },
            )
            argv = self._command(c, env, mounts)
            proc, log = self._spawn(name, i, argv, env, home)
            self.procs[name].append(Replica(name, i, port, metrics, proc, log))
        for r in self.procs[name]:
            _wait(
                lambda r=r: (
                    _health(r.target, "liveness") == "SERVING" or _died(r.process, r.log_path)
                ),
                120,
                f"{name}-{r.index}",
            )

    def up(self) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            self._create_db()
            self._start_mlflow()
            for name in SERVICE_ORDER:
                self._start_service(name)
        except BaseException:
            self.down()
            raise
        return self

    def job_command(
        self, cronjob: str = "mercato-nightly-retrain"
    ) -> tuple[list[str], dict[str, str], Path]:
        """argv, environment and working folder of a CronJob's container, localised."""
        obj = _find(self.objs, "CronJob", cronjob)
        template = _template(obj)
        c = template["spec"]["containers"][0]
        home = self.workdir / f"job-{cronjob}-{time.time_ns()}"
        mounts = self._mounts(template, c, home)
        env = self.container_env(c, mounts)
        return self._command(c, env, mounts), env, home

    def run_job(
        self,
        cronjob: str = "mercato-nightly-retrain",
        extra_env: Mapping[str, str] | None = None,
        timeout: float = 1800,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one Job of ``cronjob`` to completion, as its container would."""
        argv, env, home = self.job_command(cronjob)
        env.update(extra_env or {})
        proc, log = self._spawn(
            f"job-{cronjob}", len(list(self.workdir.glob("logs/job-*"))), argv, env, home
        )
        rc = proc.wait(timeout)
        return subprocess.CompletedProcess(argv, rc, log.read_bytes(), b"")

    def down(self) -> None:
        # The services first (all at once: each drains on SIGTERM), then MLflow, Redis.
        services = [r.process for n, rs in self.procs.items() if n != "mlflow" for r in rs]
        for proc in services:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in services:
            _stop(proc)
        for r in self.procs.get("mlflow", []):
            _stop(r.process)
        self.procs.clear()
        if self.redis is not None:
            _stop(self.redis)
            self.redis = None
        self._drop_db()
        self._db_created = False

    def describe(self) -> list[tuple[str, str, str, int]]:
        """(name, gRPC/HTTP address, metrics address, pid) of every process."""
        return [
            (
                f"{r.service}-{r.index}",
                r.target,
                f"127.0.0.1:{r.metrics_port}" if r.metrics_port else "",
                r.process.pid,
            )
            for replicas in self.procs.values()
            for r in replicas
        ]


# ------------------------------------------------------------------------ helpers


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _died(proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"{log.name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return False


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} not up after {timeout:g}s")


def _tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _health(target: str, service: str = "") -> str:
    from services.common.healthcheck import check

    return check(target, service, timeout=1.0)
