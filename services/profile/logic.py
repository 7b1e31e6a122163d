"""Pure functions of the profile service: the event log record, the derived profile state,
how one event changes it, and how a state becomes a ``Profile`` message.

Both store backends call :func:`apply_event` on every newly logged event, in log order,
and persist the resulting :class:`ProfileState`; :func:`recompute_profile` replays a
customer's log through the same function. Because the arithmetic is the same sequence of
float operations, an incrementally maintained state equals the recomputation exactly.

Times are integer microseconds since the Unix epoch (UTC) throughout.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from mercato import features
from mercato.v1 import common_pb2

ET = common_pb2.EventType
US_PER_S = 1_000_000
US_PER_DAY = 86_400 * US_PER_S

EVENT_TYPE_NAMES: dict[int, str] = {
    ET.EVENT_TYPE_VIEW: "view",
    ET.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    ET.EVENT_TYPE_REMOVE_FROM_CART: "remove_from_cart",
    ET.EVENT_TYPE_PURCHASE: "purchase",
    ET.EVENT_TYPE_OFFER_SHOWN: "offer_shown",
    ET.EVENT_TYPE_OFFER_REDEEMED: "offer_redeemed",
    ET.EVENT_TYPE_CLICK: "click",
    ET.EVENT_TYPE_EXPOSURE: "exposure",
}
EVENT_TYPES_BY_NAME = {v: k for k, v in EVENT_TYPE_NAMES.items()}
SURFACE_NAMES: dict[int, str] = {
    v: k.removeprefix("SURFACE_").lower()
    for k, v in common_pb2.Surface.items()
    if v != common_pb2.SURFACE_UNSPECIFIED
}
SURFACES_BY_NAME = {v: k for k, v in SURFACE_NAMES.items()}

# Events that name an item (item_id required).
ITEM_EVENTS = frozenset(
    {
        ET.EVENT_TYPE_VIEW,
        ET.EVENT_TYPE_ADD_TO_CART,
        ET.EVENT_TYPE_REMOVE_FROM_CART,
        ET.EVENT_TYPE_PURCHASE,
        ET.EVENT_TYPE_CLICK,
    }
)
# Events that only record what Mercato showed (experiment exposures): kept in the log for
# reports (``mercato report ab``) but they change no derived profile: a customer who was
# only shown recommendations stays unknown, and last_seen is the customer's own activity.
LOG_ONLY_EVENTS = frozenset({ET.EVENT_TYPE_EXPOSURE})
# Events that name an offer (offer_id required).
OFFER_EVENTS = frozenset({ET.EVENT_TYPE_OFFER_SHOWN, ET.EVENT_TYPE_OFFER_REDEEMED})
# How much one event says about interest in its item's category / its item's popularity.
# The weights are the shared feature module's (mercato.features), so training computes
# the same category affinity.
INTEREST_WEIGHTS: dict[int, float] = {
    ET.EVENT_TYPE_VIEW: features.INTEREST_WEIGHTS["view"],
    ET.EVENT_TYPE_CLICK: features.INTEREST_WEIGHTS["click"],
    ET.EVENT_TYPE_ADD_TO_CART: features.INTEREST_WEIGHTS["cart"],
    ET.EVENT_TYPE_PURCHASE: features.INTEREST_WEIGHTS["purchase"],
}
# Decayed scores are kept relative to an anchor time; past this many half-lives the
# anchor moves forward (all scores are rescaled) so that floats never overflow.
REBASE_HALF_LIVES = 512.0


def ts_to_us(ts: Timestamp) -> int:
    """A protobuf Timestamp as microseconds since the epoch."""
    return int(ts.seconds) * US_PER_S + int(ts.nanos) // 1000


def us_to_ts(us: int) -> Timestamp:
    """Microseconds since the epoch as a protobuf Timestamp."""
    seconds, micros = divmod(int(us), US_PER_S)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


@dataclass(frozen=True)
class LogEvent:
    """One event as the log stores it: validated, normalised and enriched.

    Normalised: quantity 0 of add-to-cart and purchase is stored as 1, price 0 of a
    purchase or add-to-cart as the catalog price at ingest time; ``category`` is the
    item's catalog category at ingest time. So the log alone determines every derived
    profile (a later catalog change does not rewrite history).
    """

    event_id: str
    customer_id: str
    type: int
    ts_us: int
    item_id: str = ""
    quantity: int = 0
    price: float = 0.0
    category: str = ""
    session_id: str = ""
    order_id: str = ""
    offer_id: str = ""
    surface: int = 0
    request_id: str = ""
    experiment: str = ""
    variant: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    ingested_us: int = 0

    _KEYS = (
        ("i", "event_id"),
        ("c", "customer_id"),
        ("t", "type"),
        ("ts", "ts_us"),
        ("it", "item_id"),
        ("q", "quantity"),
        ("p", "price"),
        ("cat", "category"),
        ("s", "session_id"),
        ("o", "order_id"),
        ("of", "offer_id"),
        ("sf", "surface"),
        ("r", "request_id"),
        ("x", "experiment"),
        ("v", "variant"),
        ("a", "attributes"),
        ("in", "ingested_us"),
    )

    def to_json(self) -> str:
        """Compact JSON (empty fields left out) for the log."""
        out: dict[str, Any] = {}
        for short, name in self._KEYS:
            value = getattr(self, name)
            if value or short in ("i", "c", "t", "ts"):
                out[short] = dict(value) if name == "attributes" else value
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> LogEvent:
        raw = json.loads(text)
        return cls(**{name: raw[short] for short, name in cls._KEYS if short in raw})

    def to_proto(self) -> common_pb2.Event:
        """The event as an API message (what an export row loads back as)."""
        return common_pb2.Event(
            event_id=self.event_id,
            customer_id=self.customer_id,
            type=self.type,  # type: ignore[arg-type]
            item_id=self.item_id,
            quantity=self.quantity,
            price=self.price,
            timestamp=us_to_ts(self.ts_us),
            session_id=self.session_id,
            order_id=self.order_id,
            offer_id=self.offer_id,
            surface=self.surface,  # type: ignore[arg-type]
            request_id=self.request_id,
            experiment=self.experiment,
            variant=self.variant,
            attributes=dict(self.attributes),
        )


_FEATURE_DEFAULTS = features.FeatureThresholds()


@dataclass(frozen=True)
class ProfileConfig:
    """The knobs of the derivation (from :class:`ProfileSettings`)."""

    recent_items_limit: int = 50
    purchases_limit: int = 200
    # The feature knobs default to the shared definitions' own defaults (one source).
    affinity_half_life_days: float = _FEATURE_DEFAULTS.affinity_half_life_days
    trending_half_life_hours: float = 24.0
    rfm_recency_days: tuple[float, ...] = _FEATURE_DEFAULTS.rfm_recency_days
    rfm_frequency_orders: tuple[float, ...] = _FEATURE_DEFAULTS.rfm_frequency_orders
    rfm_monetary: tuple[float, ...] = _FEATURE_DEFAULTS.rfm_monetary
    price_band_low_below: float = _FEATURE_DEFAULTS.price_band_low_below
    price_band_high_from: float = _FEATURE_DEFAULTS.price_band_high_from
    segment_at_risk_days: float = _FEATURE_DEFAULTS.segment_at_risk_days
    segment_lapsed_days: float = _FEATURE_DEFAULTS.segment_lapsed_days
    segment_loyal_orders: int = _FEATURE_DEFAULTS.segment_loyal_orders

    @functools.cached_property
    def thresholds(self) -> features.FeatureThresholds:
        """The shared feature definitions' knobs (segment, price band, RFM, affinity)."""
        return features.FeatureThresholds(
            affinity_half_life_days=self.affinity_half_life_days,
            rfm_recency_days=self.rfm_recency_days,
            rfm_frequency_orders=self.rfm_frequency_orders,
            rfm_monetary=self.rfm_monetary,
            price_band_low_below=self.price_band_low_below,
            price_band_high_from=self.price_band_high_from,
            segment_at_risk_days=self.segment_at_risk_days,
            segment_lapsed_days=self.segment_lapsed_days,
            segment_loyal_orders=self.segment_loyal_orders,
        )

    @property
    def affinity_half_life_us(self) -> float:
        return self.affinity_half_life_days * US_PER_DAY

    @property
    def trending_half_life_us(self) -> float:
        return self.trending_half_life_hours * 3600 * US_PER_S


