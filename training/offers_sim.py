"""Simulated shoppers whose true response to every offer is known, and an evaluation of
offer policies on them.

Each simulated decision is a customer in a context (surface, cart, RFM, segment, price
band, cart idle time). Behind the observable context are latent traits the policy never
sees: a **price sensitivity** (mostly explained by price band and segment, plus
individual noise) and a **purchase intent** (surface, segment, cart, idle time, plus
noise). The true conversion probability under offer ``a`` is
``sigmoid(intent + lift_a)`` with heterogeneous lifts:

- percent / amount off: proportional to sensitivity times the discount's share of the
  cart (a fixed 5 off matters on a small cart, hardly on a big one);
- free shipping: proportional to the shipping fee's share of the cart, for everyone a
  little and for sensitive shoppers more (it helps small carts);
- bundle: helps shoppers with several items, sensitive ones more;
- cart reminder (email, idle cart): brings back a share of abandoned carts, best a few
  hours after abandonment, regardless of sensitivity;
- loyal, high-intent shoppers buy anyway: a discount to them is mostly wasted.

Policies are scored by the **true expected incremental margin** of every decision,
``p_a (m - c_a) - f_a - p_0 m`` with the true probabilities (no sampling noise in the
score); the learning policy is fed sampled outcomes, with delay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.ranking.offers.catalog import Budget, Catalog
from services.ranking.offers.features import OfferContext
from services.ranking.offers.policy import (
    CONVERTED_WITHOUT_OFFER,
    NO_CONVERSION,
    REDEEMED,
    OfferPolicy,
    eligible,
)
from services.ranking.offers.store import MemoryStore

SEGMENTS = ("new", "active", "loyal", "at_risk", "lapsed")
SEGMENT_P = (0.20, 0.35, 0.15, 0.15, 0.15)
SEGMENT_INTENT = {"new": -0.3, "active": 0.3, "loyal": 1.0, "at_risk": -0.4, "lapsed": -0.9}
SEGMENT_SENSITIVITY = {"new": 0.05, "active": 0.0, "loyal": -0.15, "at_risk": 0.1, "lapsed": 0.15}
BAND_SENSITIVITY = {"low": 0.70, "mid": 0.40, "high": 0.15, "": 0.45}
BAND_CART_MEDIAN = {"low": 22.0, "mid": 42.0, "high": 85.0, "": 40.0}
SURFACE_P = {"cart": 0.45, "checkout": 0.25, "email": 0.30}
SURFACE_INTENT = {"cart": -1.0, "checkout": 0.4, "email": -2.0}
SENSITIVITY_NOISE = 0.12  # individual price sensitivity beyond band and segment
CUSTOMER_INTENT_NOISE = 0.4  # individual purchase intent beyond segment
CONTEXT_INTENT_NOISE = 0.3  # intent of this visit beyond the observable context
SHIPPING_FEE = 4.99  # what the shopper pays below the free-shipping threshold
FREE_SHIPPING_ABOVE = 60.0


@dataclass(frozen=True)
class Customer:
    """Persistent traits of one simulated customer."""

    segment: str
    price_band: str
    recency_score: int
    frequency_score: int
    monetary_score: int
    sensitivity: float  # latent, 0..1
    intent: float  # latent logit offset


@dataclass(frozen=True)
class Case:
    """One decision: what the policy sees and what it does not."""

    ctx: OfferContext
    customer: Customer
    intent: float  # latent logit of buying with no offer


def make_customers(n: int, rng: np.random.Generator) -> list[Customer]:
    """A population of ``n`` customers."""
    out = []
    for _ in range(n):
        seg = str(rng.choice(SEGMENTS, p=SEGMENT_P))
        if seg == "new":
            band = str(rng.choice(["", "low", "mid", "high"], p=[0.5, 0.2, 0.2, 0.1]))
            r = f = m = 0
        else:
            band = str(rng.choice(["low", "mid", "high"], p=[0.35, 0.45, 0.20]))
            r = {"active": 4, "loyal": 5, "at_risk": 2, "lapsed": 1}[seg]
            r = int(np.clip(r + rng.integers(-1, 2), 1, 5))
            f = int(
                np.clip(
                    {"active": 3, "loyal": 5, "at_risk": 3, "lapsed": 2}[seg] + rng.integers(-1, 2),
                    1,
                    5,
                )
            )
            m = int(np.clip(f + {"low": -1, "mid": 0, "high": 1}[band] + rng.integers(-1, 2), 1, 5))
        sens = BAND_SENSITIVITY[band] + SEGMENT_SENSITIVITY[seg]
        sens += rng.normal(0, SENSITIVITY_NOISE)
        out.append(
            Customer(
                segment=seg,
                price_band=band,
                recency_score=r,
                frequency_score=f,
                monetary_score=m,
                sensitivity=float(np.clip(sens, 0.0, 1.0)),
                intent=float(SEGMENT_INTENT[seg] + rng.normal(0, CUSTOMER_INTENT_NOISE)),
            )
        )
    return out


def make_case(customer: Customer, rng: np.random.Generator, margin_rate: float) -> Case:
    """A context for ``customer`` (surface, cart, idle time)."""
    surface = str(rng.choice(list(SURFACE_P), p=list(SURFACE_P.values())))
    value = float(BAND_CART_MEDIAN[customer.price_band] * math.exp(rng.normal(0, 0.6)))
    value = round(max(value, 3.0), 2)
    items = 1 + int(rng.poisson(value / 40.0))
    if surface == "email":
        idle = float(
            rng.choice(
                [rng.uniform(10, 60), rng.uniform(60, 1440), rng.uniform(1440, 7 * 1440)],
                p=[0.1, 0.55, 0.35],
            )
        )
    else:
        idle = float(rng.uniform(0, 30))
    intent = customer.intent + observable_intent(surface, value, idle)
    intent += float(rng.normal(0, CONTEXT_INTENT_NOISE))
    ctx = OfferContext(
        surface=surface,
        segment=customer.segment,
        price_band=customer.price_band,
        known=True,
        recency_score=customer.recency_score,
        frequency_score=customer.frequency_score,
        monetary_score=customer.monetary_score,
        cart_value=value,
        cart_items=items,
        idle_minutes=idle,
        order_value=value,
        margin=value * margin_rate,
    )
    return Case(ctx, customer, intent)


def observable_intent(surface: str, cart_value: float, idle_minutes: float) -> float:
    """The part of the purchase logit the context explains (segment excluded)."""
    intent = SURFACE_INTENT[surface] - 0.25 * math.log(cart_value / 40.0)
    if surface == "email" and idle_minutes >= 1440:
        intent -= 0.6
    return intent


def lift(ctx: OfferContext, sensitivity: np.ndarray | float, kind: str, value: float) -> np.ndarray:
    """The true change in purchase logit an offer of ``kind``/``value`` causes (for one
    or many sensitivities)."""
    s = np.asarray(sensitivity, dtype=np.float64)
    v = ctx.cart_value
    if kind == "percent_off":
        return np.minimum(2.0 * s * (value / 10.0), 3.0)
    if kind == "amount_off":
        return np.minimum(2.0 * s * (value / v) / 0.10, 3.0)
    if kind == "free_shipping":
        if v >= FREE_SHIPPING_ABOVE:
            return np.zeros_like(s)
        share = SHIPPING_FEE / v
        return np.minimum((0.4 + 1.2 * s) * share / 0.10, 2.5)
    if kind == "bundle":
        return (0.3 + 1.0 * s) if ctx.cart_items >= 2 else np.zeros_like(s)
    if kind == "cart_recovery":
        if ctx.surface != "email":
            return np.zeros_like(s)
        return np.full_like(s, 1.1 if ctx.idle_minutes < 1440 else 0.5)
    return np.zeros_like(s)


def true_lift(case: Case, kind: str, value: float) -> float:
    """The true change in purchase logit for this case's customer."""
    return float(lift(case.ctx, case.customer.sensitivity, kind, value))


