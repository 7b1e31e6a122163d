"""The user tower for one query at a time in NumPy: the same math as
``TwoTowerNet.encode_user`` without torch's per-operator overhead (a dozen small torch
calls cost most of a Retrieve call at one query per call).

The weights are copied out of the loaded towers once. :func:`NumpyUserEncoder.matches`
compares it with the torch tower on sample queries when a version loads; the service
uses it only when they agree, and falls back to the torch tower otherwise (for example a
future tower with features this copy does not know).
"""

from __future__ import annotations

import numpy as np

from services.models.two_tower import TwoTowerBundle, UserQuery


class NumpyUserEncoder:
    """``encode_user`` of a bundle's towers for a single query, in float32 NumPy."""

    def __init__(self, bundle: TwoTowerBundle) -> None:
        net = bundle.net
        sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
        self.history = sd["history.weight"]
        self.history_category = sd["history_category.weight"]
        self.item_category = bundle.net.item_category.detach().cpu().numpy().astype(np.int64)
        self.surface = sd["surface.weight"]
        self.country = sd["country.weight"]
        self.segment = sd["segment.weight"]
        self.band = sd["band.weight"]
        self.base = sd["user_base"]
        self.bundle = bundle

    def encode(self, q: UserQuery) -> np.ndarray:
        """float32 [dim] (last component 1); equal to the torch tower up to rounding."""
        rows = self.bundle.history_rows(q)
        s, c, g, b = self.bundle.context_ids(q)
        u = self.base + self.surface[s] + self.country[c] + self.segment[g] + self.band[b]
        if rows:
            r = np.asarray(rows)
            h = self.history[r] + self.history_category[self.item_category[r]]
            u = u + h.sum(0) / np.float32(np.sqrt(len(rows)))
        return np.concatenate([u, np.ones(1, np.float32)]).astype(np.float32)

    def matches(self, queries: list[UserQuery], atol: float = 1e-4) -> bool:
        """True when this encoder agrees with the torch tower on ``queries``."""
        want = self.bundle.encode_users(queries)
        got = np.stack([self.encode(q) for q in queries])
        return bool(np.allclose(got, want, atol=atol, rtol=0))
