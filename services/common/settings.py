"""Settings shared by every service, read from environment variables.

Each service subclasses :class:`ServiceSettings` with its own ``env_prefix`` (for example
``MERCATO_PROFILE_``), so ``MERCATO_PROFILE_PORT=6000`` sets the profile service's port.
Settings that all services share (the data home, the MLflow tracking URI) are read
without the service prefix, from ``MERCATO_HOME`` and ``MERCATO_MLFLOW_TRACKING_URI``.
Defaults work on one machine with no configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Default ports of the four services (gRPC) and their Prometheus endpoints (HTTP).
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "gateway": (50051, 9101),
    "profile": (50052, 9102),
    "retrieval": (50053, 9103),
    "ranking": (50054, 9104),
}


def mercato_home() -> Path:
    """Folder for local state: SQLite stores, the MLflow store, run files."""
    return Path(os.environ.get("MERCATO_HOME", ".mercato")).resolve()


def default_tracking_uri() -> str:
    """MLflow tracking URI: ``MERCATO_MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_URI``, or a
    local SQLite store under the data home."""
    uri = os.environ.get("MERCATO_MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{mercato_home() / 'mlflow.db'}"


def default_artifact_root() -> str:
    """Artifact location for new MLflow experiments in the embedded default."""
    return os.environ.get("MERCATO_MLFLOW_ARTIFACT_ROOT", (mercato_home() / "mlartifacts").as_uri())


class ServiceSettings(BaseSettings):
    """Runtime settings every service has. Subclasses set ``env_prefix``."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind the gRPC server to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 = the service default).")
    metrics_port: int = Field(
        -1, ge=-1, le=65535, description="Prometheus HTTP port (-1 = default, 0 = disabled)."
    )
    metrics_host: str = Field("127.0.0.1", description="Interface of the metrics endpoint.")
    log_level: str = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="Structured JSON logs (false = plain text).")
    threads: int = Field(1, ge=1, le=256, description="Threads for torch/FAISS/BLAS.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent."
    )
    max_concurrent_rpcs: int = Field(
        1000, ge=1, description="In-flight calls before new ones get RESOURCE_EXHAUSTED."
    )
    server_mode: str = Field(
        "asyncio",
        pattern="^(asyncio|sync)$",
        description="gRPC server: 'asyncio' (grpc.aio) or 'sync' (grpc.server with a thread "
        "pool of server_threads; handlers with a synchronous twin run on the pool threads, "
        "the others on the service's event loop).",
    )
    server_threads: int = Field(
        8, ge=1, le=256, description="Threads of the synchronous server (server_mode=sync)."
    )
    switch_interval_ms: float = Field(
        0,
        ge=0,
        le=100,
        description="Python's thread switch interval (sys.setswitchinterval), in ms; "
        "0 = Python's default (5 ms). A thread waiting for the GIL waits up to this long "
        "for a busy one (server_mode=sync: the polling thread, the pool and the event loop).",
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish."
    )
    max_connection_age_seconds: float = Field(
        300.0,
        ge=0,
        description="Close client connections after this age (with a grace period) so that "
        "clients reconnect and spread over new replicas; 0 = never.",
    )
    tls_cert_file: str = Field("", description="Server certificate (PEM); empty = plaintext.")
    tls_key_file: str = Field("", description="Server private key (PEM).")
    tls_client_ca_file: str = Field(
        "", description="CA (PEM) that client certificates must chain to; set = mTLS required."
    )

    def resolved_port(self, service: str) -> int:
        """The gRPC port, the service default when 0."""
        return self.port or DEFAULT_PORTS[service][0]

    def resolved_metrics_port(self, service: str) -> int:
        """The metrics port, the service default when -1 (0 disables metrics)."""
        return DEFAULT_PORTS[service][1] if self.metrics_port == -1 else self.metrics_port


class ClientTlsSettings(BaseSettings):
    """How a service calls other services: TLS roots and an optional client certificate.

    Read from ``MERCATO_CLIENT_TLS_*``: ``CA_FILE`` turns TLS on; ``CERT_FILE`` and
    ``KEY_FILE`` present a client certificate (mTLS).
    """

    model_config = SettingsConfigDict(env_prefix="MERCATO_CLIENT_TLS_", extra="ignore")

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name_override: str = ""
