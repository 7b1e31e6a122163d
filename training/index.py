"""FAISS index over item embeddings: exact for small catalogs, HNSW above a size.

FAISS ids are embedding rows (vectors are added in row order, no id map), inner product
metric on L2-normalised vectors. :func:`ann_recall` measures how many of the exact top-K
an index returns, which is what the HNSW parameters trade against latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class IndexConfig:
    exact_max_items: int = 200_000  # above this: HNSW
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    recall_k: int = 100
    recall_queries: int = 1000


def build_index(emb: np.ndarray, cfg: IndexConfig | None = None) -> faiss.Index:
    """IndexFlatIP up to ``exact_max_items`` rows, IndexHNSWFlat (inner product) above."""
    cfg = cfg or IndexConfig()
    x = np.ascontiguousarray(emb, dtype=np.float32)
    dim = x.shape[1]
    index: faiss.Index
    if len(x) <= cfg.exact_max_items:
        index = faiss.IndexFlatIP(dim)
    else:
        hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = cfg.ef_construction
        hnsw.hnsw.efSearch = cfg.ef_search
        index = hnsw
    index.add(x)
    return index


def index_kind(index: faiss.Index) -> str:
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
