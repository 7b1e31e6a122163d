"""Index choice by catalogue size (#14): what ``choose_index`` picks, its Recall@100
against exact and the single-query search time of both, per catalogue size.

    python bench/index_choice.py [--sizes 20000 100000] [--dim 64]

Vectors are synthetic but clustered like trained embeddings (256 centres, unit norm);
queries are drawn the same way (200 for tuning; recall is re-measured on 200 others).
The service runs the same function on its bundle's embeddings and user-tower queries.
Writes bench/results/index_choice.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.threads import configure_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    configure_threads(args.threads)
    import faiss
    import numpy as np

    from services.retrieval.index_choice import choose_index, exact_top, recall_at_k
    from services.retrieval.model import IndexConfig, build_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(256, args.dim)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        v = centres[rng.integers(0, 256, m)] + 0.6 * rng.normal(size=(m, args.dim))
        v = v.astype(np.float32)
        return np.ascontiguousarray(v / np.linalg.norm(v, axis=1, keepdims=True))

    rows = []
    for n in args.sizes:
        x, q, held = draw(n), draw(200), draw(200)
        cfg = IndexConfig(exact_max_items=1000)
        t0 = time.perf_counter()
        choice, ann = choose_index(
            x,
            q,
            lambda x=x, cfg=cfg: build_index(x, "ivf", cfg),
            exact_max_items=cfg.exact_max_items,
            start_param=cfg.ivf_nprobe,
            min_recall=cfg.min_recall,
        )
        load_s = time.perf_counter() - t0
        held_recall = 1.0
        if ann is not None:
            _, found = ann.search(held, 100)
            held_recall = recall_at_k(found, exact_top(x, held, 100))
        rows.append(
            {
                "items": n,
                "dim": args.dim,
                **choice.as_dict(),
                "held_out_recall": round(held_recall, 4),
                "choose_seconds": round(load_s, 2),
                "faiss_threads": faiss.omp_get_max_threads(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "index_choice.json").write_text(
        json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=2)
    )
    lines = [
        "| items | chosen | nprobe | Recall@100 (tuning) | Recall@100 (held out) "
        "| ms/query chosen | ms/query exact | choose s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['items']} | {r['index_kind']} | {r['index_param']} | {r['recall']} "
            f"| {r['held_out_recall']} | {r['ms_per_query']} | {r['exact_ms_per_query']} "
            f"| {r['choose_seconds']} |"
        )
    (out / "index_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
