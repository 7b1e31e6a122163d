"""``mercato report ab``: per experiment variant, what its exposures led to.

Input: the exported event log (``mercato export-events``); the report never opens the
profile store.
Exposure events (``exposure``, written by the gateway for every answer) carry the
customer's experiment assignments (attribute ``experiments``, a JSON object, or the
``experiment`` / ``variant`` fields).

Attribution (last touch, per experiment): a click, add-to-cart or purchase of customer
``c`` at time ``t`` belongs to ``c``'s latest exposure in that experiment at a time
``te`` with ``te <= t <= te + window``. Outcomes with no such exposure are not counted.
An exposure is *clicked* / *carted* / *converted* when at least one click / add-to-cart /
purchase belongs to it; its revenue is the sum of ``price * quantity`` of its purchases.

Per variant: exposures, customers, click-through, add-to-cart and conversion rates with
Wilson score intervals, and revenue per exposure with a delta-method interval that treats
the customer as the unit (assignment is per customer, so a customer's exposures are not
independent): ``R = sum(rev_i) / sum(n_i)`` over customers ``i``,
``Var(R) ~= sum((rev_i - R n_i)^2) / (sum(n_i))^2 * N / (N - 1)``.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

OUTCOMES = ("click", "add_to_cart", "purchase")


@dataclass(frozen=True)
class Row:
    """The fields of a logged event the report needs."""

    customer_id: str
    event_type: str  # exposure, click, add_to_cart, purchase, ...
    ts_us: int
    price: float = 0.0
    quantity: int = 0
    experiment: str = ""
    variant: str = ""
    attributes: dict[str, str] = field(default_factory=dict)

    def assignments(self) -> dict[str, str]:
        """Experiment -> variant of an exposure."""
        raw = self.attributes.get("experiments", "")
        if raw:
            try:
                data = json.loads(raw)
                if isinstance(data, dict):
                    return {str(k): str(v) for k, v in data.items()}
            except json.JSONDecodeError:
                pass
        return {self.experiment: self.variant} if self.experiment else {}


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ((0, 0) when n = 0)."""
    if n <= 0:
        return (0.0, 0.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def ratio_interval(
    num: list[float], den: list[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """Ratio of sums over clusters with a delta-method interval: (ratio, low, high)."""
    total_den = math.fsum(den)
    if total_den <= 0:
        return (0.0, 0.0, 0.0)
    r = math.fsum(num) / total_den
    n = len(num)
    if n < 2:
        return (r, r, r)
    resid = math.fsum((a - r * b) ** 2 for a, b in zip(num, den, strict=True))
    se = math.sqrt(resid / total_den**2 * n / (n - 1))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return (r, r - z * se, r + z * se)


@dataclass
class VariantReport:
    """One line of the report."""

    experiment: str
    variant: str
    exposures: int
    customers: int
    clicks: int
    carts: int
    conversions: int
    revenue: float
    ctr: float
    ctr_low: float
    ctr_high: float
    add_to_cart_rate: float
    add_to_cart_low: float
    add_to_cart_high: float
    conversion_rate: float
    conversion_low: float
    conversion_high: float
    revenue_per_exposure: float
    revenue_per_exposure_low: float
    revenue_per_exposure_high: float


@dataclass
class _Exposure:
    customer_id: str
    variant: str
    ts_us: int
    outcomes: set[str] = field(default_factory=set)
    revenue: float = 0.0


def ab_report(
    rows: Iterable[Row],
    window_seconds: float = 86_400.0,
    confidence: float = 0.95,
    experiment: str | None = None,
) -> list[VariantReport]:
    """The report lines, by experiment then variant name."""
    window_us = int(window_seconds * 1_000_000)
    # experiment -> customer -> exposures sorted by time; variant of each exposure
    exposures: dict[str, dict[str, list[_Exposure]]] = defaultdict(lambda: defaultdict(list))
    outcomes: list[Row] = []
    for row in rows:
        if row.event_type == "exposure":
            for exp, var in row.assignments().items():
                if experiment is not None and exp != experiment:
                    continue
                exposures[exp][row.customer_id].append(_Exposure(row.customer_id, var, row.ts_us))
        elif row.event_type in OUTCOMES:
            outcomes.append(row)
    for per_customer in exposures.values():
        for lst in per_customer.values():
            lst.sort(key=lambda e: e.ts_us)
    times = {
        exp: {c: [e.ts_us for e in lst] for c, lst in per_customer.items()}
        for exp, per_customer in exposures.items()
    }
    for out in outcomes:
        for exp, per_customer in exposures.items():
            mine = per_customer.get(out.customer_id)
            if not mine:
                continue
            i = bisect.bisect_right(times[exp][out.customer_id], out.ts_us) - 1
            if i < 0 or out.ts_us - mine[i].ts_us > window_us:
                continue
            target = mine[i]
            target.outcomes.add(out.event_type)
            if out.event_type == "purchase":
                target.revenue += out.price * max(1, out.quantity)
    result = []
    for exp in sorted(exposures):
        by_variant: dict[str, list[_Exposure]] = defaultdict(list)
        for lst in exposures[exp].values():
            for e in lst:
                by_variant[e.variant].append(e)
        for var in sorted(by_variant):
            exps = by_variant[var]
            n = len(exps)
            clicks = sum("click" in e.outcomes for e in exps)
            carts = sum("add_to_cart" in e.outcomes for e in exps)
            convs = sum("purchase" in e.outcomes for e in exps)
            per_cust_rev: dict[str, float] = defaultdict(float)
            per_cust_n: dict[str, float] = defaultdict(float)
            for e in exps:
                per_cust_rev[e.customer_id] += e.revenue
                per_cust_n[e.customer_id] += 1
            custs = sorted(per_cust_n)
            rpe, rpe_lo, rpe_hi = ratio_interval(
                [per_cust_rev[c] for c in custs], [per_cust_n[c] for c in custs], confidence
            )
            ctr_lo, ctr_hi = wilson(clicks, n, confidence)
            atc_lo, atc_hi = wilson(carts, n, confidence)
            cv_lo, cv_hi = wilson(convs, n, confidence)
            result.append(
                VariantReport(
                    experiment=exp,
                    variant=var,
                    exposures=n,
                    customers=len(custs),
                    clicks=clicks,
                    carts=carts,
                    conversions=convs,
                    revenue=math.fsum(e.revenue for e in exps),
                    ctr=clicks / n,
                    ctr_low=ctr_lo,
                    ctr_high=ctr_hi,
                    add_to_cart_rate=carts / n,
                    add_to_cart_low=atc_lo,
                    add_to_cart_high=atc_hi,
                    conversion_rate=convs / n,
                    conversion_low=cv_lo,
                    conversion_high=cv_hi,
                    revenue_per_exposure=rpe,
                    revenue_per_exposure_low=rpe_lo,
                    revenue_per_exposure_high=rpe_hi,
                )
            )
    return result


# --- inputs -------------------------------------------------------------------------


def rows_from_frame(df: Any) -> Iterator[Row]:
    """Rows of an events export already read with
    :func:`services.profile.export.read_events_frame` (a pandas DataFrame)."""
    import pandas as pd

    epoch = pd.Timestamp(0, tz="UTC")
    ts = (df["timestamp"] - epoch) // pd.Timedelta(microseconds=1)
    for rec, t in zip(df.itertuples(index=False), ts, strict=True):
        attrs: dict[str, str] = {}
        if rec.attributes:
            attrs = {str(k): str(v) for k, v in json.loads(rec.attributes).items()}
        yield Row(
            customer_id=rec.customer_id,
            event_type=rec.event_type,
            ts_us=int(t),
            price=float(rec.price),
            quantity=int(rec.quantity),
            experiment=rec.experiment,
            variant=rec.variant,
            attributes=attrs,
        )


def rows_from_export(path: Path) -> Iterator[Row]:
    """Rows of an ``mercato export-events`` file (.parquet or .csv)."""
    from services.profile.export import read_events_frame

    return rows_from_frame(read_events_frame(path))


# --- outputs ------------------------------------------------------------------------


def write_report(lines: list[VariantReport], out: Path) -> None:
    """Write the report as .json or .csv (by suffix)."""
    records = [asdict(line) for line in lines]
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        out.write_text(json.dumps(records, indent=2) + "\n")
    elif suffix == ".csv":
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(VariantReport.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(records)
    else:
        raise ValueError(f"--out must end in .json or .csv, got {out.name!r}")


def rich_table(lines: list[VariantReport], window_seconds: float, confidence: float) -> Any:
    """The report as a rich table."""
    from rich.table import Table

    pct = f"{confidence:.0%}"
    table = Table(
        title=f"A/B report (attribution window {window_seconds:g} s, {pct} intervals)",
    )
    for col in (
        "experiment",
        "variant",
        "exposures",
        "customers",
        "CTR",
        "add-to-cart",
        "conversion",
        "revenue / exposure",
    ):
        table.add_column(col, justify="left" if col in ("experiment", "variant") else "right")

    def rate(v: float, lo: float, hi: float) -> str:
        return f"{v:.2%} [{lo:.2%}, {hi:.2%}]"

    for r in lines:
        table.add_row(
            r.experiment,
            r.variant,
            str(r.exposures),
            str(r.customers),
            rate(r.ctr, r.ctr_low, r.ctr_high),
            rate(r.add_to_cart_rate, r.add_to_cart_low, r.add_to_cart_high),
            rate(r.conversion_rate, r.conversion_low, r.conversion_high),
            f"{r.revenue_per_exposure:.2f} [{r.revenue_per_exposure_low:.2f}, "
            f"{r.revenue_per_exposure_high:.2f}]",
        )
    return table
