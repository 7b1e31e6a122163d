"""Serving side of the trained ranker (``mercato-ranker``): features, network, bundle.

The ranking service imports this module; it depends on numpy and the standard library
only: never on torch (the network's weights are served as arrays by :class:`NumpyRanker`;
:class:`RankerNet` lives in :mod:`services.models.ranker_net` and is imported from here
on first use, by training) nor on ``training``. Training builds its feature matrices with
:func:`build_features` from here, so training and serving share one definition of
every feature.

Features of one (customer, candidate) pair, all computable from a ``RankRequest`` plus
the bundle's item table (see :data:`FEATURES`): the retrieval score, its gap to the
best candidate, its z-score and log rank within the request; the item's popularity and
trend (interactions before the training cutoff, from the bundle); price, and price
relative to the customer's price level (mean unit price paid, ``rfm.monetary`` / units
bought); the customer's category affinity for the item's category, the share of recent
items in that category and the hours since the latest of them; whether the category is
in the cart or the anchor's; how often shoppers move from the customer's categories (by
affinity), the cart's and the anchor's to the item's category within a session (the
bundle's category transition table: complements such as phone -> phone case); stock and
margin rate where known; the surface (one-hot); the customer (segment, band, RFM, tenure,
history length); item-to-item's score and the fused rank; the item's age; the cart at
item level (its size, the candidate's co-purchase count with the cart's items and best
co-purchase cosine with one of them, from the bundle's co-purchase table); the request's
hour of day and weekday (UTC, cyclic).

A bundle is a directory::

    config.json         format_version, model_type, feature names, hidden sizes, ...
    ranker.npz          state dict of :class:`RankerNet` (wide & deep) as NumPy arrays
                        (``np.savez``, read without pickle)
    normalization.json  per-feature mean and std (features are standardised before the MLP)
    items.json          item_ids with category, price, popularity, trend (training cutoff),
                        the category transition table and the co-purchase table (baskets
                        per item, top co-purchased items per item as CSR rows)
    smoke.json          fixed feature rows and the scores training computed for them
    eval.json           evaluation report of the training run (optional)
    manifest.json       sha256 and size of every file above

Loading validates: every file matches the manifest, config / normalisation / state dict
agree on the feature count, and the NumPy forward pass reproduces ``smoke.json``'s scores
(computed by the torch network in training; finite, within 1e-4) before a version may
serve. That is the check against torch a pod makes without importing torch; the tests
compare the two forward passes directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mercato.features import PRICE_BANDS, SEGMENTS
from services.models.manifest import verify_manifest, write_manifest

if TYPE_CHECKING:  # torch is imported only when training code asks for the network
    from services.models.ranker_net import RankerNet as RankerNet

FORMAT_VERSION = 1
MODEL_TYPE = "ranker"
MODEL_NAME = "mercato-ranker"
SURFACE_FEATURES = ("home", "product", "cart", "checkout", "buy_again", "email")
#: mercato.features.SEGMENTS / PRICE_BANDS without the unknown "" (all zeros then).
CUSTOMER_SEGMENTS = tuple(s for s in SEGMENTS if s)
CUSTOMER_PRICE_BANDS = tuple(b for b in PRICE_BANDS if b)
TIME_FEATURES = ("hour_sin", "hour_cos", "weekday_sin", "weekday_cos")
#: The features #13's second part added; a bundle without them scores its own columns.
CART_FEATURES = ("log_cart_size", "cart_copurchase", "cart_cooc_max")
FEATURES: tuple[str, ...] = (
    "retrieval_score",
    "score_gap",
    "score_z",
    "log_rank",
    "popularity",
    "trend",
    "item_known",
    "log_price",
    "price_known",
    "rel_price",
    "abs_rel_price",
    "rel_price_known",
    "category_affinity",
    "category_recent_share",
    "category_hours_since",
    "category_seen",
    "category_in_cart",
    "anchor_same_category",
    "category_transition",
    "cart_transition",
    "anchor_transition",
    "log_stock",
    "stock_known",
    "margin_rate",
    "margin_known",
    *(f"surface_{s}" for s in SURFACE_FEATURES),
    # The customer (#13): segment and price band (mercato.features' names), RFM, tenure,
    # history length.
    *(f"segment_{s}" for s in CUSTOMER_SEGMENTS),
    *(f"price_band_{b}" for b in CUSTOMER_PRICE_BANDS),
    "log_recency_days",
    "bought_before",
    "log_frequency",
    "log_monetary",
    "log_tenure_days",
    "tenure_known",
    "log_history_len",
    # Collaboration: the item-to-item source's score against the customer's history and
    # cart (Candidate.source_scores), its rank among the candidates it scored, and the
    # rank of the fused (merged) score retrieval sent.
    "item2item_score",
    "item2item_known",
    "item2item_log_rank",
    "fused_log_rank",
    # The item's age (since its first interaction in the training data).
    "log_item_age_days",
    "item_age_known",
    # The cart (#13), item level, from the bundle's co-purchase table (baskets before the
    # training cutoff): the cart's size; how often the candidate was carted or bought in
    # the same basket as the cart's items (log1p of the summed basket counts); its best
    # co-purchase cosine with one cart item (count / sqrt(baskets of each)): the
    # candidate's item-to-item score against the cart alone, computed by ranking.
    "log_cart_size",
    "cart_copurchase",
    "cart_cooc_max",
    # The request time (UTC), cyclic: learnable because the in-session fit lists are cut
    # at their own times (training.ranker.session_window_at), not at three cut-offs.
    *TIME_FEATURES,
)
N_FEATURES = len(FEATURES)
_F = {name: i for i, name in enumerate(FEATURES)}
REQUIRED_FILES = ("config.json", "ranker.npz", "normalization.json", "items.json", "smoke.json")
SMOKE_TOLERANCE = 1e-4
# "No related activity" is encoded as this many hours (about 3 years) plus a flag.
NEVER_HOURS = 26_000.0


class RankerBundleError(Exception):
    """A ranker bundle is missing, corrupt, inconsistent or fails its smoke test."""


def __getattr__(name: str) -> Any:
    """``RankerNet`` lives with torch in ``ranker_net``; importing it from here (training
    does) loads torch then, never when the ranking service imports this module."""
    if name == "RankerNet":
        from services.models import ranker_net

        return ranker_net.RankerNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class RankerQuery:
    """What the ranker knows about the customer and the request."""

    now: float  # request time, epoch seconds
    surface: str = "home"  # one of SURFACE_FEATURES (others: no surface feature set)
    recent: list[tuple[str, float]] = field(default_factory=list)  # (item_id, ts), newest first
    cart: list[str] = field(default_factory=list)
    anchor: str = ""
    category_affinity: dict[str, float] = field(default_factory=dict)
    mean_unit_price: float = 0.0  # 0 = unknown (never bought)
    segment: str = ""  # mercato.features.SEGMENTS ("" = unknown)
    price_band: str = ""  # mercato.features.PRICE_BANDS ("" = unknown)
    recency_days: float = -1.0  # days since the last purchase, -1 = never bought
    frequency: int = 0  # distinct orders
    monetary: float = 0.0  # total paid
    first_seen: float = 0.0  # the customer's first event, epoch seconds (0 = unknown)
    history_len: int = 0  # items in the customer's recent history (bounded, as served)


@dataclass
class CandidateDetails:
    """The candidates of one request, as arrays (row j = candidate j)."""

    ids: list[str]
    scores: np.ndarray  # retrieval scores
    price: np.ndarray  # 0 = unknown
    stock: np.ndarray  # -1 = unknown
    margin: np.ndarray  # 0 = unknown
    category: list[str]  # "" = unknown
    # The candidates' fused (merged) retrieval scores, and item-to-item's score of each
    # (NaN where it gave none). None: not sent (the retrieval score ranks, no item-to-item).
    fused: np.ndarray | None = None
    item2item: np.ndarray | None = None
    # The candidates' rows in the ItemTable the features read (-1 = not there) when the
    # caller has them (the ranking service maps them from its catalogue rows); None:
    # looked up by id.
    rows: np.ndarray | None = None


@dataclass
class ItemTable:
    """Per-item facts known at the training cutoff (row order = ``item_ids``)."""

    item_ids: list[str]
    category: list[str]
    price: np.ndarray
    popularity: np.ndarray  # log1p(interactions in the popularity window)
    trend: np.ndarray  # log((recent rate + 1) / (longer-window rate + 1))
    # P(next category b | category a) within sessions, a != b: {a: {b: p}}
    transitions: dict[str, dict[str, float]] = field(default_factory=dict)
    # First interaction of each item before the cutoff, epoch seconds (0 = none / unknown).
    first_seen: np.ndarray | None = None
    # Co-purchase (#13): baskets (customer, session) with a cart or purchase event of
    # each item before the cutoff, and each item's top co-purchased items as CSR rows:
    # ``co_indices[co_indptr[r]:co_indptr[r + 1]]`` with their shared basket counts.
    baskets: np.ndarray | None = None
    co_indptr: np.ndarray | None = None
    co_indices: np.ndarray | None = None
    co_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        self.row = {iid: i for i, iid in enumerate(self.item_ids)}
        if self.first_seen is None:
            self.first_seen = np.zeros(n)
        if self.baskets is None:
            self.baskets = np.zeros(n)
        if self.co_indptr is None:
            self.co_indptr = np.zeros(n + 1, dtype=np.int64)
            self.co_indices = np.zeros(0, dtype=np.int64)
            self.co_counts = np.zeros(0)
        indptr, indices = self.co_indptr, self.co_indices
        if (
            len(self.baskets) != n
            or len(indptr) != n + 1
            or indices is None
            or self.co_counts is None
            or len(indices) != len(self.co_counts)
            or int(indptr[-1]) != len(indices)
            or (np.diff(indptr) < 0).any()
            or (len(indices) and (indices.min() < 0 or indices.max() >= n))
        ):
            raise RankerBundleError("items.json: the co-purchase table is inconsistent")

    def cart_neighbours(self, cart: list[str]) -> dict[int, tuple[float, float]]:
        """Item row -> (shared baskets summed over the cart's items, best cosine with
        one of them) for every item co-purchased with an item of ``cart`` (distinct
        items; the cart's own items included)."""
        out: dict[int, tuple[float, float]] = {}
        assert self.co_indptr is not None and self.co_indices is not None
        assert self.co_counts is not None and self.baskets is not None
        for item_id in dict.fromkeys(cart):
            r = self.row.get(item_id)
            if r is None:
                continue
            a, b = int(self.co_indptr[r]), int(self.co_indptr[r + 1])
            n_r = float(self.baskets[r])
            for j, c in zip(
                self.co_indices[a:b].tolist(), self.co_counts[a:b].tolist(), strict=True
            ):
                cos = c / math.sqrt(max(n_r * float(self.baskets[j]), 1.0))
                total, best = out.get(j, (0.0, 0.0))
                out[j] = (total + c, max(best, cos))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "item_ids": self.item_ids,
            "category": self.category,
            "price": [float(x) for x in self.price],
            "popularity": [round(float(x), 6) for x in self.popularity],
            "trend": [round(float(x), 6) for x in self.trend],
            "first_seen": [float(x) for x in self.first_seen],  # type: ignore[union-attr]
            "baskets": [int(x) for x in self.baskets],  # type: ignore[union-attr]
            "copurchase": {
                "indptr": [int(x) for x in self.co_indptr],  # type: ignore[union-attr]
                "indices": [int(x) for x in self.co_indices],  # type: ignore[union-attr]
                "counts": [int(x) for x in self.co_counts],  # type: ignore[union-attr]
            },
            "transitions": {
                a: {b: round(float(p), 6) for b, p in row.items()}
                for a, row in self.transitions.items()
            },
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ItemTable:
        n = len(d["item_ids"])
        for key in ("category", "price", "popularity", "trend", "first_seen", "baskets"):
            if key in d and len(d[key]) != n:
                raise RankerBundleError(f"items.json: {key!r} has {len(d[key])} rows, not {n}")
        co = d.get("copurchase")  # absent in bundles from before #13's cart features
        return cls(
            item_ids=[str(x) for x in d["item_ids"]],
            category=[str(x) for x in d["category"]],
            price=np.asarray(d["price"], dtype=np.float64),
            popularity=np.asarray(d["popularity"], dtype=np.float64),
            trend=np.asarray(d["trend"], dtype=np.float64),
            first_seen=np.asarray(d.get("first_seen", np.zeros(n)), dtype=np.float64),
            transitions={
                str(a): {str(b): float(p) for b, p in row.items()}
                for a, row in d.get("transitions", {}).items()
            },
            baskets=np.asarray(d["baskets"], dtype=np.float64) if "baskets" in d else None,
            co_indptr=np.asarray(co["indptr"], dtype=np.int64) if co else None,
            co_indices=np.asarray(co["indices"], dtype=np.int64) if co else None,
            co_counts=np.asarray(co["counts"], dtype=np.float64) if co else None,
        )


# --------------------------------------------------------------------------- features


def build_features(query: RankerQuery, cands: CandidateDetails, table: ItemTable) -> np.ndarray:
    """Feature matrix float32 ``[len(cands), N_FEATURES]`` in :data:`FEATURES` order."""
    n = len(cands.ids)
    # Built a column at a time: column-major, so each column is contiguous; the result
    # is the same C-order float32 matrix.
    x = np.zeros((n, N_FEATURES), dtype=np.float64, order="F")
    if n == 0:
        return np.ascontiguousarray(x, dtype=np.float32)
    s = np.asarray(cands.scores, dtype=np.float64)
    x[:, _F["retrieval_score"]] = s
    x[:, _F["score_gap"]] = s.max() - s
    centred = s - s.mean()
    std = math.sqrt((centred * centred).sum() / n)  # s.std(), the same sums, to the bit
    x[:, _F["score_z"]] = centred / std if std > 1e-12 else 0.0
    order = np.argsort(-s, kind="stable")
    rank = np.empty(n, dtype=np.float64)
    rank[order] = np.arange(n)
    x[:, _F["log_rank"]] = np.log1p(rank)

    rows = (
        np.fromiter(map(table.row.get, cands.ids, repeat(-1)), dtype=np.int64, count=n)
        if cands.rows is None
        else np.asarray(cands.rows, dtype=np.int64)
    )
    known = rows >= 0
    x[known, _F["popularity"]] = table.popularity[rows[known]]
    x[known, _F["trend"]] = table.trend[rows[known]]
    x[:, _F["item_known"]] = known

    price = np.asarray(cands.price, dtype=np.float64).copy()
    fill = (price <= 0) & known
    price[fill] = table.price[rows[fill]]
    has_price = price > 0
    x[has_price, _F["log_price"]] = np.log1p(price[has_price])
    x[:, _F["price_known"]] = has_price
    if query.mean_unit_price > 0:
        rel = np.zeros(n)
        rel[has_price] = np.log(price[has_price] / query.mean_unit_price)
        x[:, _F["rel_price"]] = rel
        x[:, _F["abs_rel_price"]] = np.abs(rel)
        x[:, _F["rel_price_known"]] = has_price

    cats = (
        cands.category
        if all(cands.category)  # every candidate's category sent: none to fill in
        else [
            c or (table.category[r] if r >= 0 else "")
            for c, r in zip(cands.category, rows.tolist(), strict=True)
        ]
    )

    def cat_of(item_id: str) -> str:
        r = table.row.get(item_id)
        return table.category[r] if r is not None else ""

    recent_cats: dict[str, tuple[int, float]] = {}  # category -> (count, latest ts)
    n_recent = 0
    for item_id, ts in query.recent:
        c = cat_of(item_id)
        n_recent += 1
        if not c:
            continue
        cnt, latest = recent_cats.get(c, (0, -math.inf))
        recent_cats[c] = (cnt + 1, max(latest, ts))
    cart_cats = {cat_of(i) for i in query.cart} - {""}
    anchor_cat = cat_of(query.anchor) if query.anchor else ""
    aff = query.category_affinity
    trans = table.transitions
    empty: dict[str, float] = {}
    # Expected transition into each category from the customer's categories (by affinity).
    from_aff: dict[str, float] = {}
    for a, w in aff.items():
        if w > 0 and math.isfinite(w):
            for b, p in trans.get(a, empty).items():
                from_aff[b] = from_aff.get(b, 0.0) + w * p
    cart_rows = [trans.get(a, empty) for a in cart_cats]
    anchor_row = trans.get(anchor_cat, empty) if anchor_cat else empty
    # Category features: computed once per distinct category of the request.
    cat_cols = [
        _F[name]
        for name in (
            "category_affinity",
            "category_recent_share",
            "category_hours_since",
            "category_seen",
            "category_in_cart",
            "anchor_same_category",
            "category_transition",
            "cart_transition",
            "anchor_transition",
        )
    ]
    # each distinct category once (first-seen order), then its index per candidate
    uniq = {c: k for k, c in enumerate(dict.fromkeys(cats))}
    cat_ix = np.fromiter(map(uniq.__getitem__, cats), dtype=np.int64, count=n)
    vals = np.zeros((len(uniq), len(cat_cols)), dtype=np.float64)
    never = math.log1p(NEVER_HOURS)
    for c, k in uniq.items():
        row = vals[k]
        row[2] = never
        if not c:
            continue
        v = aff.get(c, 0.0)
        row[0] = v if math.isfinite(v) else 0.0
        seen = recent_cats.get(c)
        if seen is not None:
            row[1] = seen[0] / max(n_recent, 1)
            hours = max(0.0, (query.now - seen[1]) / 3600.0)
            row[2] = math.log1p(min(hours, NEVER_HOURS))
            row[3] = 1.0
        row[4] = c in cart_cats
        row[5] = bool(anchor_cat) and c == anchor_cat
        row[6] = from_aff.get(c, 0.0)
        if cart_rows:
            row[7] = max(r.get(c, 0.0) for r in cart_rows)
        row[8] = anchor_row.get(c, 0.0)
    x[:, cat_cols] = vals[cat_ix]

    stock = np.asarray(cands.stock, dtype=np.float64)
    has_stock = stock >= 0
    x[has_stock, _F["log_stock"]] = np.log1p(stock[has_stock])
    x[:, _F["stock_known"]] = has_stock
    margin = np.asarray(cands.margin, dtype=np.float64)
    has_margin = (margin != 0) & has_price
    x[has_margin, _F["margin_rate"]] = np.clip(margin[has_margin] / price[has_margin], -1.0, 1.0)
    x[:, _F["margin_known"]] = has_margin
    if query.surface in SURFACE_FEATURES:
        x[:, _F[f"surface_{query.surface}"]] = 1.0
    _customer_features(x, query)
    _collaboration_features(x, cands, rows, known, table, query.now)
    _cart_features(x, query, rows, known, table)
    _time_features(x, query.now)
    return np.ascontiguousarray(x, dtype=np.float32)


def _cart_features(
    x: np.ndarray, q: RankerQuery, rows: np.ndarray, known: np.ndarray, table: ItemTable
) -> None:
    """The cart's size, each candidate's co-purchase count with the cart and its best
    co-purchase cosine with one cart item (:meth:`ItemTable.cart_neighbours`)."""
    cart = list(dict.fromkeys(q.cart))
    x[:, _F["log_cart_size"]] = math.log1p(len(cart))
    if not cart:
        return
    nb = table.cart_neighbours(cart)
    if not nb:
        return
    # the candidates among the neighbours, found by a binary search in their rows
    nb_rows = np.fromiter(nb, dtype=np.int64, count=len(nb))
    order = np.argsort(nb_rows)
    nb_rows = nb_rows[order]
    pos = np.minimum(np.searchsorted(nb_rows, rows), len(nb_rows) - 1)
    hit = np.flatnonzero(known & (nb_rows[pos] == rows))
    if not len(hit):
        return
    got = [nb[r] for r in nb_rows[pos[hit]].tolist()]
    x[hit, _F["cart_copurchase"]] = [math.log1p(total) for total, _ in got]
    x[hit, _F["cart_cooc_max"]] = [best for _, best in got]


def _time_features(x: np.ndarray, now: float) -> None:
    """Hour of day and weekday (UTC; Monday = 0) of the request as points on circles."""
    if not (math.isfinite(now) and now > 0):
        return
    hour = (now % 86_400.0) / 3600.0
    day = (math.floor(now / 86_400.0) + 3) % 7  # 1970-01-01 was a Thursday
    x[:, _F["hour_sin"]] = math.sin(2 * math.pi * hour / 24)
    x[:, _F["hour_cos"]] = math.cos(2 * math.pi * hour / 24)
    x[:, _F["weekday_sin"]] = math.sin(2 * math.pi * day / 7)
    x[:, _F["weekday_cos"]] = math.cos(2 * math.pi * day / 7)


def _log_rank(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """log1p of each valid value's rank (0 = highest, ties in list order) among the valid
    ones; invalid ones get log1p(number of candidates)."""
    n = len(values)
    out = np.full(n, math.log1p(n))
    idx = np.flatnonzero(valid)
    if len(idx):
        order = idx[np.argsort(-values[idx], kind="stable")]
        out[order] = np.log1p(np.arange(len(order)))
    return out


def _customer_features(x: np.ndarray, q: RankerQuery) -> None:
    """Segment, price band, RFM, tenure and history length of the customer: one
    value per request, the same on every row."""
    if q.segment in CUSTOMER_SEGMENTS:
        x[:, _F[f"segment_{q.segment}"]] = 1.0
    if q.price_band in CUSTOMER_PRICE_BANDS:
        x[:, _F[f"price_band_{q.price_band}"]] = 1.0
    bought = q.frequency > 0 and q.recency_days >= 0
    x[:, _F["bought_before"]] = bought
    x[:, _F["log_recency_days"]] = math.log1p(
        min(q.recency_days, NEVER_HOURS / 24) if bought else NEVER_HOURS / 24
    )
    x[:, _F["log_frequency"]] = math.log1p(max(q.frequency, 0))
    x[:, _F["log_monetary"]] = (
        math.log1p(max(q.monetary, 0.0)) if math.isfinite(q.monetary) else 0.0
    )
    if q.first_seen > 0:
        tenure = max(0.0, (q.now - q.first_seen) / 86_400.0)
        x[:, _F["log_tenure_days"]] = math.log1p(min(tenure, NEVER_HOURS / 24))
        x[:, _F["tenure_known"]] = 1.0
    x[:, _F["log_history_len"]] = math.log1p(max(q.history_len, 0))


def _collaboration_features(
    x: np.ndarray,
    cands: CandidateDetails,
    rows: np.ndarray,
    known: np.ndarray,
    table: ItemTable,
    now: float,
) -> None:
    """Item-to-item's score and rank, the fused score's rank, the item's age."""
    n = len(cands.ids)
    if cands.item2item is not None:
        s = np.asarray(cands.item2item, dtype=np.float64)
        has = np.isfinite(s)
        x[has, _F["item2item_score"]] = s[has]
        x[:, _F["item2item_known"]] = has
        x[:, _F["item2item_log_rank"]] = _log_rank(s, has)
    else:
        x[:, _F["item2item_log_rank"]] = math.log1p(n)
    fused = cands.fused if cands.fused is not None else cands.scores
    f = np.asarray(fused, dtype=np.float64)
    x[:, _F["fused_log_rank"]] = _log_rank(f, np.isfinite(f))
    first = table.first_seen
    if first is not None:
        seen = np.zeros(n)
        seen[known] = first[rows[known]]
        has_age = seen > 0
        age = np.maximum(0.0, (now - seen[has_age]) / 86_400.0)
        x[has_age, _F["log_item_age_days"]] = np.log1p(np.minimum(age, NEVER_HOURS / 24))
        x[:, _F["item_age_known"]] = has_age


# --------------------------------------------------------------------------- network


class NumpyRanker:
    """:class:`RankerNet`'s forward pass in NumPy (float32, no autograd, no torch call
    per request): ``wide(z) + mlp(z)`` with ``z = (x - mean) / std``."""

    def __init__(
        self,
        mean: np.ndarray,
        std: np.ndarray,
        layers: list[tuple[np.ndarray, np.ndarray] | None],
        wide: tuple[np.ndarray, float],
    ) -> None:
        self.mean = mean
        self.std = std
        self.layers = layers  # (weight [in, out], bias [out]) or None for ReLU
        self.wide_w, self.wide_b = wide

    @classmethod
    def from_net(cls, net: RankerNet) -> NumpyRanker:
        from services.models.ranker_net import net_weights

        return cls.from_weights(net_weights(net))

    @classmethod
    def from_weights(cls, weights: Mapping[str, np.ndarray]) -> NumpyRanker:
        """From :class:`RankerNet`'s state dict as arrays (``mean`` and ``std`` included):
        ``mlp.<i>.weight`` / ``mlp.<i>.bias`` are its Linear layers in order, each but
        the last followed by a ReLU (dropout, identity at eval, has no parameters)."""

        def arr(name: str) -> np.ndarray:
            if name not in weights:
                raise RankerBundleError(f"ranker weights have no {name!r}")
            return np.asarray(weights[name], dtype=np.float32)

        known = {"mean", "std", "wide.weight", "wide.bias"}
        linear: list[int] = []
        for name in weights:
            if name in known:
                continue
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "mlp" or not parts[1].isdigit():
                raise RankerBundleError(f"ranker weights: unknown parameter {name!r}")
            if parts[2] == "weight":
                linear.append(int(parts[1]))
            elif parts[2] != "bias":
                raise RankerBundleError(f"ranker weights: unknown parameter {name!r}")
        if not linear:
            raise RankerBundleError("ranker weights have no layers")
        layers: list[tuple[np.ndarray, np.ndarray] | None] = []
        width = len(arr("mean"))
        for k, i in enumerate(sorted(linear)):
            w, b = arr(f"mlp.{i}.weight"), arr(f"mlp.{i}.bias")
            if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
                raise RankerBundleError(
                    f"ranker weights: layer mlp.{i} is {w.shape} / {b.shape} after width {width}"
                )
            if k:
                layers.append(None)  # ReLU between Linear layers
            layers.append((np.ascontiguousarray(w.T), b))
            width = w.shape[0]
        wide_w = arr("wide.weight")
        if width != 1 or wide_w.shape != (1, len(arr("mean"))) or arr("wide.bias").shape != (1,):
            raise RankerBundleError("ranker weights: the output layers do not give one score")
        wide = (wide_w[0], float(arr("wide.bias")[0]))
        return cls(arr("mean"), arr("std"), layers, wide)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32)
        z = (np.asarray(x, dtype=np.float32) - self.mean) / self.std
        h = z
        for layer in self.layers:
            h = np.maximum(h, np.float32(0.0)) if layer is None else h @ layer[0] + layer[1]
        out = h[:, 0] + (z @ self.wide_w + np.float32(self.wide_b))
        return out.astype(np.float32)


class RankerBundle:
    """A loaded, validated ranker: features + network + item table."""

    def __init__(
        self,
        config: dict[str, Any],
        net: RankerNet | Mapping[str, np.ndarray],
        items: ItemTable,
        smoke: dict[str, Any] | None = None,
        eval_report: dict[str, Any] | None = None,
    ) -> None:
        """``net`` is the trained torch network (training) or its state dict as arrays
        with ``mean`` and ``std`` (a loaded bundle); either way the bundle scores with
        the NumPy copy."""
        self.config = config
        self._net: RankerNet | None = None
        if isinstance(net, Mapping):
            self.weights = {k: np.asarray(v) for k, v in net.items()}
        else:
            from services.models.ranker_net import net_weights

            self._net = net.eval()
            self.weights = net_weights(net)
        self.forward = NumpyRanker.from_weights(self.weights)
        self.items = items
        self.smoke = smoke or {}
        self.eval_report = eval_report or {}
        self.check()

    @property
    def features(self) -> list[str]:
        return list(self.config["features"])

    @property
    def net(self) -> RankerNet:
        """The network as a torch module (imports torch; for training code and tests:
        serving scores with :attr:`forward`, the NumPy copy)."""
        if self._net is None:
            from services.models.ranker_net import net_from_weights

            self._net = net_from_weights(self.weights, [int(h) for h in self.config["hidden"]])
        return self._net

    def check(self) -> None:
        """Raise RankerBundleError unless config, network and smoke scores agree."""
        c = self.config
        for key in ("format_version", "model_type", "features", "hidden"):
            if key not in c:
                raise RankerBundleError(f"config.json has no {key!r}")
        if c["format_version"] != FORMAT_VERSION or c["model_type"] != MODEL_TYPE:
            raise RankerBundleError(
                f"not a {MODEL_TYPE} bundle of format {FORMAT_VERSION}: "
                f"{c['model_type']} v{c['format_version']}"
            )
        names = [str(f) for f in c["features"]]
        unknown = [f for f in names if f not in _F]
        if unknown or len(set(names)) != len(names):
            raise RankerBundleError(
                f"config.json lists {len(names)} features, "
                + (
                    f"{len(unknown)} of them not computed by this server ({unknown[:5]})"
                    if unknown
                    else "some twice"
                )
            )
        # A bundle trained on an older feature list (every name still computed) scores
        # the columns it names, in its order.
        self.columns = np.array([_F[f] for f in names], dtype=np.int64)
        self.all_features = names == list(FEATURES)
        width = len(names)
        mean, std = self.forward.mean, self.forward.std
        if tuple(mean.shape) != (width,) or tuple(std.shape) != (width,):
            raise RankerBundleError("normalisation does not have one entry per feature")
        if not (np.isfinite(mean).all() and (std > 0).all()):
            raise RankerBundleError("normalisation has non-finite means or non-positive stds")
        hidden = [int(h) for h in c["hidden"]]
        widths = [w.shape[1] for w in (layer[0] for layer in self.forward.layers if layer)]
        if widths[:-1] != hidden:
            raise RankerBundleError(f"config.json says hidden {hidden}, the weights {widths[:-1]}")
        if self.smoke:
            x = np.asarray(self.smoke["features"], dtype=np.float32)
            want = np.asarray(self.smoke["scores"], dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != width or want.shape != (x.shape[0],):
                raise RankerBundleError(f"smoke.json has features {x.shape}, scores {want.shape}")
            got = self.score_features(x)
            if not np.isfinite(got).all():
                raise RankerBundleError("smoke test: scores are not finite")
            # ``want`` are the torch network's scores, computed by training: the NumPy
            # forward pass is checked against torch without importing it here.
            err = float(np.max(np.abs(got - want))) if len(want) else 0.0
            if not err <= SMOKE_TOLERANCE:
                raise RankerBundleError(
                    f"smoke test: scores differ from training's by {err:.3g} (> {SMOKE_TOLERANCE})"
                )

    def score_features(self, x: np.ndarray) -> np.ndarray:
        """Scores float32 [n] of raw feature rows [n, F] in the bundle's feature order
        (the NumPy forward pass)."""
        return self.forward(x)

    def own_columns(self, x: np.ndarray) -> np.ndarray:
        """The bundle's features (its order) of rows [n, N_FEATURES] that
        :func:`build_features` computed."""
        return x if self.all_features else x[:, self.columns]

    def torch_scores(self, x: np.ndarray) -> np.ndarray:
        """Scores of the torch network itself (what :meth:`score_features` must equal;
        imports torch: for tests and training)."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32)
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.no_grad():
            return self.net(t).numpy().astype(np.float32)

    def score(self, query: RankerQuery, cands: CandidateDetails) -> np.ndarray:
        """One score per candidate (higher is better)."""
        return self.score_features(self.own_columns(build_features(query, cands, self.items)))

    # -- persistence
    def save(self, path: str | Path) -> None:
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))
        state = {k: v for k, v in self.weights.items() if k not in ("mean", "std")}
        np.savez(d / "ranker.npz", allow_pickle=False, **cast(dict[str, Any], state))
        (d / "normalization.json").write_text(
            json.dumps(
                {
                    "features": self.features,
                    "mean": [float(v) for v in self.weights["mean"]],
                    "std": [float(v) for v in self.weights["std"]],
                },
                indent=1,
            )
        )
        (d / "items.json").write_text(json.dumps(self.items.to_json()))
        (d / "smoke.json").write_text(json.dumps(self.smoke))
        files = list(REQUIRED_FILES)
        if self.eval_report:
            (d / "eval.json").write_text(json.dumps(self.eval_report, indent=2, sort_keys=True))
            files.append("eval.json")
        write_manifest(d, files, FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | Path) -> RankerBundle:
        """Load and validate a bundle directory; RankerBundleError says what is wrong."""
        d = Path(path)
        verify_manifest(d, REQUIRED_FILES, RankerBundleError)
        try:
            config = json.loads((d / "config.json").read_text())
            norm = json.loads((d / "normalization.json").read_text())
            items = ItemTable.from_json(json.loads((d / "items.json").read_text()))
            smoke = json.loads((d / "smoke.json").read_text())
            report = (
                json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
            )
            if list(norm.get("features", [])) != list(config.get("features", [])):
                raise RankerBundleError("normalization.json and config.json list other features")
            with np.load(d / "ranker.npz", allow_pickle=False) as npz:
                weights = {k: npz[k] for k in npz.files}
            weights["mean"] = np.asarray(norm["mean"], dtype=np.float32)
            weights["std"] = np.asarray(norm["std"], dtype=np.float32)
            return cls(config=config, net=weights, items=items, smoke=smoke, eval_report=report)
        except RankerBundleError:
            raise
        except Exception as e:  # any unreadable or inconsistent artifact
            raise RankerBundleError(f"{d}: cannot load bundle: {type(e).__name__}: {e}") from e
