"""The retrieval training pipeline: data -> split -> two-tower -> evaluation against
baselines (popularity, ALS, EASE) -> FAISS index -> serving bundle (with popularity and
basket complements) -> MLflow run (params, per-epoch metrics, table, curve) ->
registered version.

Protocols (``protocol``): ``default`` builds every evaluation query from all history
before the evaluated part (test queries see train + validation); ``recbole`` follows
RecBole for general recommenders: models are fit on train only, queries of every part use
the train history only, and the test ranking excludes train and validation items.

Under torchrun every rank runs this function; only rank 0 logs and registers (see
:mod:`training.distributed`).

``train_and_register(TrainConfig(...))`` is the one call the CLI, the benchmarks and
other engineers' tests use; a tiny config trains in seconds into any MLflow store.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import pandas as pd
from rich.console import Console

from services.common.threads import configure_threads
from services.models.item2item import DIRNAME as ITEM2ITEM_DIR
from services.models.registry import BUNDLE_ARTIFACT_PATH
from services.models.two_tower import FORMAT_VERSION, MODEL_TYPE, TwoTowerBundle
from training import distributed
from training.baselines import BaselineConfig, fit_baseline, interactions, make_model
from training.complements import ComplementsConfig, basket_complements
from training.data import RetailData, Split, k_core, time_split, user_random_split
from training.evaluate import (
    DEFAULT_KS,
    EmbeddingScorer,
    PopularityScorer,
    evaluate,
    format_table,
    results_csv,
    rich_table,
)
from training.features import (
    EvalSet,
    FeatureConfig,
    TrainRows,
    Vocab,
    build_eval_set,
    build_train_rows,
    build_vocab,
)
from training.index import IndexConfig, ann_recall, build_index, index_kind
from training.item2item import Item2ItemConfig, NeighbourScorer, fit_item2item, refit_item2item
from training.replay import ReplayConfig, choose_merge, load_for_replay, replay
from training.synthetic import SyntheticConfig
from training.two_tower import (
    TwoTowerConfig,
    cold_eval_set,
    encode_eval_users,
    refit_two_tower,
    select_two_tower,
)

# Progress and tables go to stderr; logs redirected to a file get full-width tables.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


@dataclass
class TrainConfig:
    """Everything one training run needs; defaults are the demo-sized synthetic run."""

    data: str = "synthetic"  # "synthetic" | "online-retail" | "movielens" | "events"
    path: str = ""  # data file/folder (synthetic: a folder written by write_synthetic, optional)
    min_rating: int = 0  # movielens: ratings below are dropped
    min_user_interactions: int = 0  # k-core filter (0 = none)
    min_item_interactions: int = 0
    protocol: str = "default"  # "default" | "recbole" (see the module docstring)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    split: str = "auto"  # "auto" | "time" | "user-random"
    valid_frac: float = 0.1
    test_frac: float = 0.1
    model: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    complements: ComplementsConfig = field(default_factory=ComplementsConfig)
    item2item: Item2ItemConfig = field(default_factory=Item2ItemConfig)
    replay_served: bool = True  # replay the served list (training/replay.py) on valid/test
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ks: tuple[int, ...] = DEFAULT_KS
    max_eval_users: int = 0  # 0 = every user with future targets
    popularity_size: int = 1000
    seed: int = 0
    threads: int = 1
    tracking_uri: str = ""  # "" = services.common.settings.default_tracking_uri()
    artifact_root: str = ""  # "" = chosen from the tracking URI (see registry)
    experiment: str = "mercato-two-tower"
    model_name: str = "mercato-two-tower"
    alias: str = "challenger"
    register: bool = True
    evaluate_test: bool = True
    # default protocol: every model's configuration chosen on validation is fit again on
    # train + validation (the history the test queries see) before the one test read.
    refit: bool = True
    run_name: str = ""

    def params(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            for k, v in obj.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    flat[f"{prefix}{k}"] = v

        d = asdict(self)
        if self.data != "synthetic":
            d.pop("synthetic")
        walk("", d)
        return flat


@dataclass
class RegisteredResult:
    """What a run produced: where it is logged and registered, and how well it did."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    model_name: str
    version: str | None
    alias: str | None
    bundle_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]  # split -> model -> metric -> value
    split_signature: str
    best_epoch: int
    train_seconds: float
    table: str
    fit_seconds: dict[str, float] = field(default_factory=dict)  # model -> fit time
    # The best fine-tuned epoch against the warm start (TrainHistory.fine_tune).
    fine_tune: dict[str, float] = field(default_factory=dict)
    # The two-tower with every evaluation customer's history masked (a new visitor):
    # split -> recall@K / ndcg@K, beside the ordinary numbers in ``metrics``.
    cold: dict[str, dict[str, float]] = field(default_factory=dict)
    # The warm start's choice (TrainHistory.warm_start: λ, prior alpha, both validation
    # numbers, every pair tried); empty without a warm start.
    warm_start: dict[str, Any] = field(default_factory=dict)
    # Bundles the served-list replays loaded: "valid" (fit on train only, where the merge
    # weights were chosen) and "test" (the served bundle); empty without the replay.
    replay_dirs: dict[str, Path] = field(default_factory=dict)

    def metric(
        self, split: str = "valid", model: str = "two_tower", name: str = "recall@20"
    ) -> float:
        return self.metrics[split][model][name]


