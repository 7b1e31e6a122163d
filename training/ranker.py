"""Training of the ranker (``mercato-ranker``): candidates from the two-tower, labels from
what each customer did next, features the ranking service can compute from a Rank
request, a small MLP with a listwise loss, evaluation against the retrieval order.

Windows (a time split of the same data and options as ``mercato train retrieval``, so
the split signature is the two-tower's)::

    train  ─────────────── t1 ───── valid ───── t2 ───── test ─────▶
    two-tower fit        │ ranker fit / early-stop │ held-out evaluation
                         │ (state at t1, labels    │ (state at t2, truth =
                         │  = events in valid)     │  purchases in test)

- The two-tower is trained on ``train`` in the same run (default; same code and options as
  ``mercato train retrieval``), or loaded from the registry by alias when its bundle was
  trained on the same data and split (``two_tower="registry"``). Training it here is the
  default because the ranker's label windows must be *after* the two-tower's training
  data, which a registered version does not guarantee (its split signature is checked).
- For every customer with history at the cutoff, the two-tower's top ``candidates``
  items (history excluded, as in the retrieval evaluation) are the list; each candidate's
  label is the strongest thing the customer did with it in the next window (view 1, add
  to cart 2, purchase 4 by default).
- In-session cart lists (:func:`session_window_at`, ``RankerConfig.cart_lists``, off by
  default): at each cutoff, customers whose next session adds two or more items to the
  cart also get a list cut inside that session (cart = what they had added by then,
  surface cart, the add's time, labels = what followed), so a list can have a cart and
  its own request time.
- Features: :func:`services.models.ranker.build_features` (shared with serving), from a
  profile-like view of the customer at the cutoff (recent items with times, cart,
  time-decayed category affinity as the profile service computes it, mean unit price);
  the network reads :data:`DEFAULT_FEATURES` unless ``RankerConfig.features`` says.
- Model: :class:`services.models.ranker.RankerNet`, wide & deep over standardised
  features, initialised to rank exactly by the retrieval score; trained with a listwise
  softmax cross-entropy (ListNet top-1) or pointwise weighted BCE; early stopping on
  validation NDCG@10 of a held-out 20 % of the customers of the fit window. The
  untrained model is "epoch 0": best epoch 0 means no epoch beat the retrieval order on
  validation and the exported model ranks as retrieval does.
- Evaluation on the test window: NDCG@K / Recall@K of the ranker order and of the
  retrieval order over the same candidate lists, with the retrieval evaluation's
  definitions (binary gain on target events of items new to the customer; IDCG over
  all of them, so a list cannot reach 1 when truth items were not retrieved).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pandas as pd
import scipy.sparse as sp

import mercato.features as shared
from mercato.v1 import common_pb2
from services.common.threads import configure_threads
from services.models.item2item import from_rows
from services.models.ranker import (
    CART_FEATURES,
    FEATURES,
    FORMAT_VERSION,
    MODEL_NAME,
    MODEL_TYPE,
    TIME_FEATURES,
    ItemTable,
    RankerBundle,
    RankerBundleError,
    RankerNet,
)
from services.models.registry import BUNDLE_ARTIFACT_PATH
from services.ranking.scoring import no_ranker
from services.retrieval.model import RetrievalModel
from training.data import RetailData, Split
from training.evaluate import metrics_from_ranking
from training.features import (
    EvalSet,
    Vocab,
    build_eval_set,
    build_vocab,
    category_affinities,
    encode_events,
    walk_history,
)
from training.pipeline import TrainConfig, load_data, make_split, query_times
from training.replay import ReplayConfig, Variant, load_for_replay, replay_variants

DEFAULT_LABEL_WEIGHTS = {"view": 1.0, "cart": 2.0, "purchase": 4.0, "rating": 1.0}
RECENT_LIMIT = 50
GATE_METRIC = "valid_ndcg_10"
#: The promotion gate (:func:`replay_gate`): the served list replayed with the candidate
#: on the held-out validation customers, against the baseline its run replayed.
GATE_METRIC_SERVED = "valid_served_ndcg_10"
GATE_BASELINE_METRIC = "gate_baseline_ndcg_10"
GATE_CHAMPION_TAG = "gate_champion_version"
#: The network's default inputs (RankerConfig.features): every feature but the cart's
#: item-level ones and the time's, computed for every request all the same.
DEFAULT_FEATURES = tuple(f for f in FEATURES if f not in (*CART_FEATURES, *TIME_FEATURES))


@dataclass
class RankerConfig:
    """One ranker training run; ``retrieval`` holds the data, split and two-tower options
    exactly as ``mercato train retrieval`` takes them."""

    retrieval: TrainConfig = field(default_factory=TrainConfig)
    two_tower: str = "train"  # "train" | "registry"
    two_tower_model: str = "mercato-two-tower"
    two_tower_alias: str = "champion"
    candidates: int = 100  # list length: the first in the served (fused) order
    windows: int = 3  # cut-offs (rolling windows) of the fit lists, in the validation window
    start_from: str = "-fused_log_rank"  # the untrained net's order: the fused order
    # In-session cut lists (session_window_at): at each cut-off, customers whose next
    # session adds >= 2 items to the cart get a list cut inside it (surface cart). Off by
    # default: on the promotion gate's served list they lost on the demo's validation
    # with either stopping rule (docs/training.md, "Early stopping with cart lists").
    cart_lists: bool = False
    # What early stopping reads (with cart lists): "ordinary" = the held-out customers'
    # ordinary lists only, the kind the promotion gate replays; "pooled" = those and the
    # held-out in-session cart lists together. Fitting uses both kinds either way.
    stop_lists: str = "pooled"
    # The features the network reads (names from FEATURES, in FEATURES order; empty =
    # all). Default: all but the cart and time ones, which did not validate better
    # (docs/training.md, "Cart and time features").
    features: tuple[str, ...] = field(default_factory=lambda: DEFAULT_FEATURES)
    copurchase_top: int = 20  # co-purchase neighbours kept per item (ItemTable)
    # two_tower="registry" only: accept a champion refit on train + validation (its scores
    # saw the labels of the ranker's validation lists: a leak). Logged and warned.
    allow_refit_two_tower: bool = False
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    hidden: tuple[int, ...] = (64, 32)
    loss: str = "listwise"  # "listwise" | "pointwise"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    epochs: int = 30
    patience: int = 5
    batch_lists: int = 128
    early_stop_k: int = 10
    early_stop_on: str = "truth"  # "truth" (purchase NDCG, as evaluated) | "labels" (graded)
    ks: tuple[int, ...] = (10, 20)
    label_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LABEL_WEIGHTS))
    valid_user_frac: float = 0.2
    max_users: int = 4000  # cap on customers per fit window and on test lists (0 = all)
    popularity_days: float = 28.0
    trend_days: float = 7.0
    smoke_rows: int = 32
    seed: int = 0
    threads: int = 1
    progress: bool = True
    tracking_uri: str = ""  # "" = services.common.settings.default_tracking_uri()
    artifact_root: str = ""
    experiment: str = "mercato-ranker"
    model_name: str = MODEL_NAME
    alias: str = "challenger"
    register: bool = True
    run_name: str = ""

    def feature_names(self) -> list[str]:
        """The network's input features (:attr:`features`, default all), checked."""
        if not self.features:
            return list(FEATURES)
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown ranker features: {unknown}")
        names = [f for f in FEATURES if f in set(self.features)]
        if self.start_from.lstrip("-") not in names:
            raise ValueError(f"features must include start_from's {self.start_from!r}")
        return names

    def params(self) -> dict[str, Any]:
        out = {f"retrieval.{k}": v for k, v in self.retrieval.params().items()}
        for k, v in asdict(self).items():
            if k == "retrieval":
                continue
            out[k] = json.dumps(v) if isinstance(v, dict | list | tuple) else v
        return out


# --------------------------------------------------------------------------- lists


