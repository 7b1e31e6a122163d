"""The gateway's fallbacks (``services/gateway/pipeline.py``), in process and fast: the
gateway's servicer on a real gRPC server on loopback, called through a client without
retries, in front of scripted profile, retrieval and ranking servers (real gRPC servers
too; each method answers from a script: an answer, a status to fail with, a delay).

What each failure turns into: an anonymous profile; popular items (cached, and the last
list when the profile service is down too); retrieval order with the rules that need no
model; items without details; no offer. And the ``degraded`` entries, debug stages and
``shortfall`` that say so. The same fallbacks against real services run as processes
are in ``test_gateway_degraded.py`` (slow); these are the tests ``make mutation
MODULES=gateway-fallbacks`` runs once per mutant."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from mercato.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    profile_pb2,
    ranking_pb2,
    retrieval_pb2,
)
from services.common.candidates import candidates_of, columns_of
from services.common.interceptors import RuntimeInterceptor
from services.gateway.experiments import Experiment, Variant
from services.gateway.pipeline import Pipeline
from services.gateway.server import GatewayServicer
from services.gateway.settings import GatewaySettings

S = grpc.StatusCode
MODEL = common_pb2.REASON_MODEL
TRENDING = common_pb2.REASON_TRENDING
FALLBACK = common_pb2.REASON_FALLBACK
SIMILAR = common_pb2.REASON_SIMILAR
COMPLEMENT = common_pb2.REASON_COMPLEMENT
CART = common_pb2.SURFACE_CART
DOWN = "UNAVAILABLE: fake UNAVAILABLE"  # the reason a scripted UNAVAILABLE gives

# The catalog: p0..p11 in stock (even: garden, odd: kitchen), "gone" sold out. Trending
# order: gone, then p0, p1, ... (most popular first).
ITEMS = {
    f"p{i}": common_pb2.Item(
        item_id=f"p{i}", title=f"P{i}", category="kitchen" if i % 2 else "garden", stock=3
    )
    for i in range(12)
}
ITEMS["gone"] = common_pb2.Item(item_id="gone", title="Gone", category="kitchen", stock=0)
ITEMS["last"] = common_pb2.Item(item_id="last", title="Last", category="garden", stock=1)
POPULAR = ["gone", *(f"p{i}" for i in range(12))]
# alice bought p0 and p1 and looked at three items; carol has p3 and p4 in her cart.
PROFILES = {
    "alice": common_pb2.Profile(
        customer_id="alice",
        known=True,
        purchases=[
            common_pb2.PurchasedItem(item_id="p0", count=2),
            common_pb2.PurchasedItem(item_id="p1", count=5),
        ],
        recent_items=[common_pb2.RecentItem(item_id=f"p{i}") for i in (2, 3, 4)],
    ),
    "carol": common_pb2.Profile(
        customer_id="carol",
        known=True,
        purchases=[common_pb2.PurchasedItem(item_id="p0", count=1)],
        cart=common_pb2.Cart(lines=[common_pb2.CartLine(item_id=i) for i in ("p3", "p4")]),
    ),
}
# Retrieval's answer: model order, with a purchase (p0) and a sold-out item among them.
RETRIEVED = ["p5", "p6", "gone", "p0", "p7", "p8", "p9"]
TWO_TOWER = common_pb2.ModelVersion(name="two_tower", version="3", alias="champion")
RANKER = common_pb2.ModelVersion(name="ranker", version="7", alias="champion")


def trending(req: profile_pb2.GetTrendingRequest, popular: list[str]) -> Any:
    out = []
    for rank, item_id in enumerate(popular):
        item = ITEMS.get(item_id, common_pb2.Item(item_id=item_id, stock=1))
        if req.in_stock_only and item.stock <= 0:
            continue
        if req.category and item.category != req.category:
            continue
        if item_id in req.exclude_item_ids:
            continue
        out.append(profile_pb2.TrendingItem(item_id=item_id, score=100.0 - rank))
    return profile_pb2.GetTrendingResponse(items=out[: req.k])


def sent(req: ranking_pb2.RankRequest) -> list[common_pb2.Candidate]:
    """The candidates of a Rank request, whichever form they came in."""
    return list(req.candidates) or candidates_of(req.columns)


def rank(req: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
    """Ranking's stand-in: the candidates in reverse order, scored 10, 9, ...; sold-out
    items (ITEMS is its item table) left out and counted, as ranking does; with
    ``return_items``, each item's details from ITEMS (the id alone when unknown)."""
    cands = [c for c in sent(req) if c.item_id not in ITEMS or ITEMS[c.item_id].stock > 0]
    items = [
        ranking_pb2.RankedItem(item_id=c.item_id, score=10.0 - i, reasons=[MODEL])
        for i, c in enumerate(reversed(cands))
    ][: req.k]
    if req.return_items:
        for r in items:
            r.item.CopyFrom(ITEMS.get(r.item_id, common_pb2.Item(item_id=r.item_id)))
    sold = len(sent(req)) - len(cands)
    return ranking_pb2.RankResponse(
        items=items, model=RANKER, dropped={"out_of_stock": sold} if sold else {}
    )


def bare(req: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
    """:func:`rank` as a ranking service answers that returns no item details."""
    resp = rank(req)
    for r in resp.items:
        r.ClearField("item")
    return resp


@dataclass
class Fake:
    """One downstream service: each method answers with the next of ``once[method]``,
    else ``answers[method]`` (a response, a function of the request, or a status code to
    fail with), after ``delay[method]`` seconds; every request is kept in ``seen``."""

    service: str
    methods: dict[str, tuple[Any, Any]]  # method: (request class, response class)
    answers: dict[str, Any] = field(default_factory=dict)
    once: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    delay: dict[str, float] = field(default_factory=dict)
    seen: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    raw: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))

    def down(self, *methods: str) -> None:
        for m in methods or tuple(self.methods):
            self.answers[m] = S.UNAVAILABLE

    def handler(self) -> grpc.GenericRpcHandler:
        def method(name: str, req_cls: Any, resp_cls: Any) -> grpc.RpcMethodHandler:
            async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
                self.seen[name].append(request)
                if self.delay.get(name):
                    await asyncio.sleep(self.delay[name])
                queued = self.once[name]
                answer = queued.pop(0) if queued else self.answers.get(name, resp_cls())
                if isinstance(answer, grpc.StatusCode):
                    await context.abort(answer, f"fake {answer.name}")
                return answer(request) if callable(answer) else answer

            def parse(data: bytes) -> Any:
                self.raw[name].append(data)
                return req_cls.FromString(data)

            return grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=parse,
                response_serializer=resp_cls.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            f"mercato.v1.{self.service}",
            {name: method(name, *classes) for name, classes in self.methods.items()},
        )


