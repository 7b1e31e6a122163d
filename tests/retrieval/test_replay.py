"""The offline replay of the served list equals what the running retrieval and ranking
services answer for the same customers (so the offline number measures what is served)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mercato.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from services.models.two_tower import TwoTowerBundle
from services.ranking.pipeline import RankPipeline
from services.ranking.rules import RulesConfig
from services.retrieval.merge import MergeConfig, merge_config
from services.retrieval.server import retrieve_response
from tests.procs import start_service
from tests.retrieval.conftest import TINY, Store
from tests.retrieval.test_service import home_query
from training.features import build_vocab
from training.pipeline import TrainConfig, _eval_sets, load_data, make_split
from training.replay import (
    MERGE_GRID,
    ReplayConfig,
    Variant,
    evaluate_served,
    load_for_replay,
    replay,
    replay_variants,
    request_of,
    served_list,
)

pytestmark = pytest.mark.slow  # trains a two-tower; retrieval and ranking as processes


def test_replay_equals_the_running_services(
    store: Store, tmp_path_factory: pytest.TempPathFactory
) -> None:
    b = TwoTowerBundle.load(store.bundle_dir)
    retrieval = start_service(
        "retrieval",
        tmp_path_factory.mktemp("replay-retrieval"),
        env={"MERCATO_RETRIEVAL_TRACKING_URI": store.uri},
        timeout=90,
    )
    ranking = start_service(
        "ranking",
        tmp_path_factory.mktemp("replay-ranking"),
        env={"MERCATO_RANKING_RANKER_ENABLED": "false", "MERCATO_RANKING_OFFERS_SEED": "1"},
        timeout=90,
    )
    model = load_for_replay(store.bundle_dir)
    pipeline = RankPipeline(RulesConfig.load(None))
    rng = np.random.default_rng(11)
    compared = with_i2i = 0
    try:
        with retrieval.channel() as rch, ranking.channel() as kch:
            retrieve = retrieval_pb2_grpc.RetrievalServiceStub(rch)
            rank = ranking_pb2_grpc.RankingServiceStub(kch)
            for n in range(12):
                hist = rng.choice(len(b.item_ids), int(rng.integers(1, 12)), replace=False)
                recent = hist.tolist()
                req, _ = home_query(b, recent, recent[:2], recent[2:3] if n % 2 else [], 60)
                req.filters.exclude_item_ids.extend(b.item_ids[r] for r in recent)
                resp = retrieve.Retrieve(req, timeout=5)
                with_i2i += any(common_pb2.REASON_SIMILAR in c.sources for c in resp.candidates)
                ranked = rank.Rank(
                    ranking_pb2.RankRequest(
                        profile=req.profile, context=req.context, candidates=resp.candidates, k=30
                    ),
                    timeout=5,
                )
                served = [it.item_id for it in ranked.items]
                assert served_list(model, pipeline, req, 30) == served
                # The same through columns (what request_of and the gateway ask for).
                as_columns = retrieval_pb2.RetrieveRequest()
                as_columns.CopyFrom(req)
                as_columns.columns = True
                assert served_list(model, pipeline, as_columns, 30) == served
                assert len(served) == 30
                compared += 1
    finally:
        assert retrieval.terminate() == 0
        assert ranking.terminate() == 0
    assert compared == 12 and with_i2i >= 6  # the merged path was compared


def test_evaluate_replays_a_registered_version_as_its_training_run(store: Store) -> None:
    from mlflow.tracking import MlflowClient

    cfg = TrainConfig(synthetic=TINY, tracking_uri=store.uri, evaluate_test=False)
    res = evaluate_served(cfg, alias="champion")
    assert (res.info.name, res.info.version) == ("mercato-two-tower", store.version)
    client = MlflowClient(store.uri)
    trained = client.get_run(res.info.run_id).data.metrics
    logged = client.get_run(res.run_id).data.metrics
    for key in ("recall@20", "ndcg@10", "hit@50"):
        name = f"valid_served_{key.replace('@', '_')}"
        # The same replay of the same version on the same split: the same number.
        assert res.metrics["valid"][key] == pytest.approx(trained[name], abs=1e-9)
        assert logged[name] == pytest.approx(trained[name], abs=1e-9)
    assert "| served |" in res.table
    # Another split is refused: its numbers would not be comparable.
    with pytest.raises(ValueError, match="not comparable"):
        evaluate_served(replace(cfg, valid_frac=0.2), alias="champion")


def test_one_pass_over_several_served_lists_equals_one_replay_each(store: Store) -> None:
    """``replay_variants`` (each customer retrieved once, fused per weights, ranked per
    variant: the weight choice and the ranker's replays) gives every variant the lists
    and metrics of its own ``replay``; Retrieve's answers kept from elsewhere too."""
    cfg = TrainConfig(synthetic=TINY, tracking_uri=store.uri, evaluate_test=False)
    data = load_data(cfg)
    vocab = build_vocab(data, cfg.features)
    valid, _, _, _ = _eval_sets(cfg, data, make_split(data, cfg), vocab)
    model = load_for_replay(store.bundle_dir)
    rcfg = ReplayConfig(k=30, candidates=60)
    ks = (10, 20)
    variants = {f"{tt} {i2i}": Variant(MergeConfig(tt, i2i)) for tt, i2i in MERGE_GRID}
    got = replay_variants(model, valid, vocab, rcfg, ks, variants)
    for (tt, i2i), name in zip(MERGE_GRID, variants, strict=True):
        alone = replay(model, valid, vocab, replace(rcfg, merge=MergeConfig(tt, i2i)), ks)
        assert got[name].lists == alone.lists
        assert got[name].metrics == alone.metrics
    # The weights change the lists: the comparison above compares different lists.
    assert len({str(r.lists) for r in got.values()}) > 1
    merge = merge_config(model)
    kept = [
        retrieve_response(model, model.state, request_of(valid, vocab, i, rcfg)[0], merge)
        for i in range(len(valid))
    ]
    twice = {"rules": Variant(), "again": Variant(merge)}
    from_kept = replay_variants(model, valid, vocab, rcfg, ks, twice, responses=kept)
    alone = replay(model, valid, vocab, rcfg, ks)
    assert from_kept["rules"].lists == from_kept["again"].lists == alone.lists
    with pytest.raises(ValueError, match="precomputed"):
        replay_variants(model, valid, vocab, rcfg, ks, variants, responses=kept)
