"""``mercato train ...`` and ``mercato promote``: registered in ``mercato.cli``."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import typer
from rich.console import Console

train_app = typer.Typer(
    help="Train models, evaluate them against baselines, register them.", no_args_is_help=True
)
console = Console()


def _data_options(
    data: str,
    path: str,
    split: str,
    protocol: str,
    min_rating: int,
    k_core: int,
    users: int,
    items: int,
    days: int,
    seed: int,
) -> dict[str, Any]:
    """The TrainConfig fields that name the data and the split (train and evaluate)."""
    from training.synthetic import SyntheticConfig

    if data != "synthetic" and not path:
        raise typer.BadParameter(f"--path is required for --data {data}")
    return {
        "data": data,
        "path": path,
        "split": split,
        "protocol": protocol,
        "min_rating": min_rating,
        "min_user_interactions": k_core,
        "min_item_interactions": k_core,
        "synthetic": replace(SyntheticConfig(), n_users=users, n_items=items, days=days, seed=seed),
    }


@train_app.command("retrieval")
def train_retrieval(
    data: str = typer.Option(
        "synthetic", help="synthetic | online-retail | movielens | events (export-events file)"
    ),
    path: str = typer.Option("", help="Data file or folder (required for real data sets)."),
    split: str = typer.Option("auto", help="auto | time | user-random"),
    protocol: str = typer.Option(
        "default", help="default | recbole (test queries from train history only)"
    ),
    min_rating: int = typer.Option(0, help="MovieLens: drop ratings below this."),
    k_core: int = typer.Option(0, help="Keep users and items with >= this many events."),
    baselines: str = typer.Option("als,ease", help="Baselines besides popularity ('' = none)."),
    users: int = typer.Option(10_000, help="Synthetic: customers."),
    items: int = typer.Option(5_000, help="Synthetic: catalog size."),
    days: int = typer.Option(120, help="Synthetic: days of history."),
    loss: str = typer.Option(
        "full", help="full (softmax over the catalog) | sampled (logQ-corrected, huge catalogs)"
    ),
    dim: int = typer.Option(64),
    epochs: int = typer.Option(60, help="At most; early stopping on validation ends training."),
    batch_size: int = typer.Option(256, help="Customers per step."),
    lr: float = typer.Option(5e-3),
    weight_decay: str = typer.Option(
        "0", help="Comma-separated weight decays to try (chosen on validation)."
    ),
    input_dropout: str = typer.Option(
        "0.2", help="Comma-separated history dropouts to try (chosen on validation)."
    ),
    patience: int = typer.Option(5, help="Epochs without validation gain before stopping."),
    init: str = typer.Option(
        "ease",
        help="ease (start from a rank-dim EASE, catalogs up to 20k items; the start itself "
        "is epoch 0 of early stopping) | random",
    ),
    ease_lambdas: str = typer.Option(
        "250,500", help="Comma-separated EASE λ of the warm start (chosen on validation)."
    ),
    fine_tune_min_se: float = typer.Option(
        0.0,
        help="A fine-tuned epoch replaces the warm start only when it leads on validation "
        "by more than this many standard errors of the paired per-customer difference "
        "(0 = the best epoch, however small its lead).",
    ),
    average: str = typer.Option(
        "warm",
        help="warm: each fine-tuned epoch's weights are averaged with the warm start's "
        "(selected on validation and refit that way) | none: the epoch's own weights.",
    ),
    prior_alphas: str = typer.Option(
        "0.0001,0.001,0.01,0.03,0.1,0.3,1",
        help="Comma-separated alphas of the warm start's popularity prior (item bias "
        "alpha x log1p(training customers)), chosen on validation with λ; '' = off (a "
        "customer without history then scores every item the same).",
    ),
    refit: bool = typer.Option(
        True,
        help="Default protocol: fit the chosen configurations again on train + validation "
        "before the test read (the registered model is that refit).",
    ),
    exact_max_items: int = typer.Option(
        200_000, help="Exact FAISS index up to this size, HNSW above."
    ),
    max_eval_users: int = typer.Option(0, help="Cap on evaluation users (0 = all)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch / BLAS / FAISS threads."),
    tracking_uri: str = typer.Option("", help="MLflow tracking URI (default: local SQLite)."),
    model_name: str = typer.Option("mercato-two-tower"),
    alias: str = typer.Option("challenger", help="Alias the new version gets ('' = none)."),
    register: bool = typer.Option(True, help="Register the bundle as a model version."),
    progress: bool = typer.Option(True, help="Progress bars per epoch."),
) -> None:
    """Train the two-tower retrieval model, evaluate it against popularity, ALS and EASE
    on the same split, log everything to MLflow and register the serving bundle.

    Data-parallel: ``torchrun --nproc_per_node 2 -m mercato.cli train retrieval ...``."""
    from training.baselines import BaselineConfig
    from training.features import FeatureConfig
    from training.index import IndexConfig
    from training.pipeline import TrainConfig, train_and_register
    from training.two_tower import TwoTowerConfig

    cfg = TrainConfig(
        **_data_options(data, path, split, protocol, min_rating, k_core, users, items, days, seed),
        baselines=replace(
            BaselineConfig(), models=tuple(b for b in baselines.split(",") if b), seed=seed
        ),
        features=FeatureConfig(),
        model=replace(
            TwoTowerConfig(),
            loss=loss,
            dim=dim,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            grid=tuple(
                (float(w), float(d))
                for w in weight_decay.split(",")
                for d in input_dropout.split(",")
            ),
            patience=patience,
            init=init,
            ease_lambdas=tuple(float(x) for x in ease_lambdas.split(",") if x.strip()),
            fine_tune_min_se=fine_tune_min_se,
            average=average,
            prior_alphas=tuple(float(x) for x in prior_alphas.split(",") if x.strip()),
            seed=seed,
            progress=progress,
        ),
        refit=refit,
        index=replace(IndexConfig(), exact_max_items=exact_max_items),
        max_eval_users=max_eval_users,
        seed=seed,
        threads=threads,
        tracking_uri=tracking_uri,
        model_name=model_name,
        alias=alias,
        register=register,
    )
    res = train_and_register(cfg)
    if not res.run_id:  # another rank than 0 of a distributed run: rank 0 reports
        return
    if not progress:  # with progress the pipeline printed rich tables already
        print(res.table)
    console.print(f"run {res.run_id} in {res.tracking_uri}")
    if res.version:
        console.print(
            f"registered {res.model_name} v{res.version}"
            + (f" as @{res.alias}" if res.alias else "")
        )


@train_app.command("ranker")
def train_ranker_cmd(
    data: str = typer.Option("synthetic", help="synthetic | online-retail | movielens"),
    path: str = typer.Option("", help="Data file or folder (required for real data sets)."),
    split: str = typer.Option("auto", help="auto | time | user-random"),
    users: int = typer.Option(10_000, help="Synthetic: customers."),
    items: int = typer.Option(5_000, help="Synthetic: catalog size."),
    days: int = typer.Option(120, help="Synthetic: days of history."),
    two_tower: str = typer.Option(
        "train",
        help="train (the retrieval pipeline in this run: two-tower and item-to-item on the "
        "train window) | registry (load --two-tower-alias of mercato-two-tower, item-to-item "
        "included; must be trained on the same data/split).",
    ),
    two_tower_alias: str = typer.Option("champion"),
    cart_lists: bool = typer.Option(
        False,
        "--cart-lists/--no-cart-lists",
        help="Also fit on lists cut inside a session after items were carted (surface cart).",
    ),
    stop_lists: str = typer.Option(
        "pooled",
        help="What early stopping reads: ordinary (the held-out ordinary lists, the "
        "promotion gate's kind) | pooled (those and the held-out cart lists together).",
    ),
    allow_refit_two_tower: bool = typer.Option(
        False,
        help="--two-tower registry only: accept a version refit on train + validation (its "
        "scores saw the validation lists' labels; warned and tagged on the run)",
    ),
    tt_dim: int = typer.Option(64, help="Two-tower (when trained here): embedding size."),
    tt_epochs: int = typer.Option(15, help="Two-tower (when trained here): epochs."),
    tt_batch_size: int = typer.Option(512),
    candidates: int = typer.Option(
        100, help="List length: the first merged candidates (fused order) per customer."
    ),
    windows: int = typer.Option(
        3, help="Cut-offs of the fit lists (rolling windows in the validation window)."
    ),
    hidden: str = typer.Option("64,32", help="MLP hidden sizes."),
    loss: str = typer.Option("listwise", help="listwise (softmax CE) | pointwise (BCE)"),
    epochs: int = typer.Option(30),
    patience: int = typer.Option(5, help="Epochs without validation NDCG@10 gain."),
    early_stop_on: str = typer.Option(
        "truth",
        help="Validation NDCG@10 of: truth (purchases, as evaluated) | labels (graded "
        "next-window labels: more customers, less noise).",
    ),
    lr: float = typer.Option(1e-3),
    batch_lists: int = typer.Option(128, help="Customer lists per batch."),
    max_users: int = typer.Option(4000, help="Cap on customers per window (0 = all)."),
    max_eval_users: int = typer.Option(0, help="Two-tower validation users cap (0 = all)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch / BLAS threads."),
    tracking_uri: str = typer.Option("", help="MLflow tracking URI (default: local SQLite)."),
    model_name: str = typer.Option("mercato-ranker"),
    alias: str = typer.Option("challenger", help="Alias the new version gets ('' = none)."),
    register: bool = typer.Option(True, help="Register the bundle as a model version."),
    progress: bool = typer.Option(True, help="Progress per epoch."),
) -> None:
    """Train the ranker on the served (merged) candidates over several cut-offs, evaluate
    it against the fused order and replay the served list with it, log everything to
    MLflow and register the serving bundle."""
    from training.pipeline import TrainConfig
    from training.ranker import RankerConfig, train_and_register_ranker
    from training.synthetic import SyntheticConfig
    from training.two_tower import TwoTowerConfig

    if data != "synthetic" and not path:
        raise typer.BadParameter(f"--path is required for --data {data}")
    try:
        hidden_sizes = tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError as e:
        raise typer.BadParameter(f"--hidden must be comma-separated integers: {hidden}") from e
    retrieval = TrainConfig(
        data=data,
        path=path,
        split=split,
        synthetic=replace(SyntheticConfig(), n_users=users, n_items=items, days=days, seed=seed),
        model=replace(
            TwoTowerConfig(),
            dim=tt_dim,
            epochs=tt_epochs,
            batch_size=tt_batch_size,
            seed=seed,
            progress=progress,
        ),
        max_eval_users=max_eval_users,
        seed=seed,
        threads=threads,
        tracking_uri=tracking_uri,
    )
    cfg = RankerConfig(
        retrieval=retrieval,
        two_tower=two_tower,
        two_tower_alias=two_tower_alias,
        allow_refit_two_tower=allow_refit_two_tower,
        cart_lists=cart_lists,
        stop_lists=stop_lists,
        candidates=candidates,
        windows=windows,
        hidden=hidden_sizes,
        loss=loss,
        epochs=epochs,
        patience=patience,
        early_stop_on=early_stop_on,
        lr=lr,
        batch_lists=batch_lists,
        max_users=max_users,
        seed=seed,
        threads=threads,
        progress=progress,
        tracking_uri=tracking_uri,
        model_name=model_name,
        alias=alias,
        register=register,
    )
    try:
        res = train_and_register_ranker(cfg)
    except (LookupError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    print(res.table)
    console.print(f"run {res.run_id} in {res.tracking_uri} (best epoch {res.best_epoch})")
    if res.version:
        console.print(
            f"registered {res.model_name} v{res.version}"
            + (f" as @{res.alias}" if res.alias else "")
        )


@train_app.command("generate")
def generate_data(
    out: str = typer.Option(..., help="Folder for items/users/events Parquet files."),
    users: int = typer.Option(10_000),
    items: int = typer.Option(5_000),
    categories: int = typer.Option(40),
    days: int = typer.Option(120),
    sessions_per_user: float = typer.Option(6.0),
    seed: int = typer.Option(0),
) -> None:
    """Write the synthetic retail data set to disk (streamed: sized for load tests)."""
    import time

    from training.synthetic import SyntheticConfig, write_synthetic

    t0 = time.perf_counter()
    cfg = SyntheticConfig(
        n_users=users,
        n_items=items,
        n_categories=categories,
        days=days,
        sessions_per_user=sessions_per_user,
        seed=seed,
    )
    counts = write_synthetic(cfg, out)
    console.print(f"wrote {counts} to {out} in {time.perf_counter() - t0:.1f}s")


PROMOTE_DEFAULTS = {
    "retrieval": ("mercato-two-tower", "valid_recall_20"),
    "ranker": ("mercato-ranker", "valid_served_ndcg_10"),
}


def promote_command(
    model: str = typer.Option(
        "retrieval", help="retrieval (mercato-two-tower) | ranker (mercato-ranker)."
    ),
    model_name: str = typer.Option(
        "", help="Registered model name (default: the --model's, e.g. mercato-two-tower)."
    ),
    from_alias: str = typer.Option("challenger", help="Alias of the candidate."),
    to_alias: str = typer.Option("champion", help="Alias to move."),
    version: str = typer.Option("", help="Candidate version (instead of --from-alias)."),
    metric: str = typer.Option(
        "",
        help="Run metric compared; higher is better (default: valid_recall_20 for "
        "retrieval; for ranker the replay gate: the served list replayed with the "
        "candidate on held-out validation customers, valid_served_ndcg_10, against the "
        "champion its run replayed, else the rules-only list).",
    ),
    force: bool = typer.Option(False, "--force", help="Promote even if the gate refuses."),
    tracking_uri: str = typer.Option("", help="MLflow tracking URI (default: local SQLite)."),
) -> None:
    """Move ``champion`` to the challenger when its validation metric is not worse than
    the champion's on the same split (ranker: its replayed served list, not worse than
    the champion's on the same customers), or with --force."""
    from training.registry import PromotionRefused, promote

    if model not in PROMOTE_DEFAULTS:
        raise typer.BadParameter(f"--model must be one of {sorted(PROMOTE_DEFAULTS)}")
    default_name, default_metric = PROMOTE_DEFAULTS[model]
    gate = None
    if model == "ranker" and not metric:
        from training.ranker import replay_gate

        gate = replay_gate
    try:
        r = promote(
            model_name or default_name,
            tracking_uri or None,
            from_alias,
            to_alias,
            metric or default_metric,
            version or None,
            force,
            gate,
        )
    except PromotionRefused as e:
        console.print(f"[red]refused[/red]: {e}")
        raise typer.Exit(1) from e
    except LookupError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    console.print(f"[green]promoted[/green] {r.model_name} v{r.version} to @{r.alias}: {r.reason}")


