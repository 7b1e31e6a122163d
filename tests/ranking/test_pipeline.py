"""Rank in-process: validation, duplicate merging, unknown items, the Scorer hook."""

from __future__ import annotations

import numpy as np
import pytest

from mercato.v1 import common_pb2, ranking_pb2
from services.common.errors import InvalidArgument
from services.ranking.pipeline import RankPipeline, merge_candidates
from services.ranking.rules import CandidateSet, RulesConfig
from services.ranking.scoring import RetrievalScorer, Scorer
from services.ranking.table import CandidateArrays


def _request(n: int = 5, k: int = 10, **kw: object) -> ranking_pb2.RankRequest:
    req = ranking_pb2.RankRequest(k=k, **kw)  # type: ignore[arg-type]
    for i in range(n):
        req.candidates.add(item_id=f"i{i}", score=float(n - i))
        req.items.add(item_id=f"i{i}", category=f"c{i}", price=10, stock=3)
    return req


def _ids(resp: ranking_pb2.RankResponse) -> list[str]:
    return [it.item_id for it in resp.items]


@pytest.fixture
def pipeline() -> RankPipeline:
    return RankPipeline(RulesConfig.load(None), max_candidates=50, max_k=20)


def test_rules_only_ranks_by_retrieval_score(pipeline: RankPipeline) -> None:
    req = _request(5)
    req.profile.known = True
    req.candidates[3].score = 100.0  # i3 is now the best
    resp = pipeline.rank(req)
    assert _ids(resp)[0] == "i3"
    assert resp.model.name == ""
    assert resp.items[0].model_score == pytest.approx(100.0)
    assert all(it.reasons[0] == common_pb2.REASON_MODEL for it in resp.items)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.ClearField("candidates"), "candidates must not be empty"),
        (lambda r: setattr(r, "k", 0), "k must be between 1 and 20"),
        (lambda r: setattr(r, "k", 21), "k must be between 1 and 20"),
        (lambda r: [r.candidates.add(item_id=f"x{i}") for i in range(50)], "at most 50"),
        (lambda r: r.candidates.add(item_id=""), "item_id must not be empty"),
        (lambda r: r.candidates.add(item_id="x" * 129), "longer than 128 bytes"),
        (lambda r: r.candidates.add(item_id="nan", score=float("nan")), "must be finite"),
        (lambda r: r.items.add(item_id="i0", stock=-1), "stock must be >= 0"),
        (lambda r: r.items.add(item_id="i0", price=-1), "price must be >= 0"),
        (lambda r: setattr(r.context, "surface", 99), "unknown value 99"),
    ],
)
def test_bad_requests_say_what_is_wrong(
    pipeline: RankPipeline, mutate: object, message: str
) -> None:
    req = _request(3)
    mutate(req)  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match=message):
        pipeline.rank(req)


def test_duplicates_keep_the_best_score_and_its_source() -> None:
    cands = [
        common_pb2.Candidate(item_id="a", score=0.2, source=common_pb2.REASON_TRENDING),
        common_pb2.Candidate(item_id="b", score=0.5),
        common_pb2.Candidate(item_id="a", score=0.9, source=common_pb2.REASON_COMPLEMENT),
        common_pb2.Candidate(item_id="a", score=0.1),
    ]
    merged = merge_candidates(cands)
    assert merged.ids == ["a", "b"]
    assert merged.scores.tolist() == pytest.approx([0.9, 0.5])
    assert merged.sources == [common_pb2.REASON_COMPLEMENT, 0]


