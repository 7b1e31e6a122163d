"""Rank's per-call fast paths (#14 session 25) against the computations they replace, on
an item table and a catalogue built like the services' (no mocks):

- the candidates' rows in the ranker's item table, mapped from their catalogue rows
  (:meth:`CatalogTable.rows_in`, kept across refreshes) instead of a second look-up by id;
- the ranker's features from those rows, and with categories left to the item table,
  equal to the features looked up by id;
- the cart co-purchase features, found by a binary search, equal to the per-candidate
  loop they replace (:func:`cart_loop` below, the code before session 25).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from mercato.v1 import common_pb2
from services.models.ranker import (
    FEATURES,
    CandidateDetails,
    ItemTable,
    RankerQuery,
    build_features,
)
from services.ranking.pipeline import merge_candidates
from services.ranking.ranker import candidate_details, request_features
from services.ranking.table import CatalogTable

CATS = [f"c{i}" for i in range(7)]
_F = {name: i for i, name in enumerate(FEATURES)}


def item_table(rng: np.random.Generator, ids: list[str]) -> ItemTable:
    """A ranker item table with categories, transitions and co-purchases."""
    n = len(ids)
    pairs = np.unique(rng.integers(0, n, (12 * n, 2)), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    indptr = np.searchsorted(pairs[:, 0], np.arange(n + 1)).astype(np.int64)
    return ItemTable(
        item_ids=ids,
        category=[CATS[int(c)] for c in rng.integers(0, len(CATS), n)],
        price=rng.uniform(1, 100, n),
        popularity=rng.uniform(0, 5, n),
        trend=rng.normal(0, 1, n),
        transitions={
            a: {b: float(rng.uniform()) for b in CATS if b != a and rng.uniform() < 0.6}
            for a in CATS
        },
        first_seen=rng.uniform(1.6e9, 1.7e9, n),
        baskets=rng.integers(1, 30, n).astype(np.float64),
        co_indptr=indptr,
        co_indices=pairs[:, 1].astype(np.int64),
        co_counts=rng.integers(1, 9, len(pairs)).astype(np.float64),
    )


def catalogue_items(
    rng: np.random.Generator, ids: list[str], no_category: float = 0.0
) -> list[common_pb2.Item]:
    return [
        common_pb2.Item(
            item_id=i,
            category="" if rng.uniform() < no_category else CATS[int(rng.integers(len(CATS)))],
            price=float(rng.uniform(1, 100)),
            stock=int(rng.integers(0, 20)),
            margin=float(rng.uniform(0, 30)),
        )
        for i in ids
    ]


def by_id(table: ItemTable, ids: list[str]) -> np.ndarray:
    """The reference: every id looked up in the ranker's table."""
    return np.array([table.row.get(i, -1) for i in ids], dtype=np.int64)


def test_candidate_rows_mapped_from_the_catalogue_equal_the_lookup_by_id() -> None:
    """Ranker rows through the catalogue's map, for candidates both tables know, only
    one knows or neither; after a refresh that adds items (the map grows, the old
    table's stays as it was) and for a second ranker version (its own map)."""
    rng = np.random.default_rng(0)
    ranker = item_table(rng, [f"i{j}" for j in range(0, 300)])  # i0..i299
    newer = item_table(rng, [f"i{j}" for j in range(150, 450)][::-1])  # another version
    catalogue = CatalogTable(catalogue_items(rng, [f"i{j}" for j in range(100, 400)]))
    asked = [f"i{j}" for j in rng.permutation(500)[:250]] + ["i5", "nowhere"]
    for tab in (ranker, newer, ranker):
        np.testing.assert_array_equal(
            catalogue.lookup(asked).rows_in(asked, tab), by_id(tab, asked)
        )
    refreshed = catalogue.updated(
        catalogue_items(rng, [f"i{j}" for j in (*range(0, 60), *range(400, 480), 120)]), 1.0
    )
    for table in (refreshed, catalogue):  # the older table answers as before
        for tab in (ranker, newer):
            got = table.lookup(asked).rows_in(asked, tab)
            np.testing.assert_array_equal(got, by_id(tab, asked))
    # items sent with the request or fetched since the refresh keep the catalogue rows
    sent = {"i7": common_pb2.Item(item_id="i7", category="c1", stock=3)}
    overlaid = refreshed.lookup(asked).overlay(asked, sent)
    np.testing.assert_array_equal(overlaid.rows_in(asked, ranker), by_id(ranker, asked))
    empty = CatalogTable()
    np.testing.assert_array_equal(empty.lookup(asked).rows_in(asked, ranker), by_id(ranker, asked))


def cart_loop(
    x: np.ndarray, q: RankerQuery, rows: np.ndarray, known: np.ndarray, table: ItemTable
) -> None:
    """The cart co-purchase columns as computed before session 25: a loop over the
    known candidates."""
    cart = list(dict.fromkeys(q.cart))
    nb = table.cart_neighbours(cart) if cart else {}
    for j in np.flatnonzero(known).tolist():
        got = nb.get(int(rows[j]))
        if got is not None:
            x[j, _F["cart_copurchase"]] = math.log1p(got[0])
            x[j, _F["cart_cooc_max"]] = got[1]


