"""The ranking service as a real process: Rank, offers, clear errors, state across restarts."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mercato.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from tests.procs import ServiceProc, start_service

pytestmark = pytest.mark.slow  # the ranking service as a process

SERVICE = "mercato.v1.RankingService"
ENV = {"MERCATO_RANKING_MAX_CANDIDATES": "50", "MERCATO_RANKING_OFFERS_SEED": "7"}


def _stub(proc: ServiceProc) -> tuple[grpc.Channel, ranking_pb2_grpc.RankingServiceStub]:
    channel = proc.channel()
    return channel, ranking_pb2_grpc.RankingServiceStub(channel)


@pytest.fixture
def ranking(tmp_path: Path) -> Iterator[tuple[ServiceProc, ranking_pb2_grpc.RankingServiceStub]]:
    proc = start_service("ranking", tmp_path, env=ENV)
    channel, stub = _stub(proc)
    try:
        yield proc, stub
    finally:
        channel.close()
        proc.terminate()


def _rank_request(n: int = 20, k: int = 5) -> ranking_pb2.RankRequest:
    req = ranking_pb2.RankRequest(k=k, context=common_pb2.Context(surface=common_pb2.SURFACE_HOME))
    for i in range(n):
        req.candidates.add(item_id=f"sku-{i}", score=1.0 - i / n)
        req.items.add(
            item_id=f"sku-{i}", category=f"cat{i % 3}", price=20, stock=0 if i % 4 == 0 else 5
        )
    return req


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code(), err.value.details() or ""


def _cart_profile(value: float = 50.0) -> common_pb2.Profile:
    profile = common_pb2.Profile(customer_id="c1", known=True, segment="active", price_band="mid")
    profile.cart.lines.add(item_id="sku-1", quantity=2, price=value / 2)
    return profile


def test_rank_answers_in_rules_only_mode(
    ranking: tuple[ServiceProc, ranking_pb2_grpc.RankingServiceStub],
) -> None:
    proc, stub = ranking
    assert proc.health(SERVICE) == "SERVING"  # rules-only ranking can always answer
    resp = stub.Rank(_rank_request(), timeout=10)
    ids = [it.item_id for it in resp.items]
    assert len(ids) == 5
    assert resp.model.name == ""
    assert resp.dropped["out_of_stock"] == 5
    assert all(int(i.split("-")[1]) % 4 != 0 for i in ids)  # no out-of-stock item
    assert ids[0] == "sku-1"  # best in-stock retrieval score
    # No profile: an unknown customer, whose items say popularity, never "model".
    assert resp.items[0].reasons[0] == common_pb2.REASON_TRENDING
    assert resp.items[0].reason_texts[0] == "popular in cat1"
    known = _rank_request()
    known.profile.known = True
    resp = stub.Rank(known, timeout=10)
    assert resp.items[0].reasons[0] == common_pb2.REASON_MODEL
    assert resp.items[0].reason_texts[0] == "picked for you from your history"


def test_bad_input_gets_clear_statuses_and_the_service_keeps_running(
    ranking: tuple[ServiceProc, ranking_pb2_grpc.RankingServiceStub],
) -> None:
    proc, stub = ranking
    empty = ranking_pb2.RankRequest(k=5)
    assert _code(lambda: stub.Rank(empty, timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "candidates must not be empty",
    )
    code, msg = _code(lambda: stub.Rank(_rank_request(k=0), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "k must be between 1 and 1000" in msg
    code, msg = _code(lambda: stub.Rank(_rank_request(n=51), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 50 candidates" in msg
    # Candidates as columns (what the gateway sends): unequal columns, or both forms.
    uneven = ranking_pb2.RankRequest(k=2)
    uneven.columns.item_ids.extend(["sku-1", "sku-2"])
    uneven.columns.scores.extend([1.0])
    uneven.columns.sources.extend([common_pb2.REASON_MODEL] * 2)
    code, msg = _code(lambda: stub.Rank(uneven, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must be parallel" in msg
    both = _rank_request(n=2, k=2)
    both.columns.item_ids.append("sku-1")
    both.columns.scores.append(1.0)
    both.columns.sources.append(common_pb2.REASON_MODEL)
    code, msg = _code(lambda: stub.Rank(both, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in msg
    uneven.columns.scores.append(0.5)  # now parallel: answered
    assert [it.item_id for it in stub.Rank(uneven, timeout=5).items] == ["sku-1", "sku-2"]

    dup = _rank_request(n=4, k=4)
    dup.candidates.add(item_id="sku-3", score=9.0)
    ids = [it.item_id for it in stub.Rank(dup, timeout=5).items]
    assert ids[0] == "sku-3" and len(ids) == len(set(ids)) == 3

    select = ranking_pb2.SelectOfferRequest(
        profile=_cart_profile(), context=common_pb2.Context(surface=common_pb2.SURFACE_CART)
    )
    bad_offer = ranking_pb2.SelectOfferRequest(offer_ids=["mystery"])
    bad_offer.CopyFrom(select)
    bad_offer.offer_ids.append("mystery")
    code, msg = _code(lambda: stub.SelectOffer(bad_offer, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "mystery" in msg
    malformed = ranking_pb2.SelectOfferRequest()
    malformed.CopyFrom(select)
    malformed.profile.price_band = "cheap"
    code, msg = _code(lambda: stub.SelectOffer(malformed, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "price_band" in msg
    malformed.profile.price_band = ""
    malformed.profile.cart.value = float("nan")
    code, msg = _code(lambda: stub.SelectOffer(malformed, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cart.value" in msg

    unknown = ranking_pb2.RecordOfferOutcomeRequest(
        decision_id="nope", outcome=ranking_pb2.OFFER_OUTCOME_REDEEMED
    )
    code, msg = _code(lambda: stub.RecordOfferOutcome(unknown, timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg
    decision = stub.SelectOffer(select, timeout=5)
    assert decision.decision_id and decision.policy_version
    unset = ranking_pb2.RecordOfferOutcomeRequest(decision_id=decision.decision_id)
    code, _ = _code(lambda: stub.RecordOfferOutcome(unset, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    outcome = ranking_pb2.RecordOfferOutcomeRequest(
        decision_id=decision.decision_id, outcome=ranking_pb2.OFFER_OUTCOME_NO_CONVERSION
    )
    assert stub.RecordOfferOutcome(outcome, timeout=5).recorded is True
    assert stub.RecordOfferOutcome(outcome, timeout=5).recorded is False

    home = ranking_pb2.SelectOfferRequest(
        profile=_cart_profile(), context=common_pb2.Context(surface=common_pb2.SURFACE_HOME)
    )
    resp = stub.SelectOffer(home, timeout=5)
    assert resp.offer.kind == common_pb2.OFFER_KIND_NONE and resp.reason == "not_eligible"

    # Still healthy and answering.
    assert proc.health(SERVICE) == "SERVING"
    assert stub.Rank(_rank_request(), timeout=5).items


def _listing(stub: ranking_pb2_grpc.RankingServiceStub) -> list[tuple[str, float, float, int, int]]:
    return [
        (s.offer.offer_id, s.budget, round(s.spent, 6), s.decisions, s.redemptions)
        for s in stub.ListOffers(ranking_pb2.ListOffersRequest(), timeout=5).offers
    ]


def _version(stub: ranking_pb2_grpc.RankingServiceStub) -> str:
    req = ranking_pb2.SelectOfferRequest(
        profile=_cart_profile(),
        context=common_pb2.Context(surface=common_pb2.SURFACE_CART),
        greedy=True,
        dry_run=True,
    )
    resp = stub.SelectOffer(req, timeout=5)
    return f"{resp.policy_version} {resp.offer.offer_id} {resp.expected_incremental_margin:.9f}"


def _traffic(stub: ranking_pb2_grpc.RankingServiceStub, n: int, seed: int) -> list[str]:
    """n decisions; outcomes for about two thirds; returns the open decision ids."""
    rng = random.Random(seed)
    surfaces = [common_pb2.SURFACE_CART, common_pb2.SURFACE_CHECKOUT, common_pb2.SURFACE_EMAIL]
    open_ids = []
    for _ in range(n):
        profile = _cart_profile(rng.uniform(10, 150))
        profile.cart.updated_at.GetCurrentTime()
        profile.cart.updated_at.seconds -= rng.randint(0, 3 * 86400)
        resp = stub.SelectOffer(
            ranking_pb2.SelectOfferRequest(
                profile=profile, context=common_pb2.Context(surface=rng.choice(surfaces))
            ),
            timeout=5,
        )
        assert resp.decision_id
        if rng.random() < 0.66:
            outcome = rng.choice(
                [
                    ranking_pb2.OFFER_OUTCOME_NO_CONVERSION,
                    ranking_pb2.OFFER_OUTCOME_CONVERTED_WITHOUT_OFFER,
                ]
                + ([ranking_pb2.OFFER_OUTCOME_REDEEMED] if resp.offer.offer_id != "none" else [])
            )
            stub.RecordOfferOutcome(
                ranking_pb2.RecordOfferOutcomeRequest(
                    decision_id=resp.decision_id, outcome=outcome, revenue=60.0
                ),
                timeout=5,
            )
        else:
            open_ids.append(resp.decision_id)
    return open_ids


def test_offer_state_survives_sigterm_and_a_crash(tmp_path: Path) -> None:
    proc = start_service("ranking", tmp_path, env=ENV)
    channel, stub = _stub(proc)
    open_ids = _traffic(stub, 120, seed=1)
    before, version = _listing(stub), _version(stub)
    assert sum(row[3] for row in before) >= 120
    channel.close()
    assert proc.terminate() == 0

    proc = start_service("ranking", tmp_path, env=ENV)
    channel, stub = _stub(proc)
    assert _listing(stub) == before
    assert _version(stub) == version  # same posterior, same choice and value
    record = ranking_pb2.RecordOfferOutcomeRequest(
        decision_id=open_ids[0], outcome=ranking_pb2.OFFER_OUTCOME_NO_CONVERSION
    )
    assert stub.RecordOfferOutcome(record, timeout=5).recorded is True
    assert stub.RecordOfferOutcome(record, timeout=5).recorded is False

    # A crash (SIGKILL, no final snapshot): committed outcomes are replayed on start.
    _traffic(stub, 40, seed=2)
    before, version = _listing(stub), _version(stub)
    channel.close()
    proc.kill()
    proc = start_service("ranking", tmp_path, env=ENV)
    channel, stub = _stub(proc)
    try:
        assert _listing(stub) == before
        assert _version(stub) == version
        assert stub.RecordOfferOutcome(record, timeout=5).recorded is False
    finally:
        channel.close()
        proc.terminate()


KILL_OFFERS = """
margin_rate: 0.35
default_order_value: 40.0
attribution_days: 7
exploration: {max_share: 1.0, prior_lift_sd: 3.0}
offers:
  - {id: none, kind: none, description: No incentive}
  - id: nudge
    kind: cart_recovery
    description: Finish your order
    cost: {fixed: 0.01}
    eligibility: {surfaces: [cart, checkout, email]}
    budget: {amount: 1000, period: total}
  - id: ship
    kind: free_shipping
    description: Free shipping
    cost: {fixed: 0.03}
    eligibility: {surfaces: [cart, checkout, email]}
    budget: {amount: 1000, period: total}
