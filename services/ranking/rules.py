"""Business rules of the ranking service: pure functions over typed inputs.

The order of work in :func:`apply_rules`:

1. **Filters** drop candidates, counted per rule name in ``dropped``. The first rule that
   matches counts: ``out_of_stock`` (stock 0, always: an item with no stock is never
   returned), ``unknown_stock`` (no catalog details and the surface drops unknown stock),
   ``anchor`` (the item on screen), ``in_cart`` and ``purchased`` (bought before; by
   default only non-replenishable items are dropped, so a buy-again list keeps the
   replenishable ones).
2. **Relevance**: the scorer's scores of the kept candidates, min-max normalised to
   [0, 1] within the request (scale free: retrieval inner products and ranker
   probabilities are treated the same; all equal gives 1).
3. **Bounded boosts**: ``relevance * (1 + b)`` with ``b = min(sum of matching boosts,
   max_boost)``. The multiplier is at most ``1 + max_boost`` (default 1.25), so a boost
   can only lift an item over items whose relevance is within that factor of its own.
4. **Selection** of at most ``k`` items, greedily: with diversity ``mmr``, the next item
   maximises ``w * boosted_relevance - (1 - w) * max similarity to the items already
   chosen`` (cosine of item vectors where an :class:`ItemVectorLookup` gives both items'
   vectors, else 1 for the same non-empty category and 0 otherwise); with ``none``, the
   best boosted relevance first. An item whose category already holds ``category_cap``
   items is passed over and counted as ``category_cap`` (uncategorised items are not
   capped). The score returned is the selection value, non-increasing down the list.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mercato.v1 import common_pb2
from services.ranking.table import CandidateArrays

SURFACE_NAMES: dict[int, str] = {
    common_pb2.SURFACE_UNSPECIFIED: "home",
    common_pb2.SURFACE_HOME: "home",
    common_pb2.SURFACE_PRODUCT: "product",
    common_pb2.SURFACE_CART: "cart",
    common_pb2.SURFACE_CHECKOUT: "checkout",
    common_pb2.SURFACE_BUY_AGAIN: "buy_again",
    common_pb2.SURFACE_EMAIL: "email",
}
SURFACES = ("home", "product", "cart", "checkout", "buy_again", "email")

# Candidate sources that name the main reason of an item themselves.
_SOURCE_REASONS: set[int] = {
    common_pb2.REASON_COMPLEMENT,
    common_pb2.REASON_TRENDING,
    common_pb2.REASON_FALLBACK,
    common_pb2.REASON_SIMILAR,
    common_pb2.REASON_UPSELL,
    common_pb2.REASON_BUY_AGAIN,
    common_pb2.REASON_NEW_ITEM,
}


# --------------------------------------------------------------------------- config


class PurchasedPolicy(StrEnum):
    """What to do with items the customer bought before."""

    DROP_NON_REPLENISHABLE = "drop_non_replenishable"
    DROP_ALL = "drop_all"
    KEEP = "keep"


class DiversityMethod(StrEnum):
    """How the list is diversified."""

    MMR = "mmr"  # item vectors when given, else categories
    NONE = "none"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiversityRule(_Frozen):
    """Maximal marginal relevance over item similarity."""

    method: DiversityMethod = DiversityMethod.MMR
    relevance_weight: float = Field(
        0.8, ge=0.0, le=1.0, description="w in w * relevance - (1 - w) * similarity."
    )


class BoostRule(_Frozen):
    """Bounded boosts for promoted and high-margin items."""

    promoted: float = Field(0.10, ge=0.0, description="Boost of a promoted item.")
    high_margin: float = Field(0.10, ge=0.0, description="Boost of a high-margin item.")
    high_margin_rate: float = Field(
        0.40, ge=0.0, le=1.0, description="margin / price at or above which an item is high-margin."
    )
    max_boost: float = Field(
        0.25, ge=0.0, le=1.0, description="Cap on the summed boost: multiplier <= 1 + max_boost."
    )


class SurfaceRules(_Frozen):
    """The business rules of one surface."""

    drop_unknown_stock: bool = Field(
        False, description="Drop candidates without catalog details (stock unknown)."
    )
    purchased: PurchasedPolicy = PurchasedPolicy.DROP_NON_REPLENISHABLE
    drop_in_cart: bool = True
    drop_anchor: bool = True
    category_cap: int = Field(3, ge=0, description="Most items per category (0 = no cap).")
    diversity: DiversityRule = DiversityRule()
    boosts: BoostRule = BoostRule()


# Built-in rules: the defaults plus what differs per surface.
BUILTIN_RULES: dict[str, Any] = {
    "defaults": {},
    "surfaces": {
        "product": {"category_cap": 4},
        "cart": {"category_cap": 2},
        "checkout": {"category_cap": 2, "diversity": {"relevance_weight": 0.7}},
        "buy_again": {"category_cap": 0, "diversity": {"method": "none"}},
        "email": {"category_cap": 2},
    },
}


class RulesConfigError(ValueError):
    """The rules config file is malformed."""


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class RulesConfig:
    """Rules per surface name."""

    surfaces: Mapping[str, SurfaceRules]

    def for_surface(self, surface: int | str) -> SurfaceRules:
        """Rules of a surface (enum value or name); unspecified means home."""
        name = SURFACE_NAMES.get(surface, "home") if isinstance(surface, int) else surface
        return self.surfaces[name]

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None = None) -> RulesConfig:
        """Layer ``raw`` over the built-in rules: built-in defaults < built-in surface <
        file defaults < file surface. Unknown keys and surfaces are errors."""
        raw = dict(raw or {})
        unknown = set(raw) - {"defaults", "surfaces"}
        if unknown:
            raise RulesConfigError(f"unknown top-level keys {sorted(unknown)}")
        file_defaults = raw.get("defaults") or {}
        file_surfaces = raw.get("surfaces") or {}
        if not isinstance(file_defaults, Mapping) or not isinstance(file_surfaces, Mapping):
            raise RulesConfigError("'defaults' and 'surfaces' must be mappings")
        bad = set(file_surfaces) - set(SURFACES)
        if bad:
            raise RulesConfigError(f"unknown surfaces {sorted(bad)}; known: {list(SURFACES)}")
        surfaces: dict[str, SurfaceRules] = {}
        for name in SURFACES:
            merged = _deep_merge(BUILTIN_RULES["defaults"], BUILTIN_RULES["surfaces"].get(name, {}))
            merged = _deep_merge(merged, file_defaults)
            merged = _deep_merge(merged, file_surfaces.get(name) or {})
            try:
                surfaces[name] = SurfaceRules.model_validate(merged)
            except ValidationError as exc:
                raise RulesConfigError(f"surface {name!r}: {exc}") from exc
        return cls(surfaces)

    @classmethod
    def load(cls, path: str | Path | None) -> RulesConfig:
        """Read a YAML or JSON rules file; no path gives the built-in rules."""
        if not path:
            return cls.from_mapping({})
        text = Path(path).read_text()
        try:
            raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise RulesConfigError(f"{path}: {exc}") from exc
        if raw is not None and not isinstance(raw, Mapping):
            raise RulesConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_mapping(raw)


# --------------------------------------------------------------------------- inputs


class ItemInfo(NamedTuple):
    """What the rules know about a candidate. ``stock`` None means unknown.

    A NamedTuple: a Rank call builds one per candidate, and tuples build fastest."""

    item_id: str
    category: str = ""
    price: float = 0.0
    stock: int | None = None
    margin: float = 0.0
    replenishable: bool = False
    promoted: bool = False

    @property
    def known(self) -> bool:
        return self.stock is not None

    @classmethod
    def from_proto(cls, item: common_pb2.Item) -> ItemInfo:
        return cls(
            item.item_id,
            item.category,
            item.price,
            int(item.stock),
            item.margin,
            item.replenishable,
            item.promoted,
        )


@dataclass(frozen=True)
class CandidateSet:
    """Unique candidates with their retrieval scores and sources (``Reason`` values)."""

    ids: list[str]
    scores: np.ndarray
    sources: list[int]
    # Per-source scores of merged candidates (Candidate.sources / source_scores):
    # source -> float64 [n], NaN where that source gave none; and, for item-to-item, the
    # customer's item that points to the candidate most ("" where none).
    source_scores: dict[int, np.ndarray] = field(default_factory=dict)
    source_anchors: dict[int, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def source_score(self, source: int) -> np.ndarray:
        """Scores ``source`` gave the candidates (NaN where none)."""
        got = self.source_scores.get(source)
        return got if got is not None else np.full(len(self.ids), np.nan)


@dataclass(frozen=True)
class RankContext:
    """The parts of profile and context the rules use."""

    surface: str = "home"
    purchased: frozenset[str] = frozenset()
    in_cart: frozenset[str] = frozenset()
    anchor: str = ""


class ItemVectorLookup(Protocol):
    """Item vectors for diversity: ``(vectors [n, d], found [n] bool)`` for ``item_ids``.

    Rows where ``found`` is False are ignored (those items fall back to category
    similarity)."""

    def __call__(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class RankedResult:
    """Output of :func:`apply_rules`: chosen indices into the candidate set, best first."""

    indices: list[int]
    scores: list[float]
    reasons: list[list[int]]
    dropped: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- rules


def drop_reason(item: ItemInfo, ctx: RankContext, rules: SurfaceRules) -> str | None:
    """Name of the first filter that drops ``item``, or None to keep it."""
    if item.stock is not None and item.stock <= 0:
        return "out_of_stock"
    if item.stock is None and rules.drop_unknown_stock:
        return "unknown_stock"
    if rules.drop_anchor and ctx.anchor and item.item_id == ctx.anchor:
        return "anchor"
    if rules.drop_in_cart and item.item_id in ctx.in_cart:
        return "in_cart"
    if item.item_id in ctx.purchased:
        if rules.purchased == PurchasedPolicy.DROP_ALL:
            return "purchased"
        if rules.purchased == PurchasedPolicy.DROP_NON_REPLENISHABLE and not item.replenishable:
            return "purchased"
    return None


def normalize_relevance(scores: np.ndarray) -> np.ndarray:
    """Min-max scores to [0, 1]; all equal (or one) gives ones."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    lo, hi = float(scores.min()), float(scores.max())
    if not hi > lo:
        return np.ones_like(scores)
    return (scores - lo) / (hi - lo)


