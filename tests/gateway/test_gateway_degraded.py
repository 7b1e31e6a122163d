"""The gateway as a real process in front of a real profile service, with retrieval and
ranking down: Recommend never fails, says which stages degraded, and still applies the
rules that need no model. Also auth, rate limits, validation and event forwarding."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mercato.client import MercatoClient
from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from tests.procs import ServiceProc, free_port, start_service
from tests.profile.factory import NOW_US, event, item

pytestmark = pytest.mark.slow  # gateway, profile and ranking as processes

ET = common_pb2.EventType
KEY = "test-key-123"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProc]]:
    tmp: Path = tmp_path_factory.mktemp("gw")
    profile = start_service("profile", tmp)
    with profile.channel() as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        items = [
            item(f"p{k}", "kitchen" if k % 2 else "garden", 5.0 + k, stock=3) for k in range(12)
        ]
        items.append(item("gone", "kitchen", 9.0, stock=0))
        stub.UpsertItems(profile_pb2.UpsertItemsRequest(items=items), timeout=10)
        evs = []
        for k in range(12):  # popularity: p0 most, p11 least
            for j in range(12 - k):
                evs.append(event(f"v{k}-{j}", f"u{j}", ET.EVENT_TYPE_VIEW, f"p{k}", NOW_US - 10**6))
        evs += [
            event(f"g{j}", f"u{j}", ET.EVENT_TYPE_VIEW, "gone", NOW_US - 10**6) for j in range(30)
        ]
        evs.append(
            event("buy1", "alice", ET.EVENT_TYPE_PURCHASE, "p0", NOW_US - 10**6, order_id="o1")
        )
        stub.TrackEvents(profile_pb2.ProfileServiceTrackEventsRequest(events=evs), timeout=30)
    keys = tmp / "keys.yaml"
    keys.write_text(
        "keys:\n"
        f"  - {{name: shop, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}\n"
        f"  - {{name: slow, sha256: {hashlib.sha256(b'slow-key').hexdigest()},"
        " rate_per_second: 1, burst: 2}\n"
        f"  - {{name: old, sha256: {hashlib.sha256(b'old-key').hexdigest()}, revoked: true}}\n"
    )
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    gateway = start_service(
        "gateway",
        tmp,
        {
            "MERCATO_GATEWAY_PROFILE_TARGET": profile.target,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": dead,
            "MERCATO_GATEWAY_RANKING_TARGET": dead,
            "MERCATO_GATEWAY_API_KEYS_FILE": str(keys),
        },
    )
    yield {"profile": profile, "gateway": gateway}
    assert gateway.terminate() == 0
    profile.terminate()


def client(stack: dict[str, ServiceProc], key: str | None = KEY) -> MercatoClient:
    return MercatoClient(stack["gateway"].target, api_key=key, timeout=5)


def test_recommend_degrades_to_trending_with_rules(stack: dict[str, ServiceProc]) -> None:
    with client(stack) as c:
        resp = c.recommend("alice", k=5, debug=True)
    ids = [r.item.item_id for r in resp.items]
    assert len(ids) == 5
    assert "p0" not in ids  # purchased by alice
    assert "gone" not in ids  # out of stock, although the most viewed
    assert ids == ["p1", "p2", "p3", "p4", "p5"]  # trending order
    assert all(r.item.title for r in resp.items)  # details filled in one batch
    stages = {d.stage: d.fallback for d in resp.degraded}
    assert stages == {"retrieval": "popular_items", "ranking": "retrieval_order"}
    assert resp.request_id
    assert [s.stage for s in resp.debug.stages] == ["profile", "retrieval", "details", "ranking"]
    assert all(r.reasons[0] == common_pb2.REASON_TRENDING for r in resp.items)


def test_anonymous_and_validation(stack: dict[str, ServiceProc]) -> None:
    with client(stack) as c:
        anon = c.recommend("", k=3)
        assert [r.item.item_id for r in anon.items] == ["p0", "p1", "p2"]
        with pytest.raises(grpc.RpcError) as err:
            c.recommend("alice", k=1000)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            c.recommend("alice", surface=common_pb2.SURFACE_PRODUCT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "anchor_item_id" in (err.value.details() or "")
        # still serving
        assert c.recommend("bob", k=2).items


def test_auth_and_rate_limit(stack: dict[str, ServiceProc]) -> None:
    for key, code in (
        (None, "UNAUTHENTICATED"),
        ("wrong", "UNAUTHENTICATED"),
        ("old-key", "UNAUTHENTICATED"),
    ):
        with client(stack, key) as c, pytest.raises(grpc.RpcError) as err:
            c.recommend("alice", k=1)
        assert err.value.code().name == code
    with client(stack, "slow-key") as c:
        codes = []
        for _ in range(6):
            try:
                c.recommend("alice", k=1)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    assert codes[:2] == ["OK", "OK"]
    assert "RESOURCE_EXHAUSTED" in codes


def test_track_events_forwarded_and_validated(stack: dict[str, ServiceProc]) -> None:
    with client(stack) as c:
        ev = event("gw-e1", "carol", ET.EVENT_TYPE_PURCHASE, "p3", NOW_US - 10**6, order_id="o9")
        first = c.track_events([ev])
        again = c.track_events([ev])
        assert (first.accepted, first.duplicates) == (1, 0)
        assert (again.accepted, again.duplicates) == (0, 1)
        # the purchase is excluded from the next recommendation at once
        ids = [r.item.item_id for r in c.recommend("carol", k=8).items]
        assert "p3" not in ids
        bad = common_pb2.Event(event_id="gw-bad", customer_id="carol")  # no type
        with pytest.raises(grpc.RpcError) as err:
            c.track_events([bad])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            c.track_events([])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_everything_down_still_answers(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    gw = start_service(
        "gateway",
        tmp_path,
        {
            "MERCATO_GATEWAY_PROFILE_TARGET": dead,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": dead,
            "MERCATO_GATEWAY_RANKING_TARGET": dead,
        },
    )
    try:
        with MercatoClient(gw.target, timeout=5) as c:
            for _ in range(8):  # also once the breakers are open
                resp = c.recommend("alice", k=5, include_offer=True)
                assert {d.stage for d in resp.degraded} >= {"profile", "retrieval"}
            with pytest.raises(grpc.RpcError) as err:
                c.track_events([event("x1", "alice", ET.EVENT_TYPE_VIEW, "p1")])
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gw.kill()


def test_profile_and_retrieval_down_serve_the_last_trending_list(tmp_path: Path) -> None:
    """stale-if-error: with profile down as well as retrieval, the last trending list the
    gateway saw (older than its cache TTL) still answers, marked degraded."""
    profile = start_service("profile", tmp_path)
    with profile.channel() as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        stub.UpsertItems(
            profile_pb2.UpsertItemsRequest(items=[item(f"s{k}", "garden", 3.0) for k in range(6)]),
            timeout=10,
        )
        evs = [event(f"sv{k}", "u1", ET.EVENT_TYPE_VIEW, f"s{k}", NOW_US - 10**6) for k in range(6)]
        stub.TrackEvents(profile_pb2.ProfileServiceTrackEventsRequest(events=evs), timeout=10)
    gw = start_service(
        "gateway",
        tmp_path,
        {
            "MERCATO_GATEWAY_PROFILE_TARGET": profile.target,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": f"127.0.0.1:{free_port()}",
            "MERCATO_GATEWAY_RANKING_TARGET": f"127.0.0.1:{free_port()}",
            "MERCATO_GATEWAY_TRENDING_CACHE_SECONDS": "0.5",
        },
    )
    try:
        with MercatoClient(gw.target, timeout=5) as c:
            fresh = [r.item.item_id for r in c.recommend("u9", k=4).items]
            assert len(fresh) == 4
            profile.kill()
            time.sleep(1.0)  # the cached list is now expired
            resp = c.recommend("u9", k=4)
            assert [r.item.item_id for r in resp.items] == fresh
            assert {d.stage for d in resp.degraded} >= {"profile", "retrieval"}
    finally:
        gw.kill()
        profile.kill()


CART_OFFERS = """
margin_rate: 0.35
default_order_value: 40.0
attribution_days: 7
offers:
  - {id: none, kind: none, description: No incentive}
  - id: nudge
    kind: cart_recovery
    description: Finish your order
    cost: {fixed: 0.01}
    eligibility: {surfaces: [cart], min_cart_value: 1}
