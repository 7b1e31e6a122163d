"""Vocabularies, the two-tower's per-user training rows and evaluation queries.

The two-tower's user input is the customer's distinct history (every item they
interacted with before the query time) plus context: surface, country, segment and
price band. Segment and price band come from :mod:`mercato.features`, the definitions
the profile service uses, computed from the customer's purchases before the query time.

Training rows (:func:`build_train_rows`) are built from the sparse user x item data, not
by walking events:

- time splits: one row per (customer, cut-off) with a cut-off at each session start:
  the input is the items first seen before the cut-off, the targets the items first
  seen in the ``horizon`` after it (new items only, as the evaluation counts them);
  each epoch draws one cut-off per customer, so every customer weighs the same;
- random splits (no meaningful time): one row per customer; each epoch a random part of
  their training items is held out as targets and the rest is the input.

:func:`walk_history` (the ranker's features: recent items, purchases, cart, anchor at
each event) replays events in time order with the same segment and price band.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mercato import features as shared
from mercato.features import PRICE_BANDS, SEGMENTS
from services.models.two_tower import SURFACES, attribute_tokens
from training.data import EVENT_CODE, RetailData

DEFAULT_EVENT_WEIGHTS = {"view": 1.0, "cart": 2.0, "purchase": 4.0, "rating": 1.0}
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class FeatureConfig:
    max_recent: int = 20
    max_purchased: int = 20
    max_cart: int = 10
    max_attrs: int = 8
    attr_buckets: int = 4096
    n_price_buckets: int = 10
    max_history: int = 0  # items of a serving query's history the user tower reads; 0 = all

    def to_dict(self, price_boundaries: list[float]) -> dict[str, Any]:
        return {
            "max_recent": self.max_recent,
            "max_purchased": self.max_purchased,
            "max_cart": self.max_cart,
            "max_attrs": self.max_attrs,
            "max_history": self.max_history,
            "attr_buckets": self.attr_buckets,
            "price_boundaries": price_boundaries,
        }


@dataclass
class Vocab:
    """Id vocabularies and per-item feature arrays (row i = item_ids[i])."""

    item_ids: list[str]
    item_row: dict[str, int]
    categories: list[str]
    surfaces: list[str]
    countries: list[str]
    segments: list[str]
    item_category: np.ndarray  # int64 category index per row
    item_price: np.ndarray  # float32
    item_price_bucket: np.ndarray  # int64
    item_attrs: np.ndarray  # int64 [n_items, max_attrs]
    price_boundaries: list[float]
    user_codes: pd.Index  # user_id -> code
    user_country: np.ndarray  # country index per user code
    features: FeatureConfig = field(default_factory=FeatureConfig)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def as_json(self) -> dict[str, list[str]]:
        return {
            "category": self.categories,
            "surface": self.surfaces,
            "country": self.countries,
            "segment": self.segments,
        }

    def feature_dict(self) -> dict[str, Any]:
        return self.features.to_dict(self.price_boundaries)


def build_vocab(data: RetailData, fc: FeatureConfig | None = None) -> Vocab:
    """Vocabularies from the whole catalog (items are known from the catalog, not from
    training events: items without training events are embedded from features only)."""
    fc = fc or FeatureConfig()
    items = data.items
    ids = items["item_id"].tolist()
    cats = ["", *sorted(c for c in items["category"].unique() if c)]
    cat_ix = {c: i for i, c in enumerate(cats)}
    price = items["price"].to_numpy(dtype=np.float64)
    known = price[price > 0]
    if known.size:
        qs = np.quantile(known, np.linspace(0, 1, fc.n_price_buckets + 1)[1:-1])
        boundaries = sorted({float(q) for q in qs})
    else:
        boundaries = []
    from services.models.two_tower import price_buckets

    attr_cols = data.attribute_columns
    attrs = np.zeros((len(items), fc.max_attrs), dtype=np.int64)
    if attr_cols:
        values = items[attr_cols].to_numpy()
        names = [c[len("attr_") :] for c in attr_cols]
        for r in range(len(items)):
            toks = attribute_tokens(
                dict(zip(names, values[r], strict=True)), fc.attr_buckets, fc.max_attrs
            )
            attrs[r, : len(toks)] = toks
    countries = ["", *sorted(c for c in data.users["country"].unique() if c)]
    c_ix = {c: i for i, c in enumerate(countries)}
    user_codes = pd.Index(data.users["user_id"])
    return Vocab(
        item_ids=ids,
        item_row={iid: i for i, iid in enumerate(ids)},
        categories=cats,
        surfaces=list(SURFACES),
        countries=countries,
        segments=list(SEGMENTS),
        item_category=np.array([cat_ix[c] for c in items["category"]], dtype=np.int64),
        item_price=price.astype(np.float32),
        item_price_bucket=price_buckets(price, boundaries),
        item_attrs=attrs,
        price_boundaries=boundaries,
        user_codes=user_codes,
        user_country=np.array([c_ix[c] for c in data.users["country"]], dtype=np.int64),
        features=fc,
    )


def encode_events(events: pd.DataFrame, vocab: Vocab) -> pd.DataFrame:
    """Integer columns u (user code), i (item row), ev, surf; sorted by user and time."""
    surf_ix = {s: i for i, s in enumerate(vocab.surfaces)}
    out = pd.DataFrame(
        {
            "u": vocab.user_codes.get_indexer(events["user_id"]).astype(np.int64),
            "i": events["item_id"].map(vocab.item_row).astype(np.int64),
            "ts": events["ts"].to_numpy(np.int64),
            "ev": events["event"].map(EVENT_CODE).astype(np.int64),
            "sess": events["session_id"].to_numpy(np.int64),
            "surf": events["surface"].map(surf_ix).fillna(0).astype(np.int64),
        }
    )
    out["order"] = np.arange(len(out))
    return out.sort_values(["u", "ts", "sess", "order"], kind="stable").reset_index(drop=True)


@dataclass
class UserFeatures:
    """User-tower inputs, one row per example or per user (item indices are row + 1)."""

    recent: np.ndarray
    purchased: np.ndarray
    cart: np.ndarray
    anchor: np.ndarray
    surface: np.ndarray
    country: np.ndarray
    segment: np.ndarray
    band: np.ndarray

    @classmethod
    def empty(cls, n: int, fc: FeatureConfig) -> UserFeatures:
        z = np.zeros
        return cls(
            recent=z((n, fc.max_recent), np.int64),
            purchased=z((n, fc.max_purchased), np.int64),
            cart=z((n, fc.max_cart), np.int64),
            anchor=z(n, np.int64),
            surface=z(n, np.int64),
            country=z(n, np.int64),
            segment=z(n, np.int64),
            band=z(n, np.int64),
        )

    def __len__(self) -> int:
        return len(self.anchor)

    def take(self, rows: np.ndarray) -> UserFeatures:
        return UserFeatures(**{k: v[rows] for k, v in self.__dict__.items()})


def walk_history(
    enc: pd.DataFrame, vocab: Vocab, now: float | None = None
) -> tuple[np.ndarray, UserFeatures]:
    """Replay each user's events in time order; the state of every user at the end of
    their history as a "home" request: (user codes, features). Segment and price band
    are :mod:`mercato.features`' at time ``now`` (default: the newest event)."""
    fc = vocab.features
    n = len(enc)
    u_a, i_a, ev_a, s_a, t_a = (enc[c].to_numpy() for c in ("u", "i", "ev", "sess", "ts"))
    users = np.unique(u_a)
    st = UserFeatures.empty(len(users), fc)
    t_now = float(now if now is not None else (t_a.max() if n else 0))
    price = vocab.item_price.astype(np.float64)
    cart_c, purchase = EVENT_CODE["cart"], EVENT_CODE["purchase"]
    home = vocab.surfaces.index("home")
    seg_ix = {g: j for j, g in enumerate(vocab.segments)}
    u_l, i_l, ev_l, s_l, t_l = (x.tolist() for x in (u_a, i_a, ev_a, s_a, t_a))
    k_user = -1
    cur_u = None
    recent: list[int] = []
    bought: list[int] = []
    cart: list[int] = []
    orders: set[int] = set()
    monetary, units, last_buy = 0.0, 0, 0.0
    country = 0

    def write(r: int) -> None:
        st.recent[r, : min(len(recent), fc.max_recent)] = recent[: fc.max_recent]
        st.purchased[r, : min(len(bought), fc.max_purchased)] = bought[: fc.max_purchased]
        c = cart[::-1][: fc.max_cart]
        st.cart[r, : len(c)] = c
        st.surface[r] = home
        st.country[r] = country
        st.segment[r], st.band[r] = context_ids(
            len(orders), (t_now - last_buy) / SECONDS_PER_DAY, monetary, units, seg_ix
        )

    for k in range(n):
        u = u_l[k]
        if u != cur_u:
            if cur_u is not None:
                write(k_user)
            k_user += 1
            cur_u = u
            recent, bought, cart = [], [], []
            orders, monetary, units, last_buy = set(), 0.0, 0, 0.0
            country = int(vocab.user_country[u])
        s = s_l[k]
        item = i_l[k] + 1
        if item in recent:
            recent.remove(item)
        recent.insert(0, item)
        if len(recent) > fc.max_recent:
            recent.pop()
        ev = ev_l[k]
        if ev == cart_c:
            if item not in cart:
                cart.append(item)
        elif ev == purchase:
            if item in bought:
                bought.remove(item)
            bought.insert(0, item)
            if len(bought) > fc.max_purchased:
                bought.pop()
            if item in cart:
                cart.remove(item)
            orders.add(s)
            monetary += price[item - 1]
            units += 1
            last_buy = max(last_buy, float(t_l[k]))
    if cur_u is not None:
        write(k_user)
    return users, st


