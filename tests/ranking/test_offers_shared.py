"""Offer state shared by several ranking replicas through Redis: budgets hold across
replicas, an outcome may land on any replica, posteriors converge. A real redis-server."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mercato.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from services.common.errors import NotFound
from services.ranking.offers import Catalog, OfferContext, OfferPolicy, RedisStore
from services.ranking.offers.policy import CONVERTED_WITHOUT_OFFER as CONVERTED
from services.ranking.offers.policy import NO_CONVERSION, REDEEMED
from tests.procs import ServiceProc, start_service
from tests.profile.redis_proc import RedisProc

DAY = 86400.0
T0 = 1_767_225_600.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc = RedisProc(tmp_path_factory.mktemp("redis")).start()
    try:
        yield proc.url
    finally:
        proc.stop()


def budget_catalog(**settings: Any) -> Catalog:
    return Catalog.from_mapping(
        {
            "offers": [
                {
                    "id": "amt",
                    "kind": "amount_off",
                    "value": 5,
                    "cost": {"amount": 5, "fixed": 0.5},
                    "budget": {"amount": 100, "period": "day"},
                },
            ],
            "exploration": {"max_share": 1.0, "prior_lift_sd": 3.0},
            **settings,
        }
    )


CTX = OfferContext(surface="cart", cart_value=80.0, cart_items=2, order_value=80.0, margin=40.0)


def test_budget_holds_across_replicas_under_concurrency(redis_url: str) -> None:
    prefix = "t-budget:"
    cat = budget_catalog()
    replicas = [
        OfferPolicy(cat, RedisStore(redis_url, prefix), seed=i, clock=lambda: T0) for i in range(3)
    ]
    chosen: list[str] = []
    lock = threading.Lock()

    def work(policy: OfferPolicy) -> None:
        for _ in range(60):
            c = policy.select(CTX)
            with lock:
                chosen.append(c.offer.id)

    threads = [threading.Thread(target=work, args=(p,)) for p in replicas for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    given = chosen.count("amt")
    # 5.5 per decision, budget 100: at most 18 decisions in total across all replicas.
    assert 0 < given <= 18, given
    for policy in replicas:
        row = next(r for r in policy.status(T0) if r.offer.id == "amt")
        assert row.spent == pytest.approx(given * 5.5)
        assert row.spent <= 100 + 1e-9
        assert row.decisions == given
    for policy in replicas:
        policy.close()


def test_outcome_lands_on_any_replica_once_and_models_converge(redis_url: str) -> None:
    prefix = "t-outcome:"
    cat = budget_catalog()
    a = OfferPolicy(cat, RedisStore(redis_url, prefix), seed=1, clock=lambda: T0)
    b = OfferPolicy(cat, RedisStore(redis_url, prefix), seed=2, clock=lambda: T0)
    rng = random.Random(3)
    decisions = [(c.decision_id, c.offer.id) for c in (a.select(CTX) for _ in range(10))]
    for did, offer_id in decisions:
        outcome = rng.choice([REDEEMED if offer_id == "amt" else CONVERTED, NO_CONVERSION])
        assert b.record(did, outcome, revenue=80.0) is True  # on the other replica
        assert a.record(did, outcome, revenue=80.0) is False  # once
    with pytest.raises(NotFound):
        a.record("no-such-decision", NO_CONVERSION)
    a.snapshot()
    b.snapshot()
    assert a.model.updates == b.model.updates == 10
    assert a.policy_version == b.policy_version
    # a new replica restores the same posterior (snapshot + replay)
    c = OfferPolicy(cat, RedisStore(redis_url, prefix), seed=3, clock=lambda: T0)
    assert c.model.updates == 10
    for p in (a, b, c):
        p.close()


def test_expiry_settles_once_across_replicas(redis_url: str) -> None:
    prefix = "t-expire:"
    cat = budget_catalog(attribution_days=1)
    clock = {"t": T0}
    a = OfferPolicy(cat, RedisStore(redis_url, prefix), seed=1, clock=lambda: clock["t"])
    b = OfferPolicy(cat, RedisStore(redis_url, prefix), seed=2, clock=lambda: clock["t"])
    n = sum(a.select(CTX).offer.id == "amt" for _ in range(6))
    clock["t"] += 2 * DAY
    # same period key is gone (a new day), so check the old day's row
    expired = a.expire() + b.expire()
    assert expired == 6
    row = a.shared_store.budget("amt", cat.by_id["amt"].budget.period.key(T0))
    assert row.reserved == pytest.approx(0.0)  # every reservation released, once
    assert row.spent == pytest.approx(0.5 * n)  # fixed costs stay spent
    for p in (a, b):
        p.close()


# ------------------------------------------------------------- two service processes


def _select(stub: ranking_pb2_grpc.RankingServiceStub) -> ranking_pb2.SelectOfferResponse:
    profile = common_pb2.Profile(customer_id="c1", known=True, segment="active")
    profile.cart.lines.add(item_id="sku-1", quantity=2, price=40.0)
    return stub.SelectOffer(
        ranking_pb2.SelectOfferRequest(
            profile=profile, context=common_pb2.Context(surface=common_pb2.SURFACE_CART)
        ),
        timeout=5,
    )


@pytest.fixture
def two_rankings(redis_url: str, tmp_path: Path) -> Iterator[list[ServiceProc]]:
    offers = tmp_path / "offers.yaml"
    offers.write_text(
        "offers:\n"
        "  - {id: amt, kind: amount_off, value: 5, cost: {amount: 5, fixed: 0.5},\n"
        "     budget: {amount: 50, period: day}}\n"
        "exploration: {max_share: 1.0, prior_lift_sd: 3.0}\n"
    )
    env = {
        "MERCATO_RANKING_OFFERS_FILE": str(offers),
        "MERCATO_RANKING_OFFERS_STATE_URL": redis_url,
        "MERCATO_RANKING_OFFERS_STATE_PREFIX": f"t-svc-{tmp_path.name}:",
    }
    procs: list[ServiceProc] = []
    try:
        for i in range(2):
            procs.append(start_service("ranking", tmp_path / f"r{i}", env=env))
        yield procs
    finally:
        for p in procs:
            p.terminate()


@pytest.mark.slow
def test_two_ranking_processes_share_budget_and_outcomes(two_rankings: list[ServiceProc]) -> None:
    channels = [p.channel() for p in two_rankings]
    stubs = [ranking_pb2_grpc.RankingServiceStub(c) for c in channels]
    try:
        given = []
        for i in range(40):
            resp = _select(stubs[i % 2])
            if resp.offer.offer_id == "amt":
                given.append((i % 2, resp.decision_id))
        assert 0 < len(given) <= 9  # 5.5 each, budget 50, whichever replica decided
        # Every outcome recorded on the other replica than the one that decided.
        for who, did in given:
            stubs[1 - who].RecordOfferOutcome(
                ranking_pb2.RecordOfferOutcomeRequest(
                    decision_id=did, outcome=ranking_pb2.OFFER_OUTCOME_NO_CONVERSION
                ),
                timeout=5,
            )
        for stub in stubs:
            rows = {
                s.offer.offer_id: s
                for s in stub.ListOffers(ranking_pb2.ListOffersRequest(), timeout=5).offers
            }
            assert rows["amt"].decisions == len(given)
            assert rows["amt"].spent == pytest.approx(0.5 * len(given))  # reservations released
    except grpc.RpcError as exc:
        pytest.fail(f"{exc.code().name}: {exc.details()}")
    finally:
        for c in channels:
            c.close()


def test_a_budget_used_up_by_another_replica_is_refused(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica b spends the whole budget; replica a then gives nothing, dry runs
    included, and when a's read of the budget is stale the reservation is refused by the
    store and the offer is not tried again."""
    from services.ranking.offers.policy import BUDGET

    prefix = "t-used-up:"
    cat = budget_catalog()
    a = OfferPolicy(cat, RedisStore(redis_url, prefix), seed=1, clock=lambda: T0)
    b = OfferPolicy(cat, RedisStore(redis_url, prefix), seed=2, clock=lambda: T0)
    given = sum(b.select(CTX).offer.id == "amt" for _ in range(300))
    assert given == 18  # 18 x 5.5 of 100: a 19th does not fit
    for dry_run in (True, False):
        choice = a.select(CTX, dry_run=dry_run)
        assert (choice.offer.id, choice.reason) == ("none", BUDGET)
    reads: list[str] = []
    reserves: list[tuple[str, bool]] = []
    reserve = a.shared_store.reserve

    def stale(offer_id: str, period: str) -> None:  # as if nothing had been spent
        reads.append(offer_id)
        assert len(reads) < 20, "the refused offer is tried again and again"

    def counted(decision: Any, amount: float) -> bool:
        ok = reserve(decision, amount)
        reserves.append((decision.offer_id, ok))
        return ok

    monkeypatch.setattr(a.shared_store, "budget", stale)
    monkeypatch.setattr(a.shared_store, "reserve", counted)
    for _ in range(200):  # until sampling picks the offer a believes affordable
        reads.clear()
        reserves.clear()
        choice = a.select(CTX)
        if ("amt", False) in reserves:
            break
    assert reserves == [("amt", False), ("none", True)]  # refused by the store
    assert reads == ["amt"]  # and not tried again
    assert (choice.offer.id, choice.reason) == ("none", BUDGET)
    monkeypatch.undo()
    row = next(r for r in a.status(T0) if r.offer.id == "amt")
    assert row.decisions == 18 and row.spent == pytest.approx(99.0)
    for p in (a, b):
        p.close()
