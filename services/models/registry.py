"""Resolve a registered model alias in MLflow and download its serving bundle.

``mlflow`` is imported inside the functions so that importing ``services.models`` stays
cheap for code that only loads bundles from disk. With an MLflow server (``http(s)://``
tracking URI) it is not imported at all: both calls go over the REST API
(:mod:`services.models.registry_http`), so a model-serving process holds neither torch
nor mlflow. With the embedded SQLite store (``sqlite:///``) both are read from the
database file and the local artifact directory (:mod:`services.models.registry_sqlite`),
falling back to the mlflow client for what that reader does not cover.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from services.models import registry_http, registry_sqlite

log = logging.getLogger("mercato.models.registry")

BUNDLE_ARTIFACT_PATH = "bundle"


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered model version reached through an alias."""

    name: str
    version: str
    run_id: str
    alias: str
    source: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def resolve_alias(model_name: str, alias: str, tracking_uri: str) -> ModelVersionInfo:
    """The version an alias points at; raises LookupError when the alias does not exist."""
    if registry_http.is_http(tracking_uri):
        rest = registry_http.resolve_alias(model_name, alias, tracking_uri)
        return ModelVersionInfo(
            name=str(rest.get("name", model_name)),
            version=str(rest["version"]),
            run_id=str(rest.get("run_id") or ""),
            alias=alias,
            source=str(rest.get("source") or ""),
            tags={str(t["key"]): str(t.get("value", "")) for t in rest.get("tags", [])},
        )
    if registry_sqlite.is_sqlite(tracking_uri):
        try:
            row = registry_sqlite.resolve_alias(model_name, alias, tracking_uri)
            return ModelVersionInfo(name=model_name, alias=alias, **row)
        except registry_sqlite.Unsupported as exc:
            log.info("registry read with the mlflow client", extra={"reason": str(exc)})
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        raise LookupError(f"model {model_name!r} has no alias {alias!r}: {e.message}") from e
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id or "",
        alias=alias,
        source=mv.source or "",
        tags=dict(mv.tags or {}),
    )


def download_bundle(
    model_name: str, alias: str, tracking_uri: str, dst: Path
) -> tuple[ModelVersionInfo, Path]:
    """Resolve ``alias`` and download the version's bundle directory under ``dst``.

    Returns the version info and the local bundle directory (``dst/bundle``), ready for
    ``TwoTowerBundle.load``. Raises LookupError for an unknown model or alias.
    """
    info = resolve_alias(model_name, alias, tracking_uri)
    return info, download_run_bundle(info, tracking_uri, dst)


def download_run_bundle(info: ModelVersionInfo, tracking_uri: str, dst: Path) -> Path:
    """Download the bundle artifact of exactly ``info``'s run into ``dst``; returns the
    local bundle directory. Over REST for an MLflow server, else with the mlflow client."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    artifact_path = info.tags.get("bundle_artifact_path", BUNDLE_ARTIFACT_PATH)
    if registry_http.is_http(tracking_uri):
        return registry_http.download_run_artifacts(tracking_uri, info.run_id, artifact_path, dst)
    if registry_sqlite.is_sqlite(tracking_uri):
        try:
            return registry_sqlite.download_run_artifacts(
                tracking_uri, info.run_id, artifact_path, dst
            )
        except registry_sqlite.Unsupported as exc:
            log.info("registry read with the mlflow client", extra={"reason": str(exc)})
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        run_id=info.run_id,
        artifact_path=artifact_path,
        dst_path=str(dst),
        tracking_uri=tracking_uri,
    )
    return Path(local)
