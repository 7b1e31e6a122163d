"""Gateway commands of the ``mercato`` CLI: ``report ab`` (and ``campaign``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from services.gateway.abreport import (
    Row,
    ab_report,
    rich_table,
    row_from_log,
    rows_from_export,
    write_report,
)

report_app = typer.Typer(help="Reports from the event log.", no_args_is_help=True)
console = Console()


def _rows_from_store(backend: str | None, sqlite_path: str | None) -> list[Row]:
    from services.profile.cli import _settings
    from services.profile.store import make_store

    settings = _settings(backend, sqlite_path, None)

    async def run() -> list[Row]:
        store = make_store(settings)
        await store.open()
        try:
            return [row_from_log(ev) async for ev in store.iter_log()]
        finally:
            await store.close()

    return asyncio.run(run())


@report_app.command("ab")
def report_ab(
    events: Path | None = typer.Option(
        None, help="An `mercato export-events` file (.parquet/.csv); default: the profile store."
    ),
    backend: str | None = typer.Option(None, help="sqlite | redis (reading the store)."),
    sqlite_path: str | None = typer.Option(None, help="SQLite file of the profile store."),
    window: float = typer.Option(
        86_400.0, min=0, help="Attribution window in seconds after an exposure."
    ),
    experiment: str | None = typer.Option(None, help="Only this experiment."),
    confidence: float = typer.Option(0.95, min=0.5, max=0.999, help="Interval level."),
    out: Path | None = typer.Option(None, help="Also write the report to .json or .csv."),
    fmt: str = typer.Option("table", "--format", help="Print as table | json | csv."),
) -> None:
    """Per experiment variant: exposures, CTR, add-to-cart, conversion, revenue per
    exposure, with confidence intervals, from the event log."""
    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter("--format must be table, json or csv")
    if events is not None:
        rows: list[Row] | Iterator[Row] = rows_from_export(events)
    else:
        rows = _rows_from_store(backend, sqlite_path)
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
