"""A small known shop for the console's tests: an export frame built event by event."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from services.profile.export import COLUMNS

#: The data ends well before the wall clock, as the demo's does.
END = pd.Timestamp("2024-03-01T00:00:00Z")
ITEMS = {  # item -> (category, price, stock)
    "A": ("food/bread", 2.0, 100),
    "B": ("food/bread", 3.0, 4),
    "C": ("home/lamps", 40.0, 0),
    "D": ("home/lamps", 25.0, 50),
    "E": ("home/rugs", 90.0, 7),
}


@dataclass
class Shop:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, customer: str, kind: str, at: pd.Timestamp, item: str = "", **kw: Any) -> None:
        cat = ITEMS[item][0] if item else ""
        price = kw.pop("price", ITEMS[item][1] if item else 0.0)
        attrs = kw.pop("attributes", None)
        row = {
            "event_id": f"e{len(self.rows)}",
            "customer_id": customer,
            "event_type": kind,
            "item_id": item,
            "category": cat,
            "quantity": kw.pop("quantity", 1 if kind in ("purchase", "add_to_cart") else 0),
            "price": float(price),
            "timestamp": at,
            "session_id": "",
            "order_id": kw.pop("order_id", ""),
            "offer_id": kw.pop("offer_id", ""),
            "surface": kw.pop("surface", ""),
            "request_id": "",
            "experiment": kw.pop("experiment", ""),
            "variant": kw.pop("variant", ""),
            "attributes": json.dumps(attrs, sort_keys=True) if attrs else "",
            "ingested_at": at,
        }
        assert not kw, kw
        self.rows.append(row)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=list(COLUMNS))
        for col in ("timestamp", "ingested_at"):
            df[col] = pd.to_datetime(df[col], utc=True)
        df["quantity"] = df["quantity"].astype("int64")
        return df

    def write(self, path: Path) -> Path:
        self.frame().to_parquet(path, index=False)
        return path


def known_shop() -> Shop:
    """Eight weeks of sales with known weekly units, customers in known segments, offers
    shown and redeemed, and one A/B experiment."""
    s = Shop()
    day = pd.Timedelta(days=1)
    # weekly units of A in weeks 4..1 before END (newest last): 1, 2, 3, 6; B: 4 every
    # week; D: 5 in the week before last, 1 in the last; E: 0 sold (a slow mover)
    units = {"A": [1, 2, 3, 6], "B": [4, 4, 4, 4], "D": [0, 0, 5, 1]}
    n = 0
    for item, per_week in units.items():
        for w, u in enumerate(per_week):  # w = 0 is 4 weeks before END
            start = END - (4 - w) * 7 * day
            for k in range(u):
                n += 1
                s.add(
                    f"buyer{n % 5}",
                    "purchase",
                    start + (k % 7) * day + pd.Timedelta(hours=10),
                    item,
                    order_id=f"o{n}",
                )
    # C (out of stock) sold 2 units in the last week: demand that is now lost
    for k in range(2):
        s.add("buyer1", "purchase", END - (6 - k) * day, "C", order_id=f"oc{k}")
    # older customers: one at risk (last purchase 100 days ago), one lapsed (400 days)
    s.add("old1", "purchase", END - 100 * day, "A", order_id="x1")
    s.add("old2", "purchase", END - 400 * day, "A", order_id="x2")
    # a loyal customer: 4 orders, the last 10 days ago
    for k in range(4):
        s.add("loyal", "purchase", END - (10 + 20 * k) * day, "D", order_id=f"l{k}")
    # a new customer who only viewed
    s.add("viewer", "view", END - 2 * day, "A")
    s.add("viewer", "view", END - pd.Timedelta(seconds=1), "B")  # the newest shopper event
    # browsing: 30 views a day for 8 weeks (a busy history next to the few live events)
    for d in range(56):
        for k in range(30):
            s.add(f"browser{k}", "view", END - (56 - d) * day + pd.Timedelta(minutes=k), "A")
    # exposures (the gateway's clock is the wall clock, long after the data)
    wall = pd.Timestamp("2026-05-01T12:00:00Z")
    for i in range(10):
        arm = "control" if i % 2 == 0 else "challenger"
        items = ["C", "A"] if i < 3 else ["A", "B"]
        s.add(
            f"x{i}",
            "exposure",
            wall + i * pd.Timedelta(minutes=1),
            surface="cart" if i < 6 else "home",
            offer_id="pct10" if i in (0, 1, 2) else "",
            experiment="ranker-test",
            variant=arm,
            attributes={
                "items": json.dumps(items),
                "experiments": json.dumps({"ranker-test": arm}),
                "degraded": "ranking" if i == 9 else "",
            },
        )
    # outcomes after the exposures: x0, x1 buy (x0 redeems pct10 on an order of 50), x3 buys
    for cid, value in (("x0", 50.0), ("x1", 30.0), ("x3", 20.0)):
        s.add(cid, "click", wall + pd.Timedelta(minutes=20), "A")
        s.add(
            cid, "purchase", wall + pd.Timedelta(minutes=30), "A", price=value, order_id=f"w{cid}"
        )
    s.add("x0", "offer_redeemed", wall + pd.Timedelta(minutes=31), price=50.0, offer_id="pct10")
    return s


def items_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"item_id": i, "title": f"item {i}", "category": c, "price": p, "stock": st}
            for i, (c, p, st) in ITEMS.items()
        ]
    )
