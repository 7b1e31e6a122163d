"""Gateway commands of the ``mercato`` CLI: ``report ab`` (and ``campaign``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from services.gateway.abreport import (
    Row,
    ab_report,
    rich_table,
    rows_from_export,
    write_report,
)

report_app = typer.Typer(help="Reports from the event log.", no_args_is_help=True)
console = Console()


def default_events_path() -> Path:
    """Where ``mercato console`` keeps its export of the event log (and where
    ``report ab`` looks without ``--events``)."""
    from services.common.settings import mercato_home

    return mercato_home() / "exports" / "events.parquet"


@report_app.command("ab")
def report_ab(
    events: Path | None = typer.Option(
        None,
        help="An `mercato export-events` file (.parquet/.csv); default: "
        "$MERCATO_HOME/exports/events.parquet.",
    ),
    window: float = typer.Option(
        86_400.0, min=0, help="Attribution window in seconds after an exposure."
    ),
    experiment: str | None = typer.Option(None, help="Only this experiment."),
    confidence: float = typer.Option(0.95, min=0.5, max=0.999, help="Interval level."),
    out: Path | None = typer.Option(None, help="Also write the report to .json or .csv."),
    fmt: str = typer.Option("table", "--format", help="Print as table | json | csv."),
) -> None:
    """Per experiment variant: exposures, CTR, add-to-cart, conversion, revenue per
    exposure, with confidence intervals, from the exported event log."""
    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter("--format must be table, json or csv")
    events = events or default_events_path()
    if not events.exists():
        console.print(
            f"[red]no event export at {events}: write one with "
            f"`mercato export-events --out {events}`[/red]"
        )
        raise typer.Exit(2)
    rows: Iterator[Row] = rows_from_export(events)
    lines = ab_report(rows, window_seconds=window, confidence=confidence, experiment=experiment)
    if out is not None:
        write_report(lines, out)
    if fmt == "table":
        console.print(rich_table(lines, window, confidence))
        if not lines:
            console.print("no exposures with experiment assignments in the event log")
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"report.{fmt}"
            write_report(lines, path)
            print(path.read_text(), end="")


def campaign(
    segment: str = typer.Option(..., help="abandoned-carts | lapsed | category-fans."),
    out: Path = typer.Option(..., help="Output file: .csv or .parquet."),
    k: int = typer.Option(10, min=1, max=100, help="Items per customer."),
    category: str = typer.Option("", help="category-fans: the category."),
    min_affinity: float = typer.Option(
        0.2, min=0, max=1, help="category-fans: least share of the customer's interest."
    ),
    idle_hours: float = typer.Option(24.0, min=0, help="abandoned-carts: idle at least."),
    max_idle_days: float = typer.Option(30.0, min=0, help="abandoned-carts: idle at most."),
    lapsed_days: float = typer.Option(180.0, min=0, help="lapsed: days since last purchase."),
    limit: int = typer.Option(0, min=0, help="At most this many customers (0 = all)."),
    as_of: str = typer.Option(
        "auto",
        help="'Now' for the idle/lapsed windows: auto (the data's time when its newest cart "
        "change is over a week old, as on historical data), now, or an ISO time.",
    ),
    gateway: str = typer.Option("", help="Gateway host:port (default: the local one)."),
    profile: str = typer.Option("", help="Profile host:port (default: the local one)."),
    api_key: str = typer.Option("", envvar="MERCATO_API_KEY", help="Gateway API key."),
    concurrency: int = typer.Option(8, min=1, max=256, help="Gateway calls in flight."),
    timeout: float = typer.Option(2.0, min=0.01, help="Deadline of each gateway call (s)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Recommendations and the chosen offer for every customer of a segment, through the
    gateway (same models, rules and offer budgets as online), streamed to CSV/Parquet.
    TLS to the services: MERCATO_CLIENT_TLS_{CA,CERT,KEY}_FILE."""
    from tqdm import tqdm

    from mercato.v1.profile_pb2_grpc import ProfileServiceStub
    from services.common.channels import aio_channel
    from services.common.settings import ClientTlsSettings
    from services.common.supervisor import ports_from_env
    from services.gateway.campaign import (
        CampaignSpec,
        data_clock,
        latest_cart_change,
        offers_summary,
        run_campaign,
    )

    try:
        spec = CampaignSpec(
            segment=segment,
            k=k,
            idle_hours=idle_hours,
            max_idle_days=max_idle_days,
            lapsed_days=lapsed_days,
            category=category,
            min_affinity=min_affinity,
            limit=limit,
        )
        if out.suffix.lower() not in (".csv", ".parquet"):
            raise ValueError("--out must end in .csv or .parquet")
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    ports = ports_from_env()
    gw_target = gateway or f"127.0.0.1:{ports['gateway'][0]}"
    prof_target = profile or f"127.0.0.1:{ports['profile'][0]}"

    async def run() -> Any:
        nonlocal spec
        tls = ClientTlsSettings()
        gw_ch = aio_channel(gw_target, tls)
        prof_ch = aio_channel(prof_target, tls)
        try:
            if spec.segment != "category-fans":
                wall_us = time.time_ns() // 1000
                latest = 0
                if as_of == "auto":
                    latest = await latest_cart_change(ProfileServiceStub(prof_ch))
                try:
                    as_of_us, text = data_clock(latest, wall_us, as_of)
                except ValueError as exc:
                    raise typer.BadParameter(str(exc)) from exc
                spec = replace(spec, as_of_us=as_of_us, wall_us=wall_us)
                console.print(f"time: {text}")
            with tqdm(unit="customer", desc=f"campaign {segment}", disable=not progress) as bar:
                return await run_campaign(
                    spec,
                    gw_ch,
                    prof_ch,
                    out,
                    api_key=api_key,
                    concurrency=concurrency,
                    timeout=timeout,
                    progress=bar,
                )
        finally:
            await gw_ch.close()
            await prof_ch.close()

    import grpc

    try:
        result = asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]listing the segment failed: {exc.code().name}: {exc.details()}[/red]")
        raise typer.Exit(1) from exc
    console.print(
        f"wrote {result.rows} rows for {result.customers} customers to {out}; "
        f"offers {result.offers} {offers_summary(result)}; degraded answers {result.degraded}; "
        f"failed {result.failed}"
    )
    if result.failed:
        raise typer.Exit(1)


keys_app = typer.Typer(help="Gateway API keys.", no_args_is_help=True)


@keys_app.command("hash")
def keys_hash(key: str = typer.Argument(..., help="The new API key.")) -> None:
    """Print the SHA-256 digest to store in the keys file (the key itself is never stored)."""
    from services.gateway.auth import hash_key

    print(hash_key(key))
