"""Hot swap under load: broken versions are refused while the old one serves; a good new
version takes over with zero failed calls."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import faiss
import numpy as np
import pytest

from mercato.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.models.item2item import ItemNeighbours
from services.models.two_tower import TwoTowerBundle
from tests.procs import ServiceProc, start_service
from tests.retrieval.conftest import Store

pytestmark = pytest.mark.slow  # trains a two-tower; retrieval as a process

SWAP_MODEL = "mercato-two-tower-swap"


def refused(svc: ServiceProc, version: str) -> dict[str, float]:
    """reason -> count of mercato_model_refused_total for ``version``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("mercato_model_refused_total{") and f'version="{version}"' in line:
            reason = re.search(r'reason="([^"]+)"', line)
            assert reason is not None
            out[reason.group(1)] = float(line.rsplit(" ", 1)[1])
    return out


def loaded_version_metric(svc: ServiceProc) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith("mercato_model_loaded_version{") and SWAP_MODEL in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def polls(svc: ServiceProc, alias: str = "champion", model: str = SWAP_MODEL) -> float:
    """How many registry look-ups of ``alias`` the service has done (its metric)."""
    return svc.metric("mercato_model_polls_total", model=model, alias=alias)


def wait_for(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_swap_under_load_refuses_broken_versions(store: Store, tmp_path: Path) -> None:
    b = TwoTowerBundle.load(store.bundle_dir)
    n, dim = len(b.item_ids), b.dim
    v1 = store.register(store.bundle_dir, model=SWAP_MODEL, alias="champion")

    def wrong_dim(d: Path) -> None:
        x = np.random.default_rng(0).normal(size=(n, dim + 3)).astype(np.float32)
        index = faiss.IndexFlatIP(dim + 3)
        index.add(x)
        faiss.write_index(index, str(d / "index.faiss"))

    def missing_file(d: Path) -> None:
        (d / "towers.npz").unlink()

    anchor, comp = b.item_ids[5], [b.item_ids[40], b.item_ids[41]]

    def with_complements(d: Path) -> None:
        (d / "complements.json").write_text(json.dumps({anchor: [[comp[0], 5.0], [comp[1], 3.0]]}))

    def broken_item2item(d: Path) -> None:
        # Row 0 lists itself as its best neighbour; the item2item manifest is rewritten to
        # match, so only the content check can refuse it.
        m = ItemNeighbours.load(d / "item2item", b.item_ids)
        idx = m.indices.copy()
        idx[0] = 0
        ItemNeighbours(m.item_ids, m.indptr, idx, m.scores, m.config).save(d / "item2item")

    bad_dim = store.variant("wrong-dim", wrong_dim)
    bad_i2i = store.variant("broken-item2item", broken_item2item)
    bad_file = store.variant("missing-file", missing_file)
    good = store.variant("complements", with_complements)

    svc = start_service(
        "retrieval",
        tmp_path,
        env={
            "MERCATO_RETRIEVAL_TRACKING_URI": store.uri,
            "MERCATO_RETRIEVAL_MODEL_NAME": SWAP_MODEL,
            "MERCATO_RETRIEVAL_POLL_INTERVAL_S": "0.3",
        },
        timeout=90,
    )
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(3)]
    errors: list[str] = []

    def load(i: int) -> None:
        rng = np.random.default_rng(i)
        with svc.channel() as ch:
            s = retrieval_pb2_grpc.RetrievalServiceStub(ch)
            while not stop.is_set():
                try:
                    items = [b.item_ids[r] for r in rng.choice(n, 3, replace=False)]
                    if i == 2:
                        r = s.RetrieveRelated(
                            retrieval_pb2.RetrieveRelatedRequest(
                                item_ids=items[:1], kind=common_pb2.RELATION_KIND_SIMILAR, k=10
                            ),
                            timeout=5,
                        )
                    else:
                        r = s.Retrieve(
                            retrieval_pb2.RetrieveRequest(
                                profile=common_pb2.Profile(
                                    known=True,
                                    recent_items=[common_pb2.RecentItem(item_id=x) for x in items],
                                ),
                                k=20,
                            ),
                            timeout=5,
                        )
                    assert len(r.candidates) >= 10
                    seen[i].append(r.model.version)
                except Exception as e:  # any failure counts
                    errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: all(len(s) > 5 for s in seen))

        # A version whose index has the wrong dimension: refused, v1 keeps serving.
        v_dim = store.register(bad_dim, model=SWAP_MODEL, alias="champion")
        wait_for(lambda: refused(svc, v_dim).get("invalid") == 1.0)
        # A version with a missing file: refused too.
        v_file = store.register(bad_file, model=SWAP_MODEL, alias="champion")
        wait_for(lambda: refused(svc, v_file).get("invalid") == 1.0)
        # A version whose item-to-item neighbours are broken: refused as a whole.
        v_i2i = store.register(bad_i2i, model=SWAP_MODEL, alias="champion")
        wait_for(lambda: refused(svc, v_i2i).get("invalid") == 1.0)
        done = polls(svc)
        wait_for(lambda: polls(svc) >= done + 3)  # three more look-ups: not retried, still v1
        assert refused(svc, v_i2i) == {"invalid": 1.0}
        assert refused(svc, v_dim) == {"invalid": 1.0}
        assert refused(svc, v_file) == {"invalid": 1.0}  # the alias's target: not retried
        assert loaded_version_metric(svc) == float(v1)
        assert all(s[-1] == v1 for s in seen)

        # A good version: served within a few polls, no call fails during the swap.
        v3 = store.register(good, model=SWAP_MODEL, alias="champion")
        wait_for(lambda: all(s[-1] == v3 for s in seen))
        counts = [len(s) for s in seen]  # then more calls on every client, all on v3
        wait_for(lambda: all(len(s) >= n + 10 for s, n in zip(seen, counts, strict=True)))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    try:
        assert errors == []
        for s in seen:
            # Each client sees v1 until the swap, then only v3: never a broken version.
            assert set(s) == {v1, v3}
            first = s.index(v3)
            assert set(s[:first]) == {v1} and set(s[first:]) == {v3}
        assert loaded_version_metric(svc) == float(v3)
        log = svc.log()
        assert "model version refused" in log and f'"version": "{v_dim}"' in log
        assert "towers.npz is missing" in log
        assert "item2item: an item lists itself as a neighbour" in log
        assert re.search(rf"index has \d+ x {dim + 3}, want \d+ x {dim}", log)

        with svc.channel() as ch:
            s = retrieval_pb2_grpc.RetrievalServiceStub(ch)
            r = s.RetrieveRelated(
                retrieval_pb2.RetrieveRelatedRequest(
                    item_ids=[anchor], kind=common_pb2.RELATION_KIND_COMPLEMENT, k=6
                ),
                timeout=5,
            )
            assert r.model.version == v3
            got = [(c.item_id, c.source) for c in r.candidates]
            assert got[:2] == [
                (comp[0], common_pb2.REASON_COMPLEMENT),
                (comp[1], common_pb2.REASON_COMPLEMENT),
            ]
            assert len(got) == 6 and all(src == common_pb2.REASON_SIMILAR for _, src in got[2:])
            assert anchor not in {i for i, _ in got}
            # Cross-sell filters hold: excluding a complement leaves it out.
            r = s.RetrieveRelated(
                retrieval_pb2.RetrieveRelatedRequest(
                    item_ids=[anchor],
                    kind=common_pb2.RELATION_KIND_COMPLEMENT,
                    k=6,
                    filters=retrieval_pb2.Filters(exclude_item_ids=[comp[0]]),
                ),
                timeout=5,
            )
            assert r.candidates[0].item_id == comp[1] and comp[0] not in {
                c.item_id for c in r.candidates
            }
            listed = s.ListLoadedModels(retrieval_pb2.ListLoadedModelsRequest()).models
            assert [(m.model.alias, m.model.version) for m in listed] == [("champion", v3)]
    finally:
        assert svc.terminate() == 0
