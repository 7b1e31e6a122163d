"""Ranking's item table (#14): loaded from the profile service's catalogue and kept
fresh, so a RankRequest of ids and scores alone is ranked with stock, categories and
boosts; items sent in the request still override the table."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from services.profile.logic import ProfileConfig
from services.profile.store.redis import RedisStore
from services.ranking.table import CatalogTable
from tests.procs import start_service
from tests.profile.redis_proc import RedisProc


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
@pytest.mark.parametrize("changes", ["true", "false"])  # the change feed, full reloads
def test_ranking_reads_the_catalogue_and_follows_stock_changes(
    tmp_path: Path, changes: str
) -> None:
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
                "MERCATO_RANKING_CATALOG_CHANGES": changes,
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
                feed = ranking.metric("mercato_ranking_catalog_refreshes_total", how="changes")
                assert (feed > 0) == (changes == "true")
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


def test_updated_table_writes_changed_rows_into_a_new_table() -> None:
    table = CatalogTable([_item(0), _item(1, promoted=True), _item(2)])
    changed = table.updated(
        [_item(1, stock=0, price=4.0), _item(7, category="new"), _item(1, stock=2)], loaded_at=5.0
    )
    assert changed.ids == ["t0", "t1", "t2", "t7"] and changed.loaded_at == 5.0
    arr = changed.lookup(["t1", "t7", "t0"])
    assert arr.stock.tolist() == [2, 5, 5]  # the later entry for t1 won, whole
    assert arr.price.tolist() == [10.0, 10.0, 10.0]
    assert arr.promoted.tolist() == [False, False, False]
    assert arr.category_strings() == ["cat1", "new", "cat0"]
    # The table it came from is what readers holding it saw.
    old = table.lookup(["t1", "t7"])
    assert old.known.tolist() == [True, False] and old.stock.tolist() == [5, -1]
    assert old.promoted.tolist() == [True, False] and table.category_names == [
        "cat0",
        "cat1",
        "cat2",
    ]
    assert changed.updated([], loaded_at=6.0).ids == changed.ids
    # The same table as built from everything at once.
    whole = CatalogTable([_item(0), _item(1, stock=2), _item(2), _item(7, category="new")])
    for name in ("category", "price", "stock", "margin", "replenishable", "promoted"):
        assert np.array_equal(getattr(whole, name), getattr(changed, name)), name
    assert whole.row == changed.row and whole.category_names == changed.category_names


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc = RedisProc(tmp_path_factory.mktemp("redis")).start()
    yield proc.url
    proc.stop()


def _cursor(epoch: str, seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([epoch, seq]).encode()).decode()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_ranking_follows_the_catalogue_change_feed(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """The real profile process on each store and ranking following its change feed: a
    stock and a price change made through the API reach ranking's table after one
    refresh, an unchanged catalogue sends no item, bad cursors get clear statuses, and
    (Redis) a store emptied under ranking is loaded again in full."""
    env: dict[str, str] = {}
    prefix = f"feed{time.monotonic_ns()}:"
    if backend == "redis":
        env = {
            "MERCATO_PROFILE_BACKEND": "redis",
            "MERCATO_PROFILE_REDIS_URL": request.getfixturevalue("redis_url"),
            "MERCATO_PROFILE_REDIS_PREFIX": prefix,
        }
    profile = start_service("profile", tmp_path / "p", env)
    items = [_item(i) for i in range(12)] + [_item(12, stock=0), _item(13, margin=5.0)]
    with grpc.insecure_channel(profile.target) as ch:
        catalog = profile_pb2_grpc.ProfileServiceStub(ch)
        catalog.UpsertItems(profile_pb2.UpsertItemsRequest(items=items), timeout=10)

        # Bad cursors: a clear status each, and the service keeps answering.
        def changes(cursor: str) -> profile_pb2.ListItemChangesResponse:
            req = profile_pb2.ListItemChangesRequest(cursor=cursor, page_size=100)
            return catalog.ListItemChanges(req, timeout=10)

        everything = changes("")
        assert len(everything.items) == len(items) and not everything.more
        epoch, seq = json.loads(base64.urlsafe_b64decode(everything.cursor))
        for bad, code in [
            ("not a cursor", grpc.StatusCode.INVALID_ARGUMENT),
            (_cursor(epoch, -1), grpc.StatusCode.INVALID_ARGUMENT),
            (_cursor("another-store", seq), grpc.StatusCode.FAILED_PRECONDITION),
            (_cursor(epoch, seq + 1), grpc.StatusCode.FAILED_PRECONDITION),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                changes(bad)
            assert err.value.code() == code, err.value.details()
            assert "cursor" in (err.value.details() or "")
        for size in (-1, 10_001):  # the proto's bound: 1 to 10000 (0 = 1000)
            with pytest.raises(grpc.RpcError) as err:
                catalog.ListItemChanges(
                    profile_pb2.ListItemChangesRequest(page_size=size), timeout=10
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "page_size" in (err.value.details() or "")
        assert changes(everything.cursor).items == []

        ranking = start_service(
            "ranking",
            tmp_path / "r",
            {
                "MERCATO_RANKING_CATALOG_TARGET": profile.target,
                "MERCATO_RANKING_CATALOG_REFRESH_S": "0.2",
                "MERCATO_RANKING_CATALOG_PAGE_SIZE": "5",  # several pages
                "MERCATO_RANKING_RANKER_ENABLED": "false",
            },
        )

        def refreshes(how: str) -> float:
            return ranking.metric("mercato_ranking_catalog_refreshes_total", how=how)

        def received(how: str) -> float:
            return ranking.metric("mercato_ranking_catalog_items_total", how=how)

        def after_next_refresh() -> None:
            seen = refreshes("changes")
            deadline = time.monotonic() + 10
            while refreshes("changes") < seen + 2:  # one may have started before the change
                assert time.monotonic() < deadline
                time.sleep(0.05)

        try:
            with grpc.insecure_channel(ranking.target) as rch:
                stub = ranking_pb2_grpc.RankingServiceStub(rch)
                ids = [f"t{i}" for i in (12, 13, *range(12))]
                resp = _rank(stub, ids)
                assert resp.dropped["out_of_stock"] == 1 and "t12" not in [
                    r.item_id for r in resp.items
                ]
                boosted = {r.item_id: r.score for r in resp.items}["t13"]
                assert (refreshes("full"), received("full")) == (1, len(items))

                # Unchanged: refreshes go on and carry no item.
                after_next_refresh()
                after_next_refresh()
                assert received("changes") == 0 and refreshes("full") == 1

                # A restock and a price change through the API: one refresh later.
                catalog.UpdateStock(
                    profile_pb2.UpdateStockRequest(
                        updates=[profile_pb2.StockUpdate(item_id="t12", set_to=7)]
                    ),
                    timeout=10,
                )
                catalog.UpsertItems(
                    profile_pb2.UpsertItemsRequest(items=[_item(13, margin=5.0, price=100.0)]),
                    timeout=10,
                )
                after_next_refresh()
                resp = _rank(stub, ids)
                got = {r.item_id: r.score for r in resp.items}
                assert "t12" in got and "out_of_stock" not in resp.dropped
                # 100 instead of 10: no longer high-margin, so no margin boost.
                assert got["t13"] < boosted
                assert received("changes") == 2 and refreshes("full") == 1

                if backend == "redis":
                    # The store emptied and written again: the cursor is refused and
                    # ranking loads the new catalogue in full (t0..t9 are unknown now,
                    # so the home category cap drops none of them).
                    cat0 = ["t0", "t3", "t6", "t9"]
                    assert _rank(stub, cat0).dropped["category_cap"] == 1
                    asyncio.run(_flush(request.getfixturevalue("redis_url"), prefix))
                    catalog.UpsertItems(
                        profile_pb2.UpsertItemsRequest(items=[_item(50)]), timeout=10
                    )
                    deadline = time.monotonic() + 10
                    while refreshes("full") < 2:
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                    assert "category_cap" not in _rank(stub, cat0).dropped
                    assert received("full") == len(items) + 1
                assert ranking.health() == "SERVING"
        finally:
            ranking.terminate()
            profile.terminate()


async def _flush(url: str, prefix: str) -> None:
    store = RedisStore(url, ProfileConfig(), prefix=prefix)
    await store.open()
    try:
        await store.flush_prefix()
    finally:
        await store.close()


class _FeedlessCatalog(profile_pb2_grpc.ProfileServiceServicer):
    """A profile service from before the change feed: ListItems only (the generated base
    class answers every other method UNIMPLEMENTED)."""

    def __init__(self, items: list[common_pb2.Item]) -> None:
        self.items = items
        self.listed = 0

    async def ListItems(
        self, request: profile_pb2.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.ListItemsResponse:
        self.listed += 1
        return profile_pb2.ListItemsResponse(items=self.items)


async def test_a_profile_service_without_the_feed_is_reloaded_in_full() -> None:
    from services.ranking.table import CatalogFollower

    catalog = _FeedlessCatalog([_item(0), _item(1, stock=0)])
    server = grpc.aio.server()
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(catalog, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = profile_pb2_grpc.ProfileServiceStub(ch)
            follower = CatalogFollower(stub.ListItems, 3600, list_changes=stub.ListItemChanges)
            table = await follower.refresh()
            assert table.lookup(["t1"]).stock.tolist() == [0] and catalog.listed == 1
            assert follower.list_changes is None  # asked once, then ListItems only
            catalog.items = [_item(0), _item(1, stock=4)]
            table = await follower.refresh()
            assert table.lookup(["t1"]).stock.tolist() == [4] and catalog.listed == 2
    finally:
        await server.stop(None)


def test_table_keeps_each_rows_item_bytes_through_updates_and_compaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RankRequest.return_items answers with the table's serialized Item of each row:
    the catalogue's record as it last came, after any number of refreshes."""
    monkeypatch.setattr(CatalogTable, "COMPACT_SLACK", 500)  # rebuilt every few updates
    compactions = []
    compact = CatalogTable._compact
    monkeypatch.setattr(
        CatalogTable, "_compact", lambda self: (compactions.append(1), compact(self))
    )
    items = [_item(i, title=f"T{i}", attributes={"brand": f"b{i}"}) for i in range(50)]
    table = CatalogTable(items)
    assert all(
        common_pb2.Item.FromString(table.item_bytes(table.row[i.item_id])) == i for i in items
    )
    latest = {i.item_id: i for i in items}
    for n in range(150):  # enough rewrites of a few rows that the blob is rebuilt
        changed = [_item(j, title=f"T{j} v{n}", stock=n % 7) for j in (n % 50, (n * 7) % 50)]
        changed.append(_item(50 + n % 3, title=f"new {n}"))
        old, before = table, [table.item_bytes(r) for r in range(len(table))]
        table = table.updated(changed, loaded_at=float(n))
        latest.update({i.item_id: i for i in changed})
        assert [old.item_bytes(r) for r in range(len(old))] == before  # left as it was
    assert len(table) == 53
    assert {
        i: common_pb2.Item.FromString(table.item_bytes(table.row[i])) for i in table.ids
    } == latest
    assert len(compactions) >= 5
    assert len(table.item_blob) <= 2 * int(table.item_size.sum()) + 500