def load_data(cfg: TrainConfig) -> RetailData:
    """The data set a config names, after the k-core filter when one is set."""
    data = _load_raw(cfg)
    if cfg.min_user_interactions or cfg.min_item_interactions:
        data = k_core(data, cfg.min_user_interactions, cfg.min_item_interactions)
    return data


def _load_raw(cfg: TrainConfig) -> RetailData:
    if cfg.data == "synthetic":
        from training.synthetic import generate, load_synthetic

        if cfg.path:
            return load_synthetic(cfg.path)
        return generate(cfg.synthetic)
    if cfg.data == "online-retail":
        from training.loaders import load_online_retail

        return load_online_retail(cfg.path)
    if cfg.data == "movielens":
        from training.loaders import load_movielens

        return load_movielens(cfg.path, min_rating=cfg.min_rating, seed=cfg.seed)
    if cfg.data == "events":
        from training.loaders import load_events_export

        return load_events_export(cfg.path)
    raise ValueError(f"unknown data {cfg.data!r}: synthetic | online-retail | movielens | events")


def make_split(data: RetailData, cfg: TrainConfig) -> Split:
    kind = cfg.split
    if kind == "auto":
        kind = "user-random" if (data.events["ts"] == 0).all() else "time"
    if kind == "time":
        return time_split(data, cfg.valid_frac, cfg.test_frac)
    if kind == "user-random":
        return user_random_split(data, cfg.valid_frac, cfg.test_frac, seed=cfg.seed)
    raise ValueError(f"unknown split {cfg.split!r}: auto | time | user-random")


def popularity_counts(
    events: pd.DataFrame, vocab: Vocab, target_events: tuple[str, ...]
) -> np.ndarray:
    """Target events per item in ``events`` (ties broken by any interaction)."""
    tgt = events[events["event"].isin(target_events)]
    c = np.bincount(tgt["item_id"].map(vocab.item_row).to_numpy(np.int64), minlength=vocab.n_items)
    anyc = np.bincount(
        events["item_id"].map(vocab.item_row).to_numpy(np.int64), minlength=vocab.n_items
    )
    return c.astype(np.float64) + 1e-6 * anyc


def _metric_key(name: str) -> str:
    return name.replace("@", "_")


