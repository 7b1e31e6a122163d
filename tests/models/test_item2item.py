"""The item-to-item model: neighbours equal a brute-force computation, scores equal the
dense product, broken artifacts are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from services.models.item2item import Item2ItemError, ItemNeighbours, from_rows
from training.item2item import ease_neighbours, fit_cooc, fit_ease


def small_matrix(seed: int = 0, users: int = 60, items: int = 25) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    # Items of two "tastes" so co-occurrence has structure; some users buy repeatedly.
    x = (rng.random((users, items)) < 0.15).astype(np.float32)
    x[: users // 2, : items // 2] += rng.random((users // 2, items // 2)) < 0.3
    x[:, 3] = 0  # an item nobody has: no neighbours, nobody's neighbour
    return sp.csr_matrix(x * 2.0)  # counts > 1: the models must binarise


def brute_top(w: np.ndarray, top_n: int) -> list[list[tuple[int, float]]]:
    """Per row: positive off-diagonal entries, best first (ties by column), top_n."""
    out = []
    for j in range(w.shape[0]):
        pairs = [(i, float(w[j, i])) for i in range(w.shape[1]) if i != j and w[j, i] > 0]
        pairs.sort(key=lambda p: (-p[1], p[0]))
        out.append(pairs[:top_n])
    return out


def as_lists(m: ItemNeighbours) -> list[list[tuple[int, float]]]:
    out = []
    for j in range(m.n_items):
        rows, scores = m.neighbours(j)
        out.append([(int(r), float(s)) for r, s in zip(rows, scores, strict=True)])
    return out


def assert_same(got: list[list[tuple[int, float]]], want: list[list[tuple[int, float]]]) -> None:
    assert len(got) == len(want)
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        assert [r for r, _ in g] == [r for r, _ in w], f"row {j}"
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-5, atol=1e-7)


IDS = [f"item-{i}" for i in range(25)]


@pytest.mark.parametrize("chunk", [3, 7, 4096])
def test_cooc_neighbours_equal_brute_force(chunk: int) -> None:
    x = small_matrix()
    xb = (x.toarray() > 0).astype(np.float64)
    c = xb.T @ xb
    n = xb.sum(0)
    shrink = 4.0
    w = c / (np.sqrt(np.outer(n, n)) + shrink)
    m = fit_cooc(x, IDS, top_n=6, shrink=shrink, chunk_items=chunk)
    assert_same(as_lists(m), brute_top(w, 6))
    assert m.neighbours(3)[0].size == 0
    assert 3 not in m.indices
    m.check()


def dense_ease(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's weight matrix computed directly (dense, float64) on the binary matrix."""
    xb = (x.toarray() > 0).astype(np.float64)
    p = np.linalg.inv(xb.T @ xb + lam * np.eye(xb.shape[1]))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def test_signed_ease_keeps_the_largest_weights_in_absolute_value() -> None:
    x = small_matrix(3)
    lam = 5.0
    b = dense_ease(x, lam)
    m = ease_neighbours(b, IDS, 6, lam, signed=True)
    want = []
    for j in range(b.shape[0]):
        pairs = [(i, float(b[j, i])) for i in range(b.shape[1]) if i != j and b[j, i] != 0]
        pairs.sort(key=lambda p: (-abs(p[1]), p[0]))
        want.append(sorted(pairs[:6], key=lambda p: (-p[1], p[0])))
    assert_same(as_lists(m), want)
    assert (m.scores < 0).any() and m.config["signed"] is True
    m.check()  # rows still best first


def test_ease_neighbours_equal_brute_force() -> None:
    x = small_matrix(1)
    lam = 5.0
    b = dense_ease(x, lam)
    m = fit_ease(x, IDS, lam=lam, top_n=8)
    assert m.config["method"] == "ease"
    assert_same(as_lists(m), brute_top(b, 8))


