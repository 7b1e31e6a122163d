"""Training pipeline: generator, splits, metrics, tiny train -> register -> load, promotion."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from services.models import BundleError, ItemFeatures, TwoTowerBundle, UserQuery, download_bundle
from services.models.item2item import ItemNeighbours
from services.models.two_tower import PRICE_BANDS
from training.data import time_split, user_random_split
from training.evaluate import PopularityScorer, evaluate, metrics_from_ranking, top_k
from training.features import build_vocab
from training.index import IndexConfig, ann_recall, build_index, index_kind
from training.pipeline import (
    TrainConfig,
    _eval_sets,
    load_data,
    make_split,
    train_and_register,
)
from training.registry import PromotionRefused, promote
from training.synthetic import (
    SyntheticConfig,
    build_catalog,
    generate,
    load_synthetic,
    write_synthetic,
)
from training.two_tower import TwoTowerConfig, encode_eval_users

TINY = SyntheticConfig(n_users=700, n_items=300, n_categories=16, days=60, seed=3)


def tiny_cfg(tmp: Path, **model: object) -> TrainConfig:
    m = replace(TwoTowerConfig(), dim=16, epochs=3, batch_size=256, progress=False)
    return TrainConfig(
        synthetic=TINY,
        model=replace(m, **model),  # type: ignore[arg-type]
        tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        index=IndexConfig(recall_queries=200),
    )


# ----------------------------------------------------------------------------- data


def test_generator_is_deterministic_and_streams_the_same_data(tmp_path: Path) -> None:
    a, b = generate(TINY), generate(TINY)
    pd.testing.assert_frame_equal(a.events, b.events)
    pd.testing.assert_frame_equal(a.items, b.items)
    other = generate(replace(TINY, seed=4))
    assert not a.events.head(200).equals(other.events.head(200))
    counts = write_synthetic(TINY, tmp_path / "syn")
    c = load_synthetic(tmp_path / "syn")
    assert counts["events"] == len(a.events)
    pd.testing.assert_frame_equal(c.events, a.events)
    pd.testing.assert_frame_equal(c.users, a.users)


def test_generator_has_retail_structure() -> None:
    d = generate(TINY)
    ev = d.events
    assert set(ev["event"]) == {"view", "cart", "purchase"}
    sessions = ev.groupby(["user_id", "session_id"])["event"].agg(set)
    carted = sessions.map(lambda s: "cart" in s)
    bought = sessions.map(lambda s: "purchase" in s)
    assert (carted & ~bought).sum() > 0, "no abandoned carts"
    assert bought.sum() > 0
    # Baskets hold complementary categories (phone + case ...) more than chance.
    cat = d.items.set_index("item_id")["category"]
    p = ev[ev["event"] == "purchase"].assign(c=lambda x: x["item_id"].map(cat))
    pairs = p.groupby(["user_id", "session_id"])["c"].agg(lambda s: set(s.str.split("/").str[1]))
    assert pairs.map(lambda s: {"phones", "phone_cases"} <= s or {"shoes", "socks"} <= s).sum() > 0
    # Long tail: the top 10% of items get a large share of the interactions.
    share = ev["item_id"].value_counts()
    assert share.head(len(d.items) // 10).sum() / share.sum() > 0.3
    # New items appear during the period (trends).
    first_seen = ev.groupby("item_id")["ts"].min()
    assert (first_seen > ev["ts"].min() + 20 * 86400).sum() > 0
    cat_full = build_catalog(TINY)
    assert len(cat_full.item_ids) == TINY.n_items


def test_time_split_keeps_sessions_whole_and_ordered() -> None:
    d = generate(TINY)
    s = time_split(d, 0.1, 0.1)
    assert len(s.train) + len(s.valid) + len(s.test) == len(d.events)
    keys = [
        set(zip(x["user_id"], x["session_id"], strict=True)) for x in (s.train, s.valid, s.test)
    ]
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    start = [x.groupby(["user_id", "session_id"])["ts"].min() for x in (s.train, s.valid, s.test)]
    assert start[0].max() < start[1].min() and start[1].max() < start[2].min()
    r = user_random_split(d, 0.1, 0.1, seed=1)
    assert len(r.train) + len(r.valid) + len(r.test) == len(d.events)
    assert set(r.valid["user_id"]) | set(r.test["user_id"]) <= set(r.train["user_id"])
    assert r.signature() != s.signature()


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values() -> None:
    # One user, ranking [3, 1, 2, 0, 4], truth {1, 0}.
    ranked = np.array([[3, 1, 2, 0, 4]])
    truth = sp.csr_matrix(np.array([[1, 1, 0, 0, 0]], dtype=np.float32))
    m = metrics_from_ranking(ranked, truth, ks=(1, 2, 4))
    assert m["recall@1"][0] == 0.0 and m["hit@1"][0] == 0.0 and m["ndcg@1"][0] == 0.0
    assert m["recall@2"][0] == pytest.approx(0.5)
    assert m["ndcg@2"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["recall@4"][0] == pytest.approx(1.0)
    dcg4 = 1 / math.log2(3) + 1 / math.log2(5)
    assert m["ndcg@4"][0] == pytest.approx(dcg4 / (1 + 1 / math.log2(3)))
    assert m["hit@2"][0] == 1.0


def test_metrics_of_a_user_without_truth_are_zero_and_averageable() -> None:
    """A user with nothing to find scores 0 on every metric (not 1, not a gap), and the
    arrays stay float so the mean over users is a number."""
    ranked = np.array([[0, 1, 2], [2, 1, 0]])
    truth = sp.csr_matrix(np.array([[0, 0, 1], [0, 0, 0]], dtype=np.float32))
    m = metrics_from_ranking(ranked, truth, ks=(1, 3))
    for name, values in m.items():
        assert values.dtype == np.float64, name
        assert values[1] == 0.0, name
    assert float(np.mean(m["ndcg@3"])) == pytest.approx((1 / math.log2(4)) / 2)
    assert float(np.mean(m["hit@1"])) == 0.0


def test_top_k_matches_a_full_sort_for_every_k() -> None:
    """top_k (argpartition, then a sort of the k) returns exactly the k best items per row,
    best first, for every k from 1 to the number of items; integer scores (counts)
    work too, with excluded items never returned while others remain."""
    rng = np.random.default_rng(7)
    scores = rng.permutation(20 * 300).reshape(20, 300).astype(np.float64)  # no ties
    exclude = sp.random(20, 300, density=0.2, format="csr", random_state=3)
    masked = np.where(exclude.toarray() != 0, -np.inf, scores)
    reference = np.argsort(-masked, axis=1, kind="stable")
    available = int((exclude.toarray() == 0).sum(1).min())  # ties only among excluded
    assert available >= 15
    for k in range(1, available + 1):
        assert np.array_equal(top_k(scores, exclude, k), reference[:, :k]), k
    counts = np.array([[3, 9, 1, 7], [5, 0, 2, 8]], dtype=np.int64)
    excl = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32))
    assert top_k(counts, excl, 3).tolist() == [[3, 0, 2], [0, 2, 1]]


def test_evaluate_excludes_history_and_counts_coverage() -> None:
    from training.features import EvalSet

    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    exclude = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32))
    truth = sp.csr_matrix(np.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=np.float32))
    assert top_k(np.tile(scores, (2, 1)), exclude, 2).tolist() == [[1, 2], [0, 1]]
    es = EvalSet("t", np.array([0, 1]), exclude, np.zeros((2, 4), np.int64), truth, exclude)
    m = evaluate(PopularityScorer(scores), es, ks=(2, 5))
    # user 0: ranking 1,2,3,4 -> hit at rank 2; user 1: 0,1,2,3,4 -> hit at rank 5.
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / 2)
    assert m["coverage@2"] == pytest.approx(3 / 5)
    assert m["users"] == 2


def test_hnsw_index_above_threshold_and_ann_recall() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:100] + 0.1 * rng.normal(size=(100, 16)).astype(np.float32)
    exact = build_index(x, IndexConfig(exact_max_items=5000))
    hnsw = build_index(x, IndexConfig(exact_max_items=1000))
    assert index_kind(exact) == "exact" and index_kind(hnsw) == "hnsw"
    assert ann_recall(exact, x, q, 20) == 1.0
    r = ann_recall(hnsw, x, q, 20)
    assert 0.8 < r <= 1.0
    _, rows = hnsw.search(x[:5], 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # FAISS ids are rows


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, object]:
    tmp = tmp_path_factory.mktemp("mlflow")
    cfg = tiny_cfg(tmp)
    return cfg, train_and_register(cfg)


@pytest.mark.slow
def test_tiny_train_register_load_by_alias_gives_same_scores(trained, tmp_path: Path) -> None:
    cfg, res = trained
    assert res.version == "1" and res.alias == "challenger"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(cfg.tracking_uri).get_run(res.run_id)
    # The gate metric of the run is the best epoch's final evaluation, not the last epoch's.
    assert run.data.metrics["valid_recall_20"] == pytest.approx(res.metric("valid"))
    assert run.data.tags["split_signature"] == res.split_signature
    info, path = download_bundle(cfg.model_name, "challenger", cfg.tracking_uri, tmp_path / "dl")
    assert (info.name, info.version, info.run_id, info.alias) == (
        cfg.model_name,
        res.version,
        res.run_id,
        "challenger",
    )
    local, remote = TwoTowerBundle.load(res.bundle_dir), TwoTowerBundle.load(path)
    assert remote.config["dim"] == 17 and remote.config["model_dim"] == 16
    assert remote.config["n_items"] == TINY.n_items
    np.testing.assert_array_equal(local.item_embeddings, remote.item_embeddings)

    # Serving features == training features: encode the test users from string ids. The
    # registered model is the one the test part evaluates (refit on train + validation).
    data = load_data(cfg)
    split = make_split(data, cfg)
    vocab = build_vocab(data, cfg.features)
    _, valid, _, _ = _eval_sets(cfg, data, split, vocab)
    assert valid is not None and valid.name == "test"
    ids = vocab.item_ids
    queries = [
        UserQuery(
            recent_item_ids=[ids[x] for x in valid.history[j].indices],
            purchased_item_ids=[],
            cart_item_ids=[],
            surface=vocab.surfaces[valid.context[j, 0]],
            country=vocab.countries[valid.context[j, 1]],
            segment=vocab.segments[valid.context[j, 2]],
            price_band=PRICE_BANDS[valid.context[j, 3]],
        )
        for j in range(len(valid))
    ]
    served = remote.encode_users(queries)
    trained_side = encode_eval_users(remote.net, valid)
    np.testing.assert_allclose(served, trained_side, atol=1e-5)
    np.testing.assert_allclose(served, local.encode_users(queries), atol=1e-6)
    # Scores from the downloaded bundle reproduce the logged test metric.
    from training.evaluate import EmbeddingScorer

    m = evaluate(EmbeddingScorer(served, remote.item_embeddings), valid, cfg.ks)
    assert m["recall@20"] == pytest.approx(res.metrics["test"]["two_tower"]["recall@20"], abs=1e-9)
    # Item tower from catalog features reproduces the stored embeddings; new ids work.
    items = data.items
    feats = [
        ItemFeatures(
            r.item_id,
            r.category,
            float(r.price),
            {"brand": r.attr_brand, "color": r.attr_color, "tier": r.attr_tier},
        )
        for r in items.head(50).itertuples()
    ]
    np.testing.assert_allclose(remote.encode_items(feats), remote.item_embeddings[:50], atol=1e-5)
    # FAISS ranks exactly as the model's scores u.v + b, the item tower run on every
    # catalog item (the bias included).
    every = [
        ItemFeatures(
            r.item_id,
            r.category,
            float(r.price),
            {"brand": r.attr_brand, "color": r.attr_color, "tier": r.attr_tier},
        )
        for r in items.itertuples()
    ]
    tower = remote.encode_items(every)
    v, b = tower[:, :-1], tower[:, -1]
    assert np.abs(b).max() > 0  # the bias is trained and exported
    model_scores = served[:20, :-1] @ v.T + b
    faiss_scores, rows = remote.search(served[:20], 10)
    np.testing.assert_allclose(
        faiss_scores, np.take_along_axis(model_scores, rows, axis=1), rtol=1e-5, atol=1e-5
    )
    want = -np.sort(-model_scores, axis=1)[:, :10]
    np.testing.assert_allclose(faiss_scores, want, rtol=1e-5, atol=1e-5)
    cold = remote.encode_items([replace(feats[0], item_id="NEW-SKU-1")])
    assert cold.shape == (1, 17) and np.isfinite(cold).all()
    assert remote.row_of(feats[3].item_id) == 3 and remote.row_of("NEW-SKU-1") is None
    assert remote.popularity and remote.popularity[0][1] >= remote.popularity[-1][1]


@pytest.mark.slow
def test_run_has_baselines_table_curve_and_complements(trained) -> None:
    cfg, res = trained
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    for part in ("valid", "test"):
        assert set(res.metrics[part]) == {
            "two_tower",
            "popularity",
            "als",
            "ease",
            "item2item",
            "served",
        }
        for m in res.metrics[part].values():
            assert 0.0 <= m["recall@10"] <= m["recall@20"] <= m["recall@100"] <= 1.0
    # The synthetic data has item-item structure that EASE finds even at this tiny size.
    v = res.metrics["valid"]
    assert v["ease"]["recall@20"] > v["popularity"]["recall@20"]
    run = client.get_run(res.run_id)
    for key in ("valid_als_recall_20", "test_ease_ndcg_10", "valid_popularity_hit_50"):
        assert key in run.data.metrics
    assert run.data.metrics["valid_ease_recall_20"] == pytest.approx(v["ease"]["recall@20"])
    curve = client.get_metric_history(res.run_id, "train_loss")
    assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 2
    arts = {a.path for a in client.list_artifacts(res.run_id, "eval")}
    assert {"eval/table.md", "eval/table.csv", "eval/training_curve.png"} <= arts
    local = Path(client.download_artifacts(res.run_id, "eval/training_curve.png"))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = Path(client.download_artifacts(res.run_id, "eval/table.md")).read_text()
    assert "| ease |" in table and "| als |" in table and "train s" in table
    assert "| item2item |" in table and "| served |" in table
    assert run.data.metrics["test_served_ndcg_10"] == pytest.approx(
        res.metrics["test"]["served"]["ndcg@10"]
    )
    # Complements were mined from baskets and are served by the bundle.
    bundle = TwoTowerBundle.load(res.bundle_dir)
    pairs = json.loads((res.bundle_dir / "complements.json").read_text())
    # The item-to-item model ships in the bundle with the fusion weights chosen on valid.
    i2i = ItemNeighbours.load(res.bundle_dir / "item2item", bundle.item_ids)
    assert i2i.nnz > 0 and set(i2i.config["merge"]) == {"two_tower_weight", "item2item_weight"}
    assert pairs, "no complement pairs from the synthetic baskets"
    item = next(iter(pairs))
    got = bundle.complements(item, 3)
    assert 1 <= len(got) <= 3 and got == [(i, pytest.approx(s)) for i, s in pairs[item][:3]]
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    assert bundle.complements("NO-SUCH-ITEM", 5) == [] and bundle.complements(item, 0) == []


@pytest.mark.slow
def test_bundle_without_complements_file_still_loads(trained, tmp_path: Path) -> None:
    """Bundles written before complements existed have no complements.json."""
    import shutil

    _, res = trained
    old = tmp_path / "old"
    shutil.copytree(res.bundle_dir, old)
    (old / "complements.json").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"]["complements.json"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    b = TwoTowerBundle.load(old)
    some = next(iter(json.loads((res.bundle_dir / "complements.json").read_text())))
    assert b.complements(some, 5) == []


@pytest.mark.slow
def test_bundle_refuses_missing_or_corrupt_files(trained, tmp_path: Path) -> None:
    import shutil

    _, res = trained
    bad = tmp_path / "b"
    shutil.copytree(res.bundle_dir, bad)
    (bad / "index.faiss").unlink()
    with pytest.raises(BundleError, match=r"index\.faiss"):
        TwoTowerBundle.load(bad)
    bad2 = tmp_path / "c"
    shutil.copytree(res.bundle_dir, bad2)
    cfg = json.loads((bad2 / "config.json").read_text())
    cfg["dim"] = 18  # the real one is 17 (16 + the bias component)
    (bad2 / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    with pytest.raises(BundleError):
        TwoTowerBundle.load(bad2)
    with pytest.raises(BundleError, match=r"dim|shape|size"):
        TwoTowerBundle.load(bad2, verify_checksums=False)
    with pytest.raises(BundleError, match="does not exist"):
        TwoTowerBundle.load(tmp_path / "nothing")


@pytest.mark.slow
def test_promotion_gate_refuses_a_worse_model(trained) -> None:
    cfg, res = trained
    first = promote(cfg.model_name, cfg.tracking_uri)
    assert first.promoted and first.version == res.version
    # An untrained model (random weights, lr ~ 0) on the same data and split: with the
    # warm start it would be the start, which the trained model may well have kept.
    fast = replace(cfg, baselines=replace(cfg.baselines, models=()))
    worse = train_and_register(
        replace(fast, model=replace(cfg.model, lr=1e-9, epochs=1, init="random"))
    )
    assert worse.split_signature == res.split_signature
    w, b = worse.metric(), res.metric()
    assert w < b, f"precondition: the untrained model should be worse ({w} vs {b})"
    with pytest.raises(PromotionRefused) as e:
        promote(cfg.model_name, cfg.tracking_uri)
    assert not e.value.result.promoted and "<" in e.value.result.reason
    from services.models import resolve_alias

    assert resolve_alias(cfg.model_name, "champion", cfg.tracking_uri).version == res.version
    forced = promote(cfg.model_name, cfg.tracking_uri, force=True)
    assert forced.promoted and forced.version == worse.version
    assert resolve_alias(cfg.model_name, "champion", cfg.tracking_uri).version == worse.version
    # A better (here: the first) model passes the gate again.
    back = promote(cfg.model_name, cfg.tracking_uri, version=res.version)
    assert back.promoted
    # A model trained on other data is not comparable without --force.
    other = train_and_register(
        replace(fast, synthetic=replace(TINY, seed=9), model=replace(cfg.model, epochs=1))
    )
    assert other.split_signature != res.split_signature
    with pytest.raises(PromotionRefused, match="not comparable"):
        promote(cfg.model_name, cfg.tracking_uri)


@pytest.mark.slow
def test_test_part_is_read_with_every_model_refit_on_train_plus_validation(trained) -> None:
    cfg, res = trained
    from training.baselines import EASE, interactions
    from training.evaluate import EmbeddingScorer

    report = TwoTowerBundle.load(res.bundle_dir).eval_report
    assert report["refit"]["train_plus_valid"] is True
    assert set(report["refit"]["seconds"]) == {"two_tower", "als", "ease", "item2item"}
    data = load_data(cfg)
    split = make_split(data, cfg)
    vocab = build_vocab(data, cfg.features)
    valid, test, _, history_test = _eval_sets(cfg, data, split, vocab)
    assert test is not None
    lam = report["baselines"]["ease"]["chosen"]["lam"]
    h = interactions(history_test, vocab, test.users)
    on_both = evaluate(EASE(lam).fit(interactions(history_test, vocab)).scorer(h), test, cfg.ks)
    assert res.metrics["test"]["ease"]["recall@20"] == pytest.approx(on_both["recall@20"], abs=1e-9)
    on_train = evaluate(EASE(lam).fit(interactions(split.train, vocab)).scorer(h), test, cfg.ks)
    assert on_train["ndcg@100"] != pytest.approx(on_both["ndcg@100"], abs=1e-9)
    # The served item-to-item neighbours are the validated configuration fit again on
    # train + validation, like every other model.
    from services.models.item2item import ItemNeighbours
    from training.item2item import refit_item2item

    shipped = ItemNeighbours.load(res.bundle_dir / "item2item", vocab.item_ids)
    chosen = report["baselines"]["item2item"]["chosen"]
    for part, x in (("train + validation", history_test), ("train", split.train)):
        again = refit_item2item(interactions(x, vocab), vocab.item_ids, chosen)
        same = np.array_equal(again.indptr, shipped.indptr) and np.allclose(
            again.scores, shipped.scores, atol=1e-6
        )
        assert same == (part == "train + validation"), part
    # Validation numbers come from the models fit on train only: the served (refit) model
    # has seen the validation truth, so it scores higher there.
    served = TwoTowerBundle.load(res.bundle_dir)
    leak = evaluate(
        EmbeddingScorer(encode_eval_users(served.net, valid), served.item_embeddings),
        valid,
        cfg.ks,
    )
    assert leak["recall@20"] > res.metrics["valid"]["two_tower"]["recall@20"]
