"""The item-to-item model: a sparse top-N neighbour list per item (NumPy/SciPy only).

Training (:mod:`training.item2item`) fits it from EASE (small catalogues) or shrunk
co-occurrence (any size) and keeps each item's ``top_n`` best neighbours; serving never
holds a dense item x item matrix: the neighbours are a CSR matrix ``W`` of
``n_items x n_items`` with at most ``top_n`` entries per row, row ``j`` listing the
items that ``j`` points to (``W[j, i]``: how much having ``j`` in the history speaks for
``i``). A customer's score for item ``i`` is ``sum_j W[j, i]`` over their distinct
history items ``j`` (the EASE score ``x_u B`` with ``B`` truncated to ``top_n`` per row).

It ships inside the two-tower bundle, as the sub-directory ``item2item/`` (same item
rows as the bundle, so the two sources share one vocabulary and one registry version)::

    item2item/config.json       format_version, model_type, method, top_n, n_items, ...
    item2item/item_ids.json     item ids in row order (must equal the bundle's)
    item2item/neighbours.npz    indptr int64 [n+1], indices int32 [nnz], scores float32 [nnz]
    item2item/manifest.json     sha256 and size of every file above

Loading checks the manifest, the CSR structure (monotone ``indptr``, in-range
``indices``, no self-neighbour, finite scores, rows best first) and the item rows; any
failure raises :class:`Item2ItemError`, which the retrieval service turns into a refused
version (the previous one keeps serving).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from services.models.manifest import verify_manifest, write_manifest

FORMAT_VERSION = 1
MODEL_TYPE = "item2item"
DIRNAME = "item2item"
FILES = ("config.json", "item_ids.json", "neighbours.npz")
#: Scoring walks a dense array of the catalogue instead of sorting the history's
#: neighbour entries when there are at least n_items / DENSE_RATIO of them.
DENSE_RATIO = 16
#: ``best_anchor`` marks the asked rows in a catalogue-sized bool array (a byte per
#: item) instead of a binary search per entry when there are at least
#: n_items / MARK_RATIO entries (at 100k items and 3,000 entries: 3 us instead of 33).
MARK_RATIO = 64


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_set)`` for an ascending ``sorted_set`` (duplicates
    allowed): one binary search per value, without ``isin``'s sort of both arrays (the
    Retrieve path asks it of a few hundred values against short lists)."""
    values = np.asarray(values)
    if len(sorted_set) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_set, values)
    np.minimum(pos, len(sorted_set) - 1, out=pos)
    return sorted_set[pos] == values  # type: ignore[no-any-return]


class Item2ItemError(Exception):
    """A broken or inconsistent item-to-item artifact."""


@dataclass(frozen=True)
class HistoryEntries:
    """The neighbour entries of a history: entry ``e`` is ``W[src[e], dst[e]] = w[e]``."""

    src: np.ndarray  # int64: the history row
    dst: np.ndarray  # int64: the item it points to
    w: np.ndarray  # float32


