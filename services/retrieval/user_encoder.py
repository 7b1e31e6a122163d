"""The user tower for one query at a time in NumPy: the same math as
``TwoTowerNet.encode_user`` without torch's per-operator overhead (about 60 small torch
calls cost most of a Retrieve call at one query per call).

The weights are copied out of the loaded towers once. :func:`NumpyUserEncoder.matches`
compares it with the torch tower on sample queries when a version loads; the service
uses it only when they agree, and falls back to the torch tower otherwise (for example a
future tower with features this copy does not know).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from services.models.two_tower import PRICE_BANDS, TwoTowerBundle, UserQuery

_SQRT1_2 = 1.0 / math.sqrt(2.0)


class NumpyUserEncoder:
    """``encode_user`` of a bundle's towers for a single query, in float32 NumPy."""

    def __init__(self, bundle: TwoTowerBundle) -> None:
        net = bundle.net
        sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
        self.item_id = sd["item_id.weight"]
        self.category = sd["category.weight"]
        self.item_category = net.item_category.detach().cpu().numpy().astype(np.int64)
        self.surface = sd["surface.weight"]
        self.country = sd["country.weight"]
        self.segment = sd["segment.weight"]
        self.band = sd["band.weight"]
        self.affinity_t = np.ascontiguousarray(sd["affinity.weight"].T)
        self.recent_pos = np.exp(sd["recent_pos"])
        self.w1 = np.ascontiguousarray(sd["user_mlp.0.weight"].T)
        self.b1 = sd["user_mlp.0.bias"]
        self.w2 = np.ascontiguousarray(sd["user_mlp.2.weight"].T)
        self.b2 = sd["user_mlp.2.bias"]
        self.n_categories = self.category.shape[0]
        f = bundle.config["features"]
        self.max_recent = int(f["max_recent"])
        self.max_purchased = int(f["max_purchased"])
        self.max_cart = int(f["max_cart"])
        self.dim = bundle.dim
        self.bundle = bundle
        self._cats = bundle._lookup["category"]

    def _rows(self, ids: list[str], width: int) -> np.ndarray:
        """Item indices (row + 1) of the known ids, first ``width`` of them."""
        out = []
        row_of = self.bundle.row_of
        for i in ids:
            r = row_of(i)
            if r is not None:
                out.append(r + 1)
                if len(out) == width:
                    break
        return np.array(out, dtype=np.int64)

    def _history(self, idx: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros(self.dim, dtype=np.float32)
        e = self.item_id[idx] + self.category[self.item_category[idx]]
        if weights is None:
            return e.sum(0) / max(float(len(idx)), 1e-6)
        return (e * weights[:, None]).sum(0) / max(float(weights.sum()), 1e-6)

    def encode(self, q: UserQuery) -> np.ndarray:
        """float32 [dim], L2-normalised; equal to the torch tower up to float rounding."""
        b = self.bundle
        recent = self._rows(q.recent_item_ids, self.max_recent)
        purchased = self._rows(q.purchased_item_ids, self.max_purchased)
        cart = self._rows(q.cart_item_ids, self.max_cart)
        anchor_row = b.row_of(q.anchor_item_id)
        anchor = np.array([anchor_row + 1], dtype=np.int64) if anchor_row is not None else None

        aff = np.zeros(self.n_categories, dtype=np.float32)
        override = False
        if q.category_affinity:
            for cat, v in q.category_affinity.items():
                j = self._cats.get(cat, 0)
                if j and math.isfinite(v) and v > 0:
                    aff[j] += float(v)
            override = aff.sum() > 0
        if not override:
            aff[:] = 0
            hist = np.concatenate([recent, purchased])
            if len(hist):
                np.add.at(aff, self.item_category[hist], 1.0)
            aff[0] = 0.0
        aff = aff / max(float(aff.sum()), 1e-6)

        band = PRICE_BANDS.index(q.price_band) if q.price_band in PRICE_BANDS else 0
        x = np.concatenate(
            [
                self._history(recent, self.recent_pos[: len(recent)]),
                self._history(purchased),
                self._history(cart),
                self._history(anchor) if anchor is not None else np.zeros(self.dim, np.float32),
                self.surface[b._vocab_index("surface", q.surface)],
                self.country[b._vocab_index("country", q.country)],
                self.segment[b._vocab_index("segment", q.segment)],
                self.band[band],
                aff @ self.affinity_t,
            ]
        ).astype(np.float32)
        h = x @ self.w1 + self.b1
        h = 0.5 * h * (1.0 + erf(h * _SQRT1_2))
        out = (h @ self.w2 + self.b2).astype(np.float32)
        return out / max(float(np.linalg.norm(out)), 1e-12)

    def matches(self, queries: list[UserQuery], atol: float = 1e-4) -> bool:
        """True when this encoder agrees with the torch tower on ``queries``."""
        want = self.bundle.encode_users(queries)
        got = np.stack([self.encode(q) for q in queries])
        return bool(np.allclose(got, want, atol=atol, rtol=0))
