"""Loaders for real public formats, into :class:`training.data.RetailData`.

- UCI Online Retail invoices (``online_retail.csv.gz`` or a folder holding it): every
  invoice line is a purchase; cancellations (``C``), bad-debt adjustments (``A``), lines
  without a customer, non-positive quantities or prices and non-product codes (postage,
  fees, manual lines: anything whose StockCode does not start with five digits) are
  dropped; exact duplicate lines, and several lines of one item in one invoice, are one
  purchase. An item's category is the head noun of
  its most common description (its last word that is not a number or a filler: "...
  T-LIGHT HOLDER" -> "holder"), its price the median unit price (price bands are derived
  from price quantiles by the feature vocabulary), its style attribute the first word.
- MovieLens ratings (``ratings.csv.gz`` with user_id, item_id, rating; the ML-1M copy has
  no timestamps): every rating >= ``min_rating`` is an interaction; the first genre of
  the movie (from ``movies.dat`` via ``item_map.csv`` where present) is the category.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from training.data import RetailData

ONLINE_RETAIL_FILE = "online_retail.csv.gz"


def _file(path: str | Path, name: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    return p


_STOP = {"of", "and", "with", "in", "the", "a", "for", "set", "design", "asst", "assorted"}


def _head_noun(description: str) -> str:
    """The last lower-case word of a description that is not a number or a stop word."""
    words = ["".join(ch for ch in w.lower() if ch.isalpha()) for w in description.split()]
    words = [w for w in words if len(w) > 1]
    for w in reversed(words):
        if w not in _STOP:
            return w
    return words[-1] if words else ""


def load_online_retail(path: str | Path, nrows: int | None = None) -> RetailData:
    """UCI Online Retail invoices as purchase events (sessions = invoices)."""
    f = _file(path, ONLINE_RETAIL_FILE)
    df = pd.read_csv(
        f,
        dtype={"InvoiceNo": str, "StockCode": str, "CustomerID": "Int64", "Description": str},
        parse_dates=["InvoiceDate"],
        nrows=nrows,
    )
    df = df[~df["InvoiceNo"].str[0].isin(["C", "A"])]
    df = df[df["CustomerID"].notna() & (df["Quantity"] > 0) & (df["UnitPrice"] > 0)]
    df = df[df["StockCode"].str.match(r"^\d{5}")]
    df = df.drop_duplicates()
    desc = df["Description"].fillna("").str.strip().str.upper()
    common = (
        pd.DataFrame({"item_id": df["StockCode"], "d": desc})
        .groupby("item_id")["d"]
        .agg(lambda s: s.value_counts().index[0])
    )
    # Last word with letters ("SET OF 3" -> "of" is avoided by skipping stop words).
    noun = common.map(_head_noun)
    items = pd.DataFrame(
        {
            "item_id": common.index.astype(str),
            "category": noun.to_numpy(),
            "price": df.groupby("StockCode")["UnitPrice"].median().reindex(common.index).to_numpy(),
            "attr_title": common.to_numpy(),
        }
    )
    # A title is too specific to hash usefully; keep its first word as a style attribute.
    items["attr_style"] = items.pop("attr_title").str.split().str[0].fillna("").str.lower()
    ts = (df["InvoiceDate"].astype("datetime64[s]").astype(np.int64)).to_numpy()
    events = pd.DataFrame(
        {
            "user_id": df["CustomerID"].astype(str).to_numpy(),
            "item_id": df["StockCode"].to_numpy(),
            "ts": ts,
            "event": "purchase",
            "session_id": df["InvoiceNo"].astype(np.int64).to_numpy(),
            "surface": "",
        }
    )
    # Several lines of one item in one invoice are one purchase of it.
    events = events.drop_duplicates(["session_id", "item_id"]).reset_index(drop=True)
    users = (
        df.groupby("CustomerID")["Country"].agg(lambda s: s.value_counts().index[0]).reset_index()
    )
    users.columns = ["user_id", "country"]
    users["user_id"] = users["user_id"].astype(str)
    return RetailData(
        name="online-retail",
        events=events,
        items=items,
        users=users,
        target_events=("purchase",),
        meta={"path": str(f)},
    )


def load_movielens(path: str | Path, min_rating: int = 0, seed: int = 0) -> RetailData:
    """MovieLens ratings as interactions (``rating`` events, no timestamps in ML-1M).

    Without timestamps the order of a user's ratings is unknown: the file is sorted by
    item id, which follows release order, and replaying it in that order would teach a
    sequence that the evaluation never shows. Session ids (one per rating) are therefore
    a seeded random permutation, so history replay sees the ratings in a random order.
    """
    p = Path(path)
    f = _file(p, "ratings.csv.gz")
    r = pd.read_csv(f)
    if min_rating:
        r = r[r["rating"] >= min_rating]
    d = f.parent
    items = pd.DataFrame({"item_id": np.sort(r["item_id"].unique()).astype(str)})
    items["category"] = ""
    if (d / "item_map.csv").is_file() and (d / "movies.dat").is_file():
        m = pd.read_csv(d / "item_map.csv", dtype={"movie_id": "Int64"})
        mv = pd.read_csv(
            d / "movies.dat",
            sep="::",
            engine="python",
            names=["movie_id", "title", "genres"],
            encoding="utf-8",
        )
        genre = m.merge(mv, on="movie_id", how="left").set_index("item_id")["genres"]
        first = genre.fillna("").str.split("|").str[0].str.lower()
        items["category"] = items["item_id"].astype(int).map(first).fillna("").to_numpy()
    items["price"] = 0.0
    has_ts = "timestamp" in r.columns
    session = (
        np.arange(len(r), dtype=np.int64)
        if has_ts
        else np.random.default_rng(seed).permutation(len(r)).astype(np.int64)
    )
    events = pd.DataFrame(
        {
            "user_id": r["user_id"].astype(str).to_numpy(),
            "item_id": r["item_id"].astype(str).to_numpy(),
            "ts": r["timestamp"].to_numpy(np.int64) if has_ts else 0,
            "event": "rating",
            "session_id": session,
            "surface": "",
        }
    )
    users = pd.DataFrame({"user_id": np.sort(r["user_id"].unique()).astype(str), "country": ""})
    return RetailData(
        name="movielens",
        events=events,
        items=items,
        users=users,
        target_events=("rating",),
        meta={"path": str(f), "min_rating": min_rating, "seed": seed},
    )


# Export event types -> training event types; the rest (remove_from_cart, offers, clicks,
# exposures) are not interactions with an item the model learns from.
EXPORT_EVENTS = {"view": "view", "add_to_cart": "cart", "purchase": "purchase"}


def load_events_export(path: str | Path) -> RetailData:
    """The event log of the profile service, as written by ``mercato export-events``
    (CSV or Parquet; see :mod:`services.profile.export`).

    Views, add-to-carts and purchases with an item become view / cart / purchase events;
    a session is the export's ``session_id``, else its ``order_id``, else the event
    alone. Items get their latest logged category and median positive price.
    """
    from services.profile.export import read_events_frame

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    df = read_events_frame(p)
    df = df[df["event_type"].isin(list(EXPORT_EVENTS)) & (df["item_id"] != "")]
    if df.empty:
        raise ValueError(f"{p} holds no view, add_to_cart or purchase events with an item")
    df = df.sort_values("timestamp", kind="stable")
    key = df["session_id"].where(df["session_id"] != "", df["order_id"])
    key = key.where(key != "", "event:" + df["event_id"])
    session = pd.factorize(df["customer_id"] + "\x1f" + key)[0].astype(np.int64)
    epoch = pd.Timestamp(0, tz="UTC")
    ts = ((df["timestamp"] - epoch) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    events = pd.DataFrame(
        {
            "user_id": df["customer_id"].to_numpy(),
            "item_id": df["item_id"].to_numpy(),
            "ts": ts,
            "event": df["event_type"].map(EXPORT_EVENTS).to_numpy(),
            "session_id": session,
            "surface": df["surface"].to_numpy(),
        }
    )
    priced = df[df["price"] > 0]
    items = pd.DataFrame({"item_id": np.sort(df["item_id"].unique())})
    items["category"] = items["item_id"].map(df.groupby("item_id")["category"].last()).fillna("")
    items["price"] = items["item_id"].map(priced.groupby("item_id")["price"].median()).fillna(0.0)
    users = pd.DataFrame({"user_id": np.sort(df["customer_id"].unique()), "country": ""})
    return RetailData(
        name="events",
        events=events,
        items=items,
        users=users,
        target_events=("purchase",),
        meta={"path": str(p)},
    )