def fakes() -> dict[str, Fake]:
    profile = Fake(
        "ProfileService",
        {
            "GetProfile": (profile_pb2.GetProfileRequest, profile_pb2.GetProfileResponse),
            "GetTrending": (profile_pb2.GetTrendingRequest, profile_pb2.GetTrendingResponse),
            "GetItems": (profile_pb2.GetItemsRequest, profile_pb2.GetItemsResponse),
            "TrackEvents": (
                profile_pb2.ProfileServiceTrackEventsRequest,
                profile_pb2.ProfileServiceTrackEventsResponse,
            ),
        },
    )
    profile.answers.update(
        GetProfile=lambda r: profile_pb2.GetProfileResponse(
            profile=PROFILES.get(r.customer_id, common_pb2.Profile(customer_id=r.customer_id))
        ),
        GetTrending=lambda r: trending(r, POPULAR),
        GetItems=lambda r: profile_pb2.GetItemsResponse(
            items=[ITEMS[i] for i in r.item_ids if i in ITEMS]
        ),
    )
    retrieval = Fake(
        "RetrievalService",
        {
            "Retrieve": (retrieval_pb2.RetrieveRequest, retrieval_pb2.RetrieveResponse),
            "RetrieveRelated": (
                retrieval_pb2.RetrieveRelatedRequest,
                retrieval_pb2.RetrieveRelatedResponse,
            ),
        },
    )
    cands = [
        common_pb2.Candidate(item_id=i, score=1.0 - n / 10, source=MODEL)
        for n, i in enumerate(RETRIEVED)
    ]
    retrieval.answers.update(
        Retrieve=retrieval_pb2.RetrieveResponse(candidates=cands, model=TWO_TOWER),
        RetrieveRelated=retrieval_pb2.RetrieveRelatedResponse(candidates=cands, model=TWO_TOWER),
    )
    ranking = Fake(
        "RankingService",
        {
            "Rank": (ranking_pb2.RankRequest, ranking_pb2.RankResponse),
            "SelectOffer": (ranking_pb2.SelectOfferRequest, ranking_pb2.SelectOfferResponse),
        },
    )
    ranking.answers.update(
        Rank=rank,
        SelectOffer=ranking_pb2.SelectOfferResponse(
            offer=common_pb2.Offer(offer_id="o10", kind=common_pb2.OFFER_KIND_PERCENT_OFF),
            decision_id="d1",
            reason="best margin",
            expected_incremental_margin=1.5,
        ),
    )
    return {"profile": profile, "retrieval": retrieval, "ranking": ranking}


# Generous hop timeouts (the machine is shared); no retries, no caches, a breaker that
# stays closed, unless a test says otherwise.
BASE: dict[str, Any] = {
    "default_deadline_ms": 5000,
    "profile_timeout_ms": 2000,
    "retrieval_timeout_ms": 2000,
    "ranking_timeout_ms": 2000,
    "offer_timeout_ms": 2000,
    "details_timeout_ms": 2000,
    "reserve_ms": 0,
    "read_retries": 0,
    "breaker_failures": 1000,
    "candidates_k": 20,
    "details_cache_seconds": 0,
    "trending_cache_seconds": 0,
    "exposures_enabled": False,
}


@dataclass
class Stack:
    profile: Fake
    retrieval: Fake
    ranking: Fake
    pipeline: Pipeline
    stub: gateway_pb2_grpc.GatewayServiceStub


@pytest.fixture
async def stacks() -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """A gateway (settings: BASE with the overrides given) before fresh scripted servers."""
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def serve(
        register: Callable[[grpc.aio.Server], None], *interceptors: Any
    ) -> grpc.aio.Channel:
        """A server on loopback and a channel to it (no retries)."""
        server = grpc.aio.server(interceptors=interceptors)
        register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)]
        )
        channels.append(channel)
        return channel

    def handlers(fake: Fake) -> Callable[[grpc.aio.Server], None]:
        return lambda server: server.add_generic_rpc_handlers((fake.handler(),))

    async def make(experiments: tuple[Experiment, ...] = (), **overrides: Any) -> Stack:
        down = fakes()
        chans = {name: await serve(handlers(f)) for name, f in down.items()}
        settings = GatewaySettings(**{**BASE, **overrides})
        pipeline = Pipeline(settings, chans, list(experiments), exposures=None)
        client = await serve(
            lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
                GatewayServicer(pipeline), server
            ),
            RuntimeInterceptor("gateway"),
        )
        stub = gateway_pb2_grpc.GatewayServiceStub(client)
        return Stack(down["profile"], down["retrieval"], down["ranking"], pipeline, stub)

    try:
        yield make
    finally:
        for ch in channels:
            await ch.close()
        for server in servers:
            await server.stop(None)


@pytest.fixture
async def stack(stacks: Callable[..., Awaitable[Stack]]) -> Stack:
    return await stacks()


def ids(resp: Any) -> list[str]:
    return [r.item.item_id for r in resp.items]


def degraded(resp: Any) -> list[tuple[str, str, str]]:
    return [(d.stage, d.fallback, d.reason) for d in resp.degraded]


def stages(resp: Any) -> dict[str, tuple[int, bool, str]]:
    return {s.stage: (s.item_count, s.degraded, s.detail) for s in resp.debug.stages}


def hops() -> dict[tuple[str, str], float]:
    """Calls per (hop, outcome) so far, from the gateway's hop metric."""
    out = {}
    for metric in REGISTRY.collect():
        if metric.name == "mercato_gateway_hop_latency_seconds":
            for s in metric.samples:
                if s.name.endswith("_count"):
                    out[(s.labels["hop"], s.labels["outcome"])] = s.value
    return out


def hop_delta(before: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in hops().items() if v != before.get(k, 0.0)}


async def recommend(stack: Stack, **kw: Any) -> gateway_pb2.RecommendResponse:
    kw.setdefault("debug", True)
    return await stack.stub.Recommend(gateway_pb2.RecommendRequest(**kw), timeout=10)


# ---------------------------------------------------------------------------- healthy


