"""Offline replay of the served list: the real serving code, in process, per test user.

For every query of an evaluation set (:class:`training.features.EvalSet`) the replay
builds the request the gateway would send (a known customer whose recent items are the
query's history, the query's country / segment / price band, surface from the query's
context, the history as ``exclude_item_ids``: the same exclusions the baselines get),
then runs

1. retrieval's ``Retrieve`` body (:func:`services.retrieval.server.retrieve_response`:
   filters, user tower, two-tower search, item-to-item neighbours, the merge) on a
   version loaded by the service's own loader (:func:`load_retrieval_model`), and
2. ranking's ``Rank`` (:class:`services.ranking.pipeline.RankPipeline`: merge, the
   ranker when one is given else the candidates' fused scores, the surface's business
   rules) on those candidates,

and scores the top ``k`` of the ranked list with the same metrics as every other model
(:func:`training.evaluate.evaluate`). ``tests/training/test_replay.py`` checks that the
replay equals the answers of the running retrieval and ranking services.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mercato.features import PRICE_BANDS
from mercato.v1 import common_pb2, ranking_pb2, retrieval_pb2
from services.models.registry import ModelVersionInfo
from services.ranking.pipeline import RankPipeline
from services.ranking.rules import RulesConfig
from services.ranking.scoring import ScorerProvider, no_ranker
from services.retrieval.merge import MergeConfig, merge_config
from services.retrieval.model import IndexConfig, RetrievalModel, load_retrieval_model
from services.retrieval.server import request_sources, retrieve_response, sources_response
from training.evaluate import evaluate
from training.features import EvalSet, Vocab

if TYPE_CHECKING:
    from training.pipeline import TrainConfig

#: (two-tower, item-to-item) weights of the fused score tried on validation.
MERGE_GRID = ((1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.0, 1.0))

SURFACES = {
    "home": common_pb2.SURFACE_HOME,
    "product": common_pb2.SURFACE_PRODUCT,
    "cart": common_pb2.SURFACE_CART,
    "checkout": common_pb2.SURFACE_CHECKOUT,
    "email": common_pb2.SURFACE_EMAIL,
}


@dataclass(frozen=True)
class ReplayConfig:
    k: int = 100  # items of the served list scored (>= the largest metric cut-off)
    candidates: int = 200  # Retrieve's k
    merge: MergeConfig | None = None  # None: as the service, the bundle's weights
    rules_file: str = ""  # the ranking service's rules (empty = built-in defaults)


def request_of(
    es: EvalSet, vocab: Vocab, i: int, cfg: ReplayConfig
) -> tuple[retrieval_pb2.RetrieveRequest, common_pb2.Profile, common_pb2.Context]:
    """The Retrieve request (and its profile and context) for query ``i`` of ``es``."""
    hist = es.history[i].indices
    ids = [vocab.item_ids[r] for r in hist]
    surface, country, segment, band = (int(v) for v in es.context[i])
    profile = common_pb2.Profile(
        customer_id=f"replay-{int(es.users[i])}",
        known=True,
        recent_items=[common_pb2.RecentItem(item_id=x) for x in ids],
        segment=vocab.segments[segment] if 0 <= segment < len(vocab.segments) else "",
        price_band=PRICE_BANDS[band] if 0 <= band < len(PRICE_BANDS) else "",
        country=vocab.countries[country] if 0 <= country < len(vocab.countries) else "",
    )
    name = vocab.surfaces[surface] if 0 <= surface < len(vocab.surfaces) else "home"
    context = common_pb2.Context(surface=SURFACES.get(name, common_pb2.SURFACE_HOME))
    req = retrieval_pb2.RetrieveRequest(
        profile=profile,
        context=context,
        k=cfg.candidates,
        filters=retrieval_pb2.Filters(exclude_item_ids=ids),
        columns=True,  # as the gateway asks: candidates as columns, passed on to Rank
    )
    return req, profile, context


def served_list(
    model: RetrievalModel,
    pipeline: RankPipeline,
    req: retrieval_pb2.RetrieveRequest,
    k: int,
    merge: MergeConfig | None = None,
    rank_profile: common_pb2.Profile | None = None,
    now: float | None = None,
) -> list[str]:
    """What the services answer for one request: Retrieve, then Rank its candidates
    (with ``rank_profile``, the customer's whole profile, and the request time ``now``
    when given: what the ranker's customer features read)."""
    resp = retrieve_response(model, model.state, req, merge or merge_config(model))
    return ranked_ids(pipeline, req, resp, k, rank_profile, now)


def ranked_ids(
    pipeline: RankPipeline,
    req: retrieval_pb2.RetrieveRequest,
    resp: retrieval_pb2.RetrieveResponse,
    k: int,
    rank_profile: common_pb2.Profile | None = None,
    now: float | None = None,
) -> list[str]:
    """Rank's answer (item ids) for Retrieve's answer ``resp`` to ``req``."""
    if not (resp.candidates or resp.columns.item_ids):
        return []
    context = common_pb2.Context()
    context.CopyFrom(req.context)
    if now is not None:
        context.timestamp.FromSeconds(int(now))
    # Rank gets the candidates in the form retrieval answered (columns when the request
    # asked for them, as the gateway does).
    ranked = pipeline.rank(
        ranking_pb2.RankRequest(
            profile=rank_profile if rank_profile is not None else req.profile,
            context=context,
            candidates=resp.candidates,
            columns=resp.columns if req.columns else None,
            k=k,
        )
    )
    return [it.item_id for it in ranked.items]


class ServedScorer:
    """An evaluation scorer over precomputed served lists: position scores for the
    listed items, -inf for the rest."""

    def __init__(self, lists: list[np.ndarray], n_items: int) -> None:
        self.lists = lists
        self.n_items = n_items

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        out = np.full((len(rows), self.n_items), -np.inf, dtype=np.float32)
        for j, r in enumerate(np.asarray(rows).tolist()):
            items = self.lists[r]
            out[j, items] = np.arange(len(items), 0, -1, dtype=np.float32)
        return out


@dataclass
class ReplayResult:
    metrics: dict[str, float]
    lists: list[list[str]]
    seconds: float


@dataclass(frozen=True)
class Variant:
    """One served list to replay: the fusion weights (None: the bundle's, as the
    service) and the ranker (:data:`no_ranker`: rules only)."""

    merge: MergeConfig | None = None
    scorers: ScorerProvider = no_ranker


def replay_variants(
    model: RetrievalModel,
    es: EvalSet,
    vocab: Vocab,
    cfg: ReplayConfig,
    ks: tuple[int, ...],
    variants: Mapping[str, Variant],
    progress: Callable[[str], None] | None = None,
    profiles: Sequence[common_pb2.Profile] | None = None,
    now: float | None = None,
    responses: Sequence[retrieval_pb2.RetrieveResponse] | None = None,
) -> dict[str, ReplayResult]:
    """:func:`replay` of several served lists of the same customers in one pass: each
    query's Retrieve runs up to the fusion once (:func:`request_sources`: filters, user
    tower, search, what the history reaches), is fused once per distinct weights
    (:func:`sources_response`) and ranked once per variant; the lists are what
    :func:`replay` gives each variant alone. ``responses`` (one per query, Retrieve's
    answers with the bundle's weights, e.g. from :func:`training.ranker.build_lists`)
    stand in for Retrieve when every variant uses the bundle's weights."""
    st = model.state
    default = merge_config(model)
    merges = {name: v.merge or default for name, v in variants.items()}
    distinct = list(dict.fromkeys(merges.values()))
    if responses is not None and distinct not in ([], [cfg.merge or default]):
        raise ValueError("precomputed responses are for cfg.merge (or the bundle's) only")
    pipelines = {
        name: RankPipeline(RulesConfig.load(cfg.rules_file or None), scorers=v.scorers)
        for name, v in variants.items()
    }
    t0 = time.perf_counter()
    lists: dict[str, list[list[str]]] = {name: [] for name in variants}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    for i in range(len(es)):
        req, _, _ = request_of(es, vocab, i, cfg)
        if responses is not None:
            resps = {cfg.merge or default: responses[i]}
        else:
            src = request_sources(model, st, req)
            resps = {m: sources_response(model, st, req, src, m) for m in distinct}
        rank_profile = profiles[i] if profiles is not None else None
        for name, pipeline in pipelines.items():
            got = ranked_ids(pipeline, req, resps[merges[name]], cfg.k, rank_profile, now)
            lists[name].append(got)
            rows[name].append(
                np.array([vocab.item_row[x] for x in got if x in vocab.item_row], np.int64)
            )
        if progress and (i + 1) % 1000 == 0:
            progress(f"replay {es.name}: {i + 1}/{len(es)} customers")
    seconds = time.perf_counter() - t0
    return {
        name: ReplayResult(
            evaluate(ServedScorer(rows[name], vocab.n_items), es, ks), lists[name], seconds
        )
        for name in variants
    }


def replay(
    model: RetrievalModel,
    es: EvalSet,
    vocab: Vocab,
    cfg: ReplayConfig,
    ks: tuple[int, ...],
    scorers: ScorerProvider = no_ranker,
    progress: Callable[[str], None] | None = None,
    profiles: Sequence[common_pb2.Profile] | None = None,
    now: float | None = None,
) -> ReplayResult:
    """Replay every query of ``es`` through the serving code; metrics of the lists.

    ``profiles`` (one per query) are the customers' whole profiles as the profile service
    would send them (``training.ranker.customer_profiles``) and ``now`` the query time:
    Rank gets them, so a ranker sees the customer features it was trained on; without
    them Rank gets the retrieval request's profile (history, segment, band, country)."""
    variants = {"served": Variant(cfg.merge, scorers)}
    return replay_variants(model, es, vocab, cfg, ks, variants, progress, profiles, now)["served"]


def choose_merge(
    model: RetrievalModel,
    valid: EvalSet,
    vocab: Vocab,
    cfg: ReplayConfig,
    metric: str = "recall@20",
    log: Callable[[str], None] | None = None,
    ks: tuple[int, ...] = (),
) -> tuple[MergeConfig, list[dict[str, float]], ReplayResult | None]:
    """The source weights (:data:`MERGE_GRID`) whose served list is best on validation
    ``metric`` (a bundle without item-to-item: the default weights), the weights tried
    and the chosen weights' replay (metrics at ``ks`` and ``metric``'s cut-off; None
    without item-to-item). The grid is replayed in one pass (:func:`replay_variants`)."""
    if model.item2item is None:
        return merge_config(model), [], None
    k = int(metric.split("@")[1])
    variants = {f"{tt} {i2i}": Variant(MergeConfig(tt, i2i)) for tt, i2i in MERGE_GRID}
    got = replay_variants(model, valid, vocab, cfg, tuple(sorted({k, *ks})), variants)
    best, best_m, best_r, tried = merge_config(model), -1.0, None, []
    for (tt, i2i), name in zip(MERGE_GRID, variants, strict=True):
        m = got[name].metrics[metric]
        tried.append({"two_tower_weight": tt, "item2item_weight": i2i, metric: m})
        if log:
            log(f"served merge two-tower {tt} item2item {i2i}: valid {metric} {m:.4f}")
        if m > best_m:
            best, best_m, best_r = MergeConfig(tt, i2i), m, got[name]
    return best, tried, best_r


def load_for_replay(bundle_dir: Path, run_id: str = "") -> RetrievalModel:
    """A bundle directory loaded exactly as the retrieval service loads a version."""
    info = ModelVersionInfo(name="replay", version="0", alias="replay", run_id=run_id)
    return load_retrieval_model(bundle_dir, info, IndexConfig())


@dataclass
class EvaluateResult:
    """``mercato evaluate``: the replayed version, its metrics and where they are logged."""

    info: ModelVersionInfo
    metrics: dict[str, dict[str, float]]  # split part -> metric -> value
    table: str
    run_id: str


def evaluate_served(
    cfg: TrainConfig,
    alias: str = "champion",
    replay_cfg: ReplayConfig | None = None,
    experiment: str = "mercato-served",
    log: Callable[[str], None] | None = None,
) -> EvaluateResult:
    """Replay the served list of a registered version (``cfg.model_name`` @ ``alias``) on
    the data and split ``cfg`` names; log the metrics and the table to a new MLflow run.

    Refuses a version trained on another split (its ``split_signature`` tag) or another
    catalogue (other item rows): its numbers would not be comparable. A version refit on
    train + validation is replayed on the test part only (it has seen validation)."""
    import tempfile

    from services.common.settings import default_tracking_uri
    from services.models.registry import download_bundle
    from services.models.two_tower import TwoTowerBundle
    from training import registry
    from training.evaluate import format_table
    from training.features import build_vocab
    from training.pipeline import _eval_sets, load_data, make_split

    uri = cfg.tracking_uri or default_tracking_uri()
    replay_cfg = replay_cfg or ReplayConfig()
    data = load_data(cfg)
    split = make_split(data, cfg)
    vocab = build_vocab(data, cfg.features)
    valid, test, _, _ = _eval_sets(cfg, data, split, vocab)
    dst = Path(tempfile.mkdtemp(prefix="mercato-evaluate-"))
    info, bundle_dir = download_bundle(cfg.model_name, alias, uri, dst)
    signature = info.tags.get("split_signature", "")
    if signature and signature != split.signature():
        raise ValueError(
            f"{info.name} v{info.version} was trained on split {signature}, this data and "
            f"split give {split.signature()}: not comparable"
        )
    bundle = TwoTowerBundle.load(bundle_dir)
    if bundle.item_ids != vocab.item_ids:
        raise ValueError(f"{info.name} v{info.version} has other item rows than this data")
    # A version refit on train + validation has seen the validation part: only the test
    # part measures it then.
    refit = bool((bundle.eval_report.get("refit") or {}).get("train_plus_valid"))
    model = load_retrieval_model(bundle_dir, info, IndexConfig())
    parts = [] if refit and test is not None else [("valid", valid)]
    parts += [("test", test)] if test is not None else []
    if refit and log:
        log(f"{info.name} v{info.version} was refit on train + validation: test part only")
    metrics: dict[str, dict[str, float]] = {}
    for name, es in parts:
        metrics[name] = replay(model, es, vocab, replay_cfg, cfg.ks, progress=log).metrics
        if log:
            log(f"{name}: {len(es)} customers replayed")
    table = "\n\n".join(
        f"### {name}\n\n{format_table({'served': m}, cfg.ks)}" for name, m in metrics.items()
    )
    client, uri = registry.client_for(uri)
    exp = registry.ensure_experiment(client, experiment, uri, None)
    run = client.create_run(
        exp,
        tags={
            "model": info.name,
            "version": info.version,
            "alias": alias,
            "split_signature": split.signature(),
            "dataset": data.name,
        },
    )
    for name, m in metrics.items():
        for k, v in m.items():
            client.log_metric(run.info.run_id, f"{name}_served_{k.replace('@', '_')}", float(v))
    client.log_text(run.info.run_id, table + "\n", "eval/served_table.md")
    client.set_terminated(run.info.run_id)
    return EvaluateResult(info, metrics, table, run.info.run_id)
