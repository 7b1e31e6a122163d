"""Redis backend: the store for many profile replicas sharing one Redis primary.

Atomicity: a batch of events is one optimistic transaction. The replica WATCHes the
batch's event-id keys, its customers' state keys and the trend anchor, reads them,
plans the batch with the same Python code as SQLite (:func:`plan_batch`), and writes
everything (event-id marks, log entries, states, cart index, trend scores) in one
MULTI/EXEC. If another replica touched any watched key meanwhile, EXEC does nothing and
the batch is planned again, so a batch is written entirely or not at all and an event
id is logged once even when two replicas receive it at the same time.

Durability: Redis acknowledges EXEC after writing it to the append-only file; with
``appendonly yes`` and ``appendfsync always`` the reply comes after the fsync, which is
what "acknowledged == durable" needs. :meth:`RedisStore.open` checks the server's
configuration and logs a warning when it is weaker (``everysec`` loses up to a second of
acknowledged events on an OS crash). Redis Cluster is not supported (a batch spans keys
of many slots); use one primary with replicas / Sentinel.

Outages: every Redis error that means "not reachable now" (refused, reset, timeout,
still loading its data) becomes :class:`StoreUnavailable` (UNAVAILABLE to callers); the
client reconnects on the next call, so the service recovers by itself.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.retry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ResponseError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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

P = ParamSpec("P")
R = TypeVar("R")

_MAX_ATTEMPTS = 50  # optimistic transaction attempts before giving up (contention)

# Multiplies every trend score by ARGV[1] (the anchor moved); KEYS[1] is the set of
# scopes, ARGV[2] the key prefix of the scope sorted sets. %.17g keeps doubles exact.
_RESCALE_LUA = """
local scopes = redis.call('SMEMBERS', KEYS[1])
for _, scope in ipairs(scopes) do
  local key = ARGV[2] .. scope
  local z = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #z, 2 do
    local s = tonumber(z[i + 1]) * tonumber(ARGV[1])
    redis.call('ZADD', key, string.format('%.17g', s), z[i])
  end
end
return #scopes
"""

# Gives every catalogue item without a change sequence number the next ones (stores
# written before the change feed): KEYS = all items, changes, sequence.
_NUMBER_ITEMS_LUA = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local seq = tonumber(redis.call('GET', KEYS[3]) or '0')
local added = 0
for _, id in ipairs(ids) do
  if not redis.call('ZSCORE', KEYS[2], id) then
    seq = seq + 1
    redis.call('ZADD', KEYS[2], seq, id)
    added = added + 1
  end
end
if added > 0 then redis.call('SET', KEYS[3], seq) end
return added
"""


def _store_error(address: str, exc: Exception) -> StoreUnavailable | None:
    """StoreUnavailable for a "Redis is not reachable now" error, None for others."""
    if isinstance(exc, BusyLoadingError):
        return StoreUnavailable(
            f"profile store (Redis at {address}) is loading its data; retry shortly"
        )
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return StoreUnavailable(f"profile store (Redis at {address}) is unreachable: {exc}")
    return None


