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
from tests.procs import start_service
from tests.retrieval.conftest import TINY, Store
from tests.retrieval.test_service import home_query
from training.pipeline import TrainConfig
from training.replay import evaluate_served, load_for_replay, served_list

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
