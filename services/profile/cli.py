"""Profile commands of the ``mercato`` CLI: ``load`` and ``export-events``.

Both open the store the profile service is configured with (``MERCATO_PROFILE_*``;
the options below override it) directly, not through gRPC. SQLite allows this while
the service runs (WAL: one writer at a time, readers never wait); so does Redis.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from services.profile.datasets import ADAPTERS, DatasetUnavailable, open_dataset
from services.profile.export import export_events
from services.profile.loader import load_dataset
from services.profile.settings import ProfileSettings
from services.profile.store import StoreUnavailable, make_store

app = typer.Typer(help="Profile data: bootstrap the store, export the event log.")
console = Console(stderr=True)


def _settings(
    backend: str | None, sqlite_path: str | None, redis_url: str | None
) -> ProfileSettings:
    settings = ProfileSettings()
    update: dict[str, Any] = {}
    if backend:
        if backend not in ("sqlite", "redis"):
            raise typer.BadParameter("--backend must be sqlite or redis")
        update["backend"] = backend
    if sqlite_path:
        update["sqlite_path"] = sqlite_path
    if redis_url:
        update["redis_url"] = redis_url
    return settings.model_copy(update=update)


def _where(settings: ProfileSettings) -> str:
    if settings.backend == "redis":
        return f"redis {settings.redis_url} (prefix {settings.redis_prefix})"
    return f"sqlite {settings.resolved_sqlite_path()}"


BACKEND = typer.Option(None, help="sqlite | redis (default: MERCATO_PROFILE_BACKEND).")
SQLITE = typer.Option(None, help="SQLite file (default: MERCATO_PROFILE_SQLITE_PATH).")
REDIS = typer.Option(None, help="Redis URL (default: MERCATO_PROFILE_REDIS_URL).")


@app.command()
def load(
    data: str = typer.Option(..., help=f"Dataset kind: {' | '.join(ADAPTERS)}."),
    path: str = typer.Option(..., help="The dataset file (or folder, for synthetic)."),
    backend: str | None = BACKEND,
    sqlite_path: str | None = SQLITE,
    redis_url: str | None = REDIS,
    batch_size: int = typer.Option(1000, min=1, max=10_000, help="Events per write."),
    default_stock: int = typer.Option(100, min=0, help="Stock of items the data has none for."),
    limit: int = typer.Option(0, min=0, help="online-retail: read only the first N rows."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Import a dataset's catalog, customers and events (idempotent on re-run)."""
    settings = _settings(backend, sqlite_path, redis_url)
    options: dict[str, Any] = {}
    if data in ("online-retail", "events"):
        options["default_stock"] = default_stock
    if data == "online-retail" and limit:
        options["limit"] = limit
    try:
        dataset = open_dataset(data, path, **options)
        total = dataset.event_count()
    except DatasetUnavailable as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc

    async def run() -> Any:
        store = make_store(settings)
        await store.open()
        try:
            with tqdm(total=total, unit="event", desc=f"load {data}", disable=not progress) as bar:
                return await load_dataset(
                    store, dataset, batch_size, settings.max_future_skew_seconds, bar
                )
        finally:
            await store.close()

    try:
        report = asyncio.run(run())
    except (StoreUnavailable, DatasetUnavailable) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    table = Table(title=f"loaded {data} into {_where(settings)}")
    for col in (
        "items new",
        "items updated",
        "customers",
        "events new",
        "duplicates",
        "rejected",
        "seconds",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        str(report.items_created),
        str(report.items_updated),
        str(report.customers),
        str(report.accepted),
        str(report.duplicates),
        str(report.rejected),
        f"{report.seconds:.1f}",
    )
    console.print(table)
    for line in report.errors:
        console.print(f"[yellow]rejected[/yellow] {line}")


@app.command("export-events")
def export_events_cmd(
    out: Path = typer.Option(..., help="Output file: .parquet or .csv."),
    backend: str | None = BACKEND,
    sqlite_path: str | None = SQLITE,
    redis_url: str | None = REDIS,
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Write the event log, in log order, in the training data format."""
    settings = _settings(backend, sqlite_path, redis_url)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise typer.BadParameter("--out must end in .parquet or .csv")

    async def run() -> int:
        store = make_store(settings)
        await store.open()
        try:
            with tqdm(unit="event", desc="export", disable=not progress) as bar:
                return await export_events(store, out, progress=bar)
        finally:
            await store.close()

    try:
        rows = asyncio.run(run())
    except StoreUnavailable as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"wrote {rows} events to {out}")
