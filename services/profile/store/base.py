"""The profile store interface and the batch planning both backends share.

A backend persists four things: the event log (append-only, unique by event id), the
derived :class:`ProfileState` and static attributes per customer, the catalog, and
the trending scores. :func:`plan_batch` decides, from what is stored, what one
TrackEvents batch changes; a backend reads its inputs and writes its outputs in one
atomic, durable step, so a batch is either entirely in the store or not at all.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from mercato.v1 import common_pb2
from services.common.errors import NotFound, Unavailable
from services.profile.logic import (
    LOG_ONLY_EVENTS,
    CustomerStatic,
    LogEvent,
    ProfileConfig,
    ProfileState,
    apply_event,
    trend_anchor_for,
    trend_increment,
    trend_scopes,
)


class StoreUnavailable(Unavailable):
    """The store cannot be reached or used right now (UNAVAILABLE to callers)."""


class UnknownItems(NotFound):
    """A stock update named items that are not in the catalog."""


@dataclass(frozen=True)
class AppendResult:
    """What a batch of events did."""

    accepted: int
    duplicates: int


@dataclass(frozen=True)
class CustomerRecord:
    """What the store has for one customer (both None: never seen)."""

    customer_id: str
    state: ProfileState | None = None
    static: CustomerStatic | None = None


@dataclass(frozen=True)
class StockChange:
    """One stock update: ``set_to`` an absolute level or add ``delta`` (clamped at 0)."""

    item_id: str
    set_to: int | None = None
    delta: int | None = None

    def apply(self, stock: int) -> int:
        if self.set_to is not None:
            return self.set_to
        return max(0, stock + (self.delta or 0))


@dataclass(frozen=True)
class ItemChanges:
    """Catalogue items changed after a change sequence number, oldest change first.

    Every item write (create, update, stock change) gives the item the store's next
    change sequence number, so the items with a number above a reader's cursor are
    exactly those written since it read up to that cursor. ``epoch`` names the store's
    sequence: a cursor of another epoch (the store was replaced or emptied) is no
    cursor of this one."""

    items: list[common_pb2.Item]
    last_seq: int  # the sequence number of the last item returned (``after`` when none)
    head: int  # the store's latest sequence number when read
    epoch: str


@dataclass
class BatchPlan:
    """The writes of one batch of events."""

    accepted: list[LogEvent] = field(default_factory=list)
    duplicates: int = 0
    states: dict[str, ProfileState] = field(default_factory=dict)
    anchor_us: int | None = None
    # Multiply every stored trend score by this before adding the increments (anchor moved).
    rescale: float | None = None
    increments: dict[tuple[str, str], float] = field(default_factory=dict)


def plan_batch(
    events: Sequence[LogEvent],
    seen: set[str],
    states: Mapping[str, ProfileState | None],
    anchor_us: int | None,
    cfg: ProfileConfig,
) -> BatchPlan:
    """Plan a batch: ``seen`` holds the batch's ids already in the log, ``states`` the
    stored state of each customer of the batch, ``anchor_us`` the stored trend anchor.

    Events are applied in batch order; an id already logged, or repeated within the
    batch, is a duplicate and changes nothing.
    """
    plan = BatchPlan()
    fresh: set[str] = set()
    for ev in events:
        if ev.event_id in seen or ev.event_id in fresh:
            plan.duplicates += 1
            continue
        fresh.add(ev.event_id)
        plan.accepted.append(ev)
    if not plan.accepted:
        return plan
    h = cfg.trending_half_life_us
    counted = [ev for ev in plan.accepted if trend_scopes(ev)]
    if counted:
        new_anchor = trend_anchor_for(anchor_us, max(ev.ts_us for ev in counted), h)
        if anchor_us is not None and new_anchor != anchor_us:
            plan.rescale = 2.0 ** ((anchor_us - new_anchor) / h)
        plan.anchor_us = new_anchor
        for ev in counted:
            inc = trend_increment(ev, new_anchor, h)
            for scope in trend_scopes(ev):
                key = (scope, ev.item_id)
                plan.increments[key] = plan.increments.get(key, 0.0) + inc
    for ev in plan.accepted:
        if ev.type in LOG_ONLY_EVENTS:
            continue  # logged, but no part of the derived profile
        state = plan.states.get(ev.customer_id)
        if state is None:
            stored = states.get(ev.customer_id)
            # Work on a copy: the caller's object must stay what is stored.
            state = ProfileState.from_json(stored.to_json()) if stored else ProfileState()
            plan.states[ev.customer_id] = state
        apply_event(state, ev, cfg)
    return plan


class ProfileStore(abc.ABC):
    """Storage of the profile service. Every method may raise :class:`StoreUnavailable`."""

    backend: str = ""

    def __init__(self, cfg: ProfileConfig) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect / create / migrate. Raises StoreUnavailable if it cannot."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections (idempotent)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Cheap check that the store answers; raises StoreUnavailable otherwise."""

    @abc.abstractmethod
    async def append_events(self, events: Sequence[LogEvent]) -> AppendResult:
        """Log the events not logged before and update the derived state, atomically and
        durably (returns only once written). Events must be validated and normalised."""

    @abc.abstractmethod
    async def get_customers(self, customer_ids: Sequence[str]) -> list[CustomerRecord]:
        """The stored record of each id, in order."""

    @abc.abstractmethod
    def get_customers_sync(self, customer_ids: Sequence[str]) -> list[CustomerRecord]:
        """:meth:`get_customers` without the event loop: the synchronous server's pool
        threads call it (``server_mode=sync``), so it must be safe from many threads."""

    @abc.abstractmethod
    async def upsert_customers(self, customers: Sequence[CustomerStatic]) -> int:
        """Create or replace customers' static attributes (atomic per batch)."""

    @abc.abstractmethod
    async def list_abandoned_carts(
        self,
        idle_since_min_us: int,
        idle_since_max_us: int,
        limit: int,
        after: tuple[int, str] | None,
    ) -> list[tuple[str, ProfileState]]:
        """Customers whose cart is non-empty, not purchased since its last change, and
        last changed in [min, max], ordered by (change time, customer id), after the
        cursor (exclusive)."""

    @abc.abstractmethod
    async def upsert_items(
        self, items: Sequence[common_pb2.Item], now_us: int, only_missing: bool = False
    ) -> tuple[int, int]:
        """Create or replace items (atomic per batch); returns (created, updated).
        ``created_at`` is kept from the stored item, or set to now for new items when
        unset. With ``only_missing``, items already in the catalog are left alone."""

    @abc.abstractmethod
    async def get_items(self, item_ids: Sequence[str]) -> dict[str, common_pb2.Item]:
        """The catalog items among ``item_ids`` by id."""

    @abc.abstractmethod
    def get_items_sync(self, item_ids: Sequence[str]) -> dict[str, common_pb2.Item]:
        """:meth:`get_items` without the event loop (pool threads, like
        :meth:`get_customers_sync`)."""

    @abc.abstractmethod
    async def update_stock(self, changes: Sequence[StockChange]) -> list[common_pb2.Item]:
        """Apply stock changes atomically (in order; an item may appear several times);
        returns the item after each change. UnknownItems if any item is missing."""

    @abc.abstractmethod
    async def list_items(self, limit: int, after: str, category: str) -> list[common_pb2.Item]:
        """Items ordered by id, ids > ``after``, optionally of one category."""

    @abc.abstractmethod
    async def item_changes(self, after: int, limit: int) -> ItemChanges:
        """Up to ``limit`` items whose latest change has a sequence number > ``after``,
        in sequence order, each with its current attributes (0 = every item)."""

    @abc.abstractmethod
    async def trending(
        self, category: str, limit: int, offset: int
    ) -> tuple[list[tuple[str, float]], int | None]:
        """Trend scores (relative to the anchor) by descending score, and the anchor."""

    @abc.abstractmethod
    async def read_log(self, after: str, limit: int) -> tuple[list[LogEvent], str]:
        """Up to ``limit`` log events after the cursor ("" = from the start), in log
        order, and the cursor to continue from."""

    @abc.abstractmethod
    async def page_customer_ids(self, cursor: str, limit: int) -> tuple[list[str], str]:
        """About ``limit`` ids of customers with a derived state after ``cursor`` ("" =
        from the start) and the cursor to continue from ("" when the scan is complete).
        Each id appears once per complete scan."""

    @abc.abstractmethod
    def scan_states(self, batch: int = 500) -> AsyncIterator[list[tuple[str, ProfileState]]]:
        """Every stored derived state, in batches (verification, maintenance)."""

    async def iter_log(self, batch: int = 2000) -> AsyncIterator[LogEvent]:
        """The whole event log in order."""
        cursor = ""
        while True:
            events, cursor = await self.read_log(cursor, batch)
            for ev in events:
                yield ev
            if len(events) < batch:
                return

    async def __aenter__(self) -> ProfileStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
