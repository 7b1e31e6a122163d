"""In-process stage timings of Retrieve and Rank on really trained models (``make
bench-hotpath``): where a call's CPU goes inside retrieval and ranking, without gRPC.

    python bench/hotpath.py [--items 10000] [--users 300] [--calls 300] [--cprofile]

Trains a two-tower (random init, ``--epochs``) with its item-to-item model and a ranker
on the synthetic data (``training.synthetic``) into a temporary MLflow store, loads both
exactly as the services do (:func:`training.replay.load_for_replay`, the ranker bundle),
builds one profile per customer from the same synthetic events (their last 50 events,
purchases, cart, category affinity) and then times, per call, each stage of
``Retrieve`` (filters, user tower, search + item-to-item + fusion, response building,
serialisation) and of ``Rank`` (parse, candidate merge, item table, ranker, rules and
reasons, serialisation) on the home surface with the gateway's filters and 200
candidates. Medians over ``--calls`` calls (one per customer, round robin) go to
``bench/results/TAG.json`` and a table in ``TAG.md``; ``--cprofile`` also prints the
top functions of each path. No speed assertion anywhere: this is a measuring tool.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mercato.v1 import common_pb2, ranking_pb2, retrieval_pb2  # noqa: E402

ET = common_pb2.EventType
KINDS = {"view": ET.EVENT_TYPE_VIEW, "cart": ET.EVENT_TYPE_ADD_TO_CART}
KINDS |= {"add_to_cart": ET.EVENT_TYPE_ADD_TO_CART, "purchase": ET.EVENT_TYPE_PURCHASE}


def profiles_from_events(items: int, users: int, seed: int) -> list[common_pb2.Profile]:
    """One profile per synthetic customer, shaped like the profile service's."""
    from training.synthetic import SyntheticConfig, build_catalog, iter_blocks

    cfg = SyntheticConfig(n_users=users, n_items=items, days=30, seed=seed)
    cat = build_catalog(cfg)
    category = dict(zip(cat.item_ids, cat.items_frame()["category"], strict=True))
    out = []
    for ev, _ in iter_blocks(cfg, cat):
        for user, g in ev.sort_values("ts").groupby("user_id", sort=True):
            p = common_pb2.Profile(customer_id=str(user), known=True, segment="regular")
            rows = list(g.itertuples(index=False))
            for r in rows[-50:][::-1]:
                kind = KINDS.get(str(r.event), ET.EVENT_TYPE_VIEW)
                p.recent_items.add(item_id=str(r.item_id), type=kind)
            bought = [str(r.item_id) for r in rows if str(r.event) == "purchase"]
            for item_id in dict.fromkeys(bought):
                p.purchases.add(item_id=item_id, count=bought.count(item_id), quantity=1)
            carted = [str(r.item_id) for r in rows if str(r.event) in ("cart", "add_to_cart")]
            for item_id in [i for i in dict.fromkeys(carted) if i not in bought][:3]:
                p.cart.lines.add(item_id=item_id, quantity=1, price=10.0)
            cats = [category[str(r.item_id)] for r in rows]
            for c in dict.fromkeys(cats):
                p.category_affinity[c] = cats.count(c) / len(cats)
            out.append(p)
    return out


def catalogue(items: int, seed: int) -> list[common_pb2.Item]:
    """The catalogue the profile service would hold (load.py's stock rule)."""
    from training.synthetic import SyntheticConfig, build_catalog

    frame = build_catalog(SyntheticConfig(n_items=items, seed=seed)).items_frame()
    stock = (frame.index.to_numpy() * 7919) % 50
    return [
        common_pb2.Item(
            item_id=r.item_id,
            category=r.category,
            price=float(r.price),
            stock=int(s),
            margin=float(r.price) * 0.3,
        )
        for r, s in zip(frame.itertuples(index=False), stock, strict=True)
    ]


