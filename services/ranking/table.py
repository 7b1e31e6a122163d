"""The ranking service's item table: the one place ranking reads item attributes.

Ranking keeps the catalogue attributes its rules and features need in memory, as
arrays by row (``price[row]``, ``stock[row]``, ...), loaded from the profile service's
catalogue once and then kept fresh from its change feed (``ListItemChanges``: every
``catalog_refresh_s`` seconds, the items created or changed since the last refresh),
so a ``RankRequest`` carries candidate ids and scores, not 200 ``Item`` messages.

- :class:`CatalogTable` is an immutable snapshot: a refresh builds a new one (the
  changed rows written into copies of the arrays) and swaps the reference, so a Rank
  call always sees one consistent table.
- :class:`CandidateArrays` are the table's rows for one request's candidates (unknown
  ids: ``known`` False, stock -1, no category, no boost). Items sent in the request
  (``RankRequest.items``, kept for callers without a catalogue table) override the
  table's rows for their ids.

New item attributes for ranking (ranker features) are added here as columns, so the
rules, the features and the ranker all read them from one table.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import TYPE_CHECKING, Protocol

import grpc
import numpy as np
from prometheus_client import Counter

from mercato.v1 import common_pb2, profile_pb2
from services.common.errors import InvalidArgument
from services.common.memory import trim
from services.common.tasks import cancel_tasks

if TYPE_CHECKING:
    from services.ranking.rules import ItemInfo

log = logging.getLogger("mercato.ranking")
# ProfileServiceStub.ListItems / GetItems of an asyncio channel: (request, timeout=...).
ListItems = Callable[..., Awaitable[profile_pb2.ListItemsResponse]]
GetItems = Callable[..., Awaitable[profile_pb2.GetItemsResponse]]
ListItemChanges = Callable[..., Awaitable[profile_pb2.ListItemChangesResponse]]
CATALOG_ITEMS = Counter(
    "mercato_ranking_catalog_items_total",
    "Catalogue items received for the item table: full loads, or the changes since the last "
    "refresh.",
    ["how"],
)
CATALOG_REFRESHES = Counter(
    "mercato_ranking_catalog_refreshes_total",
    "Refreshes of the item table: full loads, or asking for the changes since the last one.",
    ["how"],
)
MAX_FETCH = 1000  # ids per GetItems call for candidates the table does not know yet

MAX_ID_BYTES = 128


def bad_id(value: str) -> str | None:
    """Why ``value`` is not a valid item id, or None."""
    if not value:
        return "must not be empty"
    # Characters never take fewer bytes than one, so only long ids need encoding.
    if len(value) * 4 > MAX_ID_BYTES and len(value.encode()) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


class RowIndex(Protocol):
    """A table with its own rows by item id (the ranker bundle's ``ItemTable``)."""

    @property
    def row(self) -> Mapping[str, int]: ...


def _code(category: str, names: list[str], codes: dict[str, int]) -> int:
    """Code of ``category`` in ``names`` (appended when new); -1 for none."""
    if not category:
        return -1
    code = codes.get(category)
    if code is None:
        code = codes[category] = len(names)
        names.append(category)
    return code


@dataclass(frozen=True)
class CandidateArrays:
    """Item attributes of one request's candidates, row j = candidate j.

    ``category`` holds codes into ``category_names`` (-1 = uncategorised or unknown);
    ``stock`` is -1 where the item is unknown."""

    known: np.ndarray  # bool
    category: np.ndarray  # int32 codes
    category_names: Sequence[str]
    price: np.ndarray  # float64, 0 = unknown
    stock: np.ndarray  # int64, -1 = unknown
    margin: np.ndarray  # float64
    replenishable: np.ndarray  # bool
    promoted: np.ndarray  # bool
    table_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # The table the rows were read from (None: built without one).
    table: CatalogTable | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.known)

    def rows_in(self, ids: Sequence[str], index: RowIndex) -> np.ndarray:
        """The candidates' (``ids``, row j = candidate j) rows in another table
        ``index`` (the ranker's item table), -1 where it has none: through the
        catalogue table's map of its rows into ``index`` (:meth:`CatalogTable.rows_in`)
        for the candidates it holds, by id for the others. The same rows as looking
        every id up in ``index.row``, without a second look-up by id per candidate."""
        rows, get = self.table_rows, index.row.get
        if self.table is None or len(rows) != len(ids) or not len(self.table):
            return np.fromiter(map(get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
        out = self.table.rows_in(index)[np.maximum(rows, 0)].astype(np.int64)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            out[missing] = [get(ids[j], -1) for j in missing.tolist()]
        return out

    def category_strings(self) -> list[str]:
        """Category name per candidate ("" = none)."""
        names = np.asarray([*self.category_names, ""], dtype=object)
        return names[self.category].tolist()  # type: ignore[no-any-return]

    @classmethod
    def empty(cls, n: int) -> CandidateArrays:
        return cls(
            known=np.zeros(n, dtype=bool),
            category=np.full(n, -1, dtype=np.int32),
            category_names=(),
            price=np.zeros(n),
            stock=np.full(n, -1, dtype=np.int64),
            margin=np.zeros(n),
            replenishable=np.zeros(n, dtype=bool),
            promoted=np.zeros(n, dtype=bool),
            table_rows=np.full(n, -1, dtype=np.int64),
        )

    def overlay(self, ids: Sequence[str], items: Mapping[str, common_pb2.Item]) -> CandidateArrays:
        """A copy where candidates with an entry in ``items`` take its attributes."""
        at = [(j, items[i]) for j, i in enumerate(ids) if i in items]
        if not at:
            return self
        names = list(self.category_names)
        codes = {c: k for k, c in enumerate(names)}
        out = replace(
            self,
            known=self.known.copy(),
            category=self.category.copy(),
            category_names=names,
            price=self.price.copy(),
            stock=self.stock.copy(),
            margin=self.margin.copy(),
            replenishable=self.replenishable.copy(),
            promoted=self.promoted.copy(),
        )
        for j, item in at:
            out.known[j] = True
            out.category[j] = _code(item.category, names, codes)
            out.price[j] = item.price
            out.stock[j] = item.stock
            out.margin[j] = item.margin
            out.replenishable[j] = item.replenishable
            out.promoted[j] = item.promoted
        return out

    @classmethod
    def from_infos(cls, ids: Sequence[str], items: Mapping[str, ItemInfo]) -> CandidateArrays:
        """Arrays of ``ids`` from :class:`~services.ranking.rules.ItemInfo` details (a
        missing id, or one with ``stock`` None, is unknown)."""
        out = cls.empty(len(ids))
        names: list[str] = []
        codes: dict[str, int] = {}
        for j, item_id in enumerate(ids):
            info = items.get(item_id)
            if info is None:
                continue
            out.category[j] = _code(info.category, names, codes)
            out.price[j] = info.price
            out.margin[j] = info.margin
            out.replenishable[j] = info.replenishable
            out.promoted[j] = info.promoted
            if info.stock is not None:
                out.known[j] = True
                out.stock[j] = info.stock
        return replace(out, category_names=names)


def validate_items(items: Sequence[common_pb2.Item], field_name: str = "items") -> None:
    """INVALID_ARGUMENT for an item the rules cannot use."""
    for n, item in enumerate(items):
        bad = bad_id(item.item_id)
        if bad:
            raise InvalidArgument(f"{field_name}[{n}].item_id {bad}")
        if not (math.isfinite(item.price) and item.price >= 0):
            raise InvalidArgument(f"{field_name}[{n}].price must be >= 0, got {item.price}")
        if item.stock < 0:
            raise InvalidArgument(f"{field_name}[{n}].stock must be >= 0, got {item.stock}")
        if not math.isfinite(item.margin):
            raise InvalidArgument(f"{field_name}[{n}].margin must be finite, got {item.margin}")


class CatalogTable:
    """Catalogue attributes as arrays by row (immutable once built: :meth:`updated`
    builds a new table and leaves this one as readers see it)."""

    # Bytes of rewritten rows' old records kept before the item blob is rebuilt (beyond
    # as many as the live records).
    COMPACT_SLACK = 1 << 20

    def __init__(self, items: Iterable[common_pb2.Item] = (), loaded_at: float = 0.0) -> None:
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self.category_names: list[str] = []
        self.category = np.zeros(0, dtype=np.int32)
        self.price = np.zeros(0, dtype=np.float64)
        self.stock = np.zeros(0, dtype=np.int64)
        self.margin = np.zeros(0, dtype=np.float64)
        self.replenishable = np.zeros(0, dtype=bool)
        self.promoted = np.zeros(0, dtype=bool)
        # Each row's whole Item, serialized (what RankRequest.return_items answers with):
        # one bytes blob and two arrays rather than an object per row. Rows rewritten by
        # a refresh point at bytes appended to the blob; the old bytes are dropped when
        # the blob is rebuilt (``_compact``).
        self.item_blob = b""
        self.item_start = np.zeros(0, dtype=np.int64)
        self.item_size = np.zeros(0, dtype=np.int32)
        self.loaded_at = loaded_at
        # (a table, each row's row in it): see rows_in; the last two tables asked for
        self._row_maps: tuple[tuple[weakref.ref[RowIndex], np.ndarray], ...] = ()
        self._write(items)

    def updated(self, items: Iterable[common_pb2.Item], loaded_at: float) -> CatalogTable:
        """A new table: this one with ``items`` (changed or new catalogue items) written
        over their rows, new ids appended. This table is left as it was (the maps of
        :meth:`rows_in` carry over: rows keep their ids, the new ones are looked up)."""
        out = copy.copy(self)
        out.loaded_at = loaded_at
        out._write(items)
        return out

    def _write(self, items: Iterable[common_pb2.Item]) -> None:
        """Write ``items`` into this table (a later entry for the same id wins). Replaces
        every array, list and dict it changes instead of changing them in place, so a
        table it was copied from stays intact."""
        latest = {item.item_id: item for item in items}
        if not latest:
            return
        n, m = len(self.ids), len(latest)
        ids = list(latest)
        rows = self.rows(ids)
        new = np.flatnonzero(rows < 0)
        if len(new):
            added = [ids[j] for j in new]
            self.ids = self.ids + added
            self.row = {**self.row, **{item_id: n + k for k, item_id in enumerate(added)}}
            rows[new] = np.arange(n, n + len(new))
        names = list(self.category_names)
        codes = {c: k for k, c in enumerate(names)}
        got = latest.values()
        size = len(self.ids)

        def column(old: np.ndarray, values: Iterable[object]) -> np.ndarray:
            out = np.empty(size, dtype=old.dtype)
            out[:n] = old
            out[rows] = np.fromiter(values, dtype=old.dtype, count=m)
            return out

        self.category = column(self.category, (_code(i.category, names, codes) for i in got))
        self.category_names = names
        self.price = column(self.price, (max(i.price, 0.0) for i in got))
        self.stock = column(self.stock, (max(int(i.stock), 0) for i in got))
        self.margin = column(self.margin, (i.margin for i in got))
        self.replenishable = column(self.replenishable, (i.replenishable for i in got))
        self.promoted = column(self.promoted, (i.promoted for i in got))
        data = [i.SerializeToString() for i in got]
        sizes = np.fromiter(map(len, data), dtype=np.int32, count=m)
        starts = len(self.item_blob) + np.cumsum(sizes, dtype=np.int64) - sizes
        self.item_blob = self.item_blob + b"".join(data)
        self.item_start = column(self.item_start, starts)
        self.item_size = column(self.item_size, sizes)
        if len(self.item_blob) > 2 * int(self.item_size.sum()) + self.COMPACT_SLACK:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the blob with only the bytes rows point at (in row order)."""
        blob, starts, sizes = self.item_blob, self.item_start.tolist(), self.item_size.tolist()
        self.item_blob = b"".join(blob[a : a + n] for a, n in zip(starts, sizes, strict=True))
        self.item_start = np.cumsum(self.item_size, dtype=np.int64) - self.item_size

    def item_bytes(self, row: int) -> bytes:
        """Row ``row``'s Item, serialized as the catalogue last sent it."""
        start = int(self.item_start[row])
        return self.item_blob[start : start + int(self.item_size[row])]

    def __len__(self) -> int:
        return len(self.ids)

    def rows_in(self, index: RowIndex) -> np.ndarray:
        """Each row's row in another table ``index`` (int32, -1 = not there), for the
        ranker's item table: built by id once per catalogue table and ``index`` (a
        refreshed table looks up only the rows it added; 11-29 ms at 100k items the
        first time, measured), so a Rank call maps its candidates' rows instead of looking each id
        up a second time. Kept for the last two tables asked for, by weak reference (a
        replaced ranker version's table is not kept alive). ``index.row`` must not
        change (the ranker's table never does: a new version is a new table)."""
        maps = tuple(m for m in self._row_maps if m[0]() is not None)
        mapped = next((m for ref, m in maps if ref() is index), np.zeros(0, dtype=np.int32))
        n = len(self.ids)
        if len(mapped) < n:  # new, or rows added since (ids never change row)
            more, get = self.ids[len(mapped) :], index.row.get
            got = np.fromiter(map(get, more, repeat(-1)), dtype=np.int32, count=len(more))
            mapped = np.concatenate([mapped, got])
            others = tuple(m for m in maps if m[0]() is not index)
            # a race builds it twice: harmless
            self._row_maps = ((weakref.ref(index), mapped), *others[:1])
        return mapped

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id (-1 = not in the table)."""
        return np.fromiter(map(self.row.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))

    def lookup(self, ids: Sequence[str]) -> CandidateArrays:
        """The rows of ``ids`` (unknown ids: not known, stock -1, no category)."""
        rows = self.rows(ids)
        known = rows >= 0
        if known.all():
            return CandidateArrays(
                known=known,
                category=self.category[rows],
                category_names=self.category_names,
                price=self.price[rows],
                stock=self.stock[rows],
                margin=self.margin[rows],
                replenishable=self.replenishable[rows],
                promoted=self.promoted[rows],
                table_rows=rows,
                table=self,
            )
        out = CandidateArrays.empty(len(ids))
        r = rows[known]
        out.known[:] = known
        out.category[known] = self.category[r]
        out.price[known] = self.price[r]
        out.stock[known] = self.stock[r]
        out.margin[known] = self.margin[r]
        out.replenishable[known] = self.replenishable[r]
        out.promoted[known] = self.promoted[r]
        return replace(out, category_names=self.category_names, table_rows=rows, table=self)


async def load_catalog(
    list_items: ListItems,
    page_size: int = 10_000,
    timeout_s: float = 30.0,
) -> CatalogTable:
    """Page through the profile service's catalogue (``ListItems``) into a table."""
    items: list[common_pb2.Item] = []
    token = ""
    while True:
        resp = await list_items(
            profile_pb2.ListItemsRequest(page_size=page_size, page_token=token),
            timeout=timeout_s,
        )
        items.extend(resp.items)
        token = resp.next_page_token
        if not token:
            break
    return CatalogTable(items, loaded_at=time.time())


async def load_changes(
    list_changes: ListItemChanges,
    cursor: str,
    page_size: int = 10_000,
    timeout_s: float = 30.0,
) -> tuple[list[common_pb2.Item], str]:
    """The catalogue items changed after ``cursor`` ("" = every item), oldest change
    first, and the cursor to follow on from (``ListItemChanges``, page after page)."""
    items: list[common_pb2.Item] = []
    while True:
        resp = await list_changes(
            profile_pb2.ListItemChangesRequest(cursor=cursor, page_size=page_size),
            timeout=timeout_s,
        )
        items.extend(resp.items)
        cursor = resp.cursor
        if not resp.more:
            return items, cursor


class CatalogFollower:
    """Keeps a :class:`CatalogTable` fresh. It loads the whole catalogue once through
    the profile service's change feed (``ListItemChanges`` from an empty cursor), then
    every ``refresh_s`` asks for the items changed since (none while the catalogue
    does not change) and applies them to a new table. It loads everything again when
    the profile service refuses the cursor (FAILED_PRECONDITION: its store was replaced
    or emptied); a profile service without the change feed (UNIMPLEMENTED) is
    reloaded in full with ``ListItems`` every period, as before the feed. A failed
    refresh keeps the table and the cursor for the next try.

    Candidates the table does not know yet (items created since the last refresh) are
    fetched on demand with one ``GetItems`` call and kept until a refresh brings them
    (ids the catalogue does not know either are remembered too, so they are asked once)."""

    def __init__(
        self,
        list_items: ListItems,
        refresh_s: float,
        page_size: int = 10_000,
        on_first_load: Callable[[], object] | None = None,
        get_items: GetItems | None = None,
        list_changes: ListItemChanges | None = None,
    ) -> None:
        self.list_items = list_items
        self.list_changes = list_changes
        self.get_items = get_items
        self.extra: dict[str, common_pb2.Item | None] = {}
        self.refresh_s = refresh_s
        self.page_size = page_size
        self.table = CatalogTable()
        self.cursor = ""  # of the change feed; "" = load everything on the next refresh
        self.loaded = asyncio.Event()
        self.on_first_load = on_first_load
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> CatalogTable:
        """Bring the table up to date now and swap it in."""
        if self.list_changes is None:
            return await self._reload()
        started = time.perf_counter()
        full = not self.cursor
        try:
            items, cursor = await load_changes(self.list_changes, self.cursor, self.page_size)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the catalogue has no change feed; reloading it in full instead")
                self.list_changes = None
                return await self._reload()
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION or full:
                raise
            log.warning("catalogue cursor refused; loading it again", extra={"error": e.details()})
            full = True
            items, cursor = await load_changes(self.list_changes, "", self.page_size)
        how = "full" if full else "changes"
        CATALOG_REFRESHES.labels(how).inc()
        CATALOG_ITEMS.labels(how).inc(len(items))
        if full:
            self._swap(CatalogTable(items, loaded_at=time.time()), started)
        elif items:
            changed = {item.item_id for item in items}
            self.extra = {k: v for k, v in self.extra.items() if k not in changed}
            self.table = self.table.updated(items, loaded_at=time.time())
        self.cursor = cursor
        return self.table

    async def _reload(self) -> CatalogTable:
        started = time.perf_counter()
        table = await load_catalog(self.list_items, self.page_size)
        CATALOG_REFRESHES.labels("full").inc()
        CATALOG_ITEMS.labels("full").inc(len(table))
        self._swap(table, started)
        return table

    def _swap(self, table: CatalogTable, started: float) -> None:
        self.table = table
        self.extra = {}
        trim()  # the pages of items parsed for the table (and the previous table)
        log.info(
            "catalogue table loaded",
            extra={"items": len(table), "ms": round((time.perf_counter() - started) * 1000, 1)},
        )

    async def newer_items(self, ids: Sequence[str], timeout_s: float) -> dict[str, common_pb2.Item]:
        """Catalogue items among ``ids`` that the table does not hold (fetched once per
        reload period); a failed fetch leaves them unknown for this call."""
        unknown = self.unknown(ids)
        extra = self.extra
        if unknown and self.get_items is not None and timeout_s > 0:
            try:
                resp = await self.get_items(
                    profile_pb2.GetItemsRequest(item_ids=unknown[:MAX_FETCH]), timeout=timeout_s
                )
            except Exception as e:
                log.warning("fetching new catalogue items failed", extra={"error": str(e)})
            else:
                for item in resp.items:
                    extra[item.item_id] = item
                for item_id in resp.missing_item_ids:
                    extra[item_id] = None
        return self.known_newer(ids)

    def unknown(self, ids: Sequence[str]) -> list[str]:
        """Ids neither in the table nor fetched since the last reload (distinct)."""
        row, extra = self.table.row, self.extra
        return [i for i in dict.fromkeys(ids) if i not in row and i not in extra]

    def known_newer(self, ids: Sequence[str]) -> dict[str, common_pb2.Item]:
        """The items among ``ids`` fetched since the last reload."""
        extra = self.extra
        if not extra:
            return {}
        out: dict[str, common_pb2.Item] = {}
        for i in ids:
            found = extra.get(i)
            if found is not None:
                out[i] = found
        return out

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("catalogue load failed; keeping the table", extra={"error": str(e)})
                if not self.loaded.is_set():
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.refresh_s)
                    continue
            else:
                if not self.loaded.is_set():
                    self.loaded.set()
                    if self.on_first_load is not None:
                        res = self.on_first_load()
                        if asyncio.iscoroutine(res):
                            await res
            await asyncio.sleep(self.refresh_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="catalogue")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_tasks(task)
