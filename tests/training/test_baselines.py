"""Baselines, complements, k-core and metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from training.baselines import ALS, EASE, interactions
from training.complements import ComplementsConfig, basket_complements
from training.data import RetailData, k_core
from training.evaluate import metrics_from_ranking
from training.features import build_vocab


def test_ndcg_when_truth_exceeds_k_and_several_users() -> None:
    # user 0: truth {0,1,2} (more than K=2), ranking [0, 5, 1]: hit at 1 only in top 2.
    # user 1: truth {4}, ranking [3, 4, 0]: hit at rank 2.
    ranked = np.array([[0, 5, 1], [3, 4, 0]])
    truth = sp.csr_matrix(
        (np.ones(4, dtype=np.float32), ([0, 0, 0, 1], [0, 1, 2, 4])), shape=(2, 6)
    )
    m = metrics_from_ranking(ranked, truth, ks=(2, 3))
    # IDCG@2 with three truth items counts two ideal hits.
    assert m["ndcg@2"][0] == pytest.approx(1.0 / (1.0 + 1 / math.log2(3)))
    assert m["recall@2"][0] == pytest.approx(1 / 3)
    assert m["recall@3"][0] == pytest.approx(2 / 3)
    assert m["ndcg@3"][0] == pytest.approx(
        (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    )
    assert m["ndcg@2"][1] == pytest.approx(1 / math.log2(3))
    assert m["hit@2"].tolist() == [1.0, 1.0]


def test_ease_matches_the_closed_form_by_hand() -> None:
    x = sp.csr_matrix(
        np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 1]]),
        dtype=np.float32,
    )
    lam = 2.0
    ease = EASE(lam).fit(x * 3)  # EASE uses the binary matrix
    xd = x.toarray().astype(np.float64)
    p = np.linalg.inv(xd.T @ xd + lam * np.eye(4))
    b = np.eye(4) - p / np.diag(p)  # Steck 2019, eq. 8
    np.testing.assert_allclose(np.diag(ease.B), 0.0, atol=1e-7)
    np.testing.assert_allclose(ease.B, b, atol=1e-5)
    scores = ease.scorer(x)(np.array([0, 3]))
    np.testing.assert_allclose(scores, xd[[0, 3]] @ b, atol=1e-5)


def test_als_recovers_block_structure_and_uses_history_rows() -> None:
    # Two groups of users liking two disjoint groups of items.
    rng = np.random.default_rng(0)
    rows, cols = [], []
    for u in range(40):
        group = u % 2
        for i in rng.choice(10, size=6, replace=False):
            rows.append(u)
            cols.append(group * 10 + i)
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(40, 20))
    als = ALS(factors=4, regularization=0.1, alpha=5.0, iterations=10).fit(x)
    hist = sp.csr_matrix(
        (np.ones(2, np.float32), ([0, 1], [3, 15])), shape=(2, 20)
    )  # one item of group 0, one of group 1
    s = als.scorer(hist)(np.array([0, 1]))
    assert s[0, :10].mean() > s[0, 10:].mean()
    assert s[1, 10:].mean() > s[1, :10].mean()


def _toy() -> RetailData:
    ev = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "b", "c", "c", "c", "d"],
            "item_id": ["x", "y", "z", "x", "y", "x", "y", "z", "x"],
            "event": ["purchase"] * 8 + ["view"],
            "session_id": [1, 1, 2, 3, 3, 4, 4, 4, 5],
            "ts": [1, 1, 2, 3, 3, 4, 4, 4, 5],
        }
    )
    return RetailData("toy", ev, pd.DataFrame({"item_id": ["x", "y", "z", "w"]}), None)  # type: ignore[arg-type]


def test_interactions_are_event_weighted_counts() -> None:
    d = _toy()
    v = build_vocab(d)
    m = interactions(d.events, v).toarray()
    a, x, w = v.user_codes.get_loc("a"), v.item_row["x"], v.item_row["w"]
    assert m[a, x] == 4.0 and m[v.user_codes.get_loc("d"), x] == 1.0 and m[:, w].sum() == 0
    sub = interactions(d.events, v, np.array([v.user_codes.get_loc("d")]))
    assert sub.shape == (1, 4) and sub.sum() == 1.0


def test_basket_complements_lift_by_hand() -> None:
    d = _toy()
    # Baskets (purchases per session): {x,y}, {z}, {x,y}, {x,y,z}: N = 4.
    # n_x = n_y = 3, n_z = 2, n_xy = 3, n_xz = n_yz = 1.
    pairs = basket_complements(d.events, ("purchase",), ComplementsConfig(min_count=1, shrink=1))
    lift_xy = 3 * 4 / (3 * 3)
    lift_xz = 1 * 4 / (3 * 2)
    assert pairs["x"][0] == ("y", pytest.approx(lift_xy * 3 / 4))
    assert pairs["x"][1] == ("z", pytest.approx(lift_xz * 1 / 2))
    assert [i for i, _ in pairs["z"]] == ["x", "y"] or [i for i, _ in pairs["z"]] == ["y", "x"]
    strict = basket_complements(d.events, ("purchase",), ComplementsConfig(min_count=2, top_n=1))
    assert set(strict) == {"x", "y"} and strict["x"][0][0] == "y" and len(strict["x"]) == 1
    assert basket_complements(d.events, ("rating",)) == {}


def test_k_core_repeats_until_stable() -> None:
    d = _toy()
    # Items with >= 3 interactions: x (4), y (3), z (2 -> dropped); then users with
    # >= 2: a (x,y), b (x,y), c (x,y); d has one -> dropped; then x has 3, still fine.
    k = k_core(d, min_user=2, min_item=3)
    assert set(k.events["item_id"]) == {"x", "y"}
    assert set(k.events["user_id"]) == {"a", "b", "c"}
    assert set(k.items["item_id"]) == {"x", "y"}