@dataclass
class ProfileState:
    """What the store keeps per customer, derived from the customer's events only."""

    first_seen_us: int = 0
    last_seen_us: int = 0
    events: int = 0
    # [item_id, event type, ts_us], newest first, one entry per item, bounded.
    recent: list[list[Any]] = field(default_factory=list)
    # item_id -> [purchase events, units, last purchase ts_us]
    purchases: dict[str, list[int]] = field(default_factory=dict)
    orders: set[str] = field(default_factory=set)
    monetary: float = 0.0
    units: int = 0
    last_purchase_us: int = 0
    # item_id -> [quantity, unit price, updated ts_us]
    cart: dict[str, list[Any]] = field(default_factory=dict)
    cart_updated_us: int = 0
    # category -> interest, decayed to ``affinity_ref_us``
    affinity: dict[str, float] = field(default_factory=dict)
    affinity_ref_us: int = 0

    def to_json(self) -> str:
        data = {
            "f": self.first_seen_us,
            "l": self.last_seen_us,
            "n": self.events,
            "r": self.recent,
            "p": self.purchases,
            "o": sorted(self.orders),
            "m": self.monetary,
            "u": self.units,
            "lp": self.last_purchase_us,
            "c": self.cart,
            "cu": self.cart_updated_us,
            "a": self.affinity,
            "ar": self.affinity_ref_us,
        }
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> ProfileState:
        d = json.loads(text)
        return cls(
            first_seen_us=d["f"],
            last_seen_us=d["l"],
            events=d["n"],
            recent=d["r"],
            purchases=d["p"],
            orders=set(d["o"]),
            monetary=d["m"],
            units=d["u"],
            last_purchase_us=d["lp"],
            cart=d["c"],
            cart_updated_us=d["cu"],
            affinity=d["a"],
            affinity_ref_us=d["ar"],
        )

    def abandon_key(self) -> int | None:
        """Cart idle-since time when the cart counts for ListAbandonedCarts, else None:
        a non-empty cart with no purchase since it last changed."""
        if self.cart and self.last_purchase_us < self.cart_updated_us:
            return self.cart_updated_us
        return None


