"""The public API keeps what its protos promise, checked on the real system: the four
services as processes serving the tiny demo shop (trained once per session, see
conftest.py), called over gRPC on loopback with raw stubs and no retries.

Each test names the promise it checks (the comment in protos/ it comes from);
``tests/test_proto_promises.py`` maps every such comment to a test.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_reflection.v1alpha import reflection_pb2

from mercato.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, profile_pb2, profile_pb2_grpc
from tests.e2e.conftest import ApiStack

pytestmark = pytest.mark.slow

RID = "x-request-id"
Stub = gateway_pb2_grpc.GatewayServiceStub


@pytest.fixture(scope="module")
def channel(api_stack: ApiStack) -> Iterator[grpc.Channel]:
    # No retries: every failure is seen.
    with grpc.insecure_channel(api_stack.gateway, options=[("grpc.enable_retries", 0)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def gw(channel: grpc.Channel) -> Stub:
    return Stub(channel)


@pytest.fixture(scope="module")
def md(api_stack: ApiStack) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", api_stack.api_key),)


def _items(gw: Stub, md: tuple[tuple[str, str], ...], n: int = 40) -> list[str]:
    """Catalog item ids the model serves (from recommendations of a new customer)."""
    resp = gw.Recommend(gateway_pb2.RecommendRequest(k=n), metadata=md, timeout=10)
    return [r.item.item_id for r in resp.items]


def _trailing(call: grpc.Call | grpc.RpcError) -> dict[str, str]:
    return {k: v for k, v in (call.trailing_metadata() or ())}  # type: ignore[union-attr]


# -- request id ------------------------------------------------------------------------


def test_request_id_in_trailing_metadata_on_success_and_error(
    gw: Stub, md: tuple[tuple[str, str], ...]
) -> None:
    """gateway.proto: every response carries the request id used across all hops; a
    caller that only sees an error still gets it (trailing metadata)."""
    resp, call = gw.Recommend.with_call(gateway_pb2.RecommendRequest(k=3), metadata=md, timeout=10)
    trailing = _trailing(call)
    assert trailing[RID] == resp.request_id != ""
    assert dict(call.initial_metadata())[RID] == resp.request_id

    sent = f"caller-{uuid.uuid4().hex[:8]}"
    resp, call = gw.Recommend.with_call(
        gateway_pb2.RecommendRequest(k=3), metadata=(*md, (RID, sent)), timeout=10
    )
    assert resp.request_id == sent and _trailing(call)[RID] == sent

    # errors: bad input, unknown item, no API key
    for request, metadata, code in (
        (gateway_pb2.RecommendRequest(k=1000), md, grpc.StatusCode.INVALID_ARGUMENT),
        (
            gateway_pb2.RecommendRequest(k=3),
            (("x-api-key", "wrong"),),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            gw.Recommend(request, metadata=(*metadata, (RID, sent)), timeout=10)
        assert err.value.code() == code, err.value.details()
        assert _trailing(err.value).get(RID) == sent, err.value.trailing_metadata()
    with pytest.raises(grpc.RpcError) as err:
        gw.GetRelatedItems(
            gateway_pb2.GetRelatedItemsRequest(
                item_id="no-such-item", kind=common_pb2.RELATION_KIND_SIMILAR
            ),
            metadata=md,
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(_trailing(err.value).get(RID, "")) == 32  # generated: a uuid4 hex


# -- bad input -------------------------------------------------------------------------


def test_related_items_kind_is_required(gw: Stub, md: tuple[tuple[str, str], ...]) -> None:
    """common.proto RelationKind: RELATION_KIND_UNSPECIFIED is rejected with
    INVALID_ARGUMENT (a misspelled enum name encodes as 0 in JS clients)."""
    anchor = _items(gw, md, 1)[0]
    for kind in (common_pb2.RELATION_KIND_UNSPECIFIED, 99):
        with pytest.raises(grpc.RpcError) as err:
            gw.GetRelatedItems(
                gateway_pb2.GetRelatedItemsRequest(item_id=anchor, kind=kind, k=3),  # type: ignore[arg-type]
                metadata=md,
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kind
        assert "kind" in err.value.details()
    ok = gw.GetRelatedItems(
        gateway_pb2.GetRelatedItemsRequest(
            item_id=anchor, kind=common_pb2.RELATION_KIND_SIMILAR, k=3
        ),
        metadata=md,
        timeout=10,
    )
    assert len(ok.items) == 3


def test_unknown_item_is_not_found(gw: Stub, md: tuple[tuple[str, str], ...]) -> None:
    """gateway.proto GetRelatedItemsRequest.item_id: an item the serving model does not
    know gives NOT_FOUND (it is not a malformed request)."""
    for kind in (
        common_pb2.RELATION_KIND_SIMILAR,
        common_pb2.RELATION_KIND_COMPLEMENT,
        common_pb2.RELATION_KIND_UPSELL,
    ):
        with pytest.raises(grpc.RpcError) as err:
            gw.GetRelatedItems(
                gateway_pb2.GetRelatedItemsRequest(item_id="no-such-item", kind=kind, k=3),
                metadata=md,
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        assert "no-such-item" in err.value.details()


def test_unparseable_request_is_invalid_argument(
    channel: grpc.Channel, md: tuple[tuple[str, str], ...]
) -> None:
    """Bytes that are not a request message get INVALID_ARGUMENT with the request id, and
    the gateway keeps answering."""
    raw = channel.unary_unary("/mercato.v1.GatewayService/Recommend")
    for garbage in (b"\xff\xff\xff", b"\x1a\x05abc"):  # bad tag; truncated length
        with pytest.raises(grpc.RpcError) as err:
            raw(garbage, metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "parse" in err.value.details()
        assert _trailing(err.value).get(RID)
    resp = Stub(channel).Recommend(gateway_pb2.RecommendRequest(k=2), metadata=md, timeout=10)
    assert len(resp.items) == 2


def test_list_fields_past_their_bounds_are_invalid_argument(
    channel: grpc.Channel, gw: Stub, md: tuple[tuple[str, str], ...]
) -> None:
    """gateway.proto RecommendRequest.categories / exclude_item_ids,
    TrackEventsRequest.events, common.proto Context.cart_item_ids: a list at its bound is
    served; one entry more, or an entry too long or empty, is INVALID_ARGUMENT naming
    the field and the bound, sent as raw bytes (what any client may put on the wire);
    the gateway keeps answering."""
    ids = [f"no-such-item-{i}" for i in range(1001)]
    cats = [f"category-{i}" for i in range(101)]
    at_bound = [
        gateway_pb2.RecommendRequest(k=3, exclude_item_ids=ids[:1000]),
        gateway_pb2.RecommendRequest(k=3, categories=cats[:100]),
        gateway_pb2.RecommendRequest(k=3, context=common_pb2.Context(cart_item_ids=ids[:500])),
    ]
    for req in at_bound:
        gw.Recommend(req, metadata=md, timeout=10)  # no error
    raw = channel.unary_unary(
        "/mercato.v1.GatewayService/Recommend",
        request_serializer=None,
        response_deserializer=gateway_pb2.RecommendResponse.FromString,
    )
    past = {
        "exclude_item_ids has 1001 entries; at most 1000": gateway_pb2.RecommendRequest(
            k=3, exclude_item_ids=ids
        ),
        "categories has 101 entries; at most 100": gateway_pb2.RecommendRequest(
            k=3, categories=cats
        ),
        "categories[] is longer than 256 bytes": gateway_pb2.RecommendRequest(
            k=3, categories=["x" * 257]
        ),
        "exclude_item_ids[] is required": gateway_pb2.RecommendRequest(
            k=3, exclude_item_ids=["ok", ""]
        ),
        "context.cart_item_ids has 501 entries; at most 500": gateway_pb2.RecommendRequest(
            k=3, context=common_pb2.Context(cart_item_ids=ids[:501])
        ),
        "context.cart_item_ids[] is longer than 128 bytes": gateway_pb2.RecommendRequest(
            k=3, context=common_pb2.Context(cart_item_ids=["y" * 129])
        ),
    }
    for want, req in past.items():
        with pytest.raises(grpc.RpcError) as err:
            raw(req.SerializeToString(), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (want, err.value.details())
        assert want in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        gw.GetCartRecommendations(
            gateway_pb2.GetCartRecommendationsRequest(
                customer_id="c", context=common_pb2.Context(cart_item_ids=ids[:501])
            ),
            metadata=md,
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 500" in err.value.details()
    events = [
        common_pb2.Event(event_id=f"bound-{i}", customer_id="c", type=common_pb2.EVENT_TYPE_VIEW)
        for i in range(1001)
    ]
    with pytest.raises(grpc.RpcError) as err:
        gw.TrackEvents(gateway_pb2.TrackEventsRequest(events=events), metadata=md, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events has 1001 entries; at most 1000" in err.value.details()
    assert len(gw.Recommend(gateway_pb2.RecommendRequest(k=2), metadata=md, timeout=10).items) == 2


# -- fallbacks are named ---------------------------------------------------------------


def _similar_fill(items: list[gateway_pb2.RecommendedItem]) -> int:
    return sum(1 for r in items if common_pb2.REASON_SIMILAR in r.reasons)


def _named(degraded: list[common_pb2.Degradation], fallback: str) -> bool:
    return any(d.stage == "retrieval" and d.fallback == fallback for d in degraded)


def test_complements_that_fall_back_to_similar_items_say_so(
    gw: Stub, md: tuple[tuple[str, str], ...]
) -> None:
    """common.proto RELATION_KIND_COMPLEMENT: where basket data has too few complements,
    similar items fill the list and `degraded` names the fallback; a list of complements
    only names none."""
    seen_fill = seen_pure = 0
    for anchor in _items(gw, md, 40):
        resp = gw.GetRelatedItems(
            gateway_pb2.GetRelatedItemsRequest(
                item_id=anchor, kind=common_pb2.RELATION_KIND_COMPLEMENT, k=8
            ),
            metadata=md,
            timeout=10,
        )
        filled = _similar_fill(list(resp.items))
        assert _named(list(resp.degraded), "similar_items") == bool(filled), resp
        if filled:
            seen_fill += 1
            d = next(d for d in resp.degraded if d.fallback == "similar_items")
            assert f"{filled} similar item" in d.reason, d.reason
        elif resp.items:
            seen_pure += 1
            assert all(r.reasons[0] == common_pb2.REASON_COMPLEMENT for r in resp.items)
    assert seen_fill, "no anchor without enough basket complements in the tiny shop"


def test_cart_recommendations_name_their_fallbacks(
    api_stack: ApiStack, gw: Stub, md: tuple[tuple[str, str], ...]
) -> None:
    """gateway.proto GetCartRecommendations: complements of the cart (similar items filling
    in are named), and an empty cart gets the customer's recommendations, named too."""
    empty = gw.GetCartRecommendations(
        gateway_pb2.GetCartRecommendationsRequest(customer_id=f"new-{uuid.uuid4().hex}", k=4),
        metadata=md,
        timeout=10,
    )
    assert len(empty.items) == 4
    assert _named(list(empty.degraded), "personalized_items"), empty.degraded

    with grpc.insecure_channel(api_stack.profile) as ch:
        carts = profile_pb2_grpc.ProfileServiceStub(ch).ListAbandonedCarts(
            profile_pb2.ListAbandonedCartsRequest(idle_seconds=1, page_size=30), timeout=10
        )
    customers = [c.customer_id for c in carts.carts if c.lines]
    assert customers
    for cid in customers:
        resp = gw.GetCartRecommendations(
            gateway_pb2.GetCartRecommendationsRequest(customer_id=cid, k=6),
            metadata=md,
            timeout=10,
        )
        assert resp.cart.lines
        assert not _named(list(resp.degraded), "personalized_items")
        assert _named(list(resp.degraded), "similar_items") == bool(
            _similar_fill(list(resp.items))
        ), resp


