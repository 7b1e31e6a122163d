"""Ranking benchmark: Rank latency (gRPC and in-process), the trained ranker against the
retrieval order on the held-out window (NDCG@10), and the offer policy against fixed
policies on the simulated population.

    python bench/ranking.py [--decisions 40000] [--seeds 0 1] [--calls 300]
                            [--quality-seeds 0 1] [--quality-users 10000 --quality-items 5000]
                            [--skip-latency] [--skip-quality] [--skip-offers]

The quality part runs ``mercato train ranker`` (default synthetic data, two-tower trained
in the same run) once per seed into a temporary MLflow store, and times Rank in-process
with that ranker loaded. Writes bench/results/ranking.json, bench/results/ranking.md and
bench/results/ranking_offers.png. ``make bench-ranking`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mercato.v1 import (  # noqa: E402
    common_pb2,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
)
from services.ranking.offers.catalog import Catalog  # noqa: E402
from services.ranking.pipeline import RankPipeline  # noqa: E402
from services.ranking.rules import RulesConfig  # noqa: E402
from services.ranking.settings import DEFAULT_OFFERS_FILE  # noqa: E402
from tests.procs import start_service  # noqa: E402
from training.offers_sim import plot, simulate, summary  # noqa: E402

RESULTS = REPO / "bench" / "results"
SIZES = (100, 300, 1000)
K = 20
CATEGORIES = 40


def rank_request(n: int, seed: int = 0) -> ranking_pb2.RankRequest:
    """A home-page Rank call: n candidates with details, a profile with purchases and a
    cart, 10 % out of stock, some promoted / high-margin items."""
    rng = np.random.default_rng(seed)
    req = ranking_pb2.RankRequest(k=K, context=common_pb2.Context(surface=common_pb2.SURFACE_HOME))
    req.profile.customer_id = "c-bench"
    for i in range(0, n, 25):
        req.profile.purchases.add(item_id=f"sku-{i}", count=1)
    req.profile.cart.lines.add(item_id="sku-7", quantity=1, price=10)
    scores = rng.normal(size=n)
    for i in range(n):
        item_id = f"sku-{i}"
        req.candidates.add(item_id=item_id, score=float(scores[i]))
        price = float(rng.uniform(5, 200))
        req.items.add(
            item_id=item_id,
            category=f"cat-{int(rng.integers(CATEGORIES))}",
            price=price,
            stock=0 if rng.random() < 0.1 else int(rng.integers(1, 100)),
            margin=price * float(rng.uniform(0.1, 0.6)),
            promoted=bool(rng.random() < 0.05),
            replenishable=bool(rng.random() < 0.2),
        )
    return req


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "calls": len(ms),
    }


def bench_rank(calls: int, warmup: int = 30) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pipeline = RankPipeline(RulesConfig.load(None))
    requests = {n: rank_request(n) for n in SIZES}
    for n, req in requests.items():
        # In-process floor: parse the serialized request and rank, as the server does.
        blob = req.SerializeToString()
        for _ in range(warmup):
            pipeline.rank(ranking_pb2.RankRequest.FromString(blob))
        samples = []
        for _ in range(calls):
            t = time.perf_counter()
            pipeline.rank(ranking_pb2.RankRequest.FromString(blob))
            samples.append(time.perf_counter() - t)
        rows.append({"path": "in-process", "candidates": n, **percentiles(samples)})

    with tempfile.TemporaryDirectory() as tmp:
        proc = start_service("ranking", Path(tmp), env={"MERCATO_RANKING_LOG_LEVEL": "WARNING"})
        try:
            with proc.channel() as channel:
                stub = ranking_pb2_grpc.RankingServiceStub(channel)
                echo = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel)
                samples = []
                for i in range(warmup + calls):
                    t = time.perf_counter()
                    echo.Echo(diagnostics_pb2.EchoRequest(payload=b"x"), timeout=10)
                    if i >= warmup:
                        samples.append(time.perf_counter() - t)
                rows.append(
                    {"path": "gRPC Echo (runtime floor)", "candidates": 0, **percentiles(samples)}
                )
                for n, req in requests.items():
                    samples = []
                    for i in range(warmup + calls):
                        t = time.perf_counter()
                        resp = stub.Rank(req, timeout=10)
                        if i >= warmup:
                            samples.append(time.perf_counter() - t)
                    assert len(resp.items) == K
                    rows.append({"path": "gRPC", "candidates": n, **percentiles(samples)})
        finally:
            proc.terminate()
    return rows


def bench_quality(
    seeds: list[int], users: int, items: int, calls: int, warmup: int = 30
) -> dict[str, Any]:
    """Train the ranker per seed; NDCG@10 / Recall@10 of ranker vs retrieval order on the
    held-out (test) window; in-process Rank latency with the first seed's ranker."""
    from dataclasses import replace

    from services.models.ranker import RankerBundle
    from services.models.registry import ModelVersionInfo
    from services.ranking.ranker import RankerScorer
    from training.pipeline import TrainConfig
    from training.ranker import RankerConfig, train_and_register_ranker
    from training.synthetic import SyntheticConfig
    from training.two_tower import TwoTowerConfig

    runs: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for seed in seeds:
            t = time.perf_counter()
            retrieval = TrainConfig(
                synthetic=replace(SyntheticConfig(), n_users=users, n_items=items, seed=seed),
                model=replace(TwoTowerConfig(), seed=seed, progress=False),
                seed=seed,
                tracking_uri=uri,
            )
            cfg = RankerConfig(retrieval=retrieval, seed=seed, tracking_uri=uri, progress=False)
            res = train_and_register_ranker(cfg)
            seconds = time.perf_counter() - t
            runs.append(
                {
                    "seed": seed,
                    "seconds": seconds,
                    "best_epoch": res.best_epoch,
                    "metrics": res.metrics,
                }
            )
            test = res.metrics["test"]
            print(
                f"  ranker seed {seed}: test NDCG@10 {test['ranker']['ndcg@10']:.4f} vs "
                f"retrieval order {test['retrieval']['ndcg@10']:.4f} ({seconds:.0f}s)",
                flush=True,
            )
            if seed == seeds[0] and calls:
                bundle = RankerBundle.load(res.bundle_dir)
                info = ModelVersionInfo("mercato-ranker", res.version or "", res.run_id, "bench")
                scorer = RankerScorer(bundle, info)
                pipeline = RankPipeline(RulesConfig.load(None), scorers=lambda alias, s=scorer: s)
                for n in SIZES:
                    blob = rank_request(n).SerializeToString()
                    for _ in range(warmup):
                        pipeline.rank(ranking_pb2.RankRequest.FromString(blob))
                    samples = []
                    for _ in range(calls):
                        t = time.perf_counter()
                        resp = pipeline.rank(ranking_pb2.RankRequest.FromString(blob))
                        samples.append(time.perf_counter() - t)
                    assert resp.model.name == "mercato-ranker"
                    latency.append(
                        {"path": "in-process, ranker", "candidates": n, **percentiles(samples)}
                    )
                latency += grpc_with_ranker(Path(tmp), uri, calls, warmup)
    return {"users": users, "items": items, "runs": runs, "latency": latency}