def _touch_recent(state: ProfileState, ev: LogEvent, limit: int) -> None:
    recent = [r for r in state.recent if r[0] != ev.item_id]
    previous = next((r for r in state.recent if r[0] == ev.item_id), None)
    if previous is not None and previous[2] > ev.ts_us:
        return  # a newer interaction with the item is already there
    entry = [ev.item_id, ev.type, ev.ts_us]
    # Insert after every entry at least as new (ties: the later-logged event first).
    pos = 0
    while pos < len(recent) and recent[pos][2] > ev.ts_us:
        pos += 1
    recent.insert(pos, entry)
    state.recent = recent[:limit]


def _decayed_add(
    values: dict[str, float], ref_us: int, key: str, weight: float, ts_us: int, half_life_us: float
) -> int:
    """:func:`mercato.features.decayed_add` in microseconds."""
    return int(features.decayed_add(values, ref_us, key, weight, ts_us, half_life_us))


def apply_event(state: ProfileState, ev: LogEvent, cfg: ProfileConfig) -> None:
    """Update ``state`` in place with one newly logged event of its customer."""
    t = ev.ts_us
    state.events += 1
    state.first_seen_us = t if not state.first_seen_us else min(state.first_seen_us, t)
    state.last_seen_us = max(state.last_seen_us, t)
    kind = ev.type
    if kind in ITEM_EVENTS and ev.item_id:
        _touch_recent(state, ev, cfg.recent_items_limit)
    weight = INTEREST_WEIGHTS.get(kind, 0.0)
    if weight and ev.category:
        state.affinity_ref_us = _decayed_add(
            state.affinity, state.affinity_ref_us, ev.category, weight, t, cfg.affinity_half_life_us
        )
    if kind == ET.EVENT_TYPE_ADD_TO_CART:
        qty = max(1, ev.quantity)
        line = state.cart.get(ev.item_id)
        if line is None:
            state.cart[ev.item_id] = [qty, ev.price, t]
        else:
            line[0] += qty
            line[1] = ev.price or line[1]
            line[2] = max(line[2], t)
        state.cart_updated_us = max(state.cart_updated_us, t)
    elif kind == ET.EVENT_TYPE_REMOVE_FROM_CART:
        line = state.cart.get(ev.item_id)
        if line is not None:
            if ev.quantity <= 0 or ev.quantity >= line[0]:
                del state.cart[ev.item_id]
            else:
                line[0] -= ev.quantity
                line[2] = max(line[2], t)
            state.cart_updated_us = max(state.cart_updated_us, t)
    elif kind == ET.EVENT_TYPE_PURCHASE:
        qty = max(1, ev.quantity)
        bought = state.purchases.get(ev.item_id)
        if bought is None:
            state.purchases[ev.item_id] = [1, qty, t]
        else:
            bought[0] += 1
            bought[1] += qty
            bought[2] = max(bought[2], t)
        state.orders.add(ev.order_id or f"event:{ev.event_id}")
        state.monetary += qty * ev.price
        state.units += qty
        state.last_purchase_us = max(state.last_purchase_us, t)
        if state.cart.pop(ev.item_id, None) is not None:
            state.cart_updated_us = max(state.cart_updated_us, t)