async def test_healthy_answer_is_ranked_full_and_names_no_fallback(stack: Stack) -> None:
    before = hops()
    resp = await recommend(stack, customer_id="alice", k=4)
    # Ranking's order (the reverse of retrieval's, the sold-out item left out by ranking).
    in_stock = [i for i in RETRIEVED if i != "gone"]
    assert ids(resp) == in_stock[::-1][:4]
    assert [r.score for r in resp.items] == [10.0, 9.0, 8.0, 7.0]
    assert [list(r.reasons) for r in resp.items] == [[MODEL]] * 4
    # The details are ranking's (RankedItem.item): no item lookup of their own.
    assert [r.item for r in resp.items] == [ITEMS[i] for i in ids(resp)]
    assert not stack.profile.seen["GetItems"]
    assert not resp.degraded and not resp.HasField("shortfall")
    assert list(resp.models) == [TWO_TOWER, RANKER]
    assert stages(resp) == {
        "profile": (3, False, ""),
        "retrieval": (len(RETRIEVED), False, ""),
        "details": (4, False, "from_ranking"),
        "ranking": (4, False, ""),
    }
    (rank_req,) = stack.ranking.seen["Rank"]
    assert [c.item_id for c in sent(rank_req)] == RETRIEVED  # ranking drops the sold out
    assert not rank_req.candidates  # the gateway sends columns
    assert rank_req.k == 4 and rank_req.profile == PROFILES["alice"]
    assert rank_req.return_items  # ranking answers with the details
    assert not rank_req.items  # ranking reads its own item table unless told otherwise
    (ret_req,) = stack.retrieval.seen["Retrieve"]
    assert ret_req.k == 20 and ret_req.profile == PROFILES["alice"]  # max(k, candidates_k)
    assert ret_req.filters.exclude_purchased and ret_req.filters.in_stock_only
    assert not ret_req.filters.exclude_in_cart
    assert ret_req.columns  # asks for the candidates as columns
    assert hop_delta(before) == {
        ("profile", "OK"): 1,
        ("retrieval", "OK"): 1,
        ("ranking", "OK"): 1,
    }


async def test_retrieval_filters_follow_the_request(stack: Stack) -> None:
    await recommend(
        stack,
        customer_id="alice",
        k=30,
        categories=["kitchen", "garden"],
        exclude_item_ids=["p9", "p2"],
        context=common_pb2.Context(surface=common_pb2.SURFACE_CHECKOUT),
    )
    await recommend(stack, customer_id="alice", context=common_pb2.Context(surface=CART))
    first, second = stack.retrieval.seen["Retrieve"]
    assert first.k == 30  # more than candidates_k asked for
    assert list(first.filters.exclude_item_ids) == ["p2", "p9"]  # sorted
    assert list(first.filters.categories) == ["kitchen", "garden"]
    assert first.filters.exclude_in_cart and second.filters.exclude_in_cart
    checkout = common_pb2.Context(surface=common_pb2.SURFACE_CHECKOUT)
    assert first.context == checkout and second.context == common_pb2.Context(surface=CART)
    assert stack.ranking.seen["Rank"][0].context == checkout
    # No experiment: each service's default model.
    assert not first.model_alias and not stack.ranking.seen["Rank"][0].model_alias


