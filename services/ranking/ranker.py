"""The trained ranker in the ranking service: Rank request -> ranker features -> scores,
and the :class:`~services.ranking.scoring.ScorerProvider` that follows the registry.

- :func:`load_ranker` is the watcher's ``load``: it loads a downloaded ``mercato-ranker``
  bundle and validates it (files match the manifest, config / normalisation / weights
  agree on the features, the smoke scores are reproduced and finite); any failure
  raises, so :class:`~services.models.watcher.ModelWatcher` refuses the version and the
  alias keeps serving what it had (or rules-only when it had nothing).
- :class:`RegistryScorers` resolves a request's alias ("" = the default alias) to the
  version loaded for it. Aliases not watched yet are watched on first use (up to
  ``ranker_max_aliases``); until their version is loaded they rank rules-only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import numpy as np

from mercato.v1 import common_pb2
from services.common.tasks import cancel_tasks
from services.models import registry_sqlite
from services.models.ranker import (
    CandidateDetails,
    ItemTable,
    RankerBundle,
    RankerBundleError,
    RankerQuery,
    build_features,
)
from services.models.registry import ModelVersionInfo
from services.models.watcher import ModelRejected, ModelWatcher
from services.ranking.rules import SURFACE_NAMES, CandidateSet
from services.ranking.scoring import Scorer
from services.ranking.settings import RankingSettings
from services.ranking.table import CandidateArrays

log = logging.getLogger("mercato.ranking")
ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _ts(t: object) -> float:
    return float(t.seconds) + float(t.nanos) * 1e-9  # type: ignore[attr-defined]


def ranker_query(profile: common_pb2.Profile, context: common_pb2.Context) -> RankerQuery:
    """What the ranker's features need from the profile and the context."""
    now = _ts(context.timestamp) if context.HasField("timestamp") else time.time()
    cart = [line.item_id for line in profile.cart.lines]
    for item_id in context.cart_item_ids:
        if item_id not in cart:
            cart.append(item_id)
    units = sum(max(p.quantity, 0) for p in profile.purchases)
    monetary = profile.rfm.monetary
    mean_price = monetary / units if units > 0 and monetary > 0 else 0.0
    rfm = profile.rfm
    bought = rfm.frequency > 0 and rfm.recency_days >= 0
    return RankerQuery(
        now=now,
        surface=SURFACE_NAMES.get(context.surface, ""),
        recent=[(r.item_id, _ts(r.timestamp)) for r in profile.recent_items],
        cart=cart,
        anchor=context.anchor_item_id,
        category_affinity=dict(profile.category_affinity),
        mean_unit_price=mean_price,
        segment=profile.segment,
        price_band=profile.price_band,
        recency_days=float(rfm.recency_days) if bought else -1.0,
        frequency=int(rfm.frequency),
        monetary=float(rfm.monetary),
        first_seen=_ts(profile.first_seen) if profile.HasField("first_seen") else 0.0,
        history_len=len(profile.recent_items),
    )


def retrieval_scores(candidates: CandidateSet) -> np.ndarray:
    """The score the ranker's retrieval features read: the two-tower's own score where
    retrieval sent one (``Candidate.sources``: merged candidates carry it for every
    item, whichever source proposed it), else the candidate's score. The ranker is
    trained on two-tower scores; the fused merge score has another scale."""
    scores = np.asarray(candidates.scores, dtype=np.float64)
    two_tower = candidates.source_scores.get(int(common_pb2.REASON_MODEL))
    if two_tower is None:
        return scores
    return np.where(np.isnan(two_tower), scores, two_tower)


def candidate_details(
    candidates: CandidateSet, items: CandidateArrays, table: ItemTable | None = None
) -> CandidateDetails:
    """Candidate arrays from the item table's rows; a candidate without details has
    unknown price, stock, margin. With the ranker's ``table``, also the candidates'
    rows in it (mapped from the catalogue rows: :meth:`CandidateArrays.rows_in`)."""
    i2i = candidates.source_scores.get(int(common_pb2.REASON_SIMILAR))
    return CandidateDetails(
        rows=None if table is None else items.rows_in(candidates.ids, table),
        ids=list(candidates.ids),
        scores=retrieval_scores(candidates),
        price=np.asarray(items.price, dtype=np.float64),
        stock=np.where(items.known, items.stock, -1).astype(np.float64),
        margin=np.asarray(items.margin, dtype=np.float64),
        category=items.category_strings(),
        fused=np.asarray(candidates.scores, dtype=np.float64),
        item2item=None if i2i is None else np.asarray(i2i, dtype=np.float64),
    )


