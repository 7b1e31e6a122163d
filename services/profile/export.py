"""The training data format of the event log (``mercato export-events``).

One row per logged event, in log order, with these columns:

=============  ==========================  ============================================
column         Parquet type                meaning
=============  ==========================  ============================================
event_id       string                      the caller's event id (unique)
customer_id    string                      the retailer's customer id
event_type     string                      view, add_to_cart, remove_from_cart,
                                           purchase, offer_shown, offer_redeemed,
                                           click, exposure
item_id        string                      the retailer's item id ("" when none)
category       string                      the item's catalog category at ingest time
quantity       int32                       units (>= 1 for add_to_cart and purchase)
price          float64                     unit price (catalog price filled in when
                                           the event was sent with 0)
timestamp      timestamp[us, tz=UTC]       when it happened
session_id     string                      "" when unknown
order_id       string                      invoice / order grouping purchase lines
offer_id       string                      offer events
surface        string                      home, product, cart, checkout, buy_again,
                                           email or ""
request_id     string                      recommendation request (clicks, exposures)
experiment     string                      experiment (exposures)
variant        string                      variant (exposures)
attributes     string                      JSON object of free-form attributes
ingested_at    timestamp[us, tz=UTC]       when the profile service logged it
=============  ==========================  ============================================

CSV has the same columns with a header; timestamps are ISO-8601 UTC
(``2011-12-09T12:50:00.000000Z``). Read either with :func:`read_events_frame`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.profile.logic import EVENT_TYPE_NAMES, SURFACE_NAMES, LogEvent
from services.profile.store.base import ProfileStore

COLUMNS = (
    "event_id", "customer_id", "event_type", "item_id", "category", "quantity", "price",
    "timestamp", "session_id", "order_id", "offer_id", "surface", "request_id",
    "experiment", "variant", "attributes", "ingested_at",
)  # fmt: skip
_STRINGS = [c for c in COLUMNS if c not in ("quantity", "price", "timestamp", "ingested_at")]


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row_of(ev: LogEvent) -> dict[str, Any]:
    """One export row (timestamps as microseconds since the epoch)."""
    return {
        "event_id": ev.event_id,
        "customer_id": ev.customer_id,
        "event_type": EVENT_TYPE_NAMES.get(ev.type, str(ev.type)),
        "item_id": ev.item_id,
        "category": ev.category,
        "quantity": ev.quantity,
        "price": ev.price,
        "timestamp": ev.ts_us,
        "session_id": ev.session_id,
        "order_id": ev.order_id,
        "offer_id": ev.offer_id,
        "surface": SURFACE_NAMES.get(ev.surface, ""),
        "request_id": ev.request_id,
        "experiment": ev.experiment,
        "variant": ev.variant,
        "attributes": json.dumps(dict(ev.attributes), sort_keys=True) if ev.attributes else "",
        "ingested_at": ev.ingested_us,
    }


def arrow_schema() -> Any:
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    types = {"quantity": pa.int32(), "price": pa.float64(), "timestamp": ts, "ingested_at": ts}
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


class EventsWriter:
    """Writes export rows to ``.parquet`` or ``.csv`` (by suffix), chunk by chunk."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.kind = out.suffix.lower().lstrip(".")
        if self.kind not in ("parquet", "csv"):
            raise ValueError(f"--out must end in .parquet or .csv, got {out.name!r}")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self._pq: Any = None
        self._csv: Any = None
        self._file: Any = None

    def write(self, events: Iterable[LogEvent]) -> None:
        rows = [row_of(ev) for ev in events]
        if not rows:
            return
        self.rows += len(rows)
        if self.kind == "csv":
            if self._csv is None:
                self._file = open(self.out, "w", newline="", encoding="utf-8")  # noqa: SIM115
                self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
                self._csv.writeheader()
            for r in rows:
                r["timestamp"] = _iso(r["timestamp"])
                r["ingested_at"] = _iso(r["ingested_at"])
                r["price"] = repr(r["price"])
                self._csv.writerow(r)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = arrow_schema()
        table = pa.Table.from_pylist(
            rows,
            schema=pa.schema(
                [
                    f
                    if f.name not in ("timestamp", "ingested_at")
                    else pa.field(f.name, pa.int64())
                    for f in schema
                ]
            ),
        )
        table = table.set_column(
            7, "timestamp", table["timestamp"].cast(schema.field("timestamp").type)
        )
        table = table.set_column(
            16, "ingested_at", table["ingested_at"].cast(schema.field("ingested_at").type)
        )
        if self._pq is None:
            self._pq = pq.ParquetWriter(str(self.out), schema)
        self._pq.write_table(table)

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
        elif self.kind == "parquet":  # empty log: a valid empty file
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([], schema=arrow_schema()), str(self.out))
        if self._file is not None:
            self._file.close()
        elif self.kind == "csv" and self._csv is None:
            with open(self.out, "w", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=COLUMNS).writeheader()


async def export_events(
    store: ProfileStore, out: Path, batch: int = 5000, progress: Any = None
) -> int:
    """Write the whole event log to ``out``; returns the number of rows."""
    writer = EventsWriter(out)
    cursor = ""
    try:
        while True:
            events, cursor = await store.read_log(cursor, batch)
            writer.write(events)
            if progress is not None:
                progress.update(len(events))
            if len(events) < batch:
                break
    finally:
        writer.close()
    return writer.rows


def read_events_frame(path: Path) -> Any:
    """An export file as a pandas DataFrame: strings ("" for empty), quantity int,
    price float, timestamp / ingested_at as UTC datetimes."""
    import pandas as pd

    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype={c: str for c in _STRINGS}, keep_default_na=False)
        for col in ("timestamp", "ingested_at"):
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not an events export: missing columns {missing}")
    for col in _STRINGS:
        df[col] = df[col].fillna("").astype(str)
    df["quantity"] = df["quantity"].astype("int64")
    df["price"] = df["price"].astype("float64")
    return df
