"""The two-tower's training rows, shared customer features and item cold start."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pandas as pd
import pytest
import torch

from mercato.features import SEGMENTS
from mercato.v1 import common_pb2
from services.models.ranker import FEATURES
from services.models.two_tower import PRICE_BANDS
from services.profile.ingest import normalize_event
from services.profile.logic import LogEvent, ProfileConfig, build_profile, recompute_profile
from services.ranking.ranker import request_features
from services.ranking.rules import CandidateSet
from services.ranking.table import CandidateArrays
from training.data import RetailData, time_split
from training.features import (
    build_eval_set,
    build_train_rows,
    build_vocab,
    category_affinities,
    encode_events,
    user_context,
)
from training.pipeline import query_times, train_rows
from training.profile_data import SyntheticProfileDataset
from training.ranker import customer_profiles, item_table_at
from training.synthetic import SyntheticConfig, generate
from training.two_tower import (
    ItemTable,
    TwoTowerConfig,
    encode_eval_users,
    make_batch,
    new_net,
    select_two_tower,
    train_two_tower,
)

TINY = SyntheticConfig(n_users=400, n_items=200, n_categories=12, days=60, seed=5)
DAY = 86_400


def hand_made() -> RetailData:
    """Two customers, five items; times in days."""
    rows = [
        # user a: session 1 (day 0) views i0, buys i1; session 2 (day 10) buys i2;
        # session 3 (day 20) views i0 again and buys i3.
        ("a", "i0", 0, "view", 1),
        ("a", "i1", 0, "purchase", 1),
        ("a", "i2", 10, "purchase", 2),
        ("a", "i0", 20, "view", 3),
        ("a", "i3", 20, "purchase", 3),
        # user b: one session only (no cut-off with history before it).
        ("b", "i4", 5, "cart", 4),
        ("b", "i1", 5, "purchase", 4),
    ]
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "event", "session_id"])
    ev["ts"] = ev["ts"] * DAY + 1_000_000
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(5)],
            "category": ["x", "x", "y", "y", "z"],
            "price": [1.0, 10.0, 30.0, 2.0, 7.0],
        }
    )
    return RetailData("hand", ev, items, pd.DataFrame({"user_id": ["a", "b"]}))


def test_time_rows_from_a_hand_made_history() -> None:
    data = hand_made()
    vocab = build_vocab(data)
    r = build_train_rows(data.events, vocab, "time")
    row = {iid: k for k, iid in enumerate(vocab.item_ids)}
    a = int(np.flatnonzero(vocab.user_codes[r.users] == "a")[0])
    # a's distinct items in the order first seen (i0 viewed before i1 in session 1).
    mine = r.items[r.indptr[a] : r.indptr[a + 1]]
    assert mine.tolist() == [row["i0"], row["i1"], row["i2"], row["i3"]]
    w = r.weight[r.indptr[a] : r.indptr[a + 1]]
    assert w.tolist() == [1.0, 4.0, 4.0, 4.0]  # strongest event: view 1, purchase 4
    # Cut-offs at a's sessions 2 and 3 (session 1 has no history before it); b has none.
    assert r.n_rows == 2 and (r.row_user == a).all()
    assert r.start.tolist() == [2, 3] and r.end.tolist() == [4, 4]
    # The segment and price band before each cut-off: one order (active, mean 5.5 -> mid),
    # then two orders (mean 20 -> high).
    assert [SEGMENTS[s] for s in r.context[:, 2]] == ["active", "active"]
    assert [PRICE_BANDS[b] for b in r.context[:, 3]] == ["mid", "high"]
    assert (r.context[:, 0] == vocab.surfaces.index("home")).all()
    # A horizon of 5 days keeps only what was first seen in the session itself.
    h = build_train_rows(data.events, vocab, "time", horizon_seconds=5 * DAY)
    assert h.start.tolist() == [2, 3] and h.end.tolist() == [3, 4]
    # A batch reads inputs before the cut-off and targets after it.
    b = make_batch(
        r, np.array([0]), replace(TwoTowerConfig(), input_dropout=0.0), np.random.default_rng(0)
    )
    assert (b.flat.numpy() - 1).tolist() == [row["i0"], row["i1"]]
    assert b.t_item.tolist() == [row["i2"], row["i3"]] and b.offsets.tolist() == [0]


def test_random_rows_hold_out_part_of_each_history() -> None:
    data = hand_made()
    vocab = build_vocab(data)
    r = build_train_rows(data.events, vocab, "random")
    assert r.n_rows == 2 and r.start.tolist() == [0, 0] and r.end.tolist() == [4, 2]
    cfg = replace(TwoTowerConfig(), input_dropout=0.0, holdout=0.5)
    b = make_batch(r, np.array([0, 1]), cfg, np.random.default_rng(1))
    flat = b.flat.numpy() - 1
    got_in = [set(flat[b.offsets[0] : b.offsets[1]]), set(flat[b.offsets[1] :])]
    for k in range(2):
        targets = set(b.t_item[b.t_row == k].tolist())
        mine = set(r.items[r.indptr[k] : r.indptr[k + 1]].tolist())
        # Input and targets split the customer's items, nothing else.
        assert targets | got_in[k] == mine and not (targets & got_in[k])


@pytest.mark.slow
def test_evaluation_queries_use_a_surface_the_model_was_trained_on() -> None:
    data = generate(TINY)
    split = time_split(data)
    vocab = build_vocab(data)
    cfg = replace(TwoTowerConfig(), dim=8, epochs=2, progress=False)
    from training.pipeline import TrainConfig

    rows = train_rows(split, vocab, TrainConfig(model=cfg))
    valid = build_eval_set(
        "valid", split.train, split.valid, vocab, data.target_events, now=query_times(split)[0]
    )
    assert set(np.unique(valid.context[:, 0])) <= set(np.unique(rows.context[:, 0]))
    torch.manual_seed(cfg.seed)
    before = new_net(vocab, cfg).surface.weight.detach().clone()
    net, _, _ = train_two_tower(vocab, rows, valid, cfg)
    for s in np.unique(valid.context[:, 0]):
        assert not torch.allclose(net.surface.weight[s], before[s])


def served_logs(data: RetailData) -> dict[str, list[LogEvent]]:
    """Each customer's events as the profile service stores them (normalised, by customer)."""
    ds = SyntheticProfileDataset(data)
    catalog = {it.item_id: it for it in ds.items()}
    logs: dict[str, list[LogEvent]] = {}
    for e in ds.events():
        logs.setdefault(e.customer_id, []).append(normalize_event(e, catalog[e.item_id], 0))
    return logs