def test_a_short_list_says_why(
    api_stack: ApiStack, gw: Stub, md: tuple[tuple[str, str], ...]
) -> None:
    """gateway.proto `shortfall`: set when a list holds fewer than k items, unset for a
    full list; and an item the catalog now says is out of stock (retrieval still thinks
    it is in stock) is replaced, not just dropped, so related items stay at k."""
    full = gw.Recommend(gateway_pb2.RecommendRequest(k=5), metadata=md, timeout=10)
    assert len(full.items) == 5 and not full.HasField("shortfall")

    category = full.items[0].item.category
    short = gw.Recommend(
        gateway_pb2.RecommendRequest(k=100, categories=[category]), metadata=md, timeout=10
    )
    assert 0 < len(short.items) < 100
    assert short.HasField("shortfall")
    assert short.shortfall.requested == 100
    assert short.shortfall.returned == len(short.items)
    assert f"{len(short.items)} of 100 items" in short.shortfall.reason
    assert all(r.item.category == category for r in short.items)

    anchor = full.items[0].item.item_id
    req = gateway_pb2.GetRelatedItemsRequest(
        item_id=anchor, kind=common_pb2.RELATION_KIND_SIMILAR, k=5
    )
    before = gw.GetRelatedItems(req, metadata=md, timeout=10)
    assert len(before.items) == 5 and not before.HasField("shortfall")
    gone = before.items[0].item.item_id
    with grpc.insecure_channel(api_stack.profile) as ch:
        profile_pb2_grpc.ProfileServiceStub(ch).UpdateStock(
            profile_pb2.UpdateStockRequest(
                updates=[profile_pb2.StockUpdate(item_id=gone, set_to=0)]
            ),
            timeout=10,
        )
    try:
        deadline = time.monotonic() + 15  # the gateway reuses item details for 2 s
        while True:
            after = gw.GetRelatedItems(req, metadata=md, timeout=10)
            ids = [r.item.item_id for r in after.items]
            if gone not in ids or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert gone not in ids
        assert len(ids) == 5, ids
        assert not after.HasField("shortfall")
    finally:
        with grpc.insecure_channel(api_stack.profile) as ch:
            profile_pb2_grpc.ProfileServiceStub(ch).UpdateStock(
                profile_pb2.UpdateStockRequest(
                    updates=[profile_pb2.StockUpdate(item_id=gone, set_to=50)]
                ),
                timeout=10,
            )


