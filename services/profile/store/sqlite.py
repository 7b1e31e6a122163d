"""SQLite backend: one file in WAL mode, the embedded default.

Durability: every write transaction commits with ``synchronous=FULL``. In WAL mode that
fsyncs the WAL at each commit, so a batch acknowledged to the caller survives a process
crash *and* an OS crash or power loss (``NORMAL`` would only survive a process crash).
The price of one fsync per commit is paid once per group of batches: all writes go
through one writer thread that takes every batch queued while the previous commit ran
into the next transaction (group commit, each batch in its own savepoint so one failing
batch never takes the others down or leaves anything half-written).

Reads use a separate connection; in WAL mode they see the last committed transaction
and never wait for the writer. Schema changes are forward migrations recorded in the
``schema_version`` table; a file written by a newer version is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from mercato.v1 import common_pb2
from services.profile.logic import (
    CustomerStatic,
    LogEvent,
    ProfileConfig,
    ProfileState,
    us_to_ts,
)
from services.profile.store.base import (
    AppendResult,
    CustomerRecord,
    ItemChanges,
    ProfileStore,
    StockChange,
    StoreUnavailable,
    UnknownItems,
    plan_batch,
)

log = logging.getLogger(__name__)

_MAX_GROUP = 64  # batches committed together at most
_CHUNK = 500  # host parameters per IN (...) query, below SQLite's limit


def _v1(conn: sqlite3.Connection) -> None:
    # Statement by statement: executescript() would COMMIT the migration's transaction.
    _script(
        conn,
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            customer_id TEXT NOT NULL,
            ts_us INTEGER NOT NULL,
            data TEXT NOT NULL
        );
        CREATE TABLE customers (
            customer_id TEXT PRIMARY KEY,
            state TEXT,
            static TEXT
        ) WITHOUT ROWID;
        CREATE TABLE items (
            item_id TEXT PRIMARY KEY,
            category TEXT NOT NULL,
            stock INTEGER NOT NULL,
            data BLOB NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX items_category ON items (category, item_id);
        CREATE TABLE trending (
            scope TEXT NOT NULL,
            item_id TEXT NOT NULL,
            score REAL NOT NULL,
            PRIMARY KEY (scope, item_id)
        ) WITHOUT ROWID;
        CREATE INDEX trending_rank ON trending (scope, score DESC);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        """,
    )


def _script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _v2(conn: sqlite3.Connection) -> None:
    """Abandoned-cart index (backfilled from the stored states) and per-customer log reads."""
    conn.execute("ALTER TABLE customers ADD COLUMN abandon_us INTEGER")
    conn.execute(
        "CREATE INDEX customers_abandon ON customers (abandon_us, customer_id) "
        "WHERE abandon_us IS NOT NULL"
    )
    conn.execute("CREATE INDEX events_customer ON events (customer_id, seq)")
    rows = conn.execute("SELECT customer_id, state FROM customers WHERE state IS NOT NULL")
    updates = [(ProfileState.from_json(state).abandon_key(), cid) for cid, state in rows.fetchall()]
    conn.executemany("UPDATE customers SET abandon_us = ? WHERE customer_id = ?", updates)


def _v3(conn: sqlite3.Connection) -> None:
    """The catalogue's change sequence: every item write gives the item the next number
    (``meta.item_seq`` is the last one given), so readers follow the catalogue by
    asking for the items changed after a number; ``meta.catalog_epoch`` names this
    file's sequence. Existing items are numbered in id order."""
    conn.execute("ALTER TABLE items ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0")
    ids = [r[0] for r in conn.execute("SELECT item_id FROM items ORDER BY item_id")]
    conn.executemany(
        "UPDATE items SET change_seq = ? WHERE item_id = ?",
        [(n, item_id) for n, item_id in enumerate(ids, start=1)],
    )
    conn.execute("CREATE INDEX items_changes ON items (change_seq)")
    conn.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [("item_seq", str(len(ids))), ("catalog_epoch", uuid.uuid4().hex)],
    )


