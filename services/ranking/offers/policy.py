"""The offer policy: choose the offer with the best expected incremental margin, learn
from outcomes, respect budgets.

For a decision with expected order margin ``m`` (before the offer's cost), offer ``a``
with redemption cost ``c_a`` and fixed cost ``f_a``, and conversion probabilities
``p_a = P(convert | a, x)`` and ``p_0 = P(convert | no offer, x)``::

    expected incremental margin(a) = p_a * (m - c_a) - f_a - p_0 * m

which is 0 for "no offer". The policy picks the eligible offer maximising it under a
Thompson sample of the conversion model (:mod:`.bandit`), unless recent exploration
(decisions whose sampled choice differed from the greedy one) already reached the
catalog's ``exploration.max_share``; then, and for ``greedy`` requests, it uses the
posterior means. Ties go to "no offer".

Budgets: an offer whose remaining budget in the current period is below its cost for
this decision (redemption cost + fixed cost) is not eligible. A decision spends the
fixed cost and reserves the redemption cost; the outcome settles the reservation
(redeemed: charge the actual cost, at most the reservation; otherwise release it), so
``spent + reserved`` never exceeds the budget.

Shared stores (``store.shared``, :class:`~.store.RedisStore`): several replicas use one
state. Budgets are then read from the store and a decision is recorded only through the
store's atomic reserve-if-it-fits (an offer that no longer fits is dropped and the
choice made again); an outcome is settled once by whichever replica gets it; every
replica's posterior replays the settled outcomes in their global order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from mercato.v1 import ranking_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.ranking.offers.bandit import LiftModel
from services.ranking.offers.catalog import Catalog, OfferSpec
from services.ranking.offers.features import FEATURES, N_FEATURES, OfferContext, features
from services.ranking.offers.store import (
    BudgetRow,
    DecisionRecord,
    OfferCounts,
    OfferStore,
    SharedOfferStore,
    Writes,
)

log = logging.getLogger("mercato.ranking.offers")

REDEEMED = ranking_pb2.OFFER_OUTCOME_REDEEMED
CONVERTED_WITHOUT_OFFER = ranking_pb2.OFFER_OUTCOME_CONVERTED_WITHOUT_OFFER
NO_CONVERSION = ranking_pb2.OFFER_OUTCOME_NO_CONVERSION
_OUTCOMES = (REDEEMED, CONVERTED_WITHOUT_OFFER, NO_CONVERSION)
FEATURE_SIGNATURE = hashlib.sha256(",".join(FEATURES).encode()).hexdigest()[:12]
EXPIRY_CHECK_S = 60.0
SNAPSHOT_EVERY = 200  # settled outcomes between posterior snapshots

# Reasons a choice was made (SelectOfferResponse.reason).
BEST = "best_expected_value"
EXPLORATION = "exploration"
NOT_WORTH = "no_offer_worth_cost"
BUDGET = "budget_exhausted"
NOT_ELIGIBLE = "not_eligible"


@dataclass(frozen=True)
class Choice:
    """What :meth:`OfferPolicy.select` decided."""

    offer: OfferSpec
    decision_id: str
    expected_incremental_margin: float
    reason: str
    policy_version: str
    explored: bool = False


@dataclass(frozen=True)
class OfferStatusRow:
    """One line of :meth:`OfferPolicy.status`."""

    offer: OfferSpec
    budget: float
    spent: float  # spent + reserved in the current period
    decisions: int
    redemptions: int
    period_key: str


def _converted(outcome: int) -> bool:
    return outcome in (REDEEMED, CONVERTED_WITHOUT_OFFER)


def eligible(offer: OfferSpec, ctx: OfferContext) -> bool:
    """The offer's eligibility rules (not its budget) allow it for ``ctx``."""
    e = offer.eligibility
    if e.surfaces and ctx.surface not in e.surfaces:
        return False
    if e.segments and ctx.segment not in e.segments:
        return False
    if ctx.cart_value < e.min_cart_value:
        return False
    if e.max_cart_value and ctx.cart_value >= e.max_cart_value:
        return False
    if ctx.cart_items < e.min_cart_items:
        return False
    return not (e.min_idle_minutes and ctx.idle_minutes < e.min_idle_minutes)


