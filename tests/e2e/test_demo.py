"""`mercato demo` end to end on a tiny shop: data, both models trained and promoted, the
four services as processes, real answers for each kind of customer, everything stopped.

The data and both models come from the session's ``tiny_shop`` (conftest.py), made by the
demo's own steps with the same options: the demo finds them and skips its training, so
the API tests that serve the same shop do not train it a second time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from services.common.supervisor import SERVICES, health_status
from tests.e2e.conftest import TinyShop
from tests.procs import free_port

pytestmark = pytest.mark.slow  # runs `mercato demo`: trains, serves, stops


def test_demo_trains_serves_and_explains(
    tiny_shop: TinyShop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mercato.demo import DemoOptions, run_demo

    for name in SERVICES:  # never the default ports: a developer may run `mercato up`
        monkeypatch.setenv(f"MERCATO_{name.upper()}_PORT", str(free_port()))
        monkeypatch.setenv(f"MERCATO_{name.upper()}_METRICS_PORT", str(free_port()))
    monkeypatch.setenv("MERCATO_HOME", str(tiny_shop.home))
    monkeypatch.delenv("MERCATO_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "demo.txt"
    with open(out, "w") as fh:
        console = Console(file=fh, width=200, color_system=None)
        opts = DemoOptions(
            home=tiny_shop.home,
            users=tiny_shop.users,
            items=tiny_shop.items,
            epochs=tiny_shop.epochs,
            progress=False,
            k=tiny_shop.k,
        )
        assert run_demo(opts, console) == 0
    text = out.read_text()
    assert "mercato-two-tower@champion already trained" in text  # trained once, by tiny_shop
    assert "What each customer gets, and why" in text
    for who in ("returning U", "new demo-new-", "abandoned cart U"):
        assert who in text, who
    answered = [ln for ln in text.splitlines() if "->" in ln and "models:" in ln]
    assert len(answered) >= 3, text[-3000:]
    # No stage failed. The one fallback allowed is the data one: a tiny shop has few basket
    # complements, so similar items fill a complement list, and the answer says so.
    for ln in answered:
        degraded = ln.split("degraded: ", 1)[1].split(";")[0]
        assert degraded in ("none", "retrieval->similar_items"), ln
    assert all("mercato-two-tower v1 @champion" in ln for ln in answered)
    assert sum("mercato-ranker v1 @champion" in ln for ln in answered) >= 2
    for name in SERVICES:  # every service was stopped
        port = os.environ[f"MERCATO_{name.upper()}_PORT"]
        assert health_status(f"127.0.0.1:{port}") == "UNREACHABLE", name