def request_features(
    table: ItemTable,
    profile: common_pb2.Profile,
    context: common_pb2.Context,
    candidates: CandidateSet,
    items: CandidateArrays,
) -> np.ndarray:
    """The ranker's feature rows of one Rank request: what :class:`RankerScorer` scores
    and what training (``training.ranker.build_lists``) fits on, one code path."""
    query = ranker_query(profile, context)
    return build_features(query, candidate_details(candidates, items, table), table)


class RankerScorer:
    """A loaded ranker version as a :class:`~services.ranking.scoring.Scorer`."""

    def __init__(self, bundle: RankerBundle, info: ModelVersionInfo) -> None:
        self.bundle = bundle
        self.info = info
        self._version = common_pb2.ModelVersion(
            name=info.name, version=info.version, alias=info.alias, run_id=info.run_id
        )

    @property
    def model_version(self) -> common_pb2.ModelVersion | None:
        return self._version

    def score(
        self,
        profile: common_pb2.Profile,
        context: common_pb2.Context,
        candidates: CandidateSet,
        items: CandidateArrays,
    ) -> np.ndarray:
        x = request_features(self.bundle.items, profile, context, candidates, items)
        return self.bundle.score_features(self.bundle.own_columns(x)).astype(np.float64)


def load_ranker(bundle_dir: Path, info: ModelVersionInfo) -> RankerBundle:
    """The watcher's ``load``: load and validate, or raise to refuse the version."""
    try:
        bundle = RankerBundle.load(bundle_dir)
    except RankerBundleError as e:
        raise ModelRejected(str(e)) from e
    log.info(
        "ranker bundle validated",
        extra={"version": info.version, "run_id": info.run_id, "items": len(bundle.items.item_ids)},
    )
    return bundle


class RegistryScorers:
    """ScorerProvider over a :class:`ModelWatcher` of ``mercato-ranker``."""

    def __init__(self, settings: RankingSettings) -> None:
        self.settings = settings
        self.default_alias = settings.ranker_default_alias
        self.tracking_uri = settings.resolved_tracking_uri()
        self.watcher: ModelWatcher[RankerBundle] = ModelWatcher(
            model_name=settings.ranker_model_name,
            aliases=settings.ranker_alias_list(),
            tracking_uri=self.tracking_uri,
            cache_dir=settings.resolved_ranker_cache_dir(),
            load=load_ranker,
            poll_interval_s=settings.ranker_poll_interval_s,
            service="ranking",
        )
        self._scorers: dict[tuple[str, str], RankerScorer] = {}
        self._task: asyncio.Task[None] | None = None
        self._following = False

    def __call__(self, alias: str) -> Scorer | None:
        alias = alias or self.default_alias
        loaded = self.watcher.get(alias)
        if loaded is None:
            if (
                self._following
                and ALIAS_RE.match(alias)
                and alias not in self.watcher.aliases
                and len(self.watcher.aliases) < self.settings.ranker_max_aliases
            ):
                self.watcher.watch(alias)
            return None
        key = (alias, loaded.info.version)
        scorer = self._scorers.get(key)
        if scorer is None or scorer.bundle is not loaded.model:
            scorer = RankerScorer(loaded.model, loaded.info)
            self._scorers = {k: v for k, v in self._scorers.items() if k[0] != alias} | {
                key: scorer
            }
        return scorer

    def _store_missing(self) -> bool:
        """True while the embedded SQLite store does not exist yet (nothing registered):
        looking it up would create it, so wait for training to create it."""
        uri = self.tracking_uri
        return registry_sqlite.is_sqlite(uri) and not registry_sqlite.db_path(uri).is_file()

    async def _run(self) -> None:
        while self._store_missing():
            await asyncio.sleep(self.settings.ranker_poll_interval_s)
        self._following = True
        await self.watcher.start()

    def start(self) -> None:
        """Start following the registry in the background (Rank answers rules-only until
        a version is loaded)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ranker-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_tasks(task)
        await self.watcher.stop()
