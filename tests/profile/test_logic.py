"""Unit tests of the pure derivation: recent items, purchases, cart, affinity, RFM,
price band, segment, trending, validation, and incremental == recomputation."""

from __future__ import annotations

import math

import pytest

from mercato.v1 import common_pb2
from services.profile.ingest import prepare_events, validate_event
from services.profile.logic import (
    INTEREST_WEIGHTS,
    US_PER_DAY,
    LogEvent,
    ProfileConfig,
    ProfileState,
    apply_event,
    build_profile,
    normalized_affinity,
    recompute_profile,
    recompute_trending,
    us_to_ts,
)
from services.profile.store.base import plan_batch
from tests.profile.factory import NOW_US, catalog, event, random_events, to_log

ET = common_pb2.EventType
H = 3_600_000_000


def ev(
    n: int, kind: int, item: str = "a", ts: int = NOW_US, cid: str = "c", **kw: object
) -> LogEvent:
    return LogEvent(event_id=f"e{n}", customer_id=cid, type=kind, ts_us=ts, item_id=item, **kw)  # type: ignore[arg-type]


def test_recent_items_bounded_newest_first_one_per_item() -> None:
    cfg = ProfileConfig(recent_items_limit=3)
    state = ProfileState()
    for n, item in enumerate(["a", "b", "c", "a", "d"]):
        apply_event(state, ev(n, ET.EVENT_TYPE_VIEW, item, NOW_US + n * H), cfg)
    assert [r[0] for r in state.recent] == ["d", "a", "c"]
    # An older event arriving late does not displace newer ones.
    apply_event(state, ev(9, ET.EVENT_TYPE_ADD_TO_CART, "b", NOW_US - H), cfg)
    assert [r[0] for r in state.recent] == ["d", "a", "c"]
    # A newer interaction updates the type in place and moves the item to the front.
    apply_event(state, ev(10, ET.EVENT_TYPE_ADD_TO_CART, "c", NOW_US + 10 * H), cfg)
    assert state.recent[0][:2] == ["c", ET.EVENT_TYPE_ADD_TO_CART]
    assert len(state.recent) == 3


def test_purchases_cart_and_abandonment() -> None:
    cfg = ProfileConfig()
    s = ProfileState()
    apply_event(s, ev(1, ET.EVENT_TYPE_ADD_TO_CART, "a", NOW_US, quantity=2, price=3.0), cfg)
    apply_event(s, ev(2, ET.EVENT_TYPE_ADD_TO_CART, "b", NOW_US + 1, quantity=1, price=5.0), cfg)
    apply_event(s, ev(3, ET.EVENT_TYPE_REMOVE_FROM_CART, "a", NOW_US + 2, quantity=1), cfg)
    assert s.cart["a"][0] == 1 and s.cart["b"][0] == 1
    assert s.abandon_key() == NOW_US + 2
    apply_event(
        s, ev(4, ET.EVENT_TYPE_PURCHASE, "a", NOW_US + 3, quantity=1, price=3.0, order_id="o1"), cfg
    )
    apply_event(
        s, ev(5, ET.EVENT_TYPE_PURCHASE, "a", NOW_US + 4, quantity=4, price=2.0, order_id="o2"), cfg
    )
    assert "a" not in s.cart  # bought: the line leaves the cart
    assert s.purchases["a"][:2] == [2, 5]
    assert s.abandon_key() is None  # purchased since the cart last changed
    apply_event(
        s, ev(6, ET.EVENT_TYPE_REMOVE_FROM_CART, "b", NOW_US + 5), cfg
    )  # quantity 0: whole line
    assert s.cart == {}
    assert s.monetary == pytest.approx(1 * 3.0 + 4 * 2.0)
    assert len(s.orders) == 2


