"""The console against a running system with trained models: the tiny shop of
``mercato demo`` (data, two-tower and ranker trained and promoted, four services as
processes), shoppers through the gateway, the console served over HTTP, and its pages
opened in a real headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from rich.console import Console as RichConsole
from typer.testing import CliRunner

from services.common.supervisor import SERVICES, Supervisor
from tests.console.browser import PAGES, chromium_available, visit_all
from tests.procs import REPO, free_port

# training the tiny shop's models is part of the first test's time
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ARTIFACTS = REPO / ".artifacts" / "console"
KEY = "operator-secret-for-tests"


@dataclass
class System:
    url: str
    home: Path
    export: Path
    gateway: str
    profile: str
    app: Any
    customer: str


def _serve(app: Any, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("console did not start")
        time.sleep(0.05)
    return server, thread


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    from mercato.console.app import ConsoleConfig, build_app
    from mercato.console.sources import (
        EventLog,
        MetricsSampler,
        TwoTowerScorer,
        default_targets,
        local_export_command,
    )
    from mercato.demo import (
        DemoOptions,
        _models_loaded,
        ensure_data,
        load_profiles,
        pick_customers,
        train_ranker,
        train_retrieval,
    )
    from services.common.settings import default_tracking_uri
    from services.gateway.auth import hash_key
    from services.ranking.settings import DEFAULT_OFFERS_FILE
    from tests.console.traffic import EXPERIMENTS, cart_customers, shop

    tmp = tmp_path_factory.mktemp("console")
    home = tmp / "home"
    mp = pytest.MonkeyPatch()
    for name in SERVICES:  # never the default ports
        mp.setenv(f"MERCATO_{name.upper()}_PORT", str(free_port()))
        mp.setenv(f"MERCATO_{name.upper()}_METRICS_PORT", str(free_port()))
    mp.setenv("MERCATO_HOME", str(home))
    mp.delenv("MERCATO_MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiments = tmp / "experiments.yaml"
    experiments.write_text(EXPERIMENTS)
    mp.setenv("MERCATO_GATEWAY_EXPERIMENTS_FILE", str(experiments))
    out = RichConsole(file=io.StringIO(), width=200)
    opts = DemoOptions(home=home, users=600, items=300, epochs=2, progress=False)
    uri = default_tracking_uri()
    path = ensure_data(opts, out)
    load_profiles(path, opts, out)
    train_retrieval(path, opts, out, uri)
    train_ranker(path, opts, out, uri)
    returning, _ = pick_customers(path)
    sup = Supervisor(log_dir=home / "logs")
    sup.start()
    server = None
    try:
        assert sup.wait_healthy(180) and _models_loaded(sup, 180, out), out.file.getvalue()  # type: ignore[attr-defined]
        gateway = f"{sup.host}:{sup.ports['gateway'][0]}"
        profile = f"{sup.host}:{sup.ports['profile'][0]}"
        traffic = shop(gateway, [*cart_customers(profile, 40), returning], seed=1)
        assert traffic.calls >= 20 and traffic.offers > 0, traffic
        time.sleep(1.0)  # the gateway sends exposures in batches every 200 ms
        keys = tmp / "keys.json"
        keys.write_text(json.dumps({"keys": [{"name": "ops", "sha256": hash_key(KEY)}]}))
        export = home / "exports" / "events.parquet"
        sampler = MetricsSampler(default_targets(), interval_s=1.0)
        sampler.start()
        cfg = ConsoleConfig(
            events=EventLog(export, local_export_command(), max_age_s=3600),
            keys_file=keys,
            gateway=gateway,
            profile=profile,
            tracking_uri=uri,
            offers_file=DEFAULT_OFFERS_FILE,
            sampler=sampler,
            scorer=TwoTowerScorer(uri),
        )
        app = build_app(cfg)
        port = free_port()
        server, _ = _serve(app, port)
        time.sleep(2.5)  # two scrapes: rates over a window
        yield System(f"http://127.0.0.1:{port}", home, export, gateway, profile, app, returning)
    finally:
        if server is not None:
            server.should_exit = True
        sup.stop()
        mp.undo()


def get(url: str, key: str | None = KEY, method: str = "GET") -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, method=method)
    if key is not None:
        req.add_header("x-api-key", key)
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def api(system: System, path: str) -> Any:
    status, body, _ = get(system.url + path)
    assert status == 200, body[:500]
    return json.loads(body)


def export_frame(system: System) -> pd.DataFrame:
    from services.profile.export import read_events_frame

    return read_events_frame(system.export)


def test_unauthenticated_requests_are_refused(system: System) -> None:
    paths = ["overview", "demand", "trends", "customers", "offers", "customer?id=x"]
    for path in [*paths, "export/audience.csv?segment=lapsed"]:
        for key in (None, "wrong-key"):
            status, body, _ = get(f"{system.url}/api/{path}", key)
            assert status == 401, (path, key, body)
    req = urllib.request.Request(
        system.url + "/api/overview", headers={"cookie": "mercato_console=forged"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 401
    # nothing is writable: the pages answer GET only
    assert get(system.url + "/api/overview", method="POST")[0] == 405
    assert get(system.url + "/healthz", key=None)[0] == 200


def test_overview_reads_metrics_and_the_registry(system: System) -> None:
    from mercato.client import MercatoClient

    with MercatoClient(system.gateway, timeout=10.0, retries=0) as client:
        for _ in range(5):
            client.recommend(system.customer, k=3)
    time.sleep(2.5)  # the sampler scrapes every second
    d = api(system, "/api/overview")
    served = {(m["service"], m["model"], m["alias"]): m["version"] for m in d["metrics"]["models"]}
    assert served[("retrieval", "mercato-two-tower", "champion")] == 1
    assert served[("ranking", "mercato-ranker", "champion")] == 1
    families = {r["family"] for r in d["runs"]}
    assert {"two-tower"} <= families
    two_tower = next(r for r in d["runs"] if r["family"] == "two-tower")
    assert any(row["model"] == "two_tower" for row in two_tower["eval_table"])
    # answers per surface = the exposures of the last hour in the export
    df = export_frame(system)
    ex = df[df["event_type"] == "exposure"]
    ex = ex[ex["timestamp"] > ex["timestamp"].max() - pd.Timedelta(hours=1)]
    by = {r["surface"]: r["answers"] for r in d["traffic"]["surfaces"]}
    assert by == {s or "unspecified": int(n) for s, n in ex["surface"].value_counts().items()}
    # the 5 calls above, from the gateway's counters between two scrapes
    gw = {m["method"]: m for m in d["metrics"]["methods"] if m["service"] == "gateway"}
    assert gw["/mercato.v1.GatewayService/Recommend"]["requests"] >= 5
    stages = {s["stage"]: s for s in d["metrics"]["stages"]}
    assert stages and all(s["p50_ms"] is not None for s in stages.values() if s["calls"])


def test_demand_backtest_is_on_held_out_days(system: System) -> None:
    d = api(system, "/api/demand")
    assert d["clock"]["source"] == "data"  # the synthetic history ends in 2024
    now = pd.Timestamp(d["clock"]["now"])
    bt = d["backtest"]
    cutoff = now - pd.Timedelta(days=7)
    assert bt["held_out"] == [cutoff.isoformat(), now.isoformat()]
    # its weight and temperature were chosen on the week before the held-out one
    assert bt["tuning"]["validation_week"][1] == cutoff.isoformat()
    df = export_frame(system)
    buys = df[(df["event_type"] == "purchase") & (df["timestamp"] >= cutoff)]
    buys = buys[buys["timestamp"] < now]
    assert bt["errors"]["forecast"]["actual_units"] == float(buys["quantity"].clip(lower=1).sum())
    assert bt["errors"]["forecast"]["actual_units"] > 0
    assert d["model"] == "mercato-two-tower v1 @champion"
    for err in bt["errors"].values():
        assert 0 <= err["wape"] < 5


def test_audience_export_is_the_campaign_selection(system: System, tmp_path: Path) -> None:
    from mercato.cli import app

    clock = api(system, "/api/customers")["clock"]
    status, body, headers = get(system.url + "/api/export/audience.csv?segment=abandoned-carts")
    assert status == 200
    console_ids = {r["customer_id"] for r in csv.DictReader(io.StringIO(body.decode()))}
    assert len(console_ids) == int(headers["x-audience-size"]) > 0
    out = tmp_path / "campaign.csv"
    res = CliRunner().invoke(
        app,
        [
            "campaign", "--segment", "abandoned-carts", "--out", str(out), "--no-progress",
            "--as-of", clock["now"], "--k", "2",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    cli_ids = {r["customer_id"] for r in csv.DictReader(out.open())}
    assert cli_ids == console_ids
    # lapsed 30 days at the data's time: exactly the customers whose last purchase in the
    # export is at least 30 days before "now" (the service measures from its wall clock;
    # the selection moves the threshold by the lag)
    status, body, _ = get(system.url + "/api/export/audience.csv?segment=lapsed&lapsed_days=30")
    assert status == 200
    lapsed = {r["customer_id"] for r in csv.DictReader(io.StringIO(body.decode()))}
    df = export_frame(system)
    last = df[df["event_type"] == "purchase"].groupby("customer_id")["timestamp"].max()
    now = pd.Timestamp(clock["now"])
    want = {str(c) for c, t in last.items() if now - t >= pd.Timedelta(days=30)}
    assert lapsed == want and len(want) > 0
    # with its defaults the campaign finds customers on the historical data too
    res = CliRunner().invoke(
        app,
        ["campaign", "--segment", "abandoned-carts", "--out", str(out), "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    assert "time: data time" in res.output
    assert len({r["customer_id"] for r in csv.DictReader(out.open())}) > 0


def test_experiments_are_report_ab_of_the_export(system: System) -> None:
    from mercato.cli import app

    d = api(system, "/api/offers")
    res = CliRunner().invoke(
        app, ["report", "ab", "--events", str(system.export), "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    assert d["experiments"] == json.loads(res.output)
    assert {r["variant"] for r in d["experiments"]} == {"control", "twin"}
    df = export_frame(system)
    shown = df[(df["event_type"] == "exposure") & ~df["offer_id"].isin(["", "none"])]
    assert sum(r["shown"] for r in d["offers"]) == len(shown) > 0


def test_pages_in_headless_chromium(system: System) -> None:
    assert chromium_available(), "Debian's chromium is missing (.ci/run installs it)"
    res = visit_all(system.url, KEY, ARTIFACTS, customer=system.customer)
    assert res["login_refused"]
    for name in PAGES:
        page = res[name]
        assert page.state == "ready", (name, page.text[:500])
        assert page.errors == [], (name, page.errors)
        assert page.charts >= 1 and page.marks >= 1, (name, page.charts, page.marks)
        assert page.screenshot is not None and page.screenshot.stat().st_size > 10_000
    assert "customers" in res["export_text"] and "data time" in res["export_text"]
    assert "Download audience-abandoned-carts" in res["export_text"]
