"""``mercato console``: serve the web console (see docs/console.md)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import typer
from rich.console import Console as RichConsole

console = RichConsole()


def _local_keys_file(home: Path) -> tuple[Path, str]:
    """A fresh operator key for this run (printed once) and the file with its hash."""
    import yaml

    from services.gateway.auth import hash_key

    key = secrets.token_urlsafe(24)
    path = home / "console" / "operator-keys.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"keys": [{"name": "operator", "sha256": hash_key(key)}]}))
    path.chmod(0o600)
    return path, key


def console_command(
    host: str = typer.Option("127.0.0.1", envvar="MERCATO_CONSOLE_HOST", help="Bind address."),
    port: int = typer.Option(8080, envvar="MERCATO_CONSOLE_PORT", help="HTTP port."),
    keys_file: Path | None = typer.Option(
        None,
        envvar="MERCATO_CONSOLE_KEYS_FILE",
        help="Operator keys (the gateway's hashed-key format); default: a fresh key for "
        "this run, printed once.",
    ),
    events: Path | None = typer.Option(
        None,
        envvar="MERCATO_CONSOLE_EVENTS",
        help="The exported event log; default $MERCATO_HOME/exports/events.parquet.",
    ),
    export: bool = typer.Option(
        True,
        envvar="MERCATO_CONSOLE_EXPORT",
        help="Refresh the export with `mercato export-events` when older than --export-age "
        "(local use; a cluster mounts an export instead).",
    ),
    export_age: float = typer.Option(300.0, min=10, help="Seconds before a re-export."),
    gateway: str = typer.Option("", envvar="MERCATO_CONSOLE_GATEWAY", help="host:port."),
    profile: str = typer.Option("", envvar="MERCATO_CONSOLE_PROFILE", help="host:port."),
    gateway_api_key: str = typer.Option(
        "", envvar="MERCATO_API_KEY", help="Key for the gateway, when it checks keys."
    ),
    metrics: str = typer.Option(
        "",
        envvar="MERCATO_CONSOLE_METRICS",
        help="service=url,... of the /metrics endpoints (default: the local services).",
    ),
    scrape_interval: float = typer.Option(15.0, min=1, help="Seconds between scrapes."),
    tracking_uri: str = typer.Option("", help="MLflow tracking URI (default: the local one)."),
    offers_file: Path | None = typer.Option(
        None, envvar="MERCATO_RANKING_OFFERS_FILE", help="Offer catalog (budgets, costs)."
    ),
    secure_cookie: bool = typer.Option(
        False, envvar="MERCATO_CONSOLE_SECURE_COOKIE", help="Session cookie only over HTTPS."
    ),
) -> None:
    """Serve the web console: overview, customer lookup, demand and stock, trends,
    customers, offers and experiments. Reads only public interfaces."""
    import uvicorn

    from mercato.console.app import ConsoleConfig, build_app
    from mercato.console.sources import (
        EventLog,
        MetricsSampler,
        TwoTowerScorer,
        default_targets,
        local_export_command,
        parse_targets,
    )
    from services.common.settings import default_tracking_uri, mercato_home
    from services.common.supervisor import ports_from_env
    from services.common.threads import configure_threads
    from services.gateway.cli import default_events_path
    from services.ranking.settings import DEFAULT_OFFERS_FILE

    configure_threads(int(os.environ.get("MERCATO_CONSOLE_THREADS", "1")))
    home = mercato_home()
    key = ""
    if keys_file is None:
        keys_file, key = _local_keys_file(home)
    ports = ports_from_env()
    targets = parse_targets(metrics) if metrics else default_targets()
    sampler = MetricsSampler(targets, scrape_interval)
    uri = tracking_uri or default_tracking_uri()
    cfg = ConsoleConfig(
        events=EventLog(
            events or default_events_path(),
            local_export_command() if export else None,
            export_age,
        ),
        keys_file=keys_file,
        gateway=gateway or f"127.0.0.1:{ports['gateway'][0]}",
        profile=profile or f"127.0.0.1:{ports['profile'][0]}",
        gateway_api_key=gateway_api_key,
        tracking_uri=uri,
        offers_file=offers_file or DEFAULT_OFFERS_FILE,
        sampler=sampler,
        scorer=TwoTowerScorer(uri),
        secure_cookie=secure_cookie,
    )
    app = build_app(cfg)
    sampler.start()
    console.print(f"Mercato console on http://{host}:{port}/")
    if key:
        console.print(f"operator key for this run: [bold]{key}[/bold] (hash in {keys_file})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        sampler.stop()
