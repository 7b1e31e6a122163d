"""A real MLflow store with a two-tower model trained once per session on tiny data."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pytest

from services.models.manifest import sha256_file
from training.index import IndexConfig
from training.pipeline import TrainConfig, train_and_register
from training.registry import client_for, ensure_experiment, promote, register_bundle
from training.synthetic import SyntheticConfig
from training.two_tower import TwoTowerConfig

MODEL = "mercato-two-tower"
TINY = SyntheticConfig(n_users=600, n_items=300, n_categories=12, days=40, seed=7)


@dataclass
class Store:
    """The session's MLflow store, its trained bundle and helpers to register variants."""

    uri: str
    root: Path
    bundle_dir: Path  # the trained version's bundle (local copy)
    version: str  # that version, champion and challenger of MODEL

    def register(self, bundle_dir: Path, model: str = MODEL, alias: str | None = None) -> str:
        """Log ``bundle_dir`` as a new run's bundle and register a version of ``model``."""
        client, _ = client_for(self.uri)
        exp = ensure_experiment(client, "retrieval-tests", self.uri, None)
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(bundle_dir), "bundle")
        client.set_terminated(run.info.run_id)
        return str(register_bundle(client, run.info.run_id, model, alias).version)

    def set_alias(self, alias: str, version: str, model: str = MODEL) -> None:
        client, _ = client_for(self.uri)
        client.set_registered_model_alias(model, alias, version)

    def variant(self, name: str, change: Callable[[Path], None]) -> Path:
        """A copy of the trained bundle changed by ``change``, manifest rewritten to match
        (so it passes the checksum check and reaches validation)."""
        d = self.root / "variants" / name / "bundle"
        shutil.copytree(self.bundle_dir, d)
        change(d)
        manifest = json.loads((d / "manifest.json").read_text())
        for f, meta in manifest["files"].items():
            if (d / f).is_file():
                meta["sha256"] = sha256_file(d / f)
                meta["bytes"] = (d / f).stat().st_size
        (d / "manifest.json").write_text(json.dumps(manifest))
        return d


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("retrieval-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # The documented defaults (averaged epochs): on this tiny run no averaged epoch beats
    # the warm start on validation, so the served model is the start, whose popularity
    # prior gives a customer without history an order of its own (the merge tests need
    # one; test_cold_customer checks it is popularity order).
    model = replace(TwoTowerConfig(), dim=16, epochs=2, batch_size=256, progress=False)
    res = train_and_register(
        TrainConfig(
            synthetic=TINY,
            model=model,
            tracking_uri=uri,
            index=IndexConfig(recall_queries=50),
            evaluate_test=False,
        )
    )
    assert res.version is not None
    promote(MODEL, tracking_uri=uri, force=True)
    bundle = root / "trained" / "bundle"
    shutil.copytree(res.bundle_dir, bundle)
    return Store(uri=uri, root=root, bundle_dir=bundle, version=res.version)


def brute_force(
    emb: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[list[int], np.ndarray]:
    """Exact top-k rows (and all scores) over the exported embeddings."""
    scores = emb @ q
    rows = np.arange(len(emb)) if allowed is None else np.flatnonzero(allowed)
    order = rows[np.argsort(-scores[rows], kind="stable")][:k]
    return order.tolist(), scores
