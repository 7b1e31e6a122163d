"""A real ``mlflow server`` for tests: PostgreSQL backend store in a database of its own
(created here, dropped at stop), artifacts proxied by the server (``--serve-artifacts``)
into a folder only the server writes, on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import free_port

PG_DSN = os.environ.get("MERCATO_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
# SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; MLflow here uses psycopg2.
SA_SCHEME = "postgresql+psycopg2://"


def _admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(f"{PG_DSN}/postgres")  # the admin database
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@dataclass
class PostgresDb:
    """A uniquely named database on the machine's PostgreSQL, dropped by :meth:`drop`."""

    name: str = field(default_factory=lambda: f"mercato_t_{uuid.uuid4().hex[:12]}")

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the database (what ``mlflow server`` takes)."""
        return f"{PG_DSN.replace('postgresql://', SA_SCHEME, 1)}/{self.name}"

    def create(self) -> PostgresDb:
        _admin(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        _admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def mlflow_bin() -> str:
    return str(Path(sys.executable).with_name("mlflow"))


@dataclass
class MlflowServer:
    """``mlflow db upgrade`` then ``mlflow server`` on PostgreSQL with proxied artifacts."""

    workdir: Path
    port: int = field(default_factory=free_port)
    db: PostgresDb = field(default_factory=PostgresDb)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.workdir / "artifacts"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db.create()
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> MlflowServer:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        log_path = self.workdir / "mlflow.log"
        subprocess.run(
            [mlflow_bin(), "db", "upgrade", self.db.uri],
            check=True,
            env=env,
            stdout=open(log_path, "ab"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        self.process = subprocess.Popen(
            [
                mlflow_bin(),
                "server",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--workers=1",
                f"--backend-store-uri={self.db.uri}",
                "--serve-artifacts",
                f"--artifacts-destination={self.artifacts}",
            ],
            env=env,
            cwd=self.workdir,
            stdout=open(log_path, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server not healthy: {log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            import signal

            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.db.drop()
