"""The retrieval service as a real process over a real MLflow store and a trained model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mercato.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.models.two_tower import ItemFeatures, TwoTowerBundle, UserQuery
from tests.procs import ServiceProc, start_service
from tests.retrieval.conftest import MODEL, Store, brute_force
from tests.retrieval.test_hot_swap import polls

pytestmark = pytest.mark.slow  # trains a two-tower; retrieval as a process


@pytest.fixture(scope="module")
def svc(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    proc = start_service(
        "retrieval",
        tmp_path_factory.mktemp("retrieval-svc"),
        env={
            "MERCATO_RETRIEVAL_TRACKING_URI": store.uri,
            "MERCATO_RETRIEVAL_POLL_INTERVAL_S": "0.3",
            # The two-tower alone, checked against brute force over its embeddings here;
            # the merge with item-to-item has its own service in test_merge.py.
            "MERCATO_RETRIEVAL_ITEM2ITEM_WEIGHT": "0",
        },
        timeout=90,
    )
    yield proc
    assert proc.terminate() == 0


@pytest.fixture(scope="module")
def stub(svc: ServiceProc) -> Iterator[retrieval_pb2_grpc.RetrievalServiceStub]:
    with svc.channel() as ch:
        yield retrieval_pb2_grpc.RetrievalServiceStub(ch)


@pytest.fixture(scope="module")
def bundle(store: Store) -> TwoTowerBundle:
    return TwoTowerBundle.load(store.bundle_dir)


def profile_of(
    b: TwoTowerBundle, recent: list[int], bought: list[int], cart: list[int]
) -> common_pb2.Profile:
    ids = b.item_ids
    return common_pb2.Profile(
        customer_id="c1",
        known=True,
        recent_items=[common_pb2.RecentItem(item_id=ids[r]) for r in recent],
        purchases=[common_pb2.PurchasedItem(item_id=ids[r], count=1) for r in bought],
        cart=common_pb2.Cart(lines=[common_pb2.CartLine(item_id=ids[r], quantity=1) for r in cart]),
        segment="active",
        country="GB",
        price_band="mid",
    )


def query_of(
    b: TwoTowerBundle, recent: list[int], bought: list[int], cart: list[int], **kw: str
) -> np.ndarray:
    ids = b.item_ids
    q = UserQuery(
        recent_item_ids=[ids[r] for r in recent],
        purchased_item_ids=[ids[r] for r in bought],
        cart_item_ids=[ids[r] for r in cart],
        **kw,  # type: ignore[arg-type]
    )
    return b.encode_users([q])[0]


def home_query(
    b: TwoTowerBundle, recent: list[int], bought: list[int], cart: list[int], k: int
) -> tuple[retrieval_pb2.RetrieveRequest, np.ndarray]:
    """A home-page Retrieve request for this history and the user vector it must give."""
    req = retrieval_pb2.RetrieveRequest(
        profile=profile_of(b, recent, bought, cart),
        context=common_pb2.Context(surface=common_pb2.SURFACE_HOME),
        k=k,
    )
    attrs = {"surface": "home", "country": "GB", "segment": "active", "price_band": "mid"}
    return req, query_of(b, recent, bought, cart, **attrs)


def assert_same_ranking(
    got: list[str], got_scores: list[float], want: list[int], scores: np.ndarray, b: TwoTowerBundle
) -> None:
    """Same items with the same scores; order may differ only inside float ties."""
    assert len(got) == len(want)
    np.testing.assert_allclose(got_scores, scores[want], rtol=0, atol=1e-5)
    rows = [b.row_of(i) for i in got]
    np.testing.assert_allclose(scores[rows], got_scores, rtol=0, atol=1e-5)
    if len(set(np.round(scores[want], 5))) == len(want):
        assert rows == want


def test_retrieve_equals_brute_force_over_exported_embeddings(
    stub: retrieval_pb2_grpc.RetrievalServiceStub, bundle: TwoTowerBundle, store: Store
) -> None:
    emb = np.load(store.bundle_dir / "item_embeddings.npy")
    rng = np.random.default_rng(1)
    for _ in range(4):
        recent = rng.choice(len(emb), 5, replace=False).tolist()
        bought, cart = recent[:2], recent[2:3]
        req, q = home_query(bundle, recent, bought, cart, 25)
        resp = stub.Retrieve(req, timeout=5)
        want, scores = brute_force(emb, q, 25)
        assert_same_ranking(
            [c.item_id for c in resp.candidates],
            [c.score for c in resp.candidates],
            want,
            scores,
            bundle,
        )
        assert all(c.source == common_pb2.REASON_MODEL for c in resp.candidates)
        assert (resp.model.name, resp.model.version, resp.model.alias) == (
            MODEL,
            store.version,
            "champion",
        )

    # A cold-start customer: encoded from the context (product page, cart) and country.
    anchor = bundle.item_ids[7]
    resp = stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            profile=common_pb2.Profile(customer_id="new", known=False),
            context=common_pb2.Context(
                surface=common_pb2.SURFACE_PRODUCT,
                anchor_item_id=anchor,
                country="GB",
                cart_item_ids=[bundle.item_ids[9]],
            ),
            k=10,
        ),
        timeout=5,
    )
    q = bundle.encode_users(
        [
            UserQuery(
                [], [], [bundle.item_ids[9]], anchor_item_id=anchor, surface="product", country="GB"
            )
        ]
    )[0]
    want, scores = brute_force(emb, q, 10)
    assert_same_ranking(
        [c.item_id for c in resp.candidates],
        [c.score for c in resp.candidates],
        want,
        scores,
        bundle,
    )
    # The other watched alias serves too (the same version is loaded once).
    resp = stub.Retrieve(retrieval_pb2.RetrieveRequest(k=3, model_alias="challenger"), timeout=5)
    assert resp.model.alias == "challenger" and len(resp.candidates) == 3


def test_filters_hold(
    stub: retrieval_pb2_grpc.RetrievalServiceStub, bundle: TwoTowerBundle, store: Store
) -> None:
    emb = np.load(store.bundle_dir / "item_embeddings.npy")
    n = len(emb)
    recent, bought, cart = [3, 4, 5], [6, 7], [8]
    q = query_of(
        bundle,
        recent,
        bought,
        cart,
        surface="home",
        country="GB",
        segment="active",
        price_band="mid",
    )
    top, scores = brute_force(emb, q, 30)
    excluded = top[:5]
    ctx_cart = top[5]
    cats = sorted({bundle.item_category[r] for r in top[:3]})
    req = retrieval_pb2.RetrieveRequest(
        profile=profile_of(bundle, recent, [*bought, top[6]], [*cart, top[7]]),
        context=common_pb2.Context(
            surface=common_pb2.SURFACE_HOME, cart_item_ids=[bundle.item_ids[ctx_cart]]
        ),
        k=40,
        filters=retrieval_pb2.Filters(
            exclude_item_ids=[bundle.item_ids[r] for r in excluded] + ["never-heard-of"],
            exclude_purchased=True,
            exclude_in_cart=True,
            categories=cats,
        ),
    )
    resp = stub.Retrieve(req, timeout=5)
    # The request's cart (context) overrides the stored one for the user tower.
    q = query_of(
        bundle,
        recent,
        [*bought, top[6]],
        [ctx_cart],
        surface="home",
        country="GB",
        segment="active",
        price_band="mid",
    )
    out = set(excluded) | set(bought) | {top[6]} | set(cart) | {top[7], ctx_cart}
    allowed = np.array([(r not in out) and bundle.item_category[r] in cats for r in range(n)])
    want, scores = brute_force(emb, q, 40, allowed)
    assert_same_ranking(
        [c.item_id for c in resp.candidates],
        [c.score for c in resp.candidates],
        want,
        scores,
        bundle,
    )
    assert len(resp.candidates) == min(40, int(allowed.sum()))
    got = {bundle.row_of(c.item_id) for c in resp.candidates}
    assert not got & out
    assert {bundle.item_category[r] for r in got} <= set(cats)  # type: ignore[index]

    # Out of stock (as IndexItems reported it) is left out with in_stock_only, only then.
    plain = stub.Retrieve(retrieval_pb2.RetrieveRequest(profile=req.profile, k=10), timeout=5)
    first = [c.item_id for c in plain.candidates][:3]
    items = [
        common_pb2.Item(
            item_id=i,
            category=bundle.item_category[bundle.row_of(i)],
            price=float(bundle.item_price[bundle.row_of(i)]),
            stock=0,
        )
        for i in first
    ]  # type: ignore[index]
    r = stub.IndexItems(retrieval_pb2.IndexItemsRequest(items=items), timeout=10)
    assert (r.added, r.updated) == (0, 3)
    still = stub.Retrieve(retrieval_pb2.RetrieveRequest(profile=req.profile, k=10), timeout=5)
    assert [c.item_id for c in still.candidates][:3] == first
    stocked = stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            profile=req.profile, k=10, filters=retrieval_pb2.Filters(in_stock_only=True)
        ),
        timeout=5,
    )
    ids = [c.item_id for c in stocked.candidates]
    assert len(ids) == 10 and not set(ids) & set(first)
    assert ids[:7] == [c.item_id for c in plain.candidates][3:]
    # Back in stock.
    for it in items:
        it.stock = 5
    stub.IndexItems(retrieval_pb2.IndexItemsRequest(items=items), timeout=10)
    again = stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            profile=req.profile, k=10, filters=retrieval_pb2.Filters(in_stock_only=True)
        ),
        timeout=5,
    )
    assert [c.item_id for c in again.candidates] == [c.item_id for c in plain.candidates]


def test_related_items(
    stub: retrieval_pb2_grpc.RetrievalServiceStub, bundle: TwoTowerBundle, store: Store
) -> None:
    emb = np.load(store.bundle_dir / "item_embeddings.npy")
    n = len(emb)
    anchor = 11
    resp = stub.RetrieveRelated(
        retrieval_pb2.RetrieveRelatedRequest(
            item_ids=[bundle.item_ids[anchor], "unknown-sku"],
            kind=common_pb2.RELATION_KIND_SIMILAR,
            k=15,
        ),
        timeout=5,
    )
    assert list(resp.unknown_item_ids) == ["unknown-sku"]
    allowed = np.arange(n) != anchor
    # The anchor's item vector asked as a user vector: [v, 1] (scores include the bias).
    as_user = emb[anchor].copy()
    as_user[-1] = 1.0
    want, scores = brute_force(emb, as_user, 15, allowed)
    assert_same_ranking(
        [c.item_id for c in resp.candidates],
        [c.score for c in resp.candidates],
        want,
        scores,
        bundle,
    )
    assert all(c.source == common_pb2.REASON_SIMILAR for c in resp.candidates)

    # Up-sell: same category, higher price, by similarity.
    cat, price = bundle.item_category[anchor], float(bundle.item_price[anchor])
    resp = stub.RetrieveRelated(
        retrieval_pb2.RetrieveRelatedRequest(
            item_ids=[bundle.item_ids[anchor]], kind=common_pb2.RELATION_KIND_UPSELL, k=5
        ),
        timeout=5,
    )
    ok = np.array(
        [bundle.item_category[r] == cat and bundle.item_price[r] > price for r in range(n)]
    )
    want, scores = brute_force(emb, as_user, 5, ok)
    assert_same_ranking(
        [c.item_id for c in resp.candidates],
        [c.score for c in resp.candidates],
        want,
        scores,
        bundle,
    )
    assert all(c.source == common_pb2.REASON_UPSELL for c in resp.candidates)

    # Complements: this bundle has no co-occurrence pairs, so similar items fill in.
    comp = stub.RetrieveRelated(
        retrieval_pb2.RetrieveRelatedRequest(
            item_ids=[bundle.item_ids[anchor]], kind=common_pb2.RELATION_KIND_COMPLEMENT, k=15
        ),
        timeout=5,
    )
    if not bundle.complement_pairs.get(bundle.item_ids[anchor]):
        sim = stub.RetrieveRelated(
            retrieval_pb2.RetrieveRelatedRequest(
                item_ids=[bundle.item_ids[anchor]], kind=common_pb2.RELATION_KIND_SIMILAR, k=15
            ),
            timeout=5,
        )
        assert [c.item_id for c in comp.candidates] == [c.item_id for c in sim.candidates]


def test_index_items_makes_new_items_retrievable(
    stub: retrieval_pb2_grpc.RetrievalServiceStub, bundle: TwoTowerBundle
) -> None:
    before = {
        m.model.alias: m.item_count
        for m in stub.ListLoadedModels(retrieval_pb2.ListLoadedModelsRequest()).models
    }
    n = len(bundle.item_ids)
    assert before == {"champion": n, "challenger": n}
    cat = bundle.item_category[20]
    new = [
        common_pb2.Item(
            item_id=f"NEW-{i}",
            category=cat,
            price=10.0 + i,
            stock=3,
            attributes={"brand": "brand_1_5"},
        )
        for i in range(3)
    ] + [common_pb2.Item(item_id="NEW-OTHER", category="brand-new-category", price=5.0, stock=1)]
    r = stub.IndexItems(retrieval_pb2.IndexItemsRequest(items=new), timeout=10)
    assert (r.added, r.updated) == (4, 0)
    assert {m.alias for m in r.models} == {"champion", "challenger"}
    listed = stub.ListLoadedModels(retrieval_pb2.ListLoadedModelsRequest()).models
    assert {m.model.alias: m.item_count for m in listed} == {"champion": n + 4, "challenger": n + 4}
    assert all(m.index_type == "Flat" and m.dimension == bundle.dim for m in listed)

    # Embedded by the item tower from features, exactly as the bundle does it.
    feats = [ItemFeatures(i.item_id, i.category, i.price, dict(i.attributes)) for i in new]
    vec = bundle.encode_items(feats)
    sim = stub.RetrieveRelated(
        retrieval_pb2.RetrieveRelatedRequest(
            item_ids=["NEW-0"], kind=common_pb2.RELATION_KIND_SIMILAR, k=5
        ),
        timeout=5,
    )
    all_emb = np.vstack([bundle.item_embeddings, vec])
    ids = [*bundle.item_ids, *(i.item_id for i in new)]
    as_user = vec[0].copy()
    as_user[-1] = 1.0  # an item asked as a user vector: [v, 1]
    want, scores = brute_force(all_emb, as_user, 5, np.array([i != "NEW-0" for i in ids]))
    assert [c.item_id for c in sim.candidates] == [ids[w] for w in want]
    np.testing.assert_allclose([c.score for c in sim.candidates], scores[want], atol=1e-5)
    # A category only the new item has: the filter finds it.
    only = stub.Retrieve(
        retrieval_pb2.RetrieveRequest(
            k=5, filters=retrieval_pb2.Filters(categories=["brand-new-category"])
        ),
        timeout=5,
    )
    assert [c.item_id for c in only.candidates] == ["NEW-OTHER"]
    # Up-sell from a catalog item reaches the new, pricier items of its category.
    cheap = min(
        (r for r in range(n) if bundle.item_category[r] == cat), key=lambda r: bundle.item_price[r]
    )
    if bundle.item_price[cheap] < 10.0:
        up = stub.RetrieveRelated(
            retrieval_pb2.RetrieveRelatedRequest(
                item_ids=[bundle.item_ids[cheap]], kind=common_pb2.RELATION_KIND_UPSELL, k=1000
            ),
            timeout=5,
        )
        assert {"NEW-0", "NEW-1", "NEW-2"} <= {c.item_id for c in up.candidates}
    # Sending them again updates instead of adding.
    r = stub.IndexItems(
        retrieval_pb2.IndexItemsRequest(items=new[:2], model_alias="champion"), timeout=10
    )
    assert (r.added, r.updated) == (0, 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.Retrieve(retrieval_pb2.RetrieveRequest(k=0), timeout=5),
        lambda s: s.Retrieve(retrieval_pb2.RetrieveRequest(k=1001), timeout=5),
        lambda s: s.Retrieve(
            retrieval_pb2.RetrieveRequest(k=5, model_alias="bad alias!"), timeout=5
        ),
        lambda s: s.Retrieve(
            retrieval_pb2.RetrieveRequest(
                k=5, filters=retrieval_pb2.Filters(exclude_item_ids=[""])
            ),
            timeout=5,
        ),
        lambda s: s.RetrieveRelated(
            retrieval_pb2.RetrieveRelatedRequest(
                item_ids=["x"], kind=common_pb2.RELATION_KIND_UNSPECIFIED, k=5
            ),
            timeout=5,
        ),
        lambda s: s.RetrieveRelated(
            retrieval_pb2.RetrieveRelatedRequest(kind=common_pb2.RELATION_KIND_SIMILAR, k=5),
            timeout=5,
        ),
        lambda s: s.RetrieveRelated(
            retrieval_pb2.RetrieveRelatedRequest(
                item_ids=["x"], kind=common_pb2.RELATION_KIND_SIMILAR, k=-1
            ),
            timeout=5,
        ),
        lambda s: s.IndexItems(retrieval_pb2.IndexItemsRequest(), timeout=5),
        lambda s: s.IndexItems(
            retrieval_pb2.IndexItemsRequest(items=[common_pb2.Item(item_id="a", price=-1)]),
            timeout=5,
        ),
        lambda s: s.IndexItems(
            retrieval_pb2.IndexItemsRequest(
                items=[common_pb2.Item(item_id="a"), common_pb2.Item(item_id="a")]
            ),
            timeout=5,
        ),
    ],
    ids=[
        "k0",
        "k1001",
        "alias",
        "empty-exclude",
        "kind",
        "no-anchors",
        "k-neg",
        "no-items",
        "price",
        "dup",
    ],
)
def test_bad_input_is_invalid_argument(
    stub: retrieval_pb2_grpc.RetrievalServiceStub, call: object
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call(stub)  # type: ignore[operator]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details()


def test_unknown_anchor_items_are_not_found(stub: retrieval_pb2_grpc.RetrievalServiceStub) -> None:
    """An anchor the model does not know is a missing entity, not a malformed request
    (retrieval.proto); one known anchor among unknown ones still answers."""
    with pytest.raises(grpc.RpcError) as e:
        stub.RetrieveRelated(
            retrieval_pb2.RetrieveRelatedRequest(
                item_ids=["nope", "nada"], kind=common_pb2.RELATION_KIND_SIMILAR, k=5
            ),
            timeout=5,
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    assert "nope" in e.value.details()


def test_not_serving_until_a_model_is_promoted_then_per_request_alias(
    store: Store, tmp_path: Path
) -> None:
    name = "mercato-two-tower-empty"
    svc = start_service(
        "retrieval",
        tmp_path,
        env={
            "MERCATO_RETRIEVAL_TRACKING_URI": store.uri,
            "MERCATO_RETRIEVAL_MODEL_NAME": name,
            "MERCATO_RETRIEVAL_POLL_INTERVAL_S": "0.3",
        },
        wait="NOT_SERVING",
        timeout=90,
    )
    try:
        with svc.channel() as ch:
            s = retrieval_pb2_grpc.RetrievalServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                s.Retrieve(retrieval_pb2.RetrieveRequest(k=5), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "mercato train retrieval" in e.value.details()
            assert "mercato promote" in e.value.details()
            assert svc.health("liveness") == "SERVING"
            assert (
                s.ListLoadedModels(retrieval_pb2.ListLoadedModelsRequest(), timeout=5).models == []
            )
            # Registered as challenger only: still NOT_SERVING for the default alias.
            v = store.register(store.bundle_dir, model=name, alias="challenger")
            done = polls(svc, "champion", name)
            deadline = time.monotonic() + 30
            while polls(svc, "champion", name) < done + 5:  # five more look-ups
                assert time.monotonic() < deadline, "the watcher stopped polling"
                time.sleep(0.05)
            assert svc.health() == "NOT_SERVING"
            store.set_alias("champion", v, model=name)
            svc.wait_status("SERVING", timeout=20)
            r = s.Retrieve(retrieval_pb2.RetrieveRequest(k=5), timeout=5)
            assert r.model.version == v and len(r.candidates) == 5
            # A per-request alias the replica does not watch yet: UNAVAILABLE, then loaded.
            store.set_alias("exp-b", v, model=name)
            with pytest.raises(grpc.RpcError) as e:
                s.Retrieve(retrieval_pb2.RetrieveRequest(k=5, model_alias="exp-b"), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            deadline = time.monotonic() + 20
            while True:
                try:
                    r = s.Retrieve(
                        retrieval_pb2.RetrieveRequest(k=5, model_alias="exp-b"), timeout=5
                    )
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert (r.model.alias, r.model.version) == ("exp-b", v)
    finally:
        assert svc.terminate() == 0