def train(tmp: Path, items: int, users: int, epochs: int, seed: int) -> tuple[Path, Path]:
    """Two-tower (with item-to-item) and ranker bundles, trained for this run."""
    from training.baselines import BaselineConfig
    from training.index import IndexConfig
    from training.pipeline import TrainConfig, train_and_register
    from training.ranker import RankerConfig, train_and_register_ranker
    from training.registry import promote
    from training.synthetic import SyntheticConfig
    from training.two_tower import TwoTowerConfig

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = TrainConfig(
        synthetic=SyntheticConfig(n_users=users, n_items=items, days=30, seed=seed),
        model=replace(TwoTowerConfig(), epochs=epochs, progress=False, init="random"),
        baselines=BaselineConfig(models=()),
        index=IndexConfig(recall_queries=200),
        max_eval_users=500,
        tracking_uri=uri,
    )
    tt = train_and_register(cfg)
    promote("mercato-two-tower", uri, version=tt.version, force=True)
    rk = train_and_register_ranker(
        RankerConfig(
            retrieval=cfg,
            two_tower="registry",
            allow_refit_two_tower=True,  # the refit champion; hot-path timing only
            progress=False,
            tracking_uri=uri,
            epochs=10,
        )
    )
    return tt.bundle_dir, rk.bundle_dir


