"""Prometheus metrics of the runtime, served over HTTP on each service's metrics port."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Buckets from 0.25 ms to 10 s: fine enough for the millisecond-level internal hops.
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.0,
    2.5,
    5.0,
    10.0,
)

RPC_REQUESTS = Counter(
    "mercato_rpc_requests_total",
    "gRPC calls handled, by method and status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "mercato_rpc_latency_seconds",
    "gRPC handling time, by method and status code.",
    ["service", "method", "code"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("mercato_rpc_in_flight", "gRPC calls being handled now.", ["service"])
SERVICE_INFO = Gauge(
    "mercato_service_up", "1 while the service process is up.", ["service", "version"]
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on ``host:port`` in a background thread (no-op when port is 0)."""
    if port <= 0:
        return
    start_http_server(port, addr=host)
    log.info("metrics listening", extra={"metrics_address": f"http://{host}:{port}/metrics"})