def grpc_with_ranker(tmp: Path, uri: str, calls: int, warmup: int) -> list[dict[str, Any]]:
    """Rank over gRPC with mercato-ranker@challenger loaded from the registry."""
    rows: list[dict[str, Any]] = []
    env = {
        "MERCATO_RANKING_LOG_LEVEL": "WARNING",
        "MERCATO_RANKING_TRACKING_URI": uri,
        "MERCATO_RANKING_RANKER_POLL_INTERVAL_S": "0.5",
    }
    proc = start_service("ranking", tmp / "svc", env=env)
    try:
        with proc.channel() as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            deadline = time.monotonic() + 120
            probe = rank_request(100)
            probe.model_alias = "challenger"
            while not stub.Rank(probe, timeout=10).model.name:
                if time.monotonic() > deadline:
                    raise RuntimeError("the ranker was not loaded within 120 s")
                time.sleep(0.5)
            for n in SIZES:
                req = rank_request(n)
                req.model_alias = "challenger"
                samples = []
                for i in range(warmup + calls):
                    t = time.perf_counter()
                    resp = stub.Rank(req, timeout=10)
                    if i >= warmup:
                        samples.append(time.perf_counter() - t)
                assert resp.model.name == "mercato-ranker" and len(resp.items) == K
                rows.append({"path": "gRPC, ranker", "candidates": n, **percentiles(samples)})
    finally:
        proc.terminate()
    return rows