def recompute_profile(
    events: Iterable[LogEvent], cfg: ProfileConfig | None = None
) -> ProfileState | None:
    """The state a customer's events (in log order) produce from nothing; None if none.
    What the store keeps incrementally must always equal this."""
    cfg = cfg or ProfileConfig()
    state: ProfileState | None = None
    for ev in events:
        if ev.type in LOG_ONLY_EVENTS:
            continue
        if state is None:
            state = ProfileState()
        apply_event(state, ev, cfg)
    return state


def rfm_of(state: ProfileState, now_us: int, cfg: ProfileConfig) -> common_pb2.Rfm:
    """Recency / frequency / monetary and their 1..5 scores (0 when never bought);
    :func:`mercato.features.rfm`."""
    if not state.purchases:
        return common_pb2.Rfm(recency_days=-1.0)
    r = features.rfm(
        len(state.orders),
        state.monetary,
        (now_us - state.last_purchase_us) / US_PER_DAY,
        cfg.thresholds,
    )
    return common_pb2.Rfm(
        recency_days=r.recency_days,
        frequency=r.frequency,
        monetary=r.monetary,
        recency_score=r.recency_score,
        frequency_score=r.frequency_score,
        monetary_score=r.monetary_score,
    )


def price_band_of(state: ProfileState, cfg: ProfileConfig) -> str:
    """:func:`mercato.features.price_band` of the mean unit price paid."""
    return features.price_band(state.monetary, state.units, cfg.thresholds)


def segment_of(rfm: common_pb2.Rfm, override: str, cfg: ProfileConfig) -> str:
    """The retailer's override, else :func:`mercato.features.segment` from RFM."""
    return features.segment(rfm.frequency, rfm.recency_days, override, cfg.thresholds)


def normalized_affinity(state: ProfileState) -> dict[str, float]:
    """Category interest shares summing to 1 (independent of the read time)."""
    return features.affinity_shares(state.affinity)


def build_cart(customer_id: str, state: ProfileState | None) -> common_pb2.Cart:
    """The cart message, lines newest first."""
    cart = common_pb2.Cart(customer_id=customer_id)
    if state is None or not state.cart:
        return cart
    value = 0.0
    for item_id, (qty, price, updated) in sorted(
        state.cart.items(), key=lambda kv: (-kv[1][2], kv[0])
    ):
        cart.lines.add(item_id=item_id, quantity=qty, price=price, updated_at=us_to_ts(updated))
        value += qty * price
    cart.value = value
    cart.updated_at.CopyFrom(us_to_ts(state.cart_updated_us))
    return cart


@dataclass(frozen=True)
class CustomerStatic:
    """A customer's static attributes (UpsertCustomers)."""

    customer_id: str
    country: str = ""
    segment: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"country": self.country, "segment": self.segment, "attributes": dict(self.attributes)},
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, customer_id: str, text: str | bytes) -> CustomerStatic:
        d = json.loads(text)
        return cls(customer_id, d["country"], d["segment"], d["attributes"])


