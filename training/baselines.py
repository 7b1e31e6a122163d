"""Collaborative-filtering baselines evaluated next to the two-tower on the same split.

- **Popularity** (:class:`training.evaluate.PopularityScorer`): train target counts.
- **EASE** (Steck, WWW 2019): closed form ``P = (XᵀX + λI)⁻¹``, ``B = I - P / diag(P)``
  with a zero diagonal; a user's scores are ``x_u B`` with ``x_u`` the binary history row.
- **ALS** (Hu, Koren and Volinsky 2008) with the ``implicit`` package (0.7.3). Its
  confidence is ``alpha * value`` of the user-item matrix (not ``1 + alpha * value``
  as in the paper); values here are event-weighted counts. User factors of evaluation
  users are recomputed from their history row (``recalculate_user``), so ALS sees the
  same history as every other model.

Both are fit on the training part only. Hyper-parameters are chosen on the validation
part from small grids (:class:`BaselineConfig`), never on test.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.data import EVENT_CODE
from training.features import DEFAULT_EVENT_WEIGHTS, EvalSet, Vocab


@dataclass(frozen=True)
class BaselineConfig:
    models: tuple[str, ...] = ("als", "ease")
    ease_lambdas: tuple[float, ...] = (100.0, 500.0)
    als_factors: int = 64
    als_regularizations: tuple[float, ...] = (0.05,)
    als_alphas: tuple[float, ...] = (1.0, 10.0)
    als_iterations: int = 15
    seed: int = 0


def interactions(
    events: pd.DataFrame, vocab: Vocab, users: np.ndarray | None = None
) -> sp.csr_matrix:
    """Event-weighted counts [users, n_items]: rows are ``users`` (user codes) in order,
    or every user code of the vocabulary when None."""
    codes = vocab.user_codes.get_indexer(events["user_id"]).astype(np.int64)
    items = events["item_id"].map(vocab.item_row).to_numpy(np.int64)
    w_by_code = np.array([DEFAULT_EVENT_WEIGHTS[e] for e in EVENT_CODE], dtype=np.float32)
    w = w_by_code[events["event"].map(EVENT_CODE).to_numpy(np.int64)]
    if users is None:
        n_rows, rows = len(vocab.user_codes), codes
    else:
        pos = pd.Index(users).get_indexer(codes)
        keep = pos >= 0
        n_rows, rows, items, w = len(users), pos[keep], items[keep], w[keep]
    m = sp.csr_matrix((w, (rows, items)), shape=(n_rows, vocab.n_items), dtype=np.float32)
    m.sum_duplicates()
    return m


def _binary(x: sp.csr_matrix) -> sp.csr_matrix:
    b = x.copy().tocsr()
    b.data[:] = 1.0
    return b


def ease_matrix(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE's ``B = I - P / diag(P)``, ``P = (G + λI)⁻¹``, zero diagonal (Steck 2019),
    from the item Gram matrix ``G = XᵀX`` of binary interactions (float64)."""
    g = gram.astype(np.float64, copy=True)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


class EASE:
    """Closed-form item-item model; ``fit`` on a user-item matrix, score history rows."""

    def __init__(self, lam: float = 500.0) -> None:
        self.lam = lam
        self.B: np.ndarray | None = None

    def fit(self, x: sp.csr_matrix) -> EASE:
        xb = _binary(x)
        self.B = ease_matrix((xb.T @ xb).toarray(), self.lam).astype(np.float32)
        return self

    def scorer(self, history: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
        assert self.B is not None, "fit first"
        hb, b = _binary(history), self.B

        def score(rows: np.ndarray) -> np.ndarray:
            return np.asarray(hb[rows] @ b)

        return score


class ALS:
    """``implicit`` ALS (CPU, one thread); user factors recomputed from history rows."""

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 1.0,
        iterations: int = 15,
        seed: int = 0,
    ) -> None:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from implicit.cpu.als import AlternatingLeastSquares

        self.model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            random_state=seed,
            num_threads=1,
            calculate_training_loss=False,
        )

    def fit(self, x: sp.csr_matrix) -> ALS:
        self.model.fit(x.tocsr().astype(np.float32), show_progress=False)
        return self

    def scorer(self, history: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
        h = history.tocsr().astype(np.float32)
        users = self.model.recalculate_user(np.arange(h.shape[0]), h)
        items = np.asarray(self.model.item_factors)

        def score(rows: np.ndarray) -> np.ndarray:
            return np.asarray(users[rows] @ items.T)

        return score


def make_model(name: str, params: dict[str, Any], seed: int) -> EASE | ALS:
    if name == "ease":
        return EASE(lam=float(params["lam"]))
    if name == "als":
        return ALS(
            factors=int(params["factors"]),
            regularization=float(params["regularization"]),
            alpha=float(params["alpha"]),
            iterations=int(params["iterations"]),
            seed=seed,
        )
    raise ValueError(f"unknown baseline {name!r}: als | ease")


def grid(name: str, cfg: BaselineConfig) -> list[dict[str, Any]]:
    if name == "ease":
        return [{"lam": lam} for lam in cfg.ease_lambdas]
    if name == "als":
        return [
            {
                "factors": cfg.als_factors,
                "regularization": r,
                "alpha": a,
                "iterations": cfg.als_iterations,
            }
            for r in cfg.als_regularizations
            for a in cfg.als_alphas
        ]
    raise ValueError(f"unknown baseline {name!r}: als | ease")


@dataclass
class FittedBaseline:
    name: str
    model: EASE | ALS
    params: dict[str, Any]
    fit_seconds: float  # of the chosen configuration
    valid_metric: float
    tried: list[dict[str, Any]]


def fit_baseline(
    name: str,
    train: sp.csr_matrix,
    valid: EvalSet,
    valid_history: sp.csr_matrix,
    cfg: BaselineConfig,
    metric: str = "recall@20",
    log: Callable[[str], None] | None = None,
) -> FittedBaseline:
    """Fit every grid point on ``train``; keep the best on validation ``metric``."""
    from training.evaluate import evaluate

    k = int(metric.split("@")[1])
    best: FittedBaseline | None = None
    tried = []
    for params in grid(name, cfg):
        t0 = time.perf_counter()
        model = make_model(name, params, cfg.seed).fit(train)
        secs = time.perf_counter() - t0
        m = evaluate(model.scorer(valid_history), valid, ks=(k,)).get(metric, 0.0)
        tried.append({**params, metric: m, "fit_seconds": secs})
        if log:
            log(f"{name} {params}: valid {metric} {m:.4f} (fit {secs:.1f}s)")
        if best is None or m > best.valid_metric:
            best = FittedBaseline(name, model, params, secs, m, tried)
    assert best is not None
    best.tried = tried
    return best
