"""What the console's pages compute from the exported event log (``mercato
export-events``), the catalog and the offer catalog. Pure functions of pandas frames, so
that each page's numbers can be checked against a direct computation.

Frames: ``events`` is :func:`services.profile.export.read_events_frame` (UTC timestamps);
``items`` has columns ``item_id, title, category, price, stock`` (the profile service's
``ListItems``).

Time: every window is measured back from a :class:`Clock`. On a live shop that is the
wall clock; on historical data (the demo's synthetic shop ends in 2024) it is the time
of the newest shopper event, so "last week" is the data's last week. The pages say which.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from services.profile.logic import ProfileConfig, segment_of

DAY = pd.Timedelta(days=1)
WEEK = pd.Timedelta(days=7)
#: Events a shopper makes (not the system's exposures / offer_shown).
SHOPPER_EVENTS = ("view", "add_to_cart", "remove_from_cart", "purchase", "click", "offer_redeemed")
#: The data is "historical" when its newest shopper event is older than this.
STALE_AFTER_DAYS = 7.0
TRICKLE_SHARE = 0.05
SEGMENTS = ("new", "active", "loyal", "at_risk", "lapsed")
PERIOD_DAYS = {"day": 1.0, "week": 7.0, "month": 30.0}


# --- time ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Clock:
    """ "Now" for every window, and where it comes from."""

    now: pd.Timestamp
    wall: pd.Timestamp
    source: str  # "data" | "wall clock"

    def describe(self) -> str:
        if self.source == "data":
            return (
                f"data time {self.now:%Y-%m-%d %H:%M} UTC (the newest shopper event; the "
                f"data is older than the wall clock, {self.wall:%Y-%m-%d %H:%M} UTC)"
            )
        return f"wall clock {self.now:%Y-%m-%d %H:%M} UTC"

    def as_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "wall": self.wall.isoformat(),
            "source": self.source,
            "text": self.describe(),
        }


def clock_of(
    latest: pd.Timestamp | None,
    wall: pd.Timestamp | None = None,
    stale_after_days: float = STALE_AFTER_DAYS,
) -> Clock:
    """The data's clock when its newest activity ``latest`` is older than
    ``stale_after_days``, else the wall clock."""
    wall = wall if wall is not None else pd.Timestamp.now(tz="UTC")
    stale = pd.Timedelta(days=stale_after_days)
    if latest is not None and not pd.isna(latest) and wall - latest > stale:
        return Clock(pd.Timestamp(latest), wall, "data")
    return Clock(wall, wall, "wall clock")


def events_clock(events: pd.DataFrame, wall: pd.Timestamp | None = None) -> Clock:
    """The clock of an export. Its newest shopper event decides, except that a trickle of
    events after a long silence (a gap of over ``STALE_AFTER_DAYS`` followed by less than
    ``TRICKLE_SHARE`` of all shopper events: a demo's live clicks on historical data)
    does not move "now": then the newest event before the gap does."""
    shopper = events[events["event_type"].isin(SHOPPER_EVENTS)]
    if shopper.empty:
        return clock_of(None, wall)
    ts = shopper["timestamp"].sort_values(ignore_index=True)
    gaps = ts.diff() > pd.Timedelta(days=STALE_AFTER_DAYS)
    latest = ts.iloc[-1]
    if gaps.any():
        first_after = int(np.flatnonzero(gaps.to_numpy())[-1])
        if len(ts) - first_after < TRICKLE_SHARE * len(ts):
            latest = ts.iloc[first_after - 1]
    return clock_of(latest, wall)


def _between(df: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    ts = df["timestamp"]
    return df[(ts >= start) & (ts < end)]


def _us(ts: pd.Series) -> pd.Series:
    """UTC timestamps as microseconds since the epoch."""
    return (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)


def purchases(events: pd.DataFrame) -> pd.DataFrame:
    p = events[events["event_type"] == "purchase"].copy()
    p["units"] = p["quantity"].clip(lower=1)
    p["revenue"] = p["units"] * p["price"]
    return p


# --- demand ---------------------------------------------------------------------------

#: Weights of the last four weeks (newest first) in the demand level.
LEVEL_WEIGHTS = (0.4, 0.3, 0.2, 0.1)


def weekly_units(events: pd.DataFrame, as_of: pd.Timestamp, weeks: int) -> pd.DataFrame:
    """Units sold per item in each of the ``weeks`` weeks before ``as_of``; column 0 is
    the newest week."""
    p = purchases(_between(events, as_of - weeks * WEEK, as_of))
    if p.empty:
        return pd.DataFrame(columns=list(range(weeks)), dtype=float)
    week = ((as_of - p["timestamp"]) // WEEK).astype(int)
    table = p.assign(week=week).pivot_table(
        index="item_id", columns="week", values="units", aggfunc="sum", fill_value=0
    )
    return table.reindex(columns=range(weeks), fill_value=0).astype(float)


def trend_forecast(events: pd.DataFrame, as_of: pd.Timestamp) -> pd.Series:
    """Units per item expected in the 7 days after ``as_of`` from sales before it:

    ``level = 0.4 w1 + 0.3 w2 + 0.2 w3 + 0.1 w4`` (w1 = the last week's units) times a
    damped week-over-week trend ``sqrt(clip((w1 + 1) / (w2 + 1), 0.5, 2))``."""
    w = weekly_units(events, as_of, 4)
    if w.empty:
        return pd.Series(dtype=float)
    level = sum(LEVEL_WEIGHTS[i] * w[i] for i in range(4))
    growth = ((w[0] + 1) / (w[1] + 1)).clip(0.5, 2.0) ** 0.5
    return (level * growth).rename("trend")


@dataclass(frozen=True)
class Shopper:
    """What the model needs about one recently buying customer (history before as_of)."""

    customer_id: str
    units_per_week: float
    recent_item_ids: list[str]  # newest first
    purchased_item_ids: list[str]
    category_affinity: dict[str, float]


#: Given shoppers, each one's top items with the model's raw scores (higher = better).
Scorer = Callable[[Sequence[Shopper]], list[list[tuple[str, float]]]]
#: Model part per shopper: (units per week, [(item, score)]).
Parts = list[tuple[float, list[tuple[str, float]]]]
#: Softmax temperatures and model weights tried on the validation week.
TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0)
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Tuning:
    """How the model's scores become demand, chosen on a validation week."""

    weight: float = 0.0  # of the model in the blend
    temperature: float = 0.1  # softmax over each shopper's top items
    validation_wape: float = float("nan")
    validation_week: tuple[str, str] = ("", "")


def shoppers(events: pd.DataFrame, as_of: pd.Timestamp, weeks: int = 4) -> list[Shopper]:
    """Customers who bought in the ``weeks`` before ``as_of``, with their purchase rate
    and their history up to ``as_of``."""
    hist = events[events["timestamp"] < as_of]
    p = purchases(_between(hist, as_of - weeks * WEEK, as_of))
    if p.empty:
        return []
    rate = p.groupby("customer_id")["units"].sum() / weeks
    mine = hist[hist["customer_id"].isin(rate.index) & (hist["item_id"] != "")]
    mine = mine[mine["event_type"].isin(("view", "add_to_cart", "purchase", "click"))]
    mine = mine.sort_values("timestamp", ascending=False)
    out = []
    for cid, g in mine.groupby("customer_id", sort=True):
        recent = list(dict.fromkeys(g["item_id"].head(50)))
        bought = list(dict.fromkeys(g.loc[g["event_type"] == "purchase", "item_id"]))
        cats = g["category"][g["category"] != ""].value_counts(normalize=True)
        out.append(
            Shopper(
                customer_id=str(cid),
                units_per_week=float(rate.get(cid, 0.0)),
                recent_item_ids=recent,
                purchased_item_ids=bought,
                category_affinity={str(k): float(v) for k, v in cats.items()},
            )
        )
    return out


def model_parts(events: pd.DataFrame, as_of: pd.Timestamp, scorer: Scorer) -> Parts:
    """Every customer who bought in the 4 weeks before ``as_of``: their weekly rate and
    the model's top items for them (from their history before ``as_of``)."""
    who = shoppers(events, as_of)
    return [(s.units_per_week, top) for s, top in zip(who, scorer(who) if who else [], strict=True)]


def spread(parts: Parts, temperature: float) -> pd.Series:
    """Units per item in the next 7 days by the model: every recent buyer keeps buying at
    their rate, spread over their top items by ``softmax(score / temperature)``:
    ``sum_c rate_c * p_c(item)``."""
    demand: dict[str, float] = {}
    for rate, top in parts:
        if not top:
            continue
        z = np.array([sc for _, sc in top]) / temperature
        w = np.exp(z - z.max())
        w /= w.sum()
        for (item_id, _), share in zip(top, w, strict=True):
            demand[item_id] = demand.get(item_id, 0.0) + rate * float(share)
    return pd.Series(demand, dtype=float, name="model")


def _blend(trend: pd.Series, model: pd.Series, weight: float) -> pd.DataFrame:
    idx = trend.index.union(model.index)
    df = pd.DataFrame(
        {"trend": trend.reindex(idx, fill_value=0.0), "model": model.reindex(idx, fill_value=0.0)}
    )
    df["forecast"] = (1 - weight) * df["trend"] + weight * df["model"]
    return df


def sold(events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.Series:
    return purchases(_between(events, start, end)).groupby("item_id")["units"].sum().astype(float)


def tune(events: pd.DataFrame, as_of: pd.Timestamp, scorer: Scorer) -> Tuning:
    """The weight and temperature with the lowest WAPE on the validation week
    ``[as_of - 7 d, as_of)``, forecast from the events before it. Nothing at or after
    ``as_of`` is read."""
    start = as_of - WEEK
    seen = events[events["timestamp"] < start]
    actual = sold(events, start, as_of)
    trend = trend_forecast(seen, start)
    parts = model_parts(seen, start, scorer)
    best = Tuning()
    best_wape = float("inf")
    for t in TEMPERATURES:
        model = spread(parts, t)
        for w in WEIGHTS:
            wape = _errors(_blend(trend, model, w)["forecast"], actual)["wape"]
            if wape < best_wape - 1e-12:
                best_wape = wape
                best = Tuning(w, t, wape, (start.isoformat(), as_of.isoformat()))
    return best


def forecast(
    events: pd.DataFrame,
    as_of: pd.Timestamp,
    scorer: Scorer | None = None,
    tuning: Tuning | None = None,
) -> pd.DataFrame:
    """Columns ``trend``, ``model`` (0 without a scorer) and ``forecast``, the blend
    ``(1 - w) trend + w model`` with ``w`` and the temperature of ``tuning`` (chosen on
    the week before ``as_of`` when not given); the trend alone without a model."""
    trend = trend_forecast(events, as_of)
    if scorer is None:
        return _blend(trend, pd.Series(dtype=float), 0.0)
    tuning = tuning or tune(events, as_of, scorer)
    model = spread(model_parts(events, as_of, scorer), tuning.temperature)
    return _blend(trend, model, tuning.weight)


def _errors(pred: pd.Series, actual: pd.Series) -> dict[str, float]:
    idx = pred.index.union(actual.index)
    f = pred.reindex(idx, fill_value=0.0)
    a = actual.reindex(idx, fill_value=0.0)
    err = (f - a).abs()
    total = float(a.sum())
    return {
        "wape": float(err.sum() / total) if total > 0 else float("nan"),
        "mae": float(err.mean()) if len(idx) else float("nan"),
        "bias": float((f.sum() - total) / total) if total > 0 else float("nan"),
        "forecast_units": float(f.sum()),
        "actual_units": total,
    }


def backtest(
    events: pd.DataFrame, as_of: pd.Timestamp, scorer: Scorer | None = None
) -> dict[str, Any]:
    """The forecast made at ``as_of - 7 days`` from the events before it (its weight and
    temperature chosen on the week before that), against the units actually sold in the
    held-out 7 days ``[as_of - 7 d, as_of)``. Errors per item: WAPE (sum |f - a| / sum a),
    MAE and bias, for the blend, its parts and the naive forecast (the week before
    repeated)."""
    cutoff = as_of - WEEK
    seen = events[events["timestamp"] < cutoff]
    tuning = tune(seen, cutoff, scorer) if scorer else None
    f = forecast(seen, cutoff, scorer, tuning)
    actual = sold(events, cutoff, as_of)
    naive = weekly_units(seen, cutoff, 1)
    methods = {"forecast": f["forecast"], "trend": f["trend"]}
    if scorer:
        methods["model"] = f["model"]
    methods["naive (last week)"] = naive[0] if not naive.empty else pd.Series(dtype=float)
    top = actual.sort_values(ascending=False).head(15)
    return {
        "cutoff": cutoff.isoformat(),
        "held_out": [cutoff.isoformat(), as_of.isoformat()],
        "tuning": tuning.__dict__ if tuning else None,
        "errors": {name: _errors(s, actual) for name, s in methods.items()},
        "top_items": [
            {
                "item_id": str(i),
                "actual": float(a),
                "forecast": float(f["forecast"].get(i, 0.0)),
            }
            for i, a in top.items()
        ],
    }


def exposed_items(events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.Series:
    """How many times each item was shown in exposures in ``[start, end)``."""
    ex = _between(events[events["event_type"] == "exposure"], start, end)
    counts: dict[str, int] = {}
    for raw in ex["attributes"]:
        if not raw:
            continue
        for item_id in json.loads(json.loads(raw).get("items", "[]") or "[]"):
            counts[item_id] = counts.get(item_id, 0) + 1
    return pd.Series(counts, dtype=float)


def exposure_window(events: pd.DataFrame, days: float = 7.0) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The last ``days`` of exposures (the gateway's clock, whatever the data's clock)."""
    ex = events[events["event_type"] == "exposure"]
    end = ex["timestamp"].max() if len(ex) else pd.Timestamp.now(tz="UTC")
    return end - pd.Timedelta(days=days), end + pd.Timedelta(microseconds=1)


def demand_page(
    events: pd.DataFrame,
    items: pd.DataFrame,
    clock: Clock,
    scorer: Scorer | None = None,
    limit: int = 25,
) -> dict[str, Any]:
    """Forecast against stock: sell-out risk, recommended while out of stock, slow
    movers nobody is shown; and the back-test."""
    tuning = tune(events, clock.now, scorer) if scorer else None
    f = forecast(events, clock.now, scorer, tuning)
    cat = items.set_index("item_id")
    df = f.join(cat[["title", "category", "price", "stock"]], how="outer")
    df[["trend", "model", "forecast"]] = df[["trend", "model", "forecast"]].fillna(0.0)
    df["stock"] = df["stock"].fillna(0).astype(int)
    df["price"] = df["price"].fillna(0.0)
    df[["title", "category"]] = df[["title", "category"]].fillna("")
    sold28 = weekly_units(events, clock.now, 4).sum(axis=1)
    df["sold_28d"] = sold28.reindex(df.index, fill_value=0.0)
    ex_start, ex_end = exposure_window(events)
    shown = exposed_items(events, ex_start, ex_end)
    df["shown_7d"] = shown.reindex(df.index, fill_value=0.0)
    daily = df["forecast"] / 7.0
    df["days_of_cover"] = np.where(daily > 0, df["stock"] / daily.where(daily > 0, 1), np.inf)

    def rows(sel: pd.DataFrame) -> list[dict[str, Any]]:
        out = []
        for item_id, r in sel.iterrows():
            cover = float(r["days_of_cover"])
            out.append(
                {
                    "item_id": str(item_id),
                    "title": r["title"],
                    "category": r["category"],
                    "price": round(float(r["price"]), 2),
                    "stock": int(r["stock"]),
                    "forecast_7d": round(float(r["forecast"]), 2),
                    "trend_7d": round(float(r["trend"]), 2),
                    "model_7d": round(float(r["model"]), 2),
                    "sold_28d": int(r["sold_28d"]),
                    "shown_7d": int(r["shown_7d"]),
                    "days_of_cover": round(cover, 1) if math.isfinite(cover) else None,
                    "lost_revenue_7d": round(float(r["forecast"] * r["price"]), 2),
                }
            )
        return out

    in_stock = df["stock"] > 0
    sell_out = df[in_stock & (df["forecast"] >= df["stock"])].sort_values("days_of_cover")
    oos = df[~in_stock & (df["forecast"] > 0)]
    oos = oos.assign(lost=oos["forecast"] * oos["price"]).sort_values("lost", ascending=False)
    slow = df[in_stock & (df["sold_28d"] == 0) & (df["shown_7d"] == 0)]
    slow = slow.assign(value=slow["stock"] * slow["price"]).sort_values("value", ascending=False)
    top = df.sort_values("forecast", ascending=False).head(limit)
    return {
        "clock": clock.as_json(),
        "method": (
            "7-day demand per item = "
            + (
                f"{1 - tuning.weight:g} x trend + {tuning.weight:g} x model"
                if tuning
                else "trend (no trained model available)"
            )
            + ". Trend: weighted units of the last 4 weeks (0.4, 0.3, 0.2, 0.1, newest "
            "first) times the damped week-over-week growth sqrt(clip((w1+1)/(w2+1), 0.5, 2))."
            " Model: every customer who bought in the last 4 weeks keeps buying at their "
            "weekly rate, spread over the two-tower champion's top items for them by the "
            "softmax of its scores"
            + (f" at temperature {tuning.temperature:g}" if tuning else "")
            + ". The weight and temperature are the ones with the lowest error on the "
            "last complete week (validation); the back-test below chose its own on the "
            "week before its held-out week."
        ),
        "tuning": tuning.__dict__ if tuning else None,
        "totals": {
            "items": len(df),
            "forecast_units_7d": round(float(df["forecast"].sum()), 1),
            "sell_out_risk": len(sell_out),
            "out_of_stock_with_demand": len(oos),
            "slow_movers": len(slow),
            "exposure_window": [ex_start.isoformat(), ex_end.isoformat()],
        },
        "top_forecast": rows(top),
        "sell_out": rows(sell_out.head(limit)),
        "out_of_stock": rows(oos.head(limit)),
        "out_of_stock_recommended": rows(
            df[~in_stock & (df["shown_7d"] > 0)].sort_values("shown_7d", ascending=False)
        )[:limit],
        "slow_movers": rows(slow.head(limit)),
        "backtest": backtest(events, clock.now, scorer),
    }


# --- trends ---------------------------------------------------------------------------


def _wow(p: pd.DataFrame, key: str, as_of: pd.Timestamp, min_units: float) -> pd.DataFrame:
    this = _between(p, as_of - WEEK, as_of).groupby(key)["units"].sum()
    last = _between(p, as_of - 2 * WEEK, as_of - WEEK).groupby(key)["units"].sum()
    df = pd.DataFrame({"this_week": this, "last_week": last}).fillna(0.0)
    df = df[(df["this_week"] + df["last_week"]) >= min_units]
    df["change"] = df["this_week"] - df["last_week"]
    df["change_pct"] = np.where(
        df["last_week"] > 0, df["change"] / df["last_week"].where(df["last_week"] > 0, 1), np.nan
    )
    return df


def _records(df: pd.DataFrame, key: str) -> list[dict[str, Any]]:
    out = []
    for k, r in df.iterrows():
        pct = r["change_pct"]
        out.append(
            {
                key: str(k),
                "this_week": int(r["this_week"]),
                "last_week": int(r["last_week"]),
                "change": int(r["change"]),
                "change_pct": None if pd.isna(pct) else round(float(pct), 4),
            }
        )
    return out


def trends_page(
    events: pd.DataFrame, clock: Clock, weeks: int = 8, top: int = 10, min_units: float = 3
) -> dict[str, Any]:
    """Rising and falling categories and items, this week against last week (units
    sold), and weekly units of the moving categories for the chart."""
    p = purchases(events)
    cats = _wow(p, "category", clock.now, min_units)
    items = _wow(p, "item_id", clock.now, min_units)
    rising_c = cats[cats["change"] > 0].sort_values("change", ascending=False).head(top)
    falling_c = cats[cats["change"] < 0].sort_values("change").head(top)
    rising_i = items[items["change"] > 0].sort_values("change", ascending=False).head(top)
    falling_i = items[items["change"] < 0].sort_values("change").head(top)
    chart_cats = list(rising_c.index[:3]) + list(falling_c.index[:3])
    window = _between(p, clock.now - weeks * WEEK, clock.now)
    week = (weeks - 1 - (clock.now - window["timestamp"]) // WEEK).astype(int)
    weekly = window.assign(week=week).groupby(["category", "week"])["units"].sum()
    starts = [(clock.now - (weeks - w) * WEEK).isoformat() for w in range(weeks)]
    series = [
        {
            "name": c,
            "values": [float(weekly.get((c, w), 0.0)) for w in range(weeks)],
        }
        for c in chart_cats
    ]
    return {
        "clock": clock.as_json(),
        "weeks": starts,
        "series": series,
        "rising_categories": _records(rising_c, "category"),
        "falling_categories": _records(falling_c, "category"),
        "rising_items": _records(rising_i, "item_id"),
        "falling_items": _records(falling_i, "item_id"),
    }


# --- customers --------------------------------------------------------------------------


def segments_at(
    events: pd.DataFrame, at: pd.Timestamp, cfg: ProfileConfig | None = None
) -> pd.Series:
    """Every customer seen before ``at`` -> segment at ``at``, by the profile service's
    own rule (``services.profile.logic.segment_of``: RFM recency and order count)."""
    from mercato.v1 import common_pb2

    cfg = cfg or ProfileConfig()
    hist = events[(events["timestamp"] < at) & events["event_type"].isin(SHOPPER_EVENTS)]
    known = hist["customer_id"].unique()
    p = purchases(hist)
    orders = (
        p.assign(order=np.where(p["order_id"] != "", p["order_id"], "event:" + p["event_id"]))
        .groupby("customer_id")["order"]
        .nunique()
    )
    last = p.groupby("customer_id")["timestamp"].max()
    out = {}
    for cid in known:
        freq = int(orders.get(cid, 0))
        recency = (at - last[cid]) / DAY if freq else -1.0
        rfm = common_pb2.Rfm(recency_days=recency, frequency=freq)
        out[str(cid)] = segment_of(rfm, "", cfg)
    return pd.Series(out, dtype=object)


def customers_page(
    events: pd.DataFrame, clock: Clock, weeks: int = 8, cfg: ProfileConfig | None = None
) -> dict[str, Any]:
    """Segment sizes week by week and how customers moved between segments in the last
    week."""
    cfg = cfg or ProfileConfig()
    ends = [clock.now - (weeks - 1 - w) * WEEK for w in range(weeks)]
    by_week = [segments_at(events, end, cfg) for end in ends]
    sizes = [{s: int((seg == s).sum()) for s in SEGMENTS} for seg in by_week]
    now, before = by_week[-1], by_week[-2] if weeks > 1 else pd.Series(dtype=object)
    moves: dict[tuple[str, str], int] = {}
    for cid, seg in now.items():
        prev = before.get(cid, "(not yet seen)")
        if prev != seg:
            moves[(prev, seg)] = moves.get((prev, seg), 0) + 1
    return {
        "clock": clock.as_json(),
        "rule": (
            f"segment by the profile service's rule: new = no purchase yet; lapsed = last "
            f"purchase over {cfg.segment_lapsed_days:g} days ago; at_risk = over "
            f"{cfg.segment_at_risk_days:g} days; loyal = {cfg.segment_loyal_orders}+ orders; "
            "else active"
        ),
        "weeks": [e.isoformat() for e in ends],
        "sizes": sizes,
        "current": sizes[-1],
        "movement": [
            {"from": a, "to": b, "customers": n}
            for (a, b), n in sorted(moves.items(), key=lambda kv: -kv[1])
        ],
    }


# --- offers -------------------------------------------------------------------------------


def offers_page(
    events: pd.DataFrame, catalog: Any, clock: Clock, days: float = 7.0
) -> dict[str, Any]:
    """Per offer of the catalog over the last ``days`` of exposures: times shown,
    redemptions, spend (the catalog's cost of each redemption's order value), budget for
    the window, conversion against exposures of the same surfaces with no offer, and
    incremental margin ``shown (conv - conv_no_offer) margin_rate order_value - spend``.
    Offers are not given at random, so this is observational; experiments are causal."""
    settings = catalog.settings
    start, end = exposure_window(events, days)
    window = _between(events, start, end + pd.Timedelta(days=settings.attribution_days))
    ex = _between(window[window["event_type"] == "exposure"], start, end)
    eligible = {s for o in catalog.offers for s in o.eligibility.surfaces}
    ex = ex[ex["surface"].isin(eligible)]
    buys = purchases(window)
    buys = buys.sort_values("timestamp").assign(us=_us(buys["timestamp"]))
    buys_by_c = {c: g["us"].to_numpy() for c, g in buys.groupby("customer_id")}
    value_by_c = {c: g["revenue"].to_numpy() for c, g in buys.groupby("customer_id")}
    horizon = int(settings.attribution_days * 86400e6)

    def converted(rows: pd.DataFrame) -> tuple[int, float]:
        n, value = 0, 0.0
        for c, t in zip(rows["customer_id"], _us(rows["timestamp"]), strict=True):
            ts = buys_by_c.get(c)
            if ts is None:
                continue
            hit = (ts >= t) & (ts <= t + horizon)
            if hit.any():
                n += 1
                value += float(value_by_c[c][hit][0])
        return n, value

    control = ex[ex["offer_id"].isin(("", "none"))]
    c_conv, _ = converted(control)
    c_rate = c_conv / len(control) if len(control) else 0.0
    redeemed = window[window["event_type"] == "offer_redeemed"]  # shown in the window
    rows = []
    for o in catalog.offers:
        if o.is_none:
            continue
        shown = ex[ex["offer_id"] == o.id]
        red = redeemed[redeemed["offer_id"] == o.id]
        order_values = red["price"] * red["quantity"].clip(lower=1)
        spend = float(sum(o.cost.redeem_cost(v) for v in order_values)) + o.cost.fixed * len(shown)
        conv, conv_value = converted(shown)
        rate = conv / len(shown) if len(shown) else 0.0
        order_value = conv_value / conv if conv else settings.default_order_value
        incremental = len(shown) * (rate - c_rate) * settings.margin_rate * order_value - spend
        periods = (
            days
            if o.budget.period == "day"
            else days / 7
            if o.budget.period == "week"
            else days / 30
        )
        budget = o.budget.amount * periods if o.budget.amount else 0.0
        rows.append(
            {
                "offer_id": o.id,
                "description": o.description,
                "shown": len(shown),
                "redemptions": len(red),
                "spend": round(spend, 2),
                "budget": round(budget, 2),
                "budget_used": round(spend / budget, 4) if budget else None,
                "conversion": round(rate, 4),
                "conversion_no_offer": round(c_rate, 4),
                "incremental_margin": round(incremental, 2),
            }
        )
    return {
        "clock": clock.as_json(),
        "window": [start.isoformat(), end.isoformat()],
        "days": days,
        "margin_rate": settings.margin_rate,
        "attribution_days": settings.attribution_days,
        "no_offer_exposures": len(control),
        "offers": rows,
    }


def rows_for_report(events: pd.DataFrame) -> Iterable[Any]:
    """The export as ``mercato report ab`` rows."""
    from services.gateway.abreport import rows_from_frame

    return rows_from_frame(events)


# --- overview from the export --------------------------------------------------------


def traffic_from_exposures(events: pd.DataFrame, hours: float = 1.0) -> dict[str, Any]:
    """Answers per surface and their degraded share over the last ``hours`` of exposures
    (every answer to a known customer is one exposure; anonymous calls are not logged)."""
    ex = events[events["event_type"] == "exposure"]
    if ex.empty:
        return {"window": None, "surfaces": []}
    end = ex["timestamp"].max()
    start = end - pd.Timedelta(hours=hours)
    ex = ex[ex["timestamp"] > start]
    degraded = ex["attributes"].map(lambda a: bool(a) and bool(json.loads(a).get("degraded")))
    out = []
    for surface, g in ex.assign(degraded=degraded).groupby("surface"):
        out.append(
            {
                "surface": surface or "unspecified",
                "answers": len(g),
                "degraded": int(g["degraded"].sum()),
                "degraded_share": round(float(g["degraded"].mean()), 4),
            }
        )
    return {"window": [start.isoformat(), end.isoformat()], "surfaces": out}
