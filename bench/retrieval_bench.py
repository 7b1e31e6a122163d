"""Retrieval benchmark: Retrieve latency and throughput over gRPC against a real service
process, the same search called in Python (the floor), an Echo floor, and ANN Recall@100
against exact search, on synthetic catalogs of 10k, 100k and 1M items.

    python bench/retrieval_bench.py [--sizes 10000 100000 1000000] [--calls 2000]
    python bench/retrieval_bench.py --sizes 10000          # quick run

The vectors are realistic: a two-tower model is trained once on small synthetic data,
then its item tower embeds every item of a generated catalog from its features (category,
price, brand, colour, tier), as it does for new items. Each catalog becomes a bundle
(Flat index up to the exact threshold, HNSW above), registered in a local MLflow store
and served by ``python -m services.retrieval``. For HNSW catalogs efSearch is swept and
the smallest value reaching the target recall is the one served.

Built bundles and the MLflow store are cached in ``--work-dir`` (default
``/tmp/mercato-retrieval-bench``); the 1M-item HNSW build takes minutes the first time.
Writes bench/results/retrieval.json and bench/results/retrieval.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.threads import configure_threads  # noqa: E402

configure_threads(1)

import faiss  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mercato.v1 import (  # noqa: E402
    common_pb2,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from services.models.registry import ModelVersionInfo  # noqa: E402
from services.models.two_tower import (  # noqa: E402
    ItemFeatures,
    TwoTowerBundle,
    _pad,
    attribute_tokens,
    build_net,
    price_buckets,
)
from services.retrieval.model import IndexConfig, RowFilter, load_retrieval_model  # noqa: E402
from services.retrieval.server import user_query  # noqa: E402
from tests.procs import start_service  # noqa: E402

RESULTS = REPO / "bench" / "results"
N_CATEGORIES = 40
K = 100
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# Search-breadth sweeps: HNSW efSearch, IVF nprobe (of about 2 * sqrt(n) lists).
SWEEPS = {
    "hnsw": ("efSearch", (64, 128, 256, 512)),
    "ivf": ("nprobe", (8, 16, 32, 64, 128)),
}


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


# ----------------------------------------------------------------------------- data


def train_small(work: Path) -> Path:
    """A two-tower model trained on small synthetic data (cached)."""
    out = work / "small" / "bundle"
    if (out / "manifest.json").is_file():
        return out
    from training.pipeline import TrainConfig, train_and_register
    from training.synthetic import SyntheticConfig
    from training.two_tower import TwoTowerConfig

    print("training the small model ...", flush=True)
    res = train_and_register(
        TrainConfig(
            synthetic=SyntheticConfig(
                n_users=3000, n_items=2000, n_categories=N_CATEGORIES, days=60, seed=0
            ),
            model=replace(TwoTowerConfig(), epochs=4, progress=False),
            tracking_uri=f"sqlite:///{work / 'train.db'}",
            register=False,
            evaluate_test=False,
        )
    )
    import shutil

    shutil.copytree(res.bundle_dir, out)
    return out


def catalog_features(n: int, seed: int) -> tuple[list[ItemFeatures], np.ndarray]:
    from training.synthetic import SyntheticConfig, build_catalog

    cat = build_catalog(SyntheticConfig(n_items=n, n_categories=N_CATEGORIES, seed=seed))
    names = cat.category_names
    feats = [
        ItemFeatures(
            item_id=str(cat.item_ids[i]),
            category=names[int(cat.category[i])],
            price=round(float(cat.price[i]), 2),
            attributes={
                "brand": str(cat.brand[i]),
                "color": str(cat.color[i]),
                "tier": str(cat.tier[i]),
            },
        )
        for i in range(n)
    ]
    # Long-tail popularity for the popularity list and for sampling histories.
    pop = np.random.default_rng(seed).pareto(1.2, size=n) + 1e-3
    return feats, pop


def build_bundle(small: TwoTowerBundle, n: int, out: Path) -> Path:
    """A bundle of ``n`` generated items whose embeddings come from the small model's item
    tower. Each generated item gets an id embedding interpolated between two trained items
    of its category (so vectors are distinct and lie where trained items lie; features
    alone would give many identical vectors, which no real catalog has), then the tower
    embeds it with its category, price and attributes."""
    if (out / "manifest.json").is_file():
        return out
    t0 = time.perf_counter()
    feats, pop = catalog_features(n, seed=1000 + n)
    rng = np.random.default_rng(n)
    config = dict(small.config)
    config.update(n_items=n, n_items_trained=0, dataset=f"bench-synthetic-{n}")
    f = config["features"]
    codes = {c: i for i, c in enumerate(small.vocab["category"])}
    cat = np.array([codes.get(x.category, 0) for x in feats], dtype=np.int64)
    trained = small.net.item_id.weight.detach().numpy()[1:]
    small_cat = np.array([codes.get(c, 0) for c in small.item_category], dtype=np.int64)
    ids = np.zeros((n + 1, small.dim), dtype=np.float32)
    for c in np.unique(cat):
        rows = np.flatnonzero(cat == c)
        pool = np.flatnonzero(small_cat == c)
        if len(pool) == 0:
            pool = np.arange(len(trained))
        a = trained[rng.choice(pool, len(rows))]
        b = trained[rng.choice(pool, len(rows))]
        w = rng.random((len(rows), 1)).astype(np.float32)
        ids[rows + 1] = w * a + (1 - w) * b
    net = build_net(config, small.vocab)
    state = small.net.state_dict()
    state["item_id.weight"] = torch.from_numpy(ids)
    item_cat = torch.zeros(n + 1, dtype=torch.long)
    item_cat[1:] = torch.from_numpy(cat)
    state["item_category"] = item_cat
    net.load_state_dict(state)
    net.eval()
    prices = price_buckets(np.array([x.price for x in feats]), f["price_boundaries"])
    emb = np.empty((n, small.dim), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, n, 50_000):
            j = min(n, i + 50_000)
            attrs = _pad(
                [
                    attribute_tokens(x.attributes, f["attr_buckets"], f["max_attrs"])
                    for x in feats[i:j]
                ],
                f["max_attrs"],
            )
            emb[i:j] = net.encode_item(
                torch.arange(i + 1, j + 1),
                torch.from_numpy(cat[i:j]),
                torch.from_numpy(prices[i:j]),
                torch.from_numpy(attrs),
            ).numpy()
    print(f"  {n}: embedded {n} items in {time.perf_counter() - t0:.1f} s", flush=True)
    index: faiss.Index
    t1 = time.perf_counter()
    if n <= IndexConfig().exact_max_items:
        index = faiss.IndexFlatIP(small.dim)
    else:
        faiss.omp_set_num_threads(2)  # the build only; searches run with one thread
        hnsw = faiss.IndexHNSWFlat(small.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = hnsw
    index.add(emb)
    faiss.omp_set_num_threads(1)
    print(f"  {n}: built {type(index).__name__} in {time.perf_counter() - t1:.1f} s", flush=True)
    top = np.argsort(-pop)[:1000]
    bundle = TwoTowerBundle(
        config=config,
        vocab=small.vocab,
        item_ids=[x.item_id for x in feats],
        item_category=[x.category for x in feats],
        item_price=np.array([x.price for x in feats], dtype=np.float32),
        item_embeddings=emb,
        net=net,
        index=index,
        popularity=[(feats[i].item_id, float(pop[i])) for i in top],
    )
    tmp = out.parent / (out.name + ".tmp")
    bundle.save(tmp)
    np.save(out.parent / "popularity_weights.npy", pop.astype(np.float32))
    tmp.rename(out)
    return out


def register(work: Path, bundle_dir: Path, model_name: str) -> tuple[str, str]:
    """Register the bundle as ``model_name``@champion (once per bundle); (uri, version)."""
    from training.registry import client_for, ensure_experiment, register_bundle

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client, _ = client_for(uri)
    key = hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()[:16]
    try:
        mv = client.get_model_version_by_alias(model_name, "champion")
        if mv.tags.get("bundle_key") == key:
            return uri, str(mv.version)
    except Exception:
        pass
    exp = ensure_experiment(client, "retrieval-bench", uri, None)
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(bundle_dir), "bundle")
    client.set_terminated(run.info.run_id)
    mv = register_bundle(client, run.info.run_id, model_name, "champion", tags={"bundle_key": key})
    return uri, str(mv.version)


def requests(b: TwoTowerBundle, pop: np.ndarray, count: int, seed: int) -> list[Any]:
    """Home-page Retrieve calls of known customers: 10 recent items (popularity-weighted),
    3 purchases, 1 cart line, k=100, exclude purchased and in-cart."""
    rng = np.random.default_rng(seed)
    p = pop / pop.sum()
    out = []
    for _ in range(count):
        rows = rng.choice(len(b.item_ids), size=14, replace=False, p=p)
        ids = [b.item_ids[int(r)] for r in rows]
        prof = common_pb2.Profile(
            customer_id="bench",
            known=True,
            recent_items=[common_pb2.RecentItem(item_id=i) for i in ids[:10]],
            purchases=[common_pb2.PurchasedItem(item_id=i, count=1) for i in ids[10:13]],
            cart=common_pb2.Cart(lines=[common_pb2.CartLine(item_id=ids[13], quantity=1)]),
            segment="active",
            country="GB",
            price_band="mid",
        )
        out.append(
            retrieval_pb2.RetrieveRequest(
                profile=prof,
                context=common_pb2.Context(surface=common_pb2.SURFACE_HOME),
                k=K,
                filters=retrieval_pb2.Filters(exclude_purchased=True, exclude_in_cart=True),
            )
        )
    return out


# ----------------------------------------------------------------------------- measures


def timed(fn: Any, items: list[Any], warmup: int = 50) -> list[float]:
    for x in items[:warmup]:
        fn(x)
    lat = []
    for x in items:
        t = time.perf_counter()
        fn(x)
        lat.append((time.perf_counter() - t) * 1e3)
    return lat


def summary(lat: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(lat, 50), 3),
        "p99_ms": round(pct(lat, 99), 3),
        "mean_ms": round(statistics.fmean(lat), 3),
        "calls": len(lat),
    }


def exact_topk(emb: np.ndarray, qs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows per query and the k-th best score (for tie-aware recall)."""
    rows = np.empty((len(qs), k), dtype=np.int64)
    kth = np.empty(len(qs), dtype=np.float32)
    for i in range(0, len(qs), 32):
        s = qs[i : i + 32] @ emb.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        rows[i : i + 32] = part
        kth[i : i + 32] = np.take_along_axis(s, part, axis=1).min(axis=1)
    return rows, kth


