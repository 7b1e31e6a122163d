"""The gateway's composition: profile, then retrieval, then ranking (with the offer
decision and the batch item lookup alongside), each hop under its own deadline, each
failure turned into a fallback that the answer names in ``degraded``.

Fallbacks:

- profile down: an anonymous profile; recommendations from context alone.
- retrieval down: trending items from the profile service, filtered by the profile.
- ranking down: retrieval order with the rules that need no model (stock, purchased).
- item details down: items without details (ids only).
- offer down: no offer.
- complements asked for (GetRelatedItems with RELATION_KIND_COMPLEMENT, cart
  recommendations) where retrieval's basket data has too few: retrieval fills the list
  with similar items; named ``retrieval: similar_items``.
- cart recommendations for an empty cart: the customer's recommendations instead of
  complements; named ``retrieval: personalized_items``.

A list shorter than the k asked for carries a ``shortfall`` saying why (candidates after
retrieval's filters, and those left out per rule); a full list has none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

import grpc
from google.protobuf.internal import encoder, wire_format
from google.protobuf.message import DecodeError, Message

from mercato.v1 import (
    common_pb2,
    gateway_pb2,
    profile_pb2,
    profile_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from services.common.candidates import columns_of, without_rows
from services.common.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from services.common.logs import request_id_var
from services.common.wire import WireError, field_payload, field_tag, length_delimited, varint
from services.gateway.breaker import CircuitBreaker
from services.gateway.cache import TtlCache
from services.gateway.downstream import Deadline, Downstream, HopError
from services.gateway.experiments import Experiment
from services.gateway.exposures import ExposureLog, exposure_event
from services.gateway.settings import GatewaySettings

#: One ranked item: id, score, reason codes and their texts (RankedItem.reason_texts).
Ranked = tuple[str, float, list[int], list[str]]

MAX_ID_BYTES = 128
# Upper bounds of the public list fields (docs/api.md, the protos' comments): past them a
# call gets INVALID_ARGUMENT naming the field, before any downstream work.
MAX_EXCLUDE_ITEM_IDS = 1000  # RecommendRequest.exclude_item_ids
MAX_CATEGORIES = 100  # RecommendRequest.categories
MAX_CATEGORY_BYTES = 256  # each category name
MAX_CART_ITEM_IDS = 500  # Context.cart_item_ids
MAX_EVENTS = 1000  # TrackEventsRequest.events
# Tag of RankRequest.items (field number, wire type 2 = length-delimited).
_ITEMS_TAG = encoder.TagBytes(
    ranking_pb2.RankRequest.DESCRIPTOR.fields_by_name["items"].number,
    wire_format.WIRETYPE_LENGTH_DELIMITED,
)
# Number of GetProfileResponse.profile, and the tag of ``profile`` in each request
# that carries it: the profile travels on as the bytes the profile service sent.
_PROFILE_IN_RESPONSE = profile_pb2.GetProfileResponse.DESCRIPTOR.fields_by_name["profile"].number
_PROFILE_TAGS = {
    m.DESCRIPTOR.full_name: field_tag(m.DESCRIPTOR, "profile")
    for m in (
        retrieval_pb2.RetrieveRequest,
        retrieval_pb2.RetrieveRelatedRequest,
        ranking_pb2.RankRequest,
        ranking_pb2.SelectOfferRequest,
    )
}


_SURFACE_NAMES = {
    common_pb2.SURFACE_UNSPECIFIED: "home",
    common_pb2.SURFACE_HOME: "home",
    common_pb2.SURFACE_PRODUCT: "product",
    common_pb2.SURFACE_CART: "cart",
    common_pb2.SURFACE_CHECKOUT: "checkout",
    common_pb2.SURFACE_BUY_AGAIN: "buy_again",
    common_pb2.SURFACE_EMAIL: "email",
}


# Pipeline order of the stages in DebugInfo (gateway.proto): the offer decision runs
# alongside retrieval and ranking and is listed last.
STAGE_ORDER = {
    name: i for i, name in enumerate(("profile", "retrieval", "details", "ranking", "offer"))
}


@dataclass
class Trace:
    """Per-request record of stages, degradations, models and what shortened the list."""

    debug: bool
    stages: list[common_pb2.StageInfo] = field(default_factory=list)
    degraded: list[common_pb2.Degradation] = field(default_factory=list)
    models: list[common_pb2.ModelVersion] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    # Candidates found by retrieval (or its fallback) after its filters, and those left
    # out later, per rule: what explains a list shorter than k.
    candidates: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # The request's profile and its serialized bytes (as the profile service sent them,
    # or serialized once on first use), appended to every downstream request.
    profile: common_pb2.Profile | None = None
    profile_bytes: bytes = b""

    def drop(self, rule: str, n: int = 1) -> None:
        if n:
            self.dropped[rule] = self.dropped.get(rule, 0) + n

    def stage(
        self, name: str, started: float, count: int, degraded: bool = False, detail: str = ""
    ) -> None:
        if self.debug:
            self.stages.append(
                common_pb2.StageInfo(
                    stage=name,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    item_count=count,
                    degraded=degraded,
                    detail=detail,
                )
            )

    def degrade(self, stage: str, fallback: str, reason: str) -> None:
        self.degraded.append(common_pb2.Degradation(stage=stage, fallback=fallback, reason=reason))

    def debug_info(self) -> gateway_pb2.DebugInfo | None:
        if not self.debug:
            return None
        stages = sorted(self.stages, key=lambda st: STAGE_ORDER.get(st.stage, len(STAGE_ORDER)))
        return gateway_pb2.DebugInfo(
            stages=stages, total_ms=(time.perf_counter() - self.started) * 1000
        )

    def shortfall(self, k: int, returned: int) -> common_pb2.Shortfall | None:
        """Why the list has fewer than ``k`` items; None for a full list."""
        if returned >= k:
            return None
        parts = [f"{self.candidates} candidates after retrieval's filters"]
        if self.dropped:
            rules = ", ".join(f"{rule} {n}" for rule, n in sorted(self.dropped.items()))
            parts.append(f"left out by rules: {rules}")
        return common_pb2.Shortfall(
            requested=k,
            returned=returned,
            reason=f"{returned} of {k} items: " + "; ".join(parts),
            dropped=self.dropped,
        )


def surface_name(surface: int) -> str:
    return _SURFACE_NAMES.get(surface, "home")  # type: ignore[call-overload]


def _check_id(
    value: str, field_name: str, required: bool = True, max_bytes: int = MAX_ID_BYTES
) -> None:
    if required and not value:
        raise InvalidArgument(f"{field_name} is required")
    if len(value.encode()) > max_bytes:
        raise InvalidArgument(f"{field_name} is longer than {max_bytes} bytes")


def _check_list(
    values: Sequence[str], field_name: str, most: int, max_bytes: int = MAX_ID_BYTES
) -> None:
    """At most ``most`` non-empty entries of at most ``max_bytes`` bytes each."""
    if len(values) > most:
        raise InvalidArgument(f"{field_name} has {len(values)} entries; at most {most} per call")
    for value in values:
        _check_id(value, f"{field_name}[]", max_bytes=max_bytes)


def _check_context(ctx: common_pb2.Context) -> None:
    _check_id(ctx.anchor_item_id, "context.anchor_item_id", required=False)
    _check_list(ctx.cart_item_ids, "context.cart_item_ids", MAX_CART_ITEM_IDS)


class Pipeline:
    """Holds the downstream clients and runs the public calls."""

    def __init__(
        self,
        settings: GatewaySettings,
        channels: dict[str, grpc.aio.Channel],
        experiments: list[Experiment],
        exposures: ExposureLog | None = None,
    ) -> None:
        self.s = settings
        self.exposures = exposures
        b = {
            name: CircuitBreaker(name, settings.breaker_failures, settings.breaker_reset_seconds)
            for name in ("profile", "retrieval", "ranking")
        }
        self.profile = Downstream("profile", channels["profile"], b["profile"])
        self.retrieval = Downstream("retrieval", channels["retrieval"], b["retrieval"])
        self.ranking = Downstream("ranking", channels["ranking"], b["ranking"])
        self.profile_stub = profile_pb2_grpc.ProfileServiceStub(channels["profile"])
        self.retrieval_stub = retrieval_pb2_grpc.RetrievalServiceStub(channels["retrieval"])
        self.ranking_stub = ranking_pb2_grpc.RankingServiceStub(channels["ranking"])
        # Calls that carry the profile take requests already serialized (see
        # _with_profile); GetProfile answers bytes, parsed once here.
        self.get_profile_raw = channels["profile"].unary_unary(
            "/mercato.v1.ProfileService/GetProfile",
            request_serializer=profile_pb2.GetProfileRequest.SerializeToString,
            response_deserializer=None,
        )
        self.retrieve_raw = channels["retrieval"].unary_unary(
            "/mercato.v1.RetrievalService/Retrieve",
            request_serializer=None,
            response_deserializer=retrieval_pb2.RetrieveResponse.FromString,
        )
        self.retrieve_related_raw = channels["retrieval"].unary_unary(
            "/mercato.v1.RetrievalService/RetrieveRelated",
            request_serializer=None,
            response_deserializer=retrieval_pb2.RetrieveRelatedResponse.FromString,
        )
        self.rank_raw = channels["ranking"].unary_unary(
            "/mercato.v1.RankingService/Rank",
            request_serializer=None,
            response_deserializer=ranking_pb2.RankResponse.FromString,
        )
        self.select_offer_raw = channels["ranking"].unary_unary(
            "/mercato.v1.RankingService/SelectOffer",
            request_serializer=None,
            response_deserializer=ranking_pb2.SelectOfferResponse.FromString,
        )
        self.experiments = experiments
        self.details_cache: TtlCache[str, common_pb2.Item] = TtlCache(
            "details", settings.details_cache_items, settings.details_cache_seconds
        )
        self._item_fields: dict[str, tuple[common_pb2.Item, bytes]] = {}
        self.trending_cache: TtlCache[str, list[common_pb2.Candidate]] = TtlCache(
            "trending", 256, settings.trending_cache_seconds
        )
        self.offer_surfaces = {s.strip() for s in settings.offer_surfaces.split(",") if s.strip()}
        self._warming: dict[str, asyncio.Task[None]] = {}
        self.degrade_on_overload = settings.overload_answer == "degraded"
        # the gateway's event loop, for shed answers built on the synchronous server's
        # pool threads (their background fetches go to the loop)
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- helpers -----------------------------------------------------------------------

    def _item_field(self, item: common_pb2.Item) -> bytes:
        """``item`` encoded as one entry of ``RankRequest.items`` (tag, length, bytes),
        kept with the cached details so it is encoded once per cache period."""
        field = self._item_fields.get(item.item_id)
        if field is None or field[0] is not item:
            data = item.SerializeToString()
            field = (item, _ITEMS_TAG + varint(len(data)) + data)
            if self.details_cache.enabled:
                self._item_fields[item.item_id] = field
                if len(self._item_fields) > 2 * self.s.details_cache_items:
                    self._item_fields.clear()  # entries of evicted items: start over
        return field[1]

    @staticmethod
    def _with_profile(request: Message, profile: common_pb2.Profile, trace: Trace) -> bytes:
        """``request`` (without its profile) serialized, plus the profile field: the
        profile's bytes are those the profile service sent (or serialized once per
        request), never copied into each request message and encoded again."""
        if trace.profile is not profile:
            trace.profile, trace.profile_bytes = profile, profile.SerializeToString()
        tag = _PROFILE_TAGS[request.DESCRIPTOR.full_name]
        return request.SerializeToString() + length_delimited(tag, trace.profile_bytes)

    def deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        remaining = context.time_remaining()
        budget = self.s.default_deadline_ms / 1000 if remaining is None else remaining
        return Deadline(budget, self.s.reserve_ms / 1000)

    def _k(self, k: int) -> int:
        if k < 0 or k > self.s.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.s.max_k} (0 = 10), got {k}")
        return k or 10

    def assignments(
        self, customer_id: str
    ) -> tuple[dict[str, str], list[gateway_pb2.ExperimentAssignment]]:
        """Model alias per stage and the experiment assignments of a customer."""
        aliases: dict[str, str] = {}
        assigned: list[gateway_pb2.ExperimentAssignment] = []
        if not customer_id:
            return aliases, assigned
        for exp in self.experiments:
            variant = exp.assign(customer_id)
            aliases.setdefault(exp.stage, variant.alias)
            assigned.append(
                gateway_pb2.ExperimentAssignment(experiment=exp.name, variant=variant.name)
            )
        return aliases, assigned

    async def get_profile(
        self, customer_id: str, deadline: Deadline, trace: Trace
    ) -> common_pb2.Profile:
        if not customer_id:
            return common_pb2.Profile(known=False)
        started = time.perf_counter()
        try:
            raw: bytes = await self.profile.call(
                "profile",
                self.get_profile_raw,
                profile_pb2.GetProfileRequest(customer_id=customer_id),
                deadline,
                self.s.profile_timeout_ms / 1000,
                self.s.read_retries,
            )
            data = field_payload(raw, _PROFILE_IN_RESPONSE) or b""
            profile = common_pb2.Profile.FromString(data)
        except (HopError, WireError, DecodeError) as err:
            reason = err.reason if isinstance(err, HopError) else f"unreadable profile: {err}"
            trace.degrade("profile", "anonymous", reason)
            trace.stage("profile", started, 0, True, reason)
            return common_pb2.Profile(customer_id=customer_id, known=False)
        trace.profile, trace.profile_bytes = profile, data
        trace.stage("profile", started, len(profile.recent_items))
        return profile

    async def trending(
        self,
        profile: common_pb2.Profile,
        k: int,
        categories: list[str],
        exclude: set[str],
        deadline: Deadline,
    ) -> list[common_pb2.Candidate]:
        """Popular items as candidates (the retrieval fallback). The list of a category is
        cached briefly and filtered here; a live call with the exclusions is made when the
        cached list runs short."""
        category = categories[0] if len(categories) == 1 else ""
        try:
            return await self._trending(category, k, exclude, deadline)
        except HopError:
            # stale-if-error: the last list seen beats no answer while profile is down
            stale = self.trending_cache.get_stale(category)
            if stale is None:
                raise
            return [c for c in stale if c.item_id not in exclude][:k]

    async def _trending(
        self, category: str, k: int, exclude: set[str], deadline: Deadline
    ) -> list[common_pb2.Candidate]:
        if self.trending_cache.enabled:
            cached = self.trending_cache.get(category)
            if cached is None:
                depth = self._trending_depth()
                cached = await self._trending_call(
                    profile_pb2.GetTrendingRequest(k=depth, category=category, in_stock_only=True),
                    deadline,
                )
                self.trending_cache.put(category, cached)
            out = [c for c in cached if c.item_id not in exclude][:k]
            if len(out) >= k or len(cached) < self._trending_depth():
                return out
        fresh = await self._trending_call(
            profile_pb2.GetTrendingRequest(
                k=min(1000, k + len(exclude)),
                category=category,
                in_stock_only=True,
                exclude_item_ids=sorted(exclude),
            ),
            deadline,
        )
        return [c for c in fresh if c.item_id not in exclude][:k]

    async def _trending_call(
        self, req: profile_pb2.GetTrendingRequest, deadline: Deadline
    ) -> list[common_pb2.Candidate]:
        """Trending items as candidates (built once per cached list, never changed)."""
        resp = await self.profile.call(
            "trending",
            self.profile_stub.GetTrending,
            req,
            deadline,
            self.s.profile_timeout_ms / 1000,
            self.s.read_retries,
        )
        return [
            common_pb2.Candidate(
                item_id=t.item_id, score=float(t.score), source=common_pb2.REASON_TRENDING
            )
            for t in resp.items
        ]

    def _trending_depth(self) -> int:
        return min(1000, self.s.candidates_k + 100)

    async def item_details(
        self, ids: list[str], deadline: Deadline, trace: Trace
    ) -> dict[str, common_pb2.Item]:
        """Catalog details of ``ids`` in one batch call."""
        if not ids:
            return {}
        started = time.perf_counter()
        found: dict[str, common_pb2.Item] = {}
        missing = ids
        if self.details_cache.enabled:
            found, missing = self.details_cache.get_many(ids)
            if not missing:
                trace.stage("details", started, len(found), detail="cached")
                return found
        try:
            resp = await self.profile.call(
                "details",
                self.profile_stub.GetItems,
                profile_pb2.GetItemsRequest(item_ids=missing),
                deadline,
                self.s.details_timeout_ms / 1000,
                self.s.read_retries,
            )
        except HopError as err:
            trace.degrade("details", "ids_only", err.reason)
            trace.stage("details", started, len(found), True, err.reason)
            return found
        for item in resp.items:
            found[item.item_id] = item
            self.details_cache.put(item.item_id, item)
        trace.stage("details", started, len(found))
        return found

    async def select_offer(
        self,
        profile: common_pb2.Profile,
        context: common_pb2.Context,
        deadline: Deadline,
        trace: Trace,
    ) -> ranking_pb2.SelectOfferResponse | None:
        started = time.perf_counter()
        try:
            resp = await self.ranking.call(
                "offer",
                self.select_offer_raw,
                self._with_profile(ranking_pb2.SelectOfferRequest(context=context), profile, trace),
                deadline,
                self.s.offer_timeout_ms / 1000,
                0,  # a decision reserves budget: not retried
            )
        except HopError as err:
            trace.degrade("offer", "no_offer", err.reason)
            trace.stage("offer", started, 0, True, err.reason)
            return None
        trace.stage("offer", started, 1 if resp.offer.offer_id else 0, detail=resp.reason)
        return resp

    async def rank(
        self,
        profile: common_pb2.Profile,
        context: common_pb2.Context,
        candidates: common_pb2.CandidateColumns,
        k: int,
        alias: str,
        deadline: Deadline,
        trace: Trace,
    ) -> tuple[list[Ranked], dict[str, common_pb2.Item]]:
        """Ranked (item id, score, reasons, reason texts) and the ranked items' catalogue
        details. Ranking answers with both (``RankRequest.return_items``: its item table
        drops sold-out items and holds the details), so no item lookup is made. When
        ranking fails: retrieval order with rules that need no model (purchased, and
        stock from one item lookup of the first candidates, which also gives the
        details)."""
        started = time.perf_counter()
        details: dict[str, common_pb2.Item] = {}
        if self.s.rank_sends_items:
            # For a ranking service without its own item table: the candidates' details
            # looked up here, sold-out ones left out, the rest sent in RankRequest.items.
            details = await self.item_details(list(candidates.item_ids), deadline, trace)
            sold = [
                i for i, item_id in enumerate(candidates.item_ids) if _sold_out(details, item_id)
            ]
            if sold:
                trace.drop("out_of_stock", len(sold))
                candidates = without_rows(candidates, sold)
            started = time.perf_counter()
        ids = list(candidates.item_ids)
        if ids:
            try:
                head = ranking_pb2.RankRequest(
                    context=context,
                    columns=candidates,
                    k=k,
                    model_alias=alias,
                    return_items=not self.s.rank_sends_items,
                )
                payload = self._with_profile(head, profile, trace)
                if self.s.rank_sends_items:
                    # The items field appended as pre-serialized bytes (a repeated field
                    # may come in any number of pieces).
                    payload += b"".join(
                        self._item_field(details[item_id]) for item_id in ids if item_id in details
                    )
                resp = await self.ranking.call(
                    "ranking",
                    self.rank_raw,
                    payload,
                    deadline,
                    self.s.ranking_timeout_ms / 1000,
                    self.s.read_retries,
                )
                if resp.model.name:
                    trace.models.append(resp.model)
                trace.stage("ranking", started, len(resp.items))
                for rule, n in resp.dropped.items():
                    trace.drop(rule, n)
                ranked: list[Ranked] = [
                    (r.item_id, r.score, list(r.reasons), list(r.reason_texts)) for r in resp.items
                ]
                if not self.s.rank_sends_items:
                    details = await self._ranked_details(resp, deadline, trace)
                return ranked, details
            except HopError as err:
                trace.degrade("ranking", "retrieval_order", err.reason)
                trace.stage("ranking", started, 0, True, err.reason)
        purchased = {p.item_id for p in profile.purchases}
        keep_purchased = context.surface == common_pb2.SURFACE_BUY_AGAIN
        head_rows: list[Ranked] = []
        depth = k if self.s.rank_sends_items else _related_depth(k)  # headroom: sold out
        for item_id, score, source in zip(ids, candidates.scores, candidates.sources, strict=True):
            if item_id in purchased and not keep_purchased:
                trace.drop("purchased")
                continue
            reasons = [source or common_pb2.REASON_MODEL]
            if common_pb2.REASON_FALLBACK not in reasons:
                reasons.append(common_pb2.REASON_FALLBACK)
            head_rows.append((item_id, score, [int(r) for r in reasons], []))
            if len(head_rows) >= depth:
                break
        if not self.s.rank_sends_items:
            details = await self.item_details([r[0] for r in head_rows], deadline, trace)
        out: list[Ranked] = []
        for row in head_rows:
            if _sold_out(details, row[0]):
                trace.drop("out_of_stock")
                continue
            out.append(row)
            if len(out) >= k:
                break
        return out, details

    async def _ranked_details(
        self, resp: ranking_pb2.RankResponse, deadline: Deadline, trace: Trace
    ) -> dict[str, common_pb2.Item]:
        """The details ranking returned with its items (DebugInfo stage "details",
        "from_ranking"). A ranking service that returned none (one without an item
        table, or older than ``return_items``) gets the item lookup of the returned ids."""
        started = time.perf_counter()
        details = {r.item_id: r.item for r in resp.items if r.HasField("item")}
        if resp.items and not details:
            return await self.item_details([r.item_id for r in resp.items], deadline, trace)
        trace.stage("details", started, len(details), detail="from_ranking")
        return details

    def expose(
        self,
        call: str,
        customer_id: str,
        surface: int,
        items: Sequence[gateway_pb2.RecommendedItem],
        assigned: Sequence[gateway_pb2.ExperimentAssignment],
        trace: Trace,
        offer_id: str = "",
        decision_id: str = "",
        anchor_item_id: str = "",
    ) -> None:
        """Queue the exposure event of an answer (anonymous callers are not logged)."""
        if self.exposures is None or not customer_id:
            return
        self.exposures.log(
            exposure_event(
                customer_id=customer_id,
                request_id=request_id_var.get(),
                surface=surface,
                call=call,
                item_ids=[r.item.item_id for r in items],
                experiments=[(a.experiment, a.variant) for a in assigned],
                models=trace.models,
                offer_id=offer_id,
                decision_id=decision_id,
                degraded=[d.stage for d in trace.degraded],
                anchor_item_id=anchor_item_id,
            )
        )

    # -- public calls ----------------------------------------------------------------

    async def recommend(
        self, req: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        _check_id(req.customer_id, "customer_id", required=False)
        k = self._k(req.k)
        _check_list(req.exclude_item_ids, "exclude_item_ids", MAX_EXCLUDE_ITEM_IDS)
        _check_list(req.categories, "categories", MAX_CATEGORIES, MAX_CATEGORY_BYTES)
        _check_context(req.context)
        ctx = common_pb2.Context()
        ctx.CopyFrom(req.context)
        if not ctx.surface:
            ctx.surface = common_pb2.SURFACE_HOME
        if ctx.surface == common_pb2.SURFACE_PRODUCT and not ctx.anchor_item_id:
            raise InvalidArgument("context.anchor_item_id is required on SURFACE_PRODUCT")
        deadline = self.deadline(context)
        trace = Trace(req.debug)
        aliases, assigned = self.assignments(req.customer_id)

        profile = await self.get_profile(req.customer_id, deadline, trace)
        surface = surface_name(ctx.surface)
        offer_task = None
        if req.include_offer and surface in self.offer_surfaces:
            offer_task = asyncio.create_task(self.select_offer(profile, ctx, deadline, trace))

        exclude = set(req.exclude_item_ids)
        candidates = await self.candidates(
            profile,
            ctx,
            k,
            list(req.categories),
            exclude,
            aliases.get("retrieval", ""),
            deadline,
            trace,
        )
        ranked, details = await self.rank(
            profile, ctx, candidates, k, aliases.get("ranking", ""), deadline, trace
        )
        offer = await offer_task if offer_task is not None else None
        resp = gateway_pb2.RecommendResponse(
            request_id=request_id_var.get(),
            items=self._items(ranked, details),
            models=trace.models,
            degraded=trace.degraded,
            experiments=assigned,
        )
        if offer is not None:
            _set_offer(resp, offer)
        short = trace.shortfall(k, len(resp.items))
        if short is not None:
            resp.shortfall.CopyFrom(short)
        info = trace.debug_info()
        if info is not None:
            resp.debug.CopyFrom(info)
        self.expose(
            "recommend",
            req.customer_id,
            ctx.surface,
            resp.items,
            assigned,
            trace,
            resp.offer.offer_id,
            resp.offer_decision_id,
            ctx.anchor_item_id,
        )
        return resp

    def overloaded_recommend(
        self, req: gateway_pb2.RecommendRequest
    ) -> gateway_pb2.RecommendResponse | None:
        """The fast answer past the in-flight bound: cached popular items (of the one
        requested category, else overall) without any downstream call, named degraded;
        None when nothing is cached (the caller then gets RESOURCE_EXHAUSTED)."""
        k = self._k(req.k)
        category = req.categories[0] if len(req.categories) == 1 else ""
        cached = self.trending_cache.get_stale(category)
        if cached is None or self.trending_cache.get(category) is None:
            self._warm_popular(category)  # for the next ones: in the background
        if cached is None:
            return None
        exclude = set(req.exclude_item_ids)
        trending = [int(common_pb2.REASON_TRENDING), int(common_pb2.REASON_FALLBACK)]
        ranked: list[Ranked] = list(
            islice(
                (
                    (c.item_id, c.score, trending, ["trending", "popular right now"])
                    for c in cached
                    if c.item_id not in exclude
                ),
                k,
            )
        )
        details, _ = self.details_cache.get_many([r[0] for r in ranked])
        trace = Trace(False)
        trace.candidates = len(ranked)
        trace.degrade("gateway", "popular_items", "overloaded: too many calls in progress")
        resp = gateway_pb2.RecommendResponse(
            request_id=request_id_var.get(),
            items=self._items(ranked, details),
            degraded=trace.degraded,
        )
        short = trace.shortfall(k, len(resp.items))
        if short is not None:
            resp.shortfall.CopyFrom(short)
        return resp

    def keep_popular_cached(self) -> None:
        """Have the overall popular list cached before calls are shed (fetched in the
        background; a no-op once there)."""
        if self.degrade_on_overload and self.trending_cache.get_stale("") is None:
            self._warm_popular("")

    def _warm_popular(self, category: str) -> None:
        """Fetch the popular list of ``category`` and its items' details into the
        caches in the background (one fetch per category at a time): what the answers
        past the admission bound are made of, which never wait for a downstream."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a pool thread of the synchronous server: on the loop
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._warm_popular, category)
            return
        if category in self._warming or len(self._warming) >= 16:
            return
        task = loop.create_task(self._warm(category))
        self._warming[category] = task
        task.add_done_callback(lambda _: self._warming.pop(category, None))

    async def _warm(self, category: str) -> None:
        deadline = Deadline(self.s.profile_timeout_ms / 1000 + self.s.details_timeout_ms / 1000)
        try:
            listed = await self._trending(category, self.s.max_k, set(), deadline)
        except HopError:
            return
        await self.item_details([c.item_id for c in listed], deadline, Trace(False))

    async def candidates(
        self,
        profile: common_pb2.Profile,
        ctx: common_pb2.Context,
        k: int,
        categories: list[str],
        exclude: set[str],
        alias: str,
        deadline: Deadline,
        trace: Trace,
    ) -> common_pb2.CandidateColumns:
        """Candidates from retrieval (as columns: what ranking takes), or trending items
        when retrieval is unavailable."""
        started = time.perf_counter()
        if ctx.surface == common_pb2.SURFACE_BUY_AGAIN:
            bought = [p for p in profile.purchases if p.item_id not in exclude]
            trace.stage("retrieval", started, len(bought), detail="purchases")
            trace.candidates = len(bought)
            return common_pb2.CandidateColumns(
                item_ids=[p.item_id for p in bought],
                scores=[float(p.count) for p in bought],
                sources=[common_pb2.REASON_BUY_AGAIN] * len(bought),
            )
        filters = retrieval_pb2.Filters(
            exclude_item_ids=sorted(exclude),
            exclude_purchased=True,
            exclude_in_cart=ctx.surface in (common_pb2.SURFACE_CART, common_pb2.SURFACE_CHECKOUT),
            categories=categories,
            in_stock_only=True,
        )
        want = max(k, self.s.candidates_k)
        try:
            resp = await self.retrieval.call(
                "retrieval",
                self.retrieve_raw,
                self._with_profile(
                    retrieval_pb2.RetrieveRequest(
                        context=ctx, k=want, filters=filters, model_alias=alias, columns=True
                    ),
                    profile,
                    trace,
                ),
                deadline,
                self.s.retrieval_timeout_ms / 1000,
                self.s.read_retries,
            )
            # a retrieval that predates columns answers in candidates
            cols = columns_of(resp.candidates) if resp.candidates else resp.columns
            if len(cols.item_ids) == len(cols.scores) == len(cols.sources):
                if resp.model.name:
                    trace.models.append(resp.model)
                trace.stage("retrieval", started, len(cols.item_ids))
                trace.candidates = len(cols.item_ids)
                return cols
            reason = "retrieval answered candidate columns of unequal length"
        except HopError as err:
            reason = err.reason
        excluded = exclude | {p.item_id for p in profile.purchases}
        try:
            cands = await self.trending(profile, want, categories, excluded, deadline)
            trace.degrade("retrieval", "popular_items", reason)
            trace.stage("retrieval", started, len(cands), True, reason)
            trace.candidates = len(cands)
            return columns_of(cands)
        except HopError as err2:
            trace.degrade("retrieval", "none", f"{reason}; trending: {err2.reason}")
            trace.stage("retrieval", started, 0, True, reason)
            return common_pb2.CandidateColumns()

    @staticmethod
    def _items(
        ranked: list[Ranked], details: dict[str, common_pb2.Item]
    ) -> list[gateway_pb2.RecommendedItem]:
        out = []
        for i, (item_id, score, reasons, texts) in enumerate(ranked, start=1):
            item = details.get(item_id) or common_pb2.Item(item_id=item_id)
            out.append(
                gateway_pb2.RecommendedItem(
                    item=item,
                    score=score,
                    rank=i,
                    reasons=reasons,  # type: ignore[arg-type]
                    reason_texts=texts,
                )
            )
        return out

    async def related(
        self, req: gateway_pb2.GetRelatedItemsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetRelatedItemsResponse:
        _check_id(req.item_id, "item_id")
        _check_id(req.customer_id, "customer_id", required=False)
        k = self._k(req.k)
        kind = req.kind
        if kind not in _RELATION_KINDS:
            raise InvalidArgument(
                "kind is required: RELATION_KIND_SIMILAR, RELATION_KIND_COMPLEMENT or "
                f"RELATION_KIND_UPSELL, got {kind}"
            )
        deadline = self.deadline(context)
        trace = Trace(req.debug)
        aliases, assigned = self.assignments(req.customer_id)
        profile = await self.get_profile(req.customer_id, deadline, trace)
        started = time.perf_counter()
        from_model = False
        try:
            resp = await self.retrieval.call(
                "retrieval",
                self.retrieve_related_raw,
                self._with_profile(
                    retrieval_pb2.RetrieveRelatedRequest(
                        item_ids=[req.item_id],
                        kind=kind,
                        # Headroom for items the catalog now says are out of stock
                        # (retrieval knows the stock of its last catalog update only).
                        k=_related_depth(k),
                        filters=retrieval_pb2.Filters(
                            exclude_purchased=bool(req.customer_id), in_stock_only=True
                        ),
                        model_alias=aliases.get("retrieval", ""),
                    ),
                    profile,
                    trace,
                ),
                deadline,
                self.s.retrieval_timeout_ms / 1000,
                self.s.read_retries,
            )
            cands = list(resp.candidates)
            from_model = True
            if resp.model.name:
                trace.models.append(resp.model)
            trace.stage("retrieval", started, len(cands))
        except HopError as err:
            if err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise _passthrough(err) from err
            cands = []
            try:
                cands = await self.trending(profile, k, [], {req.item_id}, deadline)
                trace.degrade("retrieval", "popular_items", err.reason)
            except HopError as err2:
                trace.degrade("retrieval", "none", f"{err.reason}; trending: {err2.reason}")
            trace.stage("retrieval", started, len(cands), True, err.reason)
        trace.candidates = len(cands)
        details = await self.item_details([c.item_id for c in cands], deadline, trace)
        ranked: list[Ranked] = []
        for c in cands:
            if len(ranked) >= k:
                break
            if _sold_out(details, c.item_id):
                trace.drop("out_of_stock")
                continue
            ranked.append((c.item_id, c.score, [c.source or common_pb2.REASON_SIMILAR], []))
        if from_model and kind == common_pb2.RELATION_KIND_COMPLEMENT:
            _complement_fallback(trace, [r[2][0] for r in ranked], f"item {req.item_id!r}")
        resp_out = gateway_pb2.GetRelatedItemsResponse(
            request_id=request_id_var.get(),
            items=self._items(ranked, details),
            models=trace.models,
            degraded=trace.degraded,
        )
        short = trace.shortfall(k, len(resp_out.items))
        if short is not None:
            resp_out.shortfall.CopyFrom(short)
        info = trace.debug_info()
        if info is not None:
            resp_out.debug.CopyFrom(info)
        self.expose(
            "related",
            req.customer_id,
            common_pb2.SURFACE_PRODUCT,
            resp_out.items,
            assigned,
            trace,
            anchor_item_id=req.item_id,
        )
        return resp_out

    async def cart(
        self, req: gateway_pb2.GetCartRecommendationsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetCartRecommendationsResponse:
        _check_id(req.customer_id, "customer_id")
        k = self._k(req.k)
        _check_context(req.context)
        ctx = common_pb2.Context()
        ctx.CopyFrom(req.context)
        if not ctx.surface:
            ctx.surface = common_pb2.SURFACE_CART
        deadline = self.deadline(context)
        trace = Trace(req.debug)
        aliases, assigned = self.assignments(req.customer_id)
        profile = await self.get_profile(req.customer_id, deadline, trace)
        cart_ids = [line.item_id for line in profile.cart.lines] or list(ctx.cart_item_ids)
        offer_task = None
        if req.include_offer:
            offer_task = asyncio.create_task(self.select_offer(profile, ctx, deadline, trace))
        started = time.perf_counter()
        cands = common_pb2.CandidateColumns()
        sources: dict[str, int] = {}  # candidate sources, when complements were asked for
        if cart_ids:
            try:
                resp = await self.retrieval.call(
                    "retrieval",
                    self.retrieve_related_raw,
                    self._with_profile(
                        retrieval_pb2.RetrieveRelatedRequest(
                            item_ids=cart_ids,
                            kind=common_pb2.RELATION_KIND_COMPLEMENT,
                            k=max(k, self.s.candidates_k // 2),
                            filters=retrieval_pb2.Filters(
                                exclude_in_cart=True, exclude_purchased=True, in_stock_only=True
                            ),
                            model_alias=aliases.get("retrieval", ""),
                        ),
                        profile,
                        trace,
                    ),
                    deadline,
                    self.s.retrieval_timeout_ms / 1000,
                    self.s.read_retries,
                )
                cands = columns_of(resp.candidates)
                sources = {c.item_id: int(c.source) for c in resp.candidates}
                if resp.model.name:
                    trace.models.append(resp.model)
                trace.stage("retrieval", started, len(resp.candidates), detail="complements")
            except HopError as err:
                trace.stage("retrieval", started, 0, True, err.reason)
                cands = columns_of(
                    await self._fallback_trending(profile, k, set(cart_ids), deadline, trace, err)
                )
            trace.candidates = len(cands.item_ids)
        else:
            trace.degrade(
                "retrieval",
                "personalized_items",
                "the cart is empty: the customer's recommendations instead of complements",
            )
            cands = await self.candidates(
                profile, ctx, k, [], set(), aliases.get("retrieval", ""), deadline, trace
            )
        ranked, details = await self.rank(
            profile, ctx, cands, k, aliases.get("ranking", ""), deadline, trace
        )
        if sources:
            _complement_fallback(
                trace,
                [sources.get(item_id, common_pb2.REASON_COMPLEMENT) for item_id, *_ in ranked],
                "the cart's items",
            )
        offer = await offer_task if offer_task is not None else None
        out = gateway_pb2.GetCartRecommendationsResponse(
            request_id=request_id_var.get(),
            cart=profile.cart,
            items=self._items(ranked, details),
            models=trace.models,
            degraded=trace.degraded,
        )
        if offer is not None:
            _set_offer(out, offer)
        short = trace.shortfall(k, len(out.items))
        if short is not None:
            out.shortfall.CopyFrom(short)
        info = trace.debug_info()
        if info is not None:
            out.debug.CopyFrom(info)
        self.expose(
            "cart",
            req.customer_id,
            ctx.surface,
            out.items,
            assigned,
            trace,
            out.offer.offer_id,
            out.offer_decision_id,
        )
        return out

    async def _fallback_trending(
        self,
        profile: common_pb2.Profile,
        k: int,
        exclude: set[str],
        deadline: Deadline,
        trace: Trace,
        err: HopError,
    ) -> list[common_pb2.Candidate]:
        try:
            cands = await self.trending(
                profile, k, [], exclude | {p.item_id for p in profile.purchases}, deadline
            )
            trace.degrade("retrieval", "popular_items", err.reason)
            return cands
        except HopError as err2:
            trace.degrade("retrieval", "none", f"{err.reason}; trending: {err2.reason}")
            return []

    async def track(
        self, req: gateway_pb2.TrackEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.TrackEventsResponse:
        if not req.events:
            raise InvalidArgument("events must not be empty")
        if len(req.events) > MAX_EVENTS:
            raise InvalidArgument(
                f"events has {len(req.events)} entries; at most {MAX_EVENTS} per call"
            )
        deadline = Deadline(context.time_remaining() or self.s.track_timeout_ms / 1000, 0.0)
        try:
            resp = await self.profile.call(
                "track",
                self.profile_stub.TrackEvents,
                profile_pb2.ProfileServiceTrackEventsRequest(
                    events=req.events, partial_accept=req.partial_accept
                ),
                deadline,
                self.s.track_timeout_ms / 1000,
                self.s.read_retries,  # idempotent by event id
            )
        except HopError as err:
            raise _passthrough(err) from err
        await self._offer_outcomes(req.events, deadline)
        return gateway_pb2.TrackEventsResponse(
            request_id=request_id_var.get(),
            accepted=resp.accepted,
            duplicates=resp.duplicates,
            errors=resp.errors,
        )

    async def _offer_outcomes(self, events: Sequence[common_pb2.Event], deadline: Deadline) -> None:
        """Forward offer outcomes (events with attribute decision_id) to the offer policy.
        Best effort: the events themselves are already durable in the profile store."""
        for ev in events:
            decision = ev.attributes.get("decision_id", "")
            if not decision:
                continue
            if ev.type == common_pb2.EVENT_TYPE_OFFER_REDEEMED:
                outcome = ranking_pb2.OFFER_OUTCOME_REDEEMED
            elif ev.type == common_pb2.EVENT_TYPE_PURCHASE:
                outcome = ranking_pb2.OFFER_OUTCOME_CONVERTED_WITHOUT_OFFER
            else:
                continue
            try:
                await self.ranking.call(
                    "offer_outcome",
                    self.ranking_stub.RecordOfferOutcome,
                    ranking_pb2.RecordOfferOutcomeRequest(
                        decision_id=decision,
                        outcome=outcome,
                        revenue=ev.price * max(1, ev.quantity),
                    ),
                    deadline,
                    self.s.offer_timeout_ms / 1000,
                    self.s.read_retries,  # idempotent per decision
                )
            except HopError:
                continue


_RELATION_KINDS = (
    common_pb2.RELATION_KIND_SIMILAR,
    common_pb2.RELATION_KIND_COMPLEMENT,
    common_pb2.RELATION_KIND_UPSELL,
)


def _sold_out(details: dict[str, common_pb2.Item], item_id: str) -> bool:
    """Whether the looked-up details say ``item_id`` is out of stock (an item without
    details is kept)."""
    item = details.get(item_id)
    return item is not None and item.stock <= 0


def _related_depth(k: int) -> int:
    """Related items asked of retrieval for a list of ``k``."""
    return min(1000, k + max(10, k))


def _complement_fallback(trace: Trace, sources: Sequence[int], anchors: str) -> None:
    """Name the fallback when retrieval filled a complement list with similar items
    (it does so where its basket data has too few complements of the anchors)."""
    filled = sum(1 for s in sources if s != common_pb2.REASON_COMPLEMENT)
    if not filled:
        return
    have = len(sources) - filled
    trace.degrade(
        "retrieval",
        "similar_items",
        f"basket data has {have} complement{'s' if have != 1 else ''} of {anchors} for this "
        f"list; {filled} similar item{'s' if filled != 1 else ''} (REASON_SIMILAR) fill it",
    )


def _set_offer(
    resp: gateway_pb2.RecommendResponse | gateway_pb2.GetCartRecommendationsResponse,
    choice: ranking_pb2.SelectOfferResponse,
) -> None:
    """The offer decision in a response: the offer only when the policy chose an incentive
    (the "none" choice leaves it unset), the decision id and reason always."""
    resp.offer_decision_id = choice.decision_id
    resp.offer_reason = choice.reason
    if choice.offer.offer_id and choice.offer.kind != common_pb2.OFFER_KIND_NONE:
        resp.offer.CopyFrom(choice.offer)
        if isinstance(resp, gateway_pb2.GetCartRecommendationsResponse):
            resp.offer_expected_incremental_margin = choice.expected_incremental_margin


def _passthrough(err: HopError) -> ServiceError:
    """Caller errors keep their status; anything else is UNAVAILABLE."""
    if err.code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(err.reason.removeprefix("INVALID_ARGUMENT: "))
    if err.code == grpc.StatusCode.NOT_FOUND:
        return NotFound(err.reason.removeprefix("NOT_FOUND: "))
    return Unavailable(f"{err.hop} is unavailable, retry later ({err.reason})")