@dataclass
class RankLists:
    """Candidate lists of one window: one row per customer, ``N`` candidates each."""

    users: list[str]
    rows: np.ndarray  # [U, N] item rows (-1 = padding)
    retrieval: np.ndarray  # [U, N] retrieval scores
    x: np.ndarray  # [U, N, F] features
    labels: np.ndarray  # [U, N] graded labels from the next window
    truth: sp.csr_matrix  # [U, n_items] target events on items new to the customer
    mask: np.ndarray  # [U, N] True for real candidates

    def __len__(self) -> int:
        return len(self.users)

    def take(self, idx: np.ndarray) -> RankLists:
        return RankLists(
            users=[self.users[i] for i in idx],
            rows=self.rows[idx],
            retrieval=self.retrieval[idx],
            x=self.x[idx],
            labels=self.labels[idx],
            truth=self.truth[idx],
            mask=self.mask[idx],
        )


def category_transitions(
    history: pd.DataFrame, vocab: Vocab, min_p: float = 0.005
) -> dict[str, dict[str, float]]:
    """P(next category b | category a) over consecutive events of a session that change
    category (a != b): complements (phone -> phone case) and common paths."""
    cat_names = np.asarray(vocab.categories, dtype=object)[vocab.item_category]
    h = pd.DataFrame(
        {
            "u": history["user_id"].to_numpy(),
            "s": history["session_id"].to_numpy(),
            "ts": history["ts"].to_numpy(),
            "c": cat_names[history["item_id"].map(vocab.item_row).to_numpy(np.int64)],
        }
    ).sort_values(["u", "s", "ts"], kind="stable")
    same = (h["u"].to_numpy()[1:] == h["u"].to_numpy()[:-1]) & (
        h["s"].to_numpy()[1:] == h["s"].to_numpy()[:-1]
    )
    a, b = h["c"].to_numpy()[:-1], h["c"].to_numpy()[1:]
    keep = same & (a != b) & (a != "") & (b != "")
    counts = pd.DataFrame({"a": a[keep], "b": b[keep]}).groupby(["a", "b"]).size()
    out: dict[str, dict[str, float]] = {}
    totals = counts.groupby(level=0).sum()
    for (ca, cb), n in counts.items():
        p = float(n) / float(totals[ca])
        if p >= min_p:
            out.setdefault(str(ca), {})[str(cb)] = p
    return out


BASKET_EVENTS = ("cart", "purchase")
MAX_BASKET = 50  # items of a basket counted for co-purchase (bigger ones: their first 50)


def copurchase_table(
    history: pd.DataFrame, vocab: Vocab, top: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Co-purchase of the items in ``history``: a basket is one customer's session; an
    item is in it when the customer carted or bought it there. Returns (baskets per item
    [n_items], CSR indptr, indices, counts): each item's ``top`` items sharing the most
    baskets with it (ties: lower row first), itself excluded. Sparse throughout (no
    item x item dense matrix)."""
    n = vocab.n_items
    h = history[history["event"].isin(BASKET_EVENTS)]
    empty = (np.zeros(n), np.zeros(n + 1, dtype=np.int64), np.zeros(0, np.int64), np.zeros(0))
    if len(h) == 0 or top <= 0:
        return empty
    rows = h["item_id"].map(vocab.item_row).to_numpy(np.int64)
    b = pd.DataFrame(
        {"u": h["user_id"].to_numpy(), "s": h["session_id"].to_numpy(), "i": rows}
    ).drop_duplicates()
    b["k"] = b.groupby(["u", "s"], sort=False).ngroup()
    b = b[b.groupby("k", sort=False).cumcount() < MAX_BASKET]
    k = b["k"].to_numpy(np.int64)
    i = b["i"].to_numpy(np.int64)
    m = sp.csr_matrix((np.ones(len(k)), (k, i)), shape=(int(k.max()) + 1, n))
    baskets = np.asarray(m.sum(0)).ravel()
    # each item's top co-purchased items: the item-to-item models' top-N selection
    # (self pairs and zeros dropped, ties by lower row), over the sparse XᵀX
    co = (m.T @ m).tocoo()
    nb = from_rows(vocab.item_ids, co.row, co.col, co.data, top)
    return (
        baskets,
        nb.indptr.astype(np.int64),
        nb.indices.astype(np.int64),
        nb.scores.astype(np.float64),
    )


def item_table_at(
    history: pd.DataFrame,
    vocab: Vocab,
    now: float,
    popularity_days: float,
    trend_days: float,
    copurchase_top: int = 20,
) -> ItemTable:
    """Popularity and trend of every catalog item from the interactions before ``now``,
    and their co-purchase (:func:`copurchase_table`)."""
    rows = history["item_id"].map(vocab.item_row).to_numpy(np.int64)
    ts = history["ts"].to_numpy(np.float64)
    n = vocab.n_items
    if (ts == 0).all():  # no timestamps: all history counts, no trend
        long_c = np.bincount(rows, minlength=n).astype(np.float64)
        short_c = long_c * (trend_days / popularity_days)
    else:
        long_c = np.bincount(rows[ts >= now - popularity_days * 86_400], minlength=n).astype(
            np.float64
        )
        short_c = np.bincount(rows[ts >= now - trend_days * 86_400], minlength=n).astype(np.float64)
    first_seen = np.zeros(n)  # first interaction before now (0 = none, or no timestamps)
    if len(rows) and not (ts == 0).all():
        first = pd.Series(ts).groupby(rows).min()
        first_seen[first.index.to_numpy(np.int64)] = first.to_numpy()
    short_rate = short_c / trend_days
    long_rate = long_c / popularity_days
    baskets, co_indptr, co_indices, co_counts = copurchase_table(history, vocab, copurchase_top)
    return ItemTable(
        item_ids=list(vocab.item_ids),
        category=[vocab.categories[c] for c in vocab.item_category],
        price=vocab.item_price.astype(np.float64),
        popularity=np.log1p(long_c),
        trend=np.log((short_rate + 1.0) / (long_rate + 1.0)),
        transitions=category_transitions(history, vocab),
        first_seen=first_seen,
        baskets=baskets,
        co_indptr=co_indptr,
        co_indices=co_indices,
        co_counts=co_counts,
    )


def customer_profiles(
    history: pd.DataFrame, users: list[str], vocab: Vocab, now: float | dict[str, float]
) -> list[common_pb2.Profile]:
    """Each customer's profile at ``now`` (or at each customer's own time, ``now`` as
    customer -> time) as the profile service would send it, from the events before it:
    recent items (distinct, newest first, with times), purchases,
    cart, category affinity, RFM, segment, price band, country, first and last seen.
    RFM, segment, band and affinity are :mod:`mercato.features`' definitions (the
    profile service's); amounts use the catalogue price of each purchase event, as the
    two-tower's context features do (:func:`training.features.walk_history`)."""
    want = set(users)
    h = history[history["user_id"].isin(want)]
    h = h.iloc[np.argsort(h["ts"].to_numpy(), kind="stable")]
    rows = h["item_id"].map(vocab.item_row).to_numpy(np.int64)
    h = h.assign(_row=rows, _price=vocab.item_price.astype(np.float64)[rows])
    last = (
        h.groupby(["user_id", "item_id"], sort=False)["ts"]
        .max()
        .reset_index()
        .sort_values(["user_id", "ts", "item_id"], ascending=[True, False, True], kind="stable")
    )
    last = last.groupby("user_id", sort=False).head(RECENT_LIMIT)
    recent: dict[str, list[tuple[str, float]]] = {}
    for u, i, t in zip(last["user_id"], last["item_id"], last["ts"], strict=True):
        recent.setdefault(str(u), []).append((str(i), float(t)))
    affinity = category_affinities(h, vocab)
    buys = h[h["event"] == "purchase"]
    per_item = (
        buys.groupby(["user_id", "item_id"], sort=False)["ts"].agg(["size", "max"]).reset_index()
    )
    bought: dict[str, list[tuple[str, int, float]]] = {}
    for u, i, n, t in zip(
        per_item["user_id"], per_item["item_id"], per_item["size"], per_item["max"], strict=True
    ):
        bought.setdefault(str(u), []).append((str(i), int(n), float(t)))
    agg = buys.groupby("user_id", sort=False).agg(
        orders=("session_id", "nunique"),
        monetary=("_price", "sum"),
        units=("_price", "size"),
        last=("ts", "max"),
    )
    seen = h.groupby("user_id", sort=False)["ts"].agg(["min", "max"])

    adds = h[h["event"] == "cart"]
    cart_added = {
        (str(u), str(i)): float(t)
        for (u, i), t in adds.groupby(["user_id", "item_id"], sort=False)["ts"].max().items()
    }

    def now_of(u: str) -> float:
        return now[u] if isinstance(now, dict) else now

    enc = encode_events(h, vocab)
    # walk_history's time only sets segment and band, which are not read here.
    codes, feats = walk_history(enc, vocab)
    code_of = vocab.user_codes.get_indexer(users)
    cart_at = {int(c): k for k, c in enumerate(codes.tolist())}
    out = []
    for u, code in zip(users, code_of.tolist(), strict=True):
        p = common_pb2.Profile(customer_id=u, known=True)
        for item_id, ts in recent.get(u, []):
            r = p.recent_items.add(item_id=item_id)
            r.timestamp.FromSeconds(int(ts))
        for item_id, n, ts in sorted(bought.get(u, []), key=lambda b: (-b[2], b[0])):
            b = p.purchases.add(item_id=item_id, count=n, quantity=n)
            b.last_purchased_at.FromSeconds(int(ts))
        k = cart_at.get(code)
        if k is not None:
            # The profile's order: latest add first, then by item id.
            lines = [
                (-cart_added.get((u, vocab.item_ids[r - 1]), 0.0), vocab.item_ids[r - 1])
                for r in feats.cart[k].tolist()
                if r > 0
            ]
            for _, item_id in sorted(lines):
                p.cart.lines.add(item_id=item_id, quantity=1)
        p.category_affinity.update(affinity.get(u, {}))
        orders, monetary, units, last_buy = 0, 0.0, 0, None
        if u in agg.index:
            a = agg.loc[u]
            orders, monetary, units = int(a["orders"]), float(a["monetary"]), int(a["units"])
            last_buy = (now_of(u) - float(a["last"])) / shared.SECONDS_PER_DAY
        rfm = shared.rfm(orders, monetary, last_buy)
        p.rfm.recency_days = rfm.recency_days
        p.rfm.frequency = rfm.frequency
        p.rfm.monetary = rfm.monetary
        p.rfm.recency_score = rfm.recency_score
        p.rfm.frequency_score = rfm.frequency_score
        p.rfm.monetary_score = rfm.monetary_score
        p.segment = shared.segment(orders, rfm.recency_days if orders else 0.0)
        p.price_band = shared.price_band(monetary, units)
        if code >= 0:
            c = int(vocab.user_country[code])
            p.country = vocab.countries[c] if 0 < c < len(vocab.countries) else ""
        if u in seen.index:
            p.first_seen.FromSeconds(int(seen.loc[u, "min"]))
            p.last_seen.FromSeconds(int(seen.loc[u, "max"]))
        out.append(p)
    return out