def test_merge_keeps_every_source_and_its_scores() -> None:
    model, sim = common_pb2.REASON_MODEL, common_pb2.REASON_SIMILAR
    cands = [
        common_pb2.Candidate(
            item_id="a",
            score=0.03,
            source=sim,
            sources=[model, sim],
            source_scores=[0.4, 2.5],
            source_anchor_ids=["", "x"],
        ),
        common_pb2.Candidate(
            item_id="b", score=0.02, source=model, sources=[model], source_scores=[0.9]
        ),
        # The same item again from another call: per source, the best score (and anchor) stays.
        common_pb2.Candidate(
            item_id="a",
            score=0.01,
            source=sim,
            sources=[sim],
            source_scores=[3.0],
            source_anchor_ids=["y"],
        ),
        common_pb2.Candidate(item_id="c", score=0.5),  # a caller that does not merge
    ]
    merged = merge_candidates(cands)
    assert merged.ids == ["a", "b", "c"]
    assert merged.sources == [sim, model, 0]
    np.testing.assert_allclose(merged.source_score(model), [0.4, 0.9, np.nan], rtol=1e-6)
    np.testing.assert_array_equal(merged.source_score(sim), [3.0, np.nan, np.nan])
    assert merged.source_anchors[sim] == ["y", "", ""]
    assert np.isnan(merged.source_score(common_pb2.REASON_COMPLEMENT)).all()
    bad = common_pb2.Candidate(item_id="d", score=1.0, sources=[model], source_scores=[])
    with pytest.raises(InvalidArgument, match="parallel"):
        merge_candidates([bad])
    bad = common_pb2.Candidate(
        item_id="d", score=1.0, sources=[model], source_scores=[float("inf")]
    )
    with pytest.raises(InvalidArgument, match="finite"):
        merge_candidates([bad])


def test_reasons_say_why(pipeline: RankPipeline) -> None:
    sim, comp, model = (
        common_pb2.REASON_SIMILAR,
        common_pb2.REASON_COMPLEMENT,
        common_pb2.REASON_MODEL,
    )
    req = ranking_pb2.RankRequest(
        k=10,
        profile=common_pb2.Profile(customer_id="c", known=True),
        context=common_pb2.Context(surface=common_pb2.SURFACE_HOME, cart_item_ids=["cart-1"]),
    )
    for item_id, score, source, seen in (("a", 0.9, sim, "seen-7"), ("b", 0.8, model, "seen-3")):
        # Both sources scored it; item-to-item names the customer's item behind it.
        req.candidates.add(
            item_id=item_id,
            score=score,
            source=source,
            sources=[model, sim],
            source_scores=[score / 2, score * 2],
            source_anchor_ids=["", seen],
        )
    req.candidates.add(item_id="c", score=0.7, source=model, sources=[model], source_scores=[0.4])
    req.candidates.add(item_id="d", score=0.6, source=comp)
    req.candidates.add(item_id="e", score=0.5, source=common_pb2.REASON_TRENDING)
    req.items.add(item_id="e", category="mugs", stock=3)
    got = {it.item_id: (list(it.reasons), list(it.reason_texts)) for it in pipeline.rank(req).items}
    assert got == {
        "a": ([sim], ["similar to your recent seen-7"]),
        "b": ([model], ["similar to your recent seen-3"]),
        "c": ([model], ["picked for you from your history"]),
        "d": ([comp], ["bought with cart-1"]),
        "e": ([common_pb2.REASON_TRENDING], ["popular in mugs"]),
    }
    # The same candidates for an unknown customer: nothing says "model".
    req.profile.known = False
    unknown = pipeline.rank(req).items
    assert all(model not in it.reasons for it in unknown)
    assert {it.item_id: it.reason_texts[0] for it in unknown}["c"] == "trending"


def test_duplicate_candidates_returned_once(pipeline: RankPipeline) -> None:
    req = _request(3)
    req.candidates.add(item_id="i2", score=50.0)
    resp = pipeline.rank(req)
    assert _ids(resp)[0] == "i2"
    assert sorted(_ids(resp)) == ["i0", "i1", "i2"]


def test_missing_item_details_mean_unknown_stock(pipeline: RankPipeline) -> None:
    req = _request(2)
    req.candidates.add(item_id="mystery", score=0.5)
    req.items.add(item_id="gone", stock=0)
    req.candidates.add(item_id="gone", score=9.0)
    resp = pipeline.rank(req)
    assert "mystery" in _ids(resp)  # kept: stock unknown
    assert "gone" not in _ids(resp)
    assert dict(resp.dropped) == {"out_of_stock": 1}

    strict = RankPipeline(RulesConfig.from_mapping({"defaults": {"drop_unknown_stock": True}}))
    resp = strict.rank(req)
    assert "mystery" not in _ids(resp)
    assert dict(resp.dropped) == {"out_of_stock": 1, "unknown_stock": 1}


