"""The learned offer policy beats fixed policies on the simulated population."""

from __future__ import annotations

import numpy as np

from services.ranking.offers.catalog import Catalog
from services.ranking.settings import DEFAULT_OFFERS_FILE
from training.offers_sim import make_case, make_customers, simulate, summary, true_values


def test_the_simulated_world_is_heterogeneous() -> None:
    # The best offer depends on the shopper: no single offer is best for most of them.
    catalog = Catalog.load(DEFAULT_OFFERS_FILE)
    rng = np.random.default_rng(0)
    people = make_customers(500, rng)
    best = []
    for person in people:
        values, mask = true_values(make_case(person, rng, 0.35), catalog)
        best.append(int(np.argmax(np.where(mask, values, -np.inf))))
    shares = np.bincount(best, minlength=len(catalog.offers)) / len(best)
    assert shares.max() < 0.6
    assert (shares > 0.03).sum() >= 4


def test_learned_policy_beats_every_fixed_policy() -> None:
    result = simulate(Catalog.load(DEFAULT_OFFERS_FILE), decisions=3000, seed=0, customers=3000)
    rows = {r["policy"]: r for r in summary(result, (1000,))}
    learned = rows["learned"]["incremental_margin"]
    fixed = [name for name in rows if name not in ("learned", "oracle", "oracle_observable")]
    assert {"no_offer", "random", "biggest_discount", "max_conversion"} <= set(fixed)
    for name in fixed:
        assert learned > rows[name]["incremental_margin"], name
    assert rows["oracle"]["incremental_margin"] >= rows["oracle_observable"]["incremental_margin"]
    # It keeps improving: the last third is closer to the oracle than the whole run.
    assert rows["learned"]["last1000_share_of_oracle"] > rows["learned"]["share_of_oracle"]