def recall(index: faiss.Index, emb: np.ndarray, qs: np.ndarray, kth: np.ndarray, k: int) -> float:
    """Recall@k of ``index`` against exact search. Generated items with identical
    features share an embedding, so exact top-k is ambiguous at the boundary: a returned
    item counts as a hit when its exact score reaches the exact k-th score."""
    _, got = index.search(np.ascontiguousarray(qs), k)
    hits = []
    for q, g, t in zip(qs, got, kth, strict=True):
        g = g[g >= 0]
        hits.append(min(k, int((emb[g] @ q >= t - 1e-6).sum())))
    return float(np.mean(hits) / k)


def throughput(target: str, reqs: list[Any], seconds: float, concurrency: int) -> float:
    """Calls/s with ``concurrency`` calls in flight (asyncio client, one channel)."""

    async def run() -> float:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
            done = 0
            stop = time.perf_counter() + seconds

            async def worker(i: int) -> None:
                nonlocal done
                j = i
                while time.perf_counter() < stop:
                    await stub.Retrieve(reqs[j % len(reqs)], timeout=10)
                    done += 1
                    j += concurrency

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            return done / (time.perf_counter() - t0)

    return asyncio.run(run())


def in_process(
    args: argparse.Namespace,
    bdir: Path,
    info: ModelVersionInfo,
    pop: np.ndarray,
    ann: str,
    n: int,
) -> tuple[dict[str, Any], list[Any]]:
    """Recall, the efSearch sweep and the in-process floor, with the service's own code."""
    model = load_retrieval_model(bdir, info, IndexConfig(ann=ann))
    b = model.bundle
    reqs = requests(b, pop, args.calls, seed=n)
    users = np.stack([model.encode_user(user_query(r.profile, r.context)) for r in reqs])
    emb = b.item_embeddings
    qs = users[: args.recall_queries]
    _, kth = exact_topk(emb, qs, K)

    # Search-breadth sweep (ANN): recall and in-process search time per value; the
    # smallest value reaching the target recall is the one served.
    sweep = []
    ef = 0
    if ann in SWEEPS:
        name, values = SWEEPS[ann]

        def set_breadth(v: int) -> None:
            if ann == "hnsw":
                model.index.hnsw.efSearch = v
            else:
                model.index.nprobe = v

        for e in values:
            set_breadth(e)
            rec = recall(model.index, emb, qs, kth, K)
            lat = timed(lambda q: model.index.search(q.reshape(1, -1), K), list(users[:500]))
            sweep.append({"param": name, "value": e, "recall_at_100": round(rec, 4)})
            sweep[-1].update(summary(lat))
            print(f"  {ann} {name} {e}: recall@100 {rec:.4f}, p50 {pct(lat, 50):.3f} ms")
        ok = [s for s in sweep if s["recall_at_100"] >= args.target_recall]
        ef = int(ok[0]["value"]) if ok else values[-1]
        set_breadth(ef)
    rec = recall(model.index, emb, qs, kth, K)

    # In-process floor: what the servicer does, without gRPC.
    st = model.state

    def direct(r: Any) -> None:
        flt = RowFilter(
            exclude=np.array(
                [model.row_of(st, p.item_id) for p in r.profile.purchases]
                + [model.row_of(st, c.item_id) for c in r.profile.cart.lines],
                dtype=np.int64,
            )
        )
        q = model.encode_user(user_query(r.profile, r.context))
        model.search(st, q, K, flt)

    lat_direct = timed(direct, reqs)
    lat_encode = timed(lambda r: model.encode_user(user_query(r.profile, r.context)), reqs[:500])
    lat_search = timed(lambda q: model.search(st, q, K, RowFilter()), list(users[:500]))
    return {
        "ef_search": ef,
        "recall": rec,
        "sweep": sweep,
        "direct": lat_direct,
        "encode": lat_encode,
        "search": lat_search,
        "fast_user_tower": model.fast_user is not None,
    }, reqs