def _eval_sets(
    cfg: TrainConfig, data: RetailData, split: Split, vocab: Vocab
) -> tuple[EvalSet, EvalSet | None, pd.DataFrame, pd.DataFrame]:
    """Validation and test queries, and the history each one's queries are built from."""
    t_valid, t_test = query_times(split)
    valid = build_eval_set(
        "valid",
        split.train,
        split.valid,
        vocab,
        data.target_events,
        cfg.max_eval_users,
        cfg.seed,
        now=t_valid,
    )
    if cfg.protocol == "recbole":
        history_test = split.train
    elif cfg.protocol == "default":
        history_test = pd.concat([split.train, split.valid], ignore_index=True)
    else:
        raise ValueError(f"unknown protocol {cfg.protocol!r}: default | recbole")
    if not cfg.evaluate_test:
        return valid, None, split.train, history_test
    test = build_eval_set(
        "test",
        history_test,
        split.test,
        vocab,
        data.target_events,
        cfg.max_eval_users,
        cfg.seed,
        now=t_valid if cfg.protocol == "recbole" else t_test,
    )
    if cfg.protocol == "recbole":
        # Validation items are excluded from the test ranking (and were never truth).
        seen = interactions(split.valid, vocab, test.users)
        seen.data[:] = 1.0
        exclude = ((test.exclude + seen) > 0).astype(np.float32).tocsr()
        truth = (test.truth - test.truth.multiply(exclude)).tocsr()
        truth.eliminate_zeros()
        keep = np.flatnonzero(np.diff(truth.indptr) > 0)
        test = EvalSet(
            "test",
            test.users[keep],
            test.history[keep],
            test.context[keep],
            truth[keep],
            exclude[keep],
        )
    return valid, test, split.train, history_test


def query_times(split: Split) -> tuple[float, float]:
    """When validation and test queries are asked: the split boundaries of a time split,
    else just after the newest training event."""
    if split.kind == "time":
        return float(split.params["t1"]), float(split.params["t2"])
    last = float(split.train["ts"].max()) + 1 if len(split.train) else 0.0
    return last, last


def train_rows(
    split: Split, vocab: Vocab, cfg: TrainConfig, events: pd.DataFrame | None = None
) -> TrainRows:
    """The two-tower's rows from ``events`` (default the train part): per customer and
    cut-off on a time split (targets within ``horizon_days``, default the validation
    window), per customer otherwise."""
    ev = split.train if events is None else events
    if split.kind == "time":
        horizon = cfg.model.horizon_days * 86_400 or float(split.params["t2"] - split.params["t1"])
        return build_train_rows(ev, vocab, "time", horizon)
    return build_train_rows(ev, vocab, "random")


def refits(cfg: TrainConfig) -> bool:
    """Whether models are fit again on train + validation before the test read: under
    the default protocol, whose test queries see that history (RecBole's protocol fits
    on train only)."""
    return cfg.refit and cfg.protocol == "default" and cfg.evaluate_test


