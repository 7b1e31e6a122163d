"""Data-parallel training: 2 processes on CPU (gloo) end with identical weights."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.procs import free_port
from training.synthetic import SyntheticConfig

pytestmark = pytest.mark.slow  # torchrun with two processes

TINY = SyntheticConfig(n_users=300, n_items=120, n_categories=8, days=30, seed=5)


def _worker(rank: int, world: int, port: int, out: str, warm: bool = False) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from services.common.threads import configure_threads

    configure_threads(1)
    import pandas as pd

    from training import distributed
    from training.data import time_split
    from training.features import build_eval_set, build_train_rows, build_vocab
    from training.synthetic import generate
    from training.two_tower import TwoTowerConfig, refit_two_tower, train_two_tower, warm_start

    assert distributed.init_from_env() == (rank, world)
    data = generate(TINY)
    split = time_split(data)
    vocab = build_vocab(data)
    rows = build_train_rows(split.train, vocab, "time")
    valid = build_eval_set(
        "valid", split.train, split.valid, vocab, data.target_events, now=split.params["t1"]
    )
    cfg = replace(TwoTowerConfig(), dim=8, epochs=2, batch_size=64, patience=5, progress=False)
    if not warm:
        net, _, hist = train_two_tower(vocab, rows, valid, cfg)
        torch.save(
            {"state": net.state_dict(), "best_epoch": hist.best_epoch, "epochs": hist.epochs},
            Path(out) / f"rank{rank}.pt",
        )
    else:  # the warm start, then a refit of 2 epochs (no evaluation) on train + valid
        ws = warm_start(vocab, rows, valid, replace(cfg, ease_lambdas=(20.0,)))
        net, _, hist = train_two_tower(vocab, rows, valid, cfg, warm=ws)
        hist.warm_start = {"lambda": 20.0}
        hist.best_epoch = 2
        both = build_train_rows(pd.concat([split.train, split.valid]), vocab, "time")
        refit, _, h2 = refit_two_tower(vocab, both, cfg, hist)
        torch.save(
            {"state": net.state_dict(), "refit": refit.state_dict(), "epochs": h2.epochs},
            Path(out) / f"rank{rank}.pt",
        )
    distributed.shutdown()


def test_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["best_epoch"] == r1["best_epoch"] >= 1
    # Rank 0 evaluated and shared its validation metric; each rank saw its own half.
    assert [e["epoch_valid_recall_20"] for e in r0["epochs"]] == [
        e["epoch_valid_recall_20"] for e in r1["epochs"]
    ]
    assert r0["epochs"][0]["train_loss"] != r1["epochs"][0]["train_loss"]
    assert np.isfinite(r0["epochs"][-1]["train_loss"])


def test_two_processes_warm_start_and_refit_stay_identical(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), True), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for part in ("state", "refit"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    # The refit trained its two epochs, each rank on its half of every batch.
    assert [e["epoch"] for e in r0["epochs"]] == [1.0, 2.0]
    assert r0["epochs"][0]["train_loss"] != r1["epochs"][0]["train_loss"]
