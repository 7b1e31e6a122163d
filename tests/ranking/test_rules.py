"""Business rules hold for any input (property-based), and the config layers as documented."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mercato.v1 import common_pb2
from services.ranking.rules import (
    CandidateSet,
    ItemInfo,
    RankContext,
    RulesConfig,
    RulesConfigError,
    SurfaceRules,
    apply_rules,
    boost_of,
    normalize_relevance,
)

CATEGORIES = ["", "shoes", "bags", "hats", "socks"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(1, 60))
    ids = [f"i{i}" for i in range(n)]
    scores = draw(
        st.lists(st.floats(-50, 50, allow_nan=False, allow_infinity=False), min_size=n, max_size=n)
    )
    items: dict[str, ItemInfo] = {}
    for item_id in ids:
        if draw(st.booleans()) or draw(st.booleans()):  # ~75 % have details
            price = draw(st.floats(0, 200, allow_nan=False))
            items[item_id] = ItemInfo(
                item_id=item_id,
                category=draw(st.sampled_from(CATEGORIES)),
                price=price,
                stock=draw(st.sampled_from([0, 0, 1, 5, 100])),
                margin=draw(st.floats(0, 200, allow_nan=False)),
                replenishable=draw(st.booleans()),
                promoted=draw(st.booleans()),
            )
    purchased = frozenset(draw(st.lists(st.sampled_from(ids), max_size=5)))
    in_cart = frozenset(draw(st.lists(st.sampled_from(ids), max_size=3)))
    anchor = draw(st.sampled_from(["", *ids]))
    surface = draw(st.sampled_from(["home", "product", "cart", "checkout", "buy_again", "email"]))
    ctx = RankContext(surface, purchased, in_cart, anchor)
    rules = SurfaceRules.model_validate(
        {
            "drop_unknown_stock": draw(st.booleans()),
            "purchased": draw(st.sampled_from(["drop_non_replenishable", "drop_all", "keep"])),
            "category_cap": draw(st.integers(0, 4)),
            "diversity": {
                "method": draw(st.sampled_from(["mmr", "none"])),
                "relevance_weight": draw(st.floats(0, 1)),
            },
            "boosts": {
                "promoted": draw(st.floats(0, 1)),
                "high_margin": draw(st.floats(0, 1)),
                "max_boost": draw(st.floats(0, 1)),
            },
        }
    )
    k = draw(st.integers(1, 70))
    cands = CandidateSet(ids, np.asarray(scores), [0] * n)
    return cands, items, ctx, rules, k


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_rules_hold_for_any_input(scenario: tuple) -> None:
    cands, items, ctx, rules, k = scenario
    result = apply_rules(cands, cands.scores, items, ctx, rules, k)
    chosen = [cands.ids[i] for i in result.indices]

    assert len(chosen) <= k
    assert len(set(chosen)) == len(chosen)
    for item_id in chosen:
        item = items.get(item_id)
        # No out-of-stock item, ever.
        assert item is None or item.stock != 0
        if rules.drop_unknown_stock:
            assert item is not None
        assert item_id != ctx.anchor or not ctx.anchor
        assert item_id not in ctx.in_cart
        if item_id in ctx.purchased and rules.purchased != "keep":
            assert rules.purchased == "drop_non_replenishable" and item and item.replenishable
    # Per-category caps (uncategorised items are not capped).
    if rules.category_cap:
        per_cat = Counter(items[i].category for i in chosen if i in items and items[i].category)
        assert max(per_cat.values(), default=0) <= rules.category_cap
    # Every candidate is either returned, dropped by a named filter, passed over by a cap,
    # or simply below the top k.
    filtered = sum(v for r, v in result.dropped.items() if r != "category_cap")
    assert len(chosen) + filtered <= len(cands)
    if len(chosen) < k:
        assert len(chosen) + filtered + result.dropped.get("category_cap", 0) == len(cands)
    # Scores are non-increasing down the list, and reasons are set.
    assert all(a >= b - 1e-9 for a, b in zip(result.scores, result.scores[1:], strict=False))
    assert all(r and r[0] != common_pb2.REASON_UNSPECIFIED for r in result.reasons)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_boosts_are_bounded(scenario: tuple) -> None:
    cands, items, ctx, rules, k = scenario
    rules = rules.model_copy(
        update={
            "diversity": rules.diversity.model_copy(update={"method": "none"}),
            "category_cap": 0,
        }
    )
    # Ask for every candidate: with no cap and no diversity, every candidate a filter
    # keeps is returned, so the relevance (min-max over every kept candidate) is known.
    result = apply_rules(cands, cands.scores, items, ctx, rules, len(cands))
    kept_scores = {cands.ids[i]: s for i, s in zip(result.indices, result.scores, strict=True)}
    mask = np.array([i in kept_scores for i in cands.ids])
    assert len(kept_scores) + sum(result.dropped.values()) == len(cands)
    # The top k is the head of that list: a cut never reorders or rescores.
    top = apply_rules(cands, cands.scores, items, ctx, rules, k)
    assert list(top.indices) == list(result.indices)[:k]
    assert list(top.scores) == pytest.approx(list(result.scores)[:k])
    relevance = normalize_relevance(cands.scores[mask])
    bound = 1.0 + rules.boosts.max_boost
    for rel, item_id in zip(relevance, [i for i in cands.ids if i in kept_scores], strict=True):
        score = kept_scores[item_id]
        assert rel - 1e-9 <= score <= rel * bound + 1e-9
        boost = boost_of(items.get(item_id) or ItemInfo(item_id), rules.boosts)
        assert 0.0 <= boost <= rules.boosts.max_boost
    # A boost never lifts an item over one whose relevance is more than the bound higher.
    order = [cands.ids.index(i) for i in kept_scores]
    rel_by_id = dict(zip([i for i in cands.ids if i in kept_scores], relevance, strict=True))
    for pos, a in enumerate(order):
        for b in order[pos + 1 :]:
            assert not rel_by_id[cands.ids[b]] > rel_by_id[cands.ids[a]] * bound + 1e-9


def test_out_of_stock_and_purchased_counted_per_rule() -> None:
    items = {
        "a": ItemInfo("a", stock=0),
        "b": ItemInfo("b", stock=3, replenishable=False),
        "c": ItemInfo("c", stock=3, replenishable=True),
        "d": ItemInfo("d", stock=3),
    }
    cands = CandidateSet(["a", "b", "c", "d", "e"], np.array([5.0, 4, 3, 2, 1]), [0] * 5)
    ctx = RankContext("home", purchased=frozenset({"b", "c"}))
    rules = RulesConfig.from_mapping({}).for_surface("home")
    result = apply_rules(cands, cands.scores, items, ctx, rules, k=10)
    assert [cands.ids[i] for i in result.indices] == ["c", "d", "e"]  # e: unknown stock kept
    assert result.dropped == {"out_of_stock": 1, "purchased": 1}

    strict = rules.model_copy(update={"drop_unknown_stock": True, "purchased": "drop_all"})
    result = apply_rules(cands, cands.scores, items, ctx, strict, k=10)
    assert [cands.ids[i] for i in result.indices] == ["d"]
    assert result.dropped == {"out_of_stock": 1, "purchased": 2, "unknown_stock": 1}


def test_buy_again_keeps_replenishable_with_its_reason() -> None:
    items = {
        "milk": ItemInfo("milk", category="dairy", stock=9, replenishable=True),
        "tv": ItemInfo("tv", category="tv", stock=9, replenishable=False),
    }
    cands = CandidateSet(["milk", "tv"], np.array([1.0, 2.0]), [0, 0])
    ctx = RankContext("buy_again", purchased=frozenset({"milk", "tv"}))
    rules = RulesConfig.from_mapping({}).for_surface(common_pb2.SURFACE_BUY_AGAIN)
    result = apply_rules(cands, cands.scores, items, ctx, rules, k=5)
    assert [cands.ids[i] for i in result.indices] == ["milk"]
    assert result.reasons[0] == [common_pb2.REASON_BUY_AGAIN]


def test_boost_reason_and_bounded_lift() -> None:
    # b is promoted and high-margin: both boosts, capped at max_boost.
    items = {
        "a": ItemInfo("a", category="x", price=10, stock=1, margin=1),
        "b": ItemInfo("b", category="y", price=10, stock=1, margin=9, promoted=True),
        "c": ItemInfo("c", category="z", price=10, stock=1, margin=1),
    }
    rules = SurfaceRules.model_validate(
        {
            "diversity": {"method": "none"},
            "boosts": {"promoted": 0.2, "high_margin": 0.2, "max_boost": 0.25},
        }
    )
    assert boost_of(items["b"], rules.boosts) == pytest.approx(0.25)
    # relevance: a=1, b=0.85, c=0 -> b boosted to 1.0625 passes a.
    cands = CandidateSet(["a", "b", "c"], np.array([1.0, 0.85, 0.0]), [0] * 3)
    result = apply_rules(cands, cands.scores, items, RankContext(), rules, k=3)
    assert [cands.ids[i] for i in result.indices] == ["b", "a", "c"]
    assert result.reasons[0] == [common_pb2.REASON_MODEL, common_pb2.REASON_BOOSTED]
    assert result.reasons[1] == [common_pb2.REASON_MODEL]
    # ... but not when a is more than 1.25x more relevant.
    cands = CandidateSet(["a", "b", "c"], np.array([1.0, 0.75, 0.0]), [0] * 3)
    result = apply_rules(cands, cands.scores, items, RankContext(), rules, k=3)
    assert [cands.ids[i] for i in result.indices][:2] == ["a", "b"]


def test_category_diversity_without_vectors() -> None:
    items = {f"s{i}": ItemInfo(f"s{i}", category="shoes", stock=1) for i in range(5)}
    items["bag"] = ItemInfo("bag", category="bags", stock=1)
    ids = [*(f"s{i}" for i in range(5)), "bag"]
    cands = CandidateSet(ids, np.array([1.0, 0.99, 0.98, 0.97, 0.96, 0.8]), [0] * 6)
    no_div = SurfaceRules.model_validate({"category_cap": 0, "diversity": {"method": "none"}})
    mmr = SurfaceRules.model_validate({"category_cap": 0, "diversity": {"relevance_weight": 0.5}})
    plain = [
        ids[i] for i in apply_rules(cands, cands.scores, items, RankContext(), no_div, 3).indices
    ]
    diverse = [
        ids[i] for i in apply_rules(cands, cands.scores, items, RankContext(), mmr, 3).indices
    ]
    assert "bag" not in plain
    assert diverse[:2] == ["s0", "bag"]


def test_mmr_uses_item_vectors_when_given() -> None:
    # Four items, no categories: a0/a1 are near duplicates, b is different.
    vecs = {"a0": [1.0, 0.0], "a1": [0.99, 0.05], "a2": [0.98, 0.1], "b": [0.0, 1.0]}
    ids = list(vecs)
    items = {i: ItemInfo(i, stock=1) for i in ids}
    cands = CandidateSet(ids, np.array([1.0, 0.98, 0.97, 0.7]), [0] * 4)
    rules = SurfaceRules.model_validate({"category_cap": 0, "diversity": {"relevance_weight": 0.5}})

    def lookup(item_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        mat = np.array([vecs.get(i, [0.0, 0.0]) for i in item_ids])
        return mat, np.array([i in vecs for i in item_ids])

    without = apply_rules(cands, cands.scores, items, RankContext(), rules, 2)
    with_vectors = apply_rules(cands, cands.scores, items, RankContext(), rules, 2, vectors=lookup)
    assert [ids[i] for i in without.indices] == ["a0", "a1"]
    assert [ids[i] for i in with_vectors.indices] == ["a0", "b"]


def test_candidate_source_names_the_reason() -> None:
    cands = CandidateSet(
        ["x", "y"], np.array([1.0, 0.5]), [common_pb2.REASON_COMPLEMENT, common_pb2.REASON_FALLBACK]
    )
    result = apply_rules(cands, cands.scores, {}, RankContext(), SurfaceRules(), 2)
    assert [r[0] for r in result.reasons] == [
        common_pb2.REASON_COMPLEMENT,
        common_pb2.REASON_FALLBACK,
    ]


def test_rules_config_layers_and_rejects_mistakes(tmp_path: Path) -> None:
    builtin = RulesConfig.load(None)
    assert builtin.for_surface("cart").category_cap == 2
    assert builtin.for_surface(common_pb2.SURFACE_UNSPECIFIED) == builtin.for_surface("home")

    path = tmp_path / "rules.yaml"
    path.write_text(
        "defaults:\n  category_cap: 5\n  boosts: {max_boost: 0.1}\n"
        "surfaces:\n  email:\n    category_cap: 1\n    drop_unknown_stock: true\n"
    )
    cfg = RulesConfig.load(path)
    assert cfg.for_surface("home").category_cap == 5
    assert cfg.for_surface("cart").category_cap == 5  # file defaults beat built-in surface
    assert cfg.for_surface("email").category_cap == 1
    assert cfg.for_surface("email").drop_unknown_stock
    assert cfg.for_surface("home").boosts.max_boost == 0.1
    assert cfg.for_surface("home").boosts.promoted == 0.1  # untouched default
    json_path = tmp_path / "rules.json"
    json_path.write_text('{"surfaces": {"home": {"category_cap": 7}}}')
    assert RulesConfig.load(json_path).for_surface("home").category_cap == 7

    for bad in (
        "surfaces:\n  homepage: {}\n",
        "defaults:\n  category_cap: -1\n",
        "defaults:\n  boosts: {max_boost: 3}\n",
        "defaults:\n  unknown_rule: true\n",
        "colour: red\n",
        "- a list\n",
    ):
        path.write_text(bad)
        with pytest.raises(RulesConfigError):
            RulesConfig.load(path)
