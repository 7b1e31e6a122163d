"""Drive the console in a real headless Chromium (Debian's ``chromium`` package through
Playwright; no browser is ever downloaded): sign in, open every page, wait until it is
drawn, count its charts, collect console errors and save a screenshot.

As a script it writes the screenshots of docs/console.md::

    python -m tests.console.browser --url http://127.0.0.1:8080 --key KEY --out docs/console \\
        --customer U00001276
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGES = ("overview", "customer", "demand", "trends", "customers", "offers")
CHROMIUM = os.environ.get("MERCATO_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class PageResult:
    name: str
    state: str
    charts: int
    marks: int  # drawn SVG elements (paths, bars, points)
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    text: str = ""


def chromium_available() -> bool:
    return Path(CHROMIUM).exists() or shutil.which("chromium") is not None


def visit_all(
    url: str,
    key: str,
    out: Path,
    customer: str = "",
    width: int = 1280,
    export_segment: str = "abandoned-carts",
) -> dict[str, Any]:
    """Open every page; returns {page: PageResult} plus the login and export checks."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    profile = tempfile.mkdtemp(prefix="mercato-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                headless=True,
                args=FLAGS,
                viewport={"width": width, "height": 900},
            )
            page = ctx.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/#overview")
            page.wait_for_selector("main[data-state=login]", timeout=60_000)
            page.fill("#key", "not-the-key")
            page.click("#login button")
            page.wait_for_selector("#login-error:has-text('not valid')", timeout=30_000)
            results["login_refused"] = True
            errors.clear()  # the refused sign-in's 401 is expected
            page.fill("#key", key)
            page.click("#login button")
            for name in PAGES:
                errors.clear()
                hash_ = f"customer?id={customer}" if name == "customer" and customer else name
                page.goto(f"{url}/#{hash_}")
                page.wait_for_function(
                    f"document.querySelector('main').dataset.page === '{name}' && "
                    "['ready', 'error'].includes(document.querySelector('main').dataset.state)",
                    timeout=600_000,
                )
                state = page.eval_on_selector("main", "m => m.dataset.state")
                charts = page.locator("svg.chart").count()
                marks = page.locator(
                    "svg.chart path.series, svg.chart rect.bar, svg.chart line.interval"
                ).count()
                shot = out / f"{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                results[name] = PageResult(
                    name, state, charts, marks, list(errors), shot, page.inner_text("main")
                )
            # one-click audience export on the customers page (when it loaded)
            results["export_text"] = ""
            if results["customers"].state == "ready":
                page.goto(f"{url}/#customers")
                page.wait_for_selector("main[data-state=ready]", timeout=120_000)
                page.select_option("select[name=segment]", export_segment)
                page.click("#export")
                page.wait_for_selector("#export-result a", timeout=120_000)
                results["export_text"] = page.inner_text("#export-result")
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--customer", default="")
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args()
    res = visit_all(args.url, args.key, args.out, args.customer, args.width)
    for name in PAGES:
        r = res[name]
        print(f"{name}: {r.state}, {r.charts} charts, {r.marks} marks, errors {r.errors}")
    print("export:", res["export_text"])


if __name__ == "__main__":
    main()
