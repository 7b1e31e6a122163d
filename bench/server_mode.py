"""Server CPU per call: the asyncio gRPC server against a synchronous one with a thread
pool (``make bench-server-mode``), on the real handlers of the hot path.

    python bench/server_mode.py [--keep DIR] [--calls 3000] [--concurrency 8]

One server process per configuration (started with ``spawn``, thread counts set once)
serves three methods: ``Echo`` (DiagnosticsService's message, no work), ``Retrieve``
(:func:`services.retrieval.server.retrieve_response` on a trained two-tower with its
item-to-item model, 10k items, candidates as columns) and ``Rank``
(:meth:`services.ranking.pipeline.RankPipeline.rank` with a trained ranker and the
item table, 200 candidates as columns), the bundles trained by ``bench/hotpath.py``.
Configurations: ``asyncio`` (``grpc.aio.server`` with the services' RuntimeInterceptor,
what every service runs), ``asyncio-bare`` (no interceptor), ``sync`` (``grpc.server``
with a thread pool and the synchronous runtime interceptor) and ``sync-bare``. A client
process drives ``--calls`` calls per method with ``--concurrency`` in flight; the
server's CPU time (``/proc``) over the calls gives CPU ms per call. Repeated
``--repeats`` times in alternating order; medians and the ratio to ``asyncio`` go to
``bench/results/TAG.json`` and ``TAG.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.load import cpu_seconds  # noqa: E402

CONFIGS = ("asyncio", "asyncio-bare", "sync", "sync-bare")
SERVICE = "mercato.bench.Bench"


def _handlers(keep: Path, sync: bool) -> Any:
    """Echo, Retrieve and Rank over the trained bundles, as sync or async handlers."""
    import grpc
    from hotpath import catalogue

    from mercato.v1 import diagnostics_pb2, ranking_pb2, retrieval_pb2
    from services.models.ranker import RankerBundle
    from services.models.registry import ModelVersionInfo
    from services.ranking.pipeline import RankPipeline
    from services.ranking.ranker import RankerScorer
    from services.ranking.rules import RulesConfig
    from services.ranking.table import CatalogTable
    from services.retrieval.merge import merge_config
    from services.retrieval.server import retrieve_response
    from training.replay import load_for_replay

    model = load_for_replay(keep / "two-tower")
    merge = merge_config(model)
    scorer = RankerScorer(
        RankerBundle.load(keep / "ranker"), ModelVersionInfo("mercato-ranker", "1", "b", "c")
    )
    n_items = len(model.bundle.item_ids)
    table = CatalogTable(catalogue(n_items, 0))
    pipe = RankPipeline(RulesConfig.load(None), scorers=lambda alias: scorer, table=lambda: table)

    def echo(req: Any, ctx: Any) -> Any:
        return diagnostics_pb2.EchoResponse(payload=req.payload, service="bench")

    def retrieve(req: Any, ctx: Any) -> Any:
        return retrieve_response(model, model.state, req, merge)

    def rank(req: Any, ctx: Any) -> Any:
        return pipe.rank(req)

    def make(fn: Any) -> Any:
        if sync:
            return fn

        async def handler(req: Any, ctx: Any) -> Any:
            return fn(req, ctx)

        return handler

    methods = {
        "Echo": (echo, diagnostics_pb2.EchoRequest, diagnostics_pb2.EchoResponse),
        "Retrieve": (retrieve, retrieval_pb2.RetrieveRequest, retrieval_pb2.RetrieveResponse),
        "Rank": (rank, ranking_pb2.RankRequest, ranking_pb2.RankResponse),
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                make(fn),
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )
            for name, (fn, req, resp) in methods.items()
        },
    )


def serve(config: str, port: int, keep: str, ready: Any, stop: Any) -> None:
    """The server process of one configuration."""
    from services.common.threads import configure_threads

    configure_threads(1)
    import grpc

    from services.common.interceptors import RuntimeInterceptor, SyncRuntimeInterceptor

    sync = config.startswith("sync")
    handlers = _handlers(Path(keep), sync)
    bare = config.endswith("-bare")
    if sync:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=8),
            handlers=[handlers],
            interceptors=[] if bare else [SyncRuntimeInterceptor("bench")],
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        ready.set()
        stop.wait()
        server.stop(1).wait()
        return

    async def main() -> None:
        server = grpc.aio.server(interceptors=[] if bare else [RuntimeInterceptor("bench")])
        server.add_generic_rpc_handlers((handlers,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop(1)

    asyncio.run(main())


async def drive(port: int, method: str, blobs: list[bytes], calls: int, conc: int) -> float:
    """``calls`` calls of ``method`` with ``conc`` in flight; returns wall seconds."""
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(f"/{SERVICE}/{method}")
        left = calls

        async def worker(n: int) -> None:
            nonlocal left
            i = n
            while left > 0:
                left -= 1
                await call(blobs[i % len(blobs)], timeout=10)
                i += conc

        for i in range(min(50, calls)):  # warm-up
            await call(blobs[i % len(blobs)], timeout=10)
        t = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(conc)))
        return time.perf_counter() - t


def payloads(keep: Path, items: int) -> dict[str, list[bytes]]:
    from hotpath import profiles_from_events

    from mercato.v1 import common_pb2, diagnostics_pb2, ranking_pb2, retrieval_pb2
    from services.retrieval.merge import merge_config
    from services.retrieval.server import retrieve_response
    from training.replay import load_for_replay

    model = load_for_replay(keep / "two-tower")
    merge = merge_config(model)
    home = common_pb2.Context(surface=common_pb2.SURFACE_HOME)
    filters = retrieval_pb2.Filters(exclude_purchased=True, in_stock_only=True)
    ret, rank = [], []
    for p in profiles_from_events(items, 300, 0)[:100]:
        req = retrieval_pb2.RetrieveRequest(
            profile=p, context=home, k=200, filters=filters, columns=True
        )
        ret.append(req.SerializeToString())
        cols = retrieve_response(model, model.state, req, merge).columns
        rank.append(
            ranking_pb2.RankRequest(profile=p, context=home, k=10, columns=cols).SerializeToString()
        )
    echo = [diagnostics_pb2.EchoRequest(payload=b"x" * 64).SerializeToString()]
    return {"Echo": echo, "Retrieve": ret, "Rank": rank}


def measure(config: str, keep: Path, blobs: dict[str, list[bytes]], args: Any) -> dict[str, float]:
    from tests.procs import free_port

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    port = free_port()
    proc = ctx.Process(target=serve, args=(config, port, str(keep), ready, stop))
    proc.start()
    try:
        if not ready.wait(120):
            raise RuntimeError(f"{config}: the server did not start")
        out = {}
        for method, data in blobs.items():
            before = cpu_seconds(proc.pid)  # type: ignore[arg-type]
            wall = asyncio.run(drive(port, method, data, args.calls, args.concurrency))
            used = cpu_seconds(proc.pid) - before  # type: ignore[arg-type]
            out[f"{method} cpu ms"] = used / args.calls * 1000
            out[f"{method} calls/s"] = args.calls / wall
        return out
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", default="", help="bench/hotpath.py --keep directory")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--tag", default="server_mode")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    keep = Path(args.keep or REPO / "bench" / "results" / f"hotpath-bundles-{args.items}")
    if not (keep / "two-tower").is_dir():
        import tempfile

        from hotpath import train

        with tempfile.TemporaryDirectory() as tmp:
            tt, rk = train(Path(tmp), args.items, 300, 1, 0)
            import shutil

            shutil.copytree(tt, keep / "two-tower")
            shutil.copytree(rk, keep / "ranker")
    blobs = payloads(keep, args.items)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in args.configs}
    for r in range(args.repeats):
        order = args.configs if r % 2 == 0 else args.configs[::-1]
        for config in order:
            runs[config].append(measure(config, keep, blobs, args))
            print(config, {k: round(v, 3) for k, v in runs[config][-1].items()}, flush=True)
    med = {c: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for c, rs in runs.items()}
    from hotpath import run_info

    report = {**run_info("server_mode.py", load_before), "median": med, "runs": runs}
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"`{report['command']}`, {report['date']}, load average "
        f"{report['loadavg_1m_before_after']}; server CPU ms per call, medians of "
        f"{args.repeats} (ratio to asyncio)",
        "",
        "| config | Echo | Retrieve | Rank |",
        "| --- | ---: | ---: | ---: |",
    ]
    base = med.get("asyncio")
    for c, m in med.items():
        cells = []
        for method in ("Echo", "Retrieve", "Rank"):
            v = m[f"{method} cpu ms"]
            ratio = f" ({v / base[f'{method} cpu ms']:.2f})" if base else ""
            cells.append(f"{v:.3f}{ratio}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
