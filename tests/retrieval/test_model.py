"""The serving model in-process: NumPy towers equal to torch, index choice, copy-on-write
item adds."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from services.models.registry import ModelVersionInfo
from services.models.two_tower import ItemFeatures, TwoTowerBundle, UserQuery, history_bags
from services.retrieval.model import IndexConfig, RowFilter, load_retrieval_model
from tests.retrieval.conftest import Store

pytestmark = pytest.mark.slow  # trains a two-tower (session fixture)

INFO = ModelVersionInfo("m", "1", "r", "champion")


def test_numpy_towers_equal_torch(store: Store) -> None:
    """Serving computes both towers in NumPy from towers.npz; here (not in every pod)
    they are checked equal to the torch network rebuilt from the same arrays."""
    import torch

    b = TwoTowerBundle.load(store.bundle_dir)
    assert b._net is None  # loading a bundle builds no torch module
    rng = np.random.default_rng(0)
    ids, cats = b.item_ids, [c for c in b.vocab["category"] if c]
    queries = []
    for i in range(40):
        pick = [ids[int(r)] for r in rng.choice(len(ids), 40, replace=False)]
        queries.append(
            UserQuery(
                recent_item_ids=[*pick[: int(rng.integers(0, 30))], "nope"],
                purchased_item_ids=pick[30 : 30 + int(rng.integers(0, 10))],
                cart_item_ids=pick[: int(rng.integers(0, 3))],
                anchor_item_id=pick[-1] if i % 2 else "",
                surface=["", "home", "product", "cart", "bogus"][i % 5],
                country=b.vocab["country"][i % len(b.vocab["country"])],
                segment=b.vocab["segment"][i % len(b.vocab["segment"])],
                price_band=["", "low", "mid", "high"][i % 4],
                category_affinity={cats[i % len(cats)]: 0.7, "unknown-cat": 0.3}
                if i % 3 == 0
                else {},
            )
        )
    net = b.net
    flat, offsets = history_bags([b.history_rows(q) for q in queries])
    ctx = torch.tensor([b.context_ids(q) for q in queries], dtype=torch.long)
    with torch.no_grad():
        want = net.encode_user(torch.from_numpy(flat), torch.from_numpy(offsets), *ctx.unbind(1))
    np.testing.assert_allclose(b.encode_users(queries), want.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(b.encode_user(queries[3]), want.numpy()[3], atol=1e-5, rtol=0)

    # Item tower: known ids, an unknown id (features only), no attributes, many.
    feats = [
        ItemFeatures(ids[i], b.item_category[i], float(b.item_price[i]), {"brand": f"b{i % 7}"})
        for i in range(30)
    ]
    feats += [
        ItemFeatures("NEW-1", cats[0], 12.5, {"brand": "x", "colour": "red", "size": "M"}),
        ItemFeatures("NEW-2", "unknown-cat", 0.0, {}),
        ItemFeatures(ids[3], "", -1.0, {f"k{j}": str(j) for j in range(20)}),
    ]
    i_ids, i_cats, i_prices, i_attrs = (torch.from_numpy(a) for a in b.item_feature_arrays(feats))
    with torch.no_grad():
        want_items = net.encode_item(i_ids, i_cats, i_prices, i_attrs).numpy()
    np.testing.assert_allclose(b.encode_items(feats), want_items, atol=1e-5, rtol=0)


def test_index_type_by_catalog_size_and_mmap(store: Store, tmp_path: Path) -> None:
    d = tmp_path / "v1" / "bundle"
    shutil.copytree(store.bundle_dir, d)
    flat = load_retrieval_model(d, INFO, IndexConfig())
    assert flat.index_type == "Flat"
    # Above the threshold the service builds HNSW from the embeddings once and caches it.
    hnsw = load_retrieval_model(
        d,
        INFO,
        IndexConfig(
            exact_max_items=10, ann="hnsw", hnsw_m=8, hnsw_ef_search=64, ann_must_beat_exact=False
        ),
    )
    assert isinstance(hnsw.index, faiss.IndexHNSW) and hnsw.index_type.startswith("HNSW8")
    cached = tmp_path / "v1" / "serving-HNSW8-efc80.faiss"
    assert cached.is_file()
    maps = Path("/proc/self/maps").read_text()
    assert str(cached) in maps  # memory-mapped, not copied
    b = flat.bundle
    q = flat.encode_user(UserQuery(b.item_ids[:5], [], []))
    exact = flat.search(flat.state, q, 50, RowFilter())
    approx = hnsw.search(hnsw.state, q, 50, RowFilter())
    assert len(set(exact.rows.tolist()) & set(approx.rows.tolist())) >= 45
    # IVF (the default above the threshold): every list probed = exact results.
    ivf = load_retrieval_model(
        d,
        INFO,
        IndexConfig(exact_max_items=10, ivf_nlist=8, ivf_nprobe=8, ann_must_beat_exact=False),
    )
    assert isinstance(ivf.index, faiss.IndexIVF) and ivf.index_type == "IVF8,Flat,nprobe=8"
    assert str(tmp_path / "v1" / "serving-IVF8.faiss") in Path("/proc/self/maps").read_text()
    res = ivf.search(ivf.state, q, 50, RowFilter())
    np.testing.assert_allclose(res.scores, exact.scores, atol=1e-5)
    if exact.scores[-1] - 1e-5 > flat.search(flat.state, q, 51, RowFilter()).scores[-1]:
        assert set(res.rows.tolist()) == set(exact.rows.tolist())  # no tie at the boundary


def test_index_items_is_copy_on_write(store: Store, tmp_path: Path) -> None:
    m = load_retrieval_model(store.bundle_dir, INFO, IndexConfig(max_new_items=3))
    before = m.state
    q = m.encode_user(UserQuery([], [], []))
    old = m.search(before, q, 10, RowFilter())
    cat = m.bundle.item_category[0]
    added, updated = m.index_items(
        [ItemFeatures("X1", cat, 9.0), ItemFeatures(m.bundle.item_ids[0], "moved", 1.0)], [2, 0]
    )
    assert (added, updated) == (1, 1)
    after = m.state
    assert after is not before and before.n_total == after.n_total - 1
    # The old snapshot still answers exactly as before (a search in flight is unaffected).
    again = m.search(before, q, 10, RowFilter())
    assert again.rows.tolist() == old.rows.tolist()
    assert before.item_stock[0] == -1 and after.item_stock[0] == 0
    assert after.category_code["moved"] == after.item_cat[0]
    row = m.row_of(after, "X1")
    assert row == before.n_total
    vec = m.bundle.encode_items([ItemFeatures("X1", cat, 9.0)])[0]
    # Scores are u.v + b: the new item is found with exactly its model score.
    every = m.search(after, q, after.n_total, RowFilter())
    assert row in every.rows.tolist()
    got = float(every.scores[every.rows.tolist().index(row)])
    assert got == pytest.approx(float(q @ vec), rel=1e-5, abs=1e-5)
    try:
        m.index_items([ItemFeatures(f"Y{i}", cat, 1.0) for i in range(3)], [1, 1, 1])
    except OverflowError as e:
        assert "retrain" in str(e)
    else:
        raise AssertionError("the add limit was not enforced")
    assert m.state is after
