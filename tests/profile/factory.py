"""Builders of catalog items and event streams for the profile tests."""

from __future__ import annotations

import random
import time

from mercato.v1 import common_pb2
from services.profile.ingest import normalize_event
from services.profile.logic import LogEvent, us_to_ts

ET = common_pb2.EventType
NOW_US = time.time_ns() // 1000
DAY_US = 86_400 * 1_000_000
CATEGORIES = ("garden", "kitchen", "toys", "books")


def item(
    item_id: str, category: str = "kitchen", price: float = 10.0, stock: int = 5, **kw: object
) -> common_pb2.Item:
    return common_pb2.Item(
        item_id=item_id,
        title=item_id.upper(),
        category=category,
        price=price,
        stock=stock,
        **kw,  # type: ignore[arg-type]
    )


def catalog(n: int = 20) -> list[common_pb2.Item]:
    return [
        item(f"i{k}", CATEGORIES[k % len(CATEGORIES)], price=1.0 + 3 * k, stock=k % 4)
        for k in range(n)
    ]


def event(
    event_id: str, customer_id: str, kind: int, item_id: str = "", ts_us: int = NOW_US, **kw: object
) -> common_pb2.Event:
    return common_pb2.Event(
        event_id=event_id,
        customer_id=customer_id,
        type=kind,
        item_id=item_id,  # type: ignore[arg-type]
        timestamp=us_to_ts(ts_us),
        **kw,  # type: ignore[arg-type]
    )


def random_events(
    seed: int,
    n: int,
    customers: int = 6,
    items: int = 20,
    start_us: int = NOW_US - 60 * DAY_US,
    prefix: str = "ev",
) -> list[common_pb2.Event]:
    """A plausible shuffled-in-time event stream: views, carts, purchases, offers."""
    rng = random.Random(seed)
    kinds = (
        [ET.EVENT_TYPE_VIEW] * 6
        + [ET.EVENT_TYPE_ADD_TO_CART] * 3
        + [
            ET.EVENT_TYPE_REMOVE_FROM_CART,
            ET.EVENT_TYPE_PURCHASE,
            ET.EVENT_TYPE_PURCHASE,
            ET.EVENT_TYPE_CLICK,
            ET.EVENT_TYPE_OFFER_SHOWN,
            ET.EVENT_TYPE_EXPOSURE,
        ]
    )
    out = []
    for k in range(n):
        kind = rng.choice(kinds)
        ts = start_us + rng.randrange(0, 60 * DAY_US)
        ev = event(f"{prefix}-{seed}-{k}", f"c{rng.randrange(customers)}", kind, ts_us=ts)
        if kind in (ET.EVENT_TYPE_OFFER_SHOWN,):
            ev.offer_id = f"o{rng.randrange(3)}"
        elif kind != ET.EVENT_TYPE_EXPOSURE:
            ev.item_id = f"i{rng.randrange(items)}"
            ev.quantity = rng.choice([0, 1, 1, 2, 3])
            if kind == ET.EVENT_TYPE_PURCHASE:
                ev.price = rng.choice([0.0, 2.5, 30.0])
                ev.order_id = f"o-{rng.randrange(n // 3 + 1)}"
        out.append(ev)
    return out


def to_log(events: list[common_pb2.Event], items: list[common_pb2.Item]) -> list[LogEvent]:
    by_id = {i.item_id: i for i in items}
    return [normalize_event(e, by_id.get(e.item_id), NOW_US) for e in events]
