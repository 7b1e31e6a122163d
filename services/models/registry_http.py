"""The two registry calls serving makes, over MLflow's REST API, without importing mlflow.

A model service only ever resolves an alias and downloads a version's bundle. With an
MLflow tracking server (``http://`` or ``https://`` tracking URI: production, where
"model artifacts travel through the registry's server") both are plain HTTP calls of
MLflow's public REST API, so the serving process does not import the ``mlflow`` package
(over 100 MB resident with its dependencies). Other tracking URIs (a local SQLite store)
go through the mlflow client as before (:mod:`services.models.registry`).

Endpoints used: ``GET /api/2.0/mlflow/registered-models/alias`` (the version an alias
points at), ``GET /api/2.0/mlflow/artifacts/list`` (a run's artifact tree) and
``GET /get-artifact`` (a file; the server reads it from its artifact store, proxied or
not). Credentials as the mlflow client reads them: ``MLFLOW_TRACKING_TOKEN`` (bearer) or
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (basic);
``MLFLOW_TRACKING_SERVER_CERT_PATH`` for a private CA.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

TIMEOUT_S = 30.0


def is_http(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def _headers() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    return {}


def _ssl_context() -> ssl.SSLContext | None:
    ca = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=ca) if ca else None


def _open(tracking_uri: str, path: str, params: dict[str, str]) -> Any:
    url = f"{tracking_uri.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    req = urllib.request.Request(url, headers=_headers())
    return urllib.request.urlopen(req, timeout=TIMEOUT_S, context=_ssl_context())


def _get_json(tracking_uri: str, path: str, params: dict[str, str]) -> dict[str, Any]:
    """A REST call's JSON answer; LookupError for what the server says does not exist
    or is not valid (4xx), other errors as they come (connection, 5xx)."""
    try:
        with _open(tracking_uri, path, params) as resp:
            data: dict[str, Any] = json.loads(resp.read() or b"{}")
            return data
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500:
            try:
                body = json.loads(e.read() or b"{}")
            except ValueError:
                body = {}
            msg = body.get("message") or body.get("error_code") or e.reason
            raise LookupError(f"{path}: HTTP {e.code}: {msg}") from e
        raise


def resolve_alias(model_name: str, alias: str, tracking_uri: str) -> dict[str, Any]:
    """The model version an alias points at (MLflow's ``ModelVersion`` JSON: ``name``,
    ``version``, ``run_id``, ``source``, ``tags`` as ``[{key, value}]``); LookupError
    when the model or the alias does not exist."""
    data = _get_json(
        tracking_uri,
        "/api/2.0/mlflow/registered-models/alias",
        {"name": model_name, "alias": alias},
    )
    mv = data.get("model_version")
    if not isinstance(mv, dict) or "version" not in mv:
        raise LookupError(f"model {model_name!r} has no alias {alias!r}")
    return mv


def _list(tracking_uri: str, run_id: str, path: str) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = []
    token = ""
    while True:
        params = {"run_id": run_id, "path": path}
        if token:
            params["page_token"] = token
        data = _get_json(tracking_uri, "/api/2.0/mlflow/artifacts/list", params)
        files += data.get("files", [])
        token = data.get("next_page_token", "")
        if not token:
            return files


def download_run_artifacts(tracking_uri: str, run_id: str, artifact_path: str, dst: Path) -> Path:
    """Download the artifact directory ``artifact_path`` of a run into ``dst`` (as
    ``dst/<artifact_path>``) file by file; returns that local directory. LookupError when
    the run has nothing there."""
    root = PurePosixPath(artifact_path)
    out = Path(dst) / root
    pending = [str(root)]
    found = 0
    while pending:
        for entry in _list(tracking_uri, run_id, pending.pop()):
            rel = PurePosixPath(entry["path"])
            if root not in rel.parents or ".." in rel.parts:
                raise LookupError(f"artifact listing of {root} names {rel}")
            if entry.get("is_dir"):
                pending.append(str(rel))
                continue
            target = Path(dst) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with (
                _open(tracking_uri, "/get-artifact", {"path": str(rel), "run_uuid": run_id}) as r,
                open(target, "wb") as f,
            ):
                shutil.copyfileobj(r, f, 1 << 20)
            size = entry.get("file_size")
            if size is not None and target.stat().st_size != int(size):
                raise OSError(f"{rel}: got {target.stat().st_size} bytes, listed {size}")
            found += 1
    if not found:
        raise LookupError(f"run {run_id} has no artifacts under {artifact_path!r}")
    return out