def boost_of(item: ItemInfo, rules: BoostRule) -> float:
    """The bounded boost ``b`` of an item: ``0 <= b <= rules.max_boost``."""
    total = 0.0
    if item.promoted:
        total += rules.promoted
    if item.price > 0 and item.margin / item.price >= rules.high_margin_rate:
        total += rules.high_margin
    return min(total, rules.max_boost)


def _similarity_fn(ids: Sequence[str], cat: np.ndarray, vectors: ItemVectorLookup | None) -> Any:
    """Return sim(j) -> similarity of every kept item to kept item j, in [0, 1]
    (``cat``: category codes, -1 = uncategorised)."""
    unit: np.ndarray | None = None
    found = np.zeros(len(ids), dtype=bool)
    if vectors is not None and len(ids):
        mat, found_raw = vectors(ids)
        mat = np.asarray(mat, dtype=np.float32)
        found = np.asarray(found_raw, dtype=bool).copy()
        norms = np.linalg.norm(mat, axis=1) if mat.size else np.zeros(len(ids))
        found &= norms > 0
        unit = np.zeros_like(mat)
        unit[found] = mat[found] / norms[found, None]
    has_cat = cat >= 0

    def sim(j: int) -> np.ndarray:
        out = ((cat == cat[j]) & has_cat).astype(np.float64)
        if unit is not None and found[j]:
            cos = np.clip(unit @ unit[j], 0.0, 1.0).astype(np.float64)
            out = np.where(found, cos, out)
        return out

    return sim


