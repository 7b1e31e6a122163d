"""The offer policy in-process: catalog, context validation, learning, budgets, state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mercato.v1 import common_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.ranking.offers import (
    Catalog,
    CatalogError,
    MemoryStore,
    OfferContext,
    OfferPolicy,
    SqliteStore,
    offer_context,
)
from services.ranking.offers.policy import (
    CONVERTED_WITHOUT_OFFER,
    NO_CONVERSION,
    REDEEMED,
    SNAPSHOT_EVERY,
)
from services.ranking.settings import DEFAULT_OFFERS_FILE

DAY = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def catalog(offers: list[dict[str, Any]], **settings: Any) -> Catalog:
    return Catalog.from_mapping({"offers": offers, **settings})


CART = OfferContext(surface="cart", cart_value=50.0, cart_items=2, order_value=50.0, margin=17.5)


# ------------------------------------------------------------------ catalog


def test_shipped_catalog_loads() -> None:
    cat = Catalog.load(DEFAULT_OFFERS_FILE)
    kinds = {o.id: o.kind for o in cat.offers}
    assert cat.offers[0].id == "none"
    assert set(kinds.values()) == {
        "none",
        "percent_off",
        "amount_off",
        "free_shipping",
        "bundle",
        "cart_recovery",
    }
    assert all(o.budget.amount > 0 for o in cat.offers[1:])
    pct = cat.by_id["pct10"]
    assert pct.cost.redeem_cost(100) == pytest.approx(10)
    assert pct.cost.redeem_cost(1000) == pytest.approx(25)  # capped


@pytest.mark.parametrize(
    "offers",
    [
        [{"id": "a", "kind": "percent_off"}, {"id": "a", "kind": "amount_off"}],
        [{"id": "a", "kind": "lottery"}],
        [{"id": "a", "kind": "none"}],
        [{"id": "a", "kind": "amount_off", "eligibility": {"surfaces": ["homepage"]}}],
        [{"id": "a", "kind": "amount_off", "budget": {"amount": -1}}],
        [{"id": "a", "kind": "amount_off", "colour": "red"}],
    ],
)
def test_bad_catalogs_are_refused(offers: list[dict[str, Any]]) -> None:
    with pytest.raises(CatalogError):
        catalog(offers)


def test_none_offer_is_added_first() -> None:
    cat = catalog([{"id": "a", "kind": "amount_off"}])
    assert [o.id for o in cat.offers] == ["none", "a"]


# ------------------------------------------------------------------ context


def _profile(**kw: Any) -> common_pb2.Profile:
    return common_pb2.Profile(customer_id="c1", known=True, **kw)


@pytest.mark.parametrize(
    ("profile", "context", "message"),
    [
        (_profile(price_band="cheap"), common_pb2.Context(), "price_band"),
        (_profile(rfm=common_pb2.Rfm(recency_score=7)), common_pb2.Context(), "recency_score"),
        (_profile(rfm=common_pb2.Rfm(monetary=float("nan"))), common_pb2.Context(), "monetary"),
        (_profile(cart=common_pb2.Cart(value=-3)), common_pb2.Context(), "cart.value"),
        (_profile(cart=common_pb2.Cart(value=float("inf"))), common_pb2.Context(), "cart.value"),
        (
            _profile(cart=common_pb2.Cart(lines=[common_pb2.CartLine(item_id="a", quantity=-1)])),
            common_pb2.Context(),
            "quantity",
        ),
        (_profile(), common_pb2.Context(surface=42), "surface"),  # type: ignore[arg-type]
        (_profile(), common_pb2.Context(attributes={"cart_margin": "lots"}), "cart_margin"),
    ],
)
def test_malformed_contexts_are_invalid_arguments(
    profile: common_pb2.Profile, context: common_pb2.Context, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        offer_context(profile, context, 0.35, 40.0)


def test_context_derives_cart_idle_time_and_order_value() -> None:
    profile = _profile(
        segment="at_risk",
        price_band="low",
        rfm=common_pb2.Rfm(frequency=4, monetary=200.0, recency_score=2, frequency_score=3),
    )
    profile.cart.lines.add(item_id="a", quantity=2, price=10.0)
    profile.cart.updated_at.FromSeconds(int(T0 - 3 * 3600))
    ctx = offer_context(profile, common_pb2.Context(surface=common_pb2.SURFACE_EMAIL), 0.3, 40, T0)
    assert ctx.cart_value == pytest.approx(20.0)
    assert ctx.cart_items == 2
    assert ctx.idle_minutes == pytest.approx(180.0)
    assert ctx.margin == pytest.approx(6.0)
    assert ctx.surface == "email" and ctx.segment == "at_risk"

    empty = offer_context(profile.__class__(rfm=profile.rfm), common_pb2.Context(), 0.3, 40, T0)
    assert empty.order_value == pytest.approx(50.0)  # 200 / 4 orders
    assert offer_context(_profile(), common_pb2.Context(), 0.3, 40, T0).order_value == 40.0

    future = _profile()
    future.cart.lines.add(item_id="a", quantity=1, price=5)
    future.cart.updated_at.FromSeconds(int(T0 + 3600))
    with pytest.raises(InvalidArgument, match="after the request time"):
        offer_context(future, common_pb2.Context(), 0.3, 40, T0)


# ------------------------------------------------------------------ decisions


def test_eligibility_restrictions_and_previews() -> None:
    cat = catalog(
        [
            {
                "id": "small",
                "kind": "amount_off",
                "value": 2,
                "cost": {"amount": 2},
                "eligibility": {"surfaces": ["cart"], "max_cart_value": 40},
            },
            {
                "id": "vip",
                "kind": "percent_off",
                "value": 5,
                "cost": {"percent": 5},
                "eligibility": {"surfaces": ["cart"], "segments": ["loyal"]},
            },
            {
                "id": "remind",
                "kind": "cart_recovery",
                "cost": {"fixed": 0.1},
                "eligibility": {"surfaces": ["email"], "min_idle_minutes": 60},
            },
        ]
    )
    policy = OfferPolicy(cat, MemoryStore(), seed=1, clock=Clock())
    home = policy.select(OfferContext(surface="home"))
    assert (home.offer.id, home.reason, home.decision_id) == ("none", "not_eligible", "")
    fresh = policy.select(OfferContext(surface="email", cart_items=1, idle_minutes=10))
    assert fresh.reason == "not_eligible"
    with pytest.raises(InvalidArgument, match="unknown offer ids"):
        policy.select(CART, offer_ids=["nope"])
    for _ in range(30):  # CART is worth 50: "small" is never eligible, "vip" needs loyal
        assert policy.select(CART).reason == "not_eligible"
        loyal = policy.select(OfferContext(**{**CART.__dict__, "segment": "loyal"}))
        assert loyal.offer.id in {"none", "vip"} and loyal.decision_id
        only = policy.select(
            OfferContext(**{**CART.__dict__, "segment": "loyal", "cart_value": 30}),
            offer_ids=["small"],
        )
        assert only.offer.id in {"none", "small"}
    preview = policy.select(CART.__class__(**{**CART.__dict__, "segment": "loyal"}), dry_run=True)
    assert preview.decision_id == ""
    before = {r.offer.id: r.decisions for r in policy.status()}
    policy.select(OfferContext(**{**CART.__dict__, "segment": "loyal"}), dry_run=True)
    assert {r.offer.id: r.decisions for r in policy.status()} == before


def _simple_world() -> tuple[Catalog, dict[str, dict[str, float]]]:
    """Three offers and two kinds of customer with known true conversion rates.

    Cart 50, margin 17.5. For "browsers" (p0 = 0.2) free shipping has the best expected
    incremental margin; the big discount converts most but loses money. "Regulars" buy
    anyway (p0 = 0.7): every offer loses money there.
    """
    cat = catalog(
        [
            {"id": "ship", "kind": "free_shipping", "cost": {"amount": 4.5}},
            {"id": "pct10", "kind": "percent_off", "value": 10, "cost": {"percent": 10}},
            {"id": "big", "kind": "amount_off", "value": 20, "cost": {"amount": 20}},
        ],
        exploration={"max_share": 0.2},
    )
    truth = {
        "browser": {"none": 0.20, "ship": 0.36, "pct10": 0.30, "big": 0.70},
        "regular": {"none": 0.70, "ship": 0.74, "pct10": 0.75, "big": 0.85},
    }
    return cat, truth


def test_bandit_learns_the_most_profitable_offer_not_the_most_redeemed() -> None:
    cat, truth = _simple_world()
    rng = random.Random(7)
    policy = OfferPolicy(cat, MemoryStore(), seed=3, clock=Clock())
    contexts = {
        "browser": OfferContext(**{**CART.__dict__, "segment": "new", "recency_score": 0}),
        "regular": OfferContext(
            **{
                **CART.__dict__,
                "segment": "loyal",
                "recency_score": 5,
                "frequency_score": 5,
                "monetary_score": 5,
            }
        ),
    }

    def value(kind: str, offer: str) -> float:
        p, p0, m = truth[kind][offer], truth[kind]["none"], CART.margin
        return p * (m - cat.by_id[offer].cost.redeem_cost(CART.order_value)) - p0 * m

    best = {k: max(truth[k], key=lambda o: value(k, o)) for k in truth}
    assert best == {"browser": "ship", "regular": "none"}  # the world is as described
    late: dict[str, list[str]] = {"browser": [], "regular": []}
    for t in range(3000):
        kind = "browser" if rng.random() < 0.5 else "regular"
        choice = policy.select(contexts[kind])
        converted = rng.random() < truth[kind][choice.offer.id]
        outcome = NO_CONVERSION
        if converted:
            outcome = CONVERTED_WITHOUT_OFFER if choice.offer.id == "none" else REDEEMED
        assert policy.record(choice.decision_id, outcome, revenue=50.0)
        if t >= 2000:
            late[kind].append(choice.offer.id)
    for kind in truth:
        greedy = policy.select(contexts[kind], greedy=True, dry_run=True)
        assert greedy.offer.id == best[kind], kind
        # Exploration is capped at 20 % of decisions: the rest exploit.
        assert late[kind].count(best[kind]) > 0.6 * len(late[kind])
    assert policy.select(contexts["browser"], greedy=True, dry_run=True).reason == (
        "best_expected_value"
    )
    assert policy.select(contexts["regular"], greedy=True, dry_run=True).reason == (
        "no_offer_worth_cost"
    )


def test_budgets_are_never_exceeded() -> None:
    cat = catalog(
        [
            {
                "id": "pct",
                "kind": "percent_off",
                "value": 20,
                "cost": {"percent": 20, "max": 15},
                "budget": {"amount": 60, "period": "day"},
            },
            {
                "id": "amt",
                "kind": "amount_off",
                "value": 7,
                "cost": {"amount": 7, "fixed": 0.5},
                "budget": {"amount": 45, "period": "week"},
            },
            {"id": "free", "kind": "free_shipping", "cost": {"amount": 1}},
        ],
        exploration={"max_share": 1.0, "prior_lift_sd": 3.0},  # explore a lot: spend
        attribution_days=30,
    )
    clock = Clock()
    policy = OfferPolicy(cat, MemoryStore(), seed=0, clock=clock)
    rng = random.Random(1)
    pending: list[tuple[str, str]] = []
    highest: dict[str, float] = {}
    for step in range(1500):
        value = rng.uniform(5, 200)
        ctx = OfferContext(
            surface="cart", cart_value=value, cart_items=1, order_value=value, margin=value * 0.4
        )
        choice = policy.select(ctx)
        pending.append((choice.decision_id, choice.offer.id))
        if rng.random() < 0.3 and pending:  # settle some, in random order
            did, offer_id = pending.pop(rng.randrange(len(pending)))
            outcome = rng.choice([REDEEMED, NO_CONVERSION, CONVERTED_WITHOUT_OFFER])
            if offer_id == "none" and outcome == REDEEMED:
                outcome = CONVERTED_WITHOUT_OFFER
            # Revenue above the order value must not make a redemption cost more.
            policy.record(did, outcome, revenue=rng.uniform(0, 400))
        for row in policy.status():
            if row.budget:
                assert row.spent <= row.budget + 1e-9, (step, row)
                highest[row.offer.id] = max(highest.get(row.offer.id, 0), row.spent / row.budget)
        clock.t += 600 if step % 500 else DAY  # a new day now and then
    # The budgets were under pressure (nearly used up), not just never reached.
    assert highest["pct"] > 0.8 and highest["amt"] > 0.8, highest


def test_outcomes_are_idempotent_and_checked() -> None:
    cat, _ = _simple_world()
    clock = Clock()
    policy = OfferPolicy(cat, MemoryStore(), seed=0, clock=clock)
    decision = policy.select(CART)
    assert decision.decision_id
    with pytest.raises(InvalidArgument, match="outcome"):
        policy.record(decision.decision_id, 0)
    with pytest.raises(InvalidArgument, match="decision_id is required"):
        policy.record("", NO_CONVERSION)
    with pytest.raises(InvalidArgument, match="revenue"):
        policy.record(decision.decision_id, NO_CONVERSION, revenue=-1)
    with pytest.raises(NotFound, match="no offer decision"):
        policy.record("does-not-exist", NO_CONVERSION)
    updates = policy.model.updates
    assert policy.record(decision.decision_id, NO_CONVERSION) is True
    assert policy.record(decision.decision_id, REDEEMED) is False
    assert policy.model.updates == updates + 1
    # Restricting to "no offer" leaves nothing to decide; at the no-lift prior the
    # greedy choice is no offer, recorded as a decision.
    assert policy.select(CART, offer_ids=["none"]).reason == "not_eligible"
    fresh = OfferPolicy(cat, MemoryStore(), seed=0, clock=clock)
    none = fresh.select(CART, greedy=True)
    assert (none.offer.id, none.reason) == ("none", "no_offer_worth_cost")
    assert none.expected_incremental_margin == 0.0
    with pytest.raises(InvalidArgument, match="cannot be redeemed"):
        fresh.record(none.decision_id, REDEEMED)


def test_unanswered_decisions_expire_and_release_their_budget() -> None:
    cat = catalog(
        [
            {
                "id": "amt",
                "kind": "amount_off",
                "cost": {"amount": 5},
                "budget": {"amount": 100, "period": "total"},
            }
        ],
        attribution_days=1,
        exploration={"max_share": 1.0, "prior_lift_sd": 5.0},
    )
    clock = Clock()
    policy = OfferPolicy(cat, MemoryStore(), seed=0, clock=clock)
    ids = [policy.select(CART).decision_id for _ in range(40)]
    spent = {r.offer.id: r.spent for r in policy.status()}
    assert spent["amt"] > 0
    updates = policy.model.updates
    clock.t += 2 * DAY
    assert policy.expire() == 40
    assert {r.offer.id: r.spent for r in policy.status()}["amt"] == 0
    assert policy.model.updates == updates + 40  # learned as "no conversion"
    with pytest.raises(FailedPrecondition, match="attribution window"):
        policy.record(ids[0], REDEEMED)


# ------------------------------------------------------------------ persistence


def _drive(policy: OfferPolicy, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    open_ids = []
    for _ in range(n):
        value = rng.uniform(10, 120)
        choice = policy.select(
            OfferContext(
                surface=rng.choice(["cart", "checkout", "email"]),
                cart_value=value,
                cart_items=rng.randint(1, 4),
                idle_minutes=rng.uniform(0, 3000),
                order_value=value,
                margin=value * 0.35,
                segment=rng.choice(["new", "loyal", ""]),
            )
        )
        if not choice.decision_id:
            continue
        if rng.random() < 0.8:
            offer = choice.offer.id
            outcome = rng.choice(
                [NO_CONVERSION, CONVERTED_WITHOUT_OFFER] + ([REDEEMED] if offer != "none" else [])
            )
            policy.record(choice.decision_id, outcome, revenue=value)
        else:
            open_ids.append(choice.decision_id)
    return open_ids


def _state(policy: OfferPolicy) -> tuple[Any, ...]:
    return (
        policy.model.mean.copy(),
        policy.model.cov.copy(),
        policy.model.updates,
        [(r.offer.id, round(r.spent, 9), r.decisions, r.redemptions) for r in policy.status()],
        policy.explore_share,
        policy.policy_version,
    )


@pytest.mark.parametrize("clean_close", [True, False])
def test_state_survives_a_restart(tmp_path: Path, clean_close: bool) -> None:
    cat = Catalog.load(DEFAULT_OFFERS_FILE)
    path = tmp_path / "offers.db"
    clock = Clock()
    policy = OfferPolicy(cat, SqliteStore(path), seed=0, clock=clock)
    open_ids = _drive(policy, SNAPSHOT_EVERY + 150, seed=1)  # a snapshot + a tail to replay
    before = _state(policy)
    if clean_close:
        policy.close()
    else:
        policy.store.close()  # as after a crash: no final snapshot
    again = OfferPolicy(cat, SqliteStore(path), seed=0, clock=clock)
    after = _state(again)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(after[1], before[1], rtol=0, atol=1e-12)
    assert after[2:] == before[2:]
    # Decisions made before the restart can still be settled, once.
    assert open_ids
    assert again.record(open_ids[0], NO_CONVERSION) is True
    assert again.record(open_ids[0], NO_CONVERSION) is False
    again.close()


def test_catalog_changes_keep_what_still_applies(tmp_path: Path) -> None:
    cat = catalog(
        [
            {"id": "a", "kind": "amount_off", "cost": {"amount": 3}},
            {"id": "b", "kind": "percent_off", "cost": {"percent": 5}},
        ],
        exploration={"max_share": 1.0},
    )
    path = tmp_path / "offers.db"
    policy = OfferPolicy(cat, SqliteStore(path), seed=0, clock=Clock())
    _drive(policy, 300, seed=2)
    d = policy.model.dim
    base, lift_a = policy.model.mean[:d].copy(), policy.model.mean[d : 2 * d].copy()
    policy.close()
    changed = catalog(
        [
            {"id": "c", "kind": "free_shipping", "cost": {"amount": 4}},
            {"id": "a", "kind": "amount_off", "cost": {"amount": 3}},
        ]
    )
    again = OfferPolicy(changed, SqliteStore(path), seed=0, clock=Clock())
    assert again.arms == ["none", "c", "a"]
    np.testing.assert_allclose(again.model.mean[:d], base)
    np.testing.assert_allclose(again.model.mean[2 * d :], lift_a)
    np.testing.assert_allclose(again.model.mean[d : 2 * d], 0.0)  # new offer: prior
    again.close()


def test_budget_accounting_is_exact_to_the_cent() -> None:
    """Reserve the redemption cost and spend the fixed cost at decision time; on the
    outcome, spend what the redemption really cost (capped at the reservation, priced on
    the revenue when given, else the order value) and release the rest. An offer stays
    affordable while its remaining budget covers its cost exactly."""
    from services.ranking.offers.policy import BUDGET

    cat = catalog(
        [
            {
                "id": "pct",
                "kind": "percent_off",
                "value": 10,
                "cost": {"percent": 10, "fixed": 0.5},
                # five decisions at 4 reserved + 0.5 fixed: the fifth fits exactly
                "budget": {"amount": 22.5, "period": "total"},
            }
        ],
        exploration={"max_share": 1.0, "prior_lift_sd": 3.0},
        attribution_days=30,
    )
    policy = OfferPolicy(cat, MemoryStore(), seed=3, clock=Clock())
    ctx = OfferContext(surface="cart", cart_value=40.0, cart_items=1, order_value=40.0, margin=14)

    def row(offer_id: str = "pct") -> Any:
        return next(r for r in policy.status() if r.offer.id == offer_id)

    def give() -> str:
        for _ in range(500):  # Thompson sampling: the offer comes up about half the time
            choice = policy.select(ctx)
            if choice.offer.id == "pct":
                return choice.decision_id
        raise AssertionError("the offer was never chosen")

    nones = 0
    decisions = []
    for n in range(1, 6):
        decisions.append(give())
        r = row()
        assert (r.budget, r.decisions, r.redemptions) == (22.5, n, 0)
        assert r.spent == pytest.approx(4.5 * n)
    nones = row("none").decisions
    assert row().period_key == "total" and row("none").period_key == "2026-01-01"
    # 22.5 used of 22.5: nothing left, so the policy says why it gives nothing
    for _ in range(20):
        choice = policy.select(ctx)
        assert (choice.offer.id, choice.reason) == ("none", BUDGET)
    assert row("none").decisions == nones + 20
    d1, d2, d3, d4, d5 = decisions
    used = 22.5
    # redeemed on a 60 order: 6 would be due, 4 were reserved: 4 spent, nothing released
    assert policy.record(d1, REDEEMED, revenue=60.0)
    assert row().spent == pytest.approx(used) and row().redemptions == 1
    # redeemed on a 20 order: 2 spent, 2 released
    assert policy.record(d2, REDEEMED, revenue=20.0)
    used -= 2.0
    assert row().spent == pytest.approx(used) and row().redemptions == 2
    # redeemed on 0.5: 0.05 spent, 3.95 released (a revenue under 1 is still a revenue)
    assert policy.record(d3, REDEEMED, revenue=0.5)
    used -= 3.95
    assert row().spent == pytest.approx(used) and row().redemptions == 3
    # redeemed, no revenue given: priced on the decision's order value (40): 4 spent
    assert policy.record(d4, REDEEMED)
    assert row().spent == pytest.approx(used) and row().redemptions == 4
    # no conversion: the whole reservation comes back, the fixed cost stays spent
    assert policy.record(d5, NO_CONVERSION)
    used -= 4.0
    assert row().spent == pytest.approx(used) and row().redemptions == 4
    assert row().decisions == 5
    assert not policy.record(d5, NO_CONVERSION)  # once
    assert row().spent == pytest.approx(used)
    # 5.95 is free again: one more offer (4.5) fits, a second would not
    decisions.append(give())
    assert row().spent == pytest.approx(used + 4.5) and row().decisions == 6


def _give(policy: OfferPolicy, offer_id: str, ctx: OfferContext = CART, **kw: Any) -> str:
    """A decision giving ``offer_id`` (Thompson sampling: asked until it comes up)."""
    for _ in range(500):
        choice = policy.select(ctx, **kw)
        if choice.offer.id == offer_id:
            return choice.decision_id
    raise AssertionError(f"{offer_id} was never chosen")


def test_a_budget_of_one_holds_exactly_one_decision() -> None:
    """A small budget is a budget (not "unlimited"), and one decision that costs all of
    it still fits when nothing was spent yet."""
    from services.ranking.offers.policy import BUDGET

    cat = catalog(
        [
            {
                "id": "amt",
                "kind": "amount_off",
                "cost": {"amount": 0.75, "fixed": 0.25},
                "budget": {"amount": 1, "period": "total"},
            }
        ],
        exploration={"max_share": 1.0, "prior_lift_sd": 3.0},
    )
    policy = OfferPolicy(cat, MemoryStore(), seed=5, clock=Clock())
    assert {r.offer.id: r.spent for r in policy.status()} == {"none": 0.0, "amt": 0.0}
    _give(policy, "amt")
    assert {r.offer.id: r.spent for r in policy.status()}["amt"] == pytest.approx(1.0)
    for _ in range(20):
        choice = policy.select(CART)
        assert (choice.offer.id, choice.reason) == ("none", BUDGET)


def test_decisions_and_status_use_the_time_given() -> None:
    cat = catalog(
        [
            {
                "id": "amt",
                "kind": "amount_off",
                "cost": {"amount": 5},
                "budget": {"amount": 100, "period": "day"},
            }
        ],
        exploration={"max_share": 1.0, "prior_lift_sd": 3.0},
        attribution_days=60,
    )
    policy = OfferPolicy(cat, MemoryStore(), seed=1, clock=Clock())  # the clock says T0
    later = T0 + 40 * DAY
    _give(policy, "amt", now=later)
    then = next(r for r in policy.status(now=later) if r.offer.id == "amt")
    assert then.spent == pytest.approx(5.0) and then.period_key == "2026-02-10"
    today = next(r for r in policy.status() if r.offer.id == "amt")
    assert today.spent == 0.0 and today.period_key == "2026-01-01"


@pytest.mark.parametrize("expired_learns", [True, False])
def test_recorded_outcomes_teach_the_model_and_expiry_only_when_configured(
    expired_learns: bool,
) -> None:
    cat = catalog(
        [{"id": "amt", "kind": "amount_off", "cost": {"amount": 5}}],
        exploration={"max_share": 1.0, "prior_lift_sd": 3.0},
        attribution_days=1,
        expired_is_no_conversion=expired_learns,
    )
    clock = Clock()
    policy = OfferPolicy(cat, MemoryStore(), seed=2, clock=clock)
    recorded = [policy.select(CART).decision_id for _ in range(3)]
    left = [policy.select(CART).decision_id for _ in range(4)]
    assert len(set(recorded + left)) == 7
    for d in recorded:
        assert policy.record(d, CONVERTED_WITHOUT_OFFER, revenue=50.0)
    assert policy.model.updates == 3
    clock.t += 2 * DAY
    assert policy.expire() == 4
    assert policy.model.updates == 3 + (4 if expired_learns else 0)


def test_the_posterior_is_snapshot_every_so_many_learned_outcomes() -> None:
    cat = catalog(
        [{"id": "amt", "kind": "amount_off", "cost": {"amount": 5}}],
        exploration={"max_share": 1.0, "prior_lift_sd": 3.0},
    )
    store = MemoryStore()
    policy = OfferPolicy(cat, store, seed=4, clock=Clock())
    seqs = []
    for n in range(1, 2 * SNAPSHOT_EVERY + 2):
        assert policy.record(policy.select(CART).decision_id, NO_CONVERSION)
        snap = store.state.snapshot
        seqs.append(None if snap is None else snap.seq)
        assert policy.model.updates == n
    # None until the SNAPSHOT_EVERY-th outcome, then that one until the next multiple
    assert seqs == (
        [None] * (SNAPSHOT_EVERY - 1) + [SNAPSHOT_EVERY] * SNAPSHOT_EVERY + [2 * SNAPSHOT_EVERY] * 2
    )


def test_an_open_decision_of_an_offer_since_removed_still_settles(tmp_path: Path) -> None:
    """The offer is gone from the catalog: its redemption costs what was reserved, is
    counted, and teaches the model nothing (it has no arm for it any more)."""
    cat = catalog(
        [
            {"id": "a", "kind": "amount_off", "cost": {"amount": 3}},
            {"id": "b", "kind": "amount_off", "cost": {"amount": 4}},
        ],
        exploration={"max_share": 1.0, "prior_lift_sd": 3.0},
    )
    path = tmp_path / "offers.db"
    policy = OfferPolicy(cat, SqliteStore(path), seed=0, clock=Clock())
    decision = _give(policy, "a")
    policy.close()
    without_a = catalog(
        [{"id": "b", "kind": "amount_off", "cost": {"amount": 4}}],
        exploration={"max_share": 1.0, "prior_lift_sd": 3.0},
    )
    again = OfferPolicy(without_a, SqliteStore(path), seed=0, clock=Clock())
    updates = again.model.updates
    assert again.record(decision, REDEEMED, revenue=200.0) is True
    assert again.model.updates == updates
    assert again.counts["a"].redemptions == 1
    assert sum(r.spent for r in again.budgets.values()) == pytest.approx(3.0)
    again.close()
