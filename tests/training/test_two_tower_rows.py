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
from training.ranker import RankerConfig, customer_profiles, item_table_at, session_window_at
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
            "hour_sin",
            "log_cart_size",
            "cart_copurchase",
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


def in_session_data() -> RetailData:
    """Three customers around a cut-off at day 10 (times in seconds after it)."""
    c = 10 * DAY + 1_000_000
    rows = [
        # a: before the cut-off views i0 and buys i1 (session 1). After it, session 2
        # carts i2, views and carts i3, carts i4 and buys i2, i3, i4; session 3 buys i0.
        ("a", "i0", -5 * DAY, "view", 1),
        ("a", "i1", -5 * DAY, "purchase", 1),
        ("a", "i2", 10, "cart", 2),
        ("a", "i3", 20, "view", 2),
        ("a", "i3", 30, "cart", 2),
        ("a", "i4", 40, "cart", 2),
        ("a", "i2", 50, "purchase", 2),
        ("a", "i3", 50, "purchase", 2),
        ("a", "i4", 50, "purchase", 2),
        ("a", "i5", 2 * DAY, "purchase", 3),
        # b: one item carted in the first session after the cut-off: no in-session list.
        ("b", "i1", -3 * DAY, "purchase", 4),
        ("b", "i2", 100, "cart", 5),
        ("b", "i3", 200, "purchase", 5),
        ("b", "i4", 3 * DAY, "cart", 6),
        ("b", "i5", 3 * DAY + 10, "cart", 6),
        # d: no history before the cut-off; carts i1 (twice), i0 then i5, buys i5: the cut
        # follows the second distinct item (4 // 2), i0.
        ("d", "i1", 60, "cart", 7),
        ("d", "i1", 70, "cart", 7),
        ("d", "i0", 80, "cart", 7),
        ("d", "i3", 85, "cart", 7),
        ("d", "i5", 90, "cart", 7),
        ("d", "i5", 95, "purchase", 7),
    ]
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "event", "session_id"])
    ev["ts"] = ev["ts"] + c
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(6)],
            "category": ["x", "x", "y", "y", "z", "z"],
            "price": [1.0, 10.0, 30.0, 2.0, 7.0, 4.0],
        }
    )
    return RetailData("hand", ev, items, pd.DataFrame({"user_id": ["a", "b", "d"]}))


def test_in_session_cut_lists_from_a_hand_made_log() -> None:
    """The cart, cut time, surface, labels and truth of each in-session list are known
    exactly; so are the co-purchase counts the cart features read."""
    data = in_session_data()
    vocab = build_vocab(data)
    c = 10 * DAY + 1_000_000
    ev = data.events
    hist, fut = ev[ev["ts"] < c], ev[ev["ts"] >= c]
    win = session_window_at(hist, fut, vocab, data, RankerConfig(), "labels")
    assert win is not None and win.surface == "cart"
    users = [str(x) for x in vocab.user_codes[win.es.users]]
    assert users == ["a", "d"]  # b carted one item in its first session after the cut-off
    row = {iid: k for k, iid in enumerate(vocab.item_ids)}
    # a: 3 items carted in the session, cut after the first (i2) at c + 10; d: 4 distinct
    # (i1 twice), cut after the second (i0) at c + 80.
    assert win.nows.tolist() == [c + 10, c + 80]
    carts = [[line.item_id for line in p.cart.lines] for p in win.profiles]
    assert carts == [["i2"], ["i0", "i1"]]  # latest add first, as the profile lists it
    assert (win.es.context[:, 0] == vocab.surfaces.index("cart")).all()

    def as_dict(m: object, k: int) -> dict[str, float]:
        r = m.getrow(k)  # type: ignore[attr-defined]
        return {vocab.item_ids[i]: float(v) for i, v in zip(r.indices, r.data, strict=True)}

    # Labels: what followed the cut on items new to the customer (the cart's are not):
    # a viewed, carted and bought i3 (4), carted and bought i4 (4), bought i5 later (4).
    assert as_dict(win.labels, 0) == {"i3": 4.0, "i4": 4.0, "i5": 4.0}
    # d: carted i3 (2), carted and bought i5 (4).
    assert as_dict(win.labels, 1) == {"i3": 2.0, "i5": 4.0}
    held = session_window_at(hist, fut, vocab, data, RankerConfig(), "truth")
    assert held is not None
    assert as_dict(held.truth, 0) == {"i3": 1.0, "i4": 1.0, "i5": 1.0}
    assert as_dict(held.truth, 1) == {"i5": 1.0}
    # History at the cut: what came before it, and nothing after.
    assert set(as_dict(win.es.history, 0)) == {"i0", "i1", "i2"}
    assert set(as_dict(win.es.history, 1)) == {"i1", "i0"}
    # Only customers asked for (codes) get lists.
    only_d = session_window_at(
        hist, fut, vocab, data, RankerConfig(), "labels", vocab.user_codes.get_indexer(["d"])
    )
    assert only_d is not None and [str(x) for x in vocab.user_codes[only_d.es.users]] == ["d"]

    # Co-purchase over the whole log: baskets are (customer, session) with a cart or
    # purchase. i2+i3+i4 share a's session 2; i1, i0, i3, i5 share d's session 7; i2, i3
    # share b's session 5; i4, i5 b's session 6.
    table = item_table_at(ev, vocab, float(ev["ts"].max()), 28.0, 7.0)
    baskets = dict(zip(vocab.item_ids, table.baskets.tolist(), strict=True))
    assert baskets == {"i0": 1, "i1": 3, "i2": 2, "i3": 3, "i4": 2, "i5": 3}

    def co(a: str, b: str) -> float:
        r = row[a]
        idx = table.co_indices[table.co_indptr[r] : table.co_indptr[r + 1]].tolist()
        cnt = table.co_counts[table.co_indptr[r] : table.co_indptr[r + 1]].tolist()
        return dict(zip(idx, cnt, strict=True)).get(row[b], 0.0)

    assert co("i2", "i3") == co("i3", "i2") == 2.0
    assert co("i3", "i5") == 1.0 and co("i4", "i5") == 1.0 and co("i2", "i5") == 0.0
    assert co("i2", "i2") == 0.0
    # The cart features of a cart [i2, i4]: i3 shares 2 baskets with i2 and 1 with i4.
    from services.models.ranker import CandidateDetails, RankerQuery, build_features

    q = RankerQuery(now=c, cart=["i2", "i4"])
    ids = ["i3", "i5", "i0"]
    cands = CandidateDetails(
        ids, np.zeros(3), np.zeros(3), np.full(3, -1.0), np.zeros(3), ["", "", ""]
    )
    x = build_features(q, cands, table)
    f = FEATURES.index
    assert x[:, f("log_cart_size")] == pytest.approx([np.log1p(2)] * 3)
    assert x[:, f("cart_copurchase")] == pytest.approx([np.log1p(3), np.log1p(1), 0.0])
    # Best cosine with one cart item: i3-i2 2/sqrt(3*2); i5-i4 1/sqrt(3*2).
    assert x[:, f("cart_cooc_max")] == pytest.approx([2 / np.sqrt(6), 1 / np.sqrt(6), 0.0])