def quality_markdown(q: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Ranker vs retrieval order, held-out window (synthetic, {q['users']:,} customers, "
        f"{q['items']:,} items)",
        "",
        "Test window = the last 10 % of sessions; each customer's 50 two-tower candidates "
        "(history excluded) ordered by the retrieval score or by the ranker; truth = items "
        "bought in the window that are new to the customer; NDCG/Recall with the retrieval "
        "evaluation's definitions (`training/ranker.py`).",
        "",
        "| seed | customers | retrieval NDCG@10 | ranker NDCG@10 | change | "
        "retrieval Recall@10 | ranker Recall@10 | change | valid NDCG@10 change | best epoch |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def ch(a: float, b: float) -> str:
        return f"{(b / a - 1) * 100:+.1f} %" if a > 0 else "n/a"

    for run in q["runs"]:
        t, v = run["metrics"]["test"], run["metrics"]["valid"]
        r, m = t["retrieval"], t["ranker"]
        lines.append(
            f"| {run['seed']} | {int(r['users']):,} | {r['ndcg@10']:.4f} | {m['ndcg@10']:.4f} | "
            f"{ch(r['ndcg@10'], m['ndcg@10'])} | {r['recall@10']:.4f} | {m['recall@10']:.4f} | "
            f"{ch(r['recall@10'], m['recall@10'])} | "
            f"{ch(v['retrieval']['ndcg@10'], v['ranker']['ndcg@10'])} | {run['best_epoch']} |"
        )
    return lines


def bench_offers(decisions: int, seeds: list[int]) -> dict[str, Any]:
    catalog = Catalog.load(DEFAULT_OFFERS_FILE)
    window = min(10_000, decisions)
    runs = []
    for seed in seeds:
        result = simulate(catalog, decisions=decisions, seed=seed)
        rows = summary(result, (window,))
        runs.append(
            {
                "seed": seed,
                "rows": rows,
                "seconds": result.seconds,
                "explored_share": result.explored_share,
                "learned_offer_share": result.learned_offer_share,
            }
        )
        if seed == seeds[0]:
            RESULTS.mkdir(parents=True, exist_ok=True)
            plot(
                result,
                str(RESULTS / "ranking_offers.png"),
                title=f"Offer policies on the simulated population ({decisions} decisions, "
                f"seed {seed})",
            )
        print(f"  offer sim seed {seed}: {result.seconds:.0f}s", flush=True)
    return {"decisions": decisions, "window": window, "runs": runs}


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def markdown(
    rank_rows: list[dict[str, Any]],
    offers: dict[str, Any] | None,
    meta: dict[str, Any],
    quality: dict[str, Any] | None = None,
) -> str:
    lines = [
        "# Ranking benchmark",
        "",
        f"`{meta['command']}` on {meta['machine']} ({meta['cpus']} CPUs, shared), {meta['date']}.",
        "",
    ]
    lines += [
        f"## Rank latency (k={K}, home surface rules: caps + category MMR)",
        "",
        "| path | candidates | p50 ms | p99 ms | mean ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rank_rows + (quality["latency"] if quality else []):
        n = r["candidates"] or "-"
        lines.append(
            f"| {r['path']} | {n} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} |"
        )
    if quality:
        lines += quality_markdown(quality)
    if offers is None:
        return "\n".join([*lines, ""])
    w = offers["window"]
    first = offers["runs"][0]
    lines += [
        "",
        f"## Offer policy vs fixed policies ({offers['decisions']:,} decisions, "
        f"seed {first['seed']})",
        "",
        "Expected incremental margin versus giving no offer, with the true response "
        "probabilities of the simulated shoppers (training/offers_sim.py). `oracle` knows "
        "each shopper's latent traits; `oracle_observable` is the best any policy can do "
        "from the features the policy sees.",
        "",
        f"| policy | incremental margin | per decision | share of oracle | "
        f"share of oracle, last {w:,} | regret |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in first["rows"]:
        lines.append(
            f"| {r['policy']} | {_fmt(r['incremental_margin'])} | {r['per_decision']:.3f} | "
            f"{r['share_of_oracle']:.1%} | {r[f'last{w}_share_of_oracle']:.1%} | "
            f"{_fmt(r['regret'])} |"
        )
    lines += [
        "",
        "Learned policy over seeds:",
        "",
        f"| seed | share of oracle | last {w:,} | best fixed policy | explored |",
        "| ---: | ---: | ---: | --- | ---: |",
    ]
    for run in offers["runs"]:
        rows = {r["policy"]: r for r in run["rows"]}
        learned = rows["learned"]
        fixed = max(
            (r for r in run["rows"] if not str(r["policy"]).startswith(("oracle", "learned"))),
            key=lambda r: r["incremental_margin"],
        )
        lines.append(
            f"| {run['seed']} | {learned['share_of_oracle']:.1%} | "
            f"{learned[f'last{w}_share_of_oracle']:.1%} | {fixed['policy']} "
            f"({fixed['share_of_oracle']:.1%}) | {run['explored_share']:.1%} |"
        )
    lines += ["", "![offer policies](ranking_offers.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=40_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-offers", action="store_true")
    parser.add_argument("--quality-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--quality-users", type=int, default=10_000)
    parser.add_argument("--quality-items", type=int, default=5_000)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python bench/ranking.py " + " ".join(sys.argv[1:]),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print("Rank latency ...", flush=True)
    rank_rows = [] if args.skip_latency else bench_rank(args.calls)
    quality = None
    if not args.skip_quality:
        print("Ranker quality ...", flush=True)
        quality = bench_quality(
            args.quality_seeds,
            args.quality_users,
            args.quality_items,
            0 if args.skip_latency else args.calls,
        )
    offers = None
    if not args.skip_offers:
        print("Offer simulation ...", flush=True)
        offers = bench_offers(args.decisions, args.seeds)
    (RESULTS / "ranking.json").write_text(
        json.dumps(
            {"meta": meta, "rank_latency": rank_rows, "ranker": quality, "offers": offers},
            indent=2,
        )
    )
    md = markdown(rank_rows, offers, meta, quality)
    (RESULTS / "ranking.md").write_text(md)
    print(md)
    if offers is None:
        return
    learned = [{r["policy"]: r for r in run["rows"]}["learned"] for run in offers["runs"]]
    print(
        "learned share of oracle (last window), per seed:",
        [round(r[f"last{offers['window']}_share_of_oracle"], 3) for r in learned],
        "mean",
        round(statistics.mean(r[f"last{offers['window']}_share_of_oracle"] for r in learned), 3),
    )


if __name__ == "__main__":
    main()