def test_affinity_is_time_decayed_and_normalized() -> None:
    cfg = ProfileConfig(affinity_half_life_days=1.0)
    s = ProfileState()
    w = INTEREST_WEIGHTS[ET.EVENT_TYPE_VIEW]
    apply_event(s, ev(1, ET.EVENT_TYPE_VIEW, "a", NOW_US, category="old"), cfg)
    apply_event(s, ev(2, ET.EVENT_TYPE_VIEW, "b", NOW_US + US_PER_DAY, category="new"), cfg)
    aff = normalized_affinity(s)
    assert math.fsum(aff.values()) == pytest.approx(1.0)
    # One half-life apart, same weight: the older category counts half.
    assert aff["old"] / aff["new"] == pytest.approx(0.5 * w / w)
    # Arrival order does not matter for affinity.
    t = ProfileState()
    apply_event(t, ev(2, ET.EVENT_TYPE_VIEW, "b", NOW_US + US_PER_DAY, category="new"), cfg)
    apply_event(t, ev(1, ET.EVENT_TYPE_VIEW, "a", NOW_US, category="old"), cfg)
    assert normalized_affinity(t) == pytest.approx(aff)


def test_rfm_price_band_segment_follow_the_settings() -> None:
    cfg = ProfileConfig()
    s = ProfileState()
    for n in range(5):
        apply_event(
            s,
            ev(
                n,
                ET.EVENT_TYPE_PURCHASE,
                f"i{n}",
                NOW_US - 10 * US_PER_DAY,
                quantity=1,
                price=cfg.price_band_high_from + 1,
                order_id=f"o{n}",
            ),
            cfg,
        )
    p = build_profile("c", s, None, NOW_US, cfg)
    assert p.known and p.rfm.frequency == 5
    assert p.rfm.recency_days == pytest.approx(10.0)
    expect_r = len(cfg.rfm_recency_days) + 1 - sum(t < 10.0 for t in cfg.rfm_recency_days)
    assert p.rfm.recency_score == expect_r
    assert p.rfm.frequency_score == 1 + sum(t <= 5 for t in cfg.rfm_frequency_orders)
    assert p.rfm.monetary_score == 1 + sum(s.monetary >= t for t in cfg.rfm_monetary)
    assert p.price_band == "high"
    assert p.segment == ("loyal" if cfg.segment_loyal_orders <= 5 else "active")
    later = NOW_US + int(cfg.segment_lapsed_days + 1) * US_PER_DAY
    lapsed = build_profile("c", s, None, later, cfg)
    assert lapsed.segment == "lapsed" and lapsed.rfm.recency_score == 1
    times = [x.last_purchased_at.ToMicroseconds() for x in p.purchases]
    assert len(times) == 5 and times == sorted(times, reverse=True)


def test_unknown_customer_profile_is_empty_and_not_known() -> None:
    p = build_profile("nobody", None, None, NOW_US, ProfileConfig())
    assert p.customer_id == "nobody" and not p.known
    assert not p.recent_items and not p.purchases and not p.segment


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_equals_recomputation(seed: int) -> None:
    """Maintaining a state through JSON round trips, batch by batch, gives exactly the
    state that replaying the log gives."""
    cfg = ProfileConfig(recent_items_limit=4)
    items = catalog()
    log = to_log(random_events(seed, 400), items)
    stored: dict[str, ProfileState | None] = {}
    for start in range(0, len(log), 37):
        plan = plan_batch(log[start : start + 37], set(), stored, None, cfg)
        stored.update({c: ProfileState.from_json(s.to_json()) for c, s in plan.states.items()})
    for cid, state in stored.items():
        assert state == recompute_profile([e for e in log if e.customer_id == cid], cfg)


