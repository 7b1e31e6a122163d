"""The Rank call: validate, merge candidates, score, apply the surface's rules.

Synchronous and free of I/O, so the benchmark can time it in-process (the floor under
the gRPC numbers) and tests can call it directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mercato.v1 import common_pb2, ranking_pb2
from services.common.candidates import candidates_of
from services.common.deadline import check_time_left
from services.common.errors import InvalidArgument
from services.ranking.reasons import explain
from services.ranking.rules import (
    SURFACE_NAMES,
    CandidateSet,
    ItemVectorLookup,
    RankContext,
    RulesConfig,
    apply_rules,
)
from services.ranking.scoring import RetrievalScorer, Scorer, ScorerProvider, no_ranker
from services.ranking.table import (
    MAX_ID_BYTES,
    CandidateArrays,
    CatalogTable,
    bad_id,
    validate_items,
)

log = logging.getLogger("mercato.ranking")


def merge_candidates(candidates: Sequence[common_pb2.Candidate]) -> CandidateSet:
    """Unique candidates in first-seen order; a duplicate id keeps its best score (and
    that occurrence's source) and, per source, the best score any occurrence carried
    (``Candidate.sources`` / ``source_scores``, with the item-to-item anchor of that
    best). Scores must be finite."""
    index: dict[str, int] = {}
    ids: list[str] = []
    scores: list[float] = []
    sources: list[int] = []
    per_source: dict[int, dict[int, tuple[float, str]]] = {}
    for n, cand in enumerate(candidates):
        item_id = cand.item_id
        bad = bad_id(item_id)
        if bad:
            raise InvalidArgument(f"candidates[{n}].item_id {bad}")
        if not math.isfinite(cand.score):
            raise InvalidArgument(f"candidates[{n}].score must be finite, got {cand.score}")
        at = index.get(item_id)
        if at is None:
            at = index[item_id] = len(ids)
            ids.append(item_id)
            scores.append(cand.score)
            sources.append(int(cand.source))
        elif cand.score > scores[at]:
            scores[at] = cand.score
            sources[at] = int(cand.source)
        if cand.sources:
            _merge_sources(n, cand, at, per_source)
    source_scores: dict[int, np.ndarray] = {}
    source_anchors: dict[int, list[str]] = {}
    for src, got in per_source.items():
        arr = np.full(len(ids), np.nan)
        anchors = [""] * len(ids)
        for at, (v, anchor) in got.items():
            arr[at] = v
            anchors[at] = anchor
        source_scores[src] = arr
        source_anchors[src] = anchors
    return CandidateSet(
        ids, np.asarray(scores, dtype=np.float64), sources, source_scores, source_anchors
    )


def _merge_sources(
    n: int,
    cand: common_pb2.Candidate,
    at: int,
    per_source: dict[int, dict[int, tuple[float, str]]],
) -> None:
    """Fold one candidate's parallel source fields into ``per_source`` (best per source)."""
    m = len(cand.sources)
    if len(cand.source_scores) != m or len(cand.source_anchor_ids) not in (0, m):
        raise InvalidArgument(
            f"candidates[{n}]: sources, source_scores and source_anchor_ids must be parallel "
            f"(got {m}, {len(cand.source_scores)}, {len(cand.source_anchor_ids)})"
        )
    for j in range(m):
        v = float(cand.source_scores[j])
        if not math.isfinite(v):
            raise InvalidArgument(f"candidates[{n}].source_scores[{j}] must be finite, got {v}")
        anchor = cand.source_anchor_ids[j] if cand.source_anchor_ids else ""
        got = per_source.setdefault(int(cand.sources[j]), {})
        if at not in got or v > got[at][0]:
            got[at] = (v, anchor)


def merge_columns(cols: common_pb2.CandidateColumns) -> CandidateSet:
    """:func:`merge_candidates` for candidates sent as columns (``RankRequest.columns``):
    the same set for the same candidates, read a column at a time. Duplicate ids (rare:
    retrieval sends none) take the per-candidate path. Columns must be parallel, scores
    finite, source scores finite or NaN (not scored), a source at most once."""
    ids = list(cols.item_ids)
    n = len(ids)
    scores = np.asarray(cols.scores, dtype=np.float64)
    sources: list[int] = list(cols.sources)  # type: ignore[arg-type]  # enum values: ints
    if len(scores) != n or len(sources) != n:
        raise InvalidArgument(
            f"columns: item_ids, scores and sources must be parallel "
            f"(got {n}, {len(scores)}, {len(sources)})"
        )
    if not all(ids) or max(map(len, ids), default=0) * 4 > MAX_ID_BYTES:
        for n_, item_id in enumerate(ids):
            bad = bad_id(item_id)
            if bad:
                raise InvalidArgument(f"columns.item_ids[{n_}] {bad}")
    finite = np.isfinite(scores)
    if not finite.all():
        at = int(np.flatnonzero(~finite)[0])
        raise InvalidArgument(f"columns.scores[{at}] must be finite, got {scores[at]}")
    by: list[tuple[int, np.ndarray, list[str]]] = []
    for j, col in enumerate(cols.by_source):
        src = int(col.source)
        vals = np.asarray(col.scores, dtype=np.float64)
        anchors = list(col.anchor_ids)
        if len(vals) != n or len(anchors) not in (0, n):
            raise InvalidArgument(
                f"columns.by_source[{j}]: scores and anchor_ids must be parallel to item_ids "
                f"(got {len(vals)} and {len(anchors)} for {n} items)"
            )
        if np.isinf(vals).any():
            raise InvalidArgument(f"columns.by_source[{j}].scores must be finite or NaN")
        if any(src == b[0] for b in by):
            raise InvalidArgument(f"columns.by_source: source {src} is given twice")
        by.append((src, vals, anchors))
    if len(set(ids)) != n:  # duplicates: merged one candidate at a time
        return merge_candidates(candidates_of(cols))
    source_scores: dict[int, np.ndarray] = {}
    source_anchors: dict[int, list[str]] = {}
    for src, vals, anchors in by:
        scored = ~np.isnan(vals)
        if not scored.any():  # as if no candidate listed it
            continue
        source_scores[src] = vals
        if not anchors:
            source_anchors[src] = [""] * n
        elif scored.all():
            source_anchors[src] = anchors
        else:
            source_anchors[src] = [
                a if ok else "" for a, ok in zip(anchors, scored.tolist(), strict=True)
            ]
    return CandidateSet(ids, scores, sources, source_scores, source_anchors)


def rank_context(profile: common_pb2.Profile, context: common_pb2.Context) -> RankContext:
    """What the rules need from the profile and the context."""
    if context.surface not in SURFACE_NAMES:
        raise InvalidArgument(f"context.surface has an unknown value {context.surface}")
    in_cart = {line.item_id for line in profile.cart.lines} | set(context.cart_item_ids)
    return RankContext(
        surface=SURFACE_NAMES[context.surface],
        purchased=frozenset(p.item_id for p in profile.purchases),
        in_cart=frozenset(in_cart),
        anchor=context.anchor_item_id,
    )


class RankPipeline:
    """Rank = validate + merge + look up the item table + score + rules, with the
    scorer resolved per alias. ``table`` gives the item table in force (the catalogue
    follower swaps it on reload); items sent in the request override its rows."""

    def __init__(
        self,
        rules: RulesConfig,
        scorers: ScorerProvider = no_ranker,
        vectors: ItemVectorLookup | None = None,
        max_candidates: int = 2000,
        max_k: int = 1000,
        table: Callable[[], CatalogTable] | None = None,
    ) -> None:
        empty = CatalogTable()
        self.table: Callable[[], CatalogTable] = table or (lambda: empty)
        self.rules = rules
        self.scorers = scorers
        self.vectors = vectors
        self.max_candidates = max_candidates
        self.max_k = max_k
        self.fallback: Scorer = RetrievalScorer()

    def validate(self, request: ranking_pb2.RankRequest) -> None:
        n = len(request.candidates)
        if n and request.HasField("columns"):
            raise InvalidArgument("candidates and columns: send one of the two, not both")
        n = n or len(request.columns.item_ids)
        if n == 0:
            raise InvalidArgument("candidates must not be empty")
        if n > self.max_candidates:
            raise InvalidArgument(f"at most {self.max_candidates} candidates, got {n}")
        if not 1 <= request.k <= self.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.max_k}, got {request.k}")

    def _scores(
        self,
        scorer: Scorer,
        request: ranking_pb2.RankRequest,
        candidates: CandidateSet,
        items: CandidateArrays,
    ) -> np.ndarray | None:
        try:
            scores = np.asarray(
                scorer.score(request.profile, request.context, candidates, items),
                dtype=np.float64,
            )
        except Exception:
            log.exception("scorer failed; ranking by retrieval scores")
            return None
        if scores.shape != (len(candidates),) or not np.isfinite(scores).all():
            log.error(
                "scorer returned bad scores; ranking by retrieval scores",
                extra={"shape": list(scores.shape)},
            )
            return None
        return scores

    def rank(
        self,
        request: ranking_pb2.RankRequest,
        time_remaining: Callable[[], float | None] | None = None,
        newer: Mapping[str, common_pb2.Item] | None = None,
    ) -> ranking_pb2.RankResponse:
        """Rank ``request``; ``time_remaining`` (the caller's deadline, seconds) is
        checked before scoring and before the rules: past it the work stops with
        DEADLINE_EXCEEDED. ``newer`` are catalogue items the table does not hold yet;
        items sent in the request win over both."""
        self.validate(request)
        if request.candidates:
            candidates = merge_candidates(request.candidates)
        else:
            candidates = merge_columns(request.columns)
        table = self.table()
        items = table.lookup(candidates.ids)
        if newer:
            items = items.overlay(candidates.ids, newer)
        if request.items:
            validate_items(request.items)
            items = items.overlay(candidates.ids, {i.item_id: i for i in request.items})
        ctx = rank_context(request.profile, request.context)
        rules = self.rules.for_surface(ctx.surface)

        scorer = self.scorers(request.model_alias)
        scores = None
        check_time_left(time_remaining, "ranker")
        if scorer is not None:
            scores = self._scores(scorer, request, candidates, items)
        version = scorer.model_version if scorer is not None and scores is not None else None
        if scores is None:
            scores = self.fallback.score(request.profile, request.context, candidates, items)

        check_time_left(time_remaining, "rules")
        result = apply_rules(candidates, scores, items, ctx, rules, request.k, self.vectors)
        response = ranking_pb2.RankResponse(dropped=result.dropped)
        if version is not None:
            response.model.CopyFrom(version)
        categories = items.category_strings()
        profile, context = request.profile, request.context
        details = _Details(request, table, items, newer) if request.return_items else None
        for idx, score, reasons in zip(result.indices, result.scores, result.reasons, strict=True):
            codes, texts = explain(reasons, candidates, idx, categories[idx], profile, context)
            ranked = response.items.add(
                item_id=candidates.ids[idx],
                score=score,
                model_score=float(scores[idx]),
                reasons=codes,  # type: ignore[arg-type]
                reason_texts=texts,
            )
            if details is not None:
                details.fill(ranked.item, candidates.ids[idx], idx)
        return response


class _Details:
    """The catalogue details of a returned item (``RankRequest.return_items``): an item
    sent in the request, else one fetched since the table's last refresh, else the
    table's row (its serialized Item); only the id for an item none of them knows."""

    def __init__(
        self,
        request: ranking_pb2.RankRequest,
        table: CatalogTable,
        items: CandidateArrays,
        newer: Mapping[str, common_pb2.Item] | None,
    ) -> None:
        self.sent = {i.item_id: i for i in request.items}
        self.newer = newer or {}
        self.table = table
        self.rows = items.table_rows

    def fill(self, out: common_pb2.Item, item_id: str, idx: int) -> None:
        found = self.sent.get(item_id) or self.newer.get(item_id)
        if found is not None:
            out.CopyFrom(found)
            return
        row = int(self.rows[idx]) if idx < len(self.rows) else -1
        if row >= 0:
            out.ParseFromString(self.table.item_bytes(row))
        else:
            out.item_id = item_id
