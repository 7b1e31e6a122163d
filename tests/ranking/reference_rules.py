"""The loop implementation of the ranking rules before they were vectorised (#14),
kept only as the reference the vectorised :func:`services.ranking.rules.apply_rules`
must reproduce exactly (tests/ranking/test_rules_vectorised.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mercato.v1 import common_pb2
from services.ranking.rules import (
    _SOURCE_REASONS,
    CandidateSet,
    DiversityMethod,
    ItemInfo,
    ItemVectorLookup,
    RankContext,
    RankedResult,
    SurfaceRules,
    boost_of,
    drop_reason,
    normalize_relevance,
)


def _similarity_fn(kept_items: Sequence[ItemInfo], vectors: ItemVectorLookup | None) -> Any:
    """Return sim(j) -> similarity of every kept item to kept item j, in [0, 1]."""
    cats = [item.category for item in kept_items]
    codes: dict[str, int] = {}
    cat_ids = np.array([codes.setdefault(c, len(codes)) if c else -1 for c in cats])
    unit: np.ndarray | None = None
    found = np.zeros(len(kept_items), dtype=bool)
    if vectors is not None and kept_items:
        mat, found_raw = vectors([item.item_id for item in kept_items])
        mat = np.asarray(mat, dtype=np.float32)
        found = np.asarray(found_raw, dtype=bool).copy()
        norms = np.linalg.norm(mat, axis=1) if mat.size else np.zeros(len(kept_items))
        found &= norms > 0
        unit = np.zeros_like(mat)
        unit[found] = mat[found] / norms[found, None]

    def sim(j: int) -> np.ndarray:
        same_cat = (cat_ids == cat_ids[j]) & (cat_ids >= 0)
        out = same_cat.astype(np.float64)
        if unit is not None and found[j]:
            cos = np.clip(unit @ unit[j], 0.0, 1.0).astype(np.float64)
            out = np.where(found, cos, out)
        return out

    return sim


def loop_apply_rules(
    candidates: CandidateSet,
    model_scores: np.ndarray,
    items: Mapping[str, ItemInfo],
    ctx: RankContext,
    rules: SurfaceRules,
    k: int,
    vectors: ItemVectorLookup | None = None,
    model_reason: int = int(common_pb2.REASON_MODEL),
) -> RankedResult:
    """Filter, boost, diversify and cap ``candidates``; return the top ``k``.

    ``items`` may miss candidates: those have unknown stock, no category and no boost.
    """
    dropped: dict[str, int] = {}
    kept: list[int] = []
    kept_items: list[ItemInfo] = []
    for i, item_id in enumerate(candidates.ids):
        item = items.get(item_id) or ItemInfo(item_id)
        reason = drop_reason(item, ctx, rules)
        if reason is None:
            kept.append(i)
            kept_items.append(item)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    result = RankedResult([], [], [], dropped)
    if not kept or k <= 0:
        return result

    relevance = normalize_relevance(np.asarray(model_scores, dtype=np.float64)[kept])
    boosts = np.array([boost_of(item, rules.boosts) for item in kept_items])
    value = relevance * (1.0 + boosts)

    cap = rules.category_cap
    counts: dict[str, int] = {}
    capped = 0

    def at_cap(item: ItemInfo) -> bool:
        return cap > 0 and bool(item.category) and counts.get(item.category, 0) >= cap

    chosen: list[tuple[int, float]] = []  # (position in kept, selection value)
    if rules.diversity.method == DiversityMethod.NONE:
        for pos in np.argsort(-value, kind="stable"):
            if len(chosen) >= k:
                break
            item = kept_items[pos]
            if at_cap(item):
                capped += 1
                continue
            counts[item.category] = counts.get(item.category, 0) + 1
            chosen.append((int(pos), float(value[pos])))
    else:
        w = rules.diversity.relevance_weight
        sim = _similarity_fn(kept_items, vectors)
        max_sim = np.zeros(len(kept))
        available = np.ones(len(kept), dtype=bool)
        while len(chosen) < k and available.any():
            mmr = np.where(available, w * value - (1.0 - w) * max_sim, -np.inf)
            pos = int(np.argmax(mmr))
            available[pos] = False
            item = kept_items[pos]
            if at_cap(item):
                capped += 1
                continue
            counts[item.category] = counts.get(item.category, 0) + 1
            chosen.append((pos, float(mmr[pos])))
            max_sim = np.maximum(max_sim, sim(pos))
    if capped:
        dropped["category_cap"] = capped

    for pos, score in chosen:
        idx = kept[pos]
        item = kept_items[pos]
        source = candidates.sources[idx]
        if ctx.surface == "buy_again" and item.item_id in ctx.purchased and item.replenishable:
            main = int(common_pb2.REASON_BUY_AGAIN)
        elif source in _SOURCE_REASONS:
            main = source
        else:
            main = model_reason
        reasons = [main]
        if boosts[pos] > 0 and relevance[pos] > 0:
            reasons.append(int(common_pb2.REASON_BOOSTED))
        result.indices.append(idx)
        result.scores.append(score if math.isfinite(score) else 0.0)
        result.reasons.append(reasons)
    return result
