"""The production overlay as processes (mercato/cluster.py): k8s/overlays/prod rendered
with kustomize, every Deployment's command and environment started on loopback with 2
replicas of each stateless service, MLflow on PostgreSQL with proxied artifacts, Redis
for profiles and offer state, and the nightly retrain CronJob run as a process that
reaches MLflow over HTTP only.

One test, in order: a tiny shop loaded into the profile store; the nightly job exports
the events from Redis, trains both models, registers and promotes them over HTTP; every
retrieval and ranking replica loads the champions; a new version is promoted while
clients without retries call both gateways (every replica swaps, no call fails); every
replica of every service took traffic; an offer budget holds across the two ranking
replicas.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mercato.client import MercatoClient
from mercato.cluster import LocalCluster, _health, render_overlay
from mercato.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc
from training.synthetic import SyntheticConfig, write_synthetic

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHOP = SyntheticConfig(n_users=600, n_items=120, n_categories=8, days=45, seed=5)
OFFERS = {
    "offers": [
        {
            "id": "amt",
            "kind": "amount_off",
            "value": 5,
            "cost": {"amount": 5, "fixed": 0.5},
            "budget": {"amount": 40, "period": "day"},
            "eligibility": {"surfaces": ["cart"]},
        }
    ],
    "exploration": {"max_share": 1.0, "prior_lift_sd": 3.0},
}
TRAIN_ARGS = {
    "MERCATO_TRAIN_RETRIEVAL_ARGS": "--epochs 3 --dim 16 --batch-size 256 --baselines= "
    "--max-eval-users 200 --no-progress",
    "MERCATO_TRAIN_RANKER_ARGS": "--tt-epochs 2 --tt-dim 16 --epochs 4 --max-users 300 "
    "--max-eval-users 200 --no-progress",
}
MODELS = {"retrieval": "mercato-two-tower", "ranking": "mercato-ranker"}


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def loaded_version(url: str, model: str) -> int | None:
    key = ("mercato_model_loaded_version", (("alias", "champion"), ("model", model)))
    value = metrics(url).get(key)
    return None if value is None else int(value)


def calls_handled(url: str) -> float:
    return sum(v for (name, _), v in metrics(url).items() if name == "mercato_rpc_requests_total")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    objs = render_overlay(REPO / "k8s" / "overlays" / "prod")
    objs = copy.deepcopy(objs)
    for o in objs:  # a small budget, to see it hold across replicas
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("mercato-offers"):
            o["data"] = {"offers.yaml": yaml.safe_dump(OFFERS)}
    started = time.monotonic()
    c = LocalCluster(objs, tmp_path_factory.mktemp("prod-as-processes"), replicas=2)
    c.up()
    print(f"\ncluster up in {time.monotonic() - started:.0f}s")
    try:
        yield c
    finally:
        c.down()


def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out: {what}")


def every_replica_serves(c: LocalCluster, version: dict[str, int]) -> bool:
    return all(
        loaded_version(r.metrics_url, MODELS[svc]) == version[svc]
        for svc in MODELS
        for r in c.procs[svc]
    )


def test_prod_overlay_as_processes(cluster: LocalCluster, tmp_path: Path) -> None:
    c = cluster
    timings: dict[str, float] = {}
    assert {k: len(v) for k, v in c.procs.items()} == {
        "mlflow": 1,
        "profile": 2,
        "retrieval": 2,
        "ranking": 2,
        "gateway": 2,
    }

    # A tiny shop in the profile store (Redis), as `mercato load` does for a new install.
    shop = tmp_path / "shop"
    write_synthetic(SHOP, shop)
    mercato = str(Path(sys.executable).with_name("mercato"))
    load = ["load", "--data", "synthetic", "--path", str(shop), "--backend", "redis"]
    subprocess.run(
        [mercato, *load, "--redis-url", c.redis_url, "--no-progress"],
        check=True,
        capture_output=True,
    )

    # The nightly retrain CronJob as a process: export from Redis, train, register and
    # promote both models through the MLflow server (HTTP only).
    t0 = time.monotonic()
    job = c.run_job(extra_env=TRAIN_ARGS, timeout=1200)
    timings["nightly job"] = time.monotonic() - t0
    log = job.stdout.decode(errors="replace")
    assert job.returncode == 0, log[-4000:]
    _, env, _ = c.job_command()
    assert env["MERCATO_MLFLOW_TRACKING_URI"] == c.mlflow_url
    assert env["MERCATO_TRAIN_EVENTS_FROM_PROFILE"] == "true"
    stored = list((c.workdir / "mlflow" / "volumes" / "data").rglob("*.faiss")) + list(
        (c.workdir / "mlflow" / "volumes" / "data").rglob("*.pt")
    )
    assert stored, "the server's artifact store holds no bundle files"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(c.mlflow_url, c.mlflow_url)
    v1 = {
        svc: int(client.get_model_version_by_alias(name, "champion").version)
        for svc, name in MODELS.items()
    }
    t0 = time.monotonic()
    wait_for(lambda: every_replica_serves(c, v1), 120, f"every replica loads {v1}")
    timings["first load"] = time.monotonic() - t0
    for r in c.procs["retrieval"]:
        assert _health(r.target, "mercato.v1.RetrievalService") == "SERVING"

    # Load on both gateways, clients without retries; promote a new version meanwhile.
    customers = [f"c{i}" for i in range(1, 40)]
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def caller(target: str, seed: int) -> None:
        with MercatoClient(target, api_key=c.api_key, timeout=5.0, retries=0) as mc:
            i = seed
            while not stop.is_set():
                try:
                    resp = mc.recommend(customers[i % len(customers)], k=5)
                    ok = len(resp.items) > 0
                    with lock:
                        counts["ok" if ok else "failed"] += 1
                        if not ok:
                            errors.append("empty answer")
                except grpc.RpcError as exc:
                    with lock:
                        counts["failed"] += 1
                        errors.append(f"{exc.code().name}: {exc.details()}")
                i += 1

    threads = [
        threading.Thread(target=caller, args=(g.target, n), daemon=True)
        for n, g in enumerate(c.procs["gateway"] * 2)
    ]
    for t in threads:
        t.start()
    time.sleep(3.0)
    from training.registry import register_bundle

    v2 = {}
    for svc, name in MODELS.items():
        champion = client.get_model_version_by_alias(name, "champion")
        mv = register_bundle(client, champion.run_id or "", model_name=name, alias=None)
        client.set_registered_model_alias(name, "champion", mv.version)
        v2[svc] = int(mv.version)
    t0 = time.monotonic()
    wait_for(lambda: every_replica_serves(c, v2), 120, f"every replica swaps to {v2}")
    timings["swap"] = time.monotonic() - t0
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert counts["failed"] == 0, (counts, errors[:5])
    assert counts["ok"] > 50, counts

    # Every replica of every service took traffic.
    for svc in ("gateway", "profile", "retrieval", "ranking"):
        for r in c.procs[svc]:
            assert calls_handled(r.metrics_url) > 0, f"{svc}-{r.index} took no calls"
    # And one gateway alone spreads its calls per call, not per connection: each
    # downstream replica takes a fair share of what gateway-0 sends.
    downstream = ("profile", "retrieval", "ranking")
    before = {(s, r.index): calls_handled(r.metrics_url) for s in downstream for r in c.procs[s]}
    with MercatoClient(c.procs["gateway"][0].target, api_key=c.api_key, retries=0) as mc:
        for i in range(40):
            assert mc.recommend(customers[i % len(customers)], k=5).items
    for s in downstream:
        delta = [calls_handled(r.metrics_url) - before[(s, r.index)] for r in c.procs[s]]
        assert sum(delta) >= 40, (s, delta)
        assert min(delta) >= 0.25 * sum(delta), f"{s}: calls per replica {delta}"

    # An offer budget holds across the two ranking replicas (5.5 a decision, 40 a day).
    stubs = []
    for r in c.procs["ranking"]:
        ch = grpc.insecure_channel(r.target)
        stubs.append((ch, ranking_pb2_grpc.RankingServiceStub(ch)))
    try:
        given = 0
        for i in range(30):
            profile = common_pb2.Profile(customer_id=f"c{i}", known=True)
            profile.cart.lines.add(item_id="x", quantity=1, price=60.0)
            resp = stubs[i % 2][1].SelectOffer(
                ranking_pb2.SelectOfferRequest(
                    profile=profile, context=common_pb2.Context(surface=common_pb2.SURFACE_CART)
                ),
                timeout=5,
            )
            given += resp.offer.offer_id == "amt"
        assert 0 < given <= 7, given
        for _, stub in stubs:
            rows = {
                s.offer.offer_id: s
                for s in stub.ListOffers(ranking_pb2.ListOffersRequest(), timeout=5).offers
            }
            assert rows["amt"].spent <= 40 + 1e-9
            assert rows["amt"].decisions == given
    finally:
        for ch, _ in stubs:
            ch.close()
    print(f"topology timings (s): { {k: round(v) for k, v in timings.items()} }")