def bench_size(
    args: argparse.Namespace, work: Path, small: TwoTowerBundle, n: int, ann: str
) -> dict:
    print(f"catalog of {n} items", flush=True)
    bdir = build_bundle(small, n, work / f"catalog-{n}" / "bundle")
    pop = np.load(bdir.parent / "popularity_weights.npy")
    model_name = f"bench-two-tower-{n}"
    uri, version = register(work, bdir, model_name)
    info = ModelVersionInfo(model_name, version, "", "champion")
    inproc, reqs = in_process(args, bdir, info, pop, ann, n)
    ef = inproc["ef_search"]

    env = {
        "MERCATO_RETRIEVAL_TRACKING_URI": uri,
        "MERCATO_RETRIEVAL_MODEL_NAME": model_name,
        "MERCATO_RETRIEVAL_ALIASES": "champion",
        "MERCATO_RETRIEVAL_POLL_INTERVAL_S": "60",
        "MERCATO_RETRIEVAL_CACHE_DIR": str(work / "service-cache"),
        "MERCATO_RETRIEVAL_THREADS": "1",
        "MERCATO_RETRIEVAL_LOG_LEVEL": "WARNING",
    }
    if ann in SWEEPS:
        env["MERCATO_RETRIEVAL_ANN_INDEX"] = ann
        key = "HNSW_EF_SEARCH" if ann == "hnsw" else "IVF_NPROBE"
        env[f"MERCATO_RETRIEVAL_{key}"] = str(ef)
    t0 = time.perf_counter()
    svc = start_service("retrieval", work / f"svc-{n}", env=env, timeout=900)
    load_s = time.perf_counter() - t0
    try:
        with svc.channel() as ch:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
            echo = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch)
            listed = stub.ListLoadedModels(retrieval_pb2.ListLoadedModelsRequest(), timeout=10)
            index_type = listed.models[0].index_type
            got: list[list[str]] = []
            ping = diagnostics_pb2.EchoRequest(payload=b"x")
            for r in reqs[:50]:  # warm-up
                stub.Retrieve(r, timeout=5)
                echo.Echo(ping, timeout=5)
            # Echo and Retrieve alternate, so both see the same machine load.
            lat_echo, lat_grpc = [], []
            for r in reqs:
                t = time.perf_counter()
                echo.Echo(ping, timeout=5)
                t1 = time.perf_counter()
                resp = stub.Retrieve(r, timeout=5)
                t2 = time.perf_counter()
                lat_echo.append((t1 - t) * 1e3)
                lat_grpc.append((t2 - t1) * 1e3)
                if len(got) < 20:
                    got.append([c.item_id for c in resp.candidates])
        tput = {
            c: round(throughput(svc.target, reqs, args.seconds, c), 1) for c in args.concurrency
        }
    finally:
        svc.terminate(timeout=120)
    assert all(len(g) == K for g in got), "Retrieve returned fewer than k items"
    row = {
        "items": n,
        "index": index_type,
        "ann": ann,
        "search_breadth": ef or None,
        "recall_at_100": round(inproc["recall"], 4),
        "grpc": summary(lat_grpc),
        "direct": summary(inproc["direct"]),
        "encode_user": summary(inproc["encode"]),
        "index_search": summary(inproc["search"]),
        "numpy_user_tower": inproc["fast_user_tower"],
        "echo": summary(lat_echo),
        "throughput_calls_per_s": tput,
        "service_start_to_serving_s": round(load_s, 1),
        "ef_sweep": inproc["sweep"],
    }
    print(json.dumps(row, indent=1), flush=True)
    return row