def build_profile(
    customer_id: str,
    state: ProfileState | None,
    static: CustomerStatic | None,
    now_us: int,
    cfg: ProfileConfig,
) -> common_pb2.Profile:
    """The API profile of a customer at time ``now_us`` (recency is read-time relative)."""
    profile = common_pb2.Profile(customer_id=customer_id)
    if state is None and static is None:
        return profile
    profile.known = True
    if static is not None:
        profile.country = static.country
        profile.attributes.update(static.attributes)
    override = static.segment if static is not None else ""
    if state is None:
        profile.rfm.recency_days = -1.0
        profile.segment = override or "new"
        profile.cart.customer_id = customer_id
        return profile
    # Hot path (every GetProfile): timestamps are set from plain dicts, not built as a
    # Timestamp message per entry and copied in (about half the time per entry).
    add_recent = profile.recent_items.add
    for item_id, kind, ts in state.recent:
        sec, us = divmod(int(ts), US_PER_S)
        add_recent(item_id=item_id, type=kind, timestamp={"seconds": sec, "nanos": us * 1000})
    bought = sorted(state.purchases.items(), key=lambda kv: (-kv[1][2], kv[0]))
    if cfg.purchases_limit > 0:
        bought = bought[: cfg.purchases_limit]
    add_bought = profile.purchases.add
    for item_id, (count, qty, last) in bought:
        sec, us = divmod(int(last), US_PER_S)
        add_bought(
            item_id=item_id,
            count=count,
            quantity=qty,
            last_purchased_at={"seconds": sec, "nanos": us * 1000},
        )
    profile.cart.CopyFrom(build_cart(customer_id, state))
    profile.category_affinity.update(normalized_affinity(state))
    rfm = rfm_of(state, now_us, cfg)
    profile.rfm.CopyFrom(rfm)
    profile.price_band = price_band_of(state, cfg)
    profile.segment = segment_of(rfm, override, cfg)
    profile.first_seen.CopyFrom(us_to_ts(state.first_seen_us))
    profile.last_seen.CopyFrom(us_to_ts(state.last_seen_us))
    return profile


# --- trending -------------------------------------------------------------------------

OVERALL = ""  # the trending scope of all items; a category's scope is its name


def trend_scopes(ev: LogEvent) -> tuple[str, ...]:
    """The trending scopes an event counts in (none for events without interest)."""
    if INTEREST_WEIGHTS.get(ev.type, 0.0) == 0.0 or not ev.item_id:
        return ()
    return (OVERALL, ev.category) if ev.category else (OVERALL,)


def trend_anchor_for(anchor_us: int | None, batch_max_us: int, half_life_us: float) -> int:
    """The anchor a batch whose newest event is at ``batch_max_us`` is scored against:
    the current one, or the batch's newest time when there is none yet or when the
    current one is so old that scores would grow past float range."""
    if anchor_us is None or (batch_max_us - anchor_us) / half_life_us > REBASE_HALF_LIVES:
        return batch_max_us
    return anchor_us


def trend_increment(ev: LogEvent, anchor_us: int, half_life_us: float) -> float:
    """The score an event adds to its item, relative to the anchor time."""
    return INTEREST_WEIGHTS.get(ev.type, 0.0) * 2.0 ** ((ev.ts_us - anchor_us) / half_life_us)


def decay_to(score: float, anchor_us: int, at_us: int, half_life_us: float) -> float:
    """A score stored relative to ``anchor_us`` as weighted event count at ``at_us``."""
    return score * 2.0 ** ((anchor_us - at_us) / half_life_us)


def recompute_trending(
    events: Iterable[LogEvent], at_us: int, half_life_us: float
) -> dict[str, dict[str, float]]:
    """Trend scores per scope and item at time ``at_us``, straight from the log."""
    out: dict[str, dict[str, float]] = {}
    for ev in events:
        for scope in trend_scopes(ev):
            inc = INTEREST_WEIGHTS[ev.type] * 2.0 ** ((ev.ts_us - at_us) / half_life_us)
            bucket = out.setdefault(scope, {})
            bucket[ev.item_id] = bucket.get(ev.item_id, 0.0) + inc
    return out