def test_scores_equal_the_dense_product_and_top_leaves_out_history() -> None:
    m = fit_cooc(small_matrix(2), IDS, top_n=5, shrink=1.0)
    w = m.matrix.toarray()
    hist = np.array([0, 4, 4, 9, 17])
    dense = w[np.unique(hist)].sum(0)
    rows, sums = m.score_rows(hist)
    assert sorted(rows.tolist()) == np.flatnonzero(dense).tolist()
    np.testing.assert_allclose(sums, dense[rows], rtol=1e-6)
    probe = np.arange(25)
    np.testing.assert_allclose(m.score_of(hist, probe), dense, rtol=1e-6)
    top_rows, top_scores = m.top(hist, 4, exclude=np.array([rows[np.argmax(sums)]]))
    masked = dense.copy()
    masked[np.unique(hist)] = 0
    masked[rows[np.argmax(sums)]] = 0
    want = sorted(np.flatnonzero(masked), key=lambda i: (-masked[i], i))[:4]
    assert top_rows.tolist() == want
    assert np.all(np.diff(top_scores) <= 0)
    assert m.score_rows(np.array([], dtype=np.int64))[0].size == 0
    # The anchor of each reached item: the history item with the largest weight to it.
    reached = np.flatnonzero(dense)
    anchors = m.best_anchor(hist, np.r_[reached, 3])
    for r, a in zip(reached, anchors[:-1], strict=True):
        assert w[a, r] == max(w[j, r] for j in np.unique(hist))
    assert anchors[-1] == -1  # item 3: nobody's neighbour
    assert m.best_anchor(hist, np.array([3])).tolist() == [-1]
    assert m.best_anchor(np.array([], dtype=np.int64), reached[:2]).tolist() == [-1, -1]


def test_from_rows_keeps_top_n_positive_best_first() -> None:
    m = from_rows(
        ["a", "b", "c", "d"],
        np.array([0, 0, 0, 0, 1, 2]),
        np.array([1, 2, 3, 0, 0, 2]),
        np.array([0.5, 2.0, 1.0, 9.0, -1.0, 3.0]),
        top_n=2,
    )
    assert as_lists(m) == [[(2, 2.0), (3, 1.0)], [], [], []]


def test_save_load_round_trip_and_broken_versions_refused(tmp_path: Path) -> None:
    m = fit_cooc(small_matrix(), IDS, top_n=6, shrink=4.0)
    m.save(tmp_path / "ok")
    back = ItemNeighbours.load(tmp_path / "ok", IDS)
    assert as_lists(back) == as_lists(m)
    with pytest.raises(Item2ItemError, match="differ from the bundle"):
        ItemNeighbours.load(tmp_path / "ok", IDS[::-1])

    def broken(name: str, **change: np.ndarray) -> Path:
        arrays = {"indptr": m.indptr, "indices": m.indices, "scores": m.scores, **change}
        bad = ItemNeighbours(IDS, arrays["indptr"], arrays["indices"], arrays["scores"])
        d = tmp_path / name
        bad.save(d)  # a consistent manifest: refused by the content checks
        return d

    idx = m.indices.copy()
    idx[0] = 0  # row 0 lists itself
    with pytest.raises(Item2ItemError, match="itself"):
        ItemNeighbours.load(broken("self", indices=idx))
    idx = m.indices.copy()
    idx[1] = 99
    with pytest.raises(Item2ItemError, match="out of range"):
        ItemNeighbours.load(broken("range", indices=idx))
    sc = m.scores.copy()
    sc[2] = np.nan
    with pytest.raises(Item2ItemError, match="finite"):
        ItemNeighbours.load(broken("nan", scores=sc))
    sc = m.scores.copy()
    sc[m.indptr[1]] = -5.0  # row 1's best is now below its second
    with pytest.raises(Item2ItemError, match="best first"):
        ItemNeighbours.load(broken("order", scores=sc))
    with pytest.raises(Item2ItemError, match="CSR"):
        ItemNeighbours.load(broken("indptr", indptr=m.indptr[:-1]))
    # A file changed after the manifest was written.
    (tmp_path / "ok" / "item_ids.json").write_text(json.dumps([*IDS[:-1], "x"]))
    with pytest.raises(Item2ItemError, match="manifest"):
        ItemNeighbours.load(tmp_path / "ok")
