"""Retrieve's per-call fast paths (#14 session 25) on the session's trained model, in
process: the history rows looked up once per query for the user tower and
item-to-item (kept per bundle), and candidates as columns naming ids and anchors in
one C loop, against the computations they replace (the loops below, the code before
session 25) and the per-candidate messages."""

from __future__ import annotations

import numpy as np
import pytest

from mercato.v1 import common_pb2, retrieval_pb2
from services.common.candidates import candidates_of
from services.models.two_tower import TwoTowerBundle, UserQuery
from services.retrieval import merge as rm
from services.retrieval import server as rs
from tests.retrieval.conftest import Store
from training.replay import load_for_replay

pytestmark = pytest.mark.slow  # the session's two-tower is trained for it


def history_rows_loop(bundle: TwoTowerBundle, q: UserQuery) -> list[int]:
    """``TwoTowerBundle.history_rows`` before session 25."""
    seen: set[int] = set()
    out: list[int] = []
    for ids in (q.recent_item_ids, q.purchased_item_ids, q.cart_item_ids):
        for i in ids:
            r = bundle.row_of(i)
            if r is not None and r not in seen:
                seen.add(r)
                out.append(r + 1)
    r = bundle.row_of(q.anchor_item_id) if q.anchor_item_id else None
    if r is not None and r not in seen:
        out.append(r + 1)
    limit = int(bundle.config["features"].get("max_history", 0))
    return out[:limit] if limit else out


def merge_history_loop(bundle: TwoTowerBundle, q: UserQuery) -> np.ndarray:
    """``merge.history_rows`` before session 25."""
    rows = [
        r
        for i in (*q.recent_item_ids, *q.purchased_item_ids, *q.cart_item_ids)
        if (r := bundle.row_of(i)) is not None
    ]
    return np.unique(np.asarray(rows, dtype=np.int64))


def queries(ids: list[str], rng: np.random.Generator, n: int) -> list[UserQuery]:
    """Histories with repeats, unknown ids, anchors in and out of the history."""
    pool = [*ids, "unknown-1", "unknown-2"]

    def some(most: int) -> list[str]:
        return [pool[int(j)] for j in rng.integers(0, len(pool), int(rng.integers(0, most)))]

    out = []
    for _ in range(n):
        recent = some(30)
        anchor = str(rng.choice([*recent[:1], pool[int(rng.integers(len(pool)))], ""]))
        out.append(UserQuery(recent, some(5), some(4), anchor_item_id=anchor))
    return out


def test_history_rows_once_per_query_and_bundle(store: Store) -> None:
    model = load_for_replay(store.bundle_dir)
    bundle = model.bundle
    # a second vocabulary over the same files: its rows in reverse order
    other = TwoTowerBundle.load(store.bundle_dir)
    n = len(other.item_ids)
    other._row = {i: n - 1 - r for i, r in other._row.items()}
    rng = np.random.default_rng(3)
    for q in queries(bundle.item_ids, rng, 200):
        for b in (bundle, other, bundle):  # the kept rows are the asking bundle's
            assert b.history_rows(q) == history_rows_loop(b, q)
        np.testing.assert_array_equal(
            rm.history_rows(model, model.state, q), merge_history_loop(bundle, q)
        )


def test_columns_name_the_same_candidates_as_the_messages(store: Store) -> None:
    """Retrieve as columns and as messages, on histories with item-to-item anchors and
    exclusions: the same candidates, scores, sources and anchors."""
    model = load_for_replay(store.bundle_dir)
    st, merge = model.state, rm.merge_config(model)
    rng = np.random.default_rng(4)
    ids = model.bundle.item_ids
    anchored = 0
    for q in queries(ids, rng, 60):
        profile = common_pb2.Profile(customer_id="c", known=True)
        for i in q.recent_item_ids:
            profile.recent_items.add(item_id=i)
        for i in q.purchased_item_ids:
            profile.purchases.add(item_id=i, count=1)
        flt = retrieval_pb2.Filters(exclude_purchased=True, in_stock_only=True)
        flt.exclude_item_ids.extend(q.cart_item_ids)
        req = retrieval_pb2.RetrieveRequest(profile=profile, k=int(rng.integers(1, 120)))
        req.filters.CopyFrom(flt)
        messages = rs.retrieve_response(model, st, req, merge)
        req.columns = True
        columns = rs.retrieve_response(model, st, req, merge)
        assert candidates_of(columns.columns) == list(messages.candidates)
        anchored += sum(any(c.source_anchor_ids) for c in messages.candidates)
    assert anchored > 100  # the anchor column was exercised
