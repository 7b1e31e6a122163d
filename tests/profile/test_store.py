"""The store interface on both backends (real SQLite file, real redis-server)."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mercato.v1 import common_pb2
from services.profile.logic import (
    CustomerStatic,
    LogEvent,
    ProfileConfig,
    ProfileState,
    decay_to,
    recompute_profile,
    recompute_trending,
)
from services.profile.store.base import AppendResult, ProfileStore, StockChange, UnknownItems
from services.profile.store.redis import RedisStore
from services.profile.store.sqlite import (
    SCHEMA_VERSION,
    SqliteStore,
    _Writer,
    connect,
    migrate,
    schema_version,
)
from tests.profile.conftest import make_test_store
from tests.profile.factory import DAY_US, NOW_US, catalog, item, random_events, to_log

ET = common_pb2.EventType


async def states_of(store: ProfileStore) -> dict[str, ProfileState]:
    out: dict[str, ProfileState] = {}
    async for batch in store.scan_states(7):
        out.update(batch)
    return out


async def assert_consistent(store: ProfileStore, cfg: ProfileConfig) -> list[LogEvent]:
    """Every stored state equals the recomputation from the stored log; ids unique."""
    log = [e async for e in store.iter_log(50)]
    assert len({e.event_id for e in log}) == len(log)
    states = await states_of(store)
    assert set(states) == {e.customer_id for e in log}
    for cid, state in states.items():
        assert state == recompute_profile([e for e in log if e.customer_id == cid], cfg), cid
    return log


async def test_events_are_idempotent_and_state_matches_log(
    store: ProfileStore, cfg: ProfileConfig
) -> None:
    items = catalog()
    await store.upsert_items(items, NOW_US)
    log = to_log(random_events(11, 240), items)
    for start in range(0, len(log), 40):
        res = await store.append_events(log[start : start + 40])
        assert (res.accepted, res.duplicates) == (40, 0)
    before = await states_of(store)
    again = await store.append_events(log[:40] + log[:5])
    assert (again.accepted, again.duplicates) == (0, 45)
    assert await states_of(store) == before
    got = await assert_consistent(store, cfg)
    assert [e.event_id for e in got] == [e.event_id for e in log]  # log order = arrival order


async def test_duplicate_ids_within_a_batch(store: ProfileStore, cfg: ProfileConfig) -> None:
    items = catalog(3)
    await store.upsert_items(items, NOW_US)
    (a,) = to_log(random_events(3, 1, items=3), items)
    res = await store.append_events([a, a, a])
    assert (res.accepted, res.duplicates) == (1, 2)
    await assert_consistent(store, cfg)


async def test_a_failing_batch_writes_nothing(
    store: ProfileStore, cfg: ProfileConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = catalog()
    await store.upsert_items(items, NOW_US)
    log = to_log(random_events(5, 60, customers=3), items)
    await store.append_events(log[:30])
    before = await states_of(store)
    trend_before = await store.trending("", 100, 0)
    real = ProfileState.abandon_key
    calls: list[str] = []

    # The fault fires while the batch is written, not while it is planned: a state's
    # cart key is computed only for the write, after the batch's events went to the log
    # (SQLite: INSERTed in the open transaction; Redis: queued in the MULTI).
    def failing(self: ProfileState) -> int | None:
        calls.append("write")
        raise RuntimeError("injected write failure")

    monkeypatch.setattr(ProfileState, "abandon_key", failing)
    with pytest.raises(Exception, match="injected write failure"):
        await store.append_events(log[30:])
    monkeypatch.setattr(ProfileState, "abandon_key", real)
    assert calls, "the fault was never reached"
    assert await states_of(store) == before
    assert await store.trending("", 100, 0) == trend_before
    assert [e.event_id async for e in store.iter_log()] == [e.event_id for e in log[:30]]
    res = await store.append_events(log[30:])  # the retry goes through whole
    assert (res.accepted, res.duplicates) == (30, 0)
    await assert_consistent(store, cfg)


async def test_trending_matches_recomputation_and_categories(
    store: ProfileStore, cfg: ProfileConfig
) -> None:
    items = catalog()
    await store.upsert_items(items, NOW_US)
    log = to_log(random_events(21, 300, start_us=NOW_US - 3 * DAY_US), items)
    for start in range(0, len(log), 60):
        await store.append_events(log[start : start + 60])
    h = cfg.trending_half_life_us
    expected = recompute_trending(log, NOW_US, h)
    for scope in ["", "kitchen", "toys"]:
        rows, anchor = await store.trending(scope, 1000, 0)
        assert anchor is not None
        got = {i: decay_to(s, anchor, NOW_US, h) for i, s in rows}
        assert got == pytest.approx(expected[scope], rel=1e-9)
        scores = [s for _, s in rows]
        assert scores == sorted(scores, reverse=True)
    page1, _ = await store.trending("", 3, 0)
    page2, _ = await store.trending("", 3, 3)
    full, _ = await store.trending("", 6, 0)
    assert page1 + page2 == full


async def test_catalog_upsert_get_list_and_stock(store: ProfileStore) -> None:
    items = catalog(12)
    assert await store.upsert_items(items, NOW_US) == (12, 0)
    stored = await store.get_items(["i1", "nope"])
    assert list(stored) == ["i1"] and stored["i1"].created_at.ToMicroseconds() == NOW_US
    moved = item("i1", category="garden", price=9.5, stock=2)
    assert await store.upsert_items([moved, item("new")], NOW_US + 5) == (1, 1)
    again = (await store.get_items(["i1"]))["i1"]
    assert again.category == "garden" and again.created_at.ToMicroseconds() == NOW_US
    page = await store.list_items(5, "", "")
    assert [i.item_id for i in page] == sorted(i.item_id for i in [*items, item("new")])[:5]
    rest = await store.list_items(100, page[-1].item_id, "")
    assert len(page) + len(rest) == 13
    garden = [i.item_id for i in await store.list_items(100, "", "garden")]
    assert "i1" in garden and all(
        i.category == "garden" for i in await store.list_items(100, "", "garden")
    )
    kitchen = [i.item_id for i in await store.list_items(100, "", items[1].category)]
    assert "i1" not in kitchen  # left its old category index
    out = await store.update_stock(
        [StockChange("i2", set_to=7), StockChange("i2", delta=-3), StockChange("i3", delta=-100)]
    )
    assert [i.stock for i in out] == [7, 4, 0]
    with pytest.raises(UnknownItems):
        await store.update_stock([StockChange("i2", set_to=1), StockChange("ghost", set_to=1)])
    assert (await store.get_items(["i2"]))["i2"].stock == 4  # all-or-nothing
    assert await store.upsert_items([item("i2", stock=99)], NOW_US, only_missing=True) == (0, 0)


async def test_customers_and_abandoned_carts(store: ProfileStore, cfg: ProfileConfig) -> None:
    items = catalog(4)
    await store.upsert_items(items, NOW_US)
    assert await store.upsert_customers([CustomerStatic("c9", "GB", "vip", {"tier": "gold"})]) == 1
    (rec,) = await store.get_customers(["c9"])
    assert rec.state is None and rec.static == CustomerStatic("c9", "GB", "vip", {"tier": "gold"})
    add, buy = ET.EVENT_TYPE_ADD_TO_CART, ET.EVENT_TYPE_PURCHASE
    evs = [
        LogEvent(
            f"e{n}", f"c{n}", add, NOW_US - (10 - n) * DAY_US, item_id="i1", quantity=1, price=2.0
        )
        for n in range(6)
    ]
    # c5 bought something after filling the cart: not abandoned.
    evs.append(LogEvent("b5", "c5", buy, NOW_US, item_id="i2", quantity=1, price=1.0))
    await store.append_events(evs)
    window = await store.list_abandoned_carts(0, NOW_US - 5 * DAY_US, 100, None)
    assert [c for c, _ in window] == ["c0", "c1", "c2", "c3", "c4"]
    narrow = await store.list_abandoned_carts(NOW_US - 9 * DAY_US, NOW_US - 7 * DAY_US, 100, None)
    assert [c for c, _ in narrow] == ["c1", "c2", "c3"]
    first = await store.list_abandoned_carts(0, NOW_US, 2, None)
    cid, state = first[-1]
    rest = await store.list_abandoned_carts(0, NOW_US, 100, (state.cart_updated_us, cid))
    assert [c for c, _ in first + rest] == ["c0", "c1", "c2", "c3", "c4"]


async def test_concurrent_batches_are_all_applied(store: ProfileStore, cfg: ProfileConfig) -> None:
    items = catalog()
    await store.upsert_items(items, NOW_US)
    log = to_log(random_events(8, 200, customers=3), items)
    batches = [log[i : i + 5] for i in range(0, len(log), 5)]
    results = await asyncio.gather(*(store.append_events(b) for b in batches + batches[:10]))
    assert sum(r.accepted for r in results) == 200
    assert sum(r.duplicates for r in results) == 50
    await assert_consistent(store, cfg)


def test_sqlite_forward_migration_keeps_data(tmp_path: Path, cfg: ProfileConfig) -> None:
    path = tmp_path / "old.db"
    conn = connect(path)
    assert migrate(conn, target=1) == 1
    state = ProfileState(events=1, cart={"i1": [1, 2.0, NOW_US]}, cart_updated_us=NOW_US)
    conn.execute("INSERT INTO customers (customer_id, state) VALUES ('c1', ?)", (state.to_json(),))
    conn.close()

    async def reopen() -> list[tuple[str, ProfileState]]:
        store = SqliteStore(path, cfg)
        await store.open()
        try:
            return await store.list_abandoned_carts(0, NOW_US, 10, None)
        finally:
            await store.close()

    assert [c for c, _ in asyncio.run(reopen())] == ["c1"]  # backfilled by the migration
    conn = connect(path)
    assert schema_version(conn) == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(Exception, match="newer than this Mercato"):
        asyncio.run(reopen())


def test_float_state_round_trip_is_exact() -> None:
    s = ProfileState(monetary=0.1 + 0.2, affinity={"a": math.pi / 3})
    assert ProfileState.from_json(s.to_json()) == s


async def test_page_customer_ids_covers_every_customer_with_a_state(
    store: ProfileStore, cfg: ProfileConfig
) -> None:
    items = catalog()
    await store.append_events(to_log(random_events(3, 80, customers=9), items))
    # a customer seen only through an exposure has no derived state: not listed
    exposure = common_pb2.Event(
        event_id="x1", customer_id="only-shown", type=ET.EVENT_TYPE_EXPOSURE
    )
    exposure.timestamp.FromMicroseconds(NOW_US)
    await store.append_events(to_log([exposure], items))
    seen: list[str] = []
    cursor = ""
    while True:
        ids, cursor = await store.page_customer_ids(cursor, 4)
        seen += ids
        if not cursor:
            break
    assert set(seen) == set(await states_of(store))
    assert "only-shown" not in seen


async def test_one_failing_batch_leaves_the_others_of_its_group_whole(
    store: ProfileStore, cfg: ProfileConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches written together (SQLite: one group commit) where one fails at write time:
    that one is not there at all, every other one is there whole."""
    items = catalog()
    await store.upsert_items(items, NOW_US)
    log = to_log(random_events(13, 200, customers=20), items)
    batches = [log[i : i + 10] for i in range(0, len(log), 10)]
    victim = batches[7][3].event_id
    real = LogEvent.to_json

    def failing(self: LogEvent) -> str:  # the event's log row is built only for the write
        if self.event_id == victim:
            raise RuntimeError("injected write failure")
        return real(self)

    groups: list[int] = []
    if isinstance(store, SqliteStore):
        run_group = _Writer._run_group

        def spy(conn: object, group: list[object]) -> list[tuple[bool, object]]:
            groups.append(len(group))
            return run_group(conn, group)  # type: ignore[arg-type]

        monkeypatch.setattr(_Writer, "_run_group", staticmethod(spy))
    monkeypatch.setattr(LogEvent, "to_json", failing)
    results = await asyncio.gather(
        *(store.append_events(b) for b in batches), return_exceptions=True
    )
    monkeypatch.setattr(LogEvent, "to_json", real)
    failed = [n for n, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [7], results
    assert "injected write failure" in str(results[7])
    assert all(r.accepted == 10 for r in results if isinstance(r, AppendResult))
    if groups:
        assert max(groups) > 1, f"every batch was committed alone: {groups}"
    stored = await assert_consistent(store, cfg)
    assert {e.event_id for e in stored} == {e.event_id for e in log} - {
        e.event_id for e in batches[7]
    }


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_trending_stays_exact_when_the_anchor_moves(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A short half-life makes the trend anchor move (rebase after 512 half-lives) while
    batches arrive in time order: every stored score is rescaled, none is lost."""
    cfg = ProfileConfig(trending_half_life_hours=1.0)
    url = request.getfixturevalue("redis_server").url if backend == "redis" else ""
    store = make_test_store(backend, tmp_path, url, cfg)
    await store.open()
    try:
        items = catalog()
        await store.upsert_items(items, NOW_US)
        log = sorted(
            to_log(random_events(41, 400, start_us=NOW_US - 60 * DAY_US), items),
            key=lambda e: e.ts_us,
        )
        anchors = set()
        for start in range(0, len(log), 40):
            await store.append_events(log[start : start + 40])
            anchors.add((await store.trending("", 1, 0))[1])
        assert len(anchors) >= 2, "the anchor never moved: the test tests nothing"
        h = cfg.trending_half_life_us
        at = max(e.ts_us for e in log)
        expected = recompute_trending(log, at, h)
        for scope in ["", "kitchen", "toys"]:
            rows, anchor = await store.trending(scope, 1000, 0)
            assert anchor is not None
            got = {i: decay_to(s, anchor, at, h) for i, s in rows}
            want = {i: v for i, v in expected[scope].items() if v > 1e-300}
            assert {i: v for i, v in got.items() if v > 1e-300} == pytest.approx(want, rel=1e-9)
    finally:
        if isinstance(store, RedisStore):
            await store.flush_prefix()
        await store.close()


async def test_item_changes_follow_every_catalog_write(store: ProfileStore) -> None:
    """The change feed: from 0 every item once; after a cursor exactly the items written
    since (upsert, stock change), each once with its latest attributes; nothing while
    nothing changes."""
    empty = await store.item_changes(0, 100)
    assert (empty.items, empty.last_seq, empty.head) == ([], 0, 0)
    await store.upsert_items(catalog(6), NOW_US)
    first = await store.item_changes(0, 4)
    assert len(first.items) == 4 and first.last_seq < first.head
    rest = await store.item_changes(first.last_seq, 100)
    assert sorted(i.item_id for i in first.items + rest.items) == sorted(
        i.item_id for i in catalog(6)
    )
    cursor = rest.last_seq
    assert cursor == rest.head and rest.epoch == first.epoch != ""
    idle = await store.item_changes(cursor, 100)
    assert (idle.items, idle.last_seq) == ([], cursor)

    await store.update_stock([StockChange("i2", set_to=7), StockChange("i2", delta=-3)])
    await store.upsert_items([item("i4", price=1.5), item("fresh")], NOW_US)
    await store.update_stock([StockChange("i4", set_to=0)])
    await store.upsert_items([item("i1", stock=3)], NOW_US, only_missing=True)  # no change
    changed = await store.item_changes(cursor, 100)
    assert [i.item_id for i in changed.items] == ["i2", "fresh", "i4"]  # latest change last
    got = {i.item_id: i for i in changed.items}
    assert got["i2"].stock == 4 and (got["i4"].price, got["i4"].stock) == (1.5, 0)
    assert changed.last_seq == changed.head > cursor
    assert (await store.item_changes(changed.last_seq, 100)).items == []


def test_sqlite_migration_numbers_the_existing_catalog(tmp_path: Path, cfg: ProfileConfig) -> None:
    path = tmp_path / "v2.db"
    conn = connect(path)
    assert migrate(conn, target=2) == 2
    conn.executemany(
        "INSERT INTO items (item_id, category, stock, data) VALUES (?, ?, ?, ?)",
        [(i.item_id, i.category, i.stock, i.SerializeToString()) for i in catalog(5)],
    )
    conn.close()

    async def run() -> None:
        store = SqliteStore(path, cfg)
        await store.open()
        try:
            everything = await store.item_changes(0, 100)
            assert len(everything.items) == 5 and everything.last_seq == everything.head == 5
            await store.update_stock([StockChange("i0", set_to=1)])
            after = await store.item_changes(5, 100)
            assert [i.item_id for i in after.items] == ["i0"] and after.head == 6
        finally:
            await store.close()

    asyncio.run(run())


async def test_redis_numbers_items_written_before_the_feed(redis_server: object) -> None:
    """A Redis catalogue written by a version without the change feed: open() numbers its
    items once; a flushed store starts a new epoch."""
    cfg = ProfileConfig()
    url = redis_server.url  # type: ignore[attr-defined]
    store = RedisStore(url, cfg, prefix="feedless:")
    await store.open()
    try:
        await store.upsert_items(catalog(4), NOW_US)
        await store.r.delete(store.k_changes, store.k_item_seq)  # as an older version wrote it
        await store.close()
        await store.open()
        before = await store.item_changes(0, 100)
        assert len(before.items) == 4 and before.head == 4
        await store.flush_prefix()
        await store.upsert_items([item("x")], NOW_US)
        after = await store.item_changes(0, 100)
        assert [i.item_id for i in after.items] == ["x"] and after.epoch != before.epoch
    finally:
        await store.flush_prefix()
        await store.close()


async def test_sync_reads_answer_as_the_async_ones_from_many_threads(
    store: ProfileStore, cfg: ProfileConfig
) -> None:
    """The synchronous server's reads (#14): the same records and items as the async
    reads, from eight threads at once while batches are being written."""
    items = catalog(30)
    await store.upsert_items(items, NOW_US)
    await store.upsert_customers([CustomerStatic("c1", "GB", "vip", {})])
    log = to_log(random_events(9, 120, customers=6), items)
    await store.append_events(log[:60])
    ids = sorted({e.customer_id for e in log} | {"c1", "nobody"})
    item_ids = [i.item_id for i in items] + ["ghost", "i3"]

    def read() -> tuple[list[object], dict[str, common_pb2.Item]]:
        return list(store.get_customers_sync(ids)), store.get_items_sync(item_ids)

    loop = asyncio.get_running_loop()
    expected = (await store.get_customers(ids), await store.get_items(item_ids))
    with ThreadPoolExecutor(8) as pool:
        reads = [loop.run_in_executor(pool, read) for _ in range(64)]
        await asyncio.sleep(0)
        await store.append_events(log[60:])  # writes while the threads read
        during = await asyncio.gather(*reads)
        after = await loop.run_in_executor(pool, read)
    final = (await store.get_customers(ids), await store.get_items(item_ids))
    assert after[0] == final[0] and after[1] == final[1]
    assert [r.customer_id for r in after[0]] == ids  # type: ignore[attr-defined]
    assert set(after[1]) == {i.item_id for i in items}
    for records, found in during:  # each read saw the state before or after the write
        assert records in (expected[0], final[0])
        assert found == expected[1]