def test_cart_anchor_and_purchases_come_from_profile_and_context(pipeline: RankPipeline) -> None:
    req = _request(6, context=common_pb2.Context(anchor_item_id="i0", cart_item_ids=["i1"]))
    req.profile.cart.lines.add(item_id="i2", quantity=1)
    req.profile.purchases.add(item_id="i3", count=1)
    resp = pipeline.rank(req)
    assert _ids(resp) == ["i4", "i5"]
    assert dict(resp.dropped) == {"anchor": 1, "in_cart": 2, "purchased": 1}


class _ReverseScorer:
    """A stand-in ranker: prefers what retrieval liked least."""

    version = common_pb2.ModelVersion(name="mercato-ranker", version="3", alias="champion")

    @property
    def model_version(self) -> common_pb2.ModelVersion | None:
        return self.version

    def score(
        self,
        profile: common_pb2.Profile,
        context: common_pb2.Context,
        candidates: CandidateSet,
        items: CandidateArrays,
    ) -> np.ndarray:
        assert len(items) == len(candidates)  # the item table's row per candidate
        return -candidates.scores


class _BrokenScorer(_ReverseScorer):
    def score(self, *args: object, **kw: object) -> np.ndarray:
        raise RuntimeError("model file vanished")


class _WrongShapeScorer(_ReverseScorer):
    def score(self, *args: object, **kw: object) -> np.ndarray:
        return np.zeros(1)


def test_a_scorer_plugs_in_per_alias() -> None:
    assert isinstance(_ReverseScorer(), Scorer)
    assert isinstance(RetrievalScorer(), Scorer)
    seen: list[str] = []

    def provider(alias: str) -> Scorer | None:
        seen.append(alias)
        return _ReverseScorer() if alias in ("", "champion") else None

    pipe = RankPipeline(RulesConfig.load(None), scorers=provider)
    resp = pipe.rank(_request(4, model_alias="champion"))
    assert _ids(resp) == ["i3", "i2", "i1", "i0"]
    assert resp.model.name == "mercato-ranker" and resp.model.version == "3"
    assert resp.items[0].model_score == pytest.approx(-1.0)

    resp = pipe.rank(_request(4, model_alias="challenger"))  # no model for it: rules-only
    assert _ids(resp) == ["i0", "i1", "i2", "i3"]
    assert resp.model.name == ""
    assert seen == ["champion", "challenger"]


@pytest.mark.parametrize("scorer", [_BrokenScorer(), _WrongShapeScorer()])
def test_a_failing_scorer_degrades_to_rules_only(scorer: Scorer) -> None:
    pipe = RankPipeline(RulesConfig.load(None), scorers=lambda alias: scorer)
    resp = pipe.rank(_request(4))
    assert _ids(resp) == ["i0", "i1", "i2", "i3"]
    assert resp.model.name == ""


def test_ranker_features_read_the_two_tower_score_of_merged_candidates() -> None:
    from services.ranking.ranker import retrieval_scores

    model, sim = common_pb2.REASON_MODEL, common_pb2.REASON_SIMILAR
    merged = merge_candidates(
        [
            # Fused score 0.03; the two-tower gave it 0.7 (what the ranker was trained on).
            common_pb2.Candidate(
                item_id="a", score=0.03, source=sim, sources=[model, sim], source_scores=[0.7, 2.0]
            ),
            common_pb2.Candidate(item_id="b", score=0.5),  # not merged: its own score
        ]
    )
    np.testing.assert_allclose(retrieval_scores(merged), [0.7, 0.5], rtol=1e-6)
    plain = merge_candidates([common_pb2.Candidate(item_id="c", score=1.5)])
    np.testing.assert_allclose(retrieval_scores(plain), [1.5])