def test_trending_plan_matches_recomputation() -> None:
    cfg = ProfileConfig(trending_half_life_hours=6)
    items = catalog()
    log = to_log(random_events(7, 300), items)
    h = cfg.trending_half_life_us
    anchor: int | None = None
    scores: dict[tuple[str, str], float] = {}
    for start in range(0, len(log), 50):
        plan = plan_batch(log[start : start + 50], set(), {}, anchor, cfg)
        if plan.rescale is not None:
            scores = {k: v * plan.rescale for k, v in scores.items()}
        anchor = plan.anchor_us if plan.anchor_us is not None else anchor
        for k, v in plan.increments.items():
            scores[k] = scores.get(k, 0.0) + v
    assert anchor is not None
    at = NOW_US
    expected = recompute_trending(log, at, h)
    got: dict[str, dict[str, float]] = {}
    for (scope, item), v in scores.items():
        got.setdefault(scope, {})[item] = v * 2.0 ** ((anchor - at) / h)
    assert got.keys() == expected.keys()
    for scope in expected:
        assert got[scope] == pytest.approx(expected[scope], rel=1e-9)


def test_trend_anchor_moves_forward_without_overflow() -> None:
    cfg = ProfileConfig(trending_half_life_hours=1)
    first = [LogEvent("a", "c", ET.EVENT_TYPE_VIEW, NOW_US, item_id="x")]
    plan = plan_batch(first, set(), {}, None, cfg)
    years = NOW_US + 365 * US_PER_DAY  # ~8760 half-lives later: 2**8760 would overflow
    later = [LogEvent("b", "c", ET.EVENT_TYPE_VIEW, years, item_id="x")]
    plan2 = plan_batch(later, set(), {}, plan.anchor_us, cfg)
    assert plan2.anchor_us == years and plan2.rescale is not None
    assert all(math.isfinite(v) for v in plan2.increments.values())


NOW = NOW_US


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: setattr(e, "event_id", ""), "event_id is required"),
        (lambda e: setattr(e, "event_id", "x" * 129), "longer than 128"),
        (lambda e: setattr(e, "customer_id", ""), "customer_id is required"),
        (lambda e: setattr(e, "type", 0), "type is required"),
        (lambda e: setattr(e, "type", 42), "unknown event type 42"),
        (lambda e: setattr(e, "item_id", ""), "item_id"),
        (lambda e: setattr(e, "quantity", -1), "quantity must be >= 0"),
        (lambda e: setattr(e, "price", -0.5), "price must be"),
        (lambda e: setattr(e, "price", float("nan")), "price must be"),
        (lambda e: e.ClearField("timestamp"), "timestamp is required"),
        (lambda e: e.timestamp.CopyFrom(us_to_ts(NOW + 3600 * 10**6)), "in the future"),
    ],
)
def test_validation_rejects(mutate: object, message: str) -> None:
    e = event("e1", "c1", ET.EVENT_TYPE_PURCHASE, "i1", NOW)
    assert validate_event(e, NOW, 300) is None
    mutate(e)  # type: ignore[operator]
    problem = validate_event(e, NOW, 300)
    assert problem is not None and message in problem


def test_offer_events_need_offer_id_and_unknown_items_are_errors() -> None:
    shown = event("e1", "c1", ET.EVENT_TYPE_OFFER_SHOWN)
    assert "offer_id" in (validate_event(shown, NOW, 300) or "")
    good = event("e2", "c1", ET.EVENT_TYPE_VIEW, "i1", NOW)
    unknown = event("e3", "c1", ET.EVENT_TYPE_VIEW, "nope", NOW)
    items = {i.item_id: i for i in catalog(3)}
    ok, errors = prepare_events([good, unknown], items, NOW, 300)
    assert [e.event_id for e in ok] == ["e2"]
    assert [(e.index, e.event_id) for e in errors] == [(1, "e3")]
    assert "unknown item_id" in errors[0].message


def test_normalisation_fills_catalog_price_and_category() -> None:
    items = {i.item_id: i for i in catalog(3)}
    buy = event("e1", "c1", ET.EVENT_TYPE_PURCHASE, "i2", NOW)  # quantity 0, price 0
    (norm,), _ = prepare_events([buy], items, NOW, 300)
    assert norm.quantity == 1
    assert norm.price == items["i2"].price and norm.category == items["i2"].category
    assert LogEvent.from_json(norm.to_json()) == norm