def _values(
    ctx: OfferContext, catalog: Catalog, intent: np.ndarray, sensitivity: np.ndarray
) -> np.ndarray:
    """Expected incremental margin per offer, averaged over (intent, sensitivity) draws."""
    lifts = np.stack([lift(ctx, sensitivity, o.kind, o.value) for o in catalog.offers])
    p = 1.0 / (1.0 + np.exp(-(intent[None, :] + lifts)))  # [offers, draws]
    m = ctx.margin
    redeem = np.array([o.cost.redeem_cost(ctx.order_value) for o in catalog.offers])
    fixed = np.array([o.cost.fixed for o in catalog.offers])
    values = (p * (m - redeem[:, None]) - p[0:1] * m).mean(axis=1) - fixed
    values[0] = 0.0
    return values


def true_probabilities(case: Case, catalog: Catalog) -> np.ndarray:
    """P(convert | offer) for every catalog offer (first: no offer)."""
    lifts = np.array([true_lift(case, o.kind, o.value) for o in catalog.offers])
    return 1.0 / (1.0 + np.exp(-(case.intent + lifts)))


def observable_values(
    case: Case, catalog: Catalog, rng: np.random.Generator, draws: int = 128
) -> np.ndarray:
    """Expected incremental margin per offer given only what the policy can observe:
    the latent sensitivity and intent noise integrated out (Monte Carlo)."""
    c = case.customer
    sens = BAND_SENSITIVITY[c.price_band] + SEGMENT_SENSITIVITY[c.segment]
    sens_draws = np.clip(sens + rng.normal(0, SENSITIVITY_NOISE, draws), 0.0, 1.0)
    intent = SEGMENT_INTENT[c.segment] + observable_intent(
        case.ctx.surface, case.ctx.cart_value, case.ctx.idle_minutes
    )
    noise = math.hypot(CUSTOMER_INTENT_NOISE, CONTEXT_INTENT_NOISE)
    return _values(case.ctx, catalog, intent + rng.normal(0, noise, draws), sens_draws)