def _unavailable(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Map "Redis is not reachable" errors of a store method to StoreUnavailable."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (BusyLoadingError, RedisConnectionError, RedisTimeoutError) as exc:
            raise _store_error(args[0].address, exc) from exc  # type: ignore[attr-defined,misc]

    return wrapper


def _unavailable_sync(fn: Callable[P, R]) -> Callable[P, R]:
    """:func:`_unavailable` for the synchronous client's methods."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (BusyLoadingError, RedisConnectionError, RedisTimeoutError) as exc:
            raise _store_error(args[0].address, exc) from exc  # type: ignore[attr-defined,misc]

    return wrapper


def _items(ids: list[str], values: Sequence[bytes | None]) -> dict[str, common_pb2.Item]:
    return {i: common_pb2.Item.FromString(v) for i, v in zip(ids, values, strict=True) if v}


class RedisStore(ProfileStore):
    """The profile store in Redis, under a key prefix."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        cfg: ProfileConfig,
        prefix: str = "mercato:",
        timeout_seconds: float = 2.0,
    ) -> None:
        super().__init__(cfg)
        self.url = url
        parts = urlsplit(url)
        self.address = f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
        self.prefix = prefix
        self.timeout = timeout_seconds
        self._r: aioredis.Redis | None = None
        self._rs: redis.Redis | None = None
        p = prefix
        self.k_log = p + "log"
        self.k_anchor = p + "tanchor"
        self.k_scopes = p + "tscopes"
        self.k_carts = p + "carts"
        self.k_items = p + "items"
        # The catalogue's change feed: the last sequence number given, each item's latest
        # number (sorted set), and the name of this sequence (a new one after a flush).
        self.k_item_seq = p + "iseq"
        self.k_changes = p + "ichanges"
        self.k_epoch = p + "iepoch"

    def k_event(self, event_id: str) -> str:
        return f"{self.prefix}e:{event_id}"

    def k_state(self, customer_id: str) -> str:
        return f"{self.prefix}s:{customer_id}"

    def k_static(self, customer_id: str) -> str:
        return f"{self.prefix}c:{customer_id}"

    def k_item(self, item_id: str) -> str:
        return f"{self.prefix}i:{item_id}"

    def k_category(self, category: str) -> str:
        return f"{self.prefix}items:{category}"

    def k_trend(self, scope: str) -> str:
        return f"{self.prefix}t:{scope}"

    @property
    def r(self) -> Any:  # redis-py's annotations do not fit decode_responses=False
        """The client (raises StoreUnavailable before open)."""
        if self._r is None:
            raise StoreUnavailable("the profile store is not open")
        return self._r

    @property
    def rs(self) -> Any:
        """The synchronous client (raises StoreUnavailable before open)."""
        if self._rs is None:
            raise StoreUnavailable("the profile store is not open")
        return self._rs

    @_unavailable
    async def open(self) -> None:
        if self._r is None:
            self._r = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # One quick retry on a fresh connection (a pooled connection may predate a
                # Redis restart); no backoff: an outage is reported at once as UNAVAILABLE.
                retry=Retry(NoBackoff(), 1),
                health_check_interval=0,
            )
        if self._rs is None:
            # The synchronous server's pool threads read through this one (a thread-safe
            # connection pool), with the same timeouts and retry.
            self._rs = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=redis.retry.Retry(NoBackoff(), 1),
                health_check_interval=0,
            )
        await self.r.ping()
        await self._check_durability()
        await self.r.set(self.k_epoch, uuid.uuid4().hex, nx=True)
        if await self.r.zcard(self.k_changes) < await self.r.zcard(self.k_items):
            added = await self.r.eval(
                _NUMBER_ITEMS_LUA, 3, self.k_items, self.k_changes, self.k_item_seq
            )
            log.info("numbered catalogue items for the change feed", extra={"items": added})

    async def _check_durability(self) -> None:
        try:
            conf = await self.r.config_get("append*")
        except ResponseError:  # CONFIG disabled (managed Redis): cannot check
            log.warning("cannot read the Redis configuration; make sure appendfsync is always")
            return
        aof = conf.get(b"appendonly", conf.get("appendonly"))
        fsync = conf.get(b"appendfsync", conf.get("appendfsync"))
        if aof not in (b"yes", "yes") or fsync not in (b"always", "always"):
            log.warning(
                "Redis does not fsync every write: acknowledged events can be lost on a "
                "crash of the Redis host; set appendonly yes and appendfsync always",
                extra={"appendonly": str(aof), "appendfsync": str(fsync)},
            )

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()
            self._r = None
        if self._rs is not None:
            self._rs.close()
            self._rs = None

    @_unavailable
    async def ping(self) -> None:
        await self.r.ping()

    # --- events ---------------------------------------------------------------------

    @_unavailable
    async def append_events(self, events: Sequence[LogEvent]) -> AppendResult:
        batch = list(events)
        ids = list(dict.fromkeys(ev.event_id for ev in batch))
        cids = list(dict.fromkeys(ev.customer_id for ev in batch))
        ev_keys = [self.k_event(i) for i in ids]
        s_keys = [self.k_state(c) for c in cids]
        async with self.r.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_ATTEMPTS):
                try:
                    await pipe.watch(*ev_keys, *s_keys, self.k_anchor)
                    values = await pipe.mget(*ev_keys, *s_keys, self.k_anchor)
                    seen = {i for i, v in zip(ids, values[: len(ids)], strict=True) if v}
                    raw_states = values[len(ids) : len(ids) + len(cids)]
                    states = {
                        c: ProfileState.from_json(v) if v else None
                        for c, v in zip(cids, raw_states, strict=True)
                    }
                    anchor = int(values[-1]) if values[-1] else None
                    plan = plan_batch(batch, seen, states, anchor, self.cfg)
                    if not plan.accepted:
                        await pipe.reset()
                        return AppendResult(0, plan.duplicates)
                    pipe.multi()
                    if plan.rescale is not None:
                        # EVAL, not EVALSHA: a restarted Redis has an empty script cache.
                        pipe.eval(
                            _RESCALE_LUA, 1, self.k_scopes, repr(plan.rescale), self.prefix + "t:"
                        )
                    if plan.anchor_us is not None and plan.anchor_us != anchor:
                        pipe.set(self.k_anchor, str(plan.anchor_us))
                    for ev in plan.accepted:
                        pipe.set(self.k_event(ev.event_id), b"1")
                        pipe.xadd(self.k_log, {"e": ev.to_json()})
                    for cid, state in plan.states.items():
                        pipe.set(self.k_state(cid), state.to_json())
                        key = state.abandon_key()
                        if key is None:
                            pipe.zrem(self.k_carts, cid)
                        else:
                            pipe.zadd(self.k_carts, {cid: key})
                    scopes = {scope for scope, _ in plan.increments}
                    if scopes:
                        pipe.sadd(self.k_scopes, *scopes)
                    for (scope, item_id), inc in plan.increments.items():
                        pipe.zincrby(self.k_trend(scope), inc, item_id)
                    await pipe.execute()
                    return AppendResult(len(plan.accepted), plan.duplicates)
                except WatchError:
                    continue
        raise StoreUnavailable("profile store is too busy (write contention); retry")

    @_unavailable
    async def read_log(self, after: str, limit: int) -> tuple[list[LogEvent], str]:
        start = f"({after}" if after else "-"
        rows = await self.r.xrange(self.k_log, min=start, max="+", count=limit)
        events = [LogEvent.from_json(fields[b"e"]) for _, fields in rows]
        cursor = rows[-1][0].decode() if rows else after
        return events, cursor

    # --- customers ------------------------------------------------------------------

    @_unavailable
    async def get_customers(self, customer_ids: Sequence[str]) -> list[CustomerRecord]:
        return self._records(customer_ids, await self.r.mget(self._customer_keys(customer_ids)))

    @_unavailable_sync
    def get_customers_sync(self, customer_ids: Sequence[str]) -> list[CustomerRecord]:
        return self._records(customer_ids, self.rs.mget(self._customer_keys(customer_ids)))

    def _customer_keys(self, customer_ids: Sequence[str]) -> list[str]:
        keys: list[str] = []
        for cid in customer_ids:
            keys.append(self.k_state(cid))
            keys.append(self.k_static(cid))
        return keys

    @staticmethod
    def _records(customer_ids: Sequence[str], values: Sequence[Any]) -> list[CustomerRecord]:
        out = []
        for n, cid in enumerate(customer_ids):
            state, static = values[2 * n], values[2 * n + 1]
            out.append(
                CustomerRecord(
                    cid,
                    ProfileState.from_json(state) if state else None,
                    CustomerStatic.from_json(cid, static) if static else None,
                )
            )
        return out

    @_unavailable
    async def upsert_customers(self, customers: Sequence[CustomerStatic]) -> int:
        if customers:
            await self.r.mset({self.k_static(c.customer_id): c.to_json() for c in customers})
        return len(customers)

    @_unavailable
    async def list_abandoned_carts(
        self,
        idle_since_min_us: int,
        idle_since_max_us: int,
        limit: int,
        after: tuple[int, str] | None,
    ) -> list[tuple[str, ProfileState]]:
        found: list[str] = []
        low = max(after[0], idle_since_min_us) if after else idle_since_min_us
        offset = 0
        while len(found) < limit:
            chunk = await self.r.zrangebyscore(
                self.k_carts,
                low,
                idle_since_max_us,
                start=offset,
                num=limit + 64,
                withscores=True,
            )
            if not chunk:
                break
            for member, score in chunk:
                cid = member.decode()
                if after and int(score) == after[0] and cid <= after[1]:
                    continue
                found.append(cid)
                if len(found) == limit:
                    break
            offset += len(chunk)
        if not found:
            return []
        states = await self.r.mget([self.k_state(c) for c in found])
        return [(c, ProfileState.from_json(s)) for c, s in zip(found, states, strict=True) if s]

    @_unavailable
    async def page_customer_ids(self, cursor: str, limit: int) -> tuple[list[str], str]:
        cut = len(self.k_state(""))
        nxt, keys = await self.r.scan(int(cursor or 0), match=self.k_state("*"), count=limit)
        # SCAN guarantees every key present for the whole scan is returned; one may come
        # twice across pages, so callers de-duplicate within a page only if they must.
        return [k.decode()[cut:] for k in keys], "" if int(nxt) == 0 else str(nxt)

    async def scan_states(self, batch: int = 500) -> AsyncIterator[list[tuple[str, ProfileState]]]:
        cut = len(self.k_state(""))
        async for keys in self._scan(self.k_state("*"), batch):
            values = await self.r.mget(keys)
            yield [
                (k.decode()[cut:], ProfileState.from_json(v))
                for k, v in zip(keys, values, strict=True)
                if v
            ]

    async def _scan(self, match: str, batch: int) -> AsyncIterator[list[bytes]]:
        cursor = 0
        while True:
            cursor, keys = await self.r.scan(cursor, match=match, count=batch)
            if keys:
                yield keys
            if cursor == 0:
                return

    # --- catalog --------------------------------------------------------------------

    @_unavailable
    async def upsert_items(
        self, items: Sequence[common_pb2.Item], now_us: int, only_missing: bool = False
    ) -> tuple[int, int]:
        batch = [common_pb2.Item.FromString(i.SerializeToString()) for i in items]
        ids = list(dict.fromkeys(i.item_id for i in batch))
        keys = [self.k_item(i) for i in ids]
        async with self.r.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_ATTEMPTS):
                try:
                    await pipe.watch(*keys, self.k_item_seq)
                    *values, seq = await pipe.mget(*keys, self.k_item_seq)
                    seq = int(seq or 0)
                    existing = {
                        i: common_pb2.Item.FromString(v)
                        for i, v in zip(ids, values, strict=True)
                        if v
                    }
                    stored = dict(existing)
                    created = updated = 0
                    pipe.multi()
                    for item in batch:
                        old = stored.get(item.item_id)
                        if old is not None and only_missing and item.item_id in existing:
                            continue
                        if old is not None and old.HasField("created_at"):
                            item.created_at.CopyFrom(old.created_at)
                        elif not item.HasField("created_at"):
                            item.created_at.CopyFrom(us_to_ts(now_us))
                        if old is None:
                            created += 1
                        else:
                            updated += 1
                            if old.category != item.category:
                                pipe.zrem(self.k_category(old.category), item.item_id)
                        stored[item.item_id] = item
                        seq += 1
                        pipe.set(self.k_item(item.item_id), item.SerializeToString())
                        pipe.zadd(self.k_items, {item.item_id: 0})
                        pipe.zadd(self.k_category(item.category), {item.item_id: 0})
                        pipe.zadd(self.k_changes, {item.item_id: seq})
                    self._end_changes(pipe, seq)
                    await pipe.execute()
                    return created, updated
                except WatchError:
                    continue
        raise StoreUnavailable("profile store is too busy (write contention); retry")

    @_unavailable
    async def get_items(self, item_ids: Sequence[str]) -> dict[str, common_pb2.Item]:
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        return _items(ids, await self.r.mget([self.k_item(i) for i in ids]))

    @_unavailable_sync
    def get_items_sync(self, item_ids: Sequence[str]) -> dict[str, common_pb2.Item]:
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        return _items(ids, self.rs.mget([self.k_item(i) for i in ids]))

    @_unavailable
    async def update_stock(self, changes: Sequence[StockChange]) -> list[common_pb2.Item]:
        ids = list(dict.fromkeys(c.item_id for c in changes))
        keys = [self.k_item(i) for i in ids]
        async with self.r.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_ATTEMPTS):
                try:
                    await pipe.watch(*keys, self.k_item_seq)
                    *values, seq = await pipe.mget(*keys, self.k_item_seq)
                    seq = int(seq or 0)
                    items = {
                        i: common_pb2.Item.FromString(v)
                        for i, v in zip(ids, values, strict=True)
                        if v
                    }
                    missing = [i for i in ids if i not in items]
                    if missing:
                        await pipe.reset()
                        raise UnknownItems(f"unknown item ids: {', '.join(sorted(missing)[:10])}")
                    out = []
                    for change in changes:
                        item = items[change.item_id]
                        item.stock = change.apply(item.stock)
                        out.append(common_pb2.Item.FromString(item.SerializeToString()))
                    pipe.multi()
                    for item in items.values():
                        seq += 1
                        pipe.set(self.k_item(item.item_id), item.SerializeToString())
                        pipe.zadd(self.k_changes, {item.item_id: seq})
                    self._end_changes(pipe, seq)
                    await pipe.execute()
                    return out
                except WatchError:
                    continue
        raise StoreUnavailable("profile store is too busy (write contention); retry")

    @_unavailable
    async def list_items(self, limit: int, after: str, category: str) -> list[common_pb2.Item]:
        key = self.k_category(category) if category else self.k_items
        low = f"({after}" if after else "-"
        ids = await self.r.zrangebylex(key, low, "+", start=0, num=limit)
        if not ids:
            return []
        values = await self.r.mget([self.k_item(i.decode()) for i in ids])
        return [common_pb2.Item.FromString(v) for v in values if v]

    def _end_changes(self, pipe: Any, seq: int) -> None:
        """The end of a catalogue write (in its MULTI): the last sequence number given,
        and a sequence name when there is none (the first write after a flush)."""
        pipe.set(self.k_item_seq, str(seq))
        pipe.set(self.k_epoch, uuid.uuid4().hex, nx=True)

    @_unavailable
    async def item_changes(self, after: int, limit: int) -> ItemChanges:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.get(self.k_item_seq)
            pipe.get(self.k_epoch)
            pipe.zrangebyscore(
                self.k_changes, f"({after}", "+inf", start=0, num=limit, withscores=True
            )
            head, epoch, rows = await pipe.execute()
        # An item written again after this read comes with its newer attributes here and
        # once more in a later call (its number moved on): the same end state.
        values = await self.r.mget([self.k_item(m.decode()) for m, _ in rows]) if rows else []
        return ItemChanges(
            items=[common_pb2.Item.FromString(v) for v in values if v],
            last_seq=int(rows[-1][1]) if rows else after,
            head=int(head or 0),
            epoch=epoch.decode() if epoch else "",
        )

    @_unavailable
    async def trending(
        self, category: str, limit: int, offset: int
    ) -> tuple[list[tuple[str, float]], int | None]:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.get(self.k_anchor)
            pipe.zrevrange(self.k_trend(category), offset, offset + limit - 1, withscores=True)
            anchor, rows = await pipe.execute()
        return [(m.decode(), float(s)) for m, s in rows], int(anchor) if anchor else None

    # --- maintenance ------------------------------------------------------------------

    @_unavailable
    async def flush_prefix(self) -> int:
        """Delete every key under the prefix (tests, benchmarks). Returns keys deleted."""
        deleted = 0
        async for keys in self._scan(self.prefix + "*", 1000):
            deleted += int(await self.r.delete(*keys))
        return deleted
