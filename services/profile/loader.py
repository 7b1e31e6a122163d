"""``mercato load``: import a dataset's catalog, customers and events into the store.

Events go through the same validation and normalisation as TrackEvents; invalid rows
are counted and reported, not fatal. Event ids are deterministic, so re-running a load
changes nothing (every event is a duplicate).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mercato.v1 import common_pb2
from services.profile.datasets import ProfileDataset
from services.profile.ingest import prepare_events
from services.profile.logic import CustomerStatic
from services.profile.store.base import ProfileStore

T = TypeVar("T")


def batched(values: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(values)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@dataclass
class LoadReport:
    """What a load did."""

    items_created: int = 0
    items_updated: int = 0
    customers: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)  # the first few rejections
    seconds: float = 0.0


async def load_dataset(
    store: ProfileStore,
    dataset: ProfileDataset,
    batch_size: int = 1000,
    max_future_skew_s: float = 300.0,
    progress: Any = None,
) -> LoadReport:
    """Load ``dataset`` into ``store``. ``progress`` is a tqdm-like object (update(n))."""
    start = time.perf_counter()
    report = LoadReport()
    now_us = time.time_ns() // 1000
    for chunk in batched(dataset.items(), batch_size):
        created, updated = await store.upsert_items(
            chunk, now_us, only_missing=dataset.items_are_partial
        )
        report.items_created += created
        report.items_updated += updated
    for customers in batched(dataset.customers(), batch_size):
        report.customers += await store.upsert_customers(
            [
                CustomerStatic(c.customer_id, c.country, c.segment, dict(c.attributes))
                for c in customers
            ]
        )
    catalog: dict[str, common_pb2.Item] = {}
    for events in batched(dataset.events(), batch_size):
        wanted = {e.item_id for e in events if e.item_id and e.item_id not in catalog}
        if wanted:
            catalog.update(await store.get_items(sorted(wanted)))
        now_us = time.time_ns() // 1000
        good, errors = prepare_events(events, catalog, now_us, max_future_skew_s)
        report.rejected += len(errors)
        for err in errors[: max(0, 10 - len(report.errors))]:
            report.errors.append(f"{err.event_id or '(no id)'}: {err.message}")
        if good:
            result = await store.append_events(good)
            report.accepted += result.accepted
            report.duplicates += result.duplicates
        if progress is not None:
            progress.update(len(events))
    report.seconds = time.perf_counter() - start
    return report