def cutoffs(split: Split, windows: int) -> list[float]:
    """The ranker's list cut-offs: ``windows`` evenly spaced times in the validation
    window of a time split, ``[t1, t1 + w, ...]`` with ``w = (t2 - t1) / windows``
    (each labelled by what customers did from it to ``t2``); one (the validation query
    time) for other splits."""
    t1, t2 = query_times(split)
    if split.kind != "time" or windows <= 1 or t2 <= t1:
        return [t1]
    return [t1 + j * (t2 - t1) / windows for j in range(windows)]


@dataclass
class Window:
    """The customers of one cut-off: their queries (as the replay asks them), profiles,
    graded labels and purchase truth from what came after."""

    now: float
    es: EvalSet
    profiles: list[common_pb2.Profile]
    labels: sp.csr_matrix  # [U, n_items] strongest event weight on items new to them
    truth: sp.csr_matrix  # [U, n_items] target events on items new to them
    # In-session cut lists (session_window_at): each customer's own cut time, and the
    # surface their request is made on; None / "home": every list at ``now``.
    nows: np.ndarray | None = None
    surface: str = "home"

    def now_of(self, u: int) -> float:
        return float(self.nows[u]) if self.nows is not None else self.now


def _label_kinds(
    cfg: RankerConfig, data: RetailData, require: str
) -> tuple[dict[str, float], tuple[str, ...]]:
    """Label weights, and the events a customer needs after the cut to get a list: any
    labelled one (``require="labels"``) or a target event (``"truth"``)."""
    weights = {**DEFAULT_LABEL_WEIGHTS, **cfg.label_weights}
    events = tuple(sorted(e for e, w in weights.items() if w > 0))
    return weights, events if require == "labels" else tuple(data.target_events)


def window_at(
    history: pd.DataFrame,
    future: pd.DataFrame,
    vocab: Vocab,
    data: RetailData,
    now: float,
    cfg: RankerConfig,
    require: str,
    users: np.ndarray | None = None,
    max_users: int = 0,
) -> Window:
    """Customers with history before ``now`` and, after it, any labelled event on a new
    item (``require="labels"``) or a target event on one (``"truth"``); ``users`` (codes)
    restricts them."""
    weights, kinds = _label_kinds(cfg, data, require)
    es = build_eval_set("window", history, future, vocab, kinds, 0, cfg.seed, now=now)
    keep = np.arange(len(es))
    if users is not None:
        keep = np.flatnonzero(np.isin(es.users, users))
    if max_users and len(keep) > max_users:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(keep, max_users, replace=False))
    es = es.take(keep)
    labels, truth = _window_labels(es, future, vocab, data, weights)
    users_s = [str(x) for x in vocab.user_codes[es.users]]
    return Window(now, es, customer_profiles(history, users_s, vocab, now), labels, truth)


