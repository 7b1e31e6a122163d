"""Work nobody waits for is skipped (#14): Rank checks the caller's remaining deadline
before scoring and before the rules, in-process and in a real ranking process."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from mercato.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from services.common.errors import DeadlineExceeded
from services.ranking.pipeline import RankPipeline
from services.ranking.rules import RulesConfig
from tests.procs import start_service


def _request(n: int) -> ranking_pb2.RankRequest:
    req = ranking_pb2.RankRequest(context=common_pb2.Context(surface=common_pb2.SURFACE_HOME), k=50)
    for i in range(n):
        req.candidates.add(item_id=f"i{i}", score=float(i % 97))
    return req


def test_rank_stops_when_the_deadline_has_passed() -> None:
    pipe = RankPipeline(RulesConfig.load(None))
    req = _request(30)
    assert len(pipe.rank(req, lambda: None).items) == 30  # no deadline
    assert len(pipe.rank(req, lambda: 5.0).items) == 30
    with pytest.raises(DeadlineExceeded, match="before ranker"):
        pipe.rank(req, lambda: 0.0)
    left = iter([1.0, -0.001])  # time runs out while scoring
    with pytest.raises(DeadlineExceeded, match="before rules"):
        pipe.rank(req, lambda: next(left))


@pytest.mark.slow
def test_a_busy_ranking_process_skips_calls_whose_caller_gave_up(tmp_path: Path) -> None:
    proc = start_service("ranking", tmp_path, {"MERCATO_RANKING_RANKER_ENABLED": "false"})
    try:
        with grpc.insecure_channel(proc.target, options=[("grpc.enable_retries", 0)]) as ch:
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            big = _request(2000)
            assert proc.metric("mercato_deadline_skipped_total") == 0
            # A burst with short deadlines: the calls queued behind the first ones expire
            # before their turn, and the server must not rank them anyway.
            codes: list[grpc.StatusCode] = []

            def call(_: int) -> None:
                try:
                    stub.Rank(big, timeout=0.02)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(call, range(64)))
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
            assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
            deadline = time.monotonic() + 5
            while proc.metric("mercato_deadline_skipped_total") == 0:
                assert time.monotonic() < deadline, "no expired call was skipped"
                time.sleep(0.1)
            # Still answering with a deadline it can meet.
            assert len(stub.Rank(big, timeout=10).items) == 50
    finally:
        proc.terminate()