def test_apply_event_field_by_field_with_late_events() -> None:
    """Every field apply_event changes, after each event of a sequence where some events
    arrive late (an earlier timestamp than one already applied)."""
    cfg = ProfileConfig()
    s = ProfileState()
    t = NOW_US
    add, remove, buy = (
        ET.EVENT_TYPE_ADD_TO_CART,
        ET.EVENT_TYPE_REMOVE_FROM_CART,
        ET.EVENT_TYPE_PURCHASE,
    )
    apply_event(s, ev(1, add, "a", t + 10, quantity=2, price=3.0), cfg)
    assert s.cart == {"a": [2, 3.0, t + 10]} and s.cart_updated_us == t + 10
    assert (s.first_seen_us, s.last_seen_us, s.events) == (t + 10, t + 10, 1)
    # late, quantity 0 (counts as 1), no price (the line keeps its price)
    apply_event(s, ev(2, add, "a", t + 5, quantity=0, price=0.0), cfg)
    assert s.cart == {"a": [3, 3.0, t + 10]} and s.cart_updated_us == t + 10
    assert (s.first_seen_us, s.last_seen_us, s.events) == (t + 5, t + 10, 2)
    apply_event(s, ev(3, add, "a", t + 20, quantity=1, price=2.5), cfg)
    assert s.cart == {"a": [4, 2.5, t + 20]} and s.cart_updated_us == t + 20
    apply_event(s, ev(4, remove, "a", t + 15, quantity=3), cfg)  # late, part of the line
    assert s.cart == {"a": [1, 2.5, t + 20]} and s.cart_updated_us == t + 20
    apply_event(s, ev(5, remove, "zz", t + 30, quantity=1), cfg)  # not in the cart
    assert s.cart == {"a": [1, 2.5, t + 20]} and s.cart_updated_us == t + 20
    assert s.last_seen_us == t + 30
    apply_event(s, ev(6, remove, "a", t + 40, quantity=1), cfg)  # exactly what is there
    assert s.cart == {} and s.cart_updated_us == t + 40
    apply_event(s, ev(7, buy, "b", t + 50, quantity=2, price=4.0, order_id="o1"), cfg)
    apply_event(s, ev(8, buy, "b", t + 45, quantity=0, price=1.5), cfg)  # late, no order id
    assert s.purchases == {"b": [2, 3, t + 50]}
    assert s.orders == {"o1", "event:e8"}
    assert s.monetary == pytest.approx(2 * 4.0 + 1 * 1.5) and s.units == 3
    assert s.last_purchase_us == t + 50 and s.cart_updated_us == t + 40
    apply_event(s, ev(9, add, "c", t + 60, quantity=1, price=1.0), cfg)
    apply_event(s, ev(10, buy, "c", t + 55, quantity=1, price=1.0, order_id="o2"), cfg)
    assert s.cart == {} and s.cart_updated_us == t + 60  # bought: out of the cart
    assert s.purchases["c"] == [1, 1, t + 55] and s.last_purchase_us == t + 55
    apply_event(s, ev(11, buy, "d", t + 70, quantity=1, price=1.0, order_id="o2"), cfg)
    assert s.cart_updated_us == t + 60  # not in the cart: the cart did not change
    assert s.orders == {"o1", "o2", "event:e8"} and s.units == 5
    assert (s.first_seen_us, s.last_seen_us, s.events) == (t + 5, t + 70, 11)
    # An offer event says nothing about interest in an item: neither recent items nor
    # affinity change; a removal from the cart is a recent item but no interest either.
    recent = [list(r) for r in s.recent]
    offer = ev(12, ET.EVENT_TYPE_OFFER_SHOWN, "x", t + 80, category="garden", offer_id="o")
    apply_event(s, offer, cfg)
    assert s.recent == recent and s.affinity == {}
    apply_event(s, ev(13, remove, "x", t + 81, category="garden"), cfg)
    assert s.recent[0][0] == "x" and s.affinity == {}