# -- offers ----------------------------------------------------------------------------


def test_offer_is_unset_unless_the_policy_chose_an_incentive(
    api_stack: ApiStack, gw: Stub, md: tuple[tuple[str, str], ...]
) -> None:
    """gateway.proto GetCartRecommendationsResponse.offer: unset when the policy chose
    none (with the reason and the decision id still given); an offer given has a
    non-negative expected incremental margin unless it is exploration."""
    with grpc.insecure_channel(api_stack.profile) as ch:
        carts = profile_pb2_grpc.ProfileServiceStub(ch).ListAbandonedCarts(
            profile_pb2.ListAbandonedCartsRequest(idle_seconds=1, page_size=50), timeout=10
        )
    customers = [c.customer_id for c in carts.carts if c.lines]
    decided = unset = 0
    for cid in customers * 2:
        resp = gw.GetCartRecommendations(
            gateway_pb2.GetCartRecommendationsRequest(customer_id=cid, k=3, include_offer=True),
            metadata=md,
            timeout=10,
        )
        assert resp.offer_reason, resp  # asked for: the decision's reason is always there
        if resp.offer_decision_id:
            decided += 1
        if resp.HasField("offer"):
            assert resp.offer.kind != common_pb2.OFFER_KIND_NONE, resp.offer
            assert resp.offer.offer_id
            assert resp.offer_reason in ("best_expected_value", "exploration")
            if resp.offer_reason != "exploration":
                assert resp.offer_expected_incremental_margin >= 0, resp
        else:
            unset += 1
            assert resp.offer_expected_incremental_margin == 0
            assert resp.offer_reason in (
                "no_offer_worth_cost",
                "budget_exhausted",
                "not_eligible",
            )
    assert decided and unset, (decided, unset)


