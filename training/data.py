"""The data model every loader produces, and the train / validation / test splits.

A :class:`RetailData` holds three tables:

- ``events``: ``user_id`` (str), ``item_id`` (str), ``ts`` (int, epoch seconds; 0 when
  unknown), ``event`` ("view", "cart", "purchase" or "rating"), ``session_id`` (int,
  unique per user; an invoice or a visit), ``surface`` (str, "" when unknown);
- ``items``: ``item_id``, ``category`` ("" when unknown), ``price`` (0 when unknown) and
  free attributes as ``attr_<name>`` columns;
- ``users``: ``user_id``, ``country`` ("" when unknown).

``target_events`` are the event types that count as ground truth in evaluation (for
retail: purchases). Splits keep rows of ``events`` and never mix a session across parts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

EVENT_TYPES = ("view", "cart", "purchase", "rating")
EVENT_CODE = {e: i for i, e in enumerate(EVENT_TYPES)}
EVENT_COLUMNS = ("user_id", "item_id", "ts", "event", "session_id", "surface")


@dataclass
class RetailData:
    """Interactions, catalog and customers of one data set."""

    name: str
    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    target_events: tuple[str, ...] = ("purchase",)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.events = _normalise_events(self.events)
        self.items = _normalise_items(self.items, self.events)
        self.users = _normalise_users(self.users, self.events)
        unknown = set(self.target_events) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"unknown target events {sorted(unknown)}")

    @property
    def attribute_columns(self) -> list[str]:
        return [c for c in self.items.columns if c.startswith("attr_")]

    def fingerprint(self) -> str:
        """A short hash of the events and catalog (identifies the data of a split)."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        cols = ["user_id", "item_id", "ts", "event", "session_id"]
        h.update(pd.util.hash_pandas_object(self.events[cols], index=False).to_numpy().tobytes())
        h.update(
            pd.util.hash_pandas_object(self.items["item_id"], index=False).to_numpy().tobytes()
        )
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        ev = self.events
        return {
            "dataset": self.name,
            "events": len(ev),
            "users": int(ev["user_id"].nunique()),
            "items": len(self.items),
            "items_with_events": int(ev["item_id"].nunique()),
            **{f"events_{k}": int(v) for k, v in ev["event"].value_counts().items()},
        }


def _normalise_events(ev: pd.DataFrame) -> pd.DataFrame:
    missing = {"user_id", "item_id", "event"} - set(ev.columns)
    if missing:
        raise ValueError(f"events lack columns {sorted(missing)}")
    ev = ev.copy()
    ev["user_id"] = ev["user_id"].astype(str)
    ev["item_id"] = ev["item_id"].astype(str)
    ev["ts"] = ev["ts"].astype(np.int64) if "ts" in ev else np.zeros(len(ev), dtype=np.int64)
    ev["event"] = ev["event"].astype(str)
    bad = set(ev["event"].unique()) - set(EVENT_TYPES)
    if bad:
        raise ValueError(f"unknown event types {sorted(bad)}")
    if "session_id" not in ev:
        ev["session_id"] = np.arange(len(ev), dtype=np.int64)
    ev["session_id"] = ev["session_id"].astype(np.int64)
    ev["surface"] = ev["surface"].astype(str) if "surface" in ev else ""
    return ev[list(EVENT_COLUMNS)].reset_index(drop=True)


def _normalise_items(items: pd.DataFrame, ev: pd.DataFrame) -> pd.DataFrame:
    items = items.copy()
    items["item_id"] = items["item_id"].astype(str)
    items = items.drop_duplicates("item_id", keep="last")
    items["category"] = items["category"].fillna("").astype(str) if "category" in items else ""
    items["price"] = items["price"].fillna(0.0).astype(np.float64) if "price" in items else 0.0
    extra = pd.Index(ev["item_id"].unique()).difference(pd.Index(items["item_id"]))
    if len(extra):
        items = pd.concat(
            [items, pd.DataFrame({"item_id": extra, "category": "", "price": 0.0})],
            ignore_index=True,
        )
    for c in items.columns:
        if c.startswith("attr_"):
            items[c] = items[c].fillna("").astype(str)
    return items.reset_index(drop=True)


