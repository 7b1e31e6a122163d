"""Idle CPU cost of keeping ranking's item table fresh (``make bench-catalog``).

A real profile process (SQLite or Redis store) holds ``--items`` catalogue items
(loaded through ``UpsertItems``) and a real ranking process follows it with
``CATALOG_REFRESH_S=--refresh``; nothing calls Rank. Per configuration, a fresh ranking
process is started, waited for (SERVING = its table is loaded), left alone for two
seconds, and then the CPU time of both processes (user + system, ``/proc``) is read
over ``--seconds`` seconds:

- ``profile alone``: no ranking process (the profile service's own idle floor: its
  store health check);
- ``full reload``: ``MERCATO_RANKING_CATALOG_CHANGES=false``, a whole ``ListItems``
  reload at every refresh (what ranking did before the change feed);
- ``change feed``: ``ListItemChanges`` after the first load (no item while nothing
  changes).

With ``--writes N`` a client thread also changes the stock of N random items per second
through ``UpdateStock`` during the window (the same writes in both configurations), so
the feed has something to carry. The configurations run in alternating order,
``--repeats`` times; the table gives medians and the ratio to the full reload measured
in the same run. Results: ``bench/results/catalog_refresh.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from bench.hotpath import catalogue, run_info, write_report  # noqa: E402
from bench.load import cpu_seconds, rss_mb  # noqa: E402
from mercato.v1 import profile_pb2, profile_pb2_grpc  # noqa: E402
from services.common.channels import channel_options  # noqa: E402
from tests.procs import ServiceProc, start_service  # noqa: E402

CONFIGS = ("profile alone", "full reload", "change feed")


def fill(profile: ServiceProc, items: int, seed: int) -> list[str]:
    """The synthetic catalogue into the profile service; returns the item ids."""
    cat = catalogue(items, seed)
    with grpc.insecure_channel(profile.target, options=channel_options(64 << 20)) as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        for k in range(0, len(cat), 1000):
            stub.UpsertItems(profile_pb2.UpsertItemsRequest(items=cat[k : k + 1000]), timeout=60)
    return [i.item_id for i in cat]


def writer(target: str, ids: list[str], per_s: float, stop: threading.Event) -> int:
    """UpdateStock of ``per_s`` random items a second until ``stop``; returns the count."""
    if per_s <= 0:
        return 0
    rng = random.Random(7)
    done = 0
    with grpc.insecure_channel(target) as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        start = time.monotonic()
        while not stop.is_set():
            wait = start + done / per_s - time.monotonic()
            if wait > 0:
                stop.wait(wait)
                continue
            update = profile_pb2.StockUpdate(item_id=rng.choice(ids), set_to=rng.randrange(50))
            stub.UpdateStock(profile_pb2.UpdateStockRequest(updates=[update]), timeout=10)
            done += 1
    return done


def measure(
    config: str, profile: ServiceProc, ids: list[str], tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    ranking = None
    started = time.perf_counter()
    if config != "profile alone":
        ranking = start_service(
            "ranking",
            tmp / f"ranking-{time.monotonic_ns()}",
            {
                "MERCATO_RANKING_CATALOG_TARGET": profile.target,
                "MERCATO_RANKING_CATALOG_REFRESH_S": str(args.refresh),
                "MERCATO_RANKING_CATALOG_CHANGES": str(config == "change feed").lower(),
                "MERCATO_RANKING_RANKER_ENABLED": "false",
            },
            wait=None,
        )
        ranking.wait_status("SERVING", 600)
    ready_s = time.perf_counter() - started
    try:
        time.sleep(2.0)
        pids = {"profile": profile.process.pid}
        if ranking is not None:
            pids["ranking"] = ranking.process.pid
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        refreshes = ranking.metric("mercato_ranking_catalog_refreshes_total") if ranking else 0.0
        received = ranking.metric("mercato_ranking_catalog_items_total") if ranking else 0.0
        stop = threading.Event()
        writes: list[int] = []
        thread = threading.Thread(
            target=lambda: writes.append(writer(profile.target, ids, args.writes, stop))
        )
        t0 = time.perf_counter()
        thread.start()
        time.sleep(args.seconds)
        stop.set()
        thread.join()
        elapsed = time.perf_counter() - t0
        after = {k: cpu_seconds(p) for k, p in pids.items()}
        out: dict[str, Any] = {
            "config": config,
            "seconds": round(elapsed, 1),
            "ready_s": round(ready_s, 1),
            "writes": writes[0] if writes else 0,
        }
        for k in pids:
            out[f"{k}_cpu_ms_per_s"] = round((after[k] - before[k]) * 1000 / elapsed, 2)
        out["profile_rss_mb"] = rss_mb(profile.process.pid)
        if ranking is not None:
            out["refreshes"] = ranking.metric("mercato_ranking_catalog_refreshes_total") - refreshes
            out["items_received"] = ranking.metric("mercato_ranking_catalog_items_total") - received
            out["ranking_rss_mb"] = rss_mb(ranking.process.pid)
        out["total_cpu_ms_per_s"] = round(
            out["profile_cpu_ms_per_s"] + out.get("ranking_cpu_ms_per_s", 0.0), 2
        )
        return out
    finally:
        if ranking is not None:
            ranking.terminate()


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue
        keys = [k for k, v in mine[0].items() if isinstance(v, int | float)]
        out[config] = {k: round(statistics.median(r.get(k, 0.0) for r in mine), 2) for k in keys}
    return out


def markdown(report: dict[str, Any]) -> str:
    s = report["medians"]
    base = s.get("full reload", {})
    lines = [
        f"# Ranking's item table: idle refresh cost ({report['items']:,} items)",
        "",
        f"`{report['command']}` ({report['date']}, {report['machine']}, load average "
        f"{report['loadavg_1m_before_after']}); {report['backend']} store, refresh every "
        f"{report['refresh_s']} s, {report['writes_per_s']} stock changes/s, windows of "
        f"{report['seconds']} s, medians of {report['repeats']}.",
        "",
        "| configuration | profile CPU ms/s | ranking CPU ms/s | total ms/s | vs full reload "
        "| refreshes | items received | ranking ready s | ranking RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for config, m in s.items():
        ratio = ""
        if base and config != "profile alone" and base["total_cpu_ms_per_s"] > 0:
            ratio = f"{m['total_cpu_ms_per_s'] / base['total_cpu_ms_per_s']:.3f}"
        lines.append(
            f"| {config} | {m['profile_cpu_ms_per_s']:.2f} "
            f"| {m.get('ranking_cpu_ms_per_s', 0):.2f} "
            f"| {m['total_cpu_ms_per_s']:.2f} | {ratio} | {m.get('refreshes', 0):.0f} "
            f"| {m.get('items_received', 0):,.0f} | {m['ready_s']:.1f} "
            f"| {m.get('ranking_rss_mb', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--backend", choices=["sqlite", "redis"], default="sqlite")
    ap.add_argument("--refresh", type=float, default=15.0, help="CATALOG_REFRESH_S")
    ap.add_argument("--seconds", type=float, default=60.0, help="idle window per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--writes", type=float, default=0.0, help="stock changes per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="catalog_refresh")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mercato-catalog-") as d:
        tmp = Path(d)
        env: dict[str, str] = {}
        redis = None
        if args.backend == "redis":
            from tests.profile.redis_proc import RedisProc

            redis = RedisProc(tmp / "redis").start()
            env = {"MERCATO_PROFILE_BACKEND": "redis", "MERCATO_PROFILE_REDIS_URL": redis.url}
        profile = start_service("profile", tmp / "profile", env)
        try:
            print(f"loading {args.items:,} items ...", flush=True)
            ids = fill(profile, args.items, args.seed)
            runs = []
            for rep in range(args.repeats):
                order = CONFIGS if rep % 2 == 0 else tuple(reversed(CONFIGS))
                for config in order:
                    run = measure(config, profile, ids, tmp, args)
                    print(json.dumps(run), flush=True)
                    runs.append(run)
        finally:
            profile.terminate()
            if redis is not None:
                redis.stop()
    report = {
        **run_info("catalog_refresh.py", load_before),
        "items": args.items,
        "backend": args.backend,
        "refresh_s": args.refresh,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "writes_per_s": args.writes,
        "medians": summarise(runs),
        "runs": runs,
    }
    write_report(args.tag, report, markdown(report))


if __name__ == "__main__":
    main()
