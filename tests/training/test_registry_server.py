"""Train in one place, serve in another, sharing nothing but a real MLflow tracking server
(PostgreSQL backend, proxied artifacts), as the training Job and the serving pods do."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.models.registry import BUNDLE_ARTIFACT_PATH, download_bundle
from tests.mlflow_server import MlflowServer
from tests.procs import run_snippet
from training import registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_http_tracking_uri_puts_artifacts_behind_the_server(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The training pod: tracking URI from the environment (as in k8s), its own disk.
    train_home = tmp_path / "train-pod"
    monkeypatch.setenv("MERCATO_HOME", str(train_home))
    monkeypatch.setenv("MERCATO_MLFLOW_TRACKING_URI", server.url)
    monkeypatch.delenv("MERCATO_MLFLOW_ARTIFACT_ROOT", raising=False)
    client, uri = registry.client_for(None)
    exp_id = registry.ensure_experiment(client, "mercato-t-proxy", uri, None)
    assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:/")
    bundle = tmp_path / "bundle-src"
    bundle.mkdir()
    (bundle / "weights.bin").write_bytes(b"\x01\x02" * 1000)
    run_id = client.create_run(exp_id).info.run_id
    client.log_artifacts(run_id, str(bundle), BUNDLE_ARTIFACT_PATH)
    client.set_terminated(run_id)
    registry.register_bundle(client, run_id, model_name="mercato-t-proxy")

    # The training pod is gone (its emptyDir with it).
    shutil.rmtree(train_home, ignore_errors=True)
    # The artifacts are on the server's side, written by the server.
    stored = list(server.artifacts.rglob("weights.bin"))
    assert len(stored) == 1, f"server artifact store has {stored}"

    # A serving pod elsewhere downloads the champion over HTTP only.
    monkeypatch.setenv("MERCATO_HOME", str(tmp_path / "serving-pod"))
    info, local = download_bundle(
        "mercato-t-proxy", "challenger", server.url, tmp_path / "serving-pod" / "dl"
    )
    assert info.version == "1"
    assert (local / "weights.bin").read_bytes() == b"\x01\x02" * 1000


def test_artifact_location_rules() -> None:
    assert (
        registry.artifact_location_for("https://mlflow.example:5000", None, "exp")
        == "mlflow-artifacts:/exp"
    )
    assert registry.artifact_location_for("http://mlflow:5000", "s3://b/x", "exp") == "s3://b/x"


def test_serving_resolves_and_downloads_over_rest_without_importing_mlflow(
    server: MlflowServer, tmp_path: Path
) -> None:
    """A model service following an MLflow server resolves aliases and downloads bundles
    over the REST API: in a fresh interpreter, after the watcher's own calls (resolve,
    download by run id, a nested folder, an unknown alias), ``mlflow`` was never
    imported, and the files are those training logged."""
    client, uri = registry.client_for(server.url)
    exp_id = registry.ensure_experiment(client, "mercato-t-rest", uri, None)
    bundle = tmp_path / "bundle-src"
    (bundle / "nested").mkdir(parents=True)
    (bundle / "config.json").write_text('{"a": 1}')
    (bundle / "nested" / "weights.npy").write_bytes(bytes(range(256)) * 400)
    run_id = client.create_run(exp_id).info.run_id
    client.log_artifacts(run_id, str(bundle), BUNDLE_ARTIFACT_PATH)
    client.set_terminated(run_id)
    registry.register_bundle(client, run_id, model_name="mercato-t-rest")
    code = f"""
import json, sys
from pathlib import Path
from services.models.registry import resolve_alias
from services.models.watcher import download_bundle_by_run
info = resolve_alias("mercato-t-rest", "challenger", {server.url!r})
_, local = download_bundle_by_run(info, {server.url!r}, Path({str(tmp_path / "dl")!r}))
try:
    resolve_alias("mercato-t-rest", "no-such-alias", {server.url!r})
    missing = "resolved"
except LookupError as e:
    missing = "LookupError"
print(json.dumps({{"version": info.version, "run_id": info.run_id, "local": str(local),
    "missing": missing, "mlflow": sorted(m for m in sys.modules if m.startswith("mlflow"))}}))
"""
    got = run_snippet(code)
    assert got["mlflow"] == []
    assert (got["version"], got["run_id"], got["missing"]) == ("1", run_id, "LookupError")
    local = Path(got["local"])
    assert (local / "config.json").read_text() == '{"a": 1}'
    assert (local / "nested" / "weights.npy").read_bytes() == bytes(range(256)) * 400