def test_profile_service_and_training_compute_the_same_customer_features() -> None:
    data = generate(TINY)
    logs = served_logs(data)
    now_s = int(data.events["ts"].max()) + 3 * DAY
    cfg = ProfileConfig()
    vocab = build_vocab(data)
    users = sorted(logs)
    codes = vocab.user_codes.get_indexer(users)
    enc = encode_events(data.events, vocab)
    ctx = user_context(enc, vocab, codes, np.full(len(codes), now_s))
    aff = category_affinities(data.events, vocab)
    seen = {"segment": set(), "band": set()}
    for k, u in enumerate(users):
        p = build_profile(u, recompute_profile(logs[u], cfg), None, now_s * 1_000_000, cfg)
        assert SEGMENTS[ctx[k, 2]] == p.segment, u
        assert PRICE_BANDS[ctx[k, 3]] == p.price_band, u
        assert aff.get(u, {}) == pytest.approx(dict(p.category_affinity), rel=1e-12), u
        seen["segment"].add(p.segment)
        seen["band"].add(p.price_band)
    # The comparison covers several values of each, not one constant.
    assert len(seen["segment"]) >= 2 and len(seen["band"]) >= 2


def test_ranker_features_at_serving_equal_those_in_training() -> None:
    """The ranker's features of the same customer, candidates and time: from the profile
    the profile service serves (ranking's ``request_features``, as RankerScorer scores)
    and from the profile training builds from the events (``customer_profiles``, what the
    fit lists and the replay use). Every column equal, with customer features (segment,
    band, RFM, tenure, history length), item-to-item scores and the time varying."""
    data = generate(TINY)
    logs = served_logs(data)
    now_s = int(data.events["ts"].max()) + 3 * DAY + 3600 * 7
    cfg = ProfileConfig()
    vocab = build_vocab(data)
    users = sorted(logs)
    # Two request times (odd customers 13 h later): recency, tenure and item age vary too.
    times = [now_s + (k % 2) * 13 * 3600 for k in range(len(users))]
    trained = {
        t: dict(zip(users, customer_profiles(data.events, users, vocab, float(t)), strict=True))
        for t in sorted(set(times))
    }
    table = item_table_at(data.events, vocab, float(now_s), 28.0, 7.0)
    rng = np.random.default_rng(0)
    varied: dict[str, set[float]] = {}
    for u, t in zip(users, times, strict=True):
        context = common_pb2.Context(surface=common_pb2.SURFACE_HOME)
        context.timestamp.FromSeconds(t)
        served = build_profile(u, recompute_profile(logs[u], cfg), None, t * 1_000_000, cfg)
        ids = list(rng.choice(vocab.item_ids, size=20, replace=False))
        i2i = np.where(rng.random(20) < 0.5, rng.random(20), np.nan)
        cands = CandidateSet(
            ids,
            rng.random(20),
            [0] * 20,
            {
                int(common_pb2.REASON_MODEL): rng.normal(size=20),
                int(common_pb2.REASON_SIMILAR): i2i,
            },
        )
        items = CandidateArrays.empty(20)
        want = request_features(table, served, context, cands, items)
        got = request_features(table, trained[t][u], context, cands, items)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=u)
        for name in (
            "segment_loyal",
            "price_band_high",
            "log_frequency",
            "log_monetary",
            "log_tenure_days",
            "log_history_len",
            "log_recency_days",
            "item2item_score",
            "log_item_age_days",
        ):
            varied.setdefault(name, set()).update(want[:, FEATURES.index(name)].round(6).tolist())
    # The comparison covers customers and items that differ, not constants.
    for name, values in varied.items():
        assert len(values) >= 2, name