def _window_labels(
    es: EvalSet, future: pd.DataFrame, vocab: Vocab, data: RetailData, weights: dict[str, float]
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Graded labels and purchase truth of ``es``'s customers from ``future``, on items
    new to them."""
    idx = pd.Index(es.users)
    fu = vocab.user_codes.get_indexer(future["user_id"]).astype(np.int64)
    fi = future["item_id"].map(vocab.item_row).to_numpy(np.int64)
    fw = future["event"].map(weights).fillna(0.0).to_numpy(np.float64)
    at = idx.get_indexer(fu)
    ok = (at >= 0) & (fw > 0)
    g = (
        pd.DataFrame({"u": at[ok], "i": fi[ok], "w": fw[ok]})
        .groupby(["u", "i"], sort=False)["w"]
        .max()
        .reset_index()
    )
    shape = (len(es), vocab.n_items)
    labels = sp.csr_matrix((g["w"].to_numpy(), (g["u"].to_numpy(), g["i"].to_numpy())), shape)
    labels = (labels - labels.multiply(es.exclude)).tocsr()
    labels.eliminate_zeros()
    tgt = ok & future["event"].isin(data.target_events).to_numpy()
    truth = sp.csr_matrix((np.ones(int(tgt.sum())), (at[tgt], fi[tgt])), shape)
    truth.sum_duplicates()
    truth.data[:] = 1.0
    truth = (truth - truth.multiply(es.exclude)).tocsr()
    truth.eliminate_zeros()
    return labels, truth


def session_cuts(future: pd.DataFrame, min_cart: int = 2) -> pd.DataFrame:
    """Where the in-session lists are cut: for each customer whose first session in
    ``future`` (the session of their first event in it) adds ``min_cart`` or more
    distinct items to the cart, the cut follows the first half of them (at least one):
    its row in ``future`` (``pos``, by position) and time ``ts``, and the cart items
    added by then. One row per such customer."""
    f = future.reset_index(drop=True)
    order = np.lexsort((np.arange(len(f)), f["ts"].to_numpy(), f["user_id"].to_numpy()))
    f = f.iloc[order]
    first = f.groupby("user_id", sort=False)["session_id"].transform("first")
    carts = f[(f["session_id"] == first) & (f["event"] == "cart")]
    carts = carts[~carts.duplicated(["user_id", "item_id"])]
    n = carts.groupby("user_id", sort=False)["item_id"].transform("size")
    carts = carts[n >= min_cart]
    k = np.maximum(1, carts.groupby("user_id", sort=False)["item_id"].transform("size") // 2)
    nth = carts.groupby("user_id", sort=False).cumcount() + 1
    cut = carts[nth == k]
    cart = carts[nth <= k].groupby("user_id", sort=False)["item_id"].agg(list)
    return pd.DataFrame(
        {
            "user_id": cut["user_id"].to_numpy(),
            "pos": cut.index.to_numpy(np.int64),
            "ts": cut["ts"].to_numpy(np.float64),
            "cart": [cart[u] for u in cut["user_id"]],
        }
    )


def session_window_at(
    history: pd.DataFrame,
    future: pd.DataFrame,
    vocab: Vocab,
    data: RetailData,
    cfg: RankerConfig,
    require: str,
    users: np.ndarray | None = None,
    max_users: int = 0,
) -> Window | None:
    """In-session cut lists (#13): customers' lists cut inside their first session after
    the cut-off (:func:`session_cuts`), so the cart holds what they had added by then.
    Each customer's history is ``history`` plus their events up to and including the
    cut (by position), their labels what followed in ``future``, their request time the
    cut's and their surface "cart"; the profile (and so the cart the ranker's features
    read) is :func:`customer_profiles`' of that history, as for every other list.
    None when no customer qualifies."""
    weights, kinds = _label_kinds(cfg, data, require)
    f = future.reset_index(drop=True)
    cuts = session_cuts(f)
    if users is not None:
        codes = vocab.user_codes.get_indexer(cuts["user_id"])
        cuts = cuts[np.isin(codes, users)]
    if len(cuts) == 0:
        return None
    cut_at = dict(zip(cuts["user_id"].tolist(), cuts["pos"].tolist(), strict=True))
    order = np.lexsort((np.arange(len(f)), f["ts"].to_numpy(), f["user_id"].to_numpy()))
    fs = f.iloc[order]
    fs = fs[fs["user_id"].isin(cut_at)]
    # Position of each row within its customer's time order, and of their cut row.
    rank = pd.Series(np.arange(len(fs)), index=fs.index)
    cut_rank = fs["user_id"].map({u: rank[p] for u, p in cut_at.items()}).to_numpy()
    before = rank.to_numpy() <= cut_rank
    h = pd.concat([history[history["user_id"].isin(cut_at)], fs[before]], ignore_index=True)
    fut = fs[~before]
    times = dict(zip(cuts["user_id"].tolist(), cuts["ts"].tolist(), strict=True))
    user_times = {
        int(c): times[u]
        for u, c in zip(cuts["user_id"], vocab.user_codes.get_indexer(cuts["user_id"]), strict=True)
    }
    es = build_eval_set("cart", h, fut, vocab, kinds, 0, cfg.seed, user_times=user_times)
    if max_users and len(es) > max_users:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(es), max_users, replace=False))
        es = es.take(keep)
    if len(es) == 0:
        return None
    if "cart" in vocab.surfaces:
        es.context[:, 0] = vocab.surfaces.index("cart")
    labels, truth = _window_labels(es, fut, vocab, data, weights)
    users_s = [str(x) for x in vocab.user_codes[es.users]]
    nows = np.array([times[u] for u in users_s], dtype=np.float64)
    profiles = customer_profiles(h, users_s, vocab, dict(zip(users_s, nows.tolist(), strict=True)))
    return Window(float(nows.min()), es, profiles, labels, truth, nows=nows, surface="cart")


def build_lists(
    win: Window,
    model: RetrievalModel,
    vocab: Vocab,
    table: ItemTable,
    cfg: RankerConfig,
    replay_cfg: ReplayConfig,
    keep_responses: list[Any] | None = None,
) -> RankLists:
    """Each customer's candidate list as served: the replay's Retrieve request
    (:func:`training.replay.request_of`: both sources, the merge with the bundle's
    weights) and the Rank request's features computed by the ranking service's own
    function (:func:`services.ranking.ranker.request_features`) over all the
    candidates; the list keeps the first ``cfg.candidates`` in the fused order.
    Retrieve's answers are appended to ``keep_responses`` when given (the replay of the
    same customers reuses them: :func:`training.replay.replay_variants`)."""
    from services.ranking.pipeline import merge_columns
    from services.ranking.ranker import request_features
    from services.ranking.table import CandidateArrays
    from services.retrieval.merge import merge_config
    from services.retrieval.server import retrieve_response
    from training.replay import SURFACES, request_of

    merge = replay_cfg.merge or merge_config(model)
    n_users, n = len(win.es), cfg.candidates
    cols = np.array([FEATURES.index(f) for f in cfg.feature_names()], dtype=np.int64)
    rows = np.full((n_users, n), -1, dtype=np.int64)
    fused = np.zeros((n_users, n))
    x = np.zeros((n_users, n, len(cols)), dtype=np.float32)
    surface = SURFACES.get(win.surface, common_pb2.SURFACE_HOME)
    for u in range(n_users):
        context = common_pb2.Context(surface=surface)
        context.timestamp.FromSeconds(int(win.now_of(u)))
        req, _, _ = request_of(win.es, vocab, u, replay_cfg)
        if win.surface == "cart":
            # On the cart page the gateway sends the profile with its cart: retrieval's
            # item-to-item source starts from it too.
            req.profile.cart.CopyFrom(win.profiles[u].cart)
        resp = retrieve_response(model, model.state, req, merge)
        if keep_responses is not None:
            keep_responses.append(resp)
        if not resp.columns.item_ids:
            continue
        cset = merge_columns(resp.columns)
        feats = request_features(
            table, win.profiles[u], context, cset, CandidateArrays.empty(len(cset))
        )
        m = min(n, len(cset))
        rows[u, :m] = [vocab.item_row.get(i, -1) for i in cset.ids[:m]]
        fused[u, :m] = cset.scores[:m]
        x[u, :m] = feats[:m][:, cols]
    mask = rows >= 0
    labels = np.zeros(rows.shape, dtype=np.float32)
    for u in range(n_users):
        a, b = win.labels.indptr[u], win.labels.indptr[u + 1]
        if a == b:
            continue
        got = dict(
            zip(win.labels.indices[a:b].tolist(), win.labels.data[a:b].tolist(), strict=True)
        )
        labels[u] = [got.get(r, 0.0) for r in rows[u].tolist()]
    users = [str(v) for v in vocab.user_codes[win.es.users]]
    return RankLists(users, rows, np.where(mask, fused, 0.0), x, labels, win.truth, mask)


# --------------------------------------------------------------------------- metrics


def rerank_metrics(
    rows: np.ndarray, scores: np.ndarray, truth: sp.csr_matrix, ks: tuple[int, ...]
) -> dict[str, float]:
    """Mean NDCG@K / Recall@K / HitRate@K when each list ``rows`` [U, N] (item rows, -1 =
    padding) is ordered by ``scores`` [U, N] (stable: ties keep the list order), with
    the retrieval evaluation's definitions (:func:`training.evaluate.metrics_from_ranking`);
    users without truth are skipped."""
    if len(rows) == 0:
        return {"users": 0.0}
    s = np.where(rows >= 0, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    ranked = np.take_along_axis(rows, order, axis=1)
    width = max(ks)
    if ranked.shape[1] < width:
        ranked = np.pad(ranked, ((0, 0), (0, width - ranked.shape[1])), constant_values=-1)
    has = np.diff(truth.tocsr().indptr) > 0
    per_user = metrics_from_ranking(ranked[has], truth[has], ks)
    out = {name: float(v.mean()) if len(v) else 0.0 for name, v in per_user.items()}
    out["users"] = float(has.sum())
    return out


def graded_ndcg(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Mean NDCG@k with the graded labels as linear gains, within each list (lists
    without a positive label are skipped)."""
    s = np.where(mask, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    gains = np.take_along_axis(np.where(mask, labels, 0.0), order, axis=1)
    disc = 1.0 / np.log2(np.arange(2, gains.shape[1] + 2))
    dcg = (gains * disc).sum(1)
    ideal = -np.sort(-np.where(mask, labels, 0.0), axis=1)[:, :k]
    idcg = (ideal * disc[: ideal.shape[1]]).sum(1)
    has = idcg > 0
    return float((dcg[has] / idcg[has]).mean()) if has.any() else 0.0


def format_comparison(results: dict[str, dict[str, dict[str, float]]], ks: tuple[int, ...]) -> str:
    """Markdown: per window, retrieval order vs ranker, and the relative change."""
    cols = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall")]
    lines = [
        "| window | order | users | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 3) + "|",
    ]
    for window, res in results.items():
        r, m = res["retrieval"], res["ranker"]
        for name, row in (("fused order (rules only)", r), ("ranker", m)):
            lines.append(
                f"| {window} | {name} | {int(row.get('users', 0))} | "
                + " | ".join(f"{row.get(c, float('nan')):.4f}" for c in cols)
                + " |"
            )
        change = []
        for c in cols:
            a, b = r.get(c, 0.0), m.get(c, 0.0)
            change.append(f"{(b - a) / a * 100:+.1f} %" if a > 0 else "n/a")
        lines.append(f"| {window} | change | | " + " | ".join(change) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training


@dataclass
class RankerHistory:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float = -math.inf
    seconds: float = 0.0


def _loss(net: RankerNet, x: Any, y: Any, m: Any, kind: str) -> Any:
    import torch
    import torch.nn.functional as F

    s = net(x)
    if kind == "listwise":
        s = s.masked_fill(~m, -1e9)
        y = y * m
        total = y.sum(1)
        has = total > 0
        if not bool(has.any()):
            return (s * 0.0).sum()
        p = y[has] / total[has].unsqueeze(1)
        return -(p * F.log_softmax(s[has], dim=1)).sum(1).mean()
    if kind == "pointwise":
        target = (y > 0).float()
        w = torch.where(y > 0, y, torch.ones_like(y)) * m
        bce = F.binary_cross_entropy_with_logits(s, target, reduction="none")
        return (bce * w).sum() / w.sum().clamp_min(1e-9)
    raise ValueError(f"loss must be 'listwise' or 'pointwise', not {kind!r}")


def _net_scores(net: RankerNet, x: np.ndarray) -> np.ndarray:
    import torch

    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy().astype(np.float64)


def train_ranker(
    fit: RankLists,
    valid: RankLists,
    cfg: RankerConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[RankerNet, RankerHistory]:
    """Fit the MLP on ``fit`` with early stopping on NDCG@K of ``valid``."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    names = cfg.feature_names()
    if fit.x.shape[-1] != len(names):
        raise ValueError(f"lists have {fit.x.shape[-1]} feature columns, cfg names {len(names)}")
    net = RankerNet(len(names), cfg.hidden, start_from=cfg.start_from, features=names)
    flat = fit.x[fit.mask]
    if len(flat):
        mean = flat.mean(0)
        std = flat.std(0)
        std = np.where(std > 1e-6, std, 1.0)
        net.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        net.std.copy_(torch.from_numpy(std.astype(np.float32)))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt, mt = (torch.from_numpy(a) for a in (fit.x, fit.labels, fit.mask))
    metric = f"ndcg@{cfg.early_stop_k}"
    ks = tuple(sorted({cfg.early_stop_k, *cfg.ks}))
    hist = RankerHistory()
    base = rerank_metrics(valid.rows, valid.retrieval, valid.truth, ks)

    # Epoch 0 is the untrained net, which ranks by the retrieval score: an epoch must beat
    # it to be kept, so the exported model is never worse than retrieval on validation.
    def stop_value(m: dict[str, float], scores: np.ndarray) -> float:
        if cfg.early_stop_on == "labels":
            return graded_ndcg(valid.labels, scores, valid.mask, cfg.early_stop_k)
        if cfg.early_stop_on == "truth":
            return m.get(metric, 0.0)
        raise ValueError(f"early_stop_on must be 'truth' or 'labels', not {cfg.early_stop_on!r}")

    s0 = _net_scores(net, valid.x)
    hist.best_metric = stop_value(rerank_metrics(valid.rows, s0, valid.truth, ks), s0)
    best: dict[str, Any] | None = copy.deepcopy(net.state_dict())
    bad = 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        net.train()
        perm = rng.permutation(len(fit))
        total, seen = 0.0, 0
        for a in range(0, len(perm), cfg.batch_lists):
            idx = torch.from_numpy(perm[a : a + cfg.batch_lists])
            loss = _loss(net, xt[idx], yt[idx], mt[idx], cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        sv = _net_scores(net, valid.x)
        m = rerank_metrics(valid.rows, sv, valid.truth, ks)
        stop = stop_value(m, sv)
        row = {
            "train_loss": total / max(seen, 1),
            f"epoch_valid_{metric.replace('@', '_')}": m.get(metric, 0.0),
            f"epoch_valid_recall_{cfg.early_stop_k}": m.get(f"recall@{cfg.early_stop_k}", 0.0),
            f"epoch_valid_retrieval_{metric.replace('@', '_')}": base.get(metric, 0.0),
            "epoch_valid_graded_ndcg": graded_ndcg(valid.labels, sv, valid.mask, cfg.early_stop_k),
            "epoch_seconds": time.perf_counter() - te,
        }
        hist.epochs.append({"epoch": float(epoch), **row})
        if cfg.progress:
            tqdm.write(
                f"ranker epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} valid "
                f"{metric} {m.get(metric, 0.0):.4f} (retrieval order {base.get(metric, 0.0):.4f})"
                f" {row['epoch_seconds']:.1f}s"
            )
        if on_epoch is not None:
            on_epoch(epoch, row)
        if stop > hist.best_metric:
            hist.best_metric, hist.best_epoch = stop, epoch
            best = copy.deepcopy(net.state_dict())
            bad = 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best is not None:
        net.load_state_dict(best)
    net.eval()
    hist.seconds = time.perf_counter() - t0
    return net, hist


def curve_plot(hist: RankerHistory, metric_key: str, path: Path) -> None:
    """Train loss and validation NDCG per epoch, with the retrieval order as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in hist.epochs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [r["train_loss"] for r in hist.epochs], marker="o")
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss")
    a2.plot(ep, [r[f"epoch_valid_{metric_key}"] for r in hist.epochs], marker="o", label="ranker")
    a2.plot(
        ep,
        [r[f"epoch_valid_retrieval_{metric_key}"] for r in hist.epochs],
        linestyle="--",
        label="retrieval order",
    )
    a2.axvline(hist.best_epoch, color="grey", linewidth=0.8)
    a2.set_xlabel("epoch")
    a2.set_ylabel(f"valid {metric_key.replace('_', '@')}")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- pipeline


@dataclass
class RankerResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    model_name: str
    version: str | None
    alias: str | None
    bundle_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]  # window -> order -> metric -> value
    split_signature: str
    best_epoch: int
    table: str
    two_tower: dict[str, str]
    smoke: dict[str, Any]
    # The replayed served list (training/replay.py) per part: "rules" (no ranker),
    # "ranker" (this one), "champion" (the champion ranker, validation only, when one
    # could be replayed); validation = the held-out customers.
    served: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    retrieval: Any = None  # training.pipeline.RegisteredResult when trained in this run


def _retrieval_models(
    cfg: RankerConfig, data: RetailData, split: Split, vocab: Vocab, uri: str
) -> tuple[dict[str, RetrievalModel], dict[str, str], Any]:
    """The retrieval versions the lists come from, loaded as the retrieval service loads
    them: "valid" (fit on train: the fit and validation lists) and "test" (served)."""
    if cfg.two_tower == "train":
        from training.pipeline import train_and_register

        rc = replace(cfg.retrieval, register=False, replay_served=True, tracking_uri=uri)
        rr = train_and_register(rc)
        models = {name: load_for_replay(d, rr.run_id) for name, d in rr.replay_dirs.items()}
        return models, {"source": "trained in this run", "run_id": rr.run_id}, rr
    if cfg.two_tower == "registry":
        from services.models import TwoTowerBundle, download_bundle

        info, local = download_bundle(
            cfg.two_tower_model,
            cfg.two_tower_alias,
            uri,
            Path(tempfile.mkdtemp(prefix="mercato-tt-")),
        )
        bundle = TwoTowerBundle.load(local)
        sig = bundle.config.get("split_signature", "")
        if sig != split.signature():
            raise ValueError(
                f"{cfg.two_tower_model}@{cfg.two_tower_alias} v{info.version} was trained on "
                f"split {sig or '?'}, this run's split is {split.signature()}: the ranker's "
                "label windows would overlap its training data (use --two-tower train, or "
                "the same data and split options)"
            )
        if bundle.item_ids != vocab.item_ids or bundle.vocab != vocab.as_json():
            raise ValueError("the registered two-tower's vocabularies differ from this data's")
        refit = refit_of(bundle.eval_report)
        name = f"{cfg.two_tower_model}@{cfg.two_tower_alias} v{info.version}"
        if refit is not False:
            what = (
                "was refit on train + validation"
                if refit
                else "has no eval report saying whether it was refit on train + validation"
            )
            if not cfg.allow_refit_two_tower:
                raise RefitTwoTowerError(
                    f"{name} {what}: its scores saw the labels of the ranker's validation "
                    "lists, so early stopping and the promotion gate would measure a leak. "
                    "Train the ranker with two_tower='train' (--two-tower train), register "
                    "a two-tower without refit (TrainConfig.refit=False), or opt in with "
                    "allow_refit_two_tower=True (logged; its validation numbers are not "
                    "to be trusted)"
                )
            warnings.warn(
                f"ranker trained on {name}, which {what} (allow_refit_two_tower=True): its "
                "validation numbers and promotion gate are optimistic",
                stacklevel=2,
            )
        model = load_for_replay(local, info.run_id)
        tt = {
            "source": f"{cfg.two_tower_model}@{cfg.two_tower_alias}",
            "version": info.version,
            "run_id": info.run_id,
            "refit_train_plus_valid": "unknown" if refit is None else str(refit).lower(),
            "refit_allowed": str(bool(cfg.allow_refit_two_tower)).lower(),
        }
        return {"valid": model, "test": model}, tt, None
    raise ValueError(f"two_tower must be 'train' or 'registry', not {cfg.two_tower!r}")


class RefitTwoTowerError(ValueError):
    """The registered two-tower the ranker would be trained on was refit on train +
    validation (or cannot say): refused unless ``allow_refit_two_tower``."""


def refit_of(eval_report: dict[str, Any]) -> bool | None:
    """Whether a two-tower bundle's eval report says it was refit on train + validation
    (``refit.train_plus_valid``); None when it does not say."""
    got = (eval_report or {}).get("refit", {})
    value = got.get("train_plus_valid") if isinstance(got, dict) else None
    return bool(value) if isinstance(value, bool) else None


def _client(cfg: RankerConfig) -> tuple[Any, str]:
    from training import registry

    return registry.client_for(cfg.tracking_uri or cfg.retrieval.tracking_uri or None)


def _columns(lists: RankLists, keep: np.ndarray) -> RankLists:
    return replace(lists, x=np.ascontiguousarray(lists.x[:, :, keep]))


def _concat(parts: list[RankLists]) -> RankLists:
    return RankLists(
        users=[u for p in parts for u in p.users],
        rows=np.concatenate([p.rows for p in parts]),
        retrieval=np.concatenate([p.retrieval for p in parts]),
        x=np.concatenate([p.x for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        truth=sp.vstack([p.truth for p in parts]).tocsr(),
        mask=np.concatenate([p.mask for p in parts]),
    )


STOP_LISTS = ("ordinary", "pooled")


def _check_stop_lists(cfg: RankerConfig) -> None:
    if cfg.stop_lists not in STOP_LISTS:
        raise ValueError(f"stop_lists must be one of {STOP_LISTS}, not {cfg.stop_lists!r}")


def select_stop_lists(
    cfg: RankerConfig, valid: RankLists, valid_cart: RankLists | None
) -> RankLists:
    """The lists early stopping reads (:attr:`RankerConfig.stop_lists`): the ordinary
    held-out lists, pooled with the held-out cart lists when ``"pooled"`` and the run
    fits on cart lists."""
    _check_stop_lists(cfg)
    if cfg.stop_lists == "ordinary" or valid_cart is None or not cfg.cart_lists:
        return valid
    return _concat([valid, valid_cart])


def _champion_scorer(cfg: RankerConfig, uri: str, signature: str) -> tuple[str, Any, str]:
    """(version, scorer or None, why not) of the current champion ranker."""
    from services.models.registry import download_bundle
    from services.ranking.ranker import RankerScorer
    from training import registry

    client, _ = registry.client_for(uri)
    try:
        mv = client.get_model_version_by_alias(cfg.model_name, "champion")
    except Exception:  # no registered model or no champion yet
        return "", None, "no champion"
    version = str(mv.version)
    if mv.tags.get("split_signature", "") != signature:
        return version, None, "the champion was trained on another split"
    try:
        info, local = download_bundle(
            cfg.model_name, "champion", uri, Path(tempfile.mkdtemp(prefix="mercato-rk-"))
        )
        return version, RankerScorer(RankerBundle.load(local), info), ""
    except RankerBundleError as e:  # a feature no longer computed: the service refuses it too
        return version, None, f"the champion cannot be loaded by this code: {e}"


def train_and_register_ranker(cfg: RankerConfig) -> RankerResult:
    """The whole ranker pipeline (module docstring); logs to MLflow and registers."""
    _check_stop_lists(cfg)  # before any list is built
    configure_threads(cfg.threads)
    import torch

    torch.manual_seed(cfg.seed)
    from mlflow.entities import Metric, Param

    from services.models.registry import ModelVersionInfo
    from services.ranking.ranker import RankerScorer
    from training import registry
    from training.pipeline import _eval_sets

    if cfg.early_stop_k > cfg.candidates or max(cfg.ks) > cfg.candidates:
        raise ValueError("candidates must be at least the largest K evaluated")
    rc = cfg.retrieval
    client, tracking_uri = _client(cfg)
    data = load_data(rc)
    split = make_split(data, rc)
    if split.kind != "time":
        print(f"note: {split.kind} split: one cut-off, windows are per-customer, not time")
    vocab = build_vocab(data, rc.features)
    models, tt_info, retrieval_result = _retrieval_models(cfg, data, split, vocab, tracking_uri)
    valid_es, test_es, _, hist_test = _eval_sets(
        replace(rc, evaluate_test=True), data, split, vocab
    )
    t_valid, t_test = query_times(split)
    # Held-out customers: a seeded share of the validation customers, in no fit list of
    # any window; early stopping and the promotion gate's replay use them only.
    rng = np.random.default_rng(cfg.seed)
    n_held = max(1, round(len(valid_es) * cfg.valid_user_frac))
    held = np.sort(rng.choice(valid_es.users, size=min(n_held, len(valid_es)), replace=False))
    rcfg = cfg.replay
    log = print if cfg.progress else None

    def history_before(c: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        if split.kind != "time" or c <= t_valid:
            return split.train, split.valid
        v = split.valid
        early = v["ts"].to_numpy() < c
        return pd.concat([split.train, v[early]], ignore_index=True), v[~early]

    def table_at(h: pd.DataFrame, c: float) -> ItemTable:
        return item_table_at(h, vocab, c, cfg.popularity_days, cfg.trend_days, cfg.copurchase_top)

    t_lists = time.perf_counter()
    fit_parts = []
    cart_fit = 0
    not_held = np.setdiff1d(np.arange(len(vocab.user_codes)), held)
    for c in cutoffs(split, cfg.windows):
        h, f = history_before(c)
        win = window_at(h, f, vocab, data, c, cfg, "labels", not_held, cfg.max_users)
        items_c = table_at(h, c)
        fit_parts.append(build_lists(win, models["valid"], vocab, items_c, cfg, rcfg))
        n_cart = 0
        if cfg.cart_lists:
            cwin = session_window_at(h, f, vocab, data, cfg, "labels", not_held, cfg.max_users)
            if cwin is not None:
                fit_parts.append(build_lists(cwin, models["valid"], vocab, items_c, cfg, rcfg))
                n_cart = len(cwin.es)
                cart_fit += n_cart
        if log:
            log(
                f"ranker lists at cut-off {time.strftime('%Y-%m-%d %H:%M', time.gmtime(c))}: "
                f"{len(win.es)} customers, {n_cart} in-session cart lists"
            )
    fit = _concat(fit_parts)
    held_win = window_at(split.train, split.valid, vocab, data, t_valid, cfg, "truth", held)
    table_valid = table_at(split.train, t_valid)
    held_responses: list[Any] = []
    valid = build_lists(held_win, models["valid"], vocab, table_valid, cfg, rcfg, held_responses)
    # The held-out customers' in-session cart lists (truth: what they bought after the
    # cut): reported beside the ordinary lists; early stopping reads them too only when
    # stop_lists is "pooled".
    held_cart = session_window_at(split.train, split.valid, vocab, data, cfg, "truth", held)
    valid_cart = (
        build_lists(held_cart, models["valid"], vocab, table_valid, cfg, rcfg)
        if held_cart is not None
        else None
    )
    if valid_cart is not None and not (np.diff(valid_cart.truth.indptr) > 0).any():
        valid_cart = None
    time_dropped = False
    if cart_fit == 0 and set(TIME_FEATURES) & set(cfg.feature_names()):
        # Without in-session lists every fit list is cut at one of the cut-offs: the time
        # features would take one value each (a served request's time never seen), so
        # the network does not read them (the data has no add-to-cart events).
        names = cfg.feature_names()
        cfg = replace(cfg, features=tuple(f for f in names if f not in TIME_FEATURES))
        keep = np.array([k for k, f in enumerate(names) if f not in TIME_FEATURES])
        fit, valid = _columns(fit, keep), _columns(valid, keep)
        valid_cart = _columns(valid_cart, keep) if valid_cart is not None else None
        time_dropped = True
        if log:
            log("no in-session cart lists: the time features are left out")
    stop_lists = select_stop_lists(cfg, valid, valid_cart)
    table_test = table_at(hist_test, t_test)
    if test_es is None:
        raise ValueError("no test part")
    list_seconds = time.perf_counter() - t_lists
    if len(fit) == 0 or not (np.diff(valid.truth.indptr) > 0).any():
        raise ValueError("too little data: no fit lists or no validation customers with truth")

    exp_id = registry.ensure_experiment(
        client, cfg.experiment, tracking_uri, cfg.artifact_root or None
    )
    run = client.create_run(
        exp_id,
        run_name=cfg.run_name or None,
        tags={
            "model_family": "ranker",
            "dataset": data.name,
            "split": split.kind,
            "split_signature": split.signature(),
            "data_fingerprint": split.data_fingerprint,
            "two_tower": json.dumps(tt_info),
            # The opt-in to a refit champion (allow_refit_two_tower), visible on the run.
            "two_tower_refit_opt_in": str(
                tt_info.get("refit_train_plus_valid", "false") != "false"
            ).lower(),
            "host.python": platform.python_version(),
        },
    )
    run_id = run.info.run_id
    status = "FAILED"
    version = None
    try:
        params = cfg.params()
        params.update(
            {
                "fit_lists": len(fit),
                "valid_lists": len(valid),
                "test_customers": len(test_es),
                "cutoffs": json.dumps(cutoffs(split, cfg.windows)),
                "features": ",".join(cfg.feature_names()),
                "valid_cart_lists": len(valid_cart) if valid_cart is not None else 0,
                "fit_cart_lists": cart_fit,
                "time_features_dropped": time_dropped,
            }
        )
        plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for a in range(0, len(plist), 100):
            client.log_batch(run_id, params=plist[a : a + 100])

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            ts = int(time.time() * 1000)
            client.log_batch(
                run_id, metrics=[Metric(k, float(v), ts, epoch) for k, v in row.items()]
            )

        net, hist = train_ranker(fit, stop_lists, cfg, on_epoch=on_epoch)
        ks = tuple(sorted({cfg.early_stop_k, *cfg.ks}))
        # Validation: the held-out customers' lists, fused order vs ranker; test: the
        # served list replayed (below), rules-only vs with the ranker.
        results: dict[str, dict[str, dict[str, float]]] = {
            "valid": {
                "retrieval": rerank_metrics(valid.rows, valid.retrieval, valid.truth, ks),
                "ranker": rerank_metrics(valid.rows, _net_scores(net, valid.x), valid.truth, ks),
            }
        }
        if valid_cart is not None:
            vc = valid_cart
            results["valid_cart"] = {
                "retrieval": rerank_metrics(vc.rows, vc.retrieval, vc.truth, ks),
                "ranker": rerank_metrics(vc.rows, _net_scores(net, vc.x), vc.truth, ks),
            }
        now = float(data.events["ts"].max()) if len(data.events) else 0.0
        table_now = table_at(data.events, now)
        smoke_x = valid.x[valid.mask][: cfg.smoke_rows]
        if len(smoke_x) == 0:
            smoke_x = fit.x[fit.mask][: cfg.smoke_rows]
        smoke = {
            "features": smoke_x.astype(np.float32).tolist(),
            "scores": _net_scores(net, smoke_x.astype(np.float32)).astype(np.float32).tolist(),
        }
        config = {
            "format_version": FORMAT_VERSION,
            "model_type": MODEL_TYPE,
            "features": cfg.feature_names(),
            "hidden": list(cfg.hidden),
            "loss": cfg.loss,
            "candidates": cfg.candidates,
            "windows": cfg.windows,
            "label_weights": cfg.label_weights,
            "popularity_days": cfg.popularity_days,
            "trend_days": cfg.trend_days,
            "items_as_of": now,
            "dataset": data.name,
            "split_signature": split.signature(),
            "two_tower": tt_info,
            "run_id": run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # The served list with this ranker, replayed through the serving code. The
        # validation replay ranks with the bundle's network over the item table as of
        # the validation cut-off (what its lists were fit on); test with the bundle as
        # shipped. The gate's baseline: the champion ranker on the same customers, else
        # the rules-only served list ("retrieval order").
        t_replay = time.perf_counter()
        served: dict[str, dict[str, dict[str, float]]] = {"valid": {}, "test": {}}
        held_es = held_win.es
        champion_version, champion, why = _champion_scorer(cfg, tracking_uri, split.signature())
        info = ModelVersionInfo(name=cfg.model_name, version="candidate", alias="", run_id=run_id)
        valid_ranker = RankerScorer(RankerBundle(config, net, table_valid), info)
        test_ranker = RankerScorer(RankerBundle(config, net, table_test), info)
        orders: dict[str, dict[str, Any]] = {
            "valid": {"rules": None, "ranker": valid_ranker, "champion": champion},
            "test": {"rules": None, "ranker": test_ranker},
        }
        rules_test = retrieval_result.metrics["test"].get("served") if retrieval_result else None
        if rules_test is not None:
            # The retrieval run replayed the same bundle and customers rules-only already
            # (the full profile changes no rule outcome: its purchases and cart are in the
            # history, excluded anyway).
            served["test"]["rules"] = {k: v for k, v in rules_test.items() if k != "train_seconds"}
            del orders["test"]["rules"]
        wins: dict[str, tuple[EvalSet, Window | None, float]] = {
            "valid": (held_es, held_win, t_valid),
            "test": (test_es, None, t_test),
        }
        for part, scorers in orders.items():
            es, part_win, t = wins[part]
            profiles = part_win.profiles if part_win is not None else None
            if profiles is None:
                users_s = [str(x) for x in vocab.user_codes[es.users]]
                profiles = customer_profiles(hist_test, users_s, vocab, t)
            # One pass per part: each customer retrieved once (on validation, the
            # answers its held-out list was built from), ranked once per order.
            variants = {
                order: Variant(
                    rcfg.merge, (lambda _a, s=scorer: s) if scorer is not None else no_ranker
                )
                for order, scorer in scorers.items()
                if not (order == "champion" and scorer is None)
            }
            got = replay_variants(
                models[part],
                es,
                vocab,
                rcfg,
                rc.ks,
                variants,
                profiles=profiles,
                now=t,
                responses=held_responses if part == "valid" else None,
            )
            for order, rr in got.items():
                served[part][order] = rr.metrics
        replay_seconds = time.perf_counter() - t_replay
        results["test"] = {"retrieval": served["test"]["rules"], "ranker": served["test"]["ranker"]}
        table = format_comparison(results, ks)
        key = f"ndcg@{cfg.early_stop_k}"
        base_order = "champion" if "champion" in served["valid"] else "rules"
        gate: dict[str, Any] = {
            "metric": f"valid_served_ndcg_{cfg.early_stop_k}",
            "value": served["valid"]["ranker"].get(key, 0.0),
            "baseline": base_order,
            "baseline_value": served["valid"][base_order].get(key, 0.0),
            "champion_version": champion_version,
            "champion_note": why,
            "customers": len(held_es),
        }
        final: list[Metric] = []
        ts = int(time.time() * 1000)
        for window, res in results.items():
            for order, m in res.items():
                prefix = window if order == "ranker" else f"{window}_{order}"
                final += [Metric(f"{prefix}_{k.replace('@', '_')}", v, ts, 0) for k, v in m.items()]
        for part, per in served.items():
            for order, m in per.items():
                suffix = "" if order == "ranker" else f"_{order}"
                final += [
                    Metric(f"{part}_served{suffix}_{k.replace('@', '_')}", float(v), ts, 0)
                    for k, v in m.items()
                ]
        for window, res in results.items():
            base_ndcg = res["retrieval"].get("ndcg@10", 0.0)
            if base_ndcg > 0:
                gain = res["ranker"].get("ndcg@10", 0.0) / base_ndcg - 1.0
                final.append(Metric(f"{window}_ndcg_10_relative_gain", gain, ts, 0))
        final += [
            Metric(GATE_BASELINE_METRIC, float(gate["baseline_value"]), ts, 0),
            Metric("best_epoch", float(hist.best_epoch), ts, 0),
            Metric("train_seconds", hist.seconds, ts, 0),
            Metric("list_seconds", list_seconds, ts, 0),
            Metric("replay_seconds", replay_seconds, ts, 0),
        ]
        client.log_batch(run_id, metrics=final)
        client.set_tag(run_id, GATE_CHAMPION_TAG, champion_version)
        client.set_tag(run_id, "gate_baseline", base_order)
        table += "\n\n" + format_served(served, rc.ks)

        report = {
            "metrics": results,
            "served": served,
            "gate": gate,
            "history": hist.epochs,
            "best_epoch": hist.best_epoch,
            "lists": {
                "fit": len(fit),
                "valid": len(valid),
                "valid_cart": len(valid_cart) if valid_cart is not None else 0,
                "fit_cart": cart_fit,
                "test_customers": len(test_es),
            },
            "cutoffs": cutoffs(split, cfg.windows),
            "split": {"kind": split.kind, "signature": split.signature(), **split.params},
            "two_tower": tt_info,
            "seconds": {"lists": list_seconds, "train": hist.seconds, "replay": replay_seconds},
        }
        bundle = RankerBundle(config, net, table_now, smoke=smoke, eval_report=report)
        out = Path(tempfile.mkdtemp(prefix="mercato-ranker-"))
        bundle_dir = out / BUNDLE_ARTIFACT_PATH
        bundle.save(bundle_dir)
        client.log_artifacts(run_id, str(bundle_dir), BUNDLE_ARTIFACT_PATH)
        eval_dir = out / "eval"
        eval_dir.mkdir()
        (eval_dir / "table.md").write_text(table + "\n")
        (eval_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        curve_plot(hist, f"ndcg_{cfg.early_stop_k}", eval_dir / "curve.png")
        client.log_artifacts(run_id, str(eval_dir), "eval")
        if cfg.register:
            mv = registry.register_bundle(
                client,
                run_id,
                cfg.model_name,
                cfg.alias or None,
                tags={
                    "split_signature": split.signature(),
                    "dataset": data.name,
                    GATE_METRIC: f"{gate['value']:.6f}",
                },
                description="Mercato ranker: MLP over request features (bundle: network, "
                "normalisation, item table, smoke scores).",
            )
            version = str(mv.version)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return RankerResult(
        run_id=run_id,
        experiment_id=exp_id,
        tracking_uri=tracking_uri,
        model_name=cfg.model_name,
        version=version,
        alias=cfg.alias if (cfg.register and cfg.alias) else None,
        bundle_dir=bundle_dir,
        metrics=results,
        split_signature=split.signature(),
        best_epoch=hist.best_epoch,
        table=table,
        two_tower=tt_info,
        smoke=smoke,
        served=served,
        gate=gate,
        retrieval=retrieval_result,
    )


def format_served(served: dict[str, dict[str, dict[str, float]]], ks: tuple[int, ...]) -> str:
    """Markdown: the replayed served list per part and order, and the ranker's change
    over the rules-only list."""
    cols = [f"{m}@{k}" for k in ks if k <= 20 for m in ("ndcg", "recall")]
    lines = [
        "| part | served list | users | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 3) + "|",
    ]
    names = {"rules": "rules only (fused order)", "ranker": "ranker", "champion": "champion"}
    for part, per in served.items():
        for order, m in per.items():
            lines.append(
                f"| {part} | {names.get(order, order)} | {int(m.get('users', 0))} | "
                + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in cols)
                + " |"
            )
        r, m = per.get("rules", {}), per.get("ranker", {})
        change = [
            f"{(m.get(c, 0.0) / r[c] - 1) * 100:+.1f} %" if r.get(c, 0.0) > 0 else "n/a"
            for c in cols
        ]
        lines.append(f"| {part} | ranker vs rules | | " + " | ".join(change) + " |")
    return "\n".join(lines)


def replay_gate(
    client: Any, cand: Any, current: Any
) -> tuple[bool, str, float | None, float | None]:
    """The ranker's promotion gate (``mercato promote --model ranker``): the candidate's
    replayed served list on the held-out validation customers
    (``valid_served_ndcg_10``) must not be below the baseline its training run replayed
    on the same customers: the champion ranker it names (``gate_champion_version``),
    else the rules-only list. A champion that moved since then is not the one compared:
    refused (train again, or --force). Returns (ok, reason, candidate, baseline)."""
    run = client.get_run(cand.run_id or "")
    m, tags = run.data.metrics, run.data.tags
    c_val = m.get(GATE_METRIC_SERVED)
    if c_val is None:
        return (
            False,
            f"candidate run has no {GATE_METRIC_SERVED} (no served-list replay)",
            None,
            None,
        )
    compared = tags.get(GATE_CHAMPION_TAG, "")
    cur = str(current.version) if current is not None else ""
    if compared != cur:
        return (
            False,
            f"its replay was compared with champion {compared or '(none)'}, the champion is "
            f"now {cur or '(none)'}: train it again to compare (or --force)",
            c_val,
            None,
        )
    base = m.get(GATE_BASELINE_METRIC)
    what = tags.get("gate_baseline", "rules")
    if base is None:
        return False, f"candidate run has no {GATE_BASELINE_METRIC}", c_val, None
    label = f"champion v{cur}" if what == "champion" else "the rules-only served list"
    if c_val < base:
        return False, f"replayed {GATE_METRIC_SERVED} {c_val:.5f} < {label} {base:.5f}", c_val, base
    return True, f"replayed {GATE_METRIC_SERVED} {c_val:.5f} >= {label} {base:.5f}", c_val, base
