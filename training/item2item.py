"""Fitting the item-to-item model (:mod:`services.models.item2item`).

Two methods, the better on validation kept (:func:`fit_item2item`):

- ``ease``: EASE's closed form ``B = I - P / diag(P)``, ``P = (XᵀX + λI)⁻¹`` on the
  binary train matrix; each item keeps its ``top_n`` largest positive weights, or its
  ``top_n`` largest in absolute value (negative weights kept: EASE's matter), ``top_n``
  from ``ease_top_ns`` while ``items x top_n <= max_nnz``; chosen on validation. Dense
  item x item at training time, so only up to ``ease_max_items`` items (default 8,000:
  a 8k x 8k float64 inverse is 0.5 GB); above, only co-occurrence is fitted.
- ``cooc``: shrunk cosine of co-occurrence, ``c_ij / (sqrt(n_i n_j) + shrink)`` with
  ``c_ij`` the customers having both items and ``n_i`` those having ``i`` (binary
  train matrix). Computed in chunks of ``chunk_items`` rows of ``XᵀX`` (sparse), each
  chunk reduced to its top ``top_n`` at once, so memory stays ``O(chunk x items)`` and
  the result ``O(items x top_n)``: this is the path for 100k+ item catalogues.

Neither method ever materialises a dense item x item matrix at serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import scipy.sparse as sp

from services.models.item2item import ItemNeighbours, from_rows
from training.evaluate import evaluate
from training.features import EvalSet


@dataclass(frozen=True)
class Item2ItemConfig:
    top_n: int = 200  # neighbours kept per item (cooc; EASE tries ease_top_ns)
    ease_top_ns: tuple[int, ...] = (200, 1000)  # EASE truncations tried on validation
    max_nnz: int = 20_000_000  # largest neighbour list kept in total (items x top_n)
    methods: tuple[str, ...] = ("ease", "cooc")  # tried, best on validation kept
    ease_max_items: int = 8_000  # EASE (dense inverse) only up to this many items
    ease_lambdas: tuple[float, ...] = (250.0,)  # used when no fitted EASE is passed in
    shrink: float = 10.0  # cooc: cosine shrinkage
    chunk_items: int = 2048  # cooc: rows of XᵀX computed at once


def _binary(x: sp.spmatrix) -> sp.csr_matrix:
    b = sp.csr_matrix(x, copy=True)
    b.data[:] = 1.0
    b.eliminate_zeros()
    return b


def ease_neighbours(
    b: np.ndarray, item_ids: list[str], top_n: int, lam: float | None = None, signed: bool = False
) -> ItemNeighbours:
    """Top-N per row of a dense EASE weight matrix ``B`` (``W[j, i] = B[j, i]``): the
    largest weights, or with ``signed`` the largest in absolute value."""
    n = b.shape[0]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for a in range(0, n, 1024):
        block = np.asarray(b[a : a + 1024], dtype=np.float64).copy()
        idx = np.arange(block.shape[0])
        block[idx, a + idx] = 0.0
        kk = min(top_n, n)
        key = np.abs(block) if signed else block
        part = (
            np.argpartition(-key, kk - 1, axis=1)[:, :kk]
            if kk < n
            else np.tile(np.arange(n), (block.shape[0], 1))
        )
        v = np.take_along_axis(block, part, axis=1)
        rows.append(np.repeat(a + idx, part.shape[1]))
        cols.append(part.ravel())
        vals.append(v.ravel())
    cfg: dict[str, Any] = {"method": "ease"}
    if lam is not None:
        cfg["lambda"] = lam
    return from_rows(
        item_ids,
        np.concatenate(rows),
        np.concatenate(cols),
        np.concatenate(vals),
        top_n,
        cfg,
        signed,
    )


def fit_ease(x: sp.spmatrix, item_ids: list[str], lam: float, top_n: int) -> ItemNeighbours:
    """EASE on the binary ``x`` [users, items], truncated to ``top_n`` per item."""
    from training.baselines import EASE

    model = EASE(lam=lam).fit(sp.csr_matrix(x))
    assert model.B is not None
    return ease_neighbours(model.B, item_ids, top_n, lam)


def fit_cooc(
    x: sp.spmatrix, item_ids: list[str], top_n: int, shrink: float, chunk_items: int = 2048
) -> ItemNeighbours:
    """Shrunk cosine co-occurrence, chunked (see the module docstring)."""
    xb = _binary(sp.csr_matrix(x))
    xt = xb.T.tocsr()
    n_i = np.asarray(xb.sum(axis=0)).ravel().astype(np.float64)
    sq = np.sqrt(n_i)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    n = xb.shape[1]
    for a in range(0, n, chunk_items):
        c = (xt[a : a + chunk_items] @ xb).tocoo()
        r = c.row.astype(np.int64) + a
        v = c.data / (sq[r] * sq[c.col] + shrink)
        part = from_rows(item_ids, r, c.col, v, top_n)
        rr = np.repeat(np.arange(n), np.diff(part.indptr))
        rows.append(rr)
        cols.append(part.indices.astype(np.int64))
        vals.append(part.scores.astype(np.float64))
    cfg = {"method": "cooc", "shrink": shrink}
    if not rows:
        return from_rows(item_ids, np.zeros(0), np.zeros(0), np.zeros(0), top_n, cfg)
    return from_rows(
        item_ids, np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), top_n, cfg
    )


class NeighbourScorer:
    """Evaluation scorer: ``history_row @ W`` for each query (dense per batch)."""

    def __init__(self, model: ItemNeighbours, history: sp.csr_matrix) -> None:
        self.w = model.matrix.astype(np.float32)
        self.h = _binary(history)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray((self.h[rows] @ self.w).toarray())


@dataclass
class FittedItem2Item:
    model: ItemNeighbours
    valid_metric: float
    tried: list[dict[str, Any]]
    fit_seconds: float


def refit_item2item(
    x: sp.spmatrix,
    item_ids: list[str],
    chosen: dict[str, Any],
    ease_b: tuple[np.ndarray, float] | None = None,
) -> ItemNeighbours:
    """The configuration ``chosen`` on validation (a fitted model's ``config``), fit again
    on ``x`` (train + validation before the test read): the same method, truncation and
    sign, with EASE's λ (``ease_b``: EASE weights already fit on ``x``, reused).
    Merge weights in ``chosen`` are kept."""
    method = chosen.get("method")
    top_n = int(chosen["top_n"])
    if method == "ease":
        if ease_b is not None:
            b, lam = ease_b
        else:
            from training.baselines import EASE

            lam = float(chosen["lambda"])
            fitted = EASE(lam=lam).fit(sp.csr_matrix(x))
            assert fitted.B is not None
            b = fitted.B
        model = ease_neighbours(b, item_ids, top_n, lam, bool(chosen.get("signed", False)))
    elif method == "cooc":
        model = fit_cooc(x, item_ids, top_n, float(chosen["shrink"]))
    else:
        raise ValueError(f"unknown item-to-item method {method!r}: ease | cooc")
    if "merge" in chosen:
        model.config["merge"] = chosen["merge"]
    return model


def fit_item2item(
    train_x: sp.spmatrix,
    item_ids: list[str],
    valid: EvalSet,
    valid_history: sp.csr_matrix,
    cfg: Item2ItemConfig,
    metric: str = "recall@20",
    ease_b: tuple[np.ndarray, float] | None = None,
    log: Callable[[str], None] | None = None,
) -> FittedItem2Item:
    """Fit every method of ``cfg`` that applies, keep the best on validation ``metric``.

    ``ease_b``: an EASE weight matrix already fitted (and its λ chosen on validation) by
    the baselines, reused instead of fitting EASE again."""
    k = int(metric.split("@")[1])
    n = len(item_ids)
    best: FittedItem2Item | None = None
    tried: list[dict[str, Any]] = []
    candidates: list[tuple[str, Callable[[], ItemNeighbours]]] = []
    for method in cfg.methods:
        if method == "ease":
            if n > cfg.ease_max_items:
                tried.append({"method": "ease", "skipped": f"{n} items > {cfg.ease_max_items}"})
                continue
            top_ns = [t for t in cfg.ease_top_ns if t * n <= cfg.max_nnz] or [cfg.top_n]
            for top_n in top_ns:
                if ease_b is not None:
                    b, lam = ease_b
                    for signed in (False, True):
                        fit_signed = partial(ease_neighbours, b, item_ids, top_n, lam, signed)
                        candidates.append(("ease", fit_signed))
                else:
                    for lam in cfg.ease_lambdas:
                        candidates.append(
                            ("ease", partial(fit_ease, train_x, item_ids, lam, top_n))
                        )
        elif method == "cooc":
            candidates.append(
                (
                    "cooc",
                    lambda: fit_cooc(train_x, item_ids, cfg.top_n, cfg.shrink, cfg.chunk_items),
                )
            )
        else:
            raise ValueError(f"unknown item-to-item method {method!r}: ease | cooc")
    for name, fit in candidates:
        t0 = time.perf_counter()
        model = fit()
        secs = time.perf_counter() - t0
        m = evaluate(NeighbourScorer(model, valid_history), valid, ks=(k,)).get(metric, 0.0)
        tried.append({**model.config, metric: m, "fit_seconds": secs, "nnz": model.nnz})
        if log:
            log(f"item2item {name} {model.config}: valid {metric} {m:.4f} (fit {secs:.1f}s)")
        if best is None or m > best.valid_metric:
            best = FittedItem2Item(model, m, tried, secs)
    if best is None:
        raise ValueError(f"no item-to-item method applies to {n} items: {tried}")
    best.tried = tried
    return best