def test_in_session_list_features_at_serving_equal_those_in_training() -> None:
    """An in-session cut list (cart page, the customer's own time) as training builds it
    (``session_window_at``: the profile from the events up to the cut) and as the services
    see the same moment (the profile service's profile from its log up to the cut, the
    same context): every feature equal, the cart, co-purchase and time features varying."""
    data = generate(TINY)
    logs = served_logs(data)
    cfg = ProfileConfig()
    vocab = build_vocab(data)
    ev = data.events
    c = float(np.quantile(ev["ts"].to_numpy(), 0.5))
    hist, fut = ev[ev["ts"] < c], ev[ev["ts"] >= c]
    win = session_window_at(hist, fut, vocab, data, RankerConfig(), "labels")
    assert win is not None and win.nows is not None
    table = item_table_at(hist, vocab, c, 28.0, 7.0)
    ts_count = ev.groupby(["user_id", "ts"]).size()
    rng = np.random.default_rng(0)
    varied: dict[str, set[float]] = {}
    compared = 0
    for k, u in enumerate(vocab.user_codes[win.es.users].astype(str).tolist()):
        t = int(win.nows[k])
        if ts_count[(u, t)] > 1:  # another event at the cut's second: order is ambiguous
            continue
        mine = [e for e in logs[u] if e.ts_us <= t * 1_000_000]
        served = build_profile(u, recompute_profile(mine, cfg), None, t * 1_000_000, cfg)
        trained = win.profiles[k]
        assert [x.item_id for x in served.cart.lines] == [x.item_id for x in trained.cart.lines]
        context = common_pb2.Context(surface=common_pb2.SURFACE_CART)
        context.timestamp.FromSeconds(t)
        # Candidates: the cart's co-purchased items and random ones.
        nb = table.cart_neighbours([x.item_id for x in trained.cart.lines])
        ids = list(dict.fromkeys([vocab.item_ids[r] for r in nb][:10]))
        ids += [i for i in rng.choice(vocab.item_ids, 20, replace=False) if i not in ids][:10]
        n = len(ids)
        cands = CandidateSet(
            ids, rng.random(n), [0] * n, {int(common_pb2.REASON_MODEL): rng.normal(size=n)}
        )
        items = CandidateArrays.empty(n)
        want = request_features(table, served, context, cands, items)
        got = request_features(table, trained, context, cands, items)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=u)
        compared += 1
        for name in (
            "log_cart_size",
            "cart_copurchase",
            "cart_cooc_max",
            "hour_sin",
            "weekday_cos",
            "category_in_cart",
            "surface_cart",
        ):
            varied.setdefault(name, set()).update(want[:, FEATURES.index(name)].round(6).tolist())
    assert compared >= 10
    for name, values in varied.items():
        if name != "surface_cart":
            assert len(values) >= 2, name
    assert varied["surface_cart"] == {1.0}
