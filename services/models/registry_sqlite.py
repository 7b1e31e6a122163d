"""The two registry calls serving makes, read from MLflow's SQLite store without
importing mlflow.

With the embedded default (a ``sqlite:///`` tracking URI: ``make demo``, one machine) a
model service used to import the ``mlflow`` client only to resolve an alias and copy a
bundle from the local artifact store; that import alone holds about 130 MB resident in
each of retrieval and ranking (#14, item 6). Both calls are two small read-only queries
and a file copy, so they are made here with :mod:`sqlite3`:

- the alias: ``registered_model_aliases`` joined to ``model_versions`` (not internally
  deleted) and its ``model_version_tags``, in MLflow's single-tenant workspace
  (``default``), as ``SqlAlchemyStore.get_model_version_by_alias`` reads them;
- the bundle: the run's ``artifact_uri`` (``runs``), when it is a local directory, copied
  file by file.

Anything this reader does not cover raises :class:`Unsupported` and the caller uses the
mlflow client as before: a schema it does not know (another MLflow version), an artifact
store that is not a local directory, MLflow's reserved ``latest`` alias, or a workspace
named in ``MLFLOW_WORKSPACE``. ``tests/models/test_registry_sqlite.py`` checks the answers
against the mlflow client on a real registry.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

WORKSPACE = "default"  # MLflow's single-tenant workspace
DELETED = "Deleted_Internal"  # MLflow's stage of a deleted version (row kept)


class Unsupported(Exception):
    """This registry cannot be read directly; use the mlflow client."""


def is_sqlite(tracking_uri: str) -> bool:
    return tracking_uri.startswith("sqlite:///")


def db_path(tracking_uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs`` is absolute, as
    SQLAlchemy reads it)."""
    return Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])


def _connect(tracking_uri: str) -> sqlite3.Connection:
    path = db_path(tracking_uri)
    if not path.is_file():
        for parent in path.absolute().parents:  # a path that can never hold the file
            if parent.exists() and not parent.is_dir():
                raise FileExistsError(f"{parent} is not a directory: no MLflow database at {path}")
        # nothing registered yet (the mlflow client would create an empty store)
        raise LookupError(f"no MLflow database at {path} yet")
    return sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, timeout=30)


def resolve_alias(model_name: str, alias: str, tracking_uri: str) -> dict[str, Any]:
    """The version an alias points at: ``version``, ``run_id``, ``source``, ``tags``;
    LookupError when the model has no such alias."""
    if alias.lower() == "latest" or os.environ.get("MLFLOW_WORKSPACE"):
        raise Unsupported(f"alias {alias!r} or a workspace needs the mlflow client")
    conn = _connect(tracking_uri)
    try:
        row = conn.execute(
            "SELECT v.version, v.run_id, v.source FROM registered_model_aliases a "
            "JOIN model_versions v ON v.workspace = a.workspace AND v.name = a.name "
            "AND v.version = a.version "
            "WHERE a.workspace = ? AND a.name = ? AND a.alias = ? AND v.current_stage != ?",
            (WORKSPACE, model_name, alias, DELETED),
        ).fetchone()
        if row is None:
            raise LookupError(f"model {model_name!r} has no alias {alias!r}")
        version, run_id, source = row
        tags = dict(
            conn.execute(
                "SELECT key, value FROM model_version_tags "
                "WHERE workspace = ? AND name = ? AND version = ?",
                (WORKSPACE, model_name, version),
            ).fetchall()
        )
    except sqlite3.Error as exc:  # a schema this reader does not know, a locked file
        raise Unsupported(f"MLflow database not readable directly: {exc}") from exc
    finally:
        conn.close()
    return {
        "version": str(version),
        "run_id": run_id or "",
        "source": source or "",
        "tags": {str(k): "" if v is None else str(v) for k, v in tags.items()},
    }


def _artifact_dir(tracking_uri: str, run_id: str) -> Path:
    conn = _connect(tracking_uri)
    try:
        row = conn.execute("SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    except sqlite3.Error as exc:
        raise Unsupported(f"MLflow database not readable directly: {exc}") from exc
    finally:
        conn.close()
    if row is None or not row[0]:
        raise LookupError(f"run {run_id} is not in the MLflow database")
    uri = str(row[0])
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return Path(urllib.parse.unquote(parts.path))
    if parts.scheme == "" or (len(parts.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    raise Unsupported(f"artifact store {parts.scheme}:// needs the mlflow client")


def download_run_artifacts(tracking_uri: str, run_id: str, artifact_path: str, dst: Path) -> Path:
    """Copy the artifact directory ``artifact_path`` of a run into ``dst`` (as
    ``dst/<artifact_path>``); returns that directory. LookupError when the run has
    nothing there."""
    root = _artifact_dir(tracking_uri, run_id)
    rel = Path(artifact_path)
    if rel.is_absolute() or ".." in rel.parts:
        raise LookupError(f"artifact path {artifact_path!r} is not inside the run")
    src = root / rel
    if not src.is_dir() or not any(p.is_file() for p in src.rglob("*")):
        raise LookupError(f"run {run_id} has no artifacts under {artifact_path!r}")
    out = Path(dst) / rel
    shutil.copytree(src, out, dirs_exist_ok=True)
    return out