@pytest.mark.slow
def test_a_new_item_gets_a_vector_from_its_features() -> None:
    data = generate(TINY)
    split = time_split(data)
    vocab = build_vocab(data)
    cfg = replace(TwoTowerConfig(), dim=8, epochs=2, progress=False)
    from training.pipeline import TrainConfig

    rows = train_rows(split, vocab, TrainConfig(model=cfg))
    valid = build_eval_set(
        "valid", split.train, split.valid, vocab, data.target_events, now=query_times(split)[0]
    )
    net, items, _ = train_two_tower(vocab, rows, valid, cfg)
    known = np.flatnonzero(items.known)
    r = int(known[0])
    t = torch.from_numpy
    with torch.no_grad():
        args = (
            t(vocab.item_category[[r]]),
            t(vocab.item_price_bucket[[r]]),
            t(vocab.item_attrs[[r]]),
        )
        as_known = net.encode_item(t(np.array([r + 1])), *args).numpy()[0]
        as_new = net.encode_item(t(np.array([0])), *args).numpy()[0]
        other = int(np.flatnonzero(vocab.item_category != vocab.item_category[r])[0])
        args2 = (
            t(vocab.item_category[[other]]),
            t(vocab.item_price_bucket[[other]]),
            t(vocab.item_attrs[[other]]),
        )
        new_other = net.encode_item(t(np.array([0])), *args2).numpy()[0]
    # A new item's vector and bias are its content part: non-zero, feature dependent and
    # the known item minus its id embedding and id bias.
    assert np.abs(as_new[:-1]).sum() > 0 and not np.allclose(as_new, new_other)
    id_part = np.concatenate(
        [net.item_id.weight[r + 1].detach().numpy(), net.item_bias.weight[r + 1].detach().numpy()]
    )
    np.testing.assert_allclose(as_known - id_part, as_new, atol=1e-6)
    # Catalog items without training events are embedded exactly like a new item.
    unseen = np.flatnonzero(~items.known)
    if len(unseen):
        u = int(unseen[0])
        emb = ItemTable(vocab, known).all_embeddings(net)
        with torch.no_grad():
            feat = (
                t(vocab.item_category[[u]]),
                t(vocab.item_price_bucket[[u]]),
                t(vocab.item_attrs[[u]]),
            )
            np.testing.assert_allclose(
                emb[u], net.encode_item(t(np.array([0])), *feat).numpy()[0], atol=1e-6
            )