def _take_seqs(conn: sqlite3.Connection, n: int) -> int:
    """Reserve ``n`` change sequence numbers (in the writer's transaction); returns the
    first."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'item_seq'").fetchone()
    last = int(row[0]) if row else 0
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('item_seq', ?)", (str(last + n),)
    )
    return last + 1


# Forward migrations: MIGRATIONS[i] brings a file from version i to i + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path | str, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the pragmas every Mercato connection uses (autocommit mode:
    transactions are explicit)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = FULL")
    if readonly:
        conn.execute("PRAGMA query_only = 1")
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of an open file (0 for a new, empty one)."""
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if row is None:
        return 0
    got = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(got[0]) if got else 0


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply the forward migrations up to ``target``, each in its own transaction with
    its version bump. Returns the version reached."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreUnavailable(f"SQLite could not switch to WAL mode (got {mode!r})")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        if conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
            conn.execute("INSERT INTO schema_version VALUES (0)")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    version = schema_version(conn)
    if version > len(MIGRATIONS):
        raise StoreUnavailable(
            f"the profile database has schema version {version}, newer than this Mercato "
            f"({len(MIGRATIONS)}); upgrade Mercato instead of opening it with an older one"
        )
    while version < target:
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](conn)
            conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version += 1
        log.info("migrated profile database", extra={"schema_version": version})
    return version


