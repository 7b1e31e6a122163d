"""The console's computations against direct computations on a small known shop."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from mercato.console import analytics as an
from services.gateway.abreport import ab_report, rows_from_export
from services.ranking.offers.catalog import Catalog
from tests.console.data import END, items_frame, known_shop

DAY = pd.Timedelta(days=1)
NOW = END - pd.Timedelta(seconds=1)
WALL = pd.Timestamp("2026-11-28T00:00:00Z")


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return known_shop().frame()


def test_clock_is_the_data_time_on_historical_data(events: pd.DataFrame) -> None:
    clock = an.events_clock(events, WALL)
    # the live clicks and purchases of 2026 are a handful next to a busy history
    assert clock.source == "data"
    assert clock.now == NOW
    assert "data time 2024-02-29" in clock.describe()
    # ... but a shop that is live again (5 % or more of its events after the silence) is
    live_again = pd.concat([events] + [events[events["customer_id"].str.startswith("x")]] * 20)
    assert an.events_clock(live_again, WALL).now == live_again["timestamp"].max()
    # a shop whose newest activity is recent runs on the wall clock
    live = an.clock_of(WALL - pd.Timedelta(hours=3), WALL)
    assert live.source == "wall clock" and live.now == WALL


def test_trend_forecast_is_the_documented_formula(events: pd.DataFrame) -> None:
    f = an.trend_forecast(events, NOW)
    # A sold 1, 2, 3, 6 (oldest first): level = .4*6 + .3*3 + .2*2 + .1*1, growth (7/4)^.5
    assert f["A"] == pytest.approx((0.4 * 6 + 0.3 * 3 + 0.2 * 2 + 0.1 * 1) * math.sqrt(7 / 4))
    assert f["B"] == pytest.approx(4.0)  # flat
    # D: 0, 0, 5 + 1 (the loyal customer's order 10 days ago), 1 -> growth clipped at 0.5
    assert f["D"] == pytest.approx((0.4 * 1 + 0.3 * 6) * math.sqrt(0.5))
    assert "E" not in f.index  # never sold


def test_backtest_forecasts_from_the_days_before_the_held_out_week(events: pd.DataFrame) -> None:
    bt = an.backtest(events, NOW)
    cutoff = NOW - 7 * DAY
    assert bt["cutoff"] == cutoff.isoformat()
    # the forecast only saw the events before the cutoff ...
    before = an.trend_forecast(events[events["timestamp"] < cutoff], cutoff)
    # ... and is compared with what sold in the held-out week
    held = events[
        (events["event_type"] == "purchase")
        & (events["timestamp"] >= cutoff)
        & (events["timestamp"] < NOW)
    ]
    actual = held.groupby("item_id")["quantity"].sum().astype(float)
    assert actual.to_dict() == {"A": 6.0, "B": 4.0, "C": 2.0, "D": 1.0}
    idx = before.index.union(actual.index)
    f, a = before.reindex(idx, fill_value=0), actual.reindex(idx, fill_value=0)
    err = bt["errors"]["forecast"]
    assert err["wape"] == pytest.approx(float((f - a).abs().sum() / a.sum()))
    assert err["actual_units"] == 13.0
    # the naive method repeats the week before the cutoff: A 3, B 4, D 5 + 1
    naive = bt["errors"]["naive (last week)"]
    assert naive["forecast_units"] == 13.0
    assert naive["wape"] == pytest.approx((3 + 0 + 2 + 5) / 13)
    # changing the held-out week changes the actuals, never the forecast
    spiked = pd.concat([events, held[held["item_id"] == "A"].tail(1)], ignore_index=True)
    spiked.loc[spiked.index[-1], "quantity"] = 50
    bt2 = an.backtest(spiked, NOW)
    assert bt2["errors"]["forecast"]["forecast_units"] == err["forecast_units"]
    assert bt2["errors"]["forecast"]["actual_units"] == 13.0 + 50


def test_model_forecast_spreads_each_buyers_rate_over_the_models_items(
    events: pd.DataFrame,
) -> None:
    seen: list[an.Shopper] = []

    def scorer(who: list[an.Shopper]) -> list[list[tuple[str, float]]]:
        seen.extend(who)
        return [[("A", 1.0), ("E", 0.5)] for _ in who]

    tuning = an.Tuning(weight=0.5, temperature=0.5)
    f = an.forecast(events, NOW, scorer, tuning)
    recent = events[
        (events["event_type"] == "purchase")
        & (events["timestamp"] >= NOW - 28 * DAY)
        & (events["timestamp"] < NOW)
    ]
    rate = recent.groupby("customer_id")["quantity"].sum() / 4
    assert sorted(s.customer_id for s in seen) == sorted(rate.index)
    share_a = math.exp(1.0 / 0.5) / (math.exp(1.0 / 0.5) + math.exp(0.5 / 0.5))
    assert f.loc["A", "model"] == pytest.approx(share_a * rate.sum())
    assert f.loc["E", "model"] == pytest.approx((1 - share_a) * rate.sum())
    assert f.loc["E", "forecast"] == pytest.approx(0.5 * (1 - share_a) * rate.sum())
    assert f.loc["B", "forecast"] == pytest.approx(0.5 * 4.0)
    # every shopper's history stops at as_of
    assert all("C" not in s.purchased_item_ids for s in an.shoppers(events, NOW - 6 * DAY))


def test_tuning_reads_only_the_validation_week_and_before(events: pd.DataFrame) -> None:
    def scorer(who: list[an.Shopper]) -> list[list[tuple[str, float]]]:
        return [[("B", 1.0), ("A", 0.9)] for _ in who]

    cutoff = NOW - 7 * DAY
    t = an.tune(events, cutoff, scorer)
    assert t.validation_week == ((cutoff - 7 * DAY).isoformat(), cutoff.isoformat())
    # the grid's best is the minimum WAPE over every (temperature, weight) tried
    start = cutoff - 7 * DAY
    seen = events[events["timestamp"] < start]
    actual = an.sold(events, start, cutoff)
    trend = an.trend_forecast(seen, start)
    parts = an.model_parts(seen, start, scorer)
    wapes = [
        an._errors(an._blend(trend, an.spread(parts, tt), w)["forecast"], actual)["wape"]
        for tt in an.TEMPERATURES
        for w in an.WEIGHTS
    ]
    assert t.validation_wape == pytest.approx(min(wapes))
    # events at or after the cutoff (the back-test's held-out week) change nothing
    later = events[events["timestamp"] >= cutoff].copy()
    later["quantity"] = 40
    changed = pd.concat([events[events["timestamp"] < cutoff], later], ignore_index=True)
    assert an.tune(changed, cutoff, scorer) == t


def test_demand_page_sets_forecast_against_stock(events: pd.DataFrame) -> None:
    clock = an.Clock(NOW, WALL, "data")
    page = an.demand_page(events, items_frame(), clock)
    f = an.trend_forecast(events, NOW)
    sell_out = {r["item_id"] for r in page["sell_out"]}
    # B: stock 4, forecast 4 -> sells out; A: stock 100 -> not
    assert sell_out == {i for i in ("A", "B", "D") if f[i] >= {"A": 100, "B": 4, "D": 50}[i]}
    oos = {r["item_id"]: r for r in page["out_of_stock"]}
    assert set(oos) == {"C"}
    assert oos["C"]["lost_revenue_7d"] == pytest.approx(round(f["C"] * 40.0, 2))
    # C was in 3 exposures while out of stock
    assert [(r["item_id"], r["shown_7d"]) for r in page["out_of_stock_recommended"]] == [("C", 3)]
    # E: in stock, never sold, never shown
    assert [r["item_id"] for r in page["slow_movers"]] == ["E"]


def test_trends_page_is_week_over_week_units(events: pd.DataFrame) -> None:
    clock = an.Clock(NOW, WALL, "data")
    page = an.trends_page(events, clock, min_units=1)
    p = events[events["event_type"] == "purchase"]

    def units(cat: str, weeks_back: int) -> int:
        end = NOW - weeks_back * 7 * DAY
        sel = p[(p["category"] == cat) & (p["timestamp"] >= end - 7 * DAY) & (p["timestamp"] < end)]
        return int(sel["quantity"].sum())

    rising = {r["category"]: r for r in page["rising_categories"]}
    falling = {r["category"]: r for r in page["falling_categories"]}
    bread = rising["food/bread"]
    assert (bread["this_week"], bread["last_week"]) == (
        units("food/bread", 0),
        units("food/bread", 1),
    )
    lamps = falling["home/lamps"]
    assert (lamps["this_week"], lamps["last_week"]) == (
        units("home/lamps", 0),
        units("home/lamps", 1),
    )
    assert lamps["change"] == units("home/lamps", 0) - units("home/lamps", 1)
    chart = {s["name"]: s["values"] for s in page["series"]}
    assert chart["food/bread"][-4:] == [units("food/bread", w) for w in (3, 2, 1, 0)]


def test_customers_page_segments_by_the_profile_rule(events: pd.DataFrame) -> None:
    clock = an.Clock(NOW, WALL, "data")
    page = an.customers_page(events, clock)
    seg = an.segments_at(events, NOW)
    assert seg["old1"] == "at_risk"  # 100 days > 90
    assert seg["old2"] == "lapsed"  # 400 days > 365
    assert seg["loyal"] == "loyal"  # 4 orders
    assert seg["viewer"] == "new"  # never bought
    assert "x0" not in seg.index  # its events come after NOW
    for name in an.SEGMENTS:
        assert page["current"][name] == int((seg == name).sum())
    # the loyal customer's 4th order (10 days ago) moved it from active to loyal 2 weeks
    # ago, not last week; customers first seen last week come from "(not yet seen)"
    before = an.segments_at(events, NOW - 7 * DAY)
    moved = sum(1 for c in seg.index if before.get(c, "(not yet seen)") != seg[c])
    assert sum(m["customers"] for m in page["movement"]) == moved


def test_offers_page_spend_and_incremental_margin(events: pd.DataFrame) -> None:
    catalog = Catalog.load(Path(__file__).resolve().parents[2] / "config" / "offers.yaml")
    clock = an.Clock(NOW, WALL, "data")
    page = an.offers_page(events, catalog, clock)
    rows = {r["offer_id"]: r for r in page["offers"]}
    pct10 = rows["pct10"]
    # shown to x0, x1, x2 (cart); x0 redeemed on an order of 50: 10% = 5 (cap 25)
    assert (pct10["shown"], pct10["redemptions"], pct10["spend"]) == (3, 1, 5.0)
    # conversion: x0, x1 bought (2/3); control = cart exposures x3..x5 without offer: x3 (1/3)
    assert pct10["conversion"] == pytest.approx(round(2 / 3, 4))
    assert pct10["conversion_no_offer"] == pytest.approx(round(1 / 3, 4))
    order_value = (50.0 + 30.0) / 2
    want = 3 * (2 / 3 - 1 / 3) * 0.35 * order_value - 5.0
    assert pct10["incremental_margin"] == pytest.approx(round(want, 2))
    assert pct10["budget"] == 2000 * 7  # 2000 a day over the 7-day window
    assert rows["amount5"]["shown"] == 0


def test_experiments_are_the_ab_report_of_the_export(events: pd.DataFrame, tmp_path: Path) -> None:
    path = known_shop().write(tmp_path / "events.parquet")
    from_file = ab_report(rows_from_export(path))
    from_frame = ab_report(an.rows_for_report(events))
    assert from_file == from_frame
    arms = {r.variant: r for r in from_frame}
    assert arms["control"].exposures == 5 and arms["challenger"].exposures == 5
    # control: x0, x2, x4, x6, x8 -> x0 bought; challenger: x1, x3, ... -> x1, x3 bought
    assert arms["control"].conversions == 1 and arms["challenger"].conversions == 2


def test_traffic_per_surface_and_degraded_share(events: pd.DataFrame) -> None:
    t = an.traffic_from_exposures(events)
    by = {r["surface"]: r for r in t["surfaces"]}
    assert by["cart"]["answers"] == 6 and by["home"]["answers"] == 4
    assert by["home"]["degraded"] == 1 and by["home"]["degraded_share"] == 0.25
