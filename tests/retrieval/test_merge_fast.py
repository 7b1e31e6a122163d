"""The vectorised merge against the straightforward loops it replaced: the same rows,
the same scores to the bit, the same proposing source and anchors."""

from __future__ import annotations

import numpy as np
import pytest

from services.models import item2item
from services.models.item2item import ItemNeighbours, from_rows
from services.retrieval.merge import RRF_C, fuse

MODEL, I2I, OTHER = 1, 11, 5


def fuse_loop(
    lists: dict[int, tuple[np.ndarray, float]], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-row loop ``fuse`` was before it was vectorised."""
    fused: dict[int, float] = {}
    best: dict[int, tuple[float, int]] = {}
    for source, (rows, weight) in lists.items():
        if weight <= 0:
            continue
        for rank, r in enumerate(np.asarray(rows).tolist(), start=1):
            part = weight / (RRF_C + rank)
            fused[r] = fused.get(r, 0.0) + part
            if part > best.get(r, (-1.0, 0))[0]:
                best[r] = (part, source)
    order = sorted(fused, key=lambda r: (-fused[r], r))[:k]
    return (
        np.array(order, dtype=np.int64),
        np.array([fused[r] for r in order], dtype=np.float32),
        np.array([best[r][1] for r in order], dtype=np.int64),
    )


def best_anchor_loop(w: ItemNeighbours, history: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``best_anchor`` as a loop over the dense matrix: the history row with the largest
    positive W[j, i], the lower row on ties, else -1."""
    dense = w.matrix.toarray()
    hist = sorted({int(h) for h in history if 0 <= h < w.n_items})
    out = []
    for r in rows.tolist():
        best, at = 0.0, -1
        for j in hist:
            if w.matrix[j, r] != 0 and (at < 0 or dense[j, r] > best):
                best, at = dense[j, r], j
        out.append(at)
    return np.array(out, dtype=np.int64)


def random_lists(rng: np.random.Generator) -> dict[int, tuple[np.ndarray, float]]:
    n = int(rng.integers(1, 400))
    lists = {}
    for source in rng.permutation([MODEL, I2I, OTHER])[: int(rng.integers(1, 4))].tolist():
        size = int(rng.integers(0, 250))
        rows = rng.choice(n, size=min(size, n), replace=False)
        weight = float(rng.choice([0.0, 0.5, 1.0, 1.0, 2.0, rng.uniform(0.01, 3)]))
        lists[source] = (rows.astype(np.int64), weight)
    return lists


@pytest.mark.parametrize("seed", range(40))
def test_fuse_equals_the_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lists = random_lists(rng)
    k = int(rng.integers(1, 300))
    got, want = fuse(lists, k), fuse_loop(lists, k)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_fuse_ties_and_equal_parts() -> None:
    # Same rank in two sources of equal weight: the same part, the first source wins;
    # equal fused scores are ordered by row.
    lists = {I2I: (np.array([7, 3]), 1.0), MODEL: (np.array([3, 7]), 1.0)}
    for g, w in zip(fuse(lists, 5), fuse_loop(lists, 5), strict=True):
        np.testing.assert_array_equal(g, w)
    assert fuse(lists, 5)[0].tolist() == [3, 7]
    assert fuse(lists, 5)[2].tolist() == [MODEL, I2I]  # 3: second in I2I, first in MODEL


def test_best_anchor_equals_the_loop() -> None:
    rng = np.random.default_rng(3)
    n = 60
    pairs = np.unique(rng.integers(0, n, (900, 2)), axis=0)  # one weight per pair
    rows, cols = pairs[:, 0], pairs[:, 1]
    vals = rng.choice([0.5, 1.0, 2.0], len(pairs))  # few distinct values: many ties
    w = from_rows([f"i{i}" for i in range(n)], rows, cols, vals, top_n=8)
    for _ in range(30):
        hist = rng.integers(-2, n + 2, int(rng.integers(0, 12)))
        targets = rng.integers(0, n, int(rng.integers(0, 40)))
        np.testing.assert_array_equal(
            w.best_anchor(hist, targets), best_anchor_loop(w, hist, targets)
        )


def test_what_the_history_reaches_is_computed_once_with_the_same_answers() -> None:
    rng = np.random.default_rng(4)
    n = 80
    w = from_rows([f"i{i}" for i in range(n)], *rng.integers(0, n, (2, 1500)), rng.random(1500), 10)
    for _ in range(20):
        hist = rng.integers(0, n, int(rng.integers(1, 15)))
        rows = rng.integers(0, n, 50)
        excl = rng.integers(0, n, 5)
        reached = w.score_rows(hist)
        for got, want in zip(w.top(hist, 12, excl, reached), w.top(hist, 12, excl), strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(w.score_of(hist, rows, reached), w.score_of(hist, rows))
        # the history's neighbour entries, gathered once for the scores and the anchors
        entries = w.entries(hist)
        for got, want in zip(w.score_rows(hist, entries), reached, strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(w.best_anchor(hist, rows, entries), w.best_anchor(hist, rows))


def test_dense_and_sorted_scoring_give_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``score_rows`` (``DENSE_RATIO``) and ``best_anchor`` (``MARK_RATIO``) walk a dense
    catalogue array when the history reaches many entries, else sort or search them;
    ``top`` keeps only rows at least the k-th best before sorting. Both paths give the
    same arrays to the bit, the anchors the loop's, and ``top`` the brute-force order
    (many ties: few distinct weights)."""
    rng = np.random.default_rng(5)
    n = 300
    pairs = np.unique(rng.integers(0, n, (6000, 2)), axis=0)
    vals = rng.choice([0.25, 0.5, 1.0, 2.0], len(pairs))
    w = from_rows([f"i{i}" for i in range(n)], pairs[:, 0], pairs[:, 1], vals, top_n=12)
    dense_calls = 0
    for _ in range(60):
        hist = rng.integers(-2, n + 2, int(rng.integers(0, 30)))
        targets = rng.integers(0, n, int(rng.integers(0, 80)))
        excl = rng.integers(0, n, int(rng.integers(0, 6)))
        k = int(rng.choice([1, 3, 10, 50, 400]))
        answers = []
        for ratio in (0, 10**9):  # never dense, always dense
            monkeypatch.setattr(item2item, "DENSE_RATIO", ratio)
            monkeypatch.setattr(item2item, "MARK_RATIO", ratio)
            answers.append(
                (*w.score_rows(hist), w.best_anchor(hist, targets), *w.top(hist, k, excl))
            )
        for a, b in zip(*answers, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        rows, sums, anchors, top_rows, _ = answers[0]
        np.testing.assert_array_equal(anchors, best_anchor_loop(w, hist, targets))
        drop = set(hist.tolist()) | set(excl.tolist())
        ranked = sorted(
            (
                r
                for r, s in zip(rows.tolist(), sums.tolist(), strict=True)
                if s > 0 and r not in drop
            ),
            key=lambda r: (-sums[np.searchsorted(rows, r)], r),
        )[:k]
        assert top_rows.tolist() == ranked
        dense_calls += len(rows) > 4 * k
    assert dense_calls > 10  # the k-th-best shortcut ran