def evaluate_command(
    data: str = typer.Option(
        "synthetic", help="synthetic | online-retail | movielens | events (export-events file)"
    ),
    path: str = typer.Option("", help="Data file or folder (required for real data sets)."),
    split: str = typer.Option("auto", help="auto | time | user-random"),
    protocol: str = typer.Option("default", help="default | recbole"),
    min_rating: int = typer.Option(0, help="MovieLens: drop ratings below this."),
    k_core: int = typer.Option(0, help="Keep users and items with >= this many events."),
    users: int = typer.Option(10_000, help="Synthetic: customers."),
    items: int = typer.Option(5_000, help="Synthetic: catalog size."),
    days: int = typer.Option(120, help="Synthetic: days of history."),
    seed: int = typer.Option(0),
    model_name: str = typer.Option("mercato-two-tower"),
    alias: str = typer.Option("champion", help="Alias of the version to replay."),
    k: int = typer.Option(100, help="Items of the served list scored."),
    candidates: int = typer.Option(200, help="Candidates asked from retrieval."),
    rules_file: str = typer.Option("", help="Ranking rules (empty = built-in defaults)."),
    tracking_uri: str = typer.Option("", help="MLflow tracking URI (default: local SQLite)."),
) -> None:
    """Replay the served list (retrieval merge + ranking rules, the services' own code in
    process) of a registered version for every validation and test customer of a data
    set and split, score it like the baselines, log it to MLflow (experiment
    mercato-served) and print the table."""
    from training.pipeline import TrainConfig
    from training.replay import ReplayConfig, evaluate_served

    cfg = TrainConfig(
        **_data_options(data, path, split, protocol, min_rating, k_core, users, items, days, seed),
        seed=seed,
        tracking_uri=tracking_uri,
        model_name=model_name,
    )
    try:
        res = evaluate_served(
            cfg,
            alias,
            ReplayConfig(k=k, candidates=candidates, rules_file=rules_file),
            log=console.print,
        )
    except (LookupError, ValueError) as e:
        console.print(f"[red]cannot evaluate[/red]: {e}")
        raise typer.Exit(1) from e
    print(res.table)
    console.print(f"{res.info.name} v{res.info.version} @{alias}: run {res.run_id}")
