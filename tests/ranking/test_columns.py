"""Candidates as columns (RankRequest.columns) against one message per candidate: the
same candidate set, the same Rank answer to the byte, the same bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mercato.v1 import common_pb2, ranking_pb2
from services.common.candidates import candidates_of, columns_of, take, without_rows
from services.common.errors import InvalidArgument
from services.ranking.pipeline import RankPipeline, merge_candidates, merge_columns
from services.ranking.rules import CandidateSet, RulesConfig
from services.ranking.table import CatalogTable

MODEL, SIMILAR = int(common_pb2.REASON_MODEL), int(common_pb2.REASON_SIMILAR)
TRENDING = int(common_pb2.REASON_TRENDING)


def retrieval_like(
    rng: np.random.Generator, n: int, dup: bool = False
) -> list[common_pb2.Candidate]:
    """Candidates as merged retrieval sends them: the two-tower scores every one,
    item-to-item some (with an anchor), a few proposed by trending without sources."""
    ids = [f"sku-{i}" for i in rng.choice(10 * n, n, replace=False)]
    if dup:
        ids = [ids[int(i)] for i in rng.integers(0, max(1, n // 2), n)]
    out = []
    for item_id in ids:
        c = common_pb2.Candidate(item_id=item_id, score=float(rng.normal()))
        kind = rng.random()
        if kind < 0.1:
            c.source = TRENDING  # type: ignore[assignment]
        elif kind < 0.5:
            c.source = SIMILAR  # type: ignore[assignment]
            c.sources.extend([MODEL, SIMILAR])  # type: ignore[list-item]
            c.source_scores.extend([float(rng.normal()), float(rng.random())])
            c.source_anchor_ids.extend(["", f"sku-{int(rng.integers(1000))}"])
        else:
            c.source = MODEL  # type: ignore[assignment]
            c.sources.append(MODEL)  # type: ignore[arg-type]
            c.source_scores.append(float(rng.normal()))
            c.source_anchor_ids.append("")
        out.append(c)
    return out


def assert_same_set(a: CandidateSet, b: CandidateSet) -> None:
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.scores.dtype == b.scores.dtype
    assert a.sources == b.sources
    assert list(a.source_scores) == list(b.source_scores)  # same sources, same order
    for src in a.source_scores:
        np.testing.assert_array_equal(a.source_scores[src], b.source_scores[src])
        assert a.source_anchors[src] == b.source_anchors[src]


@pytest.mark.parametrize("seed", range(20))
def test_columns_merge_to_the_same_candidate_set(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cands = retrieval_like(rng, int(rng.integers(1, 300)), dup=seed % 4 == 3)
    assert_same_set(merge_columns(columns_of(cands)), merge_candidates(cands))
    assert_same_set(merge_candidates(candidates_of(columns_of(cands))), merge_candidates(cands))


def test_a_source_scoring_none_of_the_candidates_is_as_if_absent() -> None:
    cands = [common_pb2.Candidate(item_id="a", score=1.0, source=MODEL)]  # type: ignore[arg-type]
    cols = columns_of(cands)
    cols.by_source.add(source=SIMILAR, scores=[math.nan], anchor_ids=["x"])  # type: ignore[arg-type]
    assert_same_set(merge_columns(cols), merge_candidates(cands))


def test_take_keeps_the_rows_of_every_column() -> None:
    cands = retrieval_like(np.random.default_rng(1), 30)
    keep = [0, 3, 4, 17, 29]
    assert candidates_of(take(columns_of(cands), keep)) == [cands[i] for i in keep]


def test_without_rows_drops_those_rows_of_every_column() -> None:
    cands = retrieval_like(np.random.default_rng(2), 30)
    cols = columns_of(cands)
    assert any(c.anchor_ids for c in cols.by_source)  # the anchors column is covered too
    drop = [0, 7, 29]
    out = without_rows(cols, drop)
    assert candidates_of(out) == [c for i, c in enumerate(cands) if i not in drop]
    assert candidates_of(cols) == cands  # the input is left as it was


def _rank_request(cands: list[common_pb2.Candidate], columns: bool) -> ranking_pb2.RankRequest:
    req = ranking_pb2.RankRequest(k=10, context=common_pb2.Context(surface=common_pb2.SURFACE_HOME))
    req.profile.known = True
    req.profile.purchases.add(item_id=cands[3].item_id, count=1)
    if columns:
        req.columns.CopyFrom(columns_of(cands))
    else:
        req.candidates.extend(cands)
    return req


@pytest.mark.parametrize("seed", range(5))
def test_rank_answers_the_same_from_columns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cands = retrieval_like(rng, 200)
    table = CatalogTable(
        common_pb2.Item(
            item_id=c.item_id,
            category=f"c{int(rng.integers(8))}",
            price=float(rng.uniform(1, 50)),
            stock=int(rng.integers(0, 4)),
            promoted=bool(rng.random() < 0.1),
        )
        for c in cands
    )
    pipe = RankPipeline(RulesConfig.load(None), table=lambda: table)
    want = pipe.rank(_rank_request(cands, columns=False))
    got = pipe.rank(_rank_request(cands, columns=True))
    assert len(got.items) == 10 and any(t.startswith("similar to") for t in _texts(got))
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def _texts(resp: ranking_pb2.RankResponse) -> list[str]:
    return [t for item in resp.items for t in item.reason_texts]


def _cols(n: int = 3) -> common_pb2.CandidateColumns:
    return columns_of(retrieval_like(np.random.default_rng(0), n))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.scores.append(1.0), "must be parallel"),
        (lambda c: c.sources.pop(), "must be parallel"),
        (lambda c: c.item_ids.__setitem__(1, ""), "columns.item_ids[1] must not be empty"),
        (lambda c: c.item_ids.__setitem__(2, "x" * 129), "longer than 128 bytes"),
        (lambda c: c.scores.__setitem__(1, math.inf), "columns.scores[1] must be finite"),
        (lambda c: c.by_source[0].scores.append(1.0), "by_source[0]: scores and anchor_ids"),
        (lambda c: c.by_source[0].scores.__setitem__(0, -math.inf), "finite or NaN"),
        (lambda c: c.by_source.add().CopyFrom(c.by_source[0]), "given twice"),
    ],
)
def test_bad_columns_say_what_is_wrong(mutate: object, message: str) -> None:
    cols = _cols()
    mutate(cols)  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        RankPipeline(RulesConfig.load(None)).rank(ranking_pb2.RankRequest(k=3, columns=cols))


def test_candidates_and_columns_together_are_refused() -> None:
    req = ranking_pb2.RankRequest(k=3, columns=_cols())
    req.candidates.add(item_id="a", score=1.0)
    with pytest.raises(InvalidArgument, match="not both"):
        RankPipeline(RulesConfig.load(None)).rank(req)
    with pytest.raises(InvalidArgument, match="at most 2 candidates"):
        RankPipeline(RulesConfig.load(None), max_candidates=2).rank(
            ranking_pb2.RankRequest(k=1, columns=_cols())
        )
