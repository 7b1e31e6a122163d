"""gRPC server of the ranking service.

- ``Rank``: :class:`~services.ranking.pipeline.RankPipeline` (scorer + business rules).
  The scorer is the trained ranker (``mercato-ranker``) loaded for the request's alias
  by :class:`~services.ranking.ranker.RegistryScorers`, which follows the registry in
  the background (validation and hot swap: :mod:`services.models.watcher`). Until a
  version is loaded for the alias (or with ``MERCATO_RANKING_RANKER_ENABLED=false``) the
  scorer is the candidates' retrieval score ("rules-only" mode, ``RankResponse.model``
  empty), so the service can always answer and reports SERVING as soon as its offer
  state is open.
- ``SelectOffer`` / ``RecordOfferOutcome`` / ``ListOffers``: the offer policy
  (:mod:`services.ranking.offers`), run on one worker thread that owns the SQLite
  state, so the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from prometheus_client import Counter

from mercato.v1 import common_pb2, profile_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from services.common.channels import aio_channel
from services.common.deadline import ensure_time_left
from services.common.errors import Unavailable
from services.common.server import BaseService, run_service
from services.common.settings import ClientTlsSettings
from services.ranking.offers import (
    Catalog,
    OfferPolicy,
    OfferStore,
    RedisStore,
    SqliteStore,
    offer_context,
)
from services.ranking.pipeline import RankPipeline
from services.ranking.rules import RulesConfig
from services.ranking.scoring import ScorerProvider, no_ranker
from services.ranking.settings import RankingSettings
from services.ranking.table import CatalogFollower

if TYPE_CHECKING:
    from services.ranking.ranker import RegistryScorers

log = logging.getLogger("mercato.ranking")
T = TypeVar("T")

DROPPED = Counter(
    "mercato_ranking_dropped_total", "Candidates dropped by business rules.", ["rule"]
)
RANK_MODE = Counter("mercato_ranking_requests_total", "Rank calls by scoring mode.", ["mode"])
OFFER_DECISIONS = Counter(
    "mercato_offer_decisions_total", "Offer decisions by offer and reason.", ["offer", "reason"]
)
OFFER_OUTCOMES = Counter(
    "mercato_offer_outcomes_total", "Offer outcomes recorded, by outcome.", ["outcome"]
)


def _ids(request: ranking_pb2.RankRequest) -> list[str]:
    return [c.item_id for c in request.candidates] or list(request.columns.item_ids)


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """RPC handlers of the ranking service."""

    def __init__(self, service: RankingService) -> None:
        self.service = service

    def _fetch_budget(self, context: Any) -> float:
        left = context.time_remaining()
        budget = self.service.settings.catalog_fetch_timeout_ms / 1000
        return float(budget if left is None else min(budget, left / 2))

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        ensure_time_left(context, "rank")
        newer = None
        follower = self.service.follower
        if follower is not None and follower.loaded.is_set():
            newer = await follower.newer_items(_ids(request), self._fetch_budget(context))
        return self._rank(request, context, newer)

    def Rank_sync(self, request: ranking_pb2.RankRequest, context: Any) -> ranking_pb2.RankResponse:
        """Rank on a pool thread (server_mode=sync): only candidates the item table does
        not know yet make it wait for the event loop (their GetItems call)."""
        ensure_time_left(context, "rank")
        newer = None
        follower = self.service.follower
        if follower is not None and follower.loaded.is_set():
            ids = _ids(request)
            if follower.unknown(ids) and self.service.loop is not None:
                newer = asyncio.run_coroutine_threadsafe(
                    follower.newer_items(ids, self._fetch_budget(context)), self.service.loop
                ).result()
            else:
                newer = follower.known_newer(ids)
        return self._rank(request, context, newer)

    def _rank(
        self,
        request: ranking_pb2.RankRequest,
        context: Any,
        newer: Mapping[str, common_pb2.Item] | None,
    ) -> ranking_pb2.RankResponse:
        response = self.service.pipeline.rank(request, context.time_remaining, newer)
        RANK_MODE.labels("model" if response.model.name else "rules_only").inc()
        for rule, count in response.dropped.items():
            DROPPED.labels(rule).inc(count)
        return response

    async def SelectOffer(
        self, request: ranking_pb2.SelectOfferRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.SelectOfferResponse:
        policy = self.service.require_policy()
        cfg = policy.catalog.settings
        ctx = offer_context(
            request.profile, request.context, cfg.margin_rate, cfg.default_order_value
        )
        offer_ids = list(request.offer_ids)
        choice = await self.service.run(
            lambda: policy.select(ctx, offer_ids, greedy=request.greedy, dry_run=request.dry_run)
        )
        if choice.decision_id:
            OFFER_DECISIONS.labels(choice.offer.id, choice.reason).inc()
        return ranking_pb2.SelectOfferResponse(
            offer=choice.offer.to_proto(),
            expected_incremental_margin=choice.expected_incremental_margin,
            decision_id=choice.decision_id,
            policy_version=choice.policy_version,
            reason=choice.reason,
        )

    async def RecordOfferOutcome(
        self, request: ranking_pb2.RecordOfferOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RecordOfferOutcomeResponse:
        policy = self.service.require_policy()
        recorded = await self.service.run(
            lambda: policy.record(
                request.decision_id, request.outcome, request.revenue, request.margin
            )
        )
        if recorded:
            OFFER_OUTCOMES.labels(ranking_pb2.OfferOutcome.Name(request.outcome)).inc()
        return ranking_pb2.RecordOfferOutcomeResponse(recorded=recorded)

    async def ListOffers(
        self, request: ranking_pb2.ListOffersRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.ListOffersResponse:
        policy = self.service.require_policy()
        rows = await self.service.run(policy.status)
        return ranking_pb2.ListOffersResponse(
            offers=[
                ranking_pb2.OfferStatus(
                    offer=row.offer.to_proto(),
                    budget=row.budget,
                    spent=row.spent,
                    decisions=row.decisions,
                    redemptions=row.redemptions,
                )
                for row in rows
            ]
        )


class RankingService(BaseService):
    """The ranking service as the runtime runs it."""

    name = "ranking"
    settings: RankingSettings

    def __init__(self, settings: RankingSettings, scorers: ScorerProvider | None = None) -> None:
        super().__init__(settings)
        self.registry_scorers: RegistryScorers | None = None
        if scorers is None:
            if settings.ranker_enabled:
                from services.ranking.ranker import RegistryScorers

                self.registry_scorers = RegistryScorers(settings)
                scorers = self.registry_scorers
            else:
                scorers = no_ranker
        # Config errors stop the process at start, with the file and field named.
        self.rules = RulesConfig.load(settings.rules_file or None)
        self.catalog = Catalog.load(settings.resolved_offers_file())
        self.catalog_channel: grpc.aio.Channel | None = None
        self.follower: CatalogFollower | None = None
        if settings.catalog_target:
            self.catalog_channel = aio_channel(
                settings.catalog_target, ClientTlsSettings(), settings.max_message_bytes
            )
            stub = profile_pb2_grpc.ProfileServiceStub(self.catalog_channel)
            self.follower = CatalogFollower(
                stub.ListItems,
                settings.catalog_refresh_s,
                settings.catalog_page_size,
                get_items=stub.GetItems,
                list_changes=stub.ListItemChanges if settings.catalog_changes else None,
            )
        follower = self.follower
        self.pipeline = RankPipeline(
            self.rules,
            scorers=scorers,
            max_candidates=settings.max_candidates,
            max_k=settings.max_k,
            table=(lambda: follower.table) if follower is not None else None,
        )
        self.policy: OfferPolicy | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offers")
        # The event loop (built inside it by the runtime): Rank_sync hands it the rare
        # GetItems call for candidates created since the last catalogue reload.
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(RankingServicer(self), server)
        return [ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name]

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the offer worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def require_policy(self) -> OfferPolicy:
        if self.policy is None:
            raise Unavailable("the offer policy is still loading its state")
        return self.policy

    def _open_policy(self) -> OfferPolicy:
        seed = None if self.settings.offers_seed < 0 else self.settings.offers_seed
        store: OfferStore
        if self.settings.offers_state_url:
            redis_store = RedisStore(
                self.settings.offers_state_url, self.settings.offers_state_prefix
            )
            store, where = redis_store, f"redis {redis_store.address} ({redis_store.prefix})"
        else:
            path = self.settings.resolved_offers_state_path()
            store, where = SqliteStore(path), str(path)
        policy = OfferPolicy(
            self.catalog,
            store,
            seed=seed,
            retention_days=self.settings.offers_retention_days,
        )
        log.info(
            "offer policy ready",
            extra={
                "state": where,
                "offers": policy.arms,
                "policy_version": policy.policy_version,
            },
        )
        return policy

    async def start(self) -> None:
        self.policy = await self.run(self._open_policy)
        # Rules-only ranking always answers, so the service is ready once the offer
        # state is open and the item table loaded (stock, categories); the trained
        # ranker, when it lands, changes scores, not health.
        # start() returns at once either way, so SIGTERM can stop a process whose
        # catalogue never answered.
        if self.follower is not None:
            self.follower.on_first_load = lambda: self.set_serving(True)
            self.follower.start()
        else:
            await self.set_serving(True)
        if self.registry_scorers is not None:
            self.registry_scorers.start()

    async def stop(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
        if self.catalog_channel is not None:
            await self.catalog_channel.close()
        if self.registry_scorers is not None:
            await self.registry_scorers.stop()
        policy = self.policy
        if policy is not None:
            await self.run(policy.close)
        self._executor.shutdown(wait=True)


def main() -> None:
    """Run the ranking service until SIGTERM."""
    run_service(RankingService, RankingSettings())


if __name__ == "__main__":
    main()