def markdown(res: dict) -> str:
    lines = [
        "# Retrieval benchmark",
        "",
        f"`{res['command']}` on {res['machine']} ({res['cpus']} CPUs, shared with other "
        f"jobs; noisy: compare within a run). Retrieve k={K}, exclude purchased + in "
        f"cart, 1 thread for torch/FAISS in the service; latencies from one sequential "
        f"client over {res['calls']} calls, Echo and Retrieve alternating; throughput "
        f"with N calls in flight for {res['seconds']} s; recall over "
        f"{res['recall_queries']} user queries.",
        "",
        "| items | index | Recall@100 | gRPC p50 / p99 ms | in-process p50 / p99 ms "
        "| user tower p50 ms | index search p50 ms | Echo p50 / p99 ms | calls/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["sizes"]:
        tp = ", ".join(f"{v:g} @{c}" for c, v in r["throughput_calls_per_s"].items())
        lines.append(
            f"| {r['items']:,} | {r['index']} | {r['recall_at_100']:.4f} "
            f"| {r['grpc']['p50_ms']:.3f} / {r['grpc']['p99_ms']:.3f} "
            f"| {r['direct']['p50_ms']:.3f} / {r['direct']['p99_ms']:.3f} "
            f"| {r['encode_user']['p50_ms']:.3f} | {r['index_search']['p50_ms']:.3f} "
            f"| {r['echo']['p50_ms']:.3f} / {r['echo']['p99_ms']:.3f} | {tp} |"
        )
    for r in res["sizes"]:
        if r["ef_sweep"]:
            name = r["ef_sweep"][0]["param"]
            built = (
                f"M={HNSW_M}, efConstruction={HNSW_EF_CONSTRUCTION}"
                if r["ann"] == "hnsw"
                else "IVF-Flat, lists = 2 * sqrt(n) rounded to a power of two"
            )
            lines += [
                "",
                f"{r['ann'].upper()} {name} sweep at {r['items']:,} items ({built}; "
                f"in-process index search, k={K}; served: the smallest {name} with "
                f"Recall@100 >= {res['target_recall']}, else the largest):",
                "",
                f"| {name} | Recall@100 | search p50 ms | search p99 ms |",
                "| --- | --- | --- | --- |",
            ]
            lines += [
                f"| {s['value']} | {s['recall_at_100']:.4f} | {s['p50_ms']:.3f} "
                f"| {s['p99_ms']:.3f} |"
                for s in r["ef_sweep"]
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--recall-queries", type=int, default=300)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--ann", nargs="+", default=["ivf", "hnsw"], help="ANN indexes above the exact size"
    )
    ap.add_argument("--work-dir", default="/tmp/mercato-retrieval-bench")
    ap.add_argument("--out", default=str(RESULTS / "retrieval"))
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    small = TwoTowerBundle.load(train_small(work))
    exact_max = IndexConfig().exact_max_items
    rows = [
        bench_size(args, work, small, n, ann)
        for n in args.sizes
        for ann in (["flat"] if n <= exact_max else args.ann)
    ]
    res = {
        "command": "python bench/retrieval_bench.py " + " ".join(sys.argv[1:]),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "calls": args.calls,
        "seconds": args.seconds,
        "recall_queries": args.recall_queries,
        "target_recall": args.target_recall,
        "dim": small.dim,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sizes": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