class OfferPolicy:
    """Thread-safe contextual bandit over the offer catalog, persisted in a store."""

    def __init__(
        self,
        catalog: Catalog,
        store: OfferStore,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        retention_days: float = 90.0,
    ) -> None:
        self.catalog = catalog
        self.retention_days = retention_days
        self.offers = catalog.offers
        self.arms = [o.id for o in self.offers]
        self.store = store
        self.clock = clock
        self.rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._last_expiry = -math.inf
        self.shared = bool(getattr(store, "shared", False))
        self.shared_store = cast(SharedOfferStore, store)  # used only when shared
        self._last_sync = -math.inf
        self._restore()

    # ------------------------------------------------------------------ state

    def _restore(self) -> None:
        """Load budgets, counters and the posterior (snapshot + replay) from the store."""
        cfg = self.catalog.settings
        self.model = LiftModel(self.arms, N_FEATURES, cfg.exploration.prior_lift_sd)
        state = self.store.load()
        self.budgets: dict[tuple[str, str], BudgetRow] = state.budgets
        self.counts: dict[str, OfferCounts] = state.counts
        self.explore_share = float(state.meta.get("explore_share", "0"))
        self.seq = int(state.meta.get("seq", "0"))
        snap = state.snapshot
        replay_from = 0
        if snap is not None and snap.features != FEATURE_SIGNATURE:
            log.warning("offer features changed since the state was saved; posterior reset")
            self._snapshot_seq = self.seq
            return
        if snap is not None:
            if not self.model.restore(snap):
                log.warning("stored offer posterior does not fit the catalog; replaying")
            else:
                replay_from = snap.seq
        replayed = 0
        for d in self.store.learned_after(replay_from):
            if d.offer_id in self.arms and d.features.shape == (N_FEATURES,):
                self.model.update(d.offer_id, d.features, _converted(d.outcome))
                replayed += 1
            self.seq = max(self.seq, d.seq)
        self._snapshot_seq = replay_from
        if replayed:
            log.info("offer outcomes replayed", extra={"replayed": replayed})

    def _sync(self, force: bool = False) -> None:
        """Shared store: learn the outcomes settled since (by any replica), in order."""
        if not self.shared:
            return
        now = time.monotonic()
        if not force and now - self._last_sync < 1.0:
            return
        self._last_sync = now
        for d in self.store.learned_after(self.seq):
            if d.offer_id in self.arms and d.features.shape == (N_FEATURES,):
                self.model.update(d.offer_id, d.features, _converted(d.outcome))
            self.seq = max(self.seq, d.seq)
        if self.seq - self._snapshot_seq >= SNAPSHOT_EVERY:
            self.store.commit(Writes(snapshot=self.model.snapshot(FEATURE_SIGNATURE, self.seq)))
            self._snapshot_seq = self.seq

    def snapshot(self) -> None:
        """Write the posterior now (also done every few outcomes and on close)."""
        with self._lock:
            self._sync(force=True)
            self._commit(Writes(snapshot=self.model.snapshot(FEATURE_SIGNATURE, self.seq)))
            self._snapshot_seq = self.seq

    def close(self) -> None:
        """Snapshot and close the store."""
        with self._lock:
            self.snapshot()
            self.store.close()

    @property
    def policy_version(self) -> str:
        """Catalog fingerprint and number of outcomes learned from."""
        return f"{self.catalog.fingerprint}.{self.model.updates}"

    def _meta(self) -> dict[str, str]:
        return {"seq": str(self.seq), "explore_share": repr(self.explore_share)}

    def _commit(self, writes: Writes) -> None:
        try:
            self.store.commit(writes)
        except Exception:
            # Keep memory equal to what is stored.
            self._restore()
            raise

    def _budget_row(self, offer_id: str, period_key: str) -> BudgetRow:
        return self.budgets.setdefault((offer_id, period_key), BudgetRow())

    def _remaining(self, offer: OfferSpec, now: float) -> float:
        if offer.budget.amount <= 0:
            return math.inf
        if self.shared:
            row: BudgetRow | None = self.shared_store.budget(offer.id, offer.budget.period.key(now))
        else:
            row = self.budgets.get((offer.id, offer.budget.period.key(now)))
        used = (row.reserved + row.spent) if row else 0.0
        return offer.budget.amount - used

    # ------------------------------------------------------------------ decide

    def _values(
        self, p: np.ndarray, margin: float, redeem: np.ndarray, fixed: np.ndarray
    ) -> np.ndarray:
        values = p * (margin - redeem) - fixed - p[0] * margin
        values[0] = 0.0
        return values

    def select(
        self,
        ctx: OfferContext,
        offer_ids: Sequence[str] = (),
        greedy: bool = False,
        dry_run: bool = False,
        now: float | None = None,
    ) -> Choice:
        """Choose an offer for ``ctx`` (restricted to ``offer_ids`` when given; "no
        offer" is always allowed). Records the decision and reserves its cost unless
        ``dry_run``."""
        unknown = sorted(set(offer_ids) - set(self.arms))
        if unknown:
            raise InvalidArgument(f"unknown offer ids {unknown}; known: {self.arms}")
        with self._lock:
            now = self.clock() if now is None else now
            self._maybe_expire(now)
            self._sync()
            refused: set[int] = set()  # offers another replica's decision used up meanwhile
            while True:
                choice = self._select_once(ctx, offer_ids, greedy, dry_run, now, refused)
                if isinstance(choice, Choice):
                    return choice
                refused.add(choice)

    def _select_once(
        self,
        ctx: OfferContext,
        offer_ids: Sequence[str],
        greedy: bool,
        dry_run: bool,
        now: float,
        refused: set[int],
    ) -> Choice | int:
        """One choice; on a shared store, the index of the chosen offer when its budget
        no longer held it (nothing recorded then)."""
        none = self.offers[0]
        allowed = set(offer_ids)
        by_rules = [
            i
            for i, o in enumerate(self.offers)
            if i > 0 and (not allowed or o.id in allowed) and eligible(o, ctx)
        ]
        if not by_rules:
            return Choice(none, "", 0.0, NOT_ELIGIBLE, self.policy_version)
        redeem = np.array([o.cost.redeem_cost(ctx.order_value) for o in self.offers])
        fixed = np.array([o.cost.fixed for o in self.offers])
        affordable = [
            i
            for i in by_rules
            if i not in refused
            and self._remaining(self.offers[i], now) >= redeem[i] + fixed[i] - 1e-9
        ]
        arms = np.array([0, *affordable])
        x = features(ctx)
        mean_values = self._values(self.model.predictive(x), ctx.margin, redeem, fixed)
        best = int(arms[np.argmax(mean_values[arms])])
        chosen, explored = best, False
        cap = self.catalog.settings.exploration.max_share
        if not greedy and len(arms) > 1 and self.explore_share < cap:
            sampled = self._values(self.model.probabilities(x, self.rng), ctx.margin, redeem, fixed)
            chosen = int(arms[np.argmax(sampled[arms])])
            explored = chosen != best
        offer = self.offers[chosen]
        if chosen:
            reason = EXPLORATION if explored else BEST
        else:
            reason = NOT_WORTH if affordable else BUDGET
        value = float(mean_values[chosen])
        if dry_run:
            return Choice(offer, "", value, reason, self.policy_version, explored)

        period = offer.budget.period.key(now)
        decision = DecisionRecord(
            decision_id=uuid.uuid4().hex,
            offer_id=offer.id,
            created_at=now,
            period_key=period,
            features=x,
            order_value=ctx.order_value,
            margin=ctx.margin,
            reserved=float(redeem[chosen]),
            fixed_cost=float(fixed[chosen]),
            explored=explored,
        )
        if self.shared and not self.shared_store.reserve(
            decision, offer.budget.amount if chosen else 0.0
        ):
            return chosen
        window = self.catalog.settings.exploration.window
        self.explore_share += (float(explored) - self.explore_share) / window
        if not self.shared:
            row = self._budget_row(offer.id, period)
            row.reserved += float(redeem[chosen])
            row.spent += float(fixed[chosen])
            counts = self.counts.setdefault(offer.id, OfferCounts())
            counts.decisions += 1
            self._commit(
                Writes(
                    decisions=[decision],
                    budgets={(offer.id, period): row},
                    counts={offer.id: counts},
                    meta=self._meta(),
                )
            )
        return Choice(offer, decision.decision_id, value, reason, self.policy_version, explored)

    # ------------------------------------------------------------------ learn

    def _settle(
        self, d: DecisionRecord, status: str, outcome: int, revenue: float, now: float
    ) -> Writes:
        """Settle the budget, counters and model for one decision (in memory)."""
        row = self._budget_row(d.offer_id, d.period_key)
        row.reserved = max(0.0, row.reserved - d.reserved)
        offer = self.catalog.by_id.get(d.offer_id)
        learn = status == "recorded" or self.catalog.settings.expired_is_no_conversion
        learn = learn and offer is not None and d.features.shape == (N_FEATURES,)
        self.seq += 1
        writes = Writes(decisions=[d.settled(status, outcome, revenue, now, self.seq, learn)])
        writes.budgets[(d.offer_id, d.period_key)] = row
        if outcome == REDEEMED:
            base = revenue if revenue > 0 else d.order_value
            actual = offer.cost.redeem_cost(base) if offer else d.reserved
            row.spent += min(actual, d.reserved)
            counts = self.counts.setdefault(d.offer_id, OfferCounts())
            counts.redemptions += 1
            writes.counts[d.offer_id] = counts
        if learn:
            self.model.update(d.offer_id, d.features, _converted(outcome))
            if self.seq - self._snapshot_seq >= SNAPSHOT_EVERY:
                writes.snapshot = self.model.snapshot(FEATURE_SIGNATURE, self.seq)
                self._snapshot_seq = self.seq
        writes.meta = self._meta()
        return writes

    def record(
        self,
        decision_id: str,
        outcome: int,
        revenue: float = 0.0,
        margin: float = 0.0,
        now: float | None = None,
    ) -> bool:
        """Feed back the outcome of a decision. False when it was already recorded."""
        if not decision_id:
            raise InvalidArgument("decision_id is required")
        if outcome not in _OUTCOMES:
            raise InvalidArgument(f"outcome must be set to a known value, got {outcome}")
        if not (math.isfinite(revenue) and revenue >= 0):
            raise InvalidArgument(f"revenue must be a finite number >= 0, got {revenue}")
        if not math.isfinite(margin):
            raise InvalidArgument(f"margin must be finite, got {margin}")
        with self._lock:
            now = self.clock() if now is None else now
            d = self.store.get_decision(decision_id)
            if d is None:
                raise NotFound(f"no offer decision {decision_id!r}")
            if d.status == "recorded":
                return False
            if d.status == "expired":
                raise FailedPrecondition(
                    f"decision {decision_id!r} is past its attribution window "
                    f"({self.catalog.settings.attribution_days:g} days)"
                )
            if outcome == REDEEMED and d.offer_id == self.arms[0]:
                raise InvalidArgument(
                    "decision gave no offer, so it cannot be redeemed; "
                    "send OFFER_OUTCOME_CONVERTED_WITHOUT_OFFER"
                )
            if self.shared:
                return self._settle_shared(d, "recorded", outcome, revenue, now)
            self._commit(self._settle(d, "recorded", outcome, revenue, now))
            return True

    def _settle_shared(
        self, d: DecisionRecord, status: str, outcome: int, revenue: float, now: float
    ) -> bool:
        """Settle ``d`` in a shared store (once, whichever replica comes first), then learn
        what was settled since. False when it was recorded already."""
        offer = self.catalog.by_id.get(d.offer_id)
        learn = status == "recorded" or self.catalog.settings.expired_is_no_conversion
        learn = learn and offer is not None and d.features.shape == (N_FEATURES,)
        spent, redeemed = 0.0, outcome == REDEEMED
        if redeemed:
            base = revenue if revenue > 0 else d.order_value
            actual = offer.cost.redeem_cost(base) if offer else d.reserved
            spent = min(actual, d.reserved)
        result, _ = self.shared_store.settle(
            d, status, outcome, revenue, now, spent, redeemed, learn
        )
        self._sync(force=True)
        if result == "settled":
            return True
        if result == "expired" and status == "recorded":
            raise FailedPrecondition(
                f"decision {d.decision_id!r} is past its attribution window "
                f"({self.catalog.settings.attribution_days:g} days)"
            )
        if result == "missing":
            raise NotFound(f"no offer decision {d.decision_id!r}")
        return False

    def _maybe_expire(self, now: float) -> None:
        if now - self._last_expiry >= EXPIRY_CHECK_S:
            self._last_expiry = now
            self.expire(now)

    def expire(self, now: float | None = None) -> int:
        """Settle decisions past the attribution window as "no conversion", and forget
        settled decisions older than the retention (their outcomes live on in the
        posterior snapshot)."""
        with self._lock:
            now = self.clock() if now is None else now
            cutoff = now - self.catalog.settings.attribution_days * 86400.0
            total = 0
            while batch := self.store.pending_before(cutoff, 500):
                if self.shared:
                    for d in batch:
                        total += self._settle_shared(d, "expired", NO_CONVERSION, 0.0, now)
                    continue
                merged = Writes()
                for d in batch:
                    w = self._settle(d, "expired", NO_CONVERSION, 0.0, now)
                    merged.decisions += w.decisions
                    merged.budgets.update(w.budgets)
                    merged.counts.update(w.counts)
                    merged.snapshot = w.snapshot or merged.snapshot
                    merged.meta = w.meta
                self._commit(merged)
                total += len(batch)
            purged = self.store.purge(now - self.retention_days * 86400.0, self._snapshot_seq)
            if total or purged:
                log.info("offer decisions expired", extra={"expired": total, "purged": purged})
            return total

    # ------------------------------------------------------------------ report

    def status(self, now: float | None = None) -> list[OfferStatusRow]:
        """Every offer with its budget state in the current period and its counters."""
        with self._lock:
            now = self.clock() if now is None else now
            rows = []
            all_counts = self.shared_store.counts() if self.shared else self.counts
            for offer in self.offers:
                period = offer.budget.period.key(now)
                if self.shared:
                    budget: BudgetRow | None = self.shared_store.budget(offer.id, period)
                else:
                    budget = self.budgets.get((offer.id, period))
                counts = all_counts.get(offer.id, OfferCounts())
                rows.append(
                    OfferStatusRow(
                        offer=offer,
                        budget=offer.budget.amount,
                        spent=(budget.reserved + budget.spent) if budget else 0.0,
                        decisions=counts.decisions,
                        redemptions=counts.redemptions,
                        period_key=period,
                    )
                )
            return rows
