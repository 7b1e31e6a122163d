"""Merging candidate sources: the two-tower and item-to-item neighbours.

:func:`retrieve_merged` is the whole of ``Retrieve`` after validation, as a pure
function of a loaded model, one index snapshot and a query, so the service and the
offline replay (:mod:`training.replay`) run the same code.

Each source ranks its own top ``k`` after the hard filters; the lists are fused by
weighted reciprocal rank (``sum_s w_s / (RRF_C + rank_s)``, rank from 1), which needs no
common scale, and the best ``k`` fused items are returned. When one source alone
proposed candidates (no known history item, item-to-item switched off or absent from
the bundle) the candidates keep that source's own score, as before merging existed.
Every returned candidate carries every source's score for it (the two-tower scores
every item; item-to-item those its history reaches) and, for item-to-item, the history
item pointing to it most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from mercato.v1 import common_pb2
from services.models.item2item import HistoryEntries
from services.models.two_tower import UserQuery
from services.retrieval.model import IndexState, RetrievalModel, RowFilter, SearchResult

SOURCE_TWO_TOWER = int(common_pb2.REASON_MODEL)
SOURCE_ITEM2ITEM = int(common_pb2.REASON_SIMILAR)
RRF_C = 60.0


@dataclass(frozen=True)
class MergeConfig:
    """Weights of the sources in the fused score (0 switches a source off)."""

    two_tower_weight: float = 1.0
    item2item_weight: float = 1.0


def merge_config(
    model: RetrievalModel,
    two_tower_weight: float | None = None,
    item2item_weight: float | None = None,
) -> MergeConfig:
    """The weights to fuse with: the given ones, else those the training run chose on
    validation (``merge`` in the bundle's ``item2item/config.json``), else 1 and 1."""
    shipped = model.item2item.config.get("merge", {}) if model.item2item is not None else {}
    return MergeConfig(
        float(
            two_tower_weight
            if two_tower_weight is not None
            else shipped.get("two_tower_weight", 1.0)
        ),
        float(
            item2item_weight
            if item2item_weight is not None
            else shipped.get("item2item_weight", 1.0)
        ),
    )


@dataclass
class Merged:
    """Merged candidates in fused order, with every source's score."""

    rows: np.ndarray  # int64 [n]
    fused: np.ndarray  # float32 [n], descending
    source: np.ndarray  # int [n]: the proposing source (best weighted rank)
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # source -> [n], NaN = none
    anchors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # i2i, -1
    fetched: int = 0

    def __len__(self) -> int:
        return len(self.rows)


def fuse(
    lists: dict[int, tuple[np.ndarray, float]], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted reciprocal-rank fusion of ranked row lists ``{source: (rows, weight)}``:
    (rows, fused score, proposing source), best ``k``, ties by row.

    Vectorised; the same numbers as summing ``weight / (RRF_C + rank)`` per row in the
    lists' order in float64 (``bincount`` adds in input order), the proposing source the
    first with the largest part (tests/retrieval/test_merge_fast.py checks it against
    that loop)."""
    rows_in, parts_in, src_in = [], [], []
    for source, (rows, weight) in lists.items():
        if weight <= 0:
            continue
        r = np.asarray(rows, dtype=np.int64).ravel()
        rows_in.append(r)
        parts_in.append(weight / (RRF_C + np.arange(1, len(r) + 1, dtype=np.float64)))
        src_in.append(np.full(len(r), source, dtype=np.int64))
    if not rows_in:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    rows_all, parts, srcs = (
        np.concatenate(rows_in),
        np.concatenate(parts_in),
        np.concatenate(src_in),
    )
    uniq, inv = np.unique(rows_all, return_inverse=True)
    fused = np.bincount(inv, weights=parts, minlength=len(uniq))
    # per row: the occurrence with the largest part, the first one on ties
    by = np.lexsort((np.arange(len(parts)), -parts, inv))
    first = by[np.r_[True, inv[by][1:] != inv[by][:-1]]]
    best_src = srcs[first]  # in uniq order (inv sorted ascending)
    order = np.lexsort((uniq, -fused))[:k]
    return uniq[order], fused[order].astype(np.float32), best_src[order]


def history_rows(model: RetrievalModel, st: IndexState, query: UserQuery) -> np.ndarray:
    """Rows of the customer's recent items, purchases and cart the model knows (the
    trained rows only, as item-to-item; the user tower's look-up, done once)."""
    return np.unique(np.asarray(model.bundle.known_rows(query), dtype=np.int64))


@dataclass
class Sources:
    """What each source proposes for one query before the weights fuse them: the
    two-tower's search, the history rows and what they reach, item-to-item's top ``k``
    (None until a fusion that weights it asks). One query's sources can be fused with
    several weights (:func:`fuse_sources`), as the offline replay's weight choice does."""

    query_vector: np.ndarray
    search: SearchResult
    hist: np.ndarray
    reached: tuple[np.ndarray, np.ndarray] | None
    k: int
    flt: RowFilter
    i2i_rows: np.ndarray | None = None
    entries: HistoryEntries | None = None  # the history's neighbour entries


def gather_sources(
    model: RetrievalModel,
    st: IndexState,
    query: UserQuery,
    k: int,
    flt: RowFilter,
    user_vector: np.ndarray | None = None,
) -> Sources:
    """The two-tower's top ``k`` after ``flt`` and the history item-to-item reads."""
    q = user_vector if user_vector is not None else model.encode_user(query)
    res = model.search(st, q, k, flt)
    i2i = model.item2item
    hist = history_rows(model, st, query) if i2i is not None else np.zeros(0, np.int64)
    # what the history reaches, computed once for the neighbour list, the scores and
    # the anchors of each fusion
    entries = i2i.entries(hist) if i2i is not None and len(hist) else None
    reached = i2i.score_rows(hist, entries) if i2i is not None and entries is not None else None
    return Sources(q, res, hist, reached, k, flt, entries=entries)


def _i2i_rows(model: RetrievalModel, st: IndexState, src: Sources) -> np.ndarray:
    """Item-to-item's top ``k`` for the history, after the filters (computed once)."""
    if src.i2i_rows is None:
        i2i, k, flt = model.item2item, src.k, src.flt
        assert i2i is not None
        rows, _ = i2i.top(
            src.hist, max(k * 2, k + len(flt.exclude)), exclude=flt.exclude, reached=src.reached
        )
        src.i2i_rows = rows[flt.mask(st, rows)][:k]
    return src.i2i_rows


def fuse_sources(
    model: RetrievalModel, st: IndexState, src: Sources, cfg: MergeConfig | None = None
) -> Merged:
    """One query's sources fused with ``cfg``'s weights (see :func:`retrieve_merged`)."""
    cfg = cfg or MergeConfig()
    k, q, res, hist, reached = src.k, src.query_vector, src.search, src.hist, src.reached
    i2i = model.item2item
    lists: dict[int, tuple[np.ndarray, float]] = {}
    if i2i is not None and len(hist) and cfg.item2item_weight > 0:
        rows = _i2i_rows(model, st, src)
        if len(rows):
            lists[SOURCE_ITEM2ITEM] = (rows, cfg.item2item_weight)
    if cfg.two_tower_weight > 0 or not lists:
        lists[SOURCE_TWO_TOWER] = (res.rows, cfg.two_tower_weight or 1.0)
    rows, fused, source = fuse(lists, k)
    filled = 0
    if len(rows) < k:
        more = res.rows[~np.isin(res.rows, rows)][: k - len(rows)]
        filled = len(more)
        low = float(fused.min()) if len(fused) else 1.0
        rows = np.concatenate([rows, more])
        fused = np.concatenate([fused, low * 1e-3 / np.arange(1, filled + 1)]).astype(np.float32)
        source = np.concatenate([source, np.full(filled, SOURCE_TWO_TOWER, dtype=np.int64)])
    scores = {SOURCE_TWO_TOWER: (model.embeddings(st, rows) @ q).astype(np.float32)}
    anchors = np.full(len(rows), -1, dtype=np.int64)
    if i2i is not None and len(hist):
        base = rows < i2i.n_items
        s = np.full(len(rows), np.nan, dtype=np.float32)
        s[base] = i2i.score_of(hist, rows[base], reached)
        s[s == 0] = np.nan
        scores[SOURCE_ITEM2ITEM] = s
        anchors[base] = i2i.best_anchor(hist, rows[base], src.entries)
    used = [s_ for s_, (r, _) in lists.items() if len(r)]
    if len(used) == 1 and used[0] in scores and not filled:
        # One source alone: its own scores (same order), as before merging existed.
        fused = scores[used[0]].copy()
    return Merged(
        rows=rows,
        fused=fused,
        source=source,
        scores=scores,
        anchors=anchors,
        fetched=res.fetched,
    )


def retrieve_merged(
    model: RetrievalModel,
    st: IndexState,
    query: UserQuery,
    k: int,
    flt: RowFilter,
    cfg: MergeConfig | None = None,
    user_vector: np.ndarray | None = None,
) -> Merged:
    """The two-tower's and item-to-item's top ``k`` (both after ``flt``), fused.

    The two-tower is always searched: when item-to-item proposes nothing (a customer
    without known items) its list alone answers, with its own scores, whatever the
    weights; when the fused list is short of ``k`` (two-tower weight 0 and few
    neighbours), the two-tower's next items fill it, below every fused score."""
    src = gather_sources(model, st, query, k, flt, user_vector)
    return fuse_sources(model, st, src, cfg)


def fill_merged(repeated: object, model: RetrievalModel, st: IndexState, m: Merged) -> None:
    """Append merged candidates to a repeated Candidate field (parallel source fields)."""
    add = repeated.add  # type: ignore[attr-defined]
    for n, r in enumerate(m.rows.tolist()):
        sources, vals, anchors = [], [], []
        for s, arr in m.scores.items():
            v = float(arr[n])
            if v == v:  # not NaN: this source scored it
                sources.append(s)
                vals.append(v)
                a = int(m.anchors[n]) if s == SOURCE_ITEM2ITEM else -1
                anchors.append(model.item_id(st, a) if a >= 0 else "")
        add(
            item_id=model.item_id(st, r),
            score=float(m.fused[n]),
            source=int(m.source[n]),
            sources=sources,
            source_scores=vals,
            source_anchor_ids=anchors,
        )


def fill_columns(
    cols: common_pb2.CandidateColumns, model: RetrievalModel, st: IndexState, m: Merged
) -> None:
    """Write merged candidates into ``cols``: the same information as :func:`fill_merged`
    (a source's column left out when it scored none of them, NaN and "" where it gave no
    score), a few repeated fields instead of a message per candidate."""
    cols.item_ids.extend(_ids_of(model, st, m.rows))
    cols.scores.extend(m.fused.tolist())
    cols.sources.extend(m.source.tolist())
    for s, arr in m.scores.items():
        scored = ~np.isnan(arr)
        if not scored.any():
            continue
        col = cols.by_source.add(source=s)  # type: ignore[arg-type]
        col.scores.extend(arr.tolist())
        if s == SOURCE_ITEM2ITEM:
            # few distinct anchors (history rows): each named once, then spread
            anchors = np.where(scored, m.anchors, -1)
            uniq, inv = np.unique(anchors, return_inverse=True)
            names = [model.item_id(st, a) if a >= 0 else "" for a in uniq.tolist()]
            col.anchor_ids.extend(_pick(names, inv))


def _pick(values: list[str], at: np.ndarray) -> list[str] | tuple[str, ...]:
    """``[values[i] for i in at]``, the loop run by ``operator.itemgetter`` in C."""
    if len(at) == 0:
        return []
    if len(at) == 1:
        return [values[int(at[0])]]
    return itemgetter(*at.tolist())(values)  # type: ignore[no-any-return]


def _ids_of(model: RetrievalModel, st: IndexState, rows: np.ndarray) -> list[str] | tuple[str, ...]:
    """The item ids of ``rows`` (catalogue rows and items added since, in order)."""
    if len(rows) and int(rows.max()) < st.n_base:
        return _pick(model.bundle.item_ids, rows)
    return [model.item_id(st, r) for r in rows.tolist()]
