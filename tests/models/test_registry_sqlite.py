"""The embedded registry read without mlflow (#14 item 6): on a real MLflow SQLite store
written by the mlflow client, the direct reader gives the same versions, runs, sources
and tags as the mlflow client, copies the same bundle files, and a fresh interpreter
that resolves and downloads never imports mlflow."""

from __future__ import annotations

import filecmp
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.models import registry, registry_sqlite
from tests.procs import run_snippet

pytestmark = pytest.mark.slow  # an MLflow SQLite store is created (migrations, seconds)

MODEL = "mercato-t-sqlite"


def _bundle(folder: Path, marker: str) -> Path:
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"marker": marker}))
    (folder / "nested" / "weights.npy").write_bytes(marker.encode() * 5000)
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A registry with three versions: v1 champion, v2 challenger and shadow, v3 deleted
    after holding an alias of its own; returns (tracking uri, run id by version)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from training import registry as training_registry

    tmp = tmp_path_factory.mktemp("mlflow-sqlite")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client, uri = training_registry.client_for(uri)
    exp = training_registry.ensure_experiment(client, "t-sqlite", uri, None)
    runs: dict[str, str] = {}
    for n in (1, 2, 3):
        run_id = client.create_run(exp).info.run_id
        client.log_artifacts(
            run_id, str(_bundle(tmp / f"src{n}", f"v{n}")), registry.BUNDLE_ARTIFACT_PATH
        )
        client.set_terminated(run_id)
        mv = training_registry.register_bundle(
            client, run_id, model_name=MODEL, alias=None, tags={"valid_recall_20": f"0.{n}"}
        )
        runs[str(mv.version)] = run_id
    client.set_registered_model_alias(MODEL, "champion", "1")
    client.set_registered_model_alias(MODEL, "challenger", "2")
    client.set_registered_model_alias(MODEL, "shadow", "2")
    client.set_registered_model_alias(MODEL, "gone", "3")
    client.delete_model_version(MODEL, "3")
    yield uri, runs


def _mlflow_view(uri: str, alias: str) -> tuple[str, str, str, dict[str, str]] | str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        mv = client.get_model_version_by_alias(MODEL, alias)
    except MlflowException:
        return "missing"
    return str(mv.version), mv.run_id or "", mv.source or "", dict(mv.tags)


@pytest.mark.parametrize("alias", ["champion", "challenger", "shadow", "gone", "nope"])
def test_aliases_read_as_the_mlflow_client_reads_them(
    store: tuple[str, dict[str, str]], alias: str
) -> None:
    uri, _ = store
    try:
        row = registry_sqlite.resolve_alias(MODEL, alias, uri)
        direct: tuple[str, str, str, dict[str, str]] | str = (
            row["version"],
            row["run_id"],
            row["source"],
            row["tags"],
        )
    except LookupError:
        direct = "missing"
    assert direct == _mlflow_view(uri, alias)
    with pytest.raises(LookupError):
        registry_sqlite.resolve_alias("no-such-model", alias, uri)


def test_bundle_copy_equals_the_mlflow_download(
    store: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    import mlflow.artifacts

    uri, runs = store
    for version, run_id in runs.items():
        mine = registry_sqlite.download_run_artifacts(
            uri, run_id, registry.BUNDLE_ARTIFACT_PATH, tmp_path / f"direct{version}"
        )
        theirs = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=registry.BUNDLE_ARTIFACT_PATH,
                dst_path=str(tmp_path / f"mlflow{version}"),
                tracking_uri=uri,
            )
        )
        compared = filecmp.dircmp(mine, theirs)
        assert not (compared.left_only or compared.right_only or compared.diff_files)
        assert filecmp.cmp(mine / "nested" / "weights.npy", theirs / "nested" / "weights.npy")
        assert json.loads((mine / "config.json").read_text()) == {"marker": f"v{version}"}
    with pytest.raises(LookupError):
        registry_sqlite.download_run_artifacts(uri, runs["1"], "no-such-dir", tmp_path / "x")
    with pytest.raises(LookupError):
        registry_sqlite.download_run_artifacts(uri, "0" * 32, "bundle", tmp_path / "y")


def test_what_the_reader_does_not_cover_goes_to_the_mlflow_client(
    store: tuple[str, dict[str, str]],
) -> None:
    uri, _ = store
    with pytest.raises(registry_sqlite.Unsupported):
        registry_sqlite.resolve_alias(MODEL, "latest", uri)
    # MLflow's reserved alias: the highest live version, through the client.
    assert registry.resolve_alias(MODEL, "latest", uri).version == "2"


def test_serving_resolves_and_downloads_without_importing_mlflow(
    store: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """What a model service does with the embedded default, in a fresh interpreter: the
    watcher's resolve and download by run, an unknown alias, and a database that does
    not exist yet (nothing trained): no mlflow module is ever imported."""
    uri, runs = store
    code = f"""
import json, sys
from pathlib import Path
from services.models.registry import resolve_alias
from services.models.watcher import download_bundle_by_run
info = resolve_alias({MODEL!r}, "champion", {uri!r})
_, local = download_bundle_by_run(info, {uri!r}, Path({str(tmp_path / "dl")!r}))
missing = []
nothing_yet = {"sqlite:///" + str(tmp_path / "none.db")!r}
for alias, where in (("nope", {uri!r}), ("champion", nothing_yet)):
    try:
        resolve_alias({MODEL!r}, alias, where)
    except LookupError:
        missing.append(alias)
print(json.dumps({{"version": info.version, "run_id": info.run_id, "local": str(local),
    "tags": info.tags, "missing": missing,
    "mlflow": sorted(m for m in sys.modules if m.startswith("mlflow"))}}))
"""
    got = run_snippet(code)
    assert got["mlflow"] == []
    assert (got["version"], got["run_id"]) == ("1", runs["1"])
    assert got["tags"]["valid_recall_20"] == "0.1"
    assert got["missing"] == ["nope", "champion"]
    assert not (tmp_path / "none.db").exists()  # not created by looking
    local = Path(got["local"])
    assert json.loads((local / "config.json").read_text()) == {"marker": "v1"}
    assert (local / "nested" / "weights.npy").read_bytes() == b"v1" * 5000
