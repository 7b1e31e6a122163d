"""Load benchmark of the gateway (``make bench-load``).

All four services run as real processes on this machine (``tests/procs.py``), each with
a fresh ``MERCATO_HOME``; the profile store (SQLite) is filled with the synthetic retail
generator (``training.synthetic``) through the real write path: ``--items`` catalog items
(``UpsertItems``) and the events of ``--users`` customers (``TrackEvents``, timestamps
shifted so the newest event is now). Then, from one asyncio gRPC client process:

- **floor**: ``DiagnosticsService.Echo`` on the gateway (the same runtime: interceptors,
  metrics, limits; no downstream calls), closed loop and open loop like Recommend;
- **closed loop**: ``--concurrency`` Recommend calls always in flight for ``--duration``
  seconds: throughput and latency;
- **open loop**: Recommend sent at a fixed ``--rate`` per second for ``--duration``
  seconds, latency measured from the scheduled send time (no coordinated omission);

with throughput, p50/p95/p99, errors, the fraction of answers marked degraded (and by
which stage), and per-hop latency from the gateway's Prometheus histogram
``mercato_gateway_hop_latency_seconds`` (difference of scrapes before/after each run;
quantiles are bucket upper bounds). Models: retrieval and ranking load whatever the
MLflow registry at ``MERCATO_MLFLOW_TRACKING_URI`` holds (none by default: retrieval
then answers UNIMPLEMENTED/UNAVAILABLE and every answer is degraded to trending items,
ranking ranks by rules only). Such numbers are a preliminary baseline, not the target
configuration. The client shares the machine's cores with the four services.

Results: ``bench/results/load.json`` and ``bench/results/load.md`` (``--tag`` changes the
name). ``--quick`` runs a small catalog for a few seconds (smoke test of the bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mercato.v1 import (  # noqa: E402
    common_pb2,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)
from services.common.channels import channel_options  # noqa: E402
from tests.procs import ServiceProc, start_service  # noqa: E402

ET = common_pb2.EventType
HOME = common_pb2.Context(surface=common_pb2.SURFACE_HOME)
EVENT_TYPES = {
    "view": ET.EVENT_TYPE_VIEW,
    "cart": ET.EVENT_TYPE_ADD_TO_CART,
    "add_to_cart": ET.EVENT_TYPE_ADD_TO_CART,
    "purchase": ET.EVENT_TYPE_PURCHASE,
}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# --- data -------------------------------------------------------------------------


def load_data(profile: ServiceProc, items: int, users: int, seed: int) -> dict[str, Any]:
    """Synthetic catalog + events into the profile service over gRPC; returns counts."""
    from training.synthetic import SyntheticConfig, build_catalog, iter_blocks

    started = time.perf_counter()
    cfg = SyntheticConfig(n_users=users, n_items=items, days=30, seed=seed)
    cat = build_catalog(cfg)
    frame = cat.items_frame()
    rng_stock = (frame.index.to_numpy() * 7919) % 50  # deterministic, some out of stock
    built = time.perf_counter()
    options = channel_options(64 * 1024 * 1024)
    with grpc.insecure_channel(profile.target, options=options) as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        batch: list[common_pb2.Item] = []
        for row, stock in zip(frame.itertuples(index=False), rng_stock, strict=True):
            batch.append(
                common_pb2.Item(
                    item_id=row.item_id,
                    title=f"{row.category.rsplit('/', 1)[-1]} {row.item_id}",
                    category=row.category,
                    price=float(row.price),
                    stock=int(stock),
                    attributes={"brand": row.attr_brand, "color": row.attr_color},
                )
            )
            if len(batch) == 1000:
                stub.UpsertItems(profile_pb2.UpsertItemsRequest(items=batch), timeout=60)
                batch = []
        if batch:
            stub.UpsertItems(profile_pb2.UpsertItemsRequest(items=batch), timeout=60)
        items_done = time.perf_counter()
        blocks = list(iter_blocks(cfg, cat))
        last_ts = max(int(ev["ts"].max()) for ev, _ in blocks)
        shift = int(time.time()) - 60 - last_ts
        n_events = 0
        customers: list[str] = []
        for ev, us in blocks:
            customers += list(us["user_id"].astype(str))
            events: list[common_pb2.Event] = []
            for i, r in enumerate(ev.itertuples(index=False)):
                kind = EVENT_TYPES.get(str(r.event))
                if kind is None:
                    continue
                e = common_pb2.Event(
                    event_id=f"s{seed}-{r.user_id}-{i}-{r.ts}",
                    customer_id=str(r.user_id),
                    type=kind,
                    item_id=str(r.item_id),
                    session_id=str(r.session_id),
                )
                e.timestamp.FromSeconds(int(r.ts) + shift)
                if kind == ET.EVENT_TYPE_PURCHASE:
                    e.order_id = f"o-{r.user_id}-{r.session_id}"
                events.append(e)
                if len(events) == 1000:
                    stub.TrackEvents(
                        profile_pb2.ProfileServiceTrackEventsRequest(
                            events=events, partial_accept=True
                        ),
                        timeout=120,
                    )
                    n_events += len(events)
                    events = []
            if events:
                stub.TrackEvents(
                    profile_pb2.ProfileServiceTrackEventsRequest(
                        events=events, partial_accept=True
                    ),
                    timeout=120,
                )
                n_events += len(events)
    done = time.perf_counter()
    return {
        "items": items,
        "customers": len(customers),
        "events": n_events,
        "generate_s": round(built - started, 1),
        "upsert_items_s": round(items_done - built, 1),
        "track_events_s": round(done - items_done, 1),
        "customer_ids": customers,
    }


# --- metrics ----------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}\s+([0-9.eE+-]+|NaN|\+Inf)$")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition as {(name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2))))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def hop_latency(
    before: dict[Any, float], after: dict[Any, float], metric: str, by: str
) -> dict[str, dict[str, float]]:
    """Per label ``by`` (hop / method): successful calls, their mean and bucket-bound
    p50/p99 in ms over the window between two scrapes, and the other outcomes' counts."""
    buckets: dict[str, dict[float, float]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    not_ok: dict[str, dict[str, int]] = {}
    for (name, labels), value in after.items():
        d = dict(labels)
        key = d.get(by)
        if key is None or not name.startswith(metric):
            continue
        delta = value - before.get((name, labels), 0.0)
        outcome = d.get("outcome", d.get("code", "OK"))
        if outcome != "OK":  # latency of successful calls only; the others are counted
            if name == metric + "_count" and delta > 0:
                not_ok.setdefault(key, {})[outcome] = int(delta)
            continue
        if name == metric + "_bucket":
            le = float("inf") if d["le"] == "+Inf" else float(d["le"])
            buckets.setdefault(key, {})
            buckets[key][le] = buckets[key].get(le, 0.0) + delta
        elif name == metric + "_sum":
            sums[key] = sums.get(key, 0.0) + delta
        elif name == metric + "_count":
            counts[key] = counts.get(key, 0.0) + delta
    out = {}
    for key, n in counts.items():
        if n <= 0:
            continue
        cum = sorted(buckets.get(key, {}).items())

        def q(p: float, cum: list[tuple[float, float]] = cum, n: float = n) -> float:
            for le, c in cum:
                if c >= p * n:
                    return le * 1000
            return float("inf")

        out[key] = {
            "calls": int(n),
            "mean_ms": round(sums.get(key, 0.0) / n * 1000, 3),
            "p50_ms_le": q(0.5),
            "p99_ms_le": q(0.99),
            "not_ok": not_ok.get(key, {}),
        }
    for key, failures in not_ok.items():
        out.setdefault(key, {"calls": 0, "mean_ms": 0.0, "p50_ms_le": 0.0, "p99_ms_le": 0.0})
        out[key]["not_ok"] = failures
    return out


def histogram_quantiles(
    before: dict[Any, float], after: dict[Any, float], metric: str, qs: tuple[float, ...]
) -> dict[str, float]:
    """Quantiles (bucket upper bounds, ms) of an unlabelled histogram between two scrapes."""
    cum = sorted(
        (
            float("inf") if dict(labels)["le"] == "+Inf" else float(dict(labels)["le"]),
            value - before.get((name, labels), 0.0),
        )
        for (name, labels), value in after.items()
        if name == metric + "_bucket"
    )
    n = cum[-1][1] if cum else 0.0
    out: dict[str, float] = {}
    for q in qs:
        out[f"p{q * 100:g}"] = next((le * 1000 for le, c in cum if n and c >= q * n), float("nan"))
    return out


# --- load -------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.degraded = 0
        self.degraded_by: Counter[str] = Counter()
        self.answers = 0
        self.empty = 0
        # answers shed by the gateway (degraded stage "gateway") apart from the others
        self.shed_latencies: list[float] = []

    def ok(self, latency: float, resp: Any) -> None:
        self.latencies.append(latency)
        self.answers += 1
        degraded = getattr(resp, "degraded", None)
        if degraded:
            self.degraded += 1
            for d in degraded:
                self.degraded_by[f"{d.stage}:{d.fallback}"] += 1
            if any(d.stage == "gateway" for d in degraded):
                self.shed_latencies.append(latency)
        if hasattr(resp, "items") and not resp.items:
            self.empty += 1

    def error(self, exc: grpc.aio.AioRpcError, latency: float) -> None:
        self.errors[exc.code().name] += 1
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # shed: an answer too
            self.shed_latencies.append(latency)

    def summary(self, seconds: float) -> dict[str, Any]:
        lat = self.latencies
        return {
            "ok": len(lat),
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
            "seconds": round(seconds, 2),
            "throughput_per_s": round(len(lat) / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": round(pct(lat, 50) * 1000, 2),
            "p95_ms": round(pct(lat, 95) * 1000, 2),
            "p99_ms": round(pct(lat, 99) * 1000, 2),
            "max_ms": round(max(lat) * 1000, 2) if lat else float("nan"),
            "degraded_fraction": round(self.degraded / self.answers, 4) if self.answers else 0.0,
            "degraded_by": dict(self.degraded_by),
            "empty_answers": self.empty,
            # goodput: answers with no fallback at all, per second
            "goodput_per_s": round((self.answers - self.degraded) / seconds, 1)
            if seconds > 0
            else 0.0,
            "shed_answers": len(self.shed_latencies),
            "shed_p99_ms": round(pct(self.shed_latencies, 99) * 1000, 2),
        }


class Target:
    """What one call does (Recommend for a random known customer, or Echo)."""

    def __init__(self, channel: grpc.aio.Channel, kind: str, customers: list[str], k: int) -> None:
        self.kind = kind
        self.customers = customers
        self.k = k
        self.gw = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.echo = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel)
        self.rng = random.Random(len(customers))

    async def call(self, timeout: float) -> Any:
        if self.kind == "echo":
            return await self.echo.Echo(diagnostics_pb2.EchoRequest(payload=b"x"), timeout=timeout)
        cid = self.customers[self.rng.randrange(len(self.customers))]
        return await self.gw.Recommend(
            gateway_pb2.RecommendRequest(
                customer_id=cid,
                k=self.k,
                context=common_pb2.Context(surface=common_pb2.SURFACE_HOME),
            ),
            timeout=timeout,
        )


async def closed_loop(
    target: Any, concurrency: int, seconds: float, timeout: float
) -> dict[str, Any]:
    rec = Recorder()
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                resp = await target.call(timeout)
                rec.ok(time.perf_counter() - t0, resp)
            except grpc.aio.AioRpcError as exc:
                rec.error(exc, time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "mode": "closed",
        "concurrency": concurrency,
        **rec.summary(time.perf_counter() - started),
    }


async def open_loop(
    target: Any, rate: float, seconds: float, timeout: float, max_in_flight: int = 5000
) -> dict[str, Any]:
    rec = Recorder()
    tasks: set[asyncio.Task[None]] = set()
    skipped = 0
    # how late each call left the load generator (its own event loop's backlog)
    send_lag: list[float] = []

    async def one(scheduled: float) -> None:
        send_lag.append(time.perf_counter() - scheduled)
        try:
            resp = await target.call(timeout)
            rec.ok(time.perf_counter() - scheduled, resp)
        except grpc.aio.AioRpcError as exc:
            rec.error(exc, time.perf_counter() - scheduled)

    started = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            skipped += 1  # the client cannot keep up: counted as errors
            rec.errors["CLIENT_OVERLOAD"] += 1
            continue
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    out = {"mode": "open", "rate": rate, **rec.summary(elapsed)}
    out["achieved_send_rate"] = round((total - skipped) / max(seconds, 1e-9), 1)
    out["client_send_lag_p50_p99_ms"] = [
        round(pct(send_lag, 50) * 1000, 2),
        round(pct(send_lag, 99) * 1000, 2),
    ]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process now (MB): ``VmRSS`` (all), ``RssAnon`` (private:
    heap, Python objects, tables read into memory) or ``RssFile`` (pages of mapped
    files in use: libraries, memory-mapped indexes and tables, shared with other
    processes through the page cache and reclaimable)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    snap = {name: cpu_seconds(pid) for name, pid in pids.items()}
    snap["client"] = time.process_time()
    return snap


async def measure(
    kind: str,
    mode: str,
    rate: float,
    targets: list[Target],
    gateway: ServiceProc,
    pids: dict[str, int],
    metric_ports: dict[str, int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One run, with its per-hop latency and the CPU each process spent per call (CPU
    time does not depend on how busy the shared machine is, unlike latency)."""
    ports = {name: port for name, port in metric_ports.items() if name != "gateway"}
    before, cpu0 = scrape(gateway.metrics_port), cpu_snapshot(pids)
    server0 = {name: scrape(port) for name, port in ports.items()}
    multi = MultiTarget(targets)
    if mode == "closed":
        r = await closed_loop(multi, args.concurrency, args.duration, args.timeout)
    else:
        r = await open_loop(multi, rate, args.duration, args.timeout)
    cpu1, after = cpu_snapshot(pids), scrape(gateway.metrics_port)
    server1 = {name: scrape(port) for name, port in ports.items()}
    calls = max(1, r["ok"] + r["errors"])
    r["cpu_ms_per_call"] = {k: round((cpu1[k] - cpu0[k]) / calls * 1000, 3) for k in cpu0}
    # The services' total: the load generator ("client") is reported apart, not added.
    r["cpu_ms_per_call"]["total"] = round(
        sum(v for k, v in r["cpu_ms_per_call"].items() if k != "client"), 3
    )
    r["hops"] = hop_latency(before, after, "mercato_gateway_hop_latency_seconds", "hop")
    # The gateway's own time per call (its runtime histogram: from the handler's start,
    # so the difference to the client's latency is queueing before the handler and the
    # client), and the calls it shed past its admission limit.
    r["gateway_side"] = {
        m: h
        for m, h in hop_latency(before, after, "mercato_rpc_latency_seconds", "method").items()
        if m.rsplit("/", 1)[-1] in ("Recommend", "Echo")
    }
    # How much of the callers' deadline was left when the gateway's handler started:
    # what the calls spent queued before it (in the gateway and on the way there).
    r["gateway_deadline_left_ms_le"] = histogram_quantiles(
        before, after, "mercato_gateway_deadline_left_seconds", (0.01, 0.5, 0.99)
    )
    # How late a 5 ms ticker on the gateway's event loop woke (ADMIT_LAG_MS > 0 only).
    r["gateway_loop_lag_ms_le"] = histogram_quantiles(
        before, after, "mercato_gateway_loop_lag_seconds", (0.5, 0.9, 0.99)
    )
    r["gateway_shed"] = {
        dict(labels).get("answer", "?"): int(v - before.get((name, labels), 0.0))
        for (name, labels), v in after.items()
        if name == "mercato_gateway_shed_total" and v - before.get((name, labels), 0.0) > 0
    }
    # Time inside each downstream service (its own runtime histogram, per method): the
    # difference to the gateway's hop time is queueing, transport and (de)serialization.
    r["server_side"] = {
        f"{name}.{method}": h
        for name in ports
        for method, h in hop_latency(
            server0[name], server1[name], "mercato_rpc_latency_seconds", "method"
        ).items()
        if method not in ("Check", "Watch")
    }
    return r


async def run_phase(
    gateway: ServiceProc,
    pids: dict[str, int],
    ports: dict[str, int],
    customers: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    options = channel_options(16 * 1024 * 1024)
    results: dict[str, Any] = {}
    # A few channels: one HTTP/2 connection per channel; spread the client's calls.
    channels = [grpc.aio.insecure_channel(gateway.target, options=options) for _ in range(4)]
    try:
        for kind in ("echo", "recommend"):
            targets = [Target(ch, kind, customers, args.k) for ch in channels]
            # warm-up
            # (16 in flight at most: below the gateway's MAX_IN_FLIGHT, which sheds)
            for t in targets:  # (a call shed by the gateway's bound is fine here)
                await asyncio.gather(*(t.call(5.0) for _ in range(16)), return_exceptions=True)
            per = []
            for _ in range(args.repeats):
                per.append(await measure(kind, "closed", 0, targets, gateway, pids, ports, args))
                await asyncio.sleep(0.5)
            results[f"{kind}_closed"] = median_run(per)
            # Open loop from the lowest rate up, so that an overloaded run (queues,
            # open breakers) cannot spoil the lighter ones; a pause between runs.
            rates = sorted({args.rate, *args.extra_rates}) if kind == "recommend" else [args.rate]
            for rate in rates:
                await asyncio.sleep(3)
                repeats = args.repeats if rate == args.rate else 1
                per = []
                for _ in range(repeats):
                    r = await measure(kind, "open", rate, targets, gateway, pids, ports, args)
                    per.append(r)
                    await asyncio.sleep(0.5)
                key = f"{kind}_open" if rate == args.rate else f"{kind}_open_{rate:g}"
                results[key] = median_run(per)
            if kind == "recommend" and args.overload_factor > 0:
                await asyncio.sleep(3)
                results["recommend_overload"] = await overload_run(
                    results, targets, gateway, pids, ports, args
                )
    finally:
        for ch in channels:
            await ch.close()
    return results


def sustainable_rate(results: dict[str, Any]) -> float:
    """The capacity the overload row is measured against: the most full answers (no
    fallback) per second any Recommend run of this stack gave without an error, closed
    loop or open. Not the closed loop's throughput: with the gateway's admission bound
    that counts the calls it shed (answered at once, so they inflate it: 3-4x in the
    quick stack of session 24 where 73-96 % of the closed loop's answers were shed)."""
    return max(
        (
            r["goodput_per_s"]
            for key, r in results.items()
            if key.startswith("recommend_") and not r.get("errors")
        ),
        default=0.0,
    )


async def overload_run(
    results: dict[str, Any],
    targets: list[Target],
    gateway: ServiceProc,
    pids: dict[str, int],
    ports: dict[str, int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Open loop at ``--overload-factor`` times the sustainable rate of the same run
    (:func:`sustainable_rate`: the capacity), and the issue's overload target: answered
    calls' p99 within the callers' deadline, goodput (answers without any fallback, per
    second) at least 90 % of the capacity."""
    capacity = sustainable_rate(results)
    rate = round(args.overload_factor * capacity)
    r = await measure("recommend", "open", rate, targets, gateway, pids, ports, args)
    r["overload"] = {
        "factor": args.overload_factor,
        "capacity_per_s": capacity,
        "rate_per_s": rate,
        "goodput_per_s": r["goodput_per_s"],
        "goodput_vs_capacity": round(r["goodput_per_s"] / capacity, 3) if capacity else 0.0,
        "answered_p99_ms": r["p99_ms"],
        "deadline_ms": args.timeout * 1000,
        "p99_within_deadline": r["p99_ms"] <= args.timeout * 1000 and r["ok"] > 0,
        "goodput_target_met": capacity > 0 and r["goodput_per_s"] >= 0.9 * capacity,
    }
    return r


async def warm_up(
    gateway: ServiceProc, customers: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """``--memory-only``: 2 s of Recommend calls (every hop and both models used), so the
    resident memory read next is that of a serving process, not of an idle one."""
    async with grpc.aio.insecure_channel(gateway.target) as ch:
        r = await closed_loop(Target(ch, "recommend", customers, args.k), 1, 2.0, 5.0)
        return {"recommend_warm_up": r}


class MultiTarget:
    """Round-robin over targets on different channels."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.i = 0

    async def call(self, timeout: float) -> Any:
        self.i += 1
        return await self.targets[self.i % len(self.targets)].call(timeout)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median p99 (all its numbers), plus the spread of the repeats."""
    ordered = sorted(runs, key=lambda r: r["p99_ms"])
    mid = dict(ordered[len(ordered) // 2])
    if len(runs) > 1:
        mid["repeats"] = len(runs)
        mid["p99_ms_all"] = [r["p99_ms"] for r in runs]
        mid["throughput_all"] = [r["throughput_per_s"] for r in runs]
        mid["throughput_median"] = statistics.median(r["throughput_per_s"] for r in runs)
    return mid


# --- main -------------------------------------------------------------------------


def start_stack(tmp: Path, args: argparse.Namespace) -> dict[str, ServiceProc]:
    env = {"MERCATO_PROFILE_LOG_LEVEL": "WARNING"}
    procs: dict[str, ServiceProc] = {}
    procs["profile"] = start_service("profile", tmp / "profile", env, timeout=120)
    for name in ("retrieval", "ranking"):
        env = {f"MERCATO_{name.upper()}_LOG_LEVEL": "WARNING"}
        if name == "ranking":  # ranking's item table follows the catalogue
            env["MERCATO_RANKING_CATALOG_TARGET"] = procs["profile"].target
        p = start_service(name, tmp / name, env, wait=None)
        p.wait_status("SERVING", 300, service="liveness")
        procs[name] = p
    return procs


def start_gateway(
    tmp: Path, procs: dict[str, ServiceProc], args: argparse.Namespace
) -> ServiceProc:
    return start_service(
        "gateway",
        tmp / "gateway",
        {
            "MERCATO_GATEWAY_LOG_LEVEL": "WARNING",
            "MERCATO_GATEWAY_CANDIDATES_K": str(args.candidates_k),
            "MERCATO_GATEWAY_EXPOSURES_ENABLED": str(not args.no_exposures).lower(),
            "MERCATO_GATEWAY_PROFILE_TARGET": procs["profile"].target,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": procs["retrieval"].target,
            "MERCATO_GATEWAY_RANKING_TARGET": procs["ranking"].target,
        },
    )


def wait_for_ranker(gateway: ServiceProc, customer: str, timeout_s: float = 300) -> None:
    """Ranking answers rules-only until its ranker is loaded: wait for the model."""
    from mercato.client import MercatoClient

    deadline = time.monotonic() + timeout_s
    with MercatoClient(gateway.target, timeout=10.0) as c:
        while not any(m.name == "mercato-ranker" for m in c.recommend(customer, k=1).models):
            if time.monotonic() > deadline:
                raise TimeoutError("ranking did not load the ranker")
            time.sleep(0.5)


def models_status(procs: dict[str, ServiceProc]) -> dict[str, str]:
    # "" = the readiness of the whole service (NOT_SERVING until a model is loaded)
    return {name: procs[name].health("") for name in ("retrieval", "ranking")}


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _rss_guard(limit_mb: float) -> None:
    """In a training child: end the process (exit code 3) as soon as it holds more than
    ``limit_mb`` resident, instead of letting the kernel's OOM killer choose a victim
    on a machine other sessions share."""
    import threading

    def watch() -> None:
        while True:
            rss = rss_mb(os.getpid())
            if rss > limit_mb:
                print(f"training stopped at {rss:.0f} MB resident (limit {limit_mb:.0f})")
                os._exit(3)
            time.sleep(0.25)

    threading.Thread(target=watch, daemon=True).start()


def _train_two_tower(cfg: Any, max_rss_mb: float) -> dict[str, Any]:
    """Train, register and promote the two-tower (in a child process, see _in_child)."""
    from training.pipeline import train_and_register
    from training.registry import promote

    _rss_guard(max_rss_mb)
    started = time.perf_counter()
    tt = train_and_register(cfg)
    assert tt.version
    promote("mercato-two-tower", cfg.tracking_uri, version=tt.version, force=True)
    return {
        "two_tower_version": tt.version,
        "two_tower_valid_recall_20": round(tt.metric("valid", "two_tower", "recall@20"), 4),
        "popularity_valid_recall_20": round(tt.metric("valid", "popularity", "recall@20"), 4),
        "two_tower_train_seconds": round(time.perf_counter() - started, 1),
        "two_tower_peak_rss_mb": _peak_rss_mb(),
    }


def _train_ranker(cfg: Any, max_rss_mb: float) -> dict[str, Any]:
    """Train, register and promote the ranker (in a child process, see _in_child)."""
    from training.ranker import RankerConfig, train_and_register_ranker
    from training.registry import promote

    _rss_guard(max_rss_mb)
    started = time.perf_counter()
    rk = train_and_register_ranker(
        RankerConfig(
            retrieval=cfg,
            two_tower="registry",
            allow_refit_two_tower=True,  # refit champion: serving load only, no quality read
            progress=False,
            tracking_uri=cfg.tracking_uri,
            epochs=10,
        )
    )
    assert rk.version
    promote(
        "mercato-ranker", cfg.tracking_uri, metric="valid_ndcg_10", version=rk.version, force=True
    )
    return {
        "ranker_version": rk.version,
        "ranker_train_seconds": round(time.perf_counter() - started, 1),
        "ranker_peak_rss_mb": _peak_rss_mb(),
    }


def _in_child(fn: Any, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh process (spawn, not fork: torch and FAISS are loaded
    around). Each training's peak, and whatever its allocator keeps after it, ends with
    its process, so neither stacks on the other or stays in the bench process while the
    services run (the 1M-item run used to train both models in the bench process
    itself; docs/gateway.md has what each one takes)."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        result: dict[str, Any] = pool.submit(fn, *args).result()
    return result


def train_models(tmp: Path, items: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train and promote a two-tower and a ranker on exactly the synthetic data the
    profile service is loaded with (same generator config), in an MLflow store under
    ``tmp`` that the services then follow (``MERCATO_MLFLOW_TRACKING_URI``). Each model
    trains in its own child process (:func:`_in_child`); the report gives each one's
    peak resident memory."""
    from dataclasses import replace

    from training.baselines import BaselineConfig
    from training.index import IndexConfig
    from training.pipeline import TrainConfig
    from training.synthetic import SyntheticConfig
    from training.two_tower import TwoTowerConfig

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    if args.mlflow_server:  # production's topology: training and serving reach a server
        from tests.mlflow_server import MlflowServer

        server = MlflowServer(tmp / "mlflow-server").start()
        args._servers.append(server)
        uri = server.url
    os.environ["MERCATO_MLFLOW_TRACKING_URI"] = uri  # the services inherit it
    started = time.perf_counter()
    cfg = TrainConfig(
        synthetic=SyntheticConfig(n_users=args.users, n_items=items, days=30, seed=args.seed),
        model=replace(
            TwoTowerConfig(),
            epochs=args.train_epochs,
            progress=False,
            # the EASE warm start is items x items too; a load bench needs the model's
            # shape (dims, index, item-to-item), not its quality
            init="random",
            # the full softmax is refused above its item limit (300k): sampled there
            loss="full" if items <= TwoTowerConfig().full_softmax_max_items else "sampled",
        ),
        baselines=BaselineConfig(models=()),  # EASE is items x items: not at this size
        index=IndexConfig(recall_queries=200),
        max_eval_users=500,
        tracking_uri=uri,
    )
    out = _in_child(_train_two_tower, cfg, args.train_max_rss_mb)
    out.update(_in_child(_train_ranker, cfg, args.train_max_rss_mb))
    out["registry"] = "mlflow server over HTTP" if uri.startswith("http") else "SQLite store"
    out["train_seconds"] = round(time.perf_counter() - started, 1)
    return out


def bench_catalog(items: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mercato-load-") as tmpdir:
        tmp = Path(tmpdir)
        trained = None
        if args.train:
            print(f"[{items} items] training and promoting both models ...", flush=True)
            trained = train_models(tmp, items, args)
            print(f"[{items} items] trained: {trained}", flush=True)
        procs = start_stack(tmp, args)
        gateway: ServiceProc | None = None
        try:
            print(f"[{items} items] loading synthetic data ...", flush=True)
            data = load_data(procs["profile"], items, args.users, args.seed)
            customers = data.pop("customer_ids")
            print(f"[{items} items] loaded: {data}", flush=True)
            if trained:  # both champions loaded before measuring
                procs["retrieval"].wait_status("SERVING", 600)
            gateway = start_gateway(tmp, procs, args)
            procs["gateway"] = gateway
            if trained:
                wait_for_ranker(gateway, customers[0])
            status = models_status(procs)
            print(f"[{items} items] model services: {status}", flush=True)
            load_before = os.getloadavg()
            pids = {name: p.process.pid for name, p in procs.items()}
            ports = {name: p.metrics_port for name, p in procs.items()}
            if args.memory_only:  # resident memory after some real calls, no load runs
                results = asyncio.run(warm_up(gateway, customers, args))
            else:
                results = asyncio.run(run_phase(gateway, pids, ports, customers, args))
            return {
                "rss_mb": {name: rss_mb(pid) for name, pid in pids.items()},
                "rss_anon_mb": {name: rss_mb(pid, "RssAnon") for name, pid in pids.items()},
                "rss_file_mb": {name: rss_mb(pid, "RssFile") for name, pid in pids.items()},
                "catalog": data,
                "models": trained or "none registered (retrieval and ranker absent)",
                "model_services": status,
                "results": results,
                "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            }
        finally:
            for name in ("gateway", "ranking", "retrieval", "profile"):
                if name in procs:
                    procs[name].terminate()
            while args._servers:
                args._servers.pop().stop()


def _errors(r: dict[str, Any]) -> str:
    if not r["errors"]:
        return "0"
    return f"{r['errors']} " + ", ".join(f"{k} {v}" for k, v in sorted(r["error_codes"].items()))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Gateway load benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Date: {report['date']}",
        "",
        "All four services as real processes on this machine plus the load generator "
        "(one asyncio gRPC client process). Open loop: latency from the scheduled send "
        "time. `degraded` = share of answers with a fallback. Echo = the gateway's "
        "DiagnosticsService.Echo through the same runtime (the floor).",
        "",
    ]
    for run in report["runs"]:
        cat = run["catalog"]
        lines += [
            f"## {cat['items']:,} items, {cat['customers']:,} customers, {cat['events']:,} events",
            "",
            f"Model services (health): {run['model_services']}; Recommend k="
            f"{report['args']['k']}, candidates ranked per call: {report['args']['candidates_k']}, "
            f"exposures logged: {not report['args']['no_exposures']}",
            "",
            f"Models: {run.get('models', 'none registered')}",
            "",
            f"Machine load average (1 min) before/after the runs: "
            f"{run.get('loadavg_1m_before_after')} (the machine is shared)",
            "",
            f"Resident memory after the runs (MB): {run.get('rss_mb')}; of which private "
            f"(RssAnon) {run.get('rss_anon_mb')}, mapped files (RssFile) "
            f"{run.get('rss_file_mb')}",
            "",
            "| call | mode | load | throughput/s | p50 ms | p95 ms | p99 ms | errors | degraded |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, r in run["results"].items():
            kind = key.split("_")[0]
            load = f"{r['concurrency']} in flight" if r["mode"] == "closed" else f"{r['rate']:g}/s"
            lines.append(
                f"| {kind} | {r['mode']} | {load} | {r['throughput_per_s']:,.0f} | "
                f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{_errors(r)} | {r['degraded_fraction']:.0%} |"
            )
        lines += [
            "",
            "CPU time per call by process (ms; user + system, independent of how busy the "
            "shared machine is):",
            "",
            "| run | gateway | profile | retrieval | ranking | total (services) | client |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, r in run["results"].items():
            c = r.get("cpu_ms_per_call", {})
            if c:
                lines.append(
                    f"| {key} | {c['gateway']:.2f} | {c['profile']:.2f} | {c['retrieval']:.2f} "
                    f"| {c['ranking']:.2f} | {c['total']:.2f} | {c['client']:.2f} |"
                )
        ov = run["results"].get("recommend_overload")
        if ov:
            o = ov["overload"]
            gw: dict[str, Any] = next(
                (h for m, h in ov.get("gateway_side", {}).items() if m.endswith("Recommend")), {}
            )
            lines += [
                "",
                f"Overload: open loop at {o['factor']:g}x the sustainable rate (the most "
                "full answers per second of the Recommend runs above without errors: "
                f"{o['capacity_per_s']:g}/s = capacity) = {o['rate_per_s']}/s. Goodput = "
                "answers without any fallback per second.",
                "",
                "| answered/s | goodput/s | goodput / capacity | answered p50 / p99 ms | "
                "shed answers (p99 ms) | errors | gateway handler p99 ms <= | "
                "p99 within deadline | goodput >= 90 % |",
                "| ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- |",
                f"| {ov['throughput_per_s']:g} | {o['goodput_per_s']:g} | "
                f"{o['goodput_vs_capacity']:.0%} | {ov['p50_ms']:.1f} / {ov['p99_ms']:.1f} | "
                f"{ov['shed_answers']} ({ov['shed_p99_ms']:.1f}) | {_errors(ov)} | "
                f"{gw.get('p99_ms_le', float('nan')):g} | "
                f"{'yes' if o['p99_within_deadline'] else 'no'} | "
                f"{'yes' if o['goodput_target_met'] else 'no'} |",
            ]
        for key in ("recommend_closed", "recommend_open"):
            r = run["results"].get(key, {})
            hops = r.get("hops", {})
            if not hops:
                continue
            mode = "closed loop" if key.endswith("closed") else f"open loop {r['rate']:g}/s"
            lines += [
                "",
                f"Per hop, Recommend {mode} (gateway histogram, successful calls; p50/p99 "
                "are bucket upper bounds):",
                "",
                "| hop | OK calls | mean ms | p50 ms <= | p99 ms <= | other outcomes |",
                "| --- | ---: | ---: | ---: | ---: | --- |",
            ]
            for hop, h in sorted(hops.items()):
                other = ", ".join(f"{k} {v}" for k, v in sorted(h.get("not_ok", {}).items()))
                lines.append(
                    f"| {hop} | {h['calls']} | {h['mean_ms']:.2f} | {h['p50_ms_le']:g} | "
                    f"{h['p99_ms_le']:g} | {other} |"
                )
            server = r.get("server_side", {})
            if server:
                lines += [
                    "",
                    f"Inside the downstream services, Recommend {mode} (their "
                    "`mercato_rpc_latency_seconds`, successful calls):",
                    "",
                    "| service.method | OK calls | mean ms | p50 ms <= | p99 ms <= |",
                    "| --- | ---: | ---: | ---: | ---: |",
                ]
                for name, h in sorted(server.items()):
                    if h["calls"]:
                        lines.append(
                            f"| {name} | {h['calls']} | {h['mean_ms']:.2f} | "
                            f"{h['p50_ms_le']:g} | {h['p99_ms_le']:g} |"
                        )
            if r.get("degraded_by"):
                lines += ["", f"Degraded stages ({mode}): {r['degraded_by']}"]
        lines.append("")
    lines += report.get("notes", [])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--users", type=int, default=2000, help="Customers generated (events).")
    ap.add_argument("--rate", type=float, default=500.0, help="Open-loop requests per second.")
    ap.add_argument(
        "--extra-rates", type=float, nargs="*", default=[1000.0], help="More open-loop rates."
    )
    ap.add_argument("--concurrency", type=int, default=32, help="Closed-loop calls in flight.")
    ap.add_argument("--duration", type=float, default=15.0, help="Seconds per run.")
    ap.add_argument("--repeats", type=int, default=3, help="Runs per measurement (median).")
    ap.add_argument("--timeout", type=float, default=1.0, help="Deadline of each call (s).")
    ap.add_argument("--k", type=int, default=10, help="Items per Recommend.")
    ap.add_argument(
        "--overload-factor",
        type=float,
        default=2.0,
        help="One more open-loop run at this multiple of the closed-loop throughput "
        "(the overload target's row: goodput and answered p99); 0 = none.",
    )
    ap.add_argument(
        "--candidates-k", type=int, default=200, help="Gateway CANDIDATES_K (ranked per call)."
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-exposures", action="store_true", help="Gateway logs no exposures.")
    ap.add_argument("--quick", action="store_true", help="Small catalog, short runs.")
    ap.add_argument(
        "--train",
        action="store_true",
        help="Train and promote both models on the same synthetic data first (the target "
        "configuration); without it no model is registered and answers are degraded.",
    )
    ap.add_argument("--train-epochs", type=int, default=5, help="Two-tower epochs (--train).")
    ap.add_argument(
        "--train-max-rss-mb",
        type=float,
        default=12_000,
        help="With --train: stop a training process past this resident memory (MB).",
    )
    ap.add_argument("--tag", default="load", help="Result file name (bench/results/TAG.*).")
    ap.add_argument(
        "--mlflow-server",
        action="store_true",
        help="With --train: register the models on a real `mlflow server` (PostgreSQL, "
        "proxied artifacts) that the services follow over HTTP, as in production; "
        "default: a SQLite store the services open with the mlflow client.",
    )
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="Resident memory per service after 200 calls; no load runs (for 1M items).",
    )
    args = ap.parse_args()
    args._servers = []
    if args.quick:
        args.items = [10_000]
        args.users = 300
        args.duration = 3.0
        args.repeats = 1
        args.rate = 200.0
        args.extra_rates = [100.0]
        args.concurrency = 16
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        runs = [bench_catalog(n, args) for n in args.items]
    finally:  # an MLflow server started for a run that failed early (in training)
        while args._servers:
            args._servers.pop().stop()
    report = {
        "command": "python bench/load.py " + " ".join(sys.argv[1:]),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "runs": runs,
        "notes": [],
    }
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{args.tag}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
