"""The demo's own shop (``mercato demo``: 6,000 customers, 3,000 items, 30 categories,
120 days) on other data seeds: two-tower vs ALS vs EASE, each seed one run of the
training pipeline with the demo's configuration (``TrainConfig`` defaults, refit on
train + validation, served-list replay off), test part read once per seed
(``make bench-demo-seeds``).

Seed 0 is the demo's own data; the dev seeds (default 1-6) are where anything about the
demo's training is developed and diagnosed, so that nothing is tuned on the demo's test
part. Writes ``bench/results/demo_seeds.{json,md}``: per seed the validation and test
Recall@10 / @20 of each model, the two-tower's best epoch and its lead over the warm
start, and the mean over seeds with the number of seeds the two-tower wins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.threads import configure_threads  # noqa: E402

configure_threads(int(os.environ.get("BENCH_THREADS", "1")))

from mercato.demo import demo_synthetic  # noqa: E402
from training.pipeline import TrainConfig, train_and_register  # noqa: E402
from training.two_tower import TwoTowerConfig  # noqa: E402

MODELS = ("two_tower", "als", "ease")
METRICS = ("recall@10", "recall@20")


def run_seed(
    seed: int,
    store: Path,
    fine_tune_min_se: float | None,
    average: str | None = None,
    prior_alphas: tuple[float, ...] | None = None,
) -> dict[str, object]:
    model = replace(TwoTowerConfig(), progress=False)
    if prior_alphas is not None:
        model = replace(model, prior_alphas=prior_alphas)
    if fine_tune_min_se is not None:
        model = replace(model, fine_tune_min_se=fine_tune_min_se)
    if average is not None:
        model = replace(model, average=average)
    cfg = TrainConfig(
        data="synthetic",
        synthetic=demo_synthetic(seed),
        model=model,
        register=False,
        replay_served=False,
        tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
        run_name=f"demo-seed-{seed}",
    )
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_and_register(cfg)
    return {
        "seed": seed,
        "valid": {m: {k: res.metrics["valid"][m][k] for k in METRICS} for m in MODELS},
        "test": {m: {k: res.metrics["test"][m][k] for k in METRICS} for m in MODELS},
        "best_epoch": res.best_epoch,
        "fine_tune": res.fine_tune,
        # The two-tower with the history of every evaluation customer masked (new
        # visitors), and the warm start's popularity prior (alpha) chosen on validation.
        "cold": res.cold,
        "prior_alpha": res.warm_start.get("prior_alpha"),
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def summary(runs: list[dict[str, object]], part: str, metric: str) -> dict[str, float]:
    """Mean of each model over the seeds, and in how many seeds the two-tower leads."""
    vals = {m: [r[part][m][metric] for r in runs] for m in MODELS}  # type: ignore[index]
    n = len(runs)
    out = {m: sum(v) / n for m, v in vals.items()}
    for m in ("als", "ease"):
        out[f"wins_vs_{m}"] = float(
            sum(a > b for a, b in zip(vals["two_tower"], vals[m], strict=True))
        )
    return out


def markdown(doc: dict[str, object]) -> str:
    runs = doc["runs"]
    assert isinstance(runs, list)
    head = "| seed | part | " + " | ".join(f"{m} R@10 | {m} R@20" for m in MODELS)
    lines = [head + " | best epoch |", "|---" * (2 * len(MODELS) + 3) + "|"]
    for r in runs:
        for part in ("valid", "test"):
            cells = " | ".join(f"{r[part][m][k]:.4f}" for m in MODELS for k in METRICS)
            lines.append(f"| {r['seed']} | {part} | {cells} | {r['best_epoch']} |")
    for part in ("valid", "test"):
        s10, s20 = (summary(runs, part, k) for k in METRICS)
        cells = " | ".join(f"{s[m]:.4f}" for m in MODELS for s in (s10, s20))
        wins = f"wins vs ALS {s10['wins_vs_als']:.0f}/{len(runs)} (R@10)"
        lines.append(f"| mean | {part} | {cells} | {wins} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3,4,5,6", help="data seeds (0 = the demo's own)")
    ap.add_argument(
        "--fine-tune-min-se",
        type=float,
        default=None,
        help="override TwoTowerConfig.fine_tune_min_se (0 = plain best epoch)",
    )
    ap.add_argument("--average", default=None, help="override TwoTowerConfig.average (none | warm)")
    ap.add_argument(
        "--prior-alphas",
        default=None,
        help="override TwoTowerConfig.prior_alphas (comma list; '' = no popularity prior)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo_seeds"))
    args = ap.parse_args()
    alphas = (
        None
        if args.prior_alphas is None
        else tuple(float(a) for a in args.prior_alphas.split(",") if a.strip())
    )
    store = Path(tempfile.mkdtemp(prefix="mercato-bench-demo-seeds-"))
    runs: list[dict[str, object]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        print(f"== seed {seed}", flush=True)
        runs.append(run_seed(seed, store, args.fine_tune_min_se, args.average, alphas))
        print(f"== seed {seed} done in {runs[-1]['wall_seconds']:.0f}s", flush=True)
    doc: dict[str, object] = {
        "command": "python bench/demo_seeds.py " + " ".join(sys.argv[1:]),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    table = markdown(doc)
    out.with_suffix(".md").write_text(
        "# The demo's shop on other data seeds (Recall, full ranking)\n\n"
        f"`{doc['command']}`\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