def request(
    rng: np.random.Generator, ids: list[str], n: int
) -> tuple[list[common_pb2.Candidate], RankerQuery]:
    picked = [ids[int(j)] for j in rng.choice(len(ids), n, replace=False)]
    cands = [
        common_pb2.Candidate(item_id=i, score=float(s), source=common_pb2.REASON_MODEL)
        for i, s in zip(picked, rng.normal(size=n), strict=True)
    ]
    recent = [
        (ids[int(j)], 1.69e9 + float(rng.uniform(0, 1e6))) for j in rng.integers(0, len(ids), 12)
    ]
    query = RankerQuery(
        now=1.7e9,
        surface="cart",
        recent=recent,
        cart=[ids[int(j)] for j in rng.integers(0, len(ids), int(rng.integers(0, 6)))],
        anchor=ids[int(rng.integers(len(ids)))],
        category_affinity={c: float(rng.uniform()) for c in CATS[:4]},
        mean_unit_price=40.0,
        history_len=len(recent),
    )
    return cands, query


@pytest.mark.parametrize("seed", range(6))
def test_features_from_mapped_rows_equal_the_features_by_id(seed: int) -> None:
    """The served features (rows mapped from the catalogue, cart columns by binary
    search, categories from the catalogue, some left to the ranker's table) equal the
    features with every id looked up and the cart columns from the loop."""
    rng = np.random.default_rng(seed)
    ids = [f"i{j}" for j in range(500)]
    ranker = item_table(rng, ids[:400])
    catalogue = CatalogTable(catalogue_items(rng, ids[50:450], no_category=0.2))
    cart_hits = 0
    for _ in range(25):
        cands, query = request(rng, ids, int(rng.integers(1, 120)))
        cset = merge_candidates(cands)
        items = catalogue.lookup(cset.ids)
        details = candidate_details(cset, items, ranker)
        assert details.rows is not None
        np.testing.assert_array_equal(details.rows, by_id(ranker, cset.ids))
        served = build_features(query, details, ranker)
        reference = build_features(query, replace(details, rows=None), ranker)
        np.testing.assert_array_equal(served, reference)
        # categories filled from the ranker's table where the catalogue has none
        filled = [
            c or (ranker.category[r] if r >= 0 else "")
            for c, r in zip(details.category, details.rows.tolist(), strict=True)
        ]
        np.testing.assert_array_equal(
            build_features(query, replace(details, category=filled), ranker), served
        )
        # the cart columns against the loop
        rows = by_id(ranker, cset.ids)
        looped = served.astype(np.float64)
        looped[:, [_F["cart_copurchase"], _F["cart_cooc_max"]]] = 0.0
        cart_loop(looped, query, rows, rows >= 0, ranker)
        np.testing.assert_array_equal(served, looped.astype(np.float32))
        cart_hits += int((served[:, _F["cart_copurchase"]] > 0).sum())
    assert cart_hits > 20  # the cart columns were exercised


def test_request_features_read_the_mapped_rows() -> None:
    """What the ranking service scores (``request_features``) equals the features of
    the same request with the rows looked up by id."""
    rng = np.random.default_rng(9)
    ids = [f"i{j}" for j in range(300)]
    ranker = item_table(rng, ids[:250])
    catalogue = CatalogTable(catalogue_items(rng, ids[30:]))
    cands, _ = request(rng, ids, 80)
    cset = merge_candidates(cands)
    items = catalogue.lookup(cset.ids)
    profile = common_pb2.Profile(customer_id="u", known=True)
    for i in ids[:5]:
        profile.recent_items.add(item_id=i)
    profile.cart.lines.add(item_id=ids[40], quantity=1)
    ctx = common_pb2.Context(surface=common_pb2.SURFACE_CART)
    ctx.timestamp.seconds = 1_700_000_000
    served = request_features(ranker, profile, ctx, cset, items)
    # the same request through a CandidateDetails without rows (looked up by id)
    from services.ranking.ranker import ranker_query

    details = replace(candidate_details(cset, items), rows=None)
    np.testing.assert_array_equal(
        served, build_features(ranker_query(profile, ctx), details, ranker)
    )
    assert isinstance(details, CandidateDetails)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 200, 1001])
def test_score_z_is_numpys_standard_score_to_the_bit(n: int) -> None:
    """``build_features`` computes the standard deviation from the centred scores
    itself (not ``np.std``): the same column, to the bit."""
    rng = np.random.default_rng(n)
    ranker = item_table(rng, [f"i{j}" for j in range(50)])
    for scale in (1e-3, 1.0, 1e6):
        s = rng.normal(size=n) * scale + rng.normal() * scale
        cands = CandidateDetails(
            ids=[f"i{j}" for j in range(n)],
            scores=s,
            price=np.zeros(n),
            stock=np.full(n, -1.0),
            margin=np.zeros(n),
            category=[""] * n,
        )
        std = s.std()
        want = (s - s.mean()) / std if std > 1e-12 else np.zeros(n)
        x = build_features(RankerQuery(now=1.7e9), cands, ranker)
        assert x.flags.c_contiguous and x.dtype == np.float32
        np.testing.assert_array_equal(x[:, _F["score_z"]], want.astype(np.float32))


def test_a_replaced_ranker_table_is_not_kept_alive() -> None:
    """The catalogue's row maps hold the ranker tables weakly: a version that is no
    longer served is freed even though refreshed tables carry the maps on."""
    import gc
    import weakref

    rng = np.random.default_rng(11)
    ids = [f"i{j}" for j in range(200)]
    catalogue = CatalogTable(catalogue_items(rng, ids))
    old = item_table(rng, ids)
    gone = weakref.ref(old)
    catalogue.lookup(ids).rows_in(ids, old)
    refreshed = catalogue.updated(catalogue_items(rng, ["new-1"]), 1.0)
    current = item_table(rng, ids[::-1])
    asked = [*ids, "new-1"]
    np.testing.assert_array_equal(
        refreshed.lookup(asked).rows_in(asked, current), by_id(current, asked)
    )
    del old
    gc.collect()
    assert gone() is None