# -- debug -----------------------------------------------------------------------------


def test_debug_stages_are_in_pipeline_order(gw: Stub, md: tuple[tuple[str, str], ...]) -> None:
    """gateway.proto DebugInfo.stages: profile, retrieval, details, ranking, offer."""
    for _ in range(5):  # the offer runs alongside: its finishing time varies
        resp = gw.Recommend(
            gateway_pb2.RecommendRequest(
                customer_id=f"new-{uuid.uuid4().hex}",
                k=4,
                include_offer=True,
                debug=True,
                context=common_pb2.Context(
                    surface=common_pb2.SURFACE_CHECKOUT,
                    timestamp=timestamp_pb2.Timestamp(seconds=int(time.time())),
                ),
            ),
            metadata=md,
            timeout=10,
        )
        assert [s.stage for s in resp.debug.stages] == [
            "profile",
            "retrieval",
            "details",
            "ranking",
            "offer",
        ], resp.debug


# -- reflection ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_v1_and_v1alpha(channel: grpc.Channel, version: str) -> None:
    """Server reflection under grpc.reflection.v1 (what current tools ask) and v1alpha;
    the two protocols share their messages, so the v1alpha classes read both."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    answers = list(
        call(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="mercato.v1.GatewayService"
                    ),
                ]
            ),
            timeout=10,
        )
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "mercato.v1.GatewayService" in names
    assert {"grpc.reflection.v1.ServerReflection", "grpc.health.v1.Health"} <= names
    files = answers[1].file_descriptor_response.file_descriptor_proto
    assert files, answers[1]


# -- serving without training libraries ------------------------------------------------


def _mapped_libraries(pid: int) -> set[str]:
    """Shared objects mapped into a process (``/proc/<pid>/maps``)."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if ".so" in line}


def test_model_services_serve_without_torch(api_stack: ApiStack, gw: Stub, md: Any) -> None:
    """Retrieval and ranking answer with both models loaded (the fixture waits for them)
    while no torch library is mapped into any service process: they serve from arrays."""
    from services.common.supervisor import health_status

    resp = gw.Recommend(gateway_pb2.RecommendRequest(customer_id="", k=3), metadata=md, timeout=5)
    assert "mercato-ranker" in {m.name for m in resp.models}, resp.models
    pids = dict(api_stack.pids)
    assert set(pids) == {"gateway", "profile", "retrieval", "ranking"}
    retrieval = api_stack.gateway.rsplit(":", 1)[0] + f":{api_stack.retrieval_port}"
    assert health_status(retrieval) == "SERVING"  # SERVING = a two-tower version loaded
    for name, pid in pids.items():
        libs = _mapped_libraries(pid)
        torch_libs = sorted(lib for lib in libs if "libtorch" in lib or "/torch/" in lib)
        assert not torch_libs, f"{name} (pid {pid}) has torch loaded: {torch_libs[:3]}"
    # The check sees native libraries: retrieval has FAISS's mapped.
    assert any("faiss" in lib for lib in _mapped_libraries(pids["retrieval"]))
