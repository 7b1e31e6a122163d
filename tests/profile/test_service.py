"""The profile service as a real process on loopback (SQLite backend): every RPC, bad
input answered with clear status codes, nothing half-written."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc
from services.profile.logic import US_PER_DAY, us_to_ts
from tests.procs import ServiceProc, start_service
from tests.profile.factory import NOW_US, catalog, event

pytestmark = pytest.mark.slow  # the profile service as a process

ET = common_pb2.EventType
MAX_BATCH = 50


@pytest.fixture(scope="module", params=["asyncio", "sync"])
def svc(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProc]:
    # Every RPC under both servers: with server_mode=sync the reads run as synchronous
    # twins on the pool threads (#14), the writes on the event loop.
    tmp: Path = tmp_path_factory.mktemp("profile-svc")
    env = {
        "MERCATO_PROFILE_MAX_BATCH": str(MAX_BATCH),
        "MERCATO_PROFILE_SERVER_MODE": request.param,
    }
    proc = start_service("profile", tmp, env)
    yield proc
    assert proc.terminate() == 0, proc.log()[-3000:]


@pytest.fixture(scope="module")
def stub(svc: ServiceProc) -> Iterator[profile_pb2_grpc.ProfileServiceStub]:
    with svc.channel() as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        stub.UpsertItems(profile_pb2.UpsertItemsRequest(items=catalog(20)), timeout=10)
        yield stub


def track(
    stub: profile_pb2_grpc.ProfileServiceStub, events: list[common_pb2.Event], partial: bool = False
) -> profile_pb2.ProfileServiceTrackEventsResponse:
    return stub.TrackEvents(  # type: ignore[no-any-return]
        profile_pb2.ProfileServiceTrackEventsRequest(events=events, partial_accept=partial),
        timeout=10,
    )


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def test_profile_cart_and_events_end_to_end(stub: profile_pb2_grpc.ProfileServiceStub) -> None:
    t = NOW_US - 3600 * 10**6
    evs = [
        event("rt-1", "alice", ET.EVENT_TYPE_VIEW, "i1", t),
        event("rt-2", "alice", ET.EVENT_TYPE_ADD_TO_CART, "i2", t + 10**6, quantity=2),
        event("rt-3", "alice", ET.EVENT_TYPE_ADD_TO_CART, "i3", t + 2 * 10**6),
        event("rt-4", "alice", ET.EVENT_TYPE_PURCHASE, "i3", t + 3 * 10**6, order_id="o1"),
        event("rt-5", "alice", ET.EVENT_TYPE_OFFER_SHOWN, ts_us=t + 4 * 10**6, offer_id="ten"),
    ]
    assert (track(stub, evs).accepted, track(stub, evs).duplicates) == (5, 5)
    p = stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="alice"), timeout=5).profile
    assert p.known
    assert [r.item_id for r in p.recent_items] == ["i3", "i2", "i1"]
    assert p.recent_items[0].type == ET.EVENT_TYPE_PURCHASE
    assert [(x.item_id, x.count, x.quantity) for x in p.purchases] == [("i3", 1, 1)]
    items = {i.item_id: i for i in catalog(20)}
    assert p.rfm.monetary == pytest.approx(items["i3"].price)  # price 0 -> catalog price
    assert [(line.item_id, line.quantity) for line in p.cart.lines] == [("i2", 2)]
    assert p.cart.value == pytest.approx(2 * items["i2"].price)
    assert math.fsum(p.category_affinity.values()) == pytest.approx(1.0)
    assert set(p.category_affinity) == {items[i].category for i in ("i1", "i2", "i3")}
    assert p.first_seen.ToMicroseconds() == t and p.last_seen.ToMicroseconds() == t + 4 * 10**6
    assert p.segment == "active" and p.rfm.frequency == 1
    cart = stub.GetCart(profile_pb2.GetCartRequest(customer_id="alice"), timeout=5).cart
    assert cart == p.cart
    # Customers: static attributes, unknown ones, batch order.
    stub.UpsertCustomers(
        profile_pb2.UpsertCustomersRequest(
            customers=[profile_pb2.Customer(customer_id="alice", country="FR", segment="vip")]
        ),
        timeout=5,
    )
    got = stub.BatchGetProfiles(
        profile_pb2.BatchGetProfilesRequest(customer_ids=["ghost", "alice"]), timeout=5
    ).profiles
    assert [(x.customer_id, x.known) for x in got] == [("ghost", False), ("alice", True)]
    assert got[1].country == "FR" and got[1].segment == "vip"
    # Abandoned carts, relative to as_of.
    later = us_to_ts(t + 2 * US_PER_DAY)
    carts = stub.ListAbandonedCarts(
        profile_pb2.ListAbandonedCartsRequest(idle_seconds=86400, as_of=later), timeout=5
    ).carts
    assert "alice" not in [c.customer_id for c in carts]  # bought after the last cart change
    track(stub, [event("rt-6", "bob", ET.EVENT_TYPE_ADD_TO_CART, "i4", t)])
    track(stub, [event("rt-7", "carol", ET.EVENT_TYPE_ADD_TO_CART, "i5", t + 5)])
    first = stub.ListAbandonedCarts(
        profile_pb2.ListAbandonedCartsRequest(idle_seconds=86400, as_of=later, page_size=1),
        timeout=5,
    )
    second = stub.ListAbandonedCarts(
        profile_pb2.ListAbandonedCartsRequest(
            idle_seconds=86400, as_of=later, page_size=1, page_token=first.next_page_token
        ),
        timeout=5,
    )
    assert [c.customer_id for c in [*first.carts, *second.carts]] == ["bob", "carol"]
    assert not second.next_page_token
    none_yet = stub.ListAbandonedCarts(
        profile_pb2.ListAbandonedCartsRequest(idle_seconds=86400), timeout=5
    ).carts
    assert not {"bob", "carol"} & {c.customer_id for c in none_yet}  # idle < 1 day now


def test_unknown_customer_gets_an_empty_profile(stub: profile_pb2_grpc.ProfileServiceStub) -> None:
    p = stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="never-seen"), timeout=5).profile
    assert p.customer_id == "never-seen" and not p.known and not p.recent_items
    cart = stub.GetCart(profile_pb2.GetCartRequest(customer_id="never-seen"), timeout=5).cart
    assert not cart.lines


def test_catalog_rpcs(stub: profile_pb2_grpc.ProfileServiceStub) -> None:
    got = stub.GetItems(profile_pb2.GetItemsRequest(item_ids=["i2", "zz", "i1", "i2"]), timeout=5)
    assert [i.item_id for i in got.items] == ["i2", "i1"] and list(got.missing_item_ids) == ["zz"]
    page = stub.ListItems(profile_pb2.ListItemsRequest(page_size=7), timeout=5)
    ids = [i.item_id for i in page.items]
    token = page.next_page_token
    while token:
        page = stub.ListItems(
            profile_pb2.ListItemsRequest(page_size=7, page_token=token), timeout=5
        )
        ids += [i.item_id for i in page.items]
        token = page.next_page_token
    assert ids == sorted(i.item_id for i in catalog(20))
    upd = stub.UpdateStock(
        profile_pb2.UpdateStockRequest(
            updates=[
                profile_pb2.StockUpdate(item_id="i6", set_to=3),
                profile_pb2.StockUpdate(item_id="i6", delta=-5),
            ]
        ),
        timeout=5,
    )
    assert [i.stock for i in upd.items] == [3, 0]
    code, msg = code_of(
        lambda: stub.UpdateStock(
            profile_pb2.UpdateStockRequest(
                updates=[profile_pb2.StockUpdate(item_id="nope", delta=1)]
            ),
            timeout=5,
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg


def test_trending(stub: profile_pb2_grpc.ProfileServiceStub) -> None:
    t = NOW_US - 10**6
    buys = [event(f"tr-{n}", f"tr{n}", ET.EVENT_TYPE_PURCHASE, "i9", t) for n in range(4)]
    views = [event(f"tv-{n}", f"tr{n}", ET.EVENT_TYPE_VIEW, "i8", t) for n in range(2)]
    track(stub, buys + views)
    top = stub.GetTrending(profile_pb2.GetTrendingRequest(k=3), timeout=5).items
    assert top[0].item_id == "i9"
    scores = [x.score for x in top]
    assert scores == sorted(scores, reverse=True)
    excl = stub.GetTrending(profile_pb2.GetTrendingRequest(k=3, exclude_item_ids=["i9"]), timeout=5)
    assert "i9" not in [x.item_id for x in excl.items]
    items = {i.item_id: i for i in catalog(20)}
    cat = stub.GetTrending(profile_pb2.GetTrendingRequest(category=items["i9"].category), timeout=5)
    assert all(items[x.item_id].category == items["i9"].category for x in cat.items)
    stub.UpdateStock(
        profile_pb2.UpdateStockRequest(updates=[profile_pb2.StockUpdate(item_id="i9", set_to=0)]),
        timeout=5,
    )
    stocked = stub.GetTrending(profile_pb2.GetTrendingRequest(in_stock_only=True), timeout=5)
    assert stocked.items and "i9" not in [x.item_id for x in stocked.items]


def _bad(kind: str) -> list[common_pb2.Event]:
    good = event(f"bad-{kind}-ok", "dave", ET.EVENT_TYPE_VIEW, "i1", NOW_US)
    e = event(f"bad-{kind}", "dave", ET.EVENT_TYPE_PURCHASE, "i2", NOW_US)
    match kind:
        case "unknown_type":
            e.type = 99  # type: ignore[assignment]
        case "missing_type":
            e.type = ET.EVENT_TYPE_UNSPECIFIED
        case "missing_event_id":
            e.event_id = ""
        case "missing_customer":
            e.customer_id = ""
        case "missing_item":
            e.item_id = ""
        case "negative_quantity":
            e.quantity = -2
        case "negative_price":
            e.price = -1.0
        case "future":
            e.timestamp.CopyFrom(us_to_ts(NOW_US + 2 * US_PER_DAY))
        case "unknown_item":
            e.item_id = "not-in-catalog"
    return [good, e]


BAD = [
    "unknown_type",
    "missing_type",
    "missing_event_id",
    "missing_customer",
    "missing_item",
    "negative_quantity",
    "negative_price",
    "future",
    "unknown_item",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_event_rejects_the_whole_batch(
    stub: profile_pb2_grpc.ProfileServiceStub, kind: str
) -> None:
    batch = _bad(kind)
    code, msg = code_of(lambda: track(stub, batch))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "event 1" in msg and "nothing was written" in msg
    # Nothing half-written: the valid first event was not logged.
    assert track(stub, batch[:1]).accepted == 1


def test_partial_accept_reports_each_bad_event(stub: profile_pb2_grpc.ProfileServiceStub) -> None:
    batch = [event("pa-ok", "erin", ET.EVENT_TYPE_VIEW, "i1", NOW_US)]
    for kind in BAD:
        batch.append(_bad(kind)[1])
        batch[-1].customer_id = batch[-1].customer_id and "erin"
        batch[-1].event_id = batch[-1].event_id and f"pa-{kind}"
    resp = track(stub, batch, partial=True)
    assert resp.accepted == 1 and resp.duplicates == 0
    assert [e.index for e in resp.errors] == list(range(1, len(batch)))
    assert all(e.message for e in resp.errors)


def test_batch_size_limits(stub: profile_pb2_grpc.ProfileServiceStub) -> None:
    code, msg = code_of(lambda: track(stub, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in msg
    big = [
        event(f"big-{n}", "frank", ET.EVENT_TYPE_VIEW, "i1", NOW_US) for n in range(MAX_BATCH + 1)
    ]
    code, msg = code_of(lambda: track(stub, big))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_BATCH}" in msg
    p = stub.GetProfile(profile_pb2.GetProfileRequest(customer_id="frank"), timeout=5).profile
    assert not p.known
    huge = event("huge", "frank", ET.EVENT_TYPE_VIEW, "i1", NOW_US)
    huge.attributes["blob"] = "x" * (5 * 1024 * 1024)
    code, _ = code_of(lambda: track(stub, [huge]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda s: s.GetProfile(profile_pb2.GetProfileRequest(), timeout=5), "customer_id"),
        (
            lambda s: s.ListAbandonedCarts(profile_pb2.ListAbandonedCartsRequest(), timeout=5),
            "idle_seconds",
        ),
        (
            lambda s: s.ListItems(profile_pb2.ListItemsRequest(page_token="%%%"), timeout=5),
            "page_token",
        ),
        (lambda s: s.GetTrending(profile_pb2.GetTrendingRequest(k=5000), timeout=5), "k must"),
        (
            lambda s: s.UpsertItems(
                profile_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id="neg", price=-1)]),
                timeout=5,
            ),
            "price",
        ),
        (
            lambda s: s.UpdateStock(
                profile_pb2.UpdateStockRequest(updates=[profile_pb2.StockUpdate(item_id="i1")]),
                timeout=5,
            ),
            "set_to or delta",
        ),
        (lambda s: s.BatchGetProfiles(profile_pb2.BatchGetProfilesRequest(), timeout=5), "empty"),
    ],
)
def test_other_bad_requests(
    stub: profile_pb2_grpc.ProfileServiceStub, call: object, needle: str
) -> None:
    code, msg = code_of(lambda: call(stub))  # type: ignore[operator]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg


def test_list_customers_rejects_bad_input_and_keeps_serving(
    stub: profile_pb2_grpc.ProfileServiceStub,
) -> None:
    bad = [
        (profile_pb2.ListCustomersRequest(page_size=5000), "page_size"),
        (profile_pb2.ListCustomersRequest(min_recency_days=-1), "min_recency_days"),
        (profile_pb2.ListCustomersRequest(min_category_affinity=0.5), "needs a category"),
        (profile_pb2.ListCustomersRequest(page_token="not-a-token"), "page_token"),
    ]
    for req, words in bad:
        code, msg = code_of(lambda req=req: stub.ListCustomers(req, timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (req, msg)
        assert words in msg, msg
    stub.ListCustomers(profile_pb2.ListCustomersRequest(page_size=10), timeout=5)  # still serving
