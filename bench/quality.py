"""Retrieval quality benchmark: two-tower vs popularity vs ALS vs EASE, same split,
full ranking over every item (``make bench-quality``); with the item-to-item model and
``served``, the list the services answer (retrieval merge + ranking rules, replayed in
process by :mod:`training.replay`).

Datasets (``--data-dir``, default ``../shared/data`` relative to the repository):

- ``retail``: UCI Online Retail invoices, time split 80/10/10 (sessions = invoices);
- ``ml1m``: MovieLens-1M, every rating an interaction, per-user random split 80/10/10;
- ``ml1m-recbole``: MovieLens-1M under RecBole's protocol: ratings >= 3, users and
  items with >= 10 interactions, random 80/10/10 per user, fit on train only, test
  queries from the train history with train and validation items excluded, embedding
  size 64.

Each dataset is one run of the training pipeline (``training.pipeline``) into a
throw-away MLflow store; baseline hyper-parameters, the two-tower's warm start λ, weight
decay, input dropout and early stopping are chosen on validation; under the default
protocol (time splits) every model's chosen configuration is then fit again on train +
validation, the history the test queries see; the tables report the test part. Writes
``bench/results/quality.json`` and ``quality.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.threads import configure_threads  # noqa: E402

configure_threads(int(os.environ.get("BENCH_THREADS", "1")))

from training.baselines import BaselineConfig  # noqa: E402
from training.pipeline import TrainConfig, train_and_register  # noqa: E402
from training.ranker import RankerConfig, train_and_register_ranker  # noqa: E402
from training.two_tower import TwoTowerConfig  # noqa: E402

KS = (10, 20, 50, 100)
COLS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
MODELS = ("two_tower", "popularity", "als", "ease", "item2item", "served", "served_ranker")

#: Two-tower (weight decay, input dropout) pairs, chosen on validation.
GRID = ((0.0, 0.2), (0.0, 0.5), (0.05, 0.2))
#: EASE λ of the two-tower's rank-64 warm start, chosen on validation.
WARM_LAMBDAS = (250.0, 500.0, 1000.0)

BASELINES = BaselineConfig(
    ease_lambdas=(100.0, 250.0, 500.0, 1000.0),
    als_factors=64,
    als_regularizations=(0.01, 0.1),
    als_alphas=(1.0, 5.0, 20.0),
    als_iterations=15,
)


def configs(
    data_dir: Path, loss: str, epochs: int, prior_alphas: tuple[float, ...] | None = None
) -> dict[str, TrainConfig]:
    # Whole epochs (one row per customer); early stopping on validation ends training.
    # Weight decay and input dropout are chosen on validation from GRID.
    model = replace(
        TwoTowerConfig(),
        dim=64,
        loss=loss,
        epochs=epochs,
        grid=GRID,
        ease_lambdas=WARM_LAMBDAS,
    )
    if prior_alphas is not None:
        model = replace(model, prior_alphas=prior_alphas)
    base = TrainConfig(ks=KS, baselines=BASELINES, register=False, model=model)
    return {
        "retail": replace(
            base,
            data="online-retail",
            path=str(data_dir / "online-retail"),
            split="time",
        ),
        "ml1m": replace(
            base,
            data="movielens",
            path=str(data_dir / "ml-1m"),
            split="user-random",
        ),
        "ml1m-recbole": replace(
            base,
            data="movielens",
            path=str(data_dir / "ml-1m"),
            split="user-random",
            protocol="recbole",
            min_rating=3,
            min_user_interactions=10,
            min_item_interactions=10,
        ),
        # The default synthetic shop (what `mercato train retrieval` trains on).
        "synthetic": replace(base, data="synthetic", split="time"),
    }


def markdown(results: dict[str, dict[str, object]]) -> str:
    lines = [
        "| dataset | split | model | " + " | ".join(COLS) + " | train s |",
        "|---" * (len(COLS) + 4) + "|",
    ]
    for name, r in results.items():
        test = r["test"]
        assert isinstance(test, dict)
        for model in MODELS:
            m = test.get(model)
            if m is None:
                continue
            cells = " | ".join(f"{m[c]:.4f}" for c in COLS)
            lines.append(
                f"| {name} | {r['split']} | {model} | {cells} | {m['train_seconds']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--datasets", default="ml1m-recbole,retail,synthetic")
    ap.add_argument("--loss", default="full", help="two-tower loss: full | inbatch")
    ap.add_argument("--epochs", type=int, default=60, help="at most; early stopping ends it")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"))
    ap.add_argument(
        "--combine",
        nargs="*",
        default=None,
        help="Only merge the JSON files of earlier partial runs into --out (no training).",
    )
    ap.add_argument(
        "--ranker",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Train the ranker on the served candidates and replay the served list with it.",
    )
    ap.add_argument("--ranker-max-users", type=int, default=3000, help="Customers per window.")
    ap.add_argument(
        "--prior-alphas",
        default=None,
        help="override the two-tower's popularity prior alphas (comma list; '' = none)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Data sets run as this many processes at once (1 thread each), then combined.",
    )
    args = ap.parse_args()
    if args.combine is not None:
        combine([Path(p) for p in args.combine], Path(args.out))
        return
    names = args.datasets.split(",")
    if args.jobs > 1 and len(names) > 1:
        run_parallel(names, args.jobs, Path(args.out))
        return
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        sys.exit(f"no data folder {data_dir} (see --data-dir)")
    alphas = (
        None
        if args.prior_alphas is None
        else tuple(float(a) for a in args.prior_alphas.split(",") if a.strip())
    )
    cfgs = configs(data_dir, args.loss, args.epochs, alphas)
    store = Path(tempfile.mkdtemp(prefix="mercato-bench-quality-"))
    results: dict[str, dict[str, object]] = {}
    t_all = time.perf_counter()
    for name in args.datasets.split(","):
        cfg = replace(
            cfgs[name], tracking_uri=f"sqlite:///{store / 'mlflow.db'}", run_name=f"bench-{name}"
        )
        print(f"== {name}: {cfg.data} split={cfg.split} protocol={cfg.protocol}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        ranker: dict[str, object] = {}
        if args.ranker:
            # The retrieval pipeline runs inside the ranker's (its lists come from the
            # served merge of the bundles it fits); `served_ranker` is the served list
            # replayed with the trained ranker (validation: its held-out customers).
            rk = train_and_register_ranker(
                RankerConfig(
                    retrieval=cfg,
                    tracking_uri=cfg.tracking_uri,
                    register=False,
                    progress=False,
                    max_users=args.ranker_max_users,
                    run_name=f"bench-{name}-ranker",
                )
            )
            res = rk.retrieval
            for part in ("valid", "test"):
                res.metrics[part]["served_ranker"] = {
                    **rk.served[part]["ranker"],
                    "train_seconds": 0.0,
                }
            ranker = {
                "served": rk.served,
                "lists": rk.metrics,
                "gate": rk.gate,
                "best_epoch": rk.best_epoch,
            }
        else:
            res = train_and_register(cfg)
        results[name] = {
            "data": cfg.data,
            "split": cfg.split if cfg.protocol == "default" else f"{cfg.split} ({cfg.protocol})",
            "protocol": cfg.protocol,
            "valid": res.metrics["valid"],
            "test": res.metrics["test"],
            "best_epoch": res.best_epoch,
            "fine_tune": res.fine_tune,
            # new visitors (history masked) and the warm start's prior chosen on validation
            "cold": res.cold,
            "warm_start": res.warm_start,
            "refit": cfg.refit and cfg.protocol == "default",
            "fit_seconds": res.fit_seconds,
            "wall_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "ranker": ranker,
        }
        print(f"== {name} done in {time.perf_counter() - t0:.0f}s", flush=True)
    meta = {
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
        "datasets": list(results),
        "loss": args.loss,
        "epochs": args.epochs,
        "two_tower_grid": [list(g) for g in GRID],
        "two_tower_warm_lambdas": list(WARM_LAMBDAS),
        "threads": int(os.environ.get("BENCH_THREADS", "1")),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "total_seconds": time.perf_counter() - t_all,
        "baselines": {
            "ease_lambdas": BASELINES.ease_lambdas,
            "als": {
                "factors": BASELINES.als_factors,
                "regularizations": BASELINES.als_regularizations,
                "alphas": BASELINES.als_alphas,
                "iterations": BASELINES.als_iterations,
            },
        },
    }
    write(Path(args.out), [meta], results)


#: The order data sets start in with --jobs: the longest first (CPU seconds measured).
COST_ORDER = ("ml1m-recbole", "ml1m", "synthetic", "retail")


def run_parallel(names: list[str], jobs: int, out: Path) -> None:
    """Each data set as its own ``bench/quality.py --datasets <name>`` process (the same
    arguments otherwise), at most ``jobs`` at once, the longest first; their lines are
    printed prefixed with the data set's name; the JSON files are combined into ``out``
    with the wall time of the whole and the processes' CPU seconds."""
    import resource
    import subprocess
    import threading

    parts = Path(tempfile.mkdtemp(prefix="mercato-bench-quality-parts-"))
    order = sorted(names, key=lambda n: COST_ORDER.index(n) if n in COST_ORDER else -1)
    argv = list(sys.argv[1:])
    # the child's own arguments: everything but --datasets / --out / --jobs (and values)
    keep: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--datasets", "--out", "--jobs"):
            skip = True
            continue
        if a.startswith(("--datasets=", "--out=", "--jobs=")):
            continue
        keep.append(a)
    t0 = time.perf_counter()
    running: list[tuple[str, subprocess.Popen[str], threading.Thread]] = []
    failed: list[str] = []

    def pump(name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{name}] {line}", end="", flush=True)

    def reap(block: bool) -> None:
        for item in list(running):
            name, proc, th = item
            if block or proc.poll() is not None:
                proc.wait()
                th.join()
                running.remove(item)
                if proc.returncode != 0:
                    failed.append(name)
                print(f"== {name} finished (exit {proc.returncode})", flush=True)
                if block:
                    return

    for name in order:
        while len(running) >= jobs:
            time.sleep(1.0)
            reap(False)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--datasets", name]
        cmd += ["--out", str(parts / name), *keep]
        print(f"== {name}: started ({' '.join(cmd[1:])})", flush=True)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        th = threading.Thread(target=pump, args=(name, proc), daemon=True)
        th.start()
        running.append((name, proc, th))
    while running:
        reap(True)
    if failed:
        sys.exit(f"data sets failed: {', '.join(failed)}")
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    print(f"== all {len(order)} data sets: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    combine([parts / f"{n}.json" for n in names], out, {"jobs": jobs, "wall": wall, "cpu": cpu})


def run_line(m: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """One run of the report: its command, data sets, settings, wall and CPU seconds."""
    names = ", ".join(m["datasets"])
    if "jobs" in m:  # the --jobs run that started the others
        return (
            f"- `{m['command']}`: {names} as {m['jobs']} processes at once; "
            f"{float(m['total_seconds']):.0f} s wall, {float(m['cpu_seconds']):.0f} s CPU"
        )
    cpu = sum(float(results[d].get("cpu_seconds", 0.0)) for d in m["datasets"] if d in results)
    return (
        f"- `{m['command']}`: {names}; two-tower loss `{m['loss']}`, "
        f"at most {m['epochs']} epochs (early stopping); "
        f"{m['threads']} thread(s) on a {m['cpus']}-core machine shared with other jobs; "
        f"{float(m['total_seconds']):.0f} s wall, {cpu:.0f} s CPU"
    )


def write(out: Path, metas: list[dict[str, object]], results: dict[str, dict[str, object]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"runs": metas, "results": results}, indent=2, sort_keys=True)
    )
    table = markdown(results)
    runs = "\n".join(run_line(m, results) for m in metas)
    out.with_suffix(".md").write_text(
        "# Retrieval quality (test part, full ranking over all items)\n\n"
        f"{runs}\n\nTrain s = fit time of the chosen configuration (two-tower: all "
        "epochs including the per-epoch validation; ALS/EASE: the configuration chosen "
        "on validation).\n\n"
        f"{table}\n"
    )
    print(table)


def combine(parts: list[Path], out: Path, together: dict[str, float] | None = None) -> None:
    """Merge partial runs' JSON into ``out``; ``together``: the --jobs run that made
    them (processes at once, wall and CPU seconds of the whole)."""
    metas: list[dict[str, object]] = []
    results: dict[str, dict[str, object]] = {}
    for p in parts:
        doc = json.loads(p.read_text())
        metas += doc["runs"]
        results.update(doc["results"])
    if together is not None:
        metas.append(
            {
                "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
                "datasets": list(results),
                "jobs": together["jobs"],
                "total_seconds": together["wall"],
                "cpu_seconds": together["cpu"],
            }
        )
    write(out, metas, results)


if __name__ == "__main__":
    main()
