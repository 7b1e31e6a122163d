"""The offer policy's view of a customer and a request, and its feature vector.

:func:`offer_context` validates the profile and context of a SelectOffer call and reduces
them to an :class:`OfferContext`; :func:`features` turns that into the vector the
policy's logistic models use (:data:`FEATURES` names each entry). The simulator builds
:class:`OfferContext` directly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from mercato.v1 import common_pb2
from services.common.errors import InvalidArgument
from services.ranking.rules import SURFACE_NAMES, SURFACES

PRICE_BANDS = ("low", "mid", "high")
SEGMENTS = ("new", "active", "loyal", "at_risk", "lapsed")
# Cart value bands (upper edges); an empty cart has its own feature.
CART_BANDS = (15.0, 25.0, 40.0, 60.0, 100.0, 150.0)
CART_BAND_NAMES = (
    "cart_lt15",
    "cart_15_25",
    "cart_25_40",
    "cart_40_60",
    "cart_60_100",
    "cart_100_150",
    "cart_ge150",
)
# Fixed-amount incentives (5 off, free shipping) matter in proportion to the cart:
# feature min(REFERENCE / cart value, 1).
REFERENCE_AMOUNT = 10.0
IDLE_BANDS_MIN = (60.0, 24 * 60.0)  # upper edges: < 1 h, 1 h - 1 day, >= 1 day
CLOCK_SKEW_S = 300.0

FEATURES: tuple[str, ...] = (
    "bias",
    "known",
    "never_bought",
    "recency_score",
    "frequency_score",
    "monetary_score",
    *(f"band_{b}" for b in PRICE_BANDS),
    "cart_empty",
    *CART_BAND_NAMES,
    "log_cart_value",
    "inv_cart_value",
    "cart_items_ge2",
    *(f"surface_{s}" for s in SURFACES),
    *(f"segment_{s}" for s in SEGMENTS),
    "idle_lt1h",
    "idle_1h_1d",
    "idle_ge1d",
)
N_FEATURES = len(FEATURES)
_INDEX = {name: i for i, name in enumerate(FEATURES)}


@dataclass(frozen=True)
class OfferContext:
    """What the offer policy knows about one decision."""

    surface: str = "cart"
    segment: str = ""
    price_band: str = ""
    known: bool = True
    recency_score: int = 0
    frequency_score: int = 0
    monetary_score: int = 0
    cart_value: float = 0.0
    cart_items: int = 0
    idle_minutes: float = 0.0
    order_value: float = 40.0
    margin: float = 14.0


def features(ctx: OfferContext) -> np.ndarray:
    """The feature vector of ``ctx`` (float64, length :data:`N_FEATURES`)."""
    x = np.zeros(N_FEATURES)
    x[_INDEX["bias"]] = 1.0
    x[_INDEX["known"]] = float(ctx.known)
    x[_INDEX["never_bought"]] = float(ctx.frequency_score == 0)
    x[_INDEX["recency_score"]] = ctx.recency_score / 5.0
    x[_INDEX["frequency_score"]] = ctx.frequency_score / 5.0
    x[_INDEX["monetary_score"]] = ctx.monetary_score / 5.0
    if ctx.price_band:
        x[_INDEX[f"band_{ctx.price_band}"]] = 1.0
    v = ctx.cart_value
    if v <= 0:
        x[_INDEX["cart_empty"]] = 1.0
    else:
        band = sum(v >= edge for edge in CART_BANDS)
        x[_INDEX[CART_BAND_NAMES[band]]] = 1.0
        x[_INDEX["inv_cart_value"]] = min(REFERENCE_AMOUNT / v, 1.0)
    x[_INDEX["log_cart_value"]] = math.log1p(max(v, 0.0)) / math.log1p(500.0)
    x[_INDEX["cart_items_ge2"]] = float(ctx.cart_items >= 2)
    x[_INDEX[f"surface_{ctx.surface}"]] = 1.0
    if ctx.segment in SEGMENTS:
        x[_INDEX[f"segment_{ctx.segment}"]] = 1.0
    if ctx.cart_items > 0:
        if ctx.idle_minutes < IDLE_BANDS_MIN[0]:
            x[_INDEX["idle_lt1h"]] = 1.0
        elif ctx.idle_minutes < IDLE_BANDS_MIN[1]:
            x[_INDEX["idle_1h_1d"]] = 1.0
        else:
            x[_INDEX["idle_ge1d"]] = 1.0
    return x


def _finite_nonneg(value: float, what: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument(f"{what} must be a finite number >= 0, got {value}")
    return float(value)


def offer_context(
    profile: common_pb2.Profile,
    context: common_pb2.Context,
    margin_rate: float,
    default_order_value: float,
    now: float | None = None,
) -> OfferContext:
    """Validate a SelectOffer request's profile and context and reduce them.

    Malformed input (unknown surface or price band, RFM scores outside 0..5, negative or
    non-finite money, a cart changed in the future, an unparsable ``cart_margin``)
    raises :class:`InvalidArgument` naming the field.
    """
    if context.surface not in SURFACE_NAMES:
        raise InvalidArgument(f"context.surface has an unknown value {context.surface}")
    surface = SURFACE_NAMES[context.surface]
    if profile.price_band and profile.price_band not in PRICE_BANDS:
        raise InvalidArgument(
            f"profile.price_band must be one of {list(PRICE_BANDS)} or empty, "
            f"got {profile.price_band!r}"
        )
    rfm = profile.rfm
    for name in ("recency_score", "frequency_score", "monetary_score"):
        score = getattr(rfm, name)
        if not 0 <= score <= 5:
            raise InvalidArgument(f"profile.rfm.{name} must be between 0 and 5, got {score}")
    monetary = _finite_nonneg(rfm.monetary, "profile.rfm.monetary")
    if rfm.frequency < 0:
        raise InvalidArgument(f"profile.rfm.frequency must be >= 0, got {rfm.frequency}")

    cart = profile.cart
    items = 0
    line_value = 0.0
    for n, line in enumerate(cart.lines):
        if line.quantity < 0:
            raise InvalidArgument(f"profile.cart.lines[{n}].quantity must be >= 0")
        price = _finite_nonneg(line.price, f"profile.cart.lines[{n}].price")
        items += line.quantity
        line_value += line.quantity * price
    cart_value = _finite_nonneg(cart.value, "profile.cart.value") or line_value
    items = max(items, len(context.cart_item_ids))

    request_time = now if now is not None else time.time()
    if context.HasField("timestamp"):
        request_time = context.timestamp.seconds + context.timestamp.nanos / 1e9
    idle = 0.0
    if items and cart.HasField("updated_at"):
        changed = cart.updated_at.seconds + cart.updated_at.nanos / 1e9
        if changed > request_time + CLOCK_SKEW_S:
            raise InvalidArgument("profile.cart.updated_at is after the request time")
        idle = max(0.0, request_time - changed) / 60.0

    if cart_value > 0:
        order_value = cart_value
    elif rfm.frequency > 0 and monetary > 0:
        order_value = monetary / rfm.frequency
    else:
        order_value = default_order_value
    margin = order_value * margin_rate
    raw_margin = context.attributes.get("cart_margin", "")
    if raw_margin:
        try:
            margin = float(raw_margin)
        except ValueError:
            raise InvalidArgument(
                f"context.attributes['cart_margin'] must be a number, got {raw_margin!r}"
            ) from None
        if not math.isfinite(margin):
            raise InvalidArgument("context.attributes['cart_margin'] must be finite")

    return OfferContext(
        surface=surface,
        segment=profile.segment,
        price_band=profile.price_band,
        known=profile.known,
        recency_score=rfm.recency_score,
        frequency_score=rfm.frequency_score,
        monetary_score=rfm.monetary_score,
        cart_value=cart_value,
        cart_items=items,
        idle_minutes=idle,
        order_value=order_value,
        margin=margin,
    )