"""
FIXED = {"none": 0.0, "nudge": 0.01, "ship": 0.03}


def test_offer_state_survives_a_sigkill_while_calls_are_in_flight(tmp_path: Path) -> None:
    """SIGKILL lands while decisions and outcomes are in flight from 4 clients without
    retries: after the restart every acknowledged decision exists once (an outcome can
    be recorded for it, once), every acknowledged outcome is kept, and the counters and
    budgets hold exactly the acknowledged writes plus at most the ones cut off, whole."""
    offers = tmp_path / "offers.yaml"
    offers.write_text(KILL_OFFERS)
    env = {**ENV, "MERCATO_RANKING_OFFERS_FILE": str(offers)}
    proc = start_service("ranking", tmp_path, env=env)
    lock = threading.Lock()
    decided: dict[str, str] = {}  # acknowledged decision -> offer
    outcomes: dict[str, int] = {}  # acknowledged outcome per decision
    cut: list[tuple[str, str, str]] = []  # (call, decision id or "", failure)
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        options = [("grpc.enable_retries", 0)]
        with grpc.insecure_channel(proc.target, options=options) as ch:
            stub = ranking_pb2_grpc.RankingServiceStub(ch)
            while not stop.is_set():
                call, decision = "select", ""
                try:
                    profile = _cart_profile(rng.uniform(10, 150))
                    resp = stub.SelectOffer(
                        ranking_pb2.SelectOfferRequest(
                            profile=profile,
                            context=common_pb2.Context(surface=common_pb2.SURFACE_CART),
                        ),
                        timeout=10,
                    )
                    assert resp.decision_id, "an eligible offer always makes a decision"
                    with lock:
                        decided[resp.decision_id] = resp.offer.offer_id
                    if rng.random() < 0.6:
                        call, decision = "outcome", resp.decision_id
                        outcome = (
                            ranking_pb2.OFFER_OUTCOME_REDEEMED
                            if resp.offer.offer_id != "none"
                            else ranking_pb2.OFFER_OUTCOME_NO_CONVERSION
                        )
                        rec = stub.RecordOfferOutcome(
                            ranking_pb2.RecordOfferOutcomeRequest(
                                decision_id=decision, outcome=outcome, revenue=50.0
                            ),
                            timeout=10,
                        )
                        assert rec.recorded
                        with lock:
                            outcomes[decision] = outcome
                except Exception as exc:  # every failure counts, gRPC or not
                    is_rpc = isinstance(exc, grpc.RpcError)
                    with lock:
                        cut.append((call, decision, exc.code().name if is_rpc else repr(exc)))
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(decided) < 150 and not cut and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not cut, f"calls failed before the kill: {cut}"
    proc.kill()  # SIGKILL while calls are in flight
    stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert len(decided) >= 150, "the stream never got going"
    assert cut, "no call was cut off: the kill did not land while calls were in flight"
    assert {failure for _, _, failure in cut} == {"UNAVAILABLE"}, cut

    proc = start_service("ranking", tmp_path, env=env)
    channel, stub = _stub(proc)
    try:
        listed = {
            s.offer.offer_id: s
            for s in stub.ListOffers(ranking_pb2.ListOffersRequest(), timeout=5).offers
        }
        cut_selects = sum(call == "select" for call, _, _ in cut)
        cut_outcomes = {d for call, d, _ in cut if call == "outcome"}
        for offer_id, fixed in FIXED.items():
            acked = sum(o == offer_id for o in decided.values())
            row = listed[offer_id]
            # every acknowledged decision once; at most the cut-off calls on top
            assert acked <= row.decisions <= acked + cut_selects, (offer_id, acked, row)
            # a decision and its budget are written together: no half-written decision
            assert row.spent == pytest.approx(row.decisions * fixed), (offer_id, row)
            redeemed = sum(
                1
                for d, o in outcomes.items()
                if decided[d] == offer_id and o == ranking_pb2.OFFER_OUTCOME_REDEEMED
            )
            maybe = sum(1 for d in cut_outcomes if decided[d] == offer_id)
            assert redeemed <= row.redemptions <= redeemed + maybe, (offer_id, row)
        assert sum(r.decisions for r in listed.values()) >= len(decided)

        for decision, offer_id in decided.items():
            again = ranking_pb2.RecordOfferOutcomeRequest(
                decision_id=decision, outcome=ranking_pb2.OFFER_OUTCOME_NO_CONVERSION
            )
            recorded = stub.RecordOfferOutcome(again, timeout=5).recorded  # NOT_FOUND raises
            if decision in outcomes:
                assert not recorded, f"acknowledged outcome of {decision} ({offer_id}) lost"
            elif decision not in cut_outcomes:
                assert recorded, f"decision {decision} had no outcome, yet one is stored"
    finally:
        channel.close()
        assert proc.terminate() == 0
