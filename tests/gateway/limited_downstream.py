"""A retrieval and ranking of fixed capacity, run as its own process by
``test_overload.py``: a synchronous gRPC server with ONE worker thread that spends
``--retrieve-ms`` on each Retrieve and ``--rank-ms`` on each Rank (sleeping: the
capacity does not depend on how busy the shared machine is), and serves the calls in
arrival order without looking at their deadlines, as a saturated service does. Its
capacity is ``1000 / (retrieve-ms + rank-ms)`` Recommend/s.

Retrieve answers the ``--items`` item ids (as columns); Rank answers the candidates in
the order sent (with ``return_items``, each with an ``item`` naming its id, as a ranking
service with an item table answers, so the gateway makes no item lookup). Both count
their calls, printed on SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mercato.v1 import (
    common_pb2,
    ranking_pb2,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from services.common.candidates import candidates_of


class Retrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, items: list[str], seconds: float) -> None:
        self.columns = common_pb2.CandidateColumns(
            item_ids=items,
            scores=[float(len(items) - i) for i in range(len(items))],
            sources=[common_pb2.REASON_MODEL] * len(items),
        )
        self.seconds = seconds
        self.calls = 0

    def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        self.calls += 1
        time.sleep(self.seconds)
        return retrieval_pb2.RetrieveResponse(
            columns=self.columns, model=common_pb2.ModelVersion(name="limited", version="1")
        )


class Ranking(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.RankResponse:
        self.calls += 1
        time.sleep(self.seconds)
        items = [
            ranking_pb2.RankedItem(item_id=c.item_id, score=float(-i))
            for i, c in enumerate(candidates_of(request.columns))
        ][: request.k or 10]
        if request.return_items:  # as a ranking with an item table answers
            for r in items:
                r.item.item_id = r.item_id
        return ranking_pb2.RankResponse(items=items)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--retrieve-ms", type=float, default=8.0)
    ap.add_argument("--rank-ms", type=float, default=2.0)
    ap.add_argument("--items", nargs="+", required=True)
    args = ap.parse_args()
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    retrieval = Retrieval(args.items, args.retrieve_ms / 1000)
    ranking = Ranking(args.rank_ms / 1000)
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(retrieval, server)
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(ranking, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop(0)
    print(f"retrieve {retrieval.calls} rank {ranking.calls}", flush=True)


if __name__ == "__main__":
    main()