_DROP_NAMES = ("", "out_of_stock", "unknown_stock", "anchor", "in_cart", "purchased")


def _drop_codes(
    ids: Sequence[str], arr: CandidateArrays, ctx: RankContext, rules: SurfaceRules
) -> np.ndarray:
    """Per candidate: 0 = kept, else the index in ``_DROP_NAMES`` of the first filter
    that drops it (filters in :func:`drop_reason`'s order)."""
    n = len(ids)
    code = np.zeros(n, dtype=np.int8)
    code[arr.known & (arr.stock <= 0)] = 1
    if rules.drop_unknown_stock:
        code[(code == 0) & ~arr.known] = 2
    policy = rules.purchased
    wanted = (
        (rules.drop_anchor and bool(ctx.anchor))
        or (rules.drop_in_cart and bool(ctx.in_cart))
        or (policy != PurchasedPolicy.KEEP and bool(ctx.purchased))
    )
    if not wanted:
        return code
    index = {item_id: j for j, item_id in enumerate(ids)}

    def mark(item_ids: frozenset[str] | tuple[str, ...], value: int, repl_ok: bool) -> None:
        for item_id in item_ids:
            j = index.get(item_id)
            if j is not None and code[j] == 0 and not (repl_ok and arr.replenishable[j]):
                code[j] = value

    if rules.drop_anchor and ctx.anchor:
        mark((ctx.anchor,), 3, False)
    if rules.drop_in_cart:
        mark(ctx.in_cart, 4, False)
    if policy != PurchasedPolicy.KEEP:
        mark(ctx.purchased, 5, policy == PurchasedPolicy.DROP_NON_REPLENISHABLE)
    return code


