"""Customer features shared by the profile service and training: segment, price band,
RFM and category affinity.

This module is the one definition of those features. The profile service
(``services.profile.logic``) calls it on the state it keeps per customer; training
(``training.features``) calls it on the aggregates of a customer's events before a
cut-off, so a model sees at training time exactly what serving will send it. It imports
only the standard library (never ``services`` or ``training``).

Definitions (thresholds in :class:`FeatureThresholds`, defaults = the profile service's):

- **RFM**: recency = days since the last purchase, frequency = distinct orders,
  monetary = total paid; each scored 1..5 against fixed thresholds (recency: 5 within
  the first threshold, 1 past the last).
- **segment**: "new" before any order, then "lapsed" (no order for
  ``lapsed_days``), "at_risk" (``at_risk_days``), "loyal" (at least ``loyal_orders``
  orders) or "active".
- **price band**: mean unit price paid (monetary / units) against two fixed
  thresholds: "low", "mid" or "high"; "" before any purchase.
- **category affinity**: interest per category, each event weighted by its kind
  (:data:`INTEREST_WEIGHTS`) and halved every ``affinity_half_life_days``, as shares
  summing to 1 (the shares do not depend on when they are read).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Segment names, index 0 = unknown. Models index segments in this order.
SEGMENTS = ("", "new", "active", "loyal", "at_risk", "lapsed")
#: Price band names, index 0 = unknown.
PRICE_BANDS = ("", "low", "mid", "high")
#: How much one event says about interest in its item's category, by event kind
#: (the profile service's event types; ``rating`` is a MovieLens rating).
INTEREST_WEIGHTS: Mapping[str, float] = {
    "view": 1.0,
    "click": 1.0,
    "cart": 3.0,
    "purchase": 5.0,
    "rating": 1.0,
}
SECONDS_PER_DAY = 86_400.0
US_PER_DAY = 86_400 * 1_000_000


@dataclass(frozen=True)
class FeatureThresholds:
    """The knobs of the customer features (the profile service's settings)."""

    affinity_half_life_days: float = 30.0
    rfm_recency_days: tuple[float, ...] = (30.0, 90.0, 180.0, 365.0)
    rfm_frequency_orders: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
    rfm_monetary: tuple[float, ...] = (100.0, 500.0, 2000.0, 10000.0)
    price_band_low_below: float = 5.0
    price_band_high_from: float = 20.0
    segment_at_risk_days: float = 90.0
    segment_lapsed_days: float = 365.0
    segment_loyal_orders: int = 4


DEFAULT_THRESHOLDS = FeatureThresholds()


@dataclass(frozen=True)
class Rfm:
    """Recency (days, -1 = never bought), frequency (orders), monetary and 1..5 scores
    (0 when never bought)."""

    recency_days: float = -1.0
    frequency: int = 0
    monetary: float = 0.0
    recency_score: int = 0
    frequency_score: int = 0
    monetary_score: int = 0


def _score(value: float, thresholds: tuple[float, ...]) -> int:
    """1 + number of thresholds reached (1 .. len + 1)."""
    return 1 + sum(1 for th in thresholds if value >= th)


def rfm(
    orders: int,
    monetary: float,
    days_since_last_purchase: float | None,
    t: FeatureThresholds = DEFAULT_THRESHOLDS,
) -> Rfm:
    """RFM of a customer with ``orders`` orders worth ``monetary``; the last purchase
    ``days_since_last_purchase`` ago (None or ``orders == 0``: never bought)."""
    if orders <= 0 or days_since_last_purchase is None:
        return Rfm()
    recency = max(0.0, days_since_last_purchase)
    return Rfm(
        recency_days=recency,
        frequency=orders,
        monetary=monetary,
        recency_score=len(t.rfm_recency_days)
        + 1
        - sum(1 for th in t.rfm_recency_days if recency > th),
        frequency_score=_score(orders, t.rfm_frequency_orders),
        monetary_score=_score(monetary, t.rfm_monetary),
    )


def segment(
    orders: int, recency_days: float, override: str = "", t: FeatureThresholds = DEFAULT_THRESHOLDS
) -> str:
    """The retailer's ``override``, else new / lapsed / at_risk / loyal / active."""
    if override:
        return override
    if orders <= 0:
        return "new"
    if recency_days > t.segment_lapsed_days:
        return "lapsed"
    if recency_days > t.segment_at_risk_days:
        return "at_risk"
    if orders >= t.segment_loyal_orders:
        return "loyal"
    return "active"


def price_band(monetary: float, units: float, t: FeatureThresholds = DEFAULT_THRESHOLDS) -> str:
    """ "low" / "mid" / "high" by the mean unit price paid; "" before any purchase."""
    if units <= 0:
        return ""
    mean = monetary / units
    if mean < t.price_band_low_below:
        return "low"
    if mean >= t.price_band_high_from:
        return "high"
    return "mid"


def decayed_add(
    values: dict[str, float],
    ref_seconds: float,
    key: str,
    weight: float,
    at_seconds: float,
    half_life_seconds: float,
) -> float:
    """Add ``weight`` observed at ``at_seconds`` to ``values[key]``, values being kept
    relative to ``ref_seconds``; returns the new reference (the latest time seen),
    rescaling every value when it moves forward."""
    if at_seconds > ref_seconds:
        if values:
            factor = 2.0 ** (-(at_seconds - ref_seconds) / half_life_seconds)
            for k in values:
                values[k] *= factor
        ref_seconds = at_seconds
        values[key] = values.get(key, 0.0) + weight
    else:
        values[key] = values.get(key, 0.0) + weight * 2.0 ** (
            -(ref_seconds - at_seconds) / half_life_seconds
        )
    return ref_seconds


def affinity_shares(values: Mapping[str, float]) -> dict[str, float]:
    """Interest values as shares summing to 1 (positive ones only)."""
    total = math.fsum(values.values())
    if total <= 0:
        return {}
    return {k: v / total for k, v in values.items() if v > 0}


def category_affinity(
    events: Iterable[tuple[str, str, int]], t: FeatureThresholds = DEFAULT_THRESHOLDS
) -> dict[str, float]:
    """Shares from (event kind, category, time in microseconds) in log order: the same
    float operations as the profile service's incremental state, so equal results."""
    values: dict[str, float] = {}
    ref = 0
    half = t.affinity_half_life_days * US_PER_DAY
    for kind, cat, ts_us in events:
        w = INTEREST_WEIGHTS.get(kind, 0.0)
        if w and cat:
            ref = int(decayed_add(values, ref, cat, w, ts_us, half))
    return affinity_shares(values)


__all__ = [
    "DEFAULT_THRESHOLDS",
    "INTEREST_WEIGHTS",
    "PRICE_BANDS",
    "SEGMENTS",
    "US_PER_DAY",
    "FeatureThresholds",
    "Rfm",
    "affinity_shares",
    "category_affinity",
    "decayed_add",
    "price_band",
    "rfm",
    "segment",
]
