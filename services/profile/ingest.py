"""Event validation and normalisation, shared by TrackEvents and ``mercato load``.

Rules (each violation is reported with the event's index and id):

- ``event_id`` and ``customer_id`` are required, at most 128 bytes (UTF-8).
- ``type`` is one of the EventType values other than UNSPECIFIED.
- ``item_id`` is required for view, add-to-cart, remove-from-cart, purchase and click
  events, and any event that names an item must name an item of the catalog (unknown
  items are rejected like any other invalid event: the whole batch with
  INVALID_ARGUMENT, or only that event with ``partial_accept``).
- ``offer_id`` is required for offer-shown and offer-redeemed events.
- ``quantity`` >= 0 and ``price`` >= 0 and finite.
- ``timestamp`` is set, after 1970 and at most ``max_future_skew_seconds`` ahead of the
  server clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mercato.v1 import common_pb2
from services.profile.logic import (
    EVENT_TYPE_NAMES,
    ITEM_EVENTS,
    OFFER_EVENTS,
    US_PER_S,
    LogEvent,
    ts_to_us,
)

ET = common_pb2.EventType
MAX_ID_BYTES = 128


def check_id(value: str, what: str) -> str | None:
    """Why ``value`` is not a valid required id, or None."""
    if not value:
        return f"{what} is required"
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        return f"{what} is longer than {MAX_ID_BYTES} bytes"
    return None


def validate_event(ev: common_pb2.Event, now_us: int, max_future_skew_s: float) -> str | None:
    """Why the event is invalid on its own (without the catalog), or None."""
    for value, what in ((ev.event_id, "event_id"), (ev.customer_id, "customer_id")):
        problem = check_id(value, what)
        if problem:
            return problem
    if ev.type not in EVENT_TYPE_NAMES:
        if ev.type == ET.EVENT_TYPE_UNSPECIFIED:
            return "type is required"
        return f"unknown event type {int(ev.type)}"
    if ev.type in ITEM_EVENTS:
        problem = check_id(ev.item_id, f"item_id (of a {EVENT_TYPE_NAMES[ev.type]} event)")
        if problem:
            return problem
    elif ev.item_id and len(ev.item_id.encode("utf-8")) > MAX_ID_BYTES:
        return f"item_id is longer than {MAX_ID_BYTES} bytes"
    if ev.type in OFFER_EVENTS and not ev.offer_id:
        return f"offer_id is required for {EVENT_TYPE_NAMES[ev.type]} events"
    if ev.quantity < 0:
        return f"quantity must be >= 0, got {ev.quantity}"
    if not math.isfinite(ev.price) or ev.price < 0:
        return f"price must be a finite number >= 0, got {ev.price}"
    if not ev.HasField("timestamp") or ev.timestamp.seconds <= 0:
        return "timestamp is required (after 1970)"
    if not 0 <= ev.timestamp.nanos < 1_000_000_000:
        return "timestamp nanos out of range"
    skew_s = (ts_to_us(ev.timestamp) - now_us) / US_PER_S
    if skew_s > max_future_skew_s:
        return (
            f"timestamp is {skew_s:.0f} s in the future; at most {max_future_skew_s:.0f} s "
            "of clock skew is accepted"
        )
    return None


def normalize_event(
    ev: common_pb2.Event, item: common_pb2.Item | None, ingested_us: int
) -> LogEvent:
    """The log record of a valid event: quantity 0 -> 1 for add-to-cart and purchase,
    price 0 -> the catalog price for add-to-cart and purchase, category from the catalog."""
    quantity = int(ev.quantity)
    price = float(ev.price)
    if ev.type in (ET.EVENT_TYPE_ADD_TO_CART, ET.EVENT_TYPE_PURCHASE):
        quantity = max(1, quantity)
        if price == 0.0 and item is not None:
            price = float(item.price)
    return LogEvent(
        event_id=ev.event_id,
        customer_id=ev.customer_id,
        type=int(ev.type),
        ts_us=ts_to_us(ev.timestamp),
        item_id=ev.item_id,
        quantity=quantity,
        price=price,
        category=item.category if item is not None else "",
        session_id=ev.session_id,
        order_id=ev.order_id,
        offer_id=ev.offer_id,
        surface=int(ev.surface),
        request_id=ev.request_id,
        experiment=ev.experiment,
        variant=ev.variant,
        attributes=dict(ev.attributes),
        ingested_us=ingested_us,
    )


def prepare_events(
    events: Sequence[common_pb2.Event],
    catalog: Mapping[str, common_pb2.Item],
    now_us: int,
    max_future_skew_s: float,
) -> tuple[list[LogEvent], list[common_pb2.EventError]]:
    """Validate a batch against the rules and the catalog (``catalog`` holds at least
    every item the batch names that exists). Returns the normalised valid events in
    batch order and one error per invalid event."""
    good: list[LogEvent] = []
    errors: list[common_pb2.EventError] = []
    for index, ev in enumerate(events):
        problem = validate_event(ev, now_us, max_future_skew_s)
        item = catalog.get(ev.item_id) if ev.item_id else None
        if problem is None and ev.item_id and item is None:
            problem = f"unknown item_id {ev.item_id!r}: upsert the item to the catalog first"
        if problem is not None:
            errors.append(common_pb2.EventError(index=index, event_id=ev.event_id, message=problem))
            continue
        good.append(normalize_event(ev, item, now_us))
    return good, errors


def describe_errors(errors: Sequence[common_pb2.EventError], limit: int = 5) -> str:
    """A readable summary of per-event errors for an INVALID_ARGUMENT message."""
    parts = [f"event {e.index} ({e.event_id or 'no id'}): {e.message}" for e in errors[:limit]]
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    return f"{len(errors)} invalid event(s), nothing was written: " + "; ".join(parts) + more