def boosts_of(arr: CandidateArrays, rows: np.ndarray, rules: BoostRule) -> np.ndarray:
    """:func:`boost_of` of the candidates at ``rows``, as one array."""
    price = arr.price[rows]
    margin = arr.margin[rows]
    high = price > 0
    with np.errstate(over="ignore"):
        rate = np.divide(margin, price, out=np.zeros_like(price), where=high)
    high &= rate >= rules.high_margin_rate
    total = np.zeros(len(rows)) + np.where(arr.promoted[rows], rules.promoted, 0.0)
    total = total + np.where(high, rules.high_margin, 0.0)
    return np.minimum(total, rules.max_boost)


def _cap_rank(cat: np.ndarray) -> np.ndarray:
    """For items in selection order: how many items of the same category come before."""
    m = len(cat)
    pos = np.arange(m)
    srt = np.lexsort((pos, cat))
    c = cat[srt]
    start = np.ones(m, dtype=bool)
    start[1:] = c[1:] != c[:-1]
    first = np.maximum.accumulate(np.where(start, pos, 0))
    out = np.empty(m, dtype=np.int64)
    out[srt] = pos - first
    return out


def _select_by_value(
    value: np.ndarray, cat: np.ndarray, cap: int, k: int
) -> tuple[list[tuple[int, float]], int]:
    """Diversity ``none``: best value first, a capped category masked as a whole."""
    order = np.argsort(-value, kind="stable")
    if cap > 0:
        cat_o = cat[order]
        over = (cat_o >= 0) & (_cap_rank(cat_o) >= cap)
    else:
        over = np.zeros(len(order), dtype=bool)
    ok = np.flatnonzero(~over)
    if len(ok) >= k:
        end = int(ok[k - 1])
        capped = int(over[:end].sum())
        ok = ok[:k]
    else:
        capped = int(over.sum())
    return [(int(order[p]), float(value[order[p]])) for p in ok], capped


def _select_mmr(
    value: np.ndarray, cat: np.ndarray, cap: int, k: int, w: float, sim: Any
) -> tuple[list[tuple[int, float]], int]:
    """Greedy MMR. A category reaching its cap is masked at once; its items that the
    one-at-a-time selection would have passed over before each pick are counted."""
    m = len(value)
    idx = np.arange(m)
    max_sim = np.zeros(m)
    available = np.ones(m, dtype=bool)
    blocked = np.zeros(m, dtype=bool)  # items of categories at their cap
    counts: dict[int, int] = {}
    chosen: list[tuple[int, float]] = []
    capped = 0
    while len(chosen) < k:
        mmr = w * value - (1.0 - w) * max_sim
        eligible = available & ~blocked
        if not eligible.any():
            capped += int((available & blocked).sum())
            break
        j = int(np.argmax(np.where(eligible, mmr, -np.inf)))
        mj = mmr[j]
        if blocked.any():
            passed = available & blocked & ((mmr > mj) | ((mmr == mj) & (idx < j)))
            capped += int(passed.sum())
            available &= ~passed
        available[j] = False
        chosen.append((j, float(mj)))
        c = int(cat[j])
        if cap > 0 and c >= 0:
            counts[c] = counts.get(c, 0) + 1
            if counts[c] >= cap:
                blocked |= cat == c
        max_sim = np.maximum(max_sim, sim(j))
    return chosen, capped