def _normalise_users(users: pd.DataFrame, ev: pd.DataFrame) -> pd.DataFrame:
    users = users.copy() if users is not None else pd.DataFrame({"user_id": []})
    users["user_id"] = users["user_id"].astype(str)
    users["country"] = users["country"].fillna("").astype(str) if "country" in users else ""
    users = users.drop_duplicates("user_id", keep="last")
    extra = pd.Index(ev["user_id"].unique()).difference(pd.Index(users["user_id"]))
    if len(extra):
        users = pd.concat(
            [users, pd.DataFrame({"user_id": extra, "country": ""})], ignore_index=True
        )
    return users.reset_index(drop=True)


@dataclass
class Split:
    """Train / validation / test rows of one data set's events."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    kind: str
    params: dict[str, Any]
    data_fingerprint: str

    def signature(self) -> str:
        """Identifies data + split: models are only compared on the same signature."""
        key = f"{self.data_fingerprint}|{self.kind}|{sorted(self.params.items())}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def summary(self) -> dict[str, int]:
        return {
            "train_events": len(self.train),
            "valid_events": len(self.valid),
            "test_events": len(self.test),
        }


def time_split(data: RetailData, valid_frac: float = 0.1, test_frac: float = 0.1) -> Split:
    """Train on the past, validate and test on the future.

    Sessions are assigned whole, by their start time; the boundaries are the quantiles of
    session start over events so that the parts hold about ``valid_frac`` / ``test_frac``
    of the events.
    """
    ev = data.events
    if (ev["ts"] == 0).all():
        raise ValueError(f"{data.name} has no timestamps: use the per-user random split")
    start = ev.groupby(["user_id", "session_id"], sort=False)["ts"].transform("min").to_numpy()
    t1 = float(np.quantile(start, 1.0 - valid_frac - test_frac))
    t2 = float(np.quantile(start, 1.0 - test_frac))
    train, valid, test = ev[start < t1], ev[(start >= t1) & (start < t2)], ev[start >= t2]
    return Split(
        train=train.reset_index(drop=True),
        valid=valid.reset_index(drop=True),
        test=test.reset_index(drop=True),
        kind="time",
        params={"valid_frac": valid_frac, "test_frac": test_frac, "t1": int(t1), "t2": int(t2)},
        data_fingerprint=data.fingerprint(),
    )


def user_random_split(
    data: RetailData, valid_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0
) -> Split:
    """Per user, a random ``valid_frac`` / ``test_frac`` of their sessions (RecBole-style
    ratio split); every user keeps at least one session in train."""
    ev = data.events
    keys = ev[["user_id", "session_id"]].drop_duplicates().reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keys["r"] = rng.random(len(keys))
    keys["rank"] = keys.groupby("user_id")["r"].rank(method="first").astype(int) - 1
    n = keys.groupby("user_id")["r"].transform("size").to_numpy()
    n_test = np.floor(n * test_frac).astype(int)
    n_valid = np.floor(n * valid_frac).astype(int)
    rank = keys["rank"].to_numpy()
    part = np.where(rank < n_test, 2, np.where(rank < n_test + n_valid, 1, 0))
    keys["part"] = np.where(n - n_test - n_valid >= 1, part, 0)
    merged = ev.merge(keys[["user_id", "session_id", "part"]], on=["user_id", "session_id"])
    parts = [
        merged[merged["part"] == p].drop(columns="part").reset_index(drop=True) for p in range(3)
    ]
    return Split(
        train=parts[0],
        valid=parts[1],
        test=parts[2],
        kind="user-random",
        params={"valid_frac": valid_frac, "test_frac": test_frac, "seed": seed},
        data_fingerprint=data.fingerprint(),
    )


def k_core(data: RetailData, min_user: int, min_item: int) -> RetailData:
    """Keep users and items with at least ``min_user`` / ``min_item`` interactions,
    repeating until both hold (RecBole's ``user/item_inter_num_interval``)."""
    ev = data.events
    while True:
        n = len(ev)
        if min_item:
            c = ev["item_id"].map(ev["item_id"].value_counts())
            ev = ev[c >= min_item]
        if min_user:
            c = ev["user_id"].map(ev["user_id"].value_counts())
            ev = ev[c >= min_user]
        if len(ev) == n:
            break
    items = data.items[data.items["item_id"].isin(ev["item_id"].unique())]
    users = data.users[data.users["user_id"].isin(ev["user_id"].unique())]
    meta = {**data.meta, "k_core": [min_user, min_item]}
    return RetailData(data.name, ev, items, users, data.target_events, meta)
