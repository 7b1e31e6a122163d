"""``CandidateColumns`` (common.proto): candidates as parallel columns.

The same information as ``repeated Candidate``; writing and reading a message per
candidate (and its three repeated source fields) cost retrieval and ranking about half
a millisecond each per 200 candidates, a few repeated fields cost a few tens of
microseconds. Retrieval writes them (:func:`services.retrieval.merge.fill_columns`),
the gateway passes them on (:func:`take` when it leaves sold-out items out) and ranking
reads them (:func:`services.ranking.pipeline.merge_columns`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mercato.v1 import common_pb2


def columns_of(candidates: Sequence[common_pb2.Candidate]) -> common_pb2.CandidateColumns:
    """``candidates`` as columns (one column per source any of them lists; NaN and ""
    where a candidate lists none). A candidate listing a source twice keeps the last."""
    n = len(candidates)
    cols = common_pb2.CandidateColumns(
        item_ids=[c.item_id for c in candidates],
        scores=[c.score for c in candidates],
        sources=[c.source for c in candidates],
    )
    by: dict[int, tuple[list[float], list[str]]] = {}
    for i, c in enumerate(candidates):
        if not c.sources:
            continue
        anchors = c.source_anchor_ids
        for j, src in enumerate(c.sources):
            vals, ids = by.setdefault(int(src), ([math.nan] * n, [""] * n))
            vals[i] = c.source_scores[j] if j < len(c.source_scores) else math.nan
            ids[i] = anchors[j] if j < len(anchors) else ""
    for source, (vals, ids) in by.items():
        cols.by_source.add(
            source=source,  # type: ignore[arg-type]
            scores=vals,
            anchor_ids=ids if any(ids) else [],
        )
    return cols


def candidates_of(cols: common_pb2.CandidateColumns) -> list[common_pb2.Candidate]:
    """The columns as one ``Candidate`` per item (sources a candidate was not scored by,
    NaN, left out). Columns of unequal length are cut to the shortest."""
    out = []
    by = [(int(c.source), list(c.scores), list(c.anchor_ids)) for c in cols.by_source]
    for i, (item_id, score, source) in enumerate(
        zip(cols.item_ids, cols.scores, cols.sources, strict=False)
    ):
        c = common_pb2.Candidate(item_id=item_id, score=score, source=source)
        for src, vals, anchors in by:
            if i < len(vals) and vals[i] == vals[i]:
                c.sources.append(src)  # type: ignore[arg-type]
                c.source_scores.append(vals[i])
                c.source_anchor_ids.append(anchors[i] if i < len(anchors) else "")
        out.append(c)
    return out


def take(cols: common_pb2.CandidateColumns, keep: Sequence[int]) -> common_pb2.CandidateColumns:
    """The rows ``keep`` of ``cols`` (in that order), every column."""
    idx = np.asarray(keep, dtype=np.int64)
    ids = list(cols.item_ids)
    out = common_pb2.CandidateColumns(
        item_ids=[ids[i] for i in idx.tolist()],
        scores=np.asarray(cols.scores, dtype=np.float32)[idx].tolist(),
        sources=np.asarray(cols.sources, dtype=np.int64)[idx].tolist(),
    )
    for c in cols.by_source:
        anchors = list(c.anchor_ids)
        out.by_source.add(
            source=c.source,
            scores=np.asarray(c.scores, dtype=np.float32)[idx].tolist(),
            anchor_ids=[anchors[i] for i in idx.tolist()] if anchors else [],
        )
    return out


def without_rows(
    cols: common_pb2.CandidateColumns, rows: Sequence[int]
) -> common_pb2.CandidateColumns:
    """A copy of ``cols`` without the rows ``rows`` (ascending), every column: for a few
    rows out of many, cheaper than :func:`take` of the rest (no array round trips)."""
    out = common_pb2.CandidateColumns()
    out.CopyFrom(cols)
    for i in reversed(rows):
        del out.item_ids[i]
        del out.scores[i]
        del out.sources[i]
        for c in out.by_source:
            del c.scores[i]
            if c.anchor_ids:
                del c.anchor_ids[i]
    return out
