"""Which index serves a catalogue: exact or approximate, chosen by size and measurement.

Generic over the vectors it is given (any dimension, inner product): the caller passes
the item vectors, sample queries in the same space and a ``build`` function for the
approximate index (which may come from a cache). The rule:

1. Up to ``exact_max_items`` items the exact ``IndexFlatIP`` serves (fast enough at that
   size; nothing to measure).
2. Above it, the approximate index (IVF or HNSW) is tuned on the sample queries: its
   search parameter (IVF ``nprobe``, HNSW ``efSearch``) is doubled from the configured
   start until Recall@``recall_k`` against the exact answer reaches ``min_recall``.
3. The approximate index serves only when it reaches ``min_recall`` and is faster per
   query than the exact search measured on the same queries; otherwise exact serves.

The :class:`IndexChoice` says what was chosen and why (logged at load).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class IndexChoice:
    """The index chosen for a catalogue, with the measurements behind the choice."""

    kind: str  # "flat" | "ivf" | "hnsw"
    param: int  # nprobe (ivf) / efSearch (hnsw); 0 for flat
    recall: float  # Recall@recall_k against exact on the sample queries (1.0 for flat)
    ms_per_query: float  # single-query search time of the chosen index (0 = not measured)
    exact_ms_per_query: float  # the same for the exact search (0 = not measured)
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {
            "index_kind": self.kind,
            "index_param": self.param,
            "recall": round(self.recall, 4),
            "ms_per_query": round(self.ms_per_query, 4),
            "exact_ms_per_query": round(self.exact_ms_per_query, 4),
            "reason": self.reason,
        }


def exact_top(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` row ids by inner product (brute force, no index copy)."""
    _, ids = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(x, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return np.asarray(ids)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top-k found, over queries."""
    if truth.size == 0:
        return 1.0
    hits = sum(
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist()))
        for f, t in zip(found, truth, strict=True)
    )
    return hits / max(int((truth >= 0).sum()), 1)


def set_param(index: faiss.Index, param: int) -> None:
    """Set the accuracy knob of an approximate index."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = int(param)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(param)


def max_param(index: faiss.Index) -> int:
    if isinstance(index, faiss.IndexIVF):
        return int(index.nlist)
    return 4096


def ms_per_query(search: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    """Median single-query search time in ms (what a Retrieve call pays)."""
    times = []
    for q in queries:
        q1 = q[None, :]
        t0 = time.perf_counter()
        search(q1)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000 if times else 0.0


def tune(
    index: faiss.Index,
    queries: np.ndarray,
    truth: np.ndarray,
    start: int,
    min_recall: float,
) -> tuple[int, float]:
    """Smallest power-of-two multiple of ``start`` whose Recall reaches ``min_recall``
    (or the largest tried with its recall)."""
    k = truth.shape[1]
    param, top = max(1, start), max_param(index)
    while True:
        set_param(index, param)
        _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        recall = recall_at_k(found, truth)
        if recall >= min_recall or param >= top:
            return param, recall
        param = min(param * 2, top)


def choose_index(
    x: np.ndarray,
    queries: np.ndarray,
    build_ann: Callable[[], faiss.Index],
    *,
    exact_max_items: int,
    start_param: int,
    min_recall: float = 0.95,
    recall_k: int = 100,
    timing_queries: int = 50,
    must_beat_exact: bool = True,
) -> tuple[IndexChoice, faiss.Index | None]:
    """Decide exact vs approximate for item vectors ``x`` [n, d].

    Returns the choice and the tuned approximate index (None when exact serves)."""
    n = len(x)
    if n <= exact_max_items:
        return IndexChoice("flat", 0, 1.0, 0.0, 0.0, f"{n} items <= {exact_max_items}"), None
    k = min(recall_k, n)
    truth = exact_top(x, queries, k)
    ann = build_ann()
    kind = "hnsw" if isinstance(ann, faiss.IndexHNSW) else "ivf"
    param, recall = tune(ann, queries, truth, start_param, min_recall)
    timed = np.ascontiguousarray(queries[:timing_queries], dtype=np.float32)
    xs = np.ascontiguousarray(x, dtype=np.float32)
    ann_ms = ms_per_query(lambda q: ann.search(q, k), timed)
    exact_ms = ms_per_query(lambda q: faiss.knn(q, xs, k, metric=faiss.METRIC_INNER_PRODUCT), timed)
    if recall < min_recall:
        reason = f"{kind} reaches Recall@{k} {recall:.3f} < {min_recall} at its widest search"
        return IndexChoice("flat", 0, 1.0, exact_ms, exact_ms, reason), None
    if must_beat_exact and exact_ms <= ann_ms:
        reason = f"exact ({exact_ms:.3f} ms) is not slower than {kind} ({ann_ms:.3f} ms)"
        return IndexChoice("flat", 0, 1.0, exact_ms, exact_ms, reason), None
    reason = (
        f"{kind} Recall@{k} {recall:.3f} >= {min_recall}, "
        f"{ann_ms:.3f} ms vs exact {exact_ms:.3f} ms"
    )
    return IndexChoice(kind, param, recall, ann_ms, exact_ms, reason), ann
