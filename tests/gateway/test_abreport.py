"""`mercato report ab` on a constructed event log with hand-computed numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.gateway.abreport import Row, ab_report, ratio_interval, wilson

S = 1_000_000  # microseconds per second


def exp_attr(**assign: str) -> dict[str, str]:
    return {"experiments": json.dumps(assign)}


LOG = [
    # alice, control: click and a purchase of 2 x 10.0 after her first exposure; her
    # second exposure gets nothing (the late purchase is outside the 1 h window).
    Row("alice", "exposure", 0, attributes=exp_attr(tt="control", other="b")),
    Row("alice", "click", 10 * S),
    Row("alice", "purchase", 100 * S, price=10.0, quantity=2),
    Row("alice", "exposure", 200 * S, attributes=exp_attr(tt="control")),
    Row("alice", "purchase", (200 + 7200) * S, price=99.0, quantity=1),
    # bob, control (assignment in the event fields): an add-to-cart only.
    Row("bob", "exposure", 0, experiment="tt", variant="control"),
    Row("bob", "add_to_cart", 50 * S),
    # carol, challenger: click, cart and a purchase of 1 (quantity 0 counts as 1) x 5.0.
    Row("carol", "exposure", 0, attributes=exp_attr(tt="challenger")),
    Row("carol", "click", 5 * S),
    Row("carol", "add_to_cart", 6 * S),
    Row("carol", "purchase", 7 * S, price=5.0, quantity=0),
    # dave, challenger: his purchase came before the exposure: not attributed.
    Row("dave", "purchase", 500 * S, price=50.0, quantity=1),
    Row("dave", "exposure", 1000 * S, attributes=exp_attr(tt="challenger")),
    # eve clicks without any exposure; frank's exposure has no experiment.
    Row("eve", "click", 0),
    Row("frank", "exposure", 0),
    Row("frank", "purchase", 1 * S, price=7.0),
]


def test_hand_computed_report() -> None:
    lines = {(r.experiment, r.variant): r for r in ab_report(LOG, window_seconds=3600)}
    assert set(lines) == {("tt", "control"), ("tt", "challenger"), ("other", "b")}
    c = lines[("tt", "control")]
    assert (c.exposures, c.customers, c.clicks, c.carts, c.conversions) == (3, 2, 1, 1, 1)
    assert c.revenue == 20.0
    assert c.ctr == pytest.approx(1 / 3)
    # Wilson 95 % interval of 1/3: the textbook (0.0615, 0.7923)
    assert (c.ctr_low, c.ctr_high) == pytest.approx((0.0615, 0.7923), abs=1e-4)
    # revenue per exposure 20/3; customers alice (20, 2 exposures) and bob (0, 1):
    # residuals +-20/3, Var = (2 * (20/3)^2) / 3^2 * 2/1 = 19.75, se = 4.444
    assert c.revenue_per_exposure == pytest.approx(20 / 3)
    se = (2 * (20 / 3) ** 2 / 9 * 2) ** 0.5
    assert c.revenue_per_exposure_low == pytest.approx(20 / 3 - 1.959964 * se, rel=1e-5)
    assert c.revenue_per_exposure_high == pytest.approx(20 / 3 + 1.959964 * se, rel=1e-5)
    h = lines[("tt", "challenger")]
    assert (h.exposures, h.customers, h.clicks, h.carts, h.conversions) == (2, 2, 1, 1, 1)
    assert h.revenue == 5.0 and h.revenue_per_exposure == 2.5
    assert h.conversion_rate == 0.5
    o = lines[("other", "b")]  # alice's first exposure in a second experiment
    assert (o.exposures, o.clicks, o.conversions, o.revenue) == (1, 1, 1, 20.0)
    # a longer window also attributes alice's late purchase (to her second exposure)
    wide = {(r.experiment, r.variant): r for r in ab_report(LOG, window_seconds=8000)}
    assert wide[("tt", "control")].revenue == 119.0
    assert wide[("tt", "control")].conversions == 2


def test_interval_edges() -> None:
    assert wilson(0, 0) == (0.0, 0.0)
    lo, hi = wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.2 < hi < 0.35  # not zero-width at 0 %
    assert ratio_interval([], []) == (0.0, 0.0, 0.0)
    assert ratio_interval([4.0], [2.0]) == (2.0, 2.0, 2.0)


def test_cli_reads_an_export_and_writes_json_and_csv(tmp_path: Path) -> None:
    from mercato.cli import app
    from services.profile.export import EventsWriter
    from services.profile.logic import EVENT_TYPES_BY_NAME, LogEvent

    writer = EventsWriter(tmp_path / "events.parquet")
    writer.write(
        LogEvent(
            event_id=f"e{i}",
            customer_id=r.customer_id,
            type=EVENT_TYPES_BY_NAME[r.event_type],
            ts_us=1_700_000_000 * S + r.ts_us,
            price=r.price,
            quantity=r.quantity,
            experiment=r.experiment,
            variant=r.variant,
            attributes=r.attributes,
        )
        for i, r in enumerate(LOG)
    )
    writer.close()
    out = tmp_path / "ab.csv"
    res = CliRunner().invoke(
        app,
        [
            "report", "ab", "--events", str(tmp_path / "events.parquet"), "--window", "3600",
            "--experiment", "tt", "--format", "json", "--out", str(out),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = {(d["experiment"], d["variant"]): d for d in json.loads(res.output)}
    assert set(data) == {("tt", "control"), ("tt", "challenger")}
    assert data[("tt", "control")]["revenue_per_exposure"] == pytest.approx(20 / 3)
    assert out.read_text().splitlines()[0].startswith("experiment,variant,exposures")
