"""Cross-sell pairs from baskets: items bought together within an invoice or session.

A basket is the set of distinct items with a target event (purchase) in one session
(for the retail invoices: one invoice). For items ``a`` and ``b`` with ``n_a`` and
``n_b`` baskets, ``n_ab`` baskets holding both, out of ``N`` baskets::

    lift(a, b)  = n_ab * N / (n_a * n_b)
    score(a, b) = lift(a, b) * n_ab / (n_ab + shrink)

The shrinkage keeps pairs seen a couple of times from outranking pairs with real
support; pairs below ``min_count`` co-occurrences are dropped, as are baskets larger
than ``max_basket`` (bulk orders pair everything with everything). Each item keeps its
``top_n`` best partners, best first. Data without baskets (MovieLens: one rating per
session) gives no pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass(frozen=True)
class ComplementsConfig:
    top_n: int = 20
    min_count: int = 3
    shrink: float = 5.0
    max_basket: int = 100


def basket_complements(
    events: pd.DataFrame,
    target_events: tuple[str, ...],
    cfg: ComplementsConfig | None = None,
) -> dict[str, list[tuple[str, float]]]:
    """``{item_id: [(item_id, score), ...]}`` from the baskets of ``events``."""
    cfg = cfg or ComplementsConfig()
    tgt = events.loc[events["event"].isin(target_events), ["user_id", "session_id", "item_id"]]
    tgt = tgt.drop_duplicates()
    if tgt.empty:
        return {}
    basket = tgt.groupby(["user_id", "session_id"], sort=False).ngroup().to_numpy()
    size = np.bincount(basket)
    keep = size[basket] <= cfg.max_basket
    basket, items_s = basket[keep], tgt["item_id"].to_numpy()[keep]
    codes, uniq = pd.factorize(items_s)
    n_baskets = int(basket.max()) + 1 if len(basket) else 0
    if n_baskets == 0:
        return {}
    s = sp.csr_matrix(
        (np.ones(len(codes), dtype=np.float32), (basket, codes)),
        shape=(n_baskets, len(uniq)),
    )
    n_item = np.asarray(s.sum(0)).ravel()
    n_nonempty = int((np.diff(s.indptr) > 0).sum())
    co = (s.T @ s).tocoo()
    off = (co.row != co.col) & (co.data >= cfg.min_count)
    a, b, n_ab = co.row[off], co.col[off], co.data[off].astype(np.float64)
    if len(a) == 0:
        return {}
    lift = n_ab * n_nonempty / (n_item[a] * n_item[b])
    score = lift * n_ab / (n_ab + cfg.shrink)
    order = np.lexsort((-score, a))
    a, b, score = a[order], b[order], score[order]
    starts = np.r_[0, np.flatnonzero(np.diff(a)) + 1]
    rank = np.arange(len(a)) - np.repeat(starts, np.diff(np.r_[starts, len(a)]))
    top = rank < cfg.top_n
    out: dict[str, list[tuple[str, float]]] = {}
    for x, y, sc in zip(a[top], b[top], score[top], strict=True):
        out.setdefault(str(uniq[x]), []).append((str(uniq[y]), float(sc)))
    return out
