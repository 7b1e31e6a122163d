"""Ranking's item table (#14): loaded from the profile service's catalogue and kept
fresh, so a RankRequest of ids and scores alone is ranked with stock, categories and
boosts; items sent in the request still override the table."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from services.ranking.table import CatalogTable
from tests.procs import start_service


def _item(i: int, **kw: object) -> common_pb2.Item:
    base: dict[str, object] = {"item_id": f"t{i}", "category": f"cat{i % 3}", "price": 10.0}
    base.update({"stock": 5, **kw})
    return common_pb2.Item(**base)  # type: ignore[arg-type]


def test_table_rows_and_overlay() -> None:
    table = CatalogTable(
        [_item(0, stock=0), _item(1, promoted=True), _item(2, category=""), _item(1, price=3)]
    )
    assert len(table) == 3  # the later entry for t1 won
    arr = table.lookup(["t1", "nope", "t0", "t2"])
    assert arr.known.tolist() == [True, False, True, True]
    assert arr.stock.tolist() == [5, -1, 0, 5]
    assert arr.price.tolist() == [3.0, 0.0, 10.0, 10.0]
    assert arr.category_strings() == ["cat1", "", "cat0", ""]
    over = arr.overlay(["t1", "nope", "t0", "t2"], {"nope": _item(9, category="new", stock=2)})
    assert over.known.tolist() == [True, True, True, True]
    assert over.category_strings() == ["cat1", "new", "cat0", ""]
    assert arr.known.tolist() == [True, False, True, True]  # the table's rows are untouched
    assert np.array_equal(table.rows(["t2", "x"]), [2, -1])


def _rank(
    stub: ranking_pb2_grpc.RankingServiceStub,
    ids: list[str],
    k: int = 20,
    items: list[common_pb2.Item] | None = None,
) -> ranking_pb2.RankResponse:
    req = ranking_pb2.RankRequest(
        context=common_pb2.Context(surface=common_pb2.SURFACE_HOME), k=k, items=items or []
    )
    for n, item_id in enumerate(ids):
        req.candidates.add(item_id=item_id, score=1.0 - n / 100)
    return stub.Rank(req, timeout=10)


@pytest.mark.slow
def test_ranking_reads_the_catalogue_and_follows_stock_changes(tmp_path: Path) -> None:
    profile = start_service("profile", tmp_path / "p")
    items = [_item(i) for i in range(12)] + [_item(12, stock=0)]
    with grpc.insecure_channel(profile.target) as ch:
        catalog = profile_pb2_grpc.ProfileServiceStub(ch)
        catalog.UpsertItems(profile_pb2.UpsertItemsRequest(items=items), timeout=10)
        ranking = start_service(
            "ranking",
            tmp_path / "r",
            {
                "MERCATO_RANKING_CATALOG_TARGET": profile.target,
                "MERCATO_RANKING_CATALOG_REFRESH_S": "0.3",
                "MERCATO_RANKING_CATALOG_PAGE_SIZE": "5",  # several pages
                "MERCATO_RANKING_RANKER_ENABLED": "false",
            },
        )
        try:
            with grpc.insecure_channel(ranking.target) as rch:
                stub = ranking_pb2_grpc.RankingServiceStub(rch)
                ids = [f"t{i}" for i in (12, *range(12))] + ["unknown"]
                resp = _rank(stub, ids)
                got = [r.item_id for r in resp.items]
                # Sold out in the catalogue: dropped although the request sent no details.
                assert "t12" not in got
                assert resp.dropped["out_of_stock"] == 1
                # Categories from the table: home caps each category at 3.
                assert resp.dropped["category_cap"] == 12 - 9
                assert "unknown" in got  # unknown stock is kept on home, as before
                # Details sent in the request still win over the table.
                resp = _rank(stub, ids, items=[_item(12, stock=4)])
                assert "t12" in [r.item_id for r in resp.items]

                # Restocked and a new item: picked up on the next reload.
                catalog.UpdateStock(
                    profile_pb2.UpdateStockRequest(
                        updates=[profile_pb2.StockUpdate(item_id="t12", set_to=7)]
                    ),
                    timeout=10,
                )
                catalog.UpsertItems(
                    profile_pb2.UpsertItemsRequest(items=[_item(20, category="fresh", stock=0)]),
                    timeout=10,
                )
                deadline = time.monotonic() + 15
                while True:
                    resp = _rank(stub, [*ids, "t20"])
                    got = [r.item_id for r in resp.items]
                    if "t12" in got and "t20" not in got:
                        break
                    assert time.monotonic() < deadline, (got, dict(resp.dropped))
                    time.sleep(0.1)
                assert resp.dropped["out_of_stock"] == 1  # now t20
        finally:
            ranking.terminate()
            profile.terminate()


@pytest.mark.slow
def test_ranking_is_not_ready_until_its_table_loads_and_still_stops(tmp_path: Path) -> None:
    """With the catalogue unreachable ranking stays NOT_SERVING (it would rank without
    stock), stays live, and stops promptly on SIGTERM."""
    from tests.procs import free_port

    proc = start_service(
        "ranking",
        tmp_path,
        {
            "MERCATO_RANKING_CATALOG_TARGET": f"127.0.0.1:{free_port()}",
            "MERCATO_RANKING_RANKER_ENABLED": "false",
        },
        wait=None,
    )
    try:
        proc.wait_status("SERVING", 60, service="liveness")
        time.sleep(1.0)
        assert proc.health("") == "NOT_SERVING"
    finally:
        started = time.monotonic()
        code = proc.terminate()
        assert time.monotonic() - started < 15
        assert code == 0, proc.log()[-2000:]


@pytest.mark.slow
def test_items_created_after_the_last_reload_are_fetched_on_demand(tmp_path: Path) -> None:
    """A new item is known to the very next Rank, without waiting for a reload."""
    profile = start_service("profile", tmp_path / "p")
    with grpc.insecure_channel(profile.target) as ch:
        catalog = profile_pb2_grpc.ProfileServiceStub(ch)
        catalog.UpsertItems(profile_pb2.UpsertItemsRequest(items=[_item(0)]), timeout=10)
        ranking = start_service(
            "ranking",
            tmp_path / "r",
            {
                "MERCATO_RANKING_CATALOG_TARGET": profile.target,
                "MERCATO_RANKING_CATALOG_REFRESH_S": "3600",  # no reload during the test
                "MERCATO_RANKING_RANKER_ENABLED": "false",
            },
        )
        try:
            with grpc.insecure_channel(ranking.target) as rch:
                stub = ranking_pb2_grpc.RankingServiceStub(rch)
                catalog.UpsertItems(
                    profile_pb2.UpsertItemsRequest(
                        items=[_item(1, stock=0), _item(2, category="cat0"), _item(3)]
                    ),
                    timeout=10,
                )
                home = ranking_pb2.RankRequest(
                    context=common_pb2.Context(surface=common_pb2.SURFACE_HOME), k=10
                )
                for n, item_id in enumerate(["t0", "t1", "t2", "t3", "nowhere"]):
                    home.candidates.add(item_id=item_id, score=1.0 - n / 10)
                resp = stub.Rank(home, timeout=10)
                got = [r.item_id for r in resp.items]
                assert sorted(got) == ["nowhere", "t0", "t2", "t3"]
                assert dict(resp.dropped) == {"out_of_stock": 1}
                # Their categories are known too: diversity moves the third item of
                # cat0 (t3) below the uncategorised one.
                assert got.index("nowhere") < got.index("t3")
                # Asked again: the same answer (the fetched items are kept).
                again = stub.Rank(home, timeout=10)
                assert [r.item_id for r in again.items] == [r.item_id for r in resp.items]
        finally:
            ranking.terminate()
            profile.terminate()
