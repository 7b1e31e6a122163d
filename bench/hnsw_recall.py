"""HNSW recall on bias-augmented two-tower vectors: inner-product HNSW against the
MIPS-to-L2 reduction (``training.index``), same graph parameters, same queries.

Vectors: a bundle's ``item_embeddings.npy`` (``--bundle DIR``) with user vectors of
random history sums, or (default) generated ones shaped like them: ``[v, b]`` with
log-normal norms and a spread bias, queries ``[u, 1]``. Writes
``bench/results/hnsw_recall.{json,md}`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.index import IndexConfig, ann_recall, build_index  # noqa: E402


def vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if args.bundle:
        x = np.load(Path(args.bundle) / "item_embeddings.npy")
        d = x.shape[1] - 1
        q = np.hstack(
            [rng.normal(size=(args.queries, d)) * x[:, :-1].std(), np.ones((args.queries, 1))]
        )
        return x.astype(np.float32), q.astype(np.float32)
    n, d = args.items, 32
    scale = rng.lognormal(0, 0.5, size=(n, 1)) * 0.3
    x = np.hstack([rng.normal(size=(n, d)) * scale, rng.normal(size=(n, 1)) * 2])
    q = np.hstack([rng.normal(size=(args.queries, d)), np.ones((args.queries, 1))])
    return x.astype(np.float32), q.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="")
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hnsw_recall"))
    args = ap.parse_args()
    x, q = vectors(args)
    rows = []
    for aug in (False, True):
        cfg = IndexConfig(exact_max_items=0, l2_augment=aug)
        t0 = time.perf_counter()
        index = build_index(x, cfg)
        built = time.perf_counter() - t0
        t1 = time.perf_counter()
        r = ann_recall(index, x, q, args.k)
        rows.append(
            {
                "index": "HNSW, L2-augmented" if aug else "HNSW, inner product",
                f"recall@{args.k}": r,
                "build_s": built,
                "recall_s": time.perf_counter() - t1,
                "items": len(x),
                "ef_search": cfg.ef_search,
                "m": cfg.hnsw_m,
            }
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = [f"| index | recall@{args.k} | build s |", "|---|---|---|"]
    lines += [f"| {r['index']} | {r[f'recall@{args.k}']:.3f} | {r['build_s']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