@dataclass
class ItemNeighbours:
    """Top-N neighbours per item row as CSR arrays, each row best first."""

    item_ids: list[str]
    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32 [nnz]
    scores: np.ndarray  # float32 [nnz]
    config: dict[str, Any] = field(default_factory=dict)
    _csr: sp.csr_matrix | None = field(default=None, repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def nnz(self) -> int:
        return len(self.indices)

    @property
    def matrix(self) -> sp.csr_matrix:
        """``W`` as a SciPy CSR matrix (built once, shares the arrays)."""
        if self._csr is None:
            n = self.n_items
            self._csr = sp.csr_matrix((self.scores, self.indices, self.indptr), shape=(n, n))
        return self._csr

    def neighbours(self, row: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of ``row``'s neighbours, best first (at most ``n``)."""
        a, b = int(self.indptr[row]), int(self.indptr[row + 1])
        if n is not None:
            b = min(b, a + n)
        return self.indices[a:b].astype(np.int64), self.scores[a:b]

    def entries(self, history: np.ndarray) -> HistoryEntries:
        """The neighbour entries of the distinct ``history`` rows, in row order: what
        :meth:`score_rows` and :meth:`best_anchor` read (computed once per history when a
        caller asks for both, or for several candidate lists)."""
        hist = np.unique(np.asarray(history, dtype=np.int64))
        hist = hist[(hist >= 0) & (hist < self.n_items)]
        starts, ends = self.indptr[hist], self.indptr[hist + 1]
        lens = ends - starts
        pos = np.repeat(ends - lens.cumsum(), lens) + np.arange(lens.sum())
        return HistoryEntries(
            np.repeat(hist, lens), self.indices[pos].astype(np.int64), self.scores[pos]
        )

    def score_rows(
        self, history: np.ndarray, entries: HistoryEntries | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items reached from the distinct ``history`` rows and their summed scores
        (``sum_j W[j, i]``), unordered; the history rows themselves are included when
        another history item points to them (callers filter them). ``entries``:
        ``self.entries(history)`` when the caller has it already."""
        e = entries if entries is not None else self.entries(history)
        if len(e.dst) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        targets, weights = e.dst, e.w.astype(np.float64)
        if len(targets) * DENSE_RATIO >= self.n_items:
            # Many entries for the catalogue: one dense pass instead of sorting them.
            # bincount adds in input order either way: the same sums to the bit.
            seen = np.zeros(self.n_items, dtype=bool)
            seen[targets] = True
            rows = np.flatnonzero(seen)
            sums = np.bincount(targets, weights=weights, minlength=self.n_items)[rows]
            return rows.astype(np.int64), sums.astype(np.float32)
        rows, inv = np.unique(targets, return_inverse=True)
        sums = np.bincount(inv, weights=weights, minlength=len(rows))
        return rows.astype(np.int64), sums.astype(np.float32)

    def score_of(
        self,
        history: np.ndarray,
        rows: np.ndarray,
        reached: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``sum_j W[j, i]`` for each of ``rows`` (0 where no history item points to it);
        ``reached``: ``score_rows(history)`` when the caller has it already."""
        targets, sums = reached if reached is not None else self.score_rows(history)
        out = np.zeros(len(rows), dtype=np.float32)
        if len(targets):
            pos = np.searchsorted(targets, rows)
            pos = np.minimum(pos, len(targets) - 1)
            hit = targets[pos] == rows
            out[hit] = sums[pos[hit]]
        return out

    def best_anchor(
        self, history: np.ndarray, rows: np.ndarray, entries: HistoryEntries | None = None
    ) -> np.ndarray:
        """For each of ``rows``: the history row ``j`` with the largest ``W[j, i]``
        (ties: the lower row), or -1 when no history item points to it (``entries``:
        ``self.entries(history)`` when the caller has it already)."""
        out = np.full(len(rows), -1, dtype=np.int64)
        if len(rows) == 0:
            return out
        e = entries if entries is not None else self.entries(history)
        if len(e.dst) == 0:
            return out
        src, dst, w = e.src, e.dst, e.w
        asked = np.asarray(rows, dtype=np.int64)
        asked = asked[(asked >= 0) & (asked < self.n_items)]
        targets = np.unique(asked)
        if len(dst) * MARK_RATIO >= self.n_items:
            mark = np.zeros(self.n_items, dtype=bool)
            mark[asked] = True
            want = mark[dst]
        else:
            want = in_sorted(dst, targets)
        src, dst, w = src[want], dst[want], w[want]
        if len(dst) == 0:
            return out
        # Per asked target: the largest weight, then the lowest history row with it
        # (no sort: a maximum and a minimum per target over the entries).
        at = np.searchsorted(targets, dst)
        best_w = np.full(len(targets), -np.inf, dtype=w.dtype)
        np.maximum.at(best_w, at, w)
        top = w == best_w[at]
        none = np.iinfo(np.int64).max
        best = np.full(len(targets), none, dtype=np.int64)
        np.minimum.at(best, at[top], src[top])
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.minimum(np.searchsorted(targets, rows), len(targets) - 1)
        hit = (targets[pos] == rows) & (best[pos] != none)
        out[hit] = best[pos[hit]]
        return out

    def top(
        self,
        history: np.ndarray,
        k: int,
        exclude: np.ndarray | None = None,
        reached: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows for a history (history rows and ``exclude`` left out),
        by descending score, ties by row; only rows with a positive score (``reached``:
        ``score_rows(history)`` when the caller has it already)."""
        rows, sums = reached if reached is not None else self.score_rows(history)
        drop = in_sorted(rows, np.sort(np.asarray(history, dtype=np.int64)))
        if exclude is not None and len(exclude):
            drop |= in_sorted(rows, np.sort(np.asarray(exclude, dtype=np.int64)))
        keep = ~drop & (sums > 0)
        rows, sums = rows[keep], sums[keep]
        if 0 < k < len(rows) // 4:
            # Only rows scoring at least the k-th best can be among the k (ties kept).
            kth = np.partition(-sums, k - 1)[k - 1]
            near = -sums <= kth
            rows, sums = rows[near], sums[near]
        order = np.lexsort((rows, -sums))[:k]
        return rows[order], sums[order]

    # ------------------------------------------------------------------ files

    def save(self, d: str | Path) -> None:
        """Write ``d`` (created if needed) with a checksum manifest."""
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {
            **self.config,
            "format_version": FORMAT_VERSION,
            "model_type": MODEL_TYPE,
            "n_items": self.n_items,
            "nnz": self.nnz,
        }
        (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (d / "item_ids.json").write_text(json.dumps(list(self.item_ids)))
        with (d / "neighbours.npz").open("wb") as fh:
            np.savez(
                fh,
                indptr=np.asarray(self.indptr, dtype=np.int64),
                indices=np.asarray(self.indices, dtype=np.int32),
                scores=np.asarray(self.scores, dtype=np.float32),
            )
        write_manifest(d, FILES, FORMAT_VERSION)

    @classmethod
    def load(cls, d: str | Path, item_ids: list[str] | None = None) -> ItemNeighbours:
        """Read and validate ``d``; ``item_ids``, when given, must equal its rows."""
        d = Path(d)
        verify_manifest(d, FILES, Item2ItemError)
        try:
            config = json.loads((d / "config.json").read_text())
            ids = json.loads((d / "item_ids.json").read_text())
            with np.load(d / "neighbours.npz", allow_pickle=False) as z:
                indptr, indices, scores = z["indptr"], z["indices"], z["scores"]
        except (OSError, ValueError, KeyError) as e:
            raise Item2ItemError(f"{d}: unreadable item-to-item files: {e}") from e
        if config.get("model_type") != MODEL_TYPE or config.get("format_version") != FORMAT_VERSION:
            raise Item2ItemError(
                f"{d}: model_type/format_version {config.get('model_type')!r}/"
                f"{config.get('format_version')!r}, want {MODEL_TYPE!r}/{FORMAT_VERSION}"
            )
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise Item2ItemError(f"{d}: item_ids.json is not a list of strings")
        if item_ids is not None and ids != list(item_ids):
            raise Item2ItemError(f"{d}: its {len(ids)} item rows differ from the bundle's")
        model = cls(ids, indptr.astype(np.int64), indices.astype(np.int32), scores, config)
        model.check()
        return model

    def check(self) -> None:
        """Structural checks; raises Item2ItemError."""
        n, ip, ix, sc = self.n_items, self.indptr, self.indices, self.scores
        if ip.ndim != 1 or len(ip) != n + 1 or ip[0] != 0 or np.any(np.diff(ip) < 0):
            raise Item2ItemError(f"indptr is not a valid CSR index for {n} items")
        if ip[-1] != len(ix) or len(ix) != len(sc):
            raise Item2ItemError(
                f"indptr ends at {ip[-1]} but there are {len(ix)} indices and {len(sc)} scores"
            )
        if len(ix) and (ix.min() < 0 or ix.max() >= n):
            raise Item2ItemError(f"neighbour rows out of range [0, {n})")
        if not np.isfinite(sc).all():
            raise Item2ItemError("neighbour scores are not all finite")
        row_of = np.repeat(np.arange(n), np.diff(ip))
        if np.any(row_of == ix):
            raise Item2ItemError("an item lists itself as a neighbour")
        same_row = row_of[1:] == row_of[:-1]
        if np.any(same_row & (np.diff(sc) > 1e-6)):
            raise Item2ItemError("neighbour rows are not sorted best first")


def from_rows(
    item_ids: list[str],
    rows: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    top_n: int,
    config: dict[str, Any] | None = None,
    signed: bool = False,
) -> ItemNeighbours:
    """Keep each row's ``top_n`` highest positive entries (``signed``: the ``top_n``
    largest in absolute value, negative weights included, as EASE's matter), without
    self pairs; rows best first, ties by column."""
    n = len(item_ids)
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    vals = np.asarray(vals, np.float64)
    ok = (rows != cols) & np.isfinite(vals) & ((vals != 0) if signed else (vals > 0))
    rows, cols, vals = rows[ok], cols[ok], vals[ok]
    order = np.lexsort((cols, -np.abs(vals), rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = np.bincount(rows, minlength=n)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank = np.arange(len(rows)) - np.repeat(starts, counts)
    keep = rank < top_n
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))  # best first within each row
    rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n))].astype(np.int64)
    cfg = dict(config or {}, top_n=top_n)
    if signed:
        cfg["signed"] = True
    return ItemNeighbours(
        list(item_ids), indptr, cols.astype(np.int32), vals.astype(np.float32), cfg
    )
