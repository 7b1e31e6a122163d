"""The ranker with and without some of its inputs, on validation only (#13, session 23).

One retrieval pipeline per data set (bench/quality.py's configuration, trained once, as
the ranker's default ``two_tower="train"`` trains it), then one ranker per variant on the
same candidates: with or without the in-session cart lists, the cart features, the time
features, early stopping on the ordinary lists only or pooled with the cart lists.
Prints and writes, per variant, the held-out customers' NDCG@10 on the ordinary lists,
on the in-session cart lists and of the replayed served list (the promotion gate's
number). Test numbers are not read.

    nice -n 5 python bench/ranker_variants.py --dataset synthetic --out /tmp/rv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from services.common.threads import configure_threads  # noqa: E402

configure_threads(1)

from quality import configs  # noqa: E402

import training.ranker as tr  # noqa: E402
from services.models.ranker import CART_FEATURES, FEATURES, TIME_FEATURES  # noqa: E402


def _without(*groups: tuple[str, ...]) -> tuple[str, ...]:
    drop = {f for g in groups for f in g}
    return tuple(f for f in FEATURES if f not in drop)


VARIANTS: dict[str, dict[str, Any]] = {
    "no cart lists, no cart / time features (session 22)": dict(
        cart_lists=False, features=_without(CART_FEATURES, TIME_FEATURES)
    ),
    "cart lists, no cart / time features, pooled stopping": dict(
        cart_lists=True, features=_without(CART_FEATURES, TIME_FEATURES), stop_lists="pooled"
    ),
    "cart lists + cart features, pooled stopping": dict(
        cart_lists=True, features=_without(TIME_FEATURES), stop_lists="pooled"
    ),
    "cart lists + cart + time features, pooled stopping": dict(
        cart_lists=True, features=(), stop_lists="pooled"
    ),
    "cart lists + time features, pooled stopping": dict(
        cart_lists=True, features=_without(CART_FEATURES), stop_lists="pooled"
    ),
    "cart lists, no cart / time features, ordinary stopping": dict(
        cart_lists=True, features=_without(CART_FEATURES, TIME_FEATURES), stop_lists="ordinary"
    ),
    "cart lists + time features, ordinary stopping": dict(
        cart_lists=True, features=_without(CART_FEATURES), stop_lists="ordinary"
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="synthetic", help="a bench/quality.py data set")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--variants", default="", help="indices into VARIANTS, e.g. 0,2 (all)")
    ap.add_argument("--max-users", type=int, default=3000)
    ap.add_argument("--out", default="/tmp/ranker_variants")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = configs(Path(args.data_dir), "full", 60)[args.dataset]
    uri = f"sqlite:///{out / f'{args.dataset}.db'}"
    cfg = replace(cfg, tracking_uri=uri)
    # One retrieval pipeline for every variant: the first call's models are reused.
    first = tr._retrieval_models
    memo: dict[str, Any] = {}

    def once(*a: Any, **k: Any) -> Any:
        if "models" not in memo:
            memo["models"] = first(*a, **k)
        return memo["models"]

    tr._retrieval_models = once
    chosen = [int(v) for v in args.variants.split(",") if v] or range(len(VARIANTS))
    rows: dict[str, dict[str, Any]] = {}
    for k in chosen:
        name, kw = list(VARIANTS.items())[k]
        t0 = time.time()
        rk = tr.train_and_register_ranker(
            tr.RankerConfig(
                retrieval=cfg,
                tracking_uri=uri,
                register=False,
                progress=False,
                max_users=args.max_users,
                run_name=f"variants-{args.dataset}-{k}",
                **kw,
            )
        )
        m, served = rk.metrics, rk.served["valid"]
        cart = m.get("valid_cart", {})
        rows[name] = {
            "valid_ndcg10": m["valid"]["ranker"]["ndcg@10"],
            "valid_fused_ndcg10": m["valid"]["retrieval"]["ndcg@10"],
            "valid_cart_ndcg10": cart.get("ranker", {}).get("ndcg@10"),
            "valid_cart_fused_ndcg10": cart.get("retrieval", {}).get("ndcg@10"),
            "valid_cart_users": cart.get("ranker", {}).get("users"),
            "valid_served_ndcg10": served["ranker"]["ndcg@10"],
            "valid_served_rules_ndcg10": served["rules"]["ndcg@10"],
            "best_epoch": rk.best_epoch,
            "seconds": time.time() - t0,
        }
        print(args.dataset, name, json.dumps(rows[name]), flush=True)
    (out / f"{args.dataset}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
