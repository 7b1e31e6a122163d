"""gRPC server of the profile service.

Health: the service reports SERVING only while its store answers. A background task
pings the store every ``store_check_seconds``; while the store is down (Redis stopped,
database unopenable) health is NOT_SERVING and every store-backed call answers
UNAVAILABLE with the reason, and the process stays up and recovers by itself when the
store is back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import grpc
from prometheus_client import Counter

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc
from services.common.deadline import ensure_time_left
from services.common.errors import FailedPrecondition, InvalidArgument, require
from services.common.server import BaseService, run_service
from services.profile.ingest import MAX_ID_BYTES, check_id, describe_errors, prepare_events
from services.profile.logic import (
    CustomerStatic,
    build_cart,
    build_profile,
    decay_to,
    ts_to_us,
)
from services.profile.settings import ProfileSettings
from services.profile.store import (
    AppendResult,
    CustomerRecord,
    ProfileStore,
    StockChange,
    StoreUnavailable,
    make_store,
)

log = logging.getLogger("mercato.profile")

EVENTS = Counter(
    "mercato_profile_events_total",
    "Events received by TrackEvents, by outcome (accepted, duplicate, rejected).",
    ["outcome"],
)
STORE_UP = Counter(
    "mercato_profile_store_transitions_total",
    "Store availability changes seen by the health check, by new state (up, down).",
    ["state"],
)

MAX_CATEGORY_BYTES = 256


def now_us() -> int:
    return time.time_ns() // 1000


def _encode_token(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def _decode_token(token: str, what: str, field: str = "page_token") -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{field} is not a token of {what}") from exc


def _require_id(value: str, what: str) -> None:
    problem = check_id(value, what)
    if problem:
        raise InvalidArgument(problem)


def _require_count(n: int, what: str, most: int) -> None:
    if n == 0:
        raise InvalidArgument(f"{what} is empty: send 1 to {most}")
    if n > most:
        raise InvalidArgument(f"{what} has {n} entries; at most {most} per call")


def validate_item(item: common_pb2.Item) -> str | None:
    """Why a catalog item is invalid, or None."""
    problem = check_id(item.item_id, "item_id")
    if problem:
        return problem
    if not math.isfinite(item.price) or item.price < 0:
        return f"price must be a finite number >= 0, got {item.price}"
    if item.stock < 0:
        return f"stock must be >= 0, got {item.stock}"
    if not math.isfinite(item.margin):
        return "margin must be a finite number"
    if len(item.category.encode("utf-8")) > MAX_CATEGORY_BYTES:
        return f"category is longer than {MAX_CATEGORY_BYTES} bytes"
    return None


def _items_answer(
    ids: list[str], found: dict[str, common_pb2.Item]
) -> profile_pb2.GetItemsResponse:
    return profile_pb2.GetItemsResponse(
        items=[found[i] for i in ids if i in found],
        missing_item_ids=[i for i in ids if i not in found],
    )


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    """RPC handlers: validate, call the store, shape the answer."""

    def __init__(self, settings: ProfileSettings, store: ProfileStore) -> None:
        self.settings = settings
        self.cfg = settings.profile_config()
        self.store = store
        self.max_batch = settings.max_batch

    async def TrackEvents(
        self,
        request: profile_pb2.ProfileServiceTrackEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> profile_pb2.ProfileServiceTrackEventsResponse:
        events = request.events
        _require_count(len(events), "events", self.max_batch)
        now = now_us()
        item_ids = {
            e.item_id for e in events if e.item_id and len(e.item_id.encode()) <= MAX_ID_BYTES
        }
        catalog = await self.store.get_items(sorted(item_ids)) if item_ids else {}
        good, errors = prepare_events(events, catalog, now, self.settings.max_future_skew_seconds)
        if errors and not request.partial_accept:
            EVENTS.labels("rejected").inc(len(events))
            raise InvalidArgument(describe_errors(errors))
        result = await self.store.append_events(good) if good else AppendResult(0, 0)
        EVENTS.labels("accepted").inc(result.accepted)
        EVENTS.labels("duplicate").inc(result.duplicates)
        EVENTS.labels("rejected").inc(len(errors))
        return profile_pb2.ProfileServiceTrackEventsResponse(
            accepted=result.accepted, duplicates=result.duplicates, errors=errors
        )

    # The reads on every Recommend's path have synchronous twins (``X_sync``): with
    # server_mode=sync they run whole on the pool thread, through the store's
    # thread-safe reads, and never wait for the event loop. Writes stay on the loop.

    async def GetProfile(
        self, request: profile_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.GetProfileResponse:
        _require_id(request.customer_id, "customer_id")
        (rec,) = await self.store.get_customers([request.customer_id])
        return self._profile(rec, context)

    def GetProfile_sync(
        self, request: profile_pb2.GetProfileRequest, context: grpc.ServicerContext
    ) -> profile_pb2.GetProfileResponse:
        _require_id(request.customer_id, "customer_id")
        (rec,) = self.store.get_customers_sync([request.customer_id])
        return self._profile(rec, context)

    def _profile(self, rec: CustomerRecord, context: Any) -> profile_pb2.GetProfileResponse:
        ensure_time_left(context, "build_profile")
        return profile_pb2.GetProfileResponse(
            profile=build_profile(rec.customer_id, rec.state, rec.static, now_us(), self.cfg)
        )

    async def BatchGetProfiles(
        self, request: profile_pb2.BatchGetProfilesRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.BatchGetProfilesResponse:
        return self._profiles(await self.store.get_customers(self._batch_ids(request)))

    def BatchGetProfiles_sync(
        self, request: profile_pb2.BatchGetProfilesRequest, context: grpc.ServicerContext
    ) -> profile_pb2.BatchGetProfilesResponse:
        return self._profiles(self.store.get_customers_sync(self._batch_ids(request)))

    def _batch_ids(self, request: profile_pb2.BatchGetProfilesRequest) -> list[str]:
        ids = list(request.customer_ids)
        _require_count(len(ids), "customer_ids", min(1000, self.max_batch))
        for cid in ids:
            _require_id(cid, "customer_ids entry")
        return ids

    def _profiles(self, records: list[CustomerRecord]) -> profile_pb2.BatchGetProfilesResponse:
        now = now_us()
        return profile_pb2.BatchGetProfilesResponse(
            profiles=[
                build_profile(r.customer_id, r.state, r.static, now, self.cfg) for r in records
            ]
        )

    async def UpsertCustomers(
        self, request: profile_pb2.UpsertCustomersRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.UpsertCustomersResponse:
        _require_count(len(request.customers), "customers", self.max_batch)
        out = []
        for n, c in enumerate(request.customers):
            problem = check_id(c.customer_id, "customer_id")
            if problem:
                raise InvalidArgument(f"customer {n}: {problem}; nothing was written")
            out.append(CustomerStatic(c.customer_id, c.country, c.segment, dict(c.attributes)))
        return profile_pb2.UpsertCustomersResponse(upserted=await self.store.upsert_customers(out))

    async def GetCart(
        self, request: profile_pb2.GetCartRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.GetCartResponse:
        _require_id(request.customer_id, "customer_id")
        (rec,) = await self.store.get_customers([request.customer_id])
        return profile_pb2.GetCartResponse(cart=build_cart(request.customer_id, rec.state))

    def GetCart_sync(
        self, request: profile_pb2.GetCartRequest, context: grpc.ServicerContext
    ) -> profile_pb2.GetCartResponse:
        _require_id(request.customer_id, "customer_id")
        (rec,) = self.store.get_customers_sync([request.customer_id])
        return profile_pb2.GetCartResponse(cart=build_cart(request.customer_id, rec.state))

    async def ListAbandonedCarts(
        self, request: profile_pb2.ListAbandonedCartsRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.ListAbandonedCartsResponse:
        require(request.idle_seconds > 0, "idle_seconds must be > 0")
        require(
            request.max_idle_seconds == 0 or request.max_idle_seconds >= request.idle_seconds,
            "max_idle_seconds must be 0 (no limit) or >= idle_seconds",
        )
        require(0 <= request.page_size <= 1000, "page_size must be between 0 and 1000")
        size = request.page_size or 100
        as_of = ts_to_us(request.as_of) if request.HasField("as_of") else now_us()
        newest = as_of - request.idle_seconds * 1_000_000
        oldest = as_of - request.max_idle_seconds * 1_000_000 if request.max_idle_seconds else 0
        after = None
        if request.page_token:
            raw = _decode_token(request.page_token, "ListAbandonedCarts")
            if not (isinstance(raw, list) and len(raw) == 2):
                raise InvalidArgument("page_token is not a token of ListAbandonedCarts")
            after = (int(raw[0]), str(raw[1]))
        rows = await self.store.list_abandoned_carts(oldest, newest, size + 1, after)
        resp = profile_pb2.ListAbandonedCartsResponse(
            carts=[build_cart(cid, state) for cid, state in rows[:size]]
        )
        if len(rows) > size:
            cid, state = rows[size - 1]
            resp.next_page_token = _encode_token([state.cart_updated_us, cid])
        return resp

    async def UpsertItems(
        self, request: profile_pb2.UpsertItemsRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.UpsertItemsResponse:
        _require_count(len(request.items), "items", self.max_batch)
        for n, item in enumerate(request.items):
            problem = validate_item(item)
            if problem:
                raise InvalidArgument(
                    f"item {n} ({item.item_id or 'no id'}): {problem}; nothing was written"
                )
        created, updated = await self.store.upsert_items(list(request.items), now_us())
        return profile_pb2.UpsertItemsResponse(created=created, updated=updated)

    async def UpdateStock(
        self, request: profile_pb2.UpdateStockRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.UpdateStockResponse:
        _require_count(len(request.updates), "updates", self.max_batch)
        changes = []
        for n, u in enumerate(request.updates):
            problem = check_id(u.item_id, "item_id")
            kind = u.WhichOneof("change")
            if problem is None and kind is None:
                problem = "set one of set_to or delta"
            if problem is None and kind == "set_to" and u.set_to < 0:
                problem = f"set_to must be >= 0, got {u.set_to}"
            if problem:
                raise InvalidArgument(f"update {n}: {problem}; nothing was written")
            changes.append(
                StockChange(u.item_id, set_to=u.set_to)
                if kind == "set_to"
                else StockChange(u.item_id, delta=u.delta)
            )
        return profile_pb2.UpdateStockResponse(items=await self.store.update_stock(changes))

    async def GetItems(
        self, request: profile_pb2.GetItemsRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.GetItemsResponse:
        ids = self._item_ids(request)
        return _items_answer(ids, await self.store.get_items(ids))

    def GetItems_sync(
        self, request: profile_pb2.GetItemsRequest, context: grpc.ServicerContext
    ) -> profile_pb2.GetItemsResponse:
        ids = self._item_ids(request)
        return _items_answer(ids, self.store.get_items_sync(ids))

    def _item_ids(self, request: profile_pb2.GetItemsRequest) -> list[str]:
        ids = list(dict.fromkeys(request.item_ids))
        _require_count(len(request.item_ids), "item_ids", self.max_batch)
        for i in ids:
            _require_id(i, "item_ids entry")
        return ids

    async def ListCustomers(
        self, request: profile_pb2.ListCustomersRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.ListCustomersResponse:
        require(0 <= request.page_size <= 1000, "page_size must be between 0 and 1000")
        require(request.min_recency_days >= 0, "min_recency_days must be >= 0")
        require(0 <= request.min_category_affinity <= 1, "min_category_affinity must be in [0, 1]")
        require(
            not request.min_category_affinity or bool(request.category),
            "min_category_affinity needs a category",
        )
        cursor = ""
        if request.page_token:
            raw = _decode_token(request.page_token, "ListCustomers")
            if not isinstance(raw, str):
                raise InvalidArgument("page_token is not a token of ListCustomers")
            cursor = raw
        ids, nxt = await self.store.page_customer_ids(cursor, request.page_size or 100)
        resp = profile_pb2.ListCustomersResponse()
        if ids:
            now = now_us()
            for rec in await self.store.get_customers(list(dict.fromkeys(ids))):
                if rec.state is None:
                    continue
                prof = build_profile(rec.customer_id, rec.state, rec.static, now, self.cfg)
                if request.segment and prof.segment != request.segment:
                    continue
                if request.min_recency_days and not (
                    prof.rfm.frequency > 0 and prof.rfm.recency_days >= request.min_recency_days
                ):
                    continue
                if request.category:
                    share = prof.category_affinity.get(request.category, 0.0)
                    if share <= 0 or share < request.min_category_affinity:
                        continue
                resp.profiles.append(prof)
        if nxt:
            resp.next_page_token = _encode_token(nxt)
        return resp

    async def ListItems(
        self, request: profile_pb2.ListItemsRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.ListItemsResponse:
        require(0 <= request.page_size <= 10_000, "page_size must be between 0 and 10000")
        size = request.page_size or 1000
        after = ""
        if request.page_token:
            raw = _decode_token(request.page_token, "ListItems")
            if not isinstance(raw, str):
                raise InvalidArgument("page_token is not a token of ListItems")
            after = raw
        items = await self.store.list_items(size + 1, after, request.category)
        resp = profile_pb2.ListItemsResponse(items=items[:size])
        if len(items) > size:
            resp.next_page_token = _encode_token(items[size - 1].item_id)
        return resp

    async def ListItemChanges(
        self, request: profile_pb2.ListItemChangesRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.ListItemChangesResponse:
        require(0 <= request.page_size <= 10_000, "page_size must be between 0 and 10000")
        epoch, after = "", 0
        if request.cursor:
            raw = _decode_token(request.cursor, "ListItemChanges", "cursor")
            if not (
                isinstance(raw, list)
                and len(raw) == 2
                and isinstance(raw[0], str)
                and isinstance(raw[1], int)
                and raw[1] >= 0
            ):
                raise InvalidArgument("cursor is not a cursor of ListItemChanges")
            epoch, after = raw
        changes = await self.store.item_changes(after, request.page_size or 1000)
        if request.cursor and epoch != changes.epoch:
            raise FailedPrecondition(
                "cursor is from another catalog (the store was replaced or emptied); "
                "list again from an empty cursor"
            )
        if after > changes.head:
            raise FailedPrecondition(
                f"cursor is ahead of the catalog (change {after} of {changes.head}: the store "
                "was restored from an older copy?); list again from an empty cursor"
            )
        return profile_pb2.ListItemChangesResponse(
            items=changes.items,
            cursor=_encode_token([changes.epoch, changes.last_seq]),
            more=changes.last_seq < changes.head,
        )

    async def GetTrending(
        self, request: profile_pb2.GetTrendingRequest, context: grpc.aio.ServicerContext
    ) -> profile_pb2.GetTrendingResponse:
        require(0 <= request.k <= 1000, "k must be between 0 and 1000")
        require(
            len(request.exclude_item_ids) <= self.max_batch,
            f"exclude_item_ids has more than {self.max_batch} entries",
        )
        k = request.k or 20
        exclude = set(request.exclude_item_ids)
        chunk = k + len(exclude) + 16
        h = self.cfg.trending_half_life_us
        now = now_us()
        resp = profile_pb2.GetTrendingResponse()
        offset = 0
        while len(resp.items) < k and offset < 100_000:
            rows, anchor = await self.store.trending(request.category, chunk, offset)
            offset += len(rows)
            candidates = [(i, s) for i, s in rows if i not in exclude]
            if request.in_stock_only and candidates:
                stock = await self.store.get_items([i for i, _ in candidates])
                candidates = [(i, s) for i, s in candidates if i in stock and stock[i].stock > 0]
            for item_id, score in candidates:
                if len(resp.items) == k:
                    break
                resp.items.add(item_id=item_id, score=decay_to(score, anchor or now, now, h))
            if len(rows) < chunk:
                break
        return resp


class ProfileService(BaseService):
    """The profile service as the runtime runs it."""

    name = "profile"
    settings: ProfileSettings

    def __init__(self, settings: ProfileSettings) -> None:
        super().__init__(settings)
        self.store = make_store(settings)
        self._monitor: asyncio.Task[None] | None = None
        self._opened = False
        self._serving: bool | None = None

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        profile_pb2_grpc.add_ProfileServiceServicer_to_server(
            ProfileServicer(self.settings, self.store), server
        )
        return [profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name]

    async def start(self) -> None:
        await self._check_store()
        self._monitor = asyncio.create_task(self._watch_store())

    async def _check_store(self) -> None:
        try:
            if not self._opened:
                await self.store.open()
                self._opened = True
                log.info("store open", extra={"backend": self.store.backend})
            else:
                await self.store.ping()
            up = True
        except StoreUnavailable as exc:
            up = False
            if self._serving is not False:
                log.warning("store unavailable", extra={"reason": exc.message})
        if up != self._serving:
            if self._serving is not None:
                STORE_UP.labels("up" if up else "down").inc()
                log.info("store is " + ("back" if up else "down"))
            self._serving = up
            await self.set_serving(up)

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self.settings.store_check_seconds)
            try:
                await self._check_store()
            except Exception:  # never let the health loop die
                log.exception("store check failed")

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.store.close()


def main() -> None:
    """Run the profile service until SIGTERM."""
    run_service(ProfileService, ProfileSettings())


if __name__ == "__main__":
    main()