@pytest.mark.slow
def test_grid_keeps_the_best_validation_try() -> None:
    data = generate(TINY)
    split = time_split(data)
    vocab = build_vocab(data)
    cfg = replace(TwoTowerConfig(), dim=8, epochs=3, progress=False, grid=((0.0, 0.0), (0.0, 0.9)))
    from training.pipeline import TrainConfig

    rows = train_rows(split, vocab, TrainConfig(model=cfg))
    valid = build_eval_set(
        "valid", split.train, split.valid, vocab, data.target_events, now=query_times(split)[0]
    )
    net, items, hist, chosen = select_two_tower(vocab, rows, valid, cfg)
    assert len(hist.tried) == 2
    best = max(hist.tried, key=lambda d: d["valid_recall@20"])
    assert chosen.input_dropout == best["input_dropout"]
    from training.evaluate import EmbeddingScorer, evaluate

    m = evaluate(
        EmbeddingScorer(encode_eval_users(net, valid), items.all_embeddings(net)), valid, ks=(20,)
    )
    assert m["recall@20"] == pytest.approx(best["valid_recall@20"], abs=1e-9)


@pytest.mark.slow
def test_sampled_softmax_trains_on_a_large_catalog() -> None:
    """100k items (small enough for CI on 2 cores): the full softmax is refused above
    its limit, the logQ-corrected sampled softmax learns."""
    rng = np.random.default_rng(0)
    n_items, n_users = 100_000, 2000
    # Each customer draws from one of 50 blocks of items, so there is structure to learn.
    block = rng.integers(0, 50, size=n_users)
    per_user = 12
    u = np.repeat(np.arange(n_users), per_user)
    items_in_block = n_items // 50
    it = block[u] * items_in_block + rng.zipf(1.3, size=len(u)) % items_in_block
    ts = np.tile(np.arange(per_user), n_users) * DAY + 1_000_000
    ev = pd.DataFrame(
        {
            "user_id": u.astype(str),
            "item_id": it.astype(str),
            "ts": ts,
            "event": "purchase",
            "session_id": np.tile(np.arange(per_user), n_users),
        }
    )
    cat = pd.DataFrame({"item_id": np.arange(n_items).astype(str), "category": "", "price": 1.0})
    data = RetailData("large", ev, cat, pd.DataFrame({"user_id": np.arange(n_users).astype(str)}))
    split = time_split(data)
    vocab = build_vocab(data)
    rows = build_train_rows(split.train, vocab, "time")
    valid = build_eval_set(
        "valid", split.train, split.valid, vocab, data.target_events, now=split.params["t1"]
    )
    full = replace(
        TwoTowerConfig(), dim=16, epochs=1, progress=False, full_softmax_max_items=50_000
    )
    with pytest.raises(ValueError, match="sampled"):
        train_two_tower(vocab, rows, valid, full)
    cfg = replace(full, loss="sampled", negatives=2048, epochs=3, batch_size=256, lr=1e-2)
    _, _, hist = train_two_tower(vocab, rows, valid, cfg)
    losses = [e["train_loss"] for e in hist.epochs]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # Far better than chance on held-out purchases (chance Recall@20 = 20 / 100k).
    assert hist.best_metric > 50 * 20 / n_items