class _Writer(threading.Thread):
    """The only thread that writes: runs jobs in group-committed transactions."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="profile-sqlite-writer", daemon=True)
        self.path = path
        self.jobs: queue.Queue[Any] = queue.Queue()

    def submit(self, fn: Callable[[sqlite3.Connection], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.jobs.put((fn, future, loop))
        return future

    def stop(self) -> None:
        self.jobs.put(None)

    @staticmethod
    def _resolve(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
        if future.cancelled():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run(self) -> None:
        conn = connect(self.path)
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                group = [job]
                stop_after = False
                while len(group) < _MAX_GROUP:
                    try:
                        more = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop_after = True
                        break
                    group.append(more)
                outcomes = self._run_group(conn, group)
                for (_, future, loop), (ok, value) in zip(group, outcomes, strict=True):
                    loop.call_soon_threadsafe(self._resolve, future, ok, value)
                if stop_after:
                    return
        finally:
            conn.close()

    @staticmethod
    def _run_group(conn: sqlite3.Connection, group: list[Any]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            return [(False, exc)] * len(group)
        for fn, _, _ in group:
            try:
                conn.execute("SAVEPOINT job")
                outcomes.append((True, fn(conn)))
                conn.execute("RELEASE job")
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                except Exception:
                    # The transaction itself is gone (I/O error, disk full): fail the group.
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                    return [(False, exc)] * len(group)
                outcomes.append((False, exc))
        try:
            conn.execute("COMMIT")  # synchronous=FULL: durable when this returns
        except Exception as exc:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            return [(False, exc)] * len(group)
        return outcomes


def _chunks(values: Sequence[Any], size: int = _CHUNK) -> list[Sequence[Any]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def _item_from_row(data: bytes) -> common_pb2.Item:
    item = common_pb2.Item()
    item.ParseFromString(data)
    return item


class SqliteStore(ProfileStore):
    """The profile store in one SQLite file."""

    backend = "sqlite"

    def __init__(self, path: Path | str, cfg: ProfileConfig) -> None:
        super().__init__(cfg)
        self.path = Path(path)
        self._writer: _Writer | None = None
        self._reader: sqlite3.Connection | None = None

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)

            def _prepare() -> None:
                conn = connect(self.path)
                try:
                    migrate(conn)
                finally:
                    conn.close()

            await asyncio.to_thread(_prepare)
            self._reader = connect(self.path, readonly=True)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open the profile database {self.path}: {exc}") from exc
        self._writer = _Writer(self.path)
        self._writer.start()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            await asyncio.to_thread(self._writer.join, 30)
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._writer is None:
            raise StoreUnavailable("the profile database is not open")
        try:
            return await self._writer.submit(fn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"profile database write failed: {exc}") from exc

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StoreUnavailable("the profile database is not open")
        return self._reader

    async def ping(self) -> None:
        try:
            self._read().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"profile database check failed: {exc}") from exc

    # --- events ---------------------------------------------------------------------

    async def append_events(self, events: Sequence[LogEvent]) -> AppendResult:
        cfg = self.cfg
        batch = list(events)

        def job(conn: sqlite3.Connection) -> AppendResult:
            ids = list({ev.event_id for ev in batch})
            seen: set[str] = set()
            for part in _chunks(ids):
                marks = ",".join("?" * len(part))
                seen.update(
                    r[0]
                    for r in conn.execute(
                        f"SELECT event_id FROM events WHERE event_id IN ({marks})", part
                    )
                )
            customers = list({ev.customer_id for ev in batch})
            states: dict[str, ProfileState | None] = {}
            for part in _chunks(customers):
                marks = ",".join("?" * len(part))
                for cid, state in conn.execute(
                    f"SELECT customer_id, state FROM customers WHERE customer_id IN ({marks})",
                    part,
                ):
                    states[cid] = ProfileState.from_json(state) if state else None
            row = conn.execute("SELECT value FROM meta WHERE key = 'trend_anchor_us'").fetchone()
            anchor = int(row[0]) if row else None
            plan = plan_batch(batch, seen, states, anchor, cfg)
            if not plan.accepted:
                return AppendResult(0, plan.duplicates)
            conn.executemany(
                "INSERT INTO events (event_id, customer_id, ts_us, data) VALUES (?, ?, ?, ?)",
                [(ev.event_id, ev.customer_id, ev.ts_us, ev.to_json()) for ev in plan.accepted],
            )
            conn.executemany(
                "INSERT INTO customers (customer_id, state, abandon_us) VALUES (?, ?, ?) "
                "ON CONFLICT (customer_id) DO UPDATE SET state = excluded.state, "
                "abandon_us = excluded.abandon_us",
                [(cid, st.to_json(), st.abandon_key()) for cid, st in plan.states.items()],
            )
            if plan.rescale is not None:
                conn.execute("UPDATE trending SET score = score * ?", (plan.rescale,))
            if plan.anchor_us is not None and plan.anchor_us != anchor:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('trend_anchor_us', ?)",
                    (str(plan.anchor_us),),
                )
            conn.executemany(
                "INSERT INTO trending (scope, item_id, score) VALUES (?, ?, ?) "
                "ON CONFLICT (scope, item_id) DO UPDATE SET score = score + excluded.score",
                [(scope, item, inc) for (scope, item), inc in plan.increments.items()],
            )
            return AppendResult(len(plan.accepted), plan.duplicates)

        result: AppendResult = await self._write(job)
        return result

    async def read_log(self, after: str, limit: int) -> tuple[list[LogEvent], str]:
        start = int(after or 0)

        def query() -> tuple[list[LogEvent], str]:
            conn = connect(self.path, readonly=True)
            try:
                rows = conn.execute(
                    "SELECT seq, data FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                    (start, limit),
                ).fetchall()
            finally:
                conn.close()
            events = [LogEvent.from_json(data) for _, data in rows]
            return events, str(rows[-1][0]) if rows else after

        try:
            return await asyncio.to_thread(query)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"profile database read failed: {exc}") from exc

    async def customer_log(self, customer_id: str) -> list[LogEvent]:
        """One customer's events in log order."""
        rows = self._read().execute(
            "SELECT data FROM events WHERE customer_id = ? ORDER BY seq", (customer_id,)
        )
        return [LogEvent.from_json(data) for (data,) in rows]

    # --- customers ------------------------------------------------------------------

    async def get_customers(self, customer_ids: Sequence[str]) -> list[CustomerRecord]:
        return self.get_customers_sync(customer_ids)

    def get_customers_sync(self, customer_ids: Sequence[str]) -> list[CustomerRecord]:
        # One read connection for every thread: sqlite3.threadsafety is 3 (serialized),
        # and a WAL reader never waits for the writer.
        conn = self._read()
        found: dict[str, tuple[str | None, str | None]] = {}
        try:
            if len(customer_ids) == 1:
                row = conn.execute(
                    "SELECT customer_id, state, static FROM customers WHERE customer_id = ?",
                    (customer_ids[0],),
                ).fetchone()
                if row:
                    found[row[0]] = (row[1], row[2])
            else:
                for part in _chunks(list(dict.fromkeys(customer_ids))):
                    marks = ",".join("?" * len(part))
                    for cid, state, static in conn.execute(
                        "SELECT customer_id, state, static FROM customers "
                        f"WHERE customer_id IN ({marks})",
                        part,
                    ):
                        found[cid] = (state, static)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"profile database read failed: {exc}") from exc
        out = []
        for cid in customer_ids:
            state, static = found.get(cid, (None, None))
            out.append(
                CustomerRecord(
                    cid,
                    ProfileState.from_json(state) if state else None,
                    CustomerStatic.from_json(cid, static) if static else None,
                )
            )
        return out

    async def upsert_customers(self, customers: Sequence[CustomerStatic]) -> int:
        rows = [(c.customer_id, c.to_json()) for c in customers]

        def job(conn: sqlite3.Connection) -> int:
            conn.executemany(
                "INSERT INTO customers (customer_id, static) VALUES (?, ?) "
                "ON CONFLICT (customer_id) DO UPDATE SET static = excluded.static",
                rows,
            )
            return len(rows)

        count: int = await self._write(job)
        return count

    async def list_abandoned_carts(
        self,
        idle_since_min_us: int,
        idle_since_max_us: int,
        limit: int,
        after: tuple[int, str] | None,
    ) -> list[tuple[str, ProfileState]]:
        after_us, after_id = after if after else (idle_since_min_us - 1, "")
        rows = self._read().execute(
            "SELECT customer_id, state FROM customers "
            "WHERE abandon_us IS NOT NULL AND abandon_us >= ? AND abandon_us <= ? "
            "AND (abandon_us > ? OR (abandon_us = ? AND customer_id > ?)) "
            "ORDER BY abandon_us, customer_id LIMIT ?",
            (idle_since_min_us, idle_since_max_us, after_us, after_us, after_id, limit),
        )
        return [(cid, ProfileState.from_json(state)) for cid, state in rows]

    async def page_customer_ids(self, cursor: str, limit: int) -> tuple[list[str], str]:
        try:
            rows = (
                self._read()
                .execute(
                    "SELECT customer_id FROM customers WHERE customer_id > ? "
                    "AND state IS NOT NULL ORDER BY customer_id LIMIT ?",
                    (cursor, limit),
                )
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"profile database read failed: {exc}") from exc
        ids = [r[0] for r in rows]
        return ids, ids[-1] if len(ids) == limit else ""

    async def scan_states(self, batch: int = 500) -> AsyncIterator[list[tuple[str, ProfileState]]]:
        last = ""
        while True:
            rows = (
                self._read()
                .execute(
                    "SELECT customer_id, state FROM customers WHERE customer_id > ? "
                    "AND state IS NOT NULL ORDER BY customer_id LIMIT ?",
                    (last, batch),
                )
                .fetchall()
            )
            if not rows:
                return
            last = rows[-1][0]
            yield [(cid, ProfileState.from_json(state)) for cid, state in rows]

    # --- catalog --------------------------------------------------------------------

    async def upsert_items(
        self, items: Sequence[common_pb2.Item], now_us: int, only_missing: bool = False
    ) -> tuple[int, int]:
        batch = [common_pb2.Item.FromString(i.SerializeToString()) for i in items]

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            existing: dict[str, common_pb2.Item] = {}
            ids = list({i.item_id for i in batch})
            for part in _chunks(ids):
                marks = ",".join("?" * len(part))
                for item_id, data in conn.execute(
                    f"SELECT item_id, data FROM items WHERE item_id IN ({marks})", part
                ):
                    existing[item_id] = _item_from_row(data)
            created = updated = 0
            rows = []
            for item in batch:
                old = existing.get(item.item_id)
                if old is not None and only_missing:
                    continue
                if old is not None and old.HasField("created_at"):
                    item.created_at.CopyFrom(old.created_at)
                elif not item.HasField("created_at"):
                    item.created_at.CopyFrom(us_to_ts(now_us))
                if old is None:
                    created += 1
                else:
                    updated += 1
                existing[item.item_id] = item
                rows.append((item.item_id, item.category, item.stock, item.SerializeToString()))
            first = _take_seqs(conn, len(rows))
            conn.executemany(
                "INSERT OR REPLACE INTO items (item_id, category, stock, data, change_seq) "
                "VALUES (?, ?, ?, ?, ?)",
                [(*row, first + n) for n, row in enumerate(rows)],
            )
            return created, updated

        result: tuple[int, int] = await self._write(job)
        return result

    async def get_items(self, item_ids: Sequence[str]) -> dict[str, common_pb2.Item]:
        return self.get_items_sync(item_ids)

    def get_items_sync(self, item_ids: Sequence[str]) -> dict[str, common_pb2.Item]:
        out: dict[str, common_pb2.Item] = {}
        conn = self._read()
        try:
            for part in _chunks(list(dict.fromkeys(item_ids))):
                marks = ",".join("?" * len(part))
                for item_id, data in conn.execute(
                    f"SELECT item_id, data FROM items WHERE item_id IN ({marks})", part
                ):
                    out[item_id] = _item_from_row(data)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"profile database read failed: {exc}") from exc
        return out

    async def update_stock(self, changes: Sequence[StockChange]) -> list[common_pb2.Item]:
        todo = list(changes)

        def job(conn: sqlite3.Connection) -> list[common_pb2.Item]:
            items: dict[str, common_pb2.Item] = {}
            ids = list({c.item_id for c in todo})
            for part in _chunks(ids):
                marks = ",".join("?" * len(part))
                for item_id, data in conn.execute(
                    f"SELECT item_id, data FROM items WHERE item_id IN ({marks})", part
                ):
                    items[item_id] = _item_from_row(data)
            missing = [i for i in ids if i not in items]
            if missing:
                raise UnknownItems(f"unknown item ids: {', '.join(sorted(missing)[:10])}")
            out = []
            for change in todo:
                item = items[change.item_id]
                item.stock = change.apply(item.stock)
                out.append(common_pb2.Item.FromString(item.SerializeToString()))
            first = _take_seqs(conn, len(items))
            conn.executemany(
                "UPDATE items SET stock = ?, data = ?, change_seq = ? WHERE item_id = ?",
                [
                    (i.stock, i.SerializeToString(), first + n, i.item_id)
                    for n, i in enumerate(items.values())
                ],
            )
            return out

        result: list[common_pb2.Item] = await self._write(job)
        return result

    async def list_items(self, limit: int, after: str, category: str) -> list[common_pb2.Item]:
        if category:
            rows = self._read().execute(
                "SELECT data FROM items WHERE category = ? AND item_id > ? "
                "ORDER BY item_id LIMIT ?",
                (category, after, limit),
            )
        else:
            rows = self._read().execute(
                "SELECT data FROM items WHERE item_id > ? ORDER BY item_id LIMIT ?",
                (after, limit),
            )
        return [_item_from_row(data) for (data,) in rows]

    async def item_changes(self, after: int, limit: int) -> ItemChanges:
        conn = self._read()
        conn.execute("BEGIN")  # one snapshot for the head and the rows
        try:
            meta = dict(
                conn.execute(
                    "SELECT key, value FROM meta WHERE key IN ('item_seq', 'catalog_epoch')"
                ).fetchall()
            )
            rows = conn.execute(
                "SELECT change_seq, data FROM items WHERE change_seq > ? "
                "ORDER BY change_seq LIMIT ?",
                (after, limit),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return ItemChanges(
            items=[_item_from_row(data) for _, data in rows],
            last_seq=int(rows[-1][0]) if rows else after,
            head=int(meta.get("item_seq", 0)),
            epoch=str(meta.get("catalog_epoch", "")),
        )

    async def trending(
        self, category: str, limit: int, offset: int
    ) -> tuple[list[tuple[str, float]], int | None]:
        conn = self._read()
        conn.execute("BEGIN")  # one snapshot for the anchor and the scores
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'trend_anchor_us'").fetchone()
            rows = conn.execute(
                "SELECT item_id, score FROM trending WHERE scope = ? "
                "ORDER BY score DESC, item_id LIMIT ? OFFSET ?",
                (category, limit, offset),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return [(r[0], float(r[1])) for r in rows], int(row[0]) if row else None

    # --- maintenance ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        conn = self._read()
        return {
            "schema_version": schema_version(conn),
            "events": conn.execute("SELECT COUNT(*) FROM events").fetchone()[0],
            "customers": conn.execute("SELECT COUNT(*) FROM customers").fetchone()[0],
            "items": conn.execute("SELECT COUNT(*) FROM items").fetchone()[0],
        }