def training_curve_png(history: list[dict[str, float]], path: Path, title: str) -> bool:
    """Train loss and validation metric per epoch as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not history:
        return False
    epochs = [r["epoch"] for r in history]
    metric = next((k for k in history[0] if k.startswith("epoch_valid_")), "")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [r["train_loss"] for r in history], "o-", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    if metric:
        ax2 = ax.twinx()
        ax2.plot(epochs, [r[metric] for r in history], "s-", color="tab:orange")
        ax2.set_ylabel(metric.replace("epoch_", "").replace("_", " ", 1), color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def train_and_register(cfg: TrainConfig) -> RegisteredResult:
    """Run the whole pipeline; see the module docstring. Returns a RegisteredResult
    (on ranks other than 0 of a distributed run: one without MLflow ids)."""
    configure_threads(cfg.threads)
    import torch

    rank, world = distributed.init_from_env()
    torch.manual_seed(cfg.seed)
    from training import registry

    main = rank == 0
    log = (lambda msg: console.print(msg)) if (main and cfg.model.progress) else None
    t_start = time.perf_counter()
    data = load_data(cfg)
    split = make_split(data, cfg)
    if log:
        log(f"data {data.summary()} split {split.kind} {split.summary()}")
    vocab = build_vocab(data, cfg.features)
    rows = train_rows(split, vocab, cfg)
    if rows.n_rows == 0:
        raise ValueError("no training rows: the train split is empty")
    valid, test, history_valid, history_test = _eval_sets(cfg, data, split, vocab)
    prep_seconds = time.perf_counter() - t_start

    if not main:
        net, items, hist, chosen = select_two_tower(vocab, rows, valid, cfg.model)
        if refits(cfg):
            rows_tv = train_rows(split, vocab, cfg, history_test)
            net, items, _ = refit_two_tower(vocab, rows_tv, chosen, hist)
        distributed.barrier()
        return RegisteredResult(
            run_id="",
            experiment_id="",
            tracking_uri="",
            model_name=cfg.model_name,
            version=None,
            alias=None,
            bundle_dir=Path(),
            metrics={},
            split_signature=split.signature(),
            best_epoch=hist.best_epoch,
            train_seconds=hist.seconds,
            table="",
        )

    client, tracking_uri = registry.client_for(cfg.tracking_uri or None)
    exp_id = registry.ensure_experiment(
        client, cfg.experiment, tracking_uri, cfg.artifact_root or None
    )
    run = client.create_run(
        exp_id,
        run_name=cfg.run_name or None,
        tags={
            "model_family": "two-tower",
            "dataset": data.name,
            "split": split.kind,
            "protocol": cfg.protocol,
            "split_signature": split.signature(),
            "data_fingerprint": split.data_fingerprint,
            "host.python": platform.python_version(),
            "world_size": str(world),
        },
    )
    run_id = run.info.run_id
    status = "FAILED"
    try:
        from mlflow.entities import Metric, Param

        params = cfg.params()
        params.update({f"data.{k}": v for k, v in data.summary().items()})
        params.update({f"split.{k}": v for k, v in {**split.params, **split.summary()}.items()})
        params.update(
            {
                "train_rows": rows.n_rows,
                "train_customers": len(rows.users),
                "valid_users": len(valid),
                "test_users": len(test) if test is not None else 0,
                "world_size": world,
            }
        )
        plist = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for a in range(0, len(plist), 100):
            client.log_batch(run_id, params=plist[a : a + 100])

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            ts = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), ts, epoch) for k, v in row.items() if k != "epoch"],
            )

        net, items, hist, chosen = select_two_tower(
            vocab, rows, valid, cfg.model, on_epoch=on_epoch
        )
        refit = refits(cfg)
        refit_seconds: dict[str, float] = {}
        nets = {"valid": (net, items)}
        if refit:
            t0 = time.perf_counter()
            rows_tv = train_rows(split, vocab, cfg, history_test)
            nets["test"] = refit_two_tower(vocab, rows_tv, chosen, hist)[:2]
            refit_seconds["two_tower"] = time.perf_counter() - t0
            if log:
                log(
                    f"two-tower refit on train + validation ({hist.best_epoch} epochs): "
                    f"{refit_seconds['two_tower']:.1f}s"
                )
        else:
            nets["test"] = nets["valid"]
        distributed.barrier()
        # What is served: the model the test part evaluates (refit when refitting).
        net, items = nets["test"]
        item_emb = items.all_embeddings(net)
        pop = popularity_counts(history_test if refit else split.train, vocab, data.target_events)
        fit_seconds: dict[str, float] = {"two_tower": hist.seconds, "popularity": 0.0}
        results: dict[str, dict[str, dict[str, float]]] = {}
        cold: dict[str, dict[str, float]] = {}
        eval_sets = [("valid", valid, history_valid)]
        if test is not None:
            eval_sets.append(("test", test, history_test))
        for name, es, hist_events in eval_sets:
            pop_s = popularity_counts(hist_events, vocab, data.target_events)
            n_, it_ = nets[name]
            results[name] = {
                "two_tower": evaluate(
                    EmbeddingScorer(encode_eval_users(n_, es), it_.all_embeddings(n_)),
                    es,
                    cfg.ks,
                ),
                "popularity": evaluate(PopularityScorer(pop_s), es, cfg.ks),
            }
            ces = cold_eval_set(es)
            cold[name] = {
                k: v
                for k, v in evaluate(
                    EmbeddingScorer(encode_eval_users(n_, ces), it_.all_embeddings(n_)),
                    ces,
                    cfg.ks,
                ).items()
                if k.startswith(("recall@", "ndcg@"))
            }
        # Baselines: fit on train, hyper-parameters chosen on validation.
        baseline_info: dict[str, Any] = {}
        train_x = interactions(split.train, vocab)
        hv = interactions(history_valid, vocab, valid.users)
        ease_b: tuple[np.ndarray, float] | None = None
        ease_b_test: tuple[np.ndarray, float] | None = None
        if cfg.baselines.models:
            for bname in cfg.baselines.models:
                fb = fit_baseline(
                    bname,
                    train_x,
                    valid,
                    hv,
                    cfg.baselines,
                    f"recall@{cfg.model.early_stop_k}",
                    log,
                )
                fit_seconds[bname] = fb.fit_seconds
                baseline_info[bname] = {"chosen": fb.params, "tried": fb.tried}
                fitted = {"valid": fb.model, "test": fb.model}
                if refit:
                    t0 = time.perf_counter()
                    fitted["test"] = make_model(bname, fb.params, cfg.baselines.seed).fit(
                        interactions(history_test, vocab)
                    )
                    refit_seconds[bname] = time.perf_counter() - t0
                for name, es, hist_events in eval_sets:
                    h = hv if name == "valid" else interactions(hist_events, vocab, es.users)
                    results[name][bname] = evaluate(fitted[name].scorer(h), es, cfg.ks)
                if bname == "ease":
                    # The EASE weights item-to-item may reuse: fit on train (chosen on
                    # validation) and, when refitting, on train + validation (served).
                    lam = float(fb.params["lam"])
                    b_valid = getattr(fitted["valid"], "B", None)
                    b_test = getattr(fitted["test"], "B", None)
                    ease_b = (b_valid, lam) if b_valid is not None else None
                    ease_b_test = (b_test, lam) if b_test is not None else None
        # Item-to-item neighbours (the second candidate source), chosen on validation;
        # refit on train + validation like every other model when refitting.
        i2i = fit_item2item(
            train_x,
            vocab.item_ids,
            valid,
            hv,
            cfg.item2item,
            f"recall@{cfg.model.early_stop_k}",
            ease_b,
            log,
        )
        fit_seconds["item2item"] = i2i.fit_seconds
        baseline_info["item2item"] = {"chosen": i2i.model.config, "tried": i2i.tried}
        i2i_models = {"valid": i2i.model, "test": i2i.model}
        if refit:
            t0 = time.perf_counter()
            i2i_models["test"] = refit_item2item(
                interactions(history_test, vocab), vocab.item_ids, i2i.model.config, ease_b_test
            )
            refit_seconds["item2item"] = time.perf_counter() - t0
        for name, es, hist_events in eval_sets:
            h = hv if name == "valid" else interactions(hist_events, vocab, es.users)
            results[name]["item2item"] = evaluate(NeighbourScorer(i2i_models[name], h), es, cfg.ks)
        for models in results.values():
            for model, m in models.items():
                m["train_seconds"] = fit_seconds.get(model, 0.0)
        # Index and its recall against exact search, on validation users as queries.
        index = build_index(item_emb, cfg.index)
        q = encode_eval_users(net, valid.take(np.arange(min(len(valid), cfg.index.recall_queries))))
        if len(q) == 0:
            q = item_emb[: cfg.index.recall_queries]
        recall = ann_recall(index, item_emb, q, cfg.index.recall_k)
        final: list[Metric] = []
        ts = int(time.time() * 1000)
        for split_name, models in results.items():
            for model, m in models.items():
                prefix = split_name if model == "two_tower" else f"{split_name}_{model}"
                final += [
                    Metric(f"{prefix}_{_metric_key(k)}", float(v), ts, 0) for k, v in m.items()
                ]
        for split_name, m in cold.items():
            final += [
                Metric(f"{split_name}_cold_{_metric_key(k)}", float(v), ts, 0) for k, v in m.items()
            ]
        ws_info = hist.warm_start
        if ws_info:
            # The warm start's choice (λ, prior alpha) and its two validation numbers.
            at = f"recall@{cfg.model.early_stop_k}"
            client.log_batch(
                run_id,
                params=[
                    Param("warm_start.lambda", str(ws_info["lambda"])),
                    Param("warm_start.prior_alpha", str(ws_info["prior_alpha"])),
                ],
            )
            final += [
                Metric(f"warm_valid_{_metric_key(at)}", float(ws_info[f"valid_{at}"]), ts, 0),
                Metric(
                    f"warm_valid_cold_{_metric_key(at)}",
                    float(ws_info[f"valid_cold_{at}"]),
                    ts,
                    0,
                ),
            ]
        final += [
            Metric("index_ann_recall", recall, ts, 0),
            Metric("best_epoch", float(hist.best_epoch), ts, 0),
            Metric("train_seconds", hist.seconds, ts, 0),
            Metric("prep_seconds", prep_seconds, ts, 0),
        ]
        for a in range(0, len(final), 200):
            client.log_batch(run_id, metrics=final[a : a + 200])

        def popularity_list(counts: np.ndarray) -> list[tuple[str, float]]:
            order = np.argsort(-counts, kind="stable")[: cfg.popularity_size]
            total = float(counts.sum()) or 1.0
            return [(vocab.item_ids[r], float(counts[r] / total)) for r in order if counts[r] >= 1]

        complements = basket_complements(split.train, data.target_events, cfg.complements)
        tables = {s: format_table(m, cfg.ks) for s, m in results.items()}
        table = "\n\n".join(f"### {s}\n\n{t}" for s, t in tables.items())
        if cfg.model.progress:
            for s_name, per_model in results.items():
                title = f"{data.name} {split.kind}: {s_name}"
                console.print(rich_table(per_model, cfg.ks, title=title))
        report = {
            "metrics": results,
            "split": {"kind": split.kind, "signature": split.signature(), **split.params},
            "protocol": cfg.protocol,
            "dataset": data.summary(),
            "history": hist.epochs,
            "best_epoch": hist.best_epoch,
            "baselines": baseline_info,
            "two_tower": {
                "chosen": {
                    "weight_decay": chosen.weight_decay,
                    "input_dropout": chosen.input_dropout,
                },
                "tried": hist.tried,
                "warm_start": hist.warm_start,
                "fine_tune": hist.fine_tune,
                "cold": cold,
            },
            "fit_seconds": fit_seconds,
            "refit": {"train_plus_valid": refit, "seconds": refit_seconds},
            "complements": {"items": len(complements)},
            "index": {"kind": index_kind(index), "ann_recall": recall, "k": cfg.index.recall_k},
        }
        config = {
            "format_version": FORMAT_VERSION,
            "model_type": MODEL_TYPE,
            "metric": "ip",
            "dim": cfg.model.dim + 1,
            "model_dim": cfg.model.dim,
            "n_items": vocab.n_items,
            "n_items_trained": int(items.known.sum()),
            "features": vocab.feature_dict(),
            "loss": cfg.model.loss,
            "weight_decay": chosen.weight_decay,
            "input_dropout": chosen.input_dropout,
            "init": "ease" if hist.warm_start else "random",
            "best_epoch": hist.best_epoch,
            "index": report["index"],
            "dataset": data.name,
            "split_signature": split.signature(),
            "run_id": run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

        def make_bundle(
            net_: Any, emb: np.ndarray, index_: Any, counts: np.ndarray, rep: dict[str, Any]
        ) -> TwoTowerBundle:
            return TwoTowerBundle(
                config=config,
                vocab=vocab.as_json(),
                item_ids=vocab.item_ids,
                item_category=[vocab.categories[c] for c in vocab.item_category],
                item_price=vocab.item_price,
                item_embeddings=emb,
                net=net_,
                index=index_,
                popularity=popularity_list(counts),
                complements=complements,
                eval_report=rep,
            )

        bundle = make_bundle(net, item_emb, index, pop, report)
        out = Path(tempfile.mkdtemp(prefix="mercato-bundle-"))
        bundle_dir = out / BUNDLE_ARTIFACT_PATH
        bundle.save(bundle_dir)
        i2i_models["test"].save(bundle_dir / ITEM2ITEM_DIR)
        replay_dirs: dict[str, Path] = {}
        if cfg.replay_served:
            # The served list: a bundle loaded as the retrieval service loads it, each
            # query through Retrieve (both sources, merge) and Rank (rules), scored alike.
            # Validation replays what was fit on train only (the merge weights are chosen
            # there); the test part replays the bundle that is served (refit on train +
            # validation when refitting), with the weights chosen on validation.
            replay_dirs.update(test=bundle_dir)
            if refit:
                valid_net, valid_items = nets["valid"]
                valid_emb = valid_items.all_embeddings(valid_net)
                valid_bundle = make_bundle(
                    valid_net,
                    valid_emb,
                    build_index(valid_emb, cfg.index),
                    popularity_counts(split.train, vocab, data.target_events),
                    {},
                )
                replay_dirs["valid"] = out / "replay-valid" / BUNDLE_ARTIFACT_PATH
                valid_bundle.save(replay_dirs["valid"])
            else:
                replay_dirs["valid"] = bundle_dir
            i2i_models["valid"].save(replay_dirs["valid"] / ITEM2ITEM_DIR)
            merge, merge_tried, chosen_replay = choose_merge(
                load_for_replay(replay_dirs["valid"], run_id),
                valid,
                vocab,
                cfg.replay,
                f"recall@{cfg.model.early_stop_k}",
                log,
                cfg.ks,
            )
            report["served"] = {"chosen": asdict(merge), "tried": merge_tried}
            # The weights ship with the bundle: the service fuses as validated here.
            for name in ("valid", "test"):
                i2i_models[name].config["merge"] = asdict(merge)
                i2i_models[name].save(replay_dirs[name] / ITEM2ITEM_DIR)
            served: list[Metric] = []
            for name, es, _ in eval_sets:
                if name == "valid" and chosen_replay is not None and cfg.replay.merge is None:
                    # The bundle now fuses with the chosen weights: its validation
                    # replay is the grid's replay of those weights on the same bundle.
                    played = chosen_replay
                else:
                    served_model = load_for_replay(replay_dirs[name], run_id)
                    played = replay(served_model, es, vocab, cfg.replay, cfg.ks, progress=log)
                results[name]["served"] = {**played.metrics, "train_seconds": 0.0}
                fit_seconds[f"served_{name}_replay"] = played.seconds
                if log:
                    secs = played.seconds
                    log(f"served list replayed on {name}: {len(es)} customers, {secs:.0f}s")
                ts = int(time.time() * 1000)
                served += [
                    Metric(f"{name}_served_{_metric_key(k)}", float(v), ts, 0)
                    for k, v in played.metrics.items()
                ]
            client.log_batch(run_id, metrics=served)
            tables = {s: format_table(m, cfg.ks) for s, m in results.items()}
            table = "\n\n".join(f"### {s}\n\n{t}" for s, t in tables.items())
        client.log_artifacts(run_id, str(bundle_dir), BUNDLE_ARTIFACT_PATH)
        eval_dir = out / "eval"
        eval_dir.mkdir()
        (eval_dir / "table.md").write_text(table + "\n")
        (eval_dir / "table.csv").write_text(results_csv(results))
        (eval_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        training_curve_png(
            hist.epochs, eval_dir / "training_curve.png", f"two-tower on {data.name}"
        )
        client.log_artifacts(run_id, str(eval_dir), "eval")

        version = None
        if cfg.register:
            gate_value = results["valid"]["two_tower"][f"recall@{cfg.model.early_stop_k}"]
            gate = f"valid_{_metric_key(f'recall@{cfg.model.early_stop_k}')}"
            mv = registry.register_bundle(
                client,
                run_id,
                cfg.model_name,
                cfg.alias or None,
                tags={
                    "split_signature": split.signature(),
                    "dataset": data.name,
                    gate: f"{gate_value:.6f}",
                },
            )
            version = str(mv.version)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return RegisteredResult(
        run_id=run_id,
        experiment_id=exp_id,
        tracking_uri=tracking_uri,
        model_name=cfg.model_name,
        version=version,
        alias=cfg.alias if (cfg.register and cfg.alias) else None,
        bundle_dir=bundle_dir,
        metrics=results,
        split_signature=split.signature(),
        best_epoch=hist.best_epoch,
        train_seconds=hist.seconds,
        table=table,
        fit_seconds=fit_seconds,
        fine_tune=hist.fine_tune,
        cold=cold,
        warm_start=hist.warm_start,
        replay_dirs=replay_dirs,
    )
