"""Retrieve merges the two-tower and item-to-item candidates; every candidate keeps every
source's score (checked against brute force over the bundle's own files)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mercato.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.common.candidates import candidates_of, columns_of
from services.models.item2item import ItemNeighbours
from services.models.two_tower import TwoTowerBundle, UserQuery
from services.retrieval.merge import MergeConfig, fuse, retrieve_merged
from services.retrieval.model import RowFilter
from tests.procs import ServiceProc, start_service
from tests.retrieval.conftest import Store, brute_force
from tests.retrieval.test_service import home_query
from training.replay import load_for_replay

pytestmark = pytest.mark.slow  # trains a two-tower; retrieval as a process

MODEL, I2I = common_pb2.REASON_MODEL, common_pb2.REASON_SIMILAR


def test_fuse_keeps_every_source_and_ranks_by_reciprocal_rank() -> None:
    rows, fused, source = fuse(
        {MODEL: (np.array([5, 1, 2]), 1.0), I2I: (np.array([2, 9]), 2.0)}, 10
    )
    want = {5: 1 / 61, 1: 1 / 62, 2: 1 / 63 + 2 / 61, 9: 2 / 62}
    assert sorted(rows.tolist()) == sorted(want)
    np.testing.assert_allclose(fused, [want[r] for r in rows.tolist()], rtol=1e-6)
    assert rows.tolist() == sorted(want, key=lambda r: -want[r])
    assert dict(zip(rows.tolist(), source.tolist(), strict=True)) == {
        5: MODEL,
        1: MODEL,
        2: I2I,  # 2/61 from item-to-item beats 1/63 from the two-tower
        9: I2I,
    }
    assert fuse({MODEL: (np.array([5, 1, 2]), 1.0)}, 2)[0].tolist() == [5, 1]
    assert fuse({MODEL: (np.array([5]), 0.0)}, 2)[0].tolist() == []


@pytest.fixture(scope="module")
def svc(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    proc = start_service(
        "retrieval",
        tmp_path_factory.mktemp("retrieval-merge"),
        env={"MERCATO_RETRIEVAL_TRACKING_URI": store.uri},
        timeout=90,
    )
    yield proc
    assert proc.terminate() == 0


def dense_w(d: Path) -> np.ndarray:
    with np.load(d / "item2item" / "neighbours.npz") as z:
        n = len(z["indptr"]) - 1
        return sp.csr_matrix((z["scores"], z["indices"], z["indptr"]), shape=(n, n)).toarray()


def rrf(lists: list[tuple[list[int], float]], k: int) -> list[int]:
    score: dict[int, float] = {}
    for ranked, weight in lists:
        if weight <= 0:
            continue  # a source switched off proposes nothing
        for rank, r in enumerate(ranked, start=1):
            score[r] = score.get(r, 0.0) + weight / (60 + rank)
    return sorted(score, key=lambda r: (-score[r], r))[:k]


def test_retrieve_merges_both_sources_with_their_scores(svc: ServiceProc, store: Store) -> None:
    b = TwoTowerBundle.load(store.bundle_dir)
    emb = np.load(store.bundle_dir / "item_embeddings.npy")
    w = dense_w(store.bundle_dir)
    assert ItemNeighbours.load(store.bundle_dir / "item2item", b.item_ids).nnz == (w > 0).sum()
    # The fusion weights the training run chose on validation, shipped with the bundle.
    shipped = json.loads((store.bundle_dir / "item2item" / "config.json").read_text())["merge"]
    w_tt, w_i2i = shipped["two_tower_weight"], shipped["item2item_weight"]
    rng = np.random.default_rng(3)
    k = 20
    both = 0
    with svc.channel() as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        for _ in range(5):
            recent = rng.choice(len(emb), 6, replace=False).tolist()
            bought, cart = recent[:2], recent[2:3]
            req, q = home_query(b, recent, bought, cart, k)
            resp = stub.Retrieve(req, timeout=5)
            tt_top, tt_scores = brute_force(emb, q, k)
            hist = sorted(set(recent))
            i2i_scores = w[hist].sum(0)  # scores history items too (other items point to them)
            proposable = i2i_scores.copy()
            proposable[hist] = 0  # but never proposes them
            i2i_top = sorted(np.flatnonzero(proposable > 0), key=lambda r: (-proposable[r], r))[:k]
            i2i_list = [int(r) for r in i2i_top]
            want = rrf([(tt_top, w_tt if i2i_list else 1.0), (i2i_list, w_i2i)], k)
            want += [r for r in tt_top if r not in want][: k - len(want)]  # the fill
            got = [b.row_of(c.item_id) for c in resp.candidates]
            assert got == want
            for c, r in zip(resp.candidates, got, strict=True):
                assert r is not None
                scores = dict(zip(c.sources, c.source_scores, strict=True))
                assert len(c.sources) == len(c.source_scores) == len(c.source_anchor_ids)
                # The two-tower scores every candidate; item-to-item those reached.
                assert scores[MODEL] == pytest.approx(tt_scores[r], abs=1e-5)
                if i2i_scores[r] != 0:
                    assert scores[I2I] == pytest.approx(i2i_scores[r], rel=1e-5)
                    anchor = c.source_anchor_ids[list(c.sources).index(I2I)]
                    best = max(hist, key=lambda j: (w[j, r], -j))
                    assert anchor == b.item_ids[best]
                else:
                    assert I2I not in scores
                proposed_by = (MODEL if r in tt_top else None, I2I if r in i2i_top else None)
                assert c.source in proposed_by
                both += len(c.sources) == 2
            assert [c.score for c in resp.candidates] == sorted(
                (c.score for c in resp.candidates), reverse=True
            )
    assert both > 0  # the merge was exercised with both sources present


def test_columns_carry_the_same_candidates(svc: ServiceProc, store: Store) -> None:
    """Retrieve with ``columns`` answers the same candidates, scores, sources and anchors
    as the per-candidate messages (the gateway's form against the straightforward one)."""
    b = TwoTowerBundle.load(store.bundle_dir)
    rng = np.random.default_rng(5)
    anchored = 0
    with svc.channel() as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        for _ in range(8):
            recent = rng.choice(len(b.item_ids), 6, replace=False).tolist()
            req, _ = home_query(b, recent, recent[:2], recent[2:3], 40)
            req.filters.exclude_purchased = True
            req.filters.in_stock_only = True
            messages = stub.Retrieve(req, timeout=5)
            req.columns = True
            cols = stub.Retrieve(req, timeout=5)
            assert not cols.candidates and len(cols.columns.item_ids) == len(messages.candidates)
            assert candidates_of(cols.columns) == list(messages.candidates)
            assert candidates_of(columns_of(messages.candidates)) == list(messages.candidates)
            anchored += sum(any(c.source_anchor_ids) for c in messages.candidates)
    assert anchored > 0  # item-to-item anchors were compared too


def test_related_similar_uses_item_to_item_too(svc: ServiceProc, store: Store) -> None:
    b = TwoTowerBundle.load(store.bundle_dir)
    w = dense_w(store.bundle_dir)
    anchor = int(np.argmax((w > 0).sum(1)))  # an item with neighbours
    with svc.channel() as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        resp = stub.RetrieveRelated(
            retrieval_pb2.RetrieveRelatedRequest(
                item_ids=[b.item_ids[anchor]], kind=common_pb2.RELATION_KIND_SIMILAR, k=10
            ),
            timeout=5,
        )
    got = [b.row_of(c.item_id) for c in resp.candidates]
    neighbours = sorted(np.flatnonzero(w[anchor] > 0), key=lambda r: (-w[anchor, r], r))
    assert neighbours[0] in got  # the best neighbour is always in a 10-item fused list
    assert anchor not in got and len(got) == 10


def test_two_tower_answers_alone_or_fills_when_item_to_item_falls_short(store: Store) -> None:
    """Even with the two-tower weighted 0 (item-to-item alone chosen on validation), a
    customer without known items gets the two-tower's list, and a short item-to-item list
    is filled with the two-tower's next items."""
    model = load_for_replay(store.bundle_dir)
    st = model.state
    emb = np.load(store.bundle_dir / "item_embeddings.npy")
    w = dense_w(store.bundle_dir)
    off = MergeConfig(two_tower_weight=0.0, item2item_weight=1.0)
    cold = UserQuery([], [], [], surface="home")
    q = model.encode_user(cold)
    got = retrieve_merged(model, st, cold, 15, RowFilter(), off)
    want, scores = brute_force(emb, q, 15)
    assert got.rows.tolist() == want  # the two-tower alone, with its own scores
    np.testing.assert_allclose(got.fused, scores[want], atol=1e-5)
    # One history item with few neighbours: its neighbours first, then the two-tower.
    item = int(np.argmin(np.where((w > 0).sum(1) > 0, (w > 0).sum(1), 10**9)))
    n_nb = int((w[item] > 0).sum())
    k = n_nb + 5
    query = UserQuery([b_id(store, item)], [], [], surface="home")
    flt = RowFilter(exclude=np.array([item]))
    got = retrieve_merged(model, st, query, k, flt, off)
    neighbours = sorted(np.flatnonzero(w[item] > 0), key=lambda r: (-w[item, r], r))
    assert got.rows[:n_nb].tolist() == neighbours
    tt, _ = brute_force(emb, model.encode_user(query), k + n_nb + 1)
    rest = [r for r in tt if r not in neighbours and r != item][: k - n_nb]
    assert got.rows[n_nb:].tolist() == rest
    assert np.all(np.diff(got.fused) < 0)
    assert got.source[n_nb:].tolist() == [MODEL] * len(rest)


def b_id(store: Store, row: int) -> str:
    return TwoTowerBundle.load(store.bundle_dir).item_ids[row]
