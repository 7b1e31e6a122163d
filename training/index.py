"""FAISS index over item vectors: exact for small catalogs, HNSW above a size.

Item vectors are ``[v, b]`` and user vectors ``[u, 1]`` (see
``services.models.two_tower``), so the inner product is the model's score. Exact search
(``IndexFlatIP``) ranks exactly as the model. Above ``exact_max_items`` an HNSW graph
is used: by default over inner product (``METRIC_INNER_PRODUCT``); with ``l2_augment``
over the reduction of maximum inner product search to L2 search (Bachrach et al. 2014):
every item gets one more component ``sqrt(M² - |x|²)`` (M the largest norm), every
query a 0 there, and then ``|q - x'|² = |q|² + M² - 2 q·x``, so the L2 order is the
inner-product order. ``python bench/hnsw_recall.py`` measures both on bias-augmented
vectors; there the L2 reduction found far fewer of the exact top 100 at the same
``efSearch`` (docs/retrieval.md), hence the default. The query padding is a FAISS
``RemapDimensionsTransform`` in an ``IndexPreTransform``, so callers pass plain user
vectors; :func:`search_scores` turns
the L2 distances back into model scores. FAISS ids are rows (added in row order).
:func:`ann_recall` measures how many of the exact top-K an index returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from services.models.two_tower import search_scores

__all__ = ["IndexConfig", "ann_recall", "build_index", "index_kind", "search_scores"]


@dataclass(frozen=True)
class IndexConfig:
    exact_max_items: int = 200_000  # above this: HNSW
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    l2_augment: bool = False  # HNSW over MIPS-to-L2 augmented vectors (measured: worse)
    recall_k: int = 100
    recall_queries: int = 1000


def build_index(emb: np.ndarray, cfg: IndexConfig | None = None) -> faiss.Index:
    """IndexFlatIP up to ``exact_max_items`` rows, HNSW above (L2-augmented unless
    ``l2_augment`` is off, then inner-product HNSW)."""
    cfg = cfg or IndexConfig()
    x = np.ascontiguousarray(emb, dtype=np.float32)
    dim = x.shape[1]
    if len(x) <= cfg.exact_max_items:
        flat = faiss.IndexFlatIP(dim)
        flat.add(x)
        return flat
    if not cfg.l2_augment:
        hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = cfg.ef_construction
        hnsw.hnsw.efSearch = cfg.ef_search
        hnsw.add(x)
        return hnsw
    norms = (x.astype(np.float64) ** 2).sum(1)
    extra = np.sqrt(np.maximum(norms.max() - norms, 0.0)).astype(np.float32)
    hnsw = faiss.IndexHNSWFlat(dim + 1, cfg.hnsw_m, faiss.METRIC_L2)
    hnsw.hnsw.efConstruction = cfg.ef_construction
    hnsw.hnsw.efSearch = cfg.ef_search
    hnsw.add(np.ascontiguousarray(np.hstack([x, extra[:, None]])))
    # uniform=False: input component i -> output i; the last output component stays 0.
    pad = faiss.RemapDimensionsTransform(dim, dim + 1, False)  # type: ignore[arg-type]
    return faiss.IndexPreTransform(pad, hnsw)  # the wrapper keeps both alive


def index_kind(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexPreTransform):
        return "hnsw-l2"
    return "hnsw" if isinstance(index, faiss.IndexHNSW) else "exact"


def ann_recall(index: faiss.Index, emb: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean |ANN top-k ∩ exact top-k| / k over the queries (1.0 for an exact index)."""
    x = np.ascontiguousarray(emb, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(x))
    if len(q) == 0 or k == 0:
        return 1.0
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, want = exact.search(q, k)
    _, got = index.search(q, k)
    hits = [len(np.intersect1d(w, g[g >= 0])) for w, g in zip(want, got, strict=True)]
    return float(np.mean(hits) / k)
