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

from services.common.settings import mercato_home
from services.common.supervisor import (
    SERVICES,
    Supervisor,
    health_status,
    ports_from_env,
    stop_from_pid_file,
    write_pid_file,
)
from services.profile import cli as profile_cli
from training.cli import promote_command, train_app

app = typer.Typer(help="Mercato: real-time retail personalization.", no_args_is_help=True)
console = Console()
app.add_typer(profile_cli.app)  # load, export-events

app.add_typer(train_app, name="train")
app.command("promote")(promote_command)


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
    timeout: float = typer.Option(120.0, help="Seconds to wait for every service."),
) -> None:
    """Start the four services, show their health and a real call to each, stop them."""
    import grpc

    from mercato.v1 import diagnostics_pb2, diagnostics_pb2_grpc

    sup = Supervisor(log_dir=mercato_home() / "logs")
    sup.start()
    try:
        healthy = sup.wait_healthy(timeout)
        console.print(_status_table(sup))
        if not healthy:
            raise typer.Exit(1)
        table = Table(title="A real call to each service (DiagnosticsService.Echo)")
        for col in ("service", "answered by", "request id", "round trip"):
            table.add_column(col)
        for p in sup.processes:
            with grpc.insecure_channel(f"{sup.host}:{p.port}") as ch:
                stub = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch)
                started = time.perf_counter()
                resp = stub.Echo(diagnostics_pb2.EchoRequest(payload=b"hello"), timeout=5)
                elapsed = (time.perf_counter() - started) * 1000
            table.add_row(p.name, resp.service, resp.request_id, f"{elapsed:.1f} ms")
        console.print(table)
    finally:
        sup.stop()
        console.print("stopped all services")


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