def timed(stages: dict[str, list[float]], name: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    out = fn()
    stages.setdefault(name, []).append(time.perf_counter() - t)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.models.ranker import RankerBundle
    from services.models.registry import ModelVersionInfo
    from services.ranking import pipeline as rp
    from services.ranking.ranker import RankerScorer
    from services.ranking.rules import RulesConfig, apply_rules
    from services.ranking.table import CatalogTable
    from services.retrieval import merge as rm
    from services.retrieval import server as rs
    from training.replay import load_for_replay

    with tempfile.TemporaryDirectory(prefix="mercato-hotpath-") as tmpdir:
        keep = Path(args.keep) if args.keep else None
        started = time.perf_counter()
        if keep and (keep / "two-tower").is_dir() and (keep / "ranker").is_dir():
            tt_dir, rk_dir = keep / "two-tower", keep / "ranker"
        else:
            tt_dir, rk_dir = train(Path(tmpdir), args.items, args.users, args.epochs, args.seed)
            if keep:
                shutil.copytree(tt_dir, keep / "two-tower")
                shutil.copytree(rk_dir, keep / "ranker")
        trained_s = time.perf_counter() - started
        model = load_for_replay(tt_dir)
        ranker = RankerBundle.load(rk_dir)
    info = ModelVersionInfo("mercato-ranker", "1", "bench", "champion")
    scorer = RankerScorer(ranker, info)
    table = CatalogTable(catalogue(args.items, args.seed))
    pipe = rp.RankPipeline(
        RulesConfig.load(None), scorers=lambda alias: scorer, table=lambda: table
    )
    merge_cfg = rm.merge_config(model)
    profiles = profiles_from_events(args.items, args.users, args.seed)
    home = common_pb2.Context(surface=common_pb2.SURFACE_HOME)
    filters = retrieval_pb2.Filters(exclude_purchased=True, in_stock_only=True)
    columns = args.form == "columns"
    retrieve_blobs = [
        retrieval_pb2.RetrieveRequest(
            profile=p, context=home, k=args.candidates_k, filters=filters, columns=columns
        ).SerializeToString()
        for p in profiles
    ]
    ret: dict[str, list[float]] = {}
    ranks: dict[str, list[float]] = {}

    def retrieve(blob: bytes, st: dict[str, list[float]]) -> retrieval_pb2.RetrieveResponse:
        t0 = time.perf_counter()
        req = timed(st, "parse", lambda: retrieval_pb2.RetrieveRequest.FromString(blob))
        s = model.state
        flt = timed(
            st, "filters", lambda: rs.row_filter(model, s, req.filters, req.profile, req.context)
        )
        query = timed(st, "user query", lambda: rs.user_query(req.profile, req.context))
        q = timed(st, "user tower", lambda: model.encode_user(query))
        timed(st, "two-tower search", lambda: model.search(s, q, req.k, flt))
        merged = timed(
            st,
            "search + item2item + fuse",
            lambda: rm.retrieve_merged(model, s, query, req.k, flt, merge_cfg, q),
        )
        resp = retrieval_pb2.RetrieveResponse()
        if req.columns:
            timed(st, "response", lambda: rm.fill_columns(resp.columns, model, s, merged))
        else:
            timed(st, "response", lambda: rm.fill_merged(resp.candidates, model, s, merged))
        timed(st, "serialise", resp.SerializeToString)
        # the two-tower search is timed twice (alone and inside the merge): the total
        # counts it once
        st.setdefault("total", []).append(time.perf_counter() - t0 - st["two-tower search"][-1])
        return resp

    def rank_call(blob: bytes, st: dict[str, list[float]]) -> ranking_pb2.RankResponse:
        t0 = time.perf_counter()
        req = timed(st, "parse", lambda: ranking_pb2.RankRequest.FromString(blob))
        cands = timed(
            st,
            "merge candidates",
            lambda: (
                rp.merge_candidates(req.candidates)
                if req.candidates
                else rp.merge_columns(req.columns)
            ),
        )
        items = timed(st, "item table", lambda: table.lookup(cands.ids))
        ctx = rp.rank_context(req.profile, req.context)
        rules = pipe.rules.for_surface(ctx.surface)
        scores = timed(st, "ranker", lambda: pipe._scores(scorer, req, cands, items))
        timed(st, "rules", lambda: apply_rules(cands, scores, items, ctx, rules, req.k, None))
        resp = timed(st, "rank() whole", lambda: pipe.rank(req))
        timed(st, "serialise", resp.SerializeToString)
        st.setdefault("total", []).append(time.perf_counter() - t0 - st["rank() whole"][-1])
        st.setdefault("total (rank() whole)", []).append(
            st["parse"][-1] + st["rank() whole"][-1] + st["serialise"][-1]
        )
        return resp

    rank_blobs = []
    ncands = []
    for p, blob in zip(profiles, retrieve_blobs, strict=True):  # warm-up and Rank inputs
        resp = retrieve(blob, {})
        ncands.append(len(resp.candidates) or len(resp.columns.item_ids))
        rank = ranking_pb2.RankRequest(profile=p, context=home, k=args.k)
        if columns:
            rank.columns.CopyFrom(resp.columns)
        else:
            rank.candidates.extend(resp.candidates)
        rank_blobs.append(rank.SerializeToString())
        rank_call(rank_blobs[-1], {})
    n = len(profiles)
    prof = cProfile.Profile() if args.cprofile else None
    for i in range(args.calls):
        if prof:
            prof.enable()
        retrieve(retrieve_blobs[i % n], ret)
        rank_call(rank_blobs[i % n], ranks)
        if prof:
            prof.disable()
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
    med = {
        "retrieve": {k: round(statistics.median(v) * 1000, 4) for k, v in ret.items()},
        "rank": {k: round(statistics.median(v) * 1000, 4) for k, v in ranks.items()},
    }
    return {
        "items": args.items,
        "customers": n,
        "calls": args.calls,
        "candidates": args.candidates_k,
        "form": args.form,
        "train_seconds": round(trained_s, 1),
        "median_ms": med,
        "rank_candidates_mean": round(float(np.mean(ncands)), 1),
    }


def markdown(report: dict[str, Any]) -> str:
    r = report["result"]
    lines = [
        f"# Hot path stages, in process ({r['items']} items, {r['candidates']} candidates "
        f"as {r['form']})",
        "",
        f"`{report['command']}` on {report['machine']}, {report['date']}, load average "
        f"{report['loadavg_1m_before_after']}. Median ms per call over {r['calls']} calls.",
        "",
    ]
    for path in ("retrieve", "rank"):
        lines += [f"| {path} stage | median ms |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in r["median_ms"][path].items()]
        lines.append("")
    return "\n".join(lines)


def run_info(script: str, load_before: float) -> dict[str, Any]:
    """The head of a bench report: the command, the machine, the date and the 1-minute
    load average before and after the run (this bench's and bench/server_mode.py's)."""
    return {
        "command": f"python bench/{script} " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def write_report(tag: str, report: dict[str, Any], table: str) -> None:
    """``bench/results/TAG.json`` (the report) and ``TAG.md`` (its table), and the table
    on stdout (this bench's and bench/catalog_refresh.py's)."""
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{tag}.md").write_text(table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--candidates-k", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--form",
        choices=("columns", "messages"),
        default="columns",
        help="Candidates as CandidateColumns (the gateway's way) or a Candidate message each.",
    )
    ap.add_argument("--cprofile", action="store_true", help="Print the top functions.")
    ap.add_argument("--tag", default="hotpath")
    ap.add_argument(
        "--keep",
        default="",
        help="Directory for the trained bundles: reused when present (same --items, "
        "--users, --seed), else trained and copied there.",
    )
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    result = run(args)
    report = {**run_info("hotpath.py", load_before), "result": result}
    write_report(args.tag, report, markdown(report))


if __name__ == "__main__":
    main()