def test_rank_returns_the_items_details_when_asked() -> None:
    from services.ranking.pipeline import RankPipeline
    from services.ranking.rules import RulesConfig

    table = CatalogTable(
        [_item(0, title="Zero", price=3.5), _item(1, title="One"), _item(2, stock=0)]
    )
    pipeline = RankPipeline(RulesConfig.load(None), table=lambda: table)
    req = ranking_pb2.RankRequest(k=10, return_items=True)
    for n, item_id in enumerate(["t0", "t1", "t2", "new", "unknown", "sent"]):
        req.candidates.add(item_id=item_id, score=10.0 - n)
    req.items.append(common_pb2.Item(item_id="sent", title="Sent", stock=2))
    newer = {"new": common_pb2.Item(item_id="new", title="New", stock=1)}
    resp = pipeline.rank(req, newer=newer)
    got = {r.item_id: r.item for r in resp.items}
    assert list(got) == ["t0", "t1", "new", "unknown", "sent"]  # t2 is sold out
    assert got["t0"] == _item(0, title="Zero", price=3.5)  # the table's record
    assert got["t1"] == _item(1, title="One")
    assert got["new"] == newer["new"]  # fetched since the last refresh
    assert got["sent"] == req.items[0]  # sent in the request
    assert got["unknown"] == common_pb2.Item(item_id="unknown")  # the id alone
    req.return_items = False  # not asked: no details
    assert not any(r.HasField("item") for r in pipeline.rank(req, newer=newer).items)
