"""The ``mercato`` command line: run services, train and promote models, load data.

Sub-commands of other areas register themselves here with ``app.add_typer`` so that
there is one entry point.
"""

from __future__ import annotations

import os
import signal
import time

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import typer
from rich.console import Console
from rich.table import Table

from mercato.console.cli import console_command
from services.common.settings import mercato_home
from services.common.supervisor import (
    SERVICES,
    Supervisor,
    health_status,
    ports_from_env,
    stop_from_pid_file,
    write_pid_file,
)
from services.gateway import cli as gateway_cli
from services.profile.datasets import register_adapter


def _synthetic_dataset(path: str, **_: object) -> object:
    """The training package's synthetic shop as a profile dataset (lazy import)."""
    from training.profile_data import profile_dataset

    return profile_dataset(path)


# The composition root wires the training package's adapter into the profile service.
register_adapter("synthetic", _synthetic_dataset)  # type: ignore[arg-type]

from services.profile import cli as profile_cli  # noqa: E402
from training.cli import evaluate_command, promote_command, train_app  # noqa: E402

app = typer.Typer(help="Mercato: real-time retail personalization.", no_args_is_help=True)
console = Console()
app.add_typer(profile_cli.app)  # load, export-events

app.add_typer(train_app, name="train")
app.add_typer(gateway_cli.report_app, name="report")
app.command("campaign")(gateway_cli.campaign)
app.add_typer(gateway_cli.keys_app, name="keys")
app.command("promote")(promote_command)
app.command("evaluate")(evaluate_command)
app.command("console")(console_command)


def _status_table(sup: Supervisor) -> Table:
    table = Table(title="Mercato services")
    for col in ("service", "gRPC address", "health", "metrics", "pid"):
        table.add_column(col)
    for p in sup.processes:
        color = "green" if p.status == "SERVING" else "yellow" if "no model" in p.status else "red"
        table.add_row(
            p.name,
            f"{sup.host}:{p.port}",
            f"[{color}]{p.status}[/{color}]",
            f"http://{sup.host}:{p.metrics_port}/metrics",
            str(p.process.pid),
        )
    return table


@app.command()
def serve(
    service: str = typer.Argument(..., help="profile | retrieval | ranking | gateway"),
) -> None:
    """Run one service in the foreground, as a container does."""
    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    import importlib

    module = importlib.import_module(f"services.{service}.server")
    module.main()


@app.command()
def up(
    detach: bool = typer.Option(False, help="Return once healthy; stop later with `mercato down`."),
    timeout: float = typer.Option(120.0, help="Seconds to wait for every service to be SERVING."),
) -> None:
    """Start the four services as separate processes and wait until they are SERVING."""
    log_dir = mercato_home() / "logs"
    sup = Supervisor(log_dir=log_dir)
    sup.start()
    healthy = sup.wait_healthy(timeout)
    console.print(_status_table(sup))
    console.print(f"logs: {log_dir}")
    if not healthy:
        console.print("[red]not every service is SERVING; see the logs above[/red]")
        sup.stop()
        raise typer.Exit(1)
    console.print("web console: `mercato console` (docs/console.md)")
    if detach:
        write_pid_file(sup.processes)
        console.print("running in the background; `mercato down` stops them")
        return
    console.print("Ctrl-C stops them.")
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping and all(p.process.poll() is None for p in sup.processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    console.print("stopping...")
    sup.stop()
    console.print("stopped")


@app.command()
def demo(
    users: int = typer.Option(6_000, min=100, help="Synthetic customers."),
    items: int = typer.Option(3_000, min=100, help="Synthetic catalog size."),
    seed: int = typer.Option(0, help="Data seed."),
    retrain: bool = typer.Option(False, help="Train both models even if current ones exist."),
    epochs: int = typer.Option(0, min=0, help="Training epochs (0 = the training default)."),
    k: int = typer.Option(5, min=1, max=20, help="Items shown per call."),
    timeout: float = typer.Option(180.0, help="Seconds to wait for every service."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Generate data, train and promote both models, start the four services, show what
    a returning, a new and an abandoned-cart customer get, and stop."""
    from mercato.demo import DemoOptions, run_demo

    opts = DemoOptions(
        users=users,
        items=items,
        seed=seed,
        retrain=retrain,
        epochs=epochs,
        k=k,
        timeout_s=timeout,
        progress=progress,
    )
    raise typer.Exit(run_demo(opts, console))


cluster_app = typer.Typer(help="A Kubernetes overlay run as local processes (mercato/cluster.py).")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(
    overlay: str = typer.Option("prod", help="Overlay under k8s/overlays, or a path to one."),
    replicas: int = typer.Option(2, min=1, max=8, help="Processes per stateless service."),
    workdir: str = typer.Option("", help="Folder for the processes' volumes and logs."),
    train: bool = typer.Option(False, help="Run the nightly retrain Job once after start."),
) -> None:
    """Render the overlay with kustomize and run what it describes as local processes:
    every Deployment's command and environment (replicas on their own ports), MLflow on
    PostgreSQL with proxied artifacts, Redis. Ctrl-C stops everything."""
    from pathlib import Path

    from mercato.cluster import LocalCluster, render_overlay

    path = Path(overlay)
    if not path.is_dir():
        path = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / overlay
    work = Path(workdir) if workdir else mercato_home() / "cluster" / path.name
    cluster = LocalCluster(render_overlay(path), work, replicas=replicas)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    cluster.up()
    try:
        table = Table(title=f"{path.name} as processes (logs in {work / 'logs'})")
        for col in ("process", "address", "metrics", "pid"):
            table.add_column(col)
        for row in cluster.describe():
            table.add_row(row[0], row[1], row[2], str(row[3]))
        console.print(table)
        console.print(f"gateway API key: {cluster.api_key}   MLflow: {cluster.mlflow_url}")
        if train:
            done = cluster.run_job()
            console.print(f"nightly retrain exited {done.returncode}")
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.down()


@app.command()
def down() -> None:
    """Stop services started with `mercato up --detach`."""
    stopped = stop_from_pid_file()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def status(host: str = "127.0.0.1") -> None:
    """Show the gRPC health of the four services on their default ports."""
    table = Table(title="Mercato health")
    table.add_column("service")
    table.add_column("address")
    table.add_column("health")
    ports = ports_from_env()
    for name in SERVICES:
        address = f"{host}:{ports[name][0]}"
        table.add_row(name, address, health_status(address))
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
