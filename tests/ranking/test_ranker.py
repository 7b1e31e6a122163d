"""The trained ranker: evaluation arithmetic, training -> MLflow -> registry, the bundle
without training code, and the ranking service serving it from the registry (real
process, real SQLite MLflow store): scores equal the exported model's, promotion moves
the default alias, a broken version is refused while the old one keeps serving, and the
business rules still hold."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

import training.ranker
from mercato.cli import app
from mercato.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from services.models.ranker import (
    FEATURES,
    N_FEATURES,
    CandidateDetails,
    ItemTable,
    NumpyRanker,
    RankerBundle,
    RankerBundleError,
    RankerNet,
    RankerQuery,
    build_features,
)
from tests.procs import ServiceProc, start_service
from training import registry
from training.baselines import BaselineConfig
from training.data import time_split, user_random_split
from training.evaluate import metrics_from_ranking
from training.pipeline import TrainConfig
from training.ranker import (
    RankerConfig,
    RankerResult,
    RankLists,
    cutoffs,
    graded_ndcg,
    rerank_metrics,
    train_and_register_ranker,
    train_ranker,
)
from training.synthetic import SyntheticConfig, generate
from training.two_tower import TwoTowerConfig

# Big enough that the trained ranker beats the retrieval order on validation (at 600
# customers it cannot, and an untrained ranker, which keeps the retrieval order, would
# score the same: the promotion gate would have nothing to refuse).
TINY = SyntheticConfig(n_users=2000, n_items=300, n_categories=12, days=60, seed=5)
NOW = 1_720_000_000.0

# ----------------------------------------------------------------------------- metrics


def test_rerank_metrics_match_a_hand_computed_example() -> None:
    # User 0: candidates [5, 7, 2, 9]; truth {7, 9, 11} (11 was not retrieved).
    # User 1: no truth -> not counted. User 2: one padded slot (-1) with the best score.
    rows = np.array([[5, 7, 2, 9], [1, 2, 3, 4], [3, -1, 8, 6]])
    retrieval = np.array([[4.0, 3.0, 2.0, 1.0], [4, 3, 2, 1], [3.0, 9.0, 2.0, 1.0]])
    ranker = np.array([[0.1, 0.9, 0.5, 0.2], [1, 2, 3, 4], [0.0, 9.0, 0.0, 1.0]])
    truth = sp.csr_matrix((3, 12), dtype=np.float32).tolil()
    for r, c in [(0, 7), (0, 9), (0, 11), (2, 6)]:
        truth[r, c] = 1.0
    truth = truth.tocsr()
    d = [1 / math.log2(r + 1) for r in range(1, 6)]  # discount of rank 1..5

    base = rerank_metrics(rows, retrieval, truth, ks=(2, 4))
    model = rerank_metrics(rows, ranker, truth, ks=(2, 4))
    assert base["users"] == model["users"] == 2
    # Retrieval order: user 0 hits at ranks 2 and 4; user 2 ([3, 8, 6]) at rank 3.
    u0_ndcg2 = d[1] / (d[0] + d[1])
    u0_ndcg4 = (d[1] + d[3]) / (d[0] + d[1] + d[2])
    assert base["ndcg@2"] == pytest.approx((u0_ndcg2 + 0.0) / 2)
    assert base["ndcg@4"] == pytest.approx((u0_ndcg4 + d[2] / d[0]) / 2)
    assert base["recall@2"] == pytest.approx((1 / 3 + 0) / 2)
    assert base["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    # Ranker order: user 0 [7, 2, 9, 5] hits at 1 and 3; user 2 [6, 3, 8] at 1
    # (the padded slot never ranks, whatever its score).
    assert model["ndcg@2"] == pytest.approx((d[0] / (d[0] + d[1]) + 1.0) / 2)
    assert model["ndcg@4"] == pytest.approx(((d[0] + d[2]) / (d[0] + d[1] + d[2]) + 1.0) / 2)
    assert model["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
    assert model["hit@2"] == pytest.approx(1.0)


def test_graded_ndcg_matches_a_hand_computed_example() -> None:
    labels = np.array([[0.0, 2.0, 1.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    scores = np.array([[3.0, 2.0, 1.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
    mask = np.array([[True, True, True, False], [True] * 4])  # the 4.0 is padding
    d = [1 / math.log2(r + 1) for r in range(1, 4)]
    # Order [0, 1, 2]: gains 0, 2 -> DCG@2 = 2 d2; ideal 2, 1 -> 2 + d2. List 2 skipped.
    assert graded_ndcg(labels, scores, mask, 2) == pytest.approx(2 * d[1] / (2 + d[1]))


def _random_lists(seed: int, users: int = 40, n: int = 12) -> RankLists:
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.permutation(60)[:n] for _ in range(users)])
    x = rng.normal(size=(users, n, N_FEATURES)).astype(np.float32)
    # The fused rank agrees with the retrieval score (column 0), as in served lists: the
    # untrained net ranks by it (RankerConfig.start_from), so its epoch 0 is the retrieval
    # order the tests compare with, whatever the feature count.
    order = np.argsort(np.argsort(-x[:, :, 0], axis=1, kind="stable"), axis=1)
    x[:, :, FEATURES.index("fused_log_rank")] = np.log1p(order)
    labels = (x[:, :, 4] > 0.8).astype(np.float32) * 2  # "popularity" predicts the label
    truth = sp.lil_matrix((users, 60), dtype=np.float32)
    for u in range(users):
        for j in np.flatnonzero(labels[u]):
            truth[u, rows[u, j]] = 1.0
    return RankLists(
        users=[str(u) for u in range(users)],
        rows=rows,
        retrieval=x[:, :, 0].astype(np.float64),
        x=x,
        labels=labels,
        truth=truth.tocsr(),
        mask=np.ones((users, n), dtype=bool),
    )


def test_rerank_metrics_edges_padding_item_zero_and_short_lists() -> None:
    empty = rerank_metrics(
        np.zeros((0, 3), dtype=np.int64), np.zeros((0, 3)), sp.csr_matrix((0, 5)), (2,)
    )
    assert empty == {"users": 0.0}
    # User 0: items 3 and 0 (row 0 is an item), padding (-1) in between with the top
    # score; truth {0, 1}. User 1: no truth, skipped. Lists of 3, K up to 5: padded.
    rows = np.array([[3, -1, 0], [2, 1, 4]])
    scores = np.array([[0.2, 9.0, 0.1], [0.3, 0.3, 0.1]])
    truth = sp.csr_matrix(np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32))
    got = rerank_metrics(rows, scores, truth, (2, 5))
    assert got["users"] == 1.0
    # ranked 3, 0, then padding: item 0 at rank 2; item 1 never (padding is no item)
    assert got["recall@2"] == pytest.approx(0.5) and got["recall@5"] == pytest.approx(0.5)
    ideal = 1.0 + 1.0 / math.log2(3)
    assert got["ndcg@2"] == pytest.approx((1.0 / math.log2(3)) / ideal)
    assert got["hit@2"] == 1.0
    one = rerank_metrics(rows[:1], scores[:1], truth[:1], (2, 5))
    assert one == pytest.approx(got)  # a single list is a list too
    nobody = rerank_metrics(rows[1:], scores[1:], truth[1:], (2,))
    assert nobody["users"] == 0.0 and nobody["ndcg@2"] == 0.0 and nobody["recall@2"] == 0.0


def test_graded_ndcg_ignores_padding_and_keeps_ties_in_list_order() -> None:
    # Padding (mask False) carries garbage labels and the highest scores: it must count
    # neither in the ranking nor in the ideal. Ties keep the list order (stable).
    labels = np.array([[3.0, 0.0, 1.0, 5.0], [0.0, 2.0, 0.0, 4.0]])
    mask = np.array([[True, True, True, False], [True, True, True, False]])
    scores = np.array([[0.5, 0.5, 0.9, 9.0], [0.1, 0.1, 0.1, 7.0]])
    d = [1.0, 1.0 / math.log2(3), 0.5]
    # row 0: order 2, 0, 1 -> gains 1, 3, 0; ideal 3, 1, 0
    row0 = (1 * d[0] + 3 * d[1]) / (3 * d[0] + 1 * d[1])
    # row 1: all tied -> order 0, 1, 2 -> gains 0, 2, 0; ideal 2, 0, 0
    row1 = (2 * d[1]) / (2 * d[0])
    got = graded_ndcg(labels, scores, mask, 3)
    assert got == pytest.approx((row0 + row1) / 2, rel=1e-12)
    # a list without a positive label is skipped, not counted as 0
    none = np.zeros((1, 4))
    both = graded_ndcg(
        np.vstack([labels, none]), np.vstack([scores, none]), np.vstack([mask, none > -1]), 3
    )
    assert both == pytest.approx(got, rel=1e-12)
    assert graded_ndcg(none, none, none > -1, 3) == 0.0


def test_graded_ndcg_short_lists_single_gain_and_ties_in_long_lists() -> None:
    # A list shorter than k: the padding filling the last places of the top k gains nothing.
    labels = np.array([[2.0, 0.0, 7.0]])
    mask = np.array([[True, True, False]])
    scores = np.array([[0.1, 0.9, 5.0]])
    assert graded_ndcg(labels, scores, mask, 3) == pytest.approx(1 / math.log2(3), rel=1e-12)
    # One relevant item of gain 1 ranked first: a perfect list (IDCG 1 still counts).
    one = np.array([[1.0, 0.0]])
    assert graded_ndcg(one, np.array([[0.9, 0.1]]), one > -1, 2) == 1.0
    # Ties in a long list (beyond numpy's small-array insertion sort) keep the list order.
    rng = np.random.default_rng(0)
    tied = np.round(rng.random((1, 40)) * 3)  # four score values, many ties
    gains = rng.integers(0, 3, (1, 40)).astype(np.float64)
    order = np.argsort(-tied[0], kind="stable")
    d = 1.0 / np.log2(np.arange(2, 42))
    want = (gains[0][order] * d).sum() / (np.sort(gains[0])[::-1] * d).sum()
    assert graded_ndcg(gains, tied, tied > -1, 40) == pytest.approx(want, rel=1e-12)
    # rerank_metrics too: ties keep the list order in a long list.
    rows = np.arange(40)[None, :]
    truth = sp.csr_matrix((np.ones(3), ([0, 0, 0], [5, 17, 33])), shape=(1, 40))
    ranked = rows[:, np.argsort(-tied[0], kind="stable")]
    expect = metrics_from_ranking(ranked, truth, (5, 20))
    got = rerank_metrics(rows, tied, truth, (5, 20))
    for name, v in expect.items():
        assert got[name] == pytest.approx(float(v[0]), rel=1e-12), name


@pytest.mark.slow
def test_cutoffs_are_evenly_spaced_in_the_validation_window() -> None:
    data = generate(replace(TINY, n_users=200, n_items=80))
    split = time_split(data)
    t1, t2 = float(split.params["t1"]), float(split.params["t2"])
    got = cutoffs(split, 3)
    assert got == pytest.approx([t1, t1 + (t2 - t1) / 3, t1 + 2 * (t2 - t1) / 3])
    assert cutoffs(split, 1) == [t1]
    other = user_random_split(data)
    assert len(cutoffs(other, 3)) == 1  # no time windows in a per-customer split


def test_training_is_deterministic_by_seed_and_learns_a_planted_signal() -> None:
    fit, valid = _random_lists(1), _random_lists(2)
    # Lists of every feature (FEATURES), so the network reads them all.
    cfg = RankerConfig(epochs=15, patience=15, progress=False, candidates=12, ks=(10,), features=())
    a, ha = train_ranker(fit, valid, cfg)
    b, hb = train_ranker(fit, valid, cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert [r["train_loss"] for r in ha.epochs] == [r["train_loss"] for r in hb.epochs]
    base = rerank_metrics(valid.rows, valid.retrieval, valid.truth, (10,))["ndcg@10"]
    assert ha.best_metric > base  # the feature that predicts the label was learned
    c, _ = train_ranker(fit, valid, replace(cfg, seed=1))
    assert not torch.equal(a.mlp[0].weight, c.mlp[0].weight)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[RankerResult, RankerConfig, Path]:
    tmp = tmp_path_factory.mktemp("ranker")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # A randomly initialised two-tower trained 2 epochs: a retrieval order the ranker can
    # improve on (the gate test needs a trained ranker better than an untrained one; with
    # the EASE warm start the tiny ranker no longer beats the retrieval order here).
    retrieval = TrainConfig(
        synthetic=TINY,
        # EASE only (item-to-item may reuse it); the ALS grid adds nothing here.
        baselines=BaselineConfig(models=("ease",), ease_lambdas=(250.0,)),
        model=replace(
            TwoTowerConfig(), dim=16, epochs=2, batch_size=256, progress=False, init="random"
        ),
        tracking_uri=uri,
    )
    # cart_lists: not the default, on here so the in-session lists are exercised.
    cfg = RankerConfig(
        retrieval=retrieval,
        tracking_uri=uri,
        epochs=8,
        patience=4,
        progress=False,
        seed=0,
        cart_lists=True,
    )
    return train_and_register_ranker(cfg), cfg, tmp


@pytest.mark.slow
def test_training_logs_per_epoch_metrics_curve_and_registers_a_challenger(trained) -> None:
    res, cfg, _ = trained
    client, _ = registry.client_for(cfg.tracking_uri)
    run = client.get_run(res.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "mercato-ranker"
    m = run.data.metrics
    for key in ("valid_ndcg_10", "test_ndcg_10", "test_retrieval_ndcg_10", "test_recall_10"):
        assert key in m and 0.0 <= m[key] <= 1.0
    assert m["test_ndcg_10"] == pytest.approx(res.metrics["test"]["ranker"]["ndcg@10"])
    curve = client.get_metric_history(res.run_id, "epoch_valid_ndcg_10")
    assert sorted(p.step for p in curve) == list(range(1, len(curve) + 1)) and len(curve) >= 1
    arts = {a.path for a in client.list_artifacts(res.run_id, "eval")}
    assert {"eval/curve.png", "eval/table.md", "eval/report.json"} <= arts
    assert "| test | ranker |" in res.table and "| test | change |" in res.table
    mv = client.get_model_version_by_alias("mercato-ranker", "challenger")
    assert str(mv.version) == res.version == "1"
    assert mv.tags["split_signature"] == res.split_signature
    # The ranker's split is the one `mercato train retrieval` uses with the same options.
    assert res.two_tower["source"] == "trained in this run"
    # The lists come from the served merge over several cut-offs (rolling windows), and
    # the served list is replayed with the ranker (validation: held-out customers).
    report = json.loads((res.bundle_dir / "eval.json").read_text())
    assert len(report["cutoffs"]) == cfg.windows == 3
    assert report["cutoffs"] == sorted(set(report["cutoffs"]))
    assert report["lists"]["fit"] > report["lists"]["valid"] > 0
    # In-session cart lists (the synthetic shop has add-to-cart events), fit and held out.
    assert report["lists"]["fit_cart"] > 0 and report["lists"]["valid_cart"] > 0
    assert "| valid_cart | ranker |" in res.table
    assert m["valid_cart_ndcg_10"] == pytest.approx(res.metrics["valid_cart"]["ranker"]["ndcg@10"])
    for key in ("valid_served_ndcg_10", "valid_served_rules_ndcg_10", "test_served_ndcg_10"):
        assert key in m and 0.0 <= m[key] <= 1.0
    assert m["valid_served_ndcg_10"] == pytest.approx(res.served["valid"]["ranker"]["ndcg@10"])
    assert m["gate_baseline_ndcg_10"] == m["valid_served_rules_ndcg_10"]  # no champion yet
    assert run.data.tags["gate_champion_version"] == ""
    assert "| test | ranker vs rules |" in res.table
    # Merged candidates: rows item-to-item scored, and a fused order that is not the
    # two-tower's (the smoke rows are the first test lists' rows).
    smoke = np.asarray(res.smoke["features"])
    assert smoke[:, FEATURES.index("item2item_known")].max() == 1.0
    assert not np.array_equal(
        smoke[:, FEATURES.index("fused_log_rank")], smoke[:, FEATURES.index("log_rank")]
    )


@pytest.mark.slow
def test_bundle_loads_without_training_code_and_reproduces_scores(trained) -> None:
    res, _, _ = trained
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from services.models.ranker import RankerBundle\n"
        "b = RankerBundle.load(sys.argv[1])\n"
        "x = np.asarray(b.smoke['features'], dtype=np.float32)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'training'], 'training'\n"
        "print(json.dumps(b.score_features(x).tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(res.bundle_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    got = np.array(json.loads(out.stdout))
    want = np.array(res.smoke["scores"])
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_numpy_forward_equals_the_trained_torch_model(trained) -> None:
    """The serving path (NumPy, no autograd) scores like the trained torch network on
    the smoke rows and on random rows far outside the training range."""
    res, _, _ = trained
    bundle = RankerBundle.load(res.bundle_dir)
    rng = np.random.default_rng(0)
    smoke = np.asarray(bundle.smoke["features"], dtype=np.float32)
    wild = rng.normal(0, 5, size=(500, len(bundle.features))).astype(np.float32)
    for x in (smoke, wild):
        with torch.no_grad():
            want = bundle.net(torch.from_numpy(x)).numpy()
        got = bundle.score_features(x)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The check runs at load too, without torch: a NumPy path that diverges from the
    # scores the torch network gave in training (smoke.json) is refused.
    bundle.forward.wide_b += 0.01
    with pytest.raises(RankerBundleError, match="smoke test: scores differ"):
        bundle.check()


def test_numpy_forward_equals_torch_for_any_shape() -> None:
    """Untrained networks of several shapes (dropout is identity at eval)."""
    torch.manual_seed(1)
    x = np.random.default_rng(1).normal(size=(64, N_FEATURES)).astype(np.float32)
    for hidden, dropout in (((64, 32), 0.0), ((16,), 0.2), ((), 0.0)):
        net = RankerNet(N_FEATURES, hidden=hidden, dropout=dropout).eval()
        with torch.no_grad():
            net.mean.normal_()
            net.std.uniform_(0.5, 2.0)
            want = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(NumpyRanker.from_net(net)(x), want, rtol=1e-5, atol=1e-5)


def _broken_copy(src: Path, dst: Path) -> Path:
    """A copy whose weights are NaN but whose manifest is consistent: only the smoke test
    can catch it."""
    shutil.copytree(src, dst)
    with np.load(dst / "ranker.npz") as npz:
        state = {k: npz[k] for k in npz.files}
    first = next(k for k in state if k.endswith("weight"))
    state[first] = np.full_like(state[first], np.nan)
    np.savez(dst / "ranker.npz", **state)
    manifest = json.loads((dst / "manifest.json").read_text())
    import hashlib

    blob = (dst / "ranker.npz").read_bytes()
    manifest["files"]["ranker.npz"] = {
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
    }
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.slow
def test_bundle_refuses_corrupt_or_inconsistent_files(trained, tmp_path: Path) -> None:
    res, _, _ = trained
    with pytest.raises(RankerBundleError, match="smoke test"):
        RankerBundle.load(_broken_copy(res.bundle_dir, tmp_path / "nan"))
    edited = shutil.copytree(res.bundle_dir, tmp_path / "edited")
    (edited / "items.json").write_text("{}")
    with pytest.raises(RankerBundleError, match=r"items\.json does not match"):
        RankerBundle.load(edited)
    missing = shutil.copytree(res.bundle_dir, tmp_path / "missing")
    (missing / "normalization.json").unlink()
    with pytest.raises(RankerBundleError, match=r"normalization\.json is missing"):
        RankerBundle.load(missing)


# ----------------------------------------------------------------------------- service


@dataclass
class Served:
    proc: ServiceProc
    stub: ranking_pb2_grpc.RankingServiceStub
    uri: str


@pytest.fixture(scope="module")
def served(trained) -> Iterator[Served]:
    _, cfg, tmp = trained
    env = {
        "MERCATO_RANKING_TRACKING_URI": cfg.tracking_uri,
        "MERCATO_RANKING_RANKER_POLL_INTERVAL_S": "0.3",
        "MERCATO_RANKING_OFFERS_SEED": "1",
    }
    proc = start_service("ranking", tmp / "svc", env=env)
    channel = proc.channel()
    try:
        yield Served(proc, ranking_pb2_grpc.RankingServiceStub(channel), cfg.tracking_uri)
    finally:
        channel.close()
        proc.terminate()


def _ts(seconds: float) -> dict[str, int]:
    return {"seconds": int(seconds), "nanos": round((seconds % 1) * 1e9)}


def _request(
    bundle: RankerBundle, seed: int, n: int = 30, alias: str = ""
) -> ranking_pb2.RankRequest:
    """A fixed request over catalog items, a few unknown ones and some out of stock."""
    rng = random.Random(seed)
    ids = [*rng.sample(bundle.items.item_ids, n - 3), "new-1", "new-2", "new-3"]
    cats = sorted(set(bundle.items.category))
    profile = common_pb2.Profile(customer_id=f"c{seed}", known=True, price_band="mid")
    for k, iid in enumerate(rng.sample(bundle.items.item_ids, 6)):
        profile.recent_items.add(item_id=iid, type=1, timestamp=_ts(NOW - 3600 * (k + 1) * 7))
    profile.category_affinity.update({cats[0]: 0.6, cats[1]: 0.4})
    profile.purchases.add(item_id=bundle.items.item_ids[0], count=1, quantity=2)
    profile.rfm.monetary = 80.0
    profile.cart.lines.add(item_id=bundle.items.item_ids[1], quantity=1)
    req = ranking_pb2.RankRequest(
        profile=profile,
        context=common_pb2.Context(surface=common_pb2.SURFACE_HOME, timestamp=_ts(NOW)),
        k=n,
        model_alias=alias,
    )
    for j, iid in enumerate(ids):
        req.candidates.add(item_id=iid, score=float(rng.uniform(-1, 1)))
        if j % 5 == 4:
            continue  # no details: unknown stock, price, category
        row = bundle.items.row.get(iid)
        req.items.add(
            item_id=iid,
            category=bundle.items.category[row] if row is not None else rng.choice(cats),
            price=round(rng.uniform(2, 60), 2),
            stock=0 if j % 7 == 0 else rng.randint(1, 30),
            margin=round(rng.uniform(0, 10), 2) if j % 3 else 0.0,
        )
    return req


def _expected_scores(bundle: RankerBundle, req: ranking_pb2.RankRequest) -> dict[str, float]:
    """The exported model on the same inputs, built by hand from the request."""
    p = req.profile
    details = {it.item_id: it for it in req.items}
    ids = [c.item_id for c in req.candidates]
    query = RankerQuery(
        now=NOW,
        surface="home",
        recent=[(r.item_id, float(r.timestamp.seconds)) for r in p.recent_items],
        cart=[line.item_id for line in p.cart.lines],
        category_affinity=dict(p.category_affinity),
        mean_unit_price=80.0 / 2,
        price_band="mid",
        monetary=80.0,
        history_len=6,
    )
    cands = CandidateDetails(
        ids=ids,
        scores=np.array([c.score for c in req.candidates], dtype=np.float64),
        price=np.array([details[i].price if i in details else 0.0 for i in ids]),
        stock=np.array([float(details[i].stock) if i in details else -1.0 for i in ids]),
        margin=np.array([details[i].margin if i in details else 0.0 for i in ids]),
        category=[details[i].category if i in details else "" for i in ids],
    )
    return dict(zip(ids, bundle.score(query, cands).tolist(), strict=True))


def _wait_model(stub, req, version: str | None, timeout: float = 30.0) -> ranking_pb2.RankResponse:
    deadline = time.monotonic() + timeout
    while True:
        resp = stub.Rank(req, timeout=10)
        got = resp.model.version if resp.model.name else None
        if got == version or time.monotonic() > deadline:
            assert got == version, f"alias serves {got}, want {version}"
            return resp
        time.sleep(0.2)


@pytest.mark.slow
def test_served_scores_equal_the_exported_model_and_promotion_moves_the_default(
    trained, served: Served
) -> None:
    res, _, _ = trained
    bundle = RankerBundle.load(res.bundle_dir)
    req = _request(bundle, seed=1)
    # The challenger is served from the start; the default alias (champion) is not
    # registered yet: rules-only.
    ch = _wait_model(served.stub, _request(bundle, seed=1, alias="challenger"), "1")
    assert ch.model.name == "mercato-ranker" and ch.model.run_id == res.run_id
    assert served.stub.Rank(req, timeout=10).model.name == ""

    cli = CliRunner().invoke(app, ["promote", "--model", "ranker", "--tracking-uri", served.uri])
    assert cli.exit_code == 0, cli.output
    assert "promoted mercato-ranker v1 to @champion" in cli.output
    resp = _wait_model(served.stub, req, "1")
    assert resp.model.alias == "champion"
    want = _expected_scores(bundle, req)
    assert len(resp.items) >= 10
    for it in resp.items:
        assert it.model_score == pytest.approx(want[it.item_id], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_rules_hold_with_the_ranker_on(trained, served: Served) -> None:
    res, _, _ = trained
    bundle = RankerBundle.load(res.bundle_dir)
    for seed in range(2, 12):
        req = _request(bundle, seed=seed, alias="challenger")
        req.k = 10
        resp = _wait_model(served.stub, req, "1")
        stock = {it.item_id: it.stock for it in req.items}
        cat = {it.item_id: it.category for it in req.items}
        ids = [it.item_id for it in resp.items]
        assert ids and len(ids) == len(set(ids)) <= 10
        assert all(stock.get(i, 1) > 0 for i in ids), "out-of-stock item returned"
        counts: dict[str, int] = {}
        for i in ids:
            if cat.get(i):
                counts[cat[i]] = counts.get(cat[i], 0) + 1
        assert max(counts.values(), default=0) <= 3  # home category cap
        assert resp.dropped["out_of_stock"] == sum(1 for v in stock.values() if v == 0)
        assert all(math.isfinite(it.model_score) for it in resp.items)


@pytest.mark.slow
@pytest.mark.timeout(600)  # trains a second ranker (with its retrieval pipeline) in the test
def test_gate_and_a_broken_version_refused_while_the_old_one_keeps_serving(
    trained, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res, cfg, _ = trained
    client, _ = registry.client_for(served.uri)
    exp = client.get_experiment_by_name("mercato-ranker")
    # Independent of the other tests: the trained version holds champion, and serves.
    registry.promote("mercato-ranker", served.uri, version=res.version, force=True)
    bundle = RankerBundle.load(res.bundle_dir)
    req = _request(bundle, seed=20)
    before = _wait_model(served.stub, req, res.version)

    # A deliberately bad ranker: the same pipeline, data and split, but the trained
    # network's scores negated (the served list upside down), registered without an
    # alias. Its run replays the served list with it and with the champion (v1) on the
    # same held-out validation customers; the replay gate refuses it.
    def upside_down(*args: object, **kwargs: object) -> tuple[RankerNet, object]:
        net, hist = train_ranker(*args, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            for p in (net.wide.weight, net.wide.bias, net.mlp[-1].weight, net.mlp[-1].bias):
                p.neg_()
        return net, hist

    monkeypatch.setattr(training.ranker, "train_ranker", upside_down)
    worse = train_and_register_ranker(replace(cfg, alias=""))
    assert worse.split_signature == res.split_signature
    assert worse.gate["baseline"] == "champion" and worse.gate["champion_version"] == res.version
    w, b = worse.gate["value"], worse.gate["baseline_value"]
    assert w < b, f"precondition: the upside-down ranker should be worse ({w} vs {b})"
    cli = CliRunner().invoke(
        app,
        [
            "promote",
            "--model",
            "ranker",
            "--version",
            str(worse.version),
            "--tracking-uri",
            served.uri,
        ],
    )
    assert cli.exit_code == 1 and "refused" in cli.output, cli.output
    assert f"< champion v{res.version}" in cli.output, cli.output
    # Refused means refused: the alias did not move, and the service still serves v1.
    champion = client.get_model_version_by_alias("mercato-ranker", "champion")
    assert str(champion.version) == res.version
    assert served.stub.Rank(req, timeout=10).model.version == res.version

    # A broken version (NaN weights, consistent manifest) pushed to champion by force.
    broken_dir = _broken_copy(res.bundle_dir, tmp_path / "bundle")
    run = client.create_run(exp.experiment_id, tags={"split_signature": res.split_signature})
    client.log_artifacts(run.info.run_id, str(broken_dir), "bundle")
    client.set_terminated(run.info.run_id)
    mv = registry.register_bundle(client, run.info.run_id, "mercato-ranker", alias=None)
    client.set_registered_model_alias("mercato-ranker", "champion", mv.version)
    deadline = time.monotonic() + 30
    while "model version refused" not in served.proc.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = served.proc.log()
    assert "model version refused" in log and f'"version": "{mv.version}"' in log
    after = served.stub.Rank(req, timeout=10)
    assert after.model.version == res.version
    assert [(i.item_id, i.model_score) for i in after.items] == [
        (i.item_id, i.model_score) for i in before.items
    ]
    assert served.proc.health("mercato.v1.RankingService") == "SERVING"


def _bundle_on(names: list[str], tmp_path: Path) -> RankerBundle:
    """An untrained network over ``names`` (an older feature list), saved and loaded."""
    torch.manual_seed(3)
    net = RankerNet(len(names), hidden=(8,), dropout=0.0).eval()
    with torch.no_grad():
        net.mean.normal_()
        net.std.uniform_(0.5, 2.0)
    x = np.random.default_rng(3).normal(size=(5, len(names))).astype(np.float32)
    items = ItemTable(["a", "b"], ["c1", "c2"], np.array([2.0, 3.0]), np.zeros(2), np.zeros(2))
    config = {"format_version": 1, "model_type": "ranker", "features": names, "hidden": [8]}
    smoke = {"features": x.tolist(), "scores": RankerBundle(config, net, items).torch_scores(x)}
    RankerBundle(config, net, items, smoke={**smoke, "scores": smoke["scores"].tolist()}).save(
        tmp_path / "b"
    )
    return RankerBundle.load(tmp_path / "b")


def test_a_bundle_on_an_older_feature_list_scores_its_own_columns(tmp_path: Path) -> None:
    """A champion trained before features were added (every feature it names is still
    computed) loads and scores the columns it names, in its order, so the promotion gate
    can replay it; a name this code does not compute is refused."""
    names = [f for f in FEATURES if not f.startswith(("item2item", "segment_"))][::-1]
    bundle = _bundle_on(names, tmp_path / "old")
    assert not bundle.all_features
    query = RankerQuery(now=1e9, recent=[("a", 1e9 - 3600)], segment="champions")
    cands = CandidateDetails(
        ids=["a", "b", "zz"],
        scores=np.array([0.3, 0.2, 0.1]),
        price=np.zeros(3),
        stock=np.full(3, -1.0),
        margin=np.zeros(3),
        category=["", "", ""],
        item2item=np.array([1.0, np.nan, 0.5]),
    )
    full = build_features(query, cands, bundle.items)
    own = full[:, [FEATURES.index(f) for f in names]]
    np.testing.assert_array_equal(bundle.score(query, cands), bundle.score_features(own))
    np.testing.assert_allclose(bundle.score(query, cands), bundle.torch_scores(own), atol=1e-5)
    with pytest.raises(RankerBundleError, match="not computed by this server"):
        _bundle_on([*names, "hour_of_day"], tmp_path / "gone")


@pytest.mark.slow
def test_a_refit_two_tower_champion_is_refused_unless_opted_in(tmp_path: Path) -> None:
    """two_tower="registry" on a champion refit on train + validation (its scores saw the
    ranker's validation labels) raises; with allow_refit_two_tower it trains, warns and
    says so on the run; a champion registered without refit is accepted as it is."""
    from training.pipeline import train_and_register
    from training.ranker import RefitTwoTowerError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    retrieval = TrainConfig(
        synthetic=replace(TINY, n_users=1000, n_items=150),
        baselines=BaselineConfig(models=()),
        model=replace(TwoTowerConfig(), dim=8, epochs=1, progress=False, init="random"),
        tracking_uri=uri,
    )
    tt = train_and_register(retrieval)  # refit on train + validation (the default)
    registry.promote("mercato-two-tower", uri, version=tt.version, force=True)
    cfg = RankerConfig(
        retrieval=retrieval,
        two_tower="registry",
        tracking_uri=uri,
        epochs=1,
        progress=False,
        register=False,
    )
    with pytest.raises(RefitTwoTowerError, match=r"refit on train \+ validation"):
        train_and_register_ranker(cfg)
    with pytest.warns(UserWarning, match="allow_refit_two_tower=True"):
        opted = train_and_register_ranker(replace(cfg, allow_refit_two_tower=True))
    client, _ = registry.client_for(uri)
    tags = client.get_run(opted.run_id).data.tags
    assert tags["two_tower_refit_opt_in"] == "true"
    assert json.loads(tags["two_tower"])["refit_train_plus_valid"] == "true"
    # Registered without refit: no flag needed, nothing to opt in to.
    plain = train_and_register(replace(retrieval, refit=False))
    registry.promote("mercato-two-tower", uri, version=plain.version, force=True)
    ok = train_and_register_ranker(cfg)
    tags = client.get_run(ok.run_id).data.tags
    assert tags["two_tower_refit_opt_in"] == "false"
    assert json.loads(tags["two_tower"])["version"] == str(plain.version)


def test_early_stopping_reads_the_lists_stop_lists_names() -> None:
    """stop_lists="ordinary" stops on the held-out ordinary lists alone (the promotion
    gate's kind), "pooled" on those and the held-out cart lists together, and only when
    the run fits on cart lists; any other value is refused before lists are built."""
    from training.ranker import select_stop_lists

    valid, cart = _random_lists(1, users=7), _random_lists(2, users=5)
    cart = replace(cart, users=[f"cart-{u}" for u in cart.users])
    ordinary = select_stop_lists(RankerConfig(stop_lists="ordinary", cart_lists=True), valid, cart)
    assert ordinary.users == valid.users
    np.testing.assert_array_equal(ordinary.x, valid.x)
    pooled_cfg = RankerConfig(stop_lists="pooled", cart_lists=True)
    pooled = select_stop_lists(pooled_cfg, valid, cart)
    assert pooled.users == valid.users + cart.users
    np.testing.assert_array_equal(pooled.x, np.concatenate([valid.x, cart.x]))
    assert pooled.truth.shape[0] == 12
    assert (pooled.truth[7:] != cart.truth).nnz == 0
    no_cart = replace(pooled_cfg, cart_lists=False)
    assert select_stop_lists(no_cart, valid, cart).users == valid.users
    assert select_stop_lists(pooled_cfg, valid, None).users == valid.users
    with pytest.raises(ValueError, match="stop_lists must be one of"):
        select_stop_lists(RankerConfig(stop_lists="cart"), valid, cart)
    with pytest.raises(ValueError, match="stop_lists must be one of"):
        train_and_register_ranker(RankerConfig(stop_lists="both"))
