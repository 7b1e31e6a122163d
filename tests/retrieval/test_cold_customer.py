"""A customer without history (a new visitor) is served the two-tower's popularity prior:
the most popular items first, without ties, by a real model that kept its warm start."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.models.two_tower import UserQuery
from services.retrieval.model import RowFilter
from tests.retrieval.conftest import TINY
from training.index import IndexConfig
from training.pipeline import TrainConfig, load_data, make_split, train_and_register
from training.registry import client_for
from training.replay import load_for_replay
from training.two_tower import TwoTowerConfig

pytestmark = pytest.mark.slow  # trains a two-tower


def test_warm_start_only_model_serves_a_new_customer_the_most_popular_items(
    tmp_path: Path,
) -> None:
    # No fine-tuned epoch at all: the served model is the warm start (EASE projection,
    # context weights zero) with its popularity prior as the item bias.
    cfg = TrainConfig(
        synthetic=TINY,
        model=replace(TwoTowerConfig(), dim=16, epochs=0, progress=False),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        index=IndexConfig(recall_queries=50),
        evaluate_test=False,
        register=False,
        replay_served=False,
    )
    res = train_and_register(cfg)
    assert res.best_epoch == 0
    model = load_for_replay(res.bundle_dir)  # as the retrieval service loads a version
    st = model.state
    n = st.n_base
    q = model.encode_user(UserQuery([], [], [], surface="home"))
    assert np.allclose(q[:-1], 0.0)  # the start's context weights are zero
    got = model.search(st, q, n, RowFilter())
    # Popularity counted here from the training part: customers per item, the earlier
    # catalogue row first among equal counts; items without training events last.
    split = make_split(load_data(cfg), cfg)
    per_item = split.train.groupby("item_id")["user_id"].nunique()
    pop = np.zeros(n)
    for item_id, c in per_item.items():
        r = model.bundle.row_of(str(item_id))
        if r is not None:
            pop[r] = c
    trained = int((pop > 0).sum())
    assert trained > 100
    want = sorted(range(n), key=lambda r: (-pop[r], r))[:trained]
    assert got.rows[:trained].tolist() == want
    assert np.all(np.diff(got.scores[:trained]) < 0)  # no ties among trained items
    assert np.all(got.scores[trained:] < got.scores[trained - 1])
    # The choice is logged: alpha and the warm start's two validation numbers.
    report = json.loads((res.bundle_dir / "eval.json").read_text())
    ws = report["two_tower"]["warm_start"]
    alphas = sorted({t["prior_alpha"] for t in ws["tried"]} - {0.0})  # 0: the λ tries
    assert alphas == sorted(TwoTowerConfig().prior_alphas) and ws["prior_alpha"] in alphas
    client, _ = client_for(cfg.tracking_uri)
    run = client.get_run(res.run_id)
    assert float(run.data.params["warm_start.prior_alpha"]) == ws["prior_alpha"]
    m = run.data.metrics
    assert m["warm_valid_recall_20"] == pytest.approx(ws["valid_recall@20"])
    assert m["warm_valid_cold_recall_20"] == pytest.approx(ws["valid_cold_recall@20"])
    assert m["valid_cold_recall_20"] == pytest.approx(res.cold["valid"]["recall@20"])
    # A new visitor is better served than by ties: the masked validation customers'
    # recall is above the same model's with the prior off.
    off = train_and_register(
        replace(
            cfg,
            model=replace(cfg.model, prior_alphas=()),
            tracking_uri=f"sqlite:///{tmp_path / 'off.db'}",
        )
    )
    assert res.cold["valid"]["recall@20"] > off.cold["valid"]["recall@20"]
