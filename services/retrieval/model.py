"""A loaded two-tower version as the retrieval service serves it.

:func:`load_retrieval_model` turns a downloaded bundle directory into a
:class:`RetrievalModel`: it loads the bundle (FAISS index memory-mapped where FAISS
allows), picks the index type by catalog size (exact Flat up to ``exact_max_items``, HNSW
above; an index of the other type is rebuilt from the embeddings once and cached beside
the bundle), and validates it before it may serve (dimensions agree, index size equals
catalog size, smoke queries return sane ids).

Searches read one immutable :class:`IndexState`. Items added by ``IndexItems`` go to a
small exact "delta" index over their item-tower embeddings; each call builds a new state
(copy-on-write) and publishes it with one reference assignment, so concurrent searches
never see a half-updated index. The base index is never modified.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from services.models.item2item import DIRNAME as ITEM2ITEM_DIR
from services.models.item2item import Item2ItemError, ItemNeighbours, in_sorted
from services.models.registry import ModelVersionInfo
from services.models.two_tower import BundleError, ItemFeatures, TwoTowerBundle, UserQuery
from services.models.watcher import ModelRejected
from services.retrieval.index_choice import IndexChoice, choose_index

log = logging.getLogger("mercato.retrieval.model")

UNKNOWN_STOCK = -1


@dataclass(frozen=True)
class IndexConfig:
    """How the service picks, builds and searches the index."""

    exact_max_items: int = 20_000  # above: measured (services/retrieval/index_choice.py)
    min_recall: float = 0.95  # Recall@recall_k the approximate index must reach at load
    recall_k: int = 100
    recall_queries: int = 200
    ann_must_beat_exact: bool = True  # serve the ANN only when faster than exact
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 32  # starting efSearch; doubled at load until min_recall
    ann: str = "ivf"  # candidate above exact_max_items: "ivf" or "hnsw"
    ivf_nlist: int = 0  # 0 = about 2 * sqrt(n), a power of two
    ivf_nprobe: int = 4  # starting nprobe; doubled at load until min_recall
    mmap: bool = True
    oversample: float = 2.0
    max_fetch: int = 20_000
    exact_subset_max: int = 50_000
    max_new_items: int = 100_000


@dataclass(frozen=True)
class IndexState:
    """What one search reads. Never mutated: IndexItems publishes a new one."""

    n_base: int
    extra_ids: tuple[str, ...]
    extra_rows: Mapping[str, int]  # item id -> global row (n_base + j)
    extra_emb: np.ndarray  # float32 [m, dim]
    extra_index: faiss.Index | None
    categories: tuple[str, ...]  # code -> name
    category_code: Mapping[str, int]
    item_cat: np.ndarray  # int32 [n_total]
    item_price: np.ndarray  # float32 [n_total]
    item_stock: np.ndarray  # int64 [n_total], -1 = unknown
    _cat_rows: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_total(self) -> int:
        return self.n_base + len(self.extra_ids)

    def rows_of_category(self, code: int) -> np.ndarray:
        """Rows of one category (cached per state; a race computes it twice, harmlessly)."""
        rows = self._cat_rows.get(code)
        if rows is None:
            rows = np.flatnonzero(self.item_cat == code).astype(np.int64)
            self._cat_rows[code] = rows
        return rows


@dataclass
class RowFilter:
    """Hard filters in row space."""

    exclude: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    categories: np.ndarray | None = None  # allowed category codes; None = all
    in_stock_only: bool = False
    min_price: float | None = None  # strictly above (up-sell)
    _sorted_exclude: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def mask(self, st: IndexState, rows: np.ndarray) -> np.ndarray:
        ok = rows >= 0
        safe = np.where(ok, rows, 0)
        if len(self.exclude):
            # sorted once per filter: a Retrieve masks two or three row lists with it
            if self._sorted_exclude is None:
                self._sorted_exclude = np.sort(self.exclude)
            ok &= ~in_sorted(rows, self._sorted_exclude)
        if self.categories is not None:
            ok &= np.isin(st.item_cat[safe], self.categories)
        if self.in_stock_only:
            ok &= st.item_stock[safe] != 0
        if self.min_price is not None:
            ok &= st.item_price[safe] > self.min_price
        return ok


@dataclass
class SearchResult:
    rows: np.ndarray
    scores: np.ndarray
    fetched: int  # index results read (>= len(rows))
    exact_subset: bool = False


class RetrievalModel:
    """One loaded version: the bundle, its serving index and the live item state."""

    def __init__(
        self, bundle: TwoTowerBundle, index: faiss.Index, info: ModelVersionInfo, cfg: IndexConfig
    ) -> None:
        self.bundle = bundle
        self.index = index
        self.info = info
        self.cfg = cfg
        self.dim = bundle.dim
        self.index_type = describe_index(index)
        self.index_choice: IndexChoice | None = None
        self._write_lock = threading.Lock()
        cats = sorted(set(bundle.item_category))
        code = {c: i for i, c in enumerate(cats)}
        self.state = IndexState(
            n_base=len(bundle.item_ids),
            extra_ids=(),
            extra_rows={},
            extra_emb=np.zeros((0, self.dim), dtype=np.float32),
            extra_index=None,
            categories=tuple(cats),
            category_code=code,
            item_cat=np.array([code[c] for c in bundle.item_category], dtype=np.int32),
            item_price=np.asarray(bundle.item_price, dtype=np.float32).copy(),
            item_stock=np.full(len(bundle.item_ids), UNKNOWN_STOCK, dtype=np.int64),
        )
        self.item2item: ItemNeighbours | None = None  # the bundle's item2item/, if any
        stock = bundle.config.get("item_stock")
        if isinstance(stock, list) and len(stock) == len(bundle.item_ids):
            self.state.item_stock[:] = np.asarray(stock, dtype=np.int64)

    # ------------------------------------------------------------------ lookups

    def row_of(self, st: IndexState, item_id: str) -> int | None:
        r = self.bundle.row_of(item_id)
        if r is not None:
            return r
        return st.extra_rows.get(item_id)

    def item_id(self, st: IndexState, row: int) -> str:
        if row < st.n_base:
            return self.bundle.item_ids[row]
        return st.extra_ids[row - st.n_base]

    def complements_of(self, item_id: str) -> list[tuple[str, float]]:
        """Basket complements of an item from the bundle, best first (empty if none)."""
        return self.bundle.complements(item_id, 1000)

    def embeddings(self, st: IndexState, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        base = rows < st.n_base
        if base.all():
            return self.bundle.item_embeddings[rows]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        out[base] = self.bundle.item_embeddings[rows[base]]
        out[~base] = st.extra_emb[rows[~base] - st.n_base]
        return out

    def item_query(self, st: IndexState, rows: Sequence[int]) -> np.ndarray:
        """A query vector for items like ``rows``: the mean of their item vectors used as
        a user vector (``[v̄, 1]``), so results are what a customer who liked them would
        be shown (item bias included)."""
        q = self.embeddings(st, np.asarray(rows, dtype=np.int64)).mean(axis=0)
        q[-1] = 1.0
        return q.astype(np.float32)

    def encode_user(self, query: UserQuery) -> np.ndarray:
        """User-tower embedding of one query (the bundle's NumPy tower)."""
        return self.bundle.encode_user(query)

    # ------------------------------------------------------------------ search

    def _search_all(self, st: IndexState, q: np.ndarray, fetch: int) -> tuple[np.ndarray, ...]:
        q2 = np.ascontiguousarray(q.reshape(1, -1), dtype=np.float32)
        s1, r1 = self.index.search(q2, min(fetch, st.n_base))
        scores, rows = s1[0], r1[0].astype(np.int64)
        if st.extra_index is not None and len(st.extra_ids):
            s2, r2 = st.extra_index.search(q2, min(fetch, len(st.extra_ids)))
            scores = np.concatenate([scores, s2[0]])
            rows = np.concatenate([rows, np.where(r2[0] >= 0, r2[0] + st.n_base, -1)])
            order = np.argsort(-scores, kind="stable")[:fetch]
            scores, rows = scores[order], rows[order]
        return scores, rows

    def search(self, st: IndexState, q: np.ndarray, k: int, flt: RowFilter) -> SearchResult:
        """Top ``k`` rows by inner product with ``q`` that pass ``flt``.

        Category filters small enough are searched exactly over their rows; otherwise the
        index is searched for ``k * oversample`` plus the exclusions, growing the fetch
        (x4) while fewer than ``k`` pass, up to ``max_fetch`` or the whole catalog.
        """
        cfg = self.cfg
        n = st.n_total
        if flt.categories is not None:
            subset = np.concatenate([st.rows_of_category(int(c)) for c in flt.categories])
            if len(subset) <= cfg.exact_subset_max:
                return self._exact_subset(st, q, k, flt, subset)
        fetch = min(n, max(math.ceil(k * cfg.oversample), k + len(flt.exclude)))
        while True:
            scores, rows = self._search_all(st, q, fetch)
            ok = flt.mask(st, rows)
            if ok.sum() >= k or fetch >= n or fetch >= cfg.max_fetch:
                break
            fetch = min(n, cfg.max_fetch, fetch * 4)
        rows, scores = rows[ok][:k], scores[ok][:k]
        return SearchResult(rows=rows, scores=scores, fetched=fetch)

    def _exact_subset(
        self, st: IndexState, q: np.ndarray, k: int, flt: RowFilter, subset: np.ndarray
    ) -> SearchResult:
        subset = subset[flt.mask(st, subset)]
        if len(subset) == 0:
            return SearchResult(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, True)
        scores = self.embeddings(st, subset) @ q.astype(np.float32)
        top = np.argpartition(-scores, k - 1)[:k] if len(subset) > k else np.arange(len(subset))
        order = top[np.lexsort((subset[top], -scores[top]))]
        return SearchResult(subset[order], scores[order], len(subset), True)

    # ------------------------------------------------------------------ item cold start

    def index_items(self, items: Sequence[ItemFeatures], stock: Sequence[int]) -> tuple[int, int]:
        """Add unknown items (embedded by the item tower) and update known ones' metadata.

        Builds a new :class:`IndexState` and publishes it with one assignment. Returns
        (added, updated). Raises OverflowError past ``max_new_items``.
        """
        with self._write_lock:
            st = self.state
            new_items = [it for it in items if self.row_of(st, it.item_id) is None]
            if len(st.extra_ids) + len(new_items) > self.cfg.max_new_items:
                raise OverflowError(
                    f"{len(st.extra_ids)} items were already added to version "
                    f"{self.info.version} and the limit is {self.cfg.max_new_items}: "
                    "retrain to include the new catalog"
                )
            cats = list(st.categories)
            code = dict(st.category_code)
            for it in items:
                if it.category not in code:
                    code[it.category] = len(cats)
                    cats.append(it.category)
            m = len(new_items)
            item_cat = np.concatenate([st.item_cat, np.zeros(m, dtype=np.int32)])
            item_price = np.concatenate([st.item_price, np.zeros(m, dtype=np.float32)])
            item_stock = np.concatenate([st.item_stock, np.zeros(m, dtype=np.int64)])
            extra_ids = st.extra_ids + tuple(it.item_id for it in new_items)
            extra_rows = dict(st.extra_rows)
            for j, it in enumerate(new_items):
                extra_rows[it.item_id] = st.n_total + j
            extra_emb, extra_index = st.extra_emb, st.extra_index
            if new_items:
                emb = self.bundle.encode_items(list(new_items))
                extra_emb = np.ascontiguousarray(np.vstack([st.extra_emb, emb]))
                extra_index = faiss.IndexFlatIP(self.dim)
                extra_index.add(extra_emb)
            for it, s in zip(items, stock, strict=True):
                r = extra_rows.get(it.item_id)
                if r is None:
                    r = self.bundle.row_of(it.item_id)
                assert r is not None
                item_cat[r] = code[it.category]
                item_price[r] = it.price
                item_stock[r] = s
            self.state = IndexState(
                n_base=st.n_base,
                extra_ids=extra_ids,
                extra_rows=extra_rows,
                extra_emb=extra_emb,
                extra_index=extra_index,
                categories=tuple(cats),
                category_code=code,
                item_cat=item_cat,
                item_price=item_price,
                item_stock=item_stock,
            )
            return m, len(items) - m


def describe_index(index: faiss.Index) -> str:
    """ "Flat", "HNSW32", ... for ListLoadedModels."""
    if isinstance(index, faiss.IndexHNSW):
        m = int(index.hnsw.nb_neighbors(1))  # type: ignore[attr-defined]
        return f"HNSW{m},efSearch={index.hnsw.efSearch}"
    if isinstance(index, faiss.IndexIVF):
        return f"IVF{index.nlist},Flat,nprobe={index.nprobe}"
    if isinstance(index, faiss.IndexFlat):
        return "Flat"
    return type(index).__name__


def _io_flags(cfg: IndexConfig) -> int:
    return int(faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if cfg.mmap else 0


def index_kind(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    return type(index).__name__


def ivf_nlist(n: int, cfg: IndexConfig) -> int:
    if cfg.ivf_nlist:
        return cfg.ivf_nlist
    return int(2 ** round(math.log2(max(1.0, 2 * math.sqrt(n)))))


def build_index(x: np.ndarray, kind: str, cfg: IndexConfig) -> faiss.Index:
    """A new index of ``kind`` ("flat", "hnsw", "ivf") over ``x`` (inner product)."""
    dim = x.shape[1]
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
        hnsw.add(x)
        return hnsw
    if kind == "ivf":
        nlist = ivf_nlist(len(x), cfg)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = 10
        sample = np.random.default_rng(0).choice(len(x), min(len(x), 100_000), replace=False)
        ivf.train(x[np.sort(sample)])
        ivf.add(x)
        return ivf
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    return flat


def _index_of_kind(
    bundle: TwoTowerBundle, bundle_dir: Path, cfg: IndexConfig, kind: str
) -> faiss.Index:
    """The bundle's index when it is of ``kind``, else one built from the embeddings
    once and cached as ``serving-<type>.faiss`` beside the bundle."""
    n = len(bundle.item_ids)
    index = bundle.index
    if index_kind(index) == kind:
        return index
    name = {
        "flat": "serving-Flat.faiss",
        "hnsw": f"serving-HNSW{cfg.hnsw_m}-efc{cfg.hnsw_ef_construction}.faiss",
        "ivf": f"serving-IVF{ivf_nlist(n, cfg)}.faiss",
    }[kind]
    path = bundle_dir.parent / name
    if not path.is_file():
        log.info("building the serving index", extra={"index_file": name, "items": n})
        built = build_index(np.ascontiguousarray(bundle.item_embeddings), kind, cfg)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(built, str(tmp))
        tmp.rename(path)
    return faiss.read_index(str(path), _io_flags(cfg))


def sample_queries(bundle: TwoTowerBundle, n_queries: int, seed: int = 0) -> np.ndarray:
    """User-tower embeddings of random short histories: queries like the served ones."""
    rng = np.random.default_rng(seed)
    ids = bundle.item_ids
    queries = [
        UserQuery([ids[i] for i in rng.choice(len(ids), size=int(rng.integers(1, 6)))], [], [])
        for _ in range(n_queries)
    ]
    return np.ascontiguousarray(bundle.encode_users(queries), dtype=np.float32)


def serving_index(
    bundle: TwoTowerBundle, bundle_dir: Path, cfg: IndexConfig
) -> tuple[faiss.Index, IndexChoice]:
    """The index to serve and why: exact up to ``exact_max_items``; above, ``cfg.ann``
    tuned to Recall@``recall_k`` >= ``min_recall`` on sample queries when that is faster
    than exact (:func:`services.retrieval.index_choice.choose_index`)."""
    n = len(bundle.item_ids)
    if cfg.ann not in ("hnsw", "ivf"):
        raise ValueError(f"unknown index type {cfg.ann!r}: hnsw | ivf")
    emb = np.ascontiguousarray(bundle.item_embeddings, dtype=np.float32)
    queries = (
        sample_queries(bundle, cfg.recall_queries)
        if n > cfg.exact_max_items
        else np.zeros((0, emb.shape[1]), dtype=np.float32)
    )
    choice, ann = choose_index(
        emb,
        queries,
        lambda: _index_of_kind(bundle, bundle_dir, cfg, cfg.ann),
        exact_max_items=cfg.exact_max_items,
        start_param=cfg.ivf_nprobe if cfg.ann == "ivf" else cfg.hnsw_ef_search,
        min_recall=cfg.min_recall,
        recall_k=cfg.recall_k,
        must_beat_exact=cfg.ann_must_beat_exact,
    )
    index = ann if ann is not None else _index_of_kind(bundle, bundle_dir, cfg, "flat")
    if index.ntotal != n or index.d != bundle.dim:
        raise ModelRejected(f"index has {index.ntotal} x {index.d}, want {n} x {bundle.dim}")
    log.info("serving index chosen", extra={"items": n, **choice.as_dict()})
    return index, choice


def validate(model: RetrievalModel) -> None:
    """Smoke queries before a version may serve; raises ModelRejected."""
    b, st = model.bundle, model.state
    n = st.n_base
    if n == 0:
        raise ModelRejected("the catalog is empty")
    probe = [it for it, _ in b.popularity[:5]]
    queries = [
        UserQuery(recent_item_ids=[], purchased_item_ids=[], cart_item_ids=[]),
        UserQuery(recent_item_ids=probe, purchased_item_ids=probe[:2], cart_item_ids=[]),
    ]
    users = b.encode_users(queries)
    if users.shape != (2, model.dim) or not np.isfinite(users).all():
        raise ModelRejected(f"user tower gives {users.shape} (finite: no), want (2, {model.dim})")
    k = min(10, n)
    for q in users:
        res = model.search(st, q, k, RowFilter())
        if len(res.rows) != k or res.rows.min() < 0 or res.rows.max() >= n:
            raise ModelRejected(f"smoke query returned rows {res.rows.tolist()} for {n} items")
        if len(set(res.rows.tolist())) != k or not np.isfinite(res.scores).all():
            raise ModelRejected("smoke query returned duplicate ids or non-finite scores")
        if np.any(np.diff(res.scores) > 1e-4):
            raise ModelRejected("smoke query scores are not in descending order")
    # An item's own embedding must find the item, or an item scoring as high (items with
    # identical features share an embedding), first.
    rng = np.random.default_rng(0)
    rows = rng.choice(n, size=min(5, n), replace=False)
    found = 0
    for r in rows:
        e = b.item_embeddings[r]
        res = model.search(st, e, k, RowFilter())
        found += int(r in res.rows or res.scores[0] >= float(e @ e) - 1e-4)
    if found < len(rows) - 1:
        raise ModelRejected(f"only {found} of {len(rows)} items find themselves in their top {k}")


def load_retrieval_model(path: Path, info: ModelVersionInfo, cfg: IndexConfig) -> RetrievalModel:
    """Load, index and validate one downloaded version (the watcher's ``load``)."""
    try:
        bundle = TwoTowerBundle.load(path, index_io_flags=_io_flags(cfg), mmap=cfg.mmap)
    except BundleError as e:
        raise ModelRejected(str(e)) from e
    i2i: ItemNeighbours | None = None
    if (Path(path) / ITEM2ITEM_DIR).is_dir():
        try:
            i2i = ItemNeighbours.load(Path(path) / ITEM2ITEM_DIR, bundle.item_ids)
        except Item2ItemError as e:
            raise ModelRejected(f"item2item: {e}") from e
    index, choice = serving_index(bundle, Path(path), cfg)
    model = RetrievalModel(bundle, index, info, cfg)
    model.item2item = i2i
    model.index_choice = choice
    model.complements_of("")  # read a lazily loaded complements file now, not in a call
    validate(model)
    bundle.release()  # the index choice read every embedding: pages back to the cache
    return model


def model_summary(model: RetrievalModel) -> dict[str, Any]:
    """Facts for logs and ListLoadedModels."""
    return {
        "version": model.info.version,
        "items": model.state.n_total,
        "dim": model.dim,
        "index": model.index_type,
        **({"index_choice": model.index_choice.reason} if model.index_choice else {}),
    }
