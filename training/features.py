"""Vocabularies and the feature arrays of training examples and evaluation queries.

Features are computed the way serving sees them (``services.models.two_tower``): the
customer's distinct recent items (newest first), distinct purchases, the current cart,
the item on screen (anchor), the surface, country, a purchase-count segment and a price
band. A training example is the first interaction of a user with an item in a session,
with the features *before* that interaction, so nothing from the future leaks in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from services.models.two_tower import PRICE_BANDS, SURFACES, attribute_tokens, price_band_of
from training.data import EVENT_CODE, RetailData

SEGMENTS = ("", "new", "active", "loyal")
DEFAULT_EVENT_WEIGHTS = {"view": 1.0, "cart": 2.0, "purchase": 4.0, "rating": 1.0}


@dataclass(frozen=True)
class FeatureConfig:
    max_recent: int = 20
    max_purchased: int = 20
    max_cart: int = 10
    max_attrs: int = 8
    attr_buckets: int = 4096
    n_price_buckets: int = 10

    def to_dict(
        self, price_boundaries: list[float], band_boundaries: list[float]
    ) -> dict[str, Any]:
        return {
            "max_recent": self.max_recent,
            "max_purchased": self.max_purchased,
            "max_cart": self.max_cart,
            "max_attrs": self.max_attrs,
            "attr_buckets": self.attr_buckets,
            "price_boundaries": price_boundaries,
            "band_boundaries": band_boundaries,
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
    band_boundaries: list[float]
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
        return self.features.to_dict(self.price_boundaries, self.band_boundaries)


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
        band = [float(np.quantile(known, 1 / 3)), float(np.quantile(known, 2 / 3))]
    else:
        boundaries, band = [], [0.0, 0.0]
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
        band_boundaries=band,
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


@dataclass
class Examples:
    feats: UserFeatures
    target: np.ndarray  # item row
    weight: np.ndarray  # float32


def walk_history(
    enc: pd.DataFrame,
    vocab: Vocab,
    emit_examples: bool,
    event_weights: dict[str, float] | None = None,
) -> tuple[Examples | None, np.ndarray, UserFeatures]:
    """Replay each user's events in time order.

    Returns training examples (first interaction with an item in a session, weighted by
    the strongest event of that user/session/item) when ``emit_examples``, and the state of
    every user at the end of their history as a "home" request: (users, features).
    """
    fc = vocab.features
    weights = {**DEFAULT_EVENT_WEIGHTS, **(event_weights or {})}
    code_w = np.array([weights[e] for e in EVENT_CODE], dtype=np.float32)
    n = len(enc)
    u_a, i_a, ev_a, s_a, sf_a = (enc[c].to_numpy() for c in ("u", "i", "ev", "sess", "surf"))
    first = ~enc.duplicated(["u", "sess", "i"]).to_numpy()
    wmax = pd.Series(code_w[ev_a]).groupby([u_a, s_a, i_a]).transform("max").to_numpy(np.float32)
    n_ex = int(first.sum()) if emit_examples else 0
    ex = UserFeatures.empty(n_ex, fc)
    target = np.zeros(n_ex, dtype=np.int64)
    ex_w = np.zeros(n_ex, dtype=np.float32)
    users = np.unique(u_a)
    st = UserFeatures.empty(len(users), fc)
    log_price = np.log(np.maximum(vocab.item_price.astype(np.float64), 1e-9))
    has_price = vocab.item_price > 0
    band_lo, band_hi = vocab.band_boundaries
    view, cart_c, purchase = EVENT_CODE["view"], EVENT_CODE["cart"], EVENT_CODE["purchase"]
    home = vocab.surfaces.index("home")
    seg_new, seg_active, seg_loyal = 1, 2, 3
    u_l, i_l, ev_l, s_l, sf_l, f_l = (
        u_a.tolist(),
        i_a.tolist(),
        ev_a.tolist(),
        s_a.tolist(),
        sf_a.tolist(),
        first.tolist(),
    )
    e = 0
    k_user = -1
    cur_u = cur_s = None
    recent: list[int] = []
    bought: list[int] = []
    cart: list[int] = []
    anchor = 0
    n_psess = 0
    p_sum = 0.0
    p_n = 0
    last_psess = None
    country = 0

    def band_of() -> int:
        if p_n == 0:
            return 0
        gm = math.exp(p_sum / p_n)
        return 1 if gm < band_lo else (2 if gm < band_hi else 3)

    def seg_of() -> int:
        return seg_new if n_psess == 0 else (seg_active if n_psess < 3 else seg_loyal)

    def write(f: UserFeatures, r: int, surf: int) -> None:
        f.recent[r, : min(len(recent), fc.max_recent)] = recent[: fc.max_recent]
        f.purchased[r, : min(len(bought), fc.max_purchased)] = bought[: fc.max_purchased]
        c = cart[::-1][: fc.max_cart]
        f.cart[r, : len(c)] = c
        f.anchor[r] = anchor
        f.surface[r] = surf
        f.country[r] = country
        f.segment[r] = seg_of()
        f.band[r] = band_of()

    for k in range(n):
        u = u_l[k]
        if u != cur_u:
            if cur_u is not None:
                anchor = 0
                write(st, k_user, home)
            k_user += 1
            cur_u, cur_s = u, None
            recent, bought, cart = [], [], []
            n_psess, p_sum, p_n, last_psess = 0, 0.0, 0, None
            country = int(vocab.user_country[u])
        s = s_l[k]
        if s != cur_s:
            cur_s, anchor = s, 0
            if cart and last_psess != s:
                cart = cart[-fc.max_cart :]  # an abandoned cart stays the cart
        item = i_l[k] + 1
        if emit_examples and f_l[k]:
            write(ex, e, sf_l[k])
            target[e] = item - 1
            ex_w[e] = wmax[k]
            e += 1
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
            if last_psess != s:
                n_psess += 1
                last_psess = s
            if has_price[item - 1]:
                p_sum += log_price[item - 1]
                p_n += 1
        if ev in (view, cart_c):
            anchor = item
    if cur_u is not None:
        anchor = 0
        write(st, k_user, home)
    examples = Examples(ex, target, ex_w) if emit_examples else None
    return examples, users, st


@dataclass
class EvalSet:
    """Queries (user states at the end of history) with future truth and exclusions."""

    name: str
    users: np.ndarray  # user codes
    feats: UserFeatures
    truth: sp.csr_matrix  # [n_users, n_items] items bought in the future, not in history
    exclude: sp.csr_matrix  # [n_users, n_items] items the user had in history

    def __len__(self) -> int:
        return len(self.users)


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


def build_eval_set(
    name: str,
    history: pd.DataFrame,
    future: pd.DataFrame,
    vocab: Vocab,
    target_events: tuple[str, ...],
    max_users: int = 0,
    seed: int = 0,
) -> EvalSet:
    """Users with history whose future holds target events on items new to them."""
    enc_h = encode_events(history, vocab)
    _, users, feats = walk_history(enc_h, vocab, emit_examples=False)
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
    return EvalSet(
        name=name,
        users=users[keep],
        feats=feats.take(keep),
        truth=truth[keep],
        exclude=exclude[keep],
    )


__all__ = [
    "PRICE_BANDS",
    "EvalSet",
    "Examples",
    "FeatureConfig",
    "UserFeatures",
    "Vocab",
    "build_eval_set",
    "build_vocab",
    "encode_events",
    "price_band_of",
    "walk_history",
]
