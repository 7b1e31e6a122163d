"""Full-ranking evaluation: Recall, NDCG, HitRate at K and catalog coverage.

Every item of the catalog is scored for every evaluation user (never sampled
negatives); items the user already had in history are excluded from the ranking and
from the truth. Definitions (RecBole's):

- Recall@K = |top-K ∩ truth| / |truth|
- NDCG@K = DCG@K / IDCG@K with binary gains, DCG = Σ 1/log2(rank + 1) over hits
  (rank from 1), IDCG over min(|truth|, K) hits
- HitRate@K = 1 when top-K holds at least one truth item
- Coverage@K = distinct items in anyone's top-K / catalog size

User metrics are averaged over users with a non-empty truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from training.features import EvalSet

DEFAULT_KS = (10, 20, 50, 100)


class Scorer(Protocol):
    """Scores every item for a batch of evaluation rows: [B, n_items]."""

    def __call__(self, rows: np.ndarray) -> np.ndarray: ...


def top_k(scores: np.ndarray, exclude: sp.csr_matrix, k: int) -> np.ndarray:
    """Indices of the k best items per row, best first, after excluding items."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    r, c = exclude.nonzero()
    scores[r, c] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def metrics_from_ranking(
    ranked: np.ndarray, truth: sp.csr_matrix, ks: tuple[int, ...] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Per-user metric arrays from ranked item indices [U, >=max(ks)] and a truth matrix."""
    truth = truth.tocsr()
    n_true = np.diff(truth.indptr)
    hits = np.zeros(ranked.shape, dtype=bool)
    for u in range(ranked.shape[0]):
        t = truth.indices[truth.indptr[u] : truth.indptr[u + 1]]
        hits[u] = np.isin(ranked[u], t)
    disc = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(1)
        out[f"recall@{k}"] = n_hit / np.maximum(n_true, 1)
        dcg = (h * disc[:k]).sum(1)
        idcg = np.cumsum(disc[:k])[np.minimum(n_true, k) - 1]
        out[f"ndcg@{k}"] = np.where(n_true > 0, dcg / idcg, 0.0)
        out[f"hit@{k}"] = (n_hit > 0).astype(np.float64)
    return out


def _ranked_batches(
    scorer: Scorer | Callable[[np.ndarray], np.ndarray],
    es: EvalSet,
    ks: tuple[int, ...],
    batch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(evaluation rows, their top-max(ks) items) batch by batch."""
    n_items = es.truth.shape[1]
    kmax = min(max(ks), n_items)
    batch = batch or max(1, min(2048, 20_000_000 // max(n_items, 1)))
    for a in range(0, len(es), batch):
        rows = np.arange(a, min(a + batch, len(es)))
        yield rows, top_k(scorer(rows), es.exclude[rows], kmax)


def per_user(
    scorer: Scorer | Callable[[np.ndarray], np.ndarray],
    es: EvalSet,
    ks: tuple[int, ...] = DEFAULT_KS,
    batch: int = 0,
) -> dict[str, np.ndarray]:
    """Every user's metrics (arrays in the evaluation set's order): what
    :func:`evaluate` averages, for paired comparisons of two models on the same users."""
    parts: dict[str, list[np.ndarray]] = {}
    for rows, ranked in _ranked_batches(scorer, es, ks, batch):
        for name, v in metrics_from_ranking(ranked, es.truth[rows], ks).items():
            parts.setdefault(name, []).append(v)
    return {name: np.concatenate(v) for name, v in parts.items()}


def evaluate(
    scorer: Scorer | Callable[[np.ndarray], np.ndarray],
    es: EvalSet,
    ks: tuple[int, ...] = DEFAULT_KS,
    batch: int = 0,
) -> dict[str, float]:
    """Mean metrics over the users of an evaluation set, plus coverage@K."""
    n_items = es.truth.shape[1]
    if len(es) == 0:
        return {"users": 0.0}
    sums: dict[str, float] = {}
    seen = {k: np.zeros(n_items, dtype=bool) for k in ks}
    for rows, ranked in _ranked_batches(scorer, es, ks, batch):
        for name, v in metrics_from_ranking(ranked, es.truth[rows], ks).items():
            sums[name] = sums.get(name, 0.0) + float(v.sum())
        for k in ks:
            seen[k][ranked[:, :k].ravel()] = True
    out = {name: s / len(es) for name, s in sums.items()}
    for k in ks:
        out[f"coverage@{k}"] = float(seen[k].mean())
    out["users"] = float(len(es))
    return out


class PopularityScorer:
    """Same scores for everyone: how often each item was a target event in train."""

    def __init__(self, counts: np.ndarray) -> None:
        self.scores = np.asarray(counts, dtype=np.float32)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.scores, (len(rows), len(self.scores)))


class EmbeddingScorer:
    """Inner product of precomputed user and item embeddings."""

    def __init__(self, users: np.ndarray, items: np.ndarray) -> None:
        self.users, self.items = users, items

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.users[rows] @ self.items.T


def _columns(ks: tuple[int, ...]) -> list[str]:
    return [f"{m}@{k}" for m in ("recall", "ndcg", "hit") for k in ks] + [f"coverage@{ks[-1]}"]


def format_table(results: dict[str, dict[str, float]], ks: tuple[int, ...] = DEFAULT_KS) -> str:
    """A markdown table: one row per model, Recall/NDCG/HitRate@K, coverage and the
    training time in seconds when known."""
    cols = _columns(ks)
    timed = any("train_seconds" in m for m in results.values())
    head = cols + (["train s"] if timed else [])
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for model, m in results.items():
        cells = [f"{m.get(c, float('nan')):.4f}" for c in cols]
        if timed:
            cells.append(f"{m.get('train_seconds', float('nan')):.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_csv(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """split,model,metric,value rows of a whole evaluation."""
    rows = ["split,model,metric,value"]
    for split, models in results.items():
        for model, m in models.items():
            rows += [f"{split},{model},{k},{v:.6g}" for k, v in sorted(m.items())]
    return "\n".join(rows) + "\n"


def rich_table(
    results: dict[str, dict[str, float]], ks: tuple[int, ...] = DEFAULT_KS, title: str = ""
) -> Any:
    """The evaluation as a rich Table (Recall and NDCG at every K, coverage, time);
    the best value of each column in bold."""
    from rich.table import Table

    cols = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks] + [f"coverage@{ks[-1]}"]
    t = Table(title=title or None)
    t.add_column("model")
    for c in [*cols, "train s"]:
        t.add_column(c, justify="right")
    best = {c: max((m.get(c, float("-inf")) for m in results.values()), default=0.0) for c in cols}
    for model, m in results.items():
        cells = []
        for c in cols:
            v = m.get(c, float("nan"))
            cells.append(f"[bold]{v:.4f}[/bold]" if v == best[c] else f"{v:.4f}")
        cells.append(f"{m.get('train_seconds', float('nan')):.1f}")
        t.add_row(model, *cells)
    return t