def _select_mmr_by_category(
    value: np.ndarray, cat: np.ndarray, cap: int, k: int, w: float
) -> tuple[list[tuple[int, float]], int]:
    """:func:`_select_mmr` when the similarity is category equality (no item vectors):
    the same picks, scores and capped count, without a pass over every candidate per
    pick. An item's MMR is ``w * v`` until its category has a pick, ``w * v - (1 - w)``
    after (uncategorised items: always the first), so within a category the order is
    fixed in each of the two states: a heap of each category's best available item
    gives the argmax (ties: the lower index). The picks' (MMR, -index) only decrease,
    so an unpicked item of a capped category was passed over (counted) iff it beats the
    last pick made after its category was capped, or the candidates ran out."""
    m = len(value)
    a = w * value - (1.0 - w) * np.zeros(m)  # as _select_mmr computes it, to the bit
    b = w * value - (1.0 - w) * np.ones(m)
    idx = np.arange(m)
    groups: dict[int, tuple[list[int], list[int]]] = {}
    oa, ob = np.lexsort((idx, -a, cat)), np.lexsort((idx, -b, cat))
    # One list per order, sliced per category (both orders sort by category first).
    cuts = [0, *(np.flatnonzero(np.diff(cat[oa])) + 1).tolist(), m]
    oa_l, ob_l, cat_l = oa.tolist(), ob.tolist(), cat[oa].tolist()
    for lo, hi in pairwise(cuts):
        groups[cat_l[lo]] = (oa_l[lo:hi], ob_l[lo:hi])
    a_l, b_l = a.tolist(), b.tolist()
    picked = np.zeros(m, dtype=bool)
    state: dict[int, tuple[int, int]] = {c: (0, 0) for c in groups}  # (order, position)
    heap = [(-a_l[g[0][0]], g[0][0], c) for c, g in groups.items()]
    heapq.heapify(heap)
    counts: dict[int, int] = {}
    capped_after: dict[int, int] = {}  # category -> picks made when it reached its cap
    chosen: list[tuple[int, float]] = []
    exhausted = False
    while len(chosen) < k:
        if not heap:
            exhausted = True
            break
        neg, j, c = heapq.heappop(heap)
        picked[j] = True
        chosen.append((j, -neg))
        if c >= 0 and cap > 0:
            counts[c] = counts.get(c, 0) + 1
            if counts[c] >= cap:
                capped_after[c] = len(chosen)
                continue
        which, at = state[c]
        if c >= 0 and which == 0:
            which, at = 1, 0  # the category has a pick: every item of it drops
        order = groups[c][which]
        while at < len(order) and picked[order[at]]:
            at += 1
        state[c] = (which, at)
        if at < len(order):
            nxt = order[at]
            heapq.heappush(heap, (-(b_l[nxt] if which else a_l[nxt]), nxt, c))
    capped = 0
    last_j, last_m = chosen[-1] if chosen else (0, 0.0)
    for c, after in capped_after.items():
        rest = np.asarray(groups[c][1], dtype=np.int64)
        rest = rest[~picked[rest]]
        if exhausted:
            capped += len(rest)
        elif after < len(chosen):
            rb = b[rest]
            capped += int(((rb > last_m) | ((rb == last_m) & (rest < last_j))).sum())
    return chosen, capped


def apply_rules(
    candidates: CandidateSet,
    model_scores: np.ndarray,
    items: Mapping[str, ItemInfo] | CandidateArrays,
    ctx: RankContext,
    rules: SurfaceRules,
    k: int,
    vectors: ItemVectorLookup | None = None,
    model_reason: int = int(common_pb2.REASON_MODEL),
) -> RankedResult:
    """Filter, boost, diversify and cap ``candidates``; return the top ``k``.

    ``items`` are the candidates' attributes as :class:`CandidateArrays` (row j =
    candidate j), or details by id (missing ids: unknown stock, no category, no boost).
    Every rule runs over arrays; only the chosen ``k`` are visited one by one.
    """
    ids = candidates.ids
    arr = items if isinstance(items, CandidateArrays) else CandidateArrays.from_infos(ids, items)
    code = _drop_codes(ids, arr, ctx, rules)
    counted = np.bincount(code, minlength=len(_DROP_NAMES))
    dropped = {_DROP_NAMES[c]: int(counted[c]) for c in range(1, len(_DROP_NAMES)) if counted[c]}
    result = RankedResult([], [], [], dropped)
    kept = np.flatnonzero(code == 0)
    if not len(kept) or k <= 0:
        return result

    relevance = normalize_relevance(np.asarray(model_scores, dtype=np.float64)[kept])
    boosts = boosts_of(arr, kept, rules.boosts)
    value = relevance * (1.0 + boosts)
    cat = arr.category[kept]
    cap = rules.category_cap
    if rules.diversity.method == DiversityMethod.NONE:
        chosen, capped = _select_by_value(value, cat, cap, k)
    else:
        w = rules.diversity.relevance_weight
        if vectors is None and np.isfinite(value).all():
            chosen, capped = _select_mmr_by_category(value, cat, cap, k, w)
        else:
            kept_ids = [ids[i] for i in kept] if vectors is not None else []
            sim = _similarity_fn(kept_ids, cat, vectors)
            chosen, capped = _select_mmr(value, cat, cap, k, w, sim)
    if capped:
        dropped["category_cap"] = capped

    buy_again = ctx.surface == "buy_again"
    for pos, score in chosen:
        idx = int(kept[pos])
        source = candidates.sources[idx]
        if buy_again and arr.replenishable[idx] and ids[idx] in ctx.purchased:
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