"""


def test_real_ranking_orders_fallback_candidates_and_offers(
    stack: dict[str, ServiceProc], tmp_path: Path
) -> None:
    offers = tmp_path / "offers.yaml"
    offers.write_text(CART_OFFERS)  # one offer eligible on the cart: a decision is always made
    ranking = start_service(
        "ranking",
        tmp_path,
        {
            "MERCATO_RANKING_OFFERS_FILE": str(offers),
            "MERCATO_RANKING_CATALOG_TARGET": stack["profile"].target,
        },
    )
    gw = start_service(
        "gateway",
        tmp_path,
        {
            "MERCATO_GATEWAY_PROFILE_TARGET": stack["profile"].target,
            "MERCATO_GATEWAY_RETRIEVAL_TARGET": f"127.0.0.1:{free_port()}",
            "MERCATO_GATEWAY_RANKING_TARGET": ranking.target,
        },
    )
    try:
        with MercatoClient(gw.target, timeout=5) as c:
            c.track_events(
                [
                    event(
                        "r-cart",
                        "dave",
                        ET.EVENT_TYPE_ADD_TO_CART,
                        "p4",
                        NOW_US - 10**6,
                        quantity=3,
                    )
                ]
            )
            resp = c.recommend(
                "dave",
                k=4,
                include_offer=True,
                debug=True,
                context=common_pb2.Context(surface=common_pb2.SURFACE_CART),
            )
        assert {d.stage for d in resp.degraded} == {"retrieval"}  # ranking answered
        assert [s.stage for s in resp.debug.stages][-1] in {"ranking", "offer"}
        ids = [r.item.item_id for r in resp.items]
        assert len(ids) == 4 and "gone" not in ids
        assert "p4" not in ids  # already in the cart: the cart surface's rule
        assert all(r.item.stock > 0 for r in resp.items)
        # Ordered by the ranking service: ranks 1..k by non-increasing score.
        assert [r.rank for r in resp.items] == [1, 2, 3, 4]
        scores = [r.score for r in resp.items]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
        # The offer came from the policy: one decision recorded, the one answered.
        assert resp.offer_decision_id
        with ranking.channel() as ch:
            listed = ranking_pb2_grpc.RankingServiceStub(ch).ListOffers(
                ranking_pb2.ListOffersRequest(), timeout=5
            )
        decided = {o.offer.offer_id: o.decisions for o in listed.offers if o.decisions}
        assert decided == {resp.offer.offer_id or "none": 1}, (decided, resp.offer)
    finally:
        gw.kill()
        ranking.kill()