async def test_experiments_choose_the_models_asked_for(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(
        experiments=(
            Experiment("ret-exp", "retrieval", (Variant("treatment", "challenger", 1.0),)),
            Experiment("rank-exp", "ranking", (Variant("control", "champion-r", 1.0),)),
        )
    )
    resp = await recommend(stack, customer_id="alice", k=3)
    assert [(e.experiment, e.variant) for e in resp.experiments] == [
        ("ret-exp", "treatment"),
        ("rank-exp", "control"),
    ]
    assert stack.retrieval.seen["Retrieve"][0].model_alias == "challenger"
    assert stack.ranking.seen["Rank"][0].model_alias == "champion-r"


async def test_ranking_sends_item_details_when_configured(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(rank_sends_items=True, details_cache_seconds=60)
    for _ in range(2):  # the second time from the details cache
        resp = await recommend(stack, customer_id="alice", k=3)
        assert len(resp.items) == 3
    for req, raw in zip(stack.ranking.seen["Rank"], stack.ranking.raw["Rank"], strict=True):
        assert [c.item_id for c in sent(req)] == [i for i in RETRIEVED if i != "gone"]
        assert list(req.items) == [ITEMS[c.item_id] for c in sent(req)]
        known = ranking_pb2.RankRequest()
        known.CopyFrom(req)
        known.DiscardUnknownFields()
        assert known.ByteSize() == len(raw)  # nothing but the fields, pre-serialized
    assert len(stack.profile.seen["GetItems"]) == 1


# ---------------------------------------------------------------------------- profile


async def test_profile_down_serves_an_anonymous_profile(stack: Stack) -> None:
    stack.profile.down("GetProfile")
    before = hops()
    resp = await recommend(stack, customer_id="alice", k=3)
    assert degraded(resp) == [("profile", "anonymous", DOWN)]
    assert stages(resp)["profile"] == (0, True, DOWN)
    assert len(resp.items) == 3 and resp.items[0].reasons == [MODEL]
    (req,) = stack.retrieval.seen["Retrieve"]
    assert req.profile == common_pb2.Profile(customer_id="alice", known=False)
    assert hop_delta(before)[("profile", "UNAVAILABLE")] == 1


async def test_no_customer_no_profile_call(stack: Stack) -> None:
    resp = await recommend(stack, k=3)
    assert not stack.profile.seen["GetProfile"] and not resp.degraded
    assert "profile" not in stages(resp)
    (req,) = stack.retrieval.seen["Retrieve"]
    assert req.profile == common_pb2.Profile(known=False)


# -------------------------------------------------------------------------- retrieval


async def test_retrieval_down_serves_popular_items_without_purchases(stack: Stack) -> None:
    stack.retrieval.down()
    before = hops()
    resp = await recommend(stack, customer_id="alice", k=4, exclude_item_ids=["p3"])
    (treq,) = stack.profile.seen["GetTrending"]
    # want = candidates_k, and room for what is left out: purchases and exclusions (sorted)
    assert treq.k == 20 + 3 and treq.category == "" and treq.in_stock_only
    assert list(treq.exclude_item_ids) == ["p0", "p1", "p3"]
    popular = [i for i in POPULAR if i not in ("gone", "p0", "p1", "p3")]
    (rreq,) = stack.ranking.seen["Rank"]
    assert [c.item_id for c in sent(rreq)] == popular
    assert {c.source for c in sent(rreq)} == {TRENDING}
    assert [c.score for c in sent(rreq)] == [100.0 - POPULAR.index(i) for i in popular]
    assert ids(resp) == popular[::-1][:4]  # then ranked as usual
    assert degraded(resp) == [("retrieval", "popular_items", DOWN)]
    assert stages(resp)["retrieval"] == (len(popular), True, DOWN)
    delta = hop_delta(before)
    assert delta[("retrieval", "UNAVAILABLE")] == 1 and delta[("trending", "OK")] == 1


async def test_popular_items_of_the_one_category_asked_for(stack: Stack) -> None:
    stack.retrieval.down()
    stack.ranking.down()
    resp = await recommend(stack, customer_id="alice", k=10, categories=["kitchen"])
    kitchen = [f"p{i}" for i in (3, 5, 7, 9, 11)]  # p1 bought, gone sold out
    assert ids(resp) == kitchen
    assert stack.profile.seen["GetTrending"][0].category == "kitchen"
    assert resp.shortfall.reason == "5 of 10 items: 5 candidates after retrieval's filters"
    await recommend(stack, customer_id="alice", k=10, categories=["kitchen", "garden"])
    assert stack.profile.seen["GetTrending"][1].category == ""  # several: all of them


async def test_retrieval_and_trending_down_give_an_empty_list_that_says_why(
    stack: Stack,
) -> None:
    stack.retrieval.down()
    stack.profile.down("GetTrending")
    resp = await recommend(stack, customer_id="alice", k=5)
    assert not resp.items
    assert degraded(resp) == [("retrieval", "none", f"{DOWN}; trending: {DOWN}")]
    assert stages(resp)["retrieval"] == (0, True, DOWN)
    assert "ranking" not in stages(resp) and "details" not in stages(resp)
    assert not stack.ranking.seen["Rank"] and not stack.profile.seen["GetItems"]
    assert resp.shortfall == common_pb2.Shortfall(
        requested=5, returned=0, reason="0 of 5 items: 0 candidates after retrieval's filters"
    )


async def test_trending_list_is_cached_and_filtered_per_call(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(trending_cache_seconds=60, candidates_k=5)
    stack.retrieval.down()
    stack.ranking.down()
    a = await recommend(stack, customer_id="alice", k=3)
    b = await recommend(stack, customer_id="bob", k=4, exclude_item_ids=["p0"])
    (treq,) = stack.profile.seen["GetTrending"]  # one call: the second from the cache
    assert treq.k == 105 and not treq.exclude_item_ids and treq.in_stock_only  # candidates_k+100
    assert ids(a) == ["p2", "p3", "p4"]  # alice's purchases filtered here
    assert ids(b) == ["p1", "p2", "p3", "p4"]
    assert [list(r.reasons) for r in b.items] == [[TRENDING, FALLBACK]] * 4


async def test_a_cached_list_run_short_by_exclusions_asks_again_with_them(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(trending_cache_seconds=60, candidates_k=1, max_k=1000)
    many = [f"t{i}" for i in range(1200)]
    stack.profile.answers["GetTrending"] = lambda r: trending(r, many)
    stack.retrieval.down()
    stack.ranking.down()
    exact = await recommend(stack, k=100, exclude_item_ids=["t0"])  # 100 of the 101 left
    assert ids(exact) == many[1:101] and len(stack.profile.seen["GetTrending"]) == 1
    resp = await recommend(stack, k=100, exclude_item_ids=["t1", "t0"])
    first, second = stack.profile.seen["GetTrending"]
    assert first.k == 101 and not first.exclude_item_ids  # the cached depth: 1 + 100
    assert second.k == 102 and list(second.exclude_item_ids) == ["t0", "t1"]
    assert ids(resp) == many[2:102]
    # k + exclusions, at most 1000 (the profile service's limit)
    await recommend(stack, k=1000, exclude_item_ids=["t0"])
    assert stack.profile.seen["GetTrending"][-1].k == 1000
    assert len(stack.profile.seen["GetTrending"]) == 3  # the cached 101 are too few


async def test_trending_depth_is_at_most_1000(stacks: Callable[..., Awaitable[Stack]]) -> None:
    stack = await stacks(trending_cache_seconds=60, candidates_k=950)
    stack.retrieval.down()
    await recommend(stack, k=3)
    assert stack.profile.seen["GetTrending"][0].k == 1000


async def test_the_last_trending_list_serves_while_the_profile_service_is_down(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(trending_cache_seconds=0.05)
    stack.retrieval.down()
    stack.ranking.down()
    await recommend(stack, k=3)
    await asyncio.sleep(0.1)  # the cached list has expired
    stack.profile.down("GetTrending")
    resp = await recommend(stack, k=3, exclude_item_ids=["p1"])
    assert ids(resp) == ["p0", "p2", "p3"]  # stale, filtered, cut to k
    assert degraded(resp)[0] == ("retrieval", "popular_items", DOWN)
    assert len(stack.profile.seen["GetTrending"]) == 2  # it was asked first
    # No list was ever cached for this category: nothing to serve.
    resp = await recommend(stack, k=3, categories=["garden"])
    assert degraded(resp)[0] == ("retrieval", "none", f"{DOWN}; trending: {DOWN}")
    assert not resp.items


# ---------------------------------------------------------------------------- ranking


async def test_ranking_down_keeps_retrieval_order_with_the_rules_that_need_no_model(
    stack: Stack,
) -> None:
    stack.ranking.down("Rank")
    before = hops()
    resp = await recommend(stack, customer_id="alice", k=3)
    # Retrieval's order, without the sold-out item and alice's purchase (p0), cut to k.
    assert ids(resp) == ["p5", "p6", "p7"]
    assert [r.score for r in resp.items] == pytest.approx([1.0, 0.9, 0.6])
    assert [list(r.reasons) for r in resp.items] == [[MODEL, FALLBACK]] * 3
    assert [r.rank for r in resp.items] == [1, 2, 3]
    assert degraded(resp) == [("ranking", "retrieval_order", DOWN)]
    assert stages(resp)["ranking"] == (0, True, DOWN)
    assert list(resp.models) == [TWO_TOWER]
    assert not resp.HasField("shortfall")
    assert hop_delta(before)[("ranking", "UNAVAILABLE")] == 1


async def test_ranking_fallback_keeps_purchases_on_buy_again(stack: Stack) -> None:
    stack.ranking.down("Rank")
    resp = await recommend(
        stack,
        customer_id="alice",
        k=5,
        exclude_item_ids=["p1"],
        context=common_pb2.Context(surface=common_pb2.SURFACE_BUY_AGAIN),
    )
    # Buy again: the purchases themselves (not p1, excluded), scored by count.
    assert ids(resp) == ["p0"] and resp.items[0].score == 2.0
    assert list(resp.items[0].reasons) == [common_pb2.REASON_BUY_AGAIN, FALLBACK]
    assert not stack.retrieval.seen["Retrieve"]
    assert stages(resp)["retrieval"] == (1, False, "purchases")
    assert resp.shortfall.reason == "1 of 5 items: 1 candidates after retrieval's filters"


async def test_a_short_list_names_what_the_rules_left_out(stack: Stack) -> None:
    stack.ranking.down("Rank")
    resp = await recommend(stack, customer_id="alice", k=10)
    assert ids(resp) == ["p5", "p6", "p7", "p8", "p9"]
    assert resp.shortfall == common_pb2.Shortfall(
        requested=10,
        returned=5,
        reason=(
            "5 of 10 items: 7 candidates after retrieval's filters; "
            "left out by rules: out_of_stock 1, purchased 1"
        ),
        dropped={"out_of_stock": 1, "purchased": 1},
    )


async def test_ranking_drops_add_to_the_shortfall(stack: Stack) -> None:
    def few(req: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
        resp = rank(req)
        del resp.items[2:]
        resp.dropped.update({"brand_cap": 2, "out_of_stock": 3, "nothing": 0})
        return resp

    stack.ranking.answers["Rank"] = few
    resp = await recommend(stack, customer_id="alice", k=4)
    assert len(resp.items) == 2
    assert resp.shortfall.reason == (
        "2 of 4 items: 7 candidates after retrieval's filters; "
        "left out by rules: brand_cap 2, out_of_stock 3"
    )
    assert dict(resp.shortfall.dropped) == {"brand_cap": 2, "out_of_stock": 3}


async def test_ranking_reasons_in_words_reach_the_caller_parallel_to_the_codes(
    stack: Stack,
) -> None:
    """gateway.proto RecommendedItem.reason_texts: parallel to `reasons`, as ranking
    gave them."""

    def worded(req: ranking_pb2.RankRequest) -> ranking_pb2.RankResponse:
        resp = rank(req)
        for i, it in enumerate(resp.items):
            it.reasons[:] = [MODEL, SIMILAR]
            it.reason_texts[:] = [f"picked {i}", f"similar to your recent x{i}"]
        return resp

    stack.ranking.answers["Rank"] = worded
    resp = await recommend(stack, customer_id="alice", k=3)
    assert len(resp.items) == 3
    for r in resp.items:
        assert list(r.reasons) == [MODEL, SIMILAR]
        assert len(r.reason_texts) == len(r.reasons)
    assert [list(r.reason_texts) for r in resp.items] == [
        [f"picked {i}", f"similar to your recent x{i}"] for i in range(3)
    ]


async def test_already_a_fallback_reason_is_not_repeated(stack: Stack) -> None:
    cands = [common_pb2.Candidate(item_id="p5", score=1.0, source=FALLBACK)]
    cands.append(common_pb2.Candidate(item_id="p6", score=0.5))  # no source: the model's
    stack.retrieval.answers["Retrieve"] = retrieval_pb2.RetrieveResponse(candidates=cands)
    stack.ranking.down("Rank")
    resp = await recommend(stack, customer_id="alice", k=2)
    assert [list(r.reasons) for r in resp.items] == [[FALLBACK], [MODEL, FALLBACK]]
    assert not resp.models  # retrieval named no model


async def test_sold_out_items_are_left_out_by_ranking_with_no_item_lookup(stack: Stack) -> None:
    gone = [common_pb2.Candidate(item_id="gone", score=1.0, source=MODEL)]
    stack.retrieval.answers["Retrieve"] = retrieval_pb2.RetrieveResponse(candidates=gone)
    resp = await recommend(stack, customer_id="alice", k=2)
    assert not resp.items and not resp.degraded
    assert [c.item_id for c in sent(stack.ranking.seen["Rank"][0])] == ["gone"]
    assert dict(resp.shortfall.dropped) == {"out_of_stock": 1}
    # The last one in stock is still in stock.
    gone.append(common_pb2.Candidate(item_id="last", score=0.5, source=MODEL))
    stack.retrieval.answers["Retrieve"] = retrieval_pb2.RetrieveResponse(candidates=gone)
    resp = await recommend(stack, customer_id="alice", k=2)
    assert ids(resp) == ["last"] and resp.items[0].item == ITEMS["last"]
    assert not stack.profile.seen["GetItems"]


# ---------------------------------------------------------------------- details, offer


async def test_details_down_changes_nothing_while_ranking_answers(stack: Stack) -> None:
    stack.profile.down("GetItems")
    resp = await recommend(stack, customer_id="alice", k=3)
    assert not resp.degraded and not stack.profile.seen["GetItems"]
    assert [r.item for r in resp.items] == [ITEMS[i] for i in ids(resp)]


async def test_a_ranking_without_details_gets_the_lookup_of_the_returned_ids(
    stack: Stack,
) -> None:
    """A ranking service that answers without RankedItem.item (older than return_items,
    or without an item table): one item lookup of the k ids it returned."""
    stack.ranking.answers["Rank"] = bare
    resp = await recommend(stack, customer_id="alice", k=3)
    (lookup,) = stack.profile.seen["GetItems"]
    assert list(lookup.item_ids) == ids(resp) == ["p9", "p8", "p7"]
    assert [r.item for r in resp.items] == [ITEMS[i] for i in ids(resp)]
    assert stages(resp)["details"] == (3, False, "")
    stack.profile.down("GetItems")
    before = hops()
    resp = await recommend(stack, customer_id="alice", k=3)
    assert degraded(resp) == [("details", "ids_only", DOWN)]
    assert stages(resp)["details"] == (0, True, DOWN)
    assert [r.item for r in resp.items] == [common_pb2.Item(item_id=i) for i in ids(resp)]
    assert hop_delta(before)[("details", "UNAVAILABLE")] == 1


async def test_ranking_down_looks_up_the_details_of_the_first_candidates_only(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(candidates_k=100)
    many = [common_pb2.Candidate(item_id=f"m{i}", score=1.0, source=MODEL) for i in range(100)]
    many[1] = common_pb2.Candidate(item_id="gone", score=1.0, source=MODEL)
    stack.retrieval.answers["Retrieve"] = retrieval_pb2.RetrieveResponse(candidates=many)
    stack.ranking.down("Rank")
    resp = await recommend(stack, customer_id="alice", k=3)
    (lookup,) = stack.profile.seen["GetItems"]
    assert list(lookup.item_ids) == [c.item_id for c in many[:13]]  # k + max(10, k)
    assert ids(resp) == ["m0", "m2", "m3"]  # the sold-out one left out by its details
    assert dict(resp.shortfall.dropped) == {} and not resp.HasField("shortfall")


async def test_details_cache_fills_in_while_the_lookup_is_down(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(details_cache_seconds=60)
    stack.ranking.down("Rank")
    small = retrieval_pb2.RetrieveResponse(
        candidates=[common_pb2.Candidate(item_id=i, source=MODEL) for i in ("p5", "p6")]
    )
    stack.retrieval.once["Retrieve"].append(small)
    await recommend(stack, customer_id="alice", k=3)  # caches p5 and p6
    resp = await recommend(stack, customer_id="alice", k=3)  # p5, p6 cached: still asks
    # (alice's purchase p0 is left out before the lookup)
    looked_up = [i for i in RETRIEVED if i != "p0"]
    assert list(stack.profile.seen["GetItems"][1].item_ids) == [
        i for i in looked_up if i not in ("p5", "p6")
    ]
    again = await recommend(stack, customer_id="alice", k=3)
    assert stages(again)["details"] == (len(looked_up), False, "cached")
    assert len(stack.profile.seen["GetItems"]) == 2
    assert ids(resp) == ids(again) == ["p5", "p6", "p7"]
    stack.pipeline.details_cache._data.pop("p7")
    stack.profile.down("GetItems")
    resp = await recommend(stack, customer_id="alice", k=3)
    assert degraded(resp) == [
        ("ranking", "retrieval_order", DOWN),
        ("details", "ids_only", DOWN),
    ]
    assert stages(resp)["details"] == (len(looked_up) - 1, True, DOWN)
    assert [r.item.title for r in resp.items] == ["P5", "P6", ""]  # p7 from nowhere


async def test_retrieval_columns_go_on_to_ranking_as_they_came(stack: Stack) -> None:
    """Columns from retrieval (every source's scores and anchors) reach ranking
    unchanged, in columns again (the sold-out item too: ranking's table leaves it out)."""
    cands = [
        common_pb2.Candidate(
            item_id=i,
            score=1.0 - n / 10,
            source=SIMILAR if n % 2 else MODEL,
            sources=[MODEL, SIMILAR] if n % 2 else [MODEL],
            source_scores=[0.5 - n / 100, 2.0 + n] if n % 2 else [0.5 - n / 100],
            source_anchor_ids=["", "p1"] if n % 2 else [""],
        )
        for n, i in enumerate(RETRIEVED)
    ]
    stack.retrieval.answers["Retrieve"] = retrieval_pb2.RetrieveResponse(
        columns=columns_of(cands), model=TWO_TOWER
    )
    resp = await recommend(stack, customer_id="alice", k=4)
    assert ids(resp) == [i for i in RETRIEVED if i != "gone"][::-1][:4]
    (rreq,) = stack.ranking.seen["Rank"]
    assert not rreq.candidates and rreq.HasField("columns")
    assert candidates_of(rreq.columns) == cands


async def test_columns_of_unequal_length_from_retrieval_degrade_to_popular_items(
    stack: Stack,
) -> None:
    bad = common_pb2.CandidateColumns(item_ids=["p5", "p6"], scores=[1.0], sources=[MODEL])
    stack.retrieval.answers["Retrieve"] = retrieval_pb2.RetrieveResponse(columns=bad)
    resp = await recommend(stack, customer_id="alice", k=4)
    assert len(resp.items) == 4
    assert [(d.stage, d.fallback) for d in resp.degraded] == [("retrieval", "popular_items")]
    assert "unequal length" in resp.degraded[0].reason


async def test_no_candidates_no_details_call(stack: Stack) -> None:
    stack.retrieval.answers["Retrieve"] = retrieval_pb2.RetrieveResponse()
    resp = await recommend(stack, customer_id="alice", k=2)
    assert not resp.items and not stack.profile.seen["GetItems"]
    assert "details" not in stages(resp)


async def test_offer_down_means_no_offer_and_is_not_retried(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(read_retries=1)
    ctx = common_pb2.Context(surface=CART)
    ok = await recommend(stack, customer_id="alice", k=2, include_offer=True, context=ctx)
    assert ok.offer.offer_id == "o10" and ok.offer_decision_id == "d1"
    (offer_req,) = stack.ranking.seen["SelectOffer"]
    assert offer_req.profile == PROFILES["alice"] and offer_req.context == ctx
    before = hops()
    assert stages(ok)["offer"] == (1, False, "best margin") and not ok.degraded
    stack.ranking.once["SelectOffer"].append(S.UNAVAILABLE)
    resp = await recommend(stack, customer_id="alice", k=2, include_offer=True, context=ctx)
    assert len(stack.ranking.seen["SelectOffer"]) == 2  # one each: a decision reserves budget
    assert degraded(resp) == [("offer", "no_offer", DOWN)]
    assert stages(resp)["offer"] == (0, True, DOWN)
    assert not resp.HasField("offer") and not resp.offer_decision_id
    assert len(resp.items) == 2
    assert hop_delta(before)[("offer", "UNAVAILABLE")] == 1


async def test_a_none_offer_is_counted_as_no_offer_in_the_stage(stack: Stack) -> None:
    stack.ranking.answers["SelectOffer"] = ranking_pb2.SelectOfferResponse(
        decision_id="d2", reason="no budget"
    )
    resp = await recommend(
        stack,
        customer_id="alice",
        k=2,
        include_offer=True,
        context=common_pb2.Context(surface=CART),
    )
    assert stages(resp)["offer"] == (0, False, "no budget")
    assert resp.offer_decision_id == "d2" and not resp.HasField("offer")


# ------------------------------------------------------------ timeouts, retries, breaker

HOPS = {
    # hop: (fake, method, the setting of its timeout, what its failure degrades)
    "profile": ("profile", "GetProfile", "profile_timeout_ms", ("profile", "anonymous")),
    "retrieval": ("retrieval", "Retrieve", "retrieval_timeout_ms", ("retrieval", "popular_items")),
    "details": ("profile", "GetItems", "details_timeout_ms", ("details", "ids_only")),
    "ranking": ("ranking", "Rank", "ranking_timeout_ms", ("ranking", "retrieval_order")),
    "offer": ("ranking", "SelectOffer", "offer_timeout_ms", ("offer", "no_offer")),
}


@pytest.mark.parametrize("hop", sorted(HOPS))
async def test_a_slow_hop_times_out_on_its_own_deadline(
    stacks: Callable[..., Awaitable[Stack]], hop: str
) -> None:
    fake, method, setting, (stage, fallback) = HOPS[hop]
    stack = await stacks(**{setting: 200})
    getattr(stack, fake).delay[method] = 5.0
    if hop == "details":  # looked up only when ranking answers without the details
        stack.ranking.answers["Rank"] = bare
    started = time.monotonic()
    resp = await recommend(
        stack,
        customer_id="alice",
        k=3,
        include_offer=True,
        context=common_pb2.Context(surface=CART),
    )
    elapsed = time.monotonic() - started
    assert (stage, fallback) in [(d.stage, d.fallback) for d in resp.degraded]
    reason = next(d.reason for d in resp.degraded if d.stage == stage)
    assert reason.startswith("DEADLINE_EXCEEDED")
    assert elapsed < 2.5  # the hop's 0.2 s, not the slow answer (5 s) nor the caller's deadline
    assert len(resp.items) == 3


async def test_trending_times_out_on_the_profile_hop_deadline(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(profile_timeout_ms=200)
    stack.retrieval.down()
    stack.profile.delay["GetTrending"] = 5.0
    started = time.monotonic()
    resp = await recommend(stack, k=3)
    assert time.monotonic() - started < 2.5
    assert resp.degraded[0].fallback == "none" and "trending: DEADLINE_EXCEEDED" in (
        resp.degraded[0].reason
    )


@pytest.mark.parametrize("hop", ["profile", "retrieval", "details", "ranking", "trending"])
async def test_reads_are_retried_once_on_unavailable(
    stacks: Callable[..., Awaitable[Stack]], hop: str
) -> None:
    stack = await stacks(read_retries=1)
    if hop == "trending":
        stack.retrieval.down()
        fake, method = stack.profile, "GetTrending"
    else:
        name, m, _, _ = HOPS[hop]
        fake, method = getattr(stack, name), m
    if hop == "details":  # looked up only when ranking answers without the details
        stack.ranking.answers["Rank"] = bare
    fake.once[method].append(S.UNAVAILABLE)
    resp = await recommend(stack, customer_id="alice", k=3)
    assert len(fake.seen[method]) == 2
    assert [d.stage for d in resp.degraded] == (["retrieval"] if hop == "trending" else [])
    assert len(resp.items) == 3


async def test_an_open_breaker_skips_retrieval(stacks: Callable[..., Awaitable[Stack]]) -> None:
    stack = await stacks(breaker_failures=2, breaker_reset_seconds=60)
    stack.retrieval.down()
    for _ in range(2):
        await recommend(stack, customer_id="alice", k=3)
    resp = await recommend(stack, customer_id="alice", k=3)
    assert len(stack.retrieval.seen["Retrieve"]) == 2  # the third call never went out
    assert degraded(resp) == [("retrieval", "popular_items", "circuit breaker open for retrieval")]
    assert len(resp.items) == 3


# ------------------------------------------------------------------------- overload


async def test_overloaded_answer_is_the_cached_popular_list(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(trending_cache_seconds=60, details_cache_seconds=60)
    pipe = stack.pipeline
    assert pipe.overloaded_recommend(gateway_pb2.RecommendRequest(k=3)) is None  # nothing cached
    # ... and that call fetches the popular list and its details in the background
    for _ in range(200):
        if pipe.trending_cache.get_stale("") is not None and not pipe._warming:
            break
        await asyncio.sleep(0.01)
    assert len(stack.profile.seen["GetTrending"]) == 1
    assert len(stack.profile.seen["GetItems"]) == 1
    one = [common_pb2.Candidate(item_id="p0", source=MODEL)]
    stack.retrieval.once["Retrieve"].append(retrieval_pb2.RetrieveResponse(candidates=one))
    await recommend(stack, k=2)  # caches the details of p0
    stack.retrieval.down()
    stack.profile.down("GetItems")
    await recommend(stack, k=2)  # the popular list from the cache
    await recommend(stack, k=3, categories=["kitchen"])  # and that of kitchen (no details)
    resp = pipe.overloaded_recommend(gateway_pb2.RecommendRequest(k=3, exclude_item_ids=["p1"]))
    assert resp is not None
    assert ids(resp) == ["p0", "p2", "p3"]
    assert [r.item.title for r in resp.items] == ["P0", "P2", "P3"]  # details from the cache
    assert [list(r.reasons) for r in resp.items] == [[TRENDING, FALLBACK]] * 3
    assert [r.score for r in resp.items] == [99.0, 97.0, 96.0]
    assert degraded(resp) == [
        ("gateway", "popular_items", "overloaded: too many calls in progress")
    ]
    assert not resp.HasField("shortfall")
    kitchen = pipe.overloaded_recommend(gateway_pb2.RecommendRequest(k=9, categories=["kitchen"]))
    assert kitchen is not None and ids(kitchen) == [f"p{i}" for i in (1, 3, 5, 7, 9, 11)]
    assert [r.item.title for r in kitchen.items][:2] == ["P1", "P3"]  # from the warm-up
    assert kitchen.shortfall == common_pb2.Shortfall(
        requested=9, returned=6, reason="6 of 9 items: 6 candidates after retrieval's filters"
    )
    default_k = pipe.overloaded_recommend(gateway_pb2.RecommendRequest())
    assert default_k is not None and len(default_k.items) == 10
    assert len(stack.profile.seen["GetTrending"]) == 2  # no downstream call for these


async def test_past_the_bound_a_call_gets_the_cached_list_at_once(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(trending_cache_seconds=60, max_in_flight=1)
    stack.retrieval.once["Retrieve"].append(S.UNAVAILABLE)
    await recommend(stack, k=3)  # caches the popular list
    stack.retrieval.delay["Retrieve"] = 2.0
    slow = asyncio.create_task(recommend(stack, k=3))
    while len(stack.retrieval.seen["Retrieve"]) < 2:  # the slow call holds the one slot
        await asyncio.sleep(0.005)
    started = time.monotonic()
    fast = await stack.stub.Recommend(
        gateway_pb2.RecommendRequest(k=3), timeout=10, metadata=(("x-request-id", "req-77"),)
    )
    assert time.monotonic() - started < 1.5 and not slow.done()
    assert fast.request_id == "req-77"
    assert ids(fast) == ["p0", "p1", "p2"] and fast.degraded[0].stage == "gateway"
    assert len(stack.retrieval.seen["Retrieve"]) == 2  # the fast answer asked nobody
    assert len((await slow).items) == 3


async def test_near_the_bound_the_popular_list_is_fetched_before_a_call_is_shed(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(trending_cache_seconds=60, max_in_flight=2)
    stack.retrieval.delay["Retrieve"] = 1.0
    first = asyncio.create_task(recommend(stack, k=3))  # alone: nothing fetched ahead
    while not stack.retrieval.seen["Retrieve"]:
        await asyncio.sleep(0.005)
    assert not stack.profile.seen["GetTrending"]
    second = asyncio.create_task(recommend(stack, k=3))  # half the bound in use
    for _ in range(200):
        if stack.profile.seen["GetTrending"]:
            break
        await asyncio.sleep(0.005)
    assert len(stack.profile.seen["GetTrending"]) == 1
    assert not first.done() and not second.done()  # fetched before anything was shed
    await asyncio.gather(first, second)
    shed = stack.pipeline.overloaded_recommend(gateway_pb2.RecommendRequest(k=3))
    assert shed is not None and ids(shed) == ["p0", "p1", "p2"]


async def test_near_the_bound_a_call_with_little_time_left_is_shed(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    stack = await stacks(trending_cache_seconds=60, max_in_flight=4)
    stack.retrieval.once["Retrieve"].append(S.UNAVAILABLE)
    await recommend(stack, k=3)  # caches the popular list
    req = gateway_pb2.RecommendRequest(k=3)
    # idle: a short deadline (under ADMIT_LATE_MS, 100) is served in full
    quick = await stack.stub.Recommend(req, timeout=0.09)
    assert not quick.degraded and len(stack.retrieval.seen["Retrieve"]) == 2
    stack.retrieval.delay["Retrieve"] = 1.0
    slow = [asyncio.create_task(recommend(stack, k=3)) for _ in range(2)]
    while len(stack.retrieval.seen["Retrieve"]) < 4:  # half the bound in use
        await asyncio.sleep(0.005)
    started = time.monotonic()
    late = await stack.stub.Recommend(req, timeout=0.09)
    assert time.monotonic() - started < 0.09
    assert [(d.stage, d.fallback) for d in late.degraded] == [("gateway", "popular_items")]
    assert len(stack.retrieval.seen["Retrieve"]) == 4  # asked nobody
    on_time = asyncio.ensure_future(stack.stub.Recommend(req, timeout=5))
    while len(stack.retrieval.seen["Retrieve"]) < 5:  # a call with time left is admitted
        await asyncio.sleep(0.005)
    assert not (await on_time).degraded
    await asyncio.gather(*slow)


# --------------------------------------------------------------------- related, cart


async def related(stack: Stack, **kw: Any) -> gateway_pb2.GetRelatedItemsResponse:
    kw.setdefault("kind", common_pb2.RELATION_KIND_COMPLEMENT)
    kw.setdefault("debug", True)
    return await stack.stub.GetRelatedItems(gateway_pb2.GetRelatedItemsRequest(**kw), timeout=10)


@pytest.mark.parametrize(
    ("sources", "reason"),
    [
        (
            [COMPLEMENT, SIMILAR, SIMILAR],
            "basket data has 1 complement of item 'p1' for this list; "
            "2 similar items (REASON_SIMILAR) fill it",
        ),
        (
            [COMPLEMENT, COMPLEMENT, SIMILAR],
            "basket data has 2 complements of item 'p1' for this list; "
            "1 similar item (REASON_SIMILAR) fill it",
        ),
        ([COMPLEMENT, COMPLEMENT, COMPLEMENT], None),
    ],
)
async def test_complements_filled_with_similar_items_say_so(
    stack: Stack, sources: list[common_pb2.Reason.ValueType], reason: str | None
) -> None:
    cands = [
        common_pb2.Candidate(item_id=f"p{5 + n}", score=1.0, source=s)
        for n, s in enumerate(sources)
    ]
    stack.retrieval.answers["RetrieveRelated"] = retrieval_pb2.RetrieveRelatedResponse(
        candidates=cands
    )
    resp = await related(stack, item_id="p1", k=3)
    assert [list(r.reasons) for r in resp.items] == [[s] for s in sources]
    assert degraded(resp) == ([] if reason is None else [("retrieval", "similar_items", reason)])


async def test_related_with_retrieval_down_serves_popular_items_but_the_anchor(
    stack: Stack,
) -> None:
    stack.retrieval.down()
    resp = await related(stack, item_id="p0", k=3)
    assert ids(resp) == ["p1", "p2", "p3"]
    assert degraded(resp) == [("retrieval", "popular_items", DOWN)]  # no similar_items claim
    assert list(stack.profile.seen["GetTrending"][0].exclude_item_ids) == ["p0"]


@pytest.mark.parametrize(
    ("code", "message"),
    [(S.INVALID_ARGUMENT, "fake INVALID_ARGUMENT"), (S.NOT_FOUND, "fake NOT_FOUND")],
)
async def test_the_callers_mistakes_keep_their_status(
    stack: Stack, code: grpc.StatusCode, message: str
) -> None:
    stack.retrieval.answers["RetrieveRelated"] = code
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await related(stack, item_id="p0", k=3)
    assert err.value.code() == code and err.value.details() == message
    assert not stack.profile.seen["GetTrending"]  # no fallback for a wrong question


async def test_a_failed_event_forward_is_unavailable_with_the_cause(stack: Stack) -> None:
    stack.profile.down("TrackEvents")
    ev = common_pb2.Event(event_id="e1", customer_id="alice", type=common_pb2.EVENT_TYPE_VIEW)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.stub.TrackEvents(gateway_pb2.TrackEventsRequest(events=[ev]), timeout=10)
    assert err.value.code() == S.UNAVAILABLE
    assert err.value.details() == f"track is unavailable, retry later ({DOWN})"


async def test_cart_with_retrieval_down_serves_popular_items_not_in_the_cart(
    stack: Stack,
) -> None:
    stack.retrieval.down()
    resp = await stack.stub.GetCartRecommendations(
        gateway_pb2.GetCartRecommendationsRequest(customer_id="carol", k=3, debug=True),
        timeout=10,
    )
    (treq,) = stack.profile.seen["GetTrending"]
    assert treq.k == 3 + 3 and list(treq.exclude_item_ids) == ["p0", "p3", "p4"]
    assert ids(resp) == ["p5", "p2", "p1"]  # popular p1, p2, p5, ranked in reverse
    assert degraded(resp) == [("retrieval", "popular_items", DOWN)]
    stack.profile.down("GetTrending")
    resp = await stack.stub.GetCartRecommendations(
        gateway_pb2.GetCartRecommendationsRequest(customer_id="carol", k=3), timeout=10
    )
    assert not resp.items
    assert degraded(resp) == [("retrieval", "none", f"{DOWN}; trending: {DOWN}")]