def true_values(case: Case, catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    """(true expected incremental margin per offer, eligibility mask)."""
    values = _values(
        case.ctx, catalog, np.array([case.intent]), np.array([case.customer.sensitivity])
    )
    mask = np.array([i == 0 or eligible(o, case.ctx) for i, o in enumerate(catalog.offers)])
    return values, mask


def unlimited(catalog: Catalog) -> Catalog:
    """The catalog without budgets (the oracle is only defined without them)."""
    offers = [o.model_copy(update={"budget": Budget()}) for o in catalog.offers]
    settings = catalog.settings.model_copy(update={"offers": tuple(offers)})
    return Catalog(settings, tuple(offers))


@dataclass
class SimResult:
    """Per-decision true incremental margin of every policy."""

    policies: dict[str, np.ndarray]
    learned_offer_share: dict[str, float] = field(default_factory=dict)
    explored_share: float = 0.0
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(next(iter(self.policies.values())))


FixedPolicy = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], int]


def simulate(
    catalog: Catalog,
    decisions: int = 40_000,
    seed: int = 0,
    customers: int = 20_000,
    feedback_delay: int = 200,
    margin_rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Run the learned policy and the reference policies on the same stream of cases.

    Reference policies: no offer, random eligible offer, biggest discount (the eligible
    offer that costs most), max conversion (the offer with the highest true conversion
    probability: what chasing redemptions converges to), each single offer whenever
    eligible, the oracle (true best offer for each case, knowing the latent traits) and
    the observable oracle (best offer in expectation given only what the policy sees:
    the ceiling of any policy using these features).
    """
    catalog = unlimited(catalog)
    rng = np.random.default_rng(seed)
    margin_rate = margin_rate or catalog.settings.margin_rate
    people = make_customers(customers, rng)
    clock = [1_700_000_000.0]
    policy = OfferPolicy(catalog, MemoryStore(), seed=seed + 1, clock=lambda: clock[0])
    n_arms = len(catalog.offers)
    names = [
        "no_offer",
        "random",
        "biggest_discount",
        "max_conversion",
        "oracle",
        "oracle_observable",
        "learned",
    ]
    mc = np.random.default_rng(seed + 2)
    out = {k: np.zeros(decisions) for k in names}
    single = np.zeros((decisions, n_arms))
    pending: list[tuple[str, int, float]] = []
    chosen_counts = np.zeros(n_arms)
    explored = 0
    start = time.perf_counter()
    for t in range(decisions):
        case = make_case(people[int(rng.integers(len(people)))], rng, margin_rate)
        values, mask = true_values(case, catalog)
        p_true = true_probabilities(case, catalog)
        elig = np.flatnonzero(mask)
        redeem = np.array(
            [o.cost.redeem_cost(case.ctx.order_value) + o.cost.fixed for o in catalog.offers]
        )
        out["random"][t] = values[int(rng.choice(elig))]
        out["biggest_discount"][t] = values[elig[np.argmax(redeem[elig])]]
        out["max_conversion"][t] = values[elig[np.argmax(p_true[elig])]]
        out["oracle"][t] = values[elig].max()
        expected = observable_values(case, catalog, mc)
        out["oracle_observable"][t] = values[elig[np.argmax(expected[elig])]]
        single[t] = np.where(mask, values, 0.0)

        clock[0] += 30.0
        choice = policy.select(case.ctx)
        arm = policy.arms.index(choice.offer.id)
        chosen_counts[arm] += 1
        explored += choice.explored
        out["learned"][t] = values[arm]
        if choice.decision_id:
            converted = bool(rng.random() < p_true[arm])
            outcome = int(NO_CONVERSION)
            if converted:
                outcome = int(CONVERTED_WITHOUT_OFFER if arm == 0 else REDEEMED)
            pending.append((choice.decision_id, outcome, case.ctx.order_value))
        if len(pending) >= feedback_delay:
            for decision_id, result, order_value in pending:
                policy.record(decision_id, result, revenue=order_value)
            pending.clear()
        if progress and (t + 1) % 5000 == 0:
            progress(t + 1)
    for i, offer in enumerate(catalog.offers):
        if i:
            out[f"always_{offer.id}"] = single[:, i]
    total = chosen_counts.sum()
    return SimResult(
        policies=out,
        learned_offer_share={
            o.id: float(chosen_counts[i] / total) for i, o in enumerate(catalog.offers)
        },
        explored_share=explored / decisions,
        seconds=time.perf_counter() - start,
    )


def summary(result: SimResult, windows: Sequence[int] = (10_000,)) -> list[dict[str, float | str]]:
    """One row per policy: cumulative and per-decision incremental margin, share of the
    oracle, regret, and the same over the last ``windows`` decisions."""
    oracle = result.policies["oracle"]
    rows: list[dict[str, float | str]] = []
    for name, values in result.policies.items():
        row: dict[str, float | str] = {
            "policy": name,
            "incremental_margin": float(values.sum()),
            "per_decision": float(values.mean()),
            "share_of_oracle": float(values.sum() / oracle.sum()),
            "regret": float(oracle.sum() - values.sum()),
        }
        for w in windows:
            w = min(w, result.n)
            row[f"last{w}_share_of_oracle"] = float(values[-w:].sum() / oracle[-w:].sum())
        rows.append(row)
    rows.sort(key=lambda r: -float(r["incremental_margin"]))
    return rows


def plot(result: SimResult, path: str, title: str = "Offer policies") -> None:
    """Cumulative incremental margin and a moving share of the oracle (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    x = np.arange(1, result.n + 1)
    keep = [
        "oracle",
        "oracle_observable",
        "learned",
        "no_offer",
        "random",
        "biggest_discount",
        "max_conversion",
    ]
    best_single = max(
        (k for k in result.policies if k.startswith("always_")),
        key=lambda k: result.policies[k].sum(),
        default=None,
    )
    if best_single:
        keep.append(best_single)
    keep = [k for k in keep if k in result.policies]
    colors = {name: f"C{i}" for i, name in enumerate(keep)}
    styles = {"oracle_observable": "--"}
    for name in keep:
        values = result.policies[name]
        lw = 2.5 if name in ("learned", "oracle") else 1.2
        ax1.plot(
            x, np.cumsum(values), label=name, lw=lw, color=colors[name], ls=styles.get(name, "-")
        )
    ax1.set_xlabel("decisions")
    ax1.set_ylabel("cumulative expected incremental margin vs no offer")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    win = max(result.n // 20, 100)
    kernel = np.ones(win) / win
    oracle = np.convolve(result.policies["oracle"], kernel, mode="valid")
    for name in keep:
        if name == "oracle":
            continue
        ratio = np.convolve(result.policies[name], kernel, mode="valid") / oracle
        ax2.plot(
            x[win - 1 :],
            ratio,
            label=name,
            lw=2.5 if name == "learned" else 1.0,
            color=colors[name],
            ls=styles.get(name, "-"),
        )
    ax2.axhline(0.85, color="gray", ls=":", lw=1, label="85 % of oracle")
    ax2.set_ylim(-1.0, 1.1)
    ax2.set_xlabel("decisions")
    ax2.set_ylabel(f"share of oracle (moving window {win})")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
