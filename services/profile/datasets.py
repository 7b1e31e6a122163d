"""Dataset adapters for ``mercato load``: a neutral interface and the shipped adapters.

A dataset is anything that yields the catalog, customers and events as API messages
(:class:`ProfileDataset`). ``mercato load`` validates and writes them through the same
code path as TrackEvents, so an adapter only has to translate its source format.
Event ids must be deterministic (derived from the source rows), which makes a re-run
of the same load a no-op: every event is a duplicate.

Shipped adapters:

- ``events``: a CSV or Parquet file in the export format of ``mercato export-events``
  (see :mod:`services.profile.export`), so export -> load round-trips.
- ``online-retail``: the UCI Online Retail invoices file.
- ``synthetic``: registered by the ``mercato`` command (``mercato/cli.py``) with
  :func:`register_adapter`: the synthetic shop of the training package
  (``training.profile_data``). This module never imports the training package; without
  the registration ``--data synthetic`` fails with a message that says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from google.protobuf.timestamp_pb2 import Timestamp

from mercato.datasets import DatasetUnavailable
from mercato.v1 import common_pb2, profile_pb2
from services.profile.logic import EVENT_TYPES_BY_NAME, SURFACES_BY_NAME, us_to_ts


@runtime_checkable
class ProfileDataset(Protocol):
    """What ``mercato load`` imports."""

    name: str
    #: True when items() only sketches items seen in events (id, category, price): the
    #: loader then adds missing items and leaves existing catalog entries alone.
    items_are_partial: bool

    def items(self) -> Iterable[common_pb2.Item]: ...

    def customers(self) -> Iterable[profile_pb2.Customer]: ...

    def events(self) -> Iterable[common_pb2.Event]:
        """Events in the order they happened (log order)."""
        ...

    def event_count(self) -> int | None:
        """Number of events, for the progress bar (None if unknown)."""
        ...


def _ts(value: Any) -> Timestamp:
    import pandas as pd

    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return us_to_ts(int(stamp.value // 1000))


# --- UCI Online Retail ----------------------------------------------------------------

PRODUCT_CODE = r"^\d{5}"  # products: five digits, optional letters (85123A, 22423)


@dataclass
class OnlineRetail:
    """UCI Online Retail (InvoiceNo, StockCode, Description, Quantity, InvoiceDate,
    UnitPrice, CustomerID, Country) as purchase events.

    Kept: product lines (stock codes of five digits and optional letters; POST, DOT, M,
    C2, D, S, BANK CHARGES, AMAZONFEE, CRUK, PADS, gift vouchers, DCGS... are dropped)
    of non-cancelled invoices (no ``C`` prefix) with a CustomerID, Quantity > 0 and
    UnitPrice > 0. Event id: ``online-retail:<InvoiceNo>:<line>``, line = 1-based
    position of the row in its invoice in the original file, so re-runs give the same
    ids. Times are the file's (UK local) read as UTC. Items: title = latest description,
    price = median unit price, category = the description's last word lowercased (the
    product noun: HOLDER, LANTERN, BAG...; the dataset has no categories), stock =
    ``default_stock`` (the dataset has none), created_at = first sale. Customers: id and
    their most frequent country.
    """

    path: Path
    default_stock: int = 100
    limit: int = 0  # keep only the first N rows of the file (tests, quick looks)
    name: str = "online-retail"
    items_are_partial: bool = False

    def __post_init__(self) -> None:
        self._df: Any = None

    def frame(self) -> Any:
        if self._df is None:
            import pandas as pd

            if not Path(self.path).exists():
                raise DatasetUnavailable(f"no Online Retail file at {self.path}")
            df = pd.read_csv(
                self.path,
                dtype={"InvoiceNo": str, "StockCode": str, "CustomerID": "Int64"},
                nrows=self.limit or None,
            )
            df["line"] = df.groupby("InvoiceNo", sort=False).cumcount() + 1
            keep = (
                ~df["InvoiceNo"].str.startswith(("C", "c"))
                & df["CustomerID"].notna()
                & df["StockCode"].str.match(PRODUCT_CODE)
                & (df["Quantity"] > 0)
                & (df["UnitPrice"] > 0)
            )
            df = df[keep].copy()
            df["ts"] = pd.to_datetime(df["InvoiceDate"], utc=True)
            df["customer_id"] = df["CustomerID"].astype("int64").astype(str)
            self._df = df.sort_values("ts", kind="stable")
        return self._df

    def items(self) -> Iterator[common_pb2.Item]:
        df = self.frame()
        grouped = df.groupby("StockCode", sort=True).agg(
            title=("Description", lambda s: s.dropna().iloc[-1] if s.notna().any() else ""),
            price=("UnitPrice", "median"),
            created=("ts", "min"),
        )
        for code, row in grouped.iterrows():
            title = str(row["title"]).strip()
            words = title.split()
            yield common_pb2.Item(
                item_id=str(code),
                title=title,
                category=words[-1].lower() if words else "",
                price=float(row["price"]),
                currency="GBP",
                stock=self.default_stock,
                created_at=_ts(row["created"]),
            )

    def customers(self) -> Iterator[profile_pb2.Customer]:
        df = self.frame()
        countries = df.groupby("customer_id")["Country"].agg(lambda s: s.mode().iloc[0])
        for cid, country in countries.items():
            yield profile_pb2.Customer(customer_id=str(cid), country=str(country))

    def events(self) -> Iterator[common_pb2.Event]:
        df = self.frame()
        for inv, line, code, qty, price, ts, cid in zip(
            df["InvoiceNo"],
            df["line"],
            df["StockCode"],
            df["Quantity"],
            df["UnitPrice"],
            df["ts"],
            df["customer_id"],
            strict=True,
        ):
            yield common_pb2.Event(
                event_id=f"online-retail:{inv}:{line}",
                customer_id=cid,
                type=common_pb2.EVENT_TYPE_PURCHASE,
                item_id=code,
                quantity=int(qty),
                price=float(price),
                timestamp=us_to_ts(int(ts.value // 1000)),
                order_id=str(inv),
            )

    def event_count(self) -> int | None:
        return len(self.frame())


# --- the export format ------------------------------------------------------------------


@dataclass
class EventsFile:
    """A CSV or Parquet file written by ``mercato export-events``. Items are sketched
    from the events (id, category, latest price), customers come with their events."""

    path: Path
    default_stock: int = 100
    name: str = "events"
    items_are_partial: bool = True

    def __post_init__(self) -> None:
        self._df: Any = None

    def frame(self) -> Any:
        if self._df is None:
            from services.profile.export import read_events_frame

            if not Path(self.path).exists():
                raise DatasetUnavailable(f"no events file at {self.path}")
            self._df = read_events_frame(Path(self.path))
        return self._df

    def items(self) -> Iterator[common_pb2.Item]:
        df = self.frame()
        seen = df[df["item_id"] != ""]
        last = seen.groupby("item_id", sort=True).agg(
            category=("category", "last"), price=("price", "last")
        )
        for item_id, row in last.iterrows():
            yield common_pb2.Item(
                item_id=str(item_id),
                category=str(row["category"]),
                price=float(row["price"]),
                stock=self.default_stock,
            )

    def customers(self) -> Iterator[profile_pb2.Customer]:
        return iter(())

    def events(self) -> Iterator[common_pb2.Event]:
        df = self.frame()
        for row in df.itertuples(index=False):
            ev = common_pb2.Event(
                event_id=row.event_id,
                customer_id=row.customer_id,
                type=EVENT_TYPES_BY_NAME.get(row.event_type, 0),  # type: ignore[arg-type]
                item_id=row.item_id,
                quantity=int(row.quantity),
                price=float(row.price),
                timestamp=_ts(row.timestamp),
                session_id=row.session_id,
                order_id=row.order_id,
                offer_id=row.offer_id,
                surface=SURFACES_BY_NAME.get(row.surface, 0),  # type: ignore[arg-type]
                request_id=row.request_id,
                experiment=row.experiment,
                variant=row.variant,
            )
            if row.attributes:
                ev.attributes.update(json.loads(row.attributes))
            yield ev

    def event_count(self) -> int | None:
        return len(self.frame())


# --- registry ---------------------------------------------------------------------------


ADAPTERS: dict[str, Callable[..., ProfileDataset]] = {
    "online-retail": lambda path, **kw: OnlineRetail(Path(path), **kw),
    "events": lambda path, **kw: EventsFile(Path(path), **kw),
}


def register_adapter(kind: str, factory: Callable[..., ProfileDataset]) -> None:
    """Make ``open_dataset(kind, path, **options)`` call ``factory(path, **options)``."""
    ADAPTERS[kind] = factory


def open_dataset(kind: str, path: str, **options: Any) -> ProfileDataset:
    """The adapter ``kind`` on ``path``."""
    if kind not in ADAPTERS:
        hint = (
            " (the synthetic shop is registered by the `mercato` command, from the training "
            "package)"
            if kind == "synthetic"
            else ""
        )
        raise DatasetUnavailable(f"unknown dataset {kind!r}; one of {', '.join(ADAPTERS)}{hint}")
    return ADAPTERS[kind](path, **options)