def context_ids(
    orders: int, recency_days: float, monetary: float, units: float, seg_ix: dict[str, int]
) -> tuple[int, int]:
    """(segment, price band) indices from purchase aggregates: the shared definitions
    of :mod:`mercato.features`, as the profile service computes them."""
    g = shared.segment(orders, recency_days)
    b = shared.price_band(monetary, units)
    return seg_ix.get(g, 0), PRICE_BANDS.index(b)


def _pairs_matrix(u: np.ndarray, i: np.ndarray, rows: pd.Index, n_items: int) -> sp.csr_matrix:
    r = rows.get_indexer(u)
    keep = r >= 0
    m = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (r[keep], i[keep])),
        shape=(len(rows), n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` of every pair, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


class _Purchases:
    """Purchase aggregates of customers before any time, by binary search."""

    def __init__(self, enc: pd.DataFrame, vocab: Vocab) -> None:
        p = enc[enc["ev"] == EVENT_CODE["purchase"]].sort_values(["u", "ts"], kind="stable")
        self.u = p["u"].to_numpy(np.int64)
        self.ts = p["ts"].to_numpy(np.int64)
        first_order = ~p.duplicated(["u", "sess"]).to_numpy()
        price = vocab.item_price.astype(np.float64)[p["i"].to_numpy(np.int64)]
        self.c_orders = np.concatenate([[0], np.cumsum(first_order)])
        self.c_money = np.concatenate([[0.0], np.cumsum(price)])
        self.t0 = int(min(self.ts.min(), 0)) if len(self.ts) else 0

    def context(
        self, users: np.ndarray, times: np.ndarray, seg_ix: dict[str, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(segment, band) index arrays of customers ``users`` at ``times`` (purchases
        strictly before)."""
        big = np.int64(1) << np.int64(40)
        keys = self.u * big + (self.ts - self.t0)
        lo = np.searchsorted(keys, users * big, side="left")
        hi = np.searchsorted(keys, users * big + (np.asarray(times, np.int64) - self.t0), "left")
        orders = self.c_orders[hi] - self.c_orders[lo]
        money = self.c_money[hi] - self.c_money[lo]
        units = hi - lo
        ts = self.ts if len(self.ts) else np.zeros(1, dtype=np.int64)
        last = np.where(units > 0, ts[np.maximum(hi - 1, 0)], 0)
        days = (np.asarray(times, np.float64) - last) / SECONDS_PER_DAY
        seg = np.zeros(len(users), dtype=np.int64)
        band = np.zeros(len(users), dtype=np.int64)
        for r in range(len(users)):
            seg[r], band[r] = context_ids(
                int(orders[r]), float(days[r]), float(money[r]), float(units[r]), seg_ix
            )
        return seg, band


def user_context(
    enc: pd.DataFrame, vocab: Vocab, users: np.ndarray, times: np.ndarray
) -> np.ndarray:
    """Context ids [n, 4] (surface "home", country, segment, price band) of customers
    ``users`` (codes) at ``times`` (epoch seconds), from the events ``enc`` before."""
    seg_ix = {g: j for j, g in enumerate(vocab.segments)}
    seg, band = _Purchases(enc, vocab).context(users, times, seg_ix)
    out = np.zeros((len(users), 4), dtype=np.int64)
    out[:, 0] = vocab.surfaces.index("home")
    out[:, 1] = vocab.user_country[users]
    out[:, 2] = seg
    out[:, 3] = band
    return out


def category_affinities(
    events: pd.DataFrame, vocab: Vocab, users: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Category affinity shares of each customer (of ``users``, default all) from their
    events in time order: :func:`mercato.features.category_affinity`, exactly as the
    profile service derives ``Profile.category_affinity``."""
    h = events if users is None else events[events["user_id"].isin(set(users))]
    h = h.iloc[np.argsort(h["ts"].to_numpy(), kind="stable")]
    names = np.array(vocab.categories, dtype=object)
    cats = names[vocab.item_category[h["item_id"].map(vocab.item_row).to_numpy(np.int64)]]
    out: dict[str, list[tuple[str, str, int]]] = {}
    for u, kind, c, t in zip(
        h["user_id"].to_numpy(), h["event"].to_numpy(), cats, h["ts"].to_numpy(), strict=True
    ):
        out.setdefault(str(u), []).append((str(kind), str(c), int(t) * 1_000_000))
    return {u: shared.category_affinity(ev) for u, ev in out.items()}


@dataclass
class EvalSet:
    """Queries (customers' whole history at a time) with future truth and exclusions."""

    name: str
    users: np.ndarray  # user codes
    history: sp.csr_matrix  # [n_users, n_items] 1 for every item in the history
    context: np.ndarray  # [n_users, 4] surface, country, segment, band ids
    truth: sp.csr_matrix  # [n_users, n_items] items bought in the future, not in history
    exclude: sp.csr_matrix  # [n_users, n_items] items the user had in history

    def __len__(self) -> int:
        return len(self.users)

    def take(self, rows: np.ndarray) -> EvalSet:
        return EvalSet(
            self.name,
            self.users[rows],
            self.history[rows],
            self.context[rows],
            self.truth[rows],
            self.exclude[rows],
        )


def build_eval_set(
    name: str,
    history: pd.DataFrame,
    future: pd.DataFrame,
    vocab: Vocab,
    target_events: tuple[str, ...],
    max_users: int = 0,
    seed: int = 0,
    now: float | None = None,
    user_times: dict[int, float] | None = None,
) -> EvalSet:
    """Users with history whose future holds target events on items new to them; the
    query time is ``now`` (default: the first future event, else the last history one),
    or each user's own in ``user_times`` (user code -> time)."""
    enc_h = encode_events(history, vocab)
    users = np.unique(enc_h["u"].to_numpy())
    fut = future[future["event"].isin(target_events)]
    fu = vocab.user_codes.get_indexer(fut["user_id"]).astype(np.int64)
    fi = fut["item_id"].map(vocab.item_row).to_numpy(np.int64)
    idx = pd.Index(users)
    exclude = _pairs_matrix(enc_h["u"].to_numpy(), enc_h["i"].to_numpy(), idx, vocab.n_items)
    truth = _pairs_matrix(fu, fi, idx, vocab.n_items)
    truth = (truth - truth.multiply(exclude)).tocsr()
    truth.eliminate_zeros()
    keep = np.flatnonzero(np.diff(truth.indptr) > 0)
    if max_users and len(keep) > max_users:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_users, replace=False))
    if now is None:
        if len(future):
            now = float(future["ts"].min())
        else:
            now = float(history["ts"].max()) + 1 if len(history) else 0.0
    times = np.full(len(keep), int(now), dtype=np.int64)
    if user_times is not None:
        times = np.array([int(user_times[int(u)]) for u in users[keep]], dtype=np.int64)
    ctx = user_context(enc_h, vocab, users[keep], times)
    return EvalSet(
        name=name,
        users=users[keep],
        history=exclude[keep],
        context=ctx,
        truth=truth[keep],
        exclude=exclude[keep],
    )


@dataclass
class TrainRows:
    """Per-customer training rows over each customer's distinct items (see the module
    docstring). ``items[indptr[k]:indptr[k+1]]`` are customer k's item rows in the order
    first seen, ``weight`` their strongest event's weight (the target weight). A row
    ``r`` of customer ``row_user[r]`` reads ``items[.. : start[r]]`` as input and
    predicts ``items[start[r] : end[r]]`` (time kind); in the random kind ``start`` is 0
    and ``end`` the customer's count, and the hold-out is drawn each epoch."""

    kind: str  # "time" | "random"
    users: np.ndarray  # user codes [U]
    indptr: np.ndarray  # [U + 1]
    items: np.ndarray  # item rows
    weight: np.ndarray  # float32 per entry
    row_user: np.ndarray  # [R] index into users
    start: np.ndarray  # [R]
    end: np.ndarray  # [R]
    context: np.ndarray  # [R, 4]
    user_rows: np.ndarray  # [U + 1]: rows of customer k are user_rows[k]:user_rows[k+1]

    @property
    def n_rows(self) -> int:
        return len(self.row_user)

    def target_counts(self, n_items: int) -> np.ndarray:
        return np.bincount(self.items, minlength=n_items).astype(np.float64)


def build_train_rows(
    events: pd.DataFrame,
    vocab: Vocab,
    kind: str,
    horizon_seconds: float = 0.0,
    event_weights: dict[str, float] | None = None,
) -> TrainRows:
    """The two-tower's training rows from the training events (vectorised; see
    :class:`TrainRows`). ``horizon_seconds`` (time kind) bounds how far after a cut-off
    targets are taken from (0 = to the end of the training data)."""
    if kind not in ("time", "random"):
        raise ValueError(f"kind must be 'time' or 'random', not {kind!r}")
    enc = encode_events(events, vocab)
    weights = {**DEFAULT_EVENT_WEIGHTS, **(event_weights or {})}
    code_w = np.array([weights[e] for e in EVENT_CODE], dtype=np.float32)
    enc["w"] = code_w[enc["ev"].to_numpy()]
    pairs = (
        enc.groupby(["u", "i"], sort=False)
        .agg(first=("ts", "min"), order=("order", "min"), w=("w", "max"))
        .reset_index()
        .sort_values(["u", "first", "order"], kind="stable")
    )
    pu = pairs["u"].to_numpy(np.int64)
    users, counts = np.unique(pu, return_counts=True)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = pairs["i"].to_numpy(np.int64)
    weight = pairs["w"].to_numpy(np.float32)
    first = pairs["first"].to_numpy(np.int64)
    seg_ix = {g: j for j, g in enumerate(vocab.segments)}
    purchases = _Purchases(enc, vocab)
    if kind == "random":
        now = int(enc["ts"].max()) + 1 if len(enc) else 0
        seg, band = purchases.context(users, np.full(len(users), now), seg_ix)
        row_user = np.arange(len(users), dtype=np.int64)
        start = np.zeros(len(users), dtype=np.int64)
        end = counts.astype(np.int64)
        user_rows = np.arange(len(users) + 1, dtype=np.int64)
    else:
        # Cut-offs: every session start of every customer.
        starts = enc.groupby(["u", "sess"], sort=False)["ts"].min().reset_index()
        starts = starts.drop_duplicates(["u", "ts"]).sort_values(["u", "ts"])
        cu = starts["u"].to_numpy(np.int64)
        ct = starts["ts"].to_numpy(np.int64)
        k_of = np.searchsorted(users, cu)
        t0 = int(min(first.min(), 0)) if len(first) else 0
        big = np.int64(1) << np.int64(40)
        keys = pu * big + (first - t0)
        lo = np.searchsorted(keys, cu * big + (ct - t0), side="left")
        if horizon_seconds > 0:
            hi = np.searchsorted(keys, cu * big + (ct + int(horizon_seconds) - t0), "left")
        else:
            hi = indptr[k_of + 1]
        start_all = lo - indptr[k_of]
        end_all = hi - indptr[k_of]
        ok = (start_all >= 1) & (end_all > start_all)
        row_user, start, end = k_of[ok], start_all[ok], end_all[ok]
        seg, band = purchases.context(users[row_user], ct[ok], seg_ix)
        user_rows = np.concatenate(
            [[0], np.cumsum(np.bincount(row_user, minlength=len(users)))]
        ).astype(np.int64)
    ctx = np.zeros((len(row_user), 4), dtype=np.int64)
    ctx[:, 0] = vocab.surfaces.index("home")
    ctx[:, 1] = vocab.user_country[users[row_user]]
    ctx[:, 2] = seg
    ctx[:, 3] = band
    return TrainRows(
        kind=kind,
        users=users,
        indptr=indptr,
        items=items,
        weight=weight,
        row_user=row_user,
        start=start,
        end=end,
        context=ctx,
        user_rows=user_rows,
    )


__all__ = [
    "PRICE_BANDS",
    "SEGMENTS",
    "EvalSet",
    "FeatureConfig",
    "TrainRows",
    "UserFeatures",
    "Vocab",
    "build_eval_set",
    "build_train_rows",
    "build_vocab",
    "category_affinities",
    "context_ids",
    "encode_events",
    "ragged_positions",
    "user_context",
    "walk_history",
]
