"""The console's HTTP API on the small known shop: operator keys, sessions, and each
page's JSON equal to the computation on the export it serves."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mercato.console import analytics as an
from mercato.console.app import ConsoleConfig, build_app
from mercato.console.sources import EventLog
from services.gateway.abreport import ab_report
from services.gateway.auth import hash_key
from services.gateway.campaign import data_clock
from services.ranking.settings import DEFAULT_OFFERS_FILE
from tests.console.data import known_shop
from tests.procs import free_port

KEY = "op-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    import uvicorn

    tmp = tmp_path_factory.mktemp("app")
    export = known_shop().write(tmp / "events.parquet")
    keys = tmp / "keys.yaml"
    keys.write_text(f"keys:\n  - name: ops\n    sha256: {hash_key(KEY)}\n  - name: gone\n"
                    f"    sha256: {hash_key('revoked-key')}\n    revoked: true\n")  # fmt: skip
    cfg = ConsoleConfig(
        events=EventLog(export),
        keys_file=keys,
        offers_file=DEFAULT_OFFERS_FILE,
        warm=False,
        gateway=f"127.0.0.1:{free_port()}",  # nothing listens: these pages need no service
        profile=f"127.0.0.1:{free_port()}",
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(cfg), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", export
    server.should_exit = True
    thread.join(10)


def call(
    url: str, key: str | None = KEY, body: Any = None, cookie: str = ""
) -> tuple[int, Any, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if key is not None:
        req.add_header("x-api-key", key)
    if cookie:
        req.add_header("cookie", cookie)
    if data:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw, resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def test_without_a_valid_key_everything_is_refused(served: tuple[str, Path]) -> None:
    url, _ = served
    for path in ("overview", "trends", "customers", "offers", "demand"):
        for key in (None, "wrong", "revoked-key"):
            assert call(f"{url}/api/{path}", key)[0] == 401, (path, key)
    assert call(f"{url}/api/trends", None, cookie="mercato_console=forged")[0] == 401
    assert call(f"{url}/api/login", None, body={"key": "wrong"})[0] == 401
    # the page and its assets need no key (they hold no data)
    assert call(url + "/", None)[0] == 200
    assert call(url + "/static/charts.js", None)[0] == 200


def test_a_session_cookie_after_sign_in(served: tuple[str, Path]) -> None:
    url, _ = served
    status, body, headers = call(f"{url}/api/login", None, body={"key": KEY})
    assert status == 200 and body == {"operator": "ops"}
    cookie = headers["set-cookie"].split(";")[0]
    assert "httponly" in headers["set-cookie"].lower()
    assert call(f"{url}/api/trends", None, cookie=cookie)[0] == 200
    assert call(f"{url}/api/me", None, cookie=cookie)[1] == {"operator": "ops"}


def test_each_page_is_the_computation_on_the_export(served: tuple[str, Path]) -> None:
    url, export = served
    from services.profile.export import read_events_frame

    df = read_events_frame(export)
    status, trends, _ = call(f"{url}/api/trends")
    assert status == 200
    clock = an.Clock(
        pd.Timestamp(trends["clock"]["now"]), pd.Timestamp(trends["clock"]["wall"]), "data"
    )
    assert clock.now == df[df["event_type"] == "view"]["timestamp"].max()
    want = json.loads(json.dumps(an.trends_page(df, clock)))
    for key in ("rising_items", "falling_items"):  # titles come from the profile service
        assert all(row.pop("title") == "" for row in trends[key])
    assert {k: v for k, v in trends.items() if k != "clock"} == {
        k: v for k, v in want.items() if k != "clock"
    }
    customers = call(f"{url}/api/customers")[1]
    assert customers["current"] == an.customers_page(df, clock)["current"]
    offers = call(f"{url}/api/offers")[1]
    assert offers["experiments"] == [
        json.loads(json.dumps(r.__dict__)) for r in ab_report(an.rows_for_report(df))
    ]
    pct10 = next(o for o in offers["offers"] if o["offer_id"] == "pct10")
    assert (pct10["shown"], pct10["redemptions"], pct10["spend"]) == (3, 1, 5.0)


def test_campaign_clock() -> None:
    wall = int(pd.Timestamp("2026-11-28T00:00:00Z").value // 1000)
    old = int(pd.Timestamp("2024-04-30T12:00:00Z").value // 1000)
    as_of, text = data_clock(old, wall)
    assert as_of == old and text.startswith("data time 2024-04-30 12:00")
    assert data_clock(wall - 3600 * 10**6, wall)[0] == 0  # live data: the service's clock
    assert data_clock(old, wall, "now")[0] == 0
    assert data_clock(old, wall, "2024-01-02T00:00:00")[0] == int(
        pd.Timestamp("2024-01-02T00:00:00Z").value // 1000
    )
    with pytest.raises(ValueError):
        data_clock(old, wall, "yesterday-ish")
