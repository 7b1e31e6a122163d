"""Plausible ways to break a cluster, injected one at a time into the rendered overlays:
`make k8s-validate`'s checks (tools/k8s_check.py, the same functions) catch each one,
while the unbroken overlays pass."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tools import k8s_check as kc

KUBECTL = kc.find_kubectl()
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not found (see test_manifests)")

Objs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objs]:
    return {name: kc.render(kc.OVERLAYS / name, KUBECTL) for name in ("dev", "prod")}


def find(objs: Objs, kind: str, name: str) -> dict[str, Any]:
    for o in objs:
        if o["kind"] == kind and (
            o["metadata"]["name"] == name
            or (kind == "ConfigMap" and o["metadata"]["name"].startswith(name + "-"))
        ):
            return o
    raise KeyError(f"{kind}/{name}")


def pod(objs: Objs, kind: str, name: str) -> dict[str, Any]:
    t = kc.pod_template(find(objs, kind, name))
    assert t is not None
    return t


def container(objs: Objs, kind: str, name: str, cname: str | None = None) -> dict[str, Any]:
    cs = pod(objs, kind, name)["spec"]["containers"]
    return next(c for c in cs if c["name"] == (cname or name))


def drop_egress_to(objs: Objs, policy: str, target: str) -> None:
    spec = find(objs, "NetworkPolicy", policy)["spec"]
    spec["egress"] = [
        r
        for r in spec["egress"]
        if not any(
            (p.get("podSelector") or {}).get("matchLabels", {}).get(kc.NAME_LABEL) == target
            for p in r.get("to") or []
        )
    ]


def remove(objs: Objs, kind: str, name: str) -> None:
    objs.remove(find(objs, kind, name))


def set_cm(objs: Objs, name: str, key: str, value: str | None) -> None:
    data = find(objs, "ConfigMap", name)["data"]
    if value is None:
        data.pop(key, None)
    else:
        data[key] = value


def mlflow_args(objs: Objs) -> list[str]:
    args: list[str] = container(objs, "Deployment", "mlflow")["args"]
    return args


# (name, overlay, breakage, the check that must report it)
BREAKAGES: list[tuple[str, str, Callable[[Objs], None], str]] = [
    (
        "retrieval egress to MLflow removed",
        "prod",
        lambda o: drop_egress_to(o, "retrieval", "mlflow"),
        "edges",
    ),
    (
        "ranking egress to Redis removed",
        "prod",
        lambda o: remove(o, "NetworkPolicy", "ranking-to-redis"),
        "edges",
    ),
    (
        "profile egress to Redis removed",
        "prod",
        lambda o: remove(o, "NetworkPolicy", "profile-to-redis"),
        "edges",
    ),
    (
        "MLflow egress to PostgreSQL removed",
        "prod",
        lambda o: remove(o, "NetworkPolicy", "mlflow-to-postgres"),
        "edges",
    ),
    (
        "Redis ingress no longer admits ranking",
        "prod",
        lambda o: find(o, "NetworkPolicy", "redis")["spec"]["ingress"][0]["from"].pop(1),
        "edges",
    ),
    (
        "gateway pod label the ingress policies select dropped",
        "prod",
        lambda o: pod(o, "Deployment", "gateway")["metadata"]["labels"].pop(kc.NAME_LABEL),
        "edges",
    ),
    (
        "DNS egress removed",
        "prod",
        lambda o: remove(o, "NetworkPolicy", "allow-dns-egress"),
        "edges",
    ),
    (
        "tracking URI names a Service that does not exist",
        "prod",
        lambda o: set_cm(
            o,
            "mercato-retrieval-config",
            "MERCATO_MLFLOW_TRACKING_URI",
            "http://mlflow-server:5000",
        ),
        "uris",
    ),
    (
        "tracking URI on a port the Service does not have",
        "prod",
        lambda o: set_cm(
            o, "mercato-ranking-config", "MERCATO_MLFLOW_TRACKING_URI", "http://mlflow:5001"
        ),
        "uris",
    ),
    (
        "ServiceAccount name typo",
        "prod",
        lambda o: pod(o, "Deployment", "ranking")["spec"].update(serviceAccountName="mercatoo"),
        "references",
    ),
    (
        "--serve-artifacts dropped from the MLflow server",
        "prod",
        lambda o: mlflow_args(o).remove("--serve-artifacts"),
        "mlflow",
    ),
    (
        "mlflow db upgrade init container dropped",
        "prod",
        lambda o: pod(o, "Deployment", "mlflow")["spec"].pop("initContainers"),
        "mlflow",
    ),
    (
        "MLflow at 3 replicas on its ReadWriteOnce volume",
        "prod",
        lambda o: find(o, "Deployment", "mlflow")["spec"].update(replicas=3),
        "storage",
    ),
    (
        "prod profile back on SQLite with 3 replicas",
        "prod",
        lambda o: set_cm(o, "mercato-profile-config", "MERCATO_PROFILE_BACKEND", "sqlite"),
        "storage",
    ),
    (
        "prod ranking offer state back on SQLite under its HPA",
        "prod",
        lambda o: container(o, "Deployment", "ranking")["env"].pop(0),
        "storage",
    ),
    (
        "dev ranking (SQLite on a volume) rolled out with RollingUpdate",
        "dev",
        lambda o: find(o, "Deployment", "ranking")["spec"].update(
            strategy={"type": "RollingUpdate"}
        ),
        "storage",
    ),
    (
        "Ingress without the gRPC backend protocol",
        "prod",
        lambda o: find(o, "Ingress", "gateway")["metadata"].pop("annotations"),
        "ingress",
    ),
    (
        "undefined $(VAR) in the MLflow args",
        "prod",
        lambda o: mlflow_args(o).__setitem__(
            next(i for i, a in enumerate(mlflow_args(o)) if a.startswith("--backend-store-uri")),
            "--backend-store-uri=postgresql+psycopg2://$(MLFLOW_DB_USERNAME)@postgres:5432/mlflow",
        ),
        "vars",
    ),
    (
        "gateway target not dns:/// (per-connection balancing)",
        "prod",
        lambda o: set_cm(
            o, "mercato-gateway-config", "MERCATO_GATEWAY_RANKING_TARGET", "ranking:50054"
        ),
        "ports",
    ),
    (
        "retrieval Service no longer headless",
        "prod",
        lambda o: find(o, "Service", "retrieval")["spec"].pop("clusterIP"),
        "ports",
    ),
    (
        "offer catalogue ConfigMap in a format the service refuses",
        "prod",
        lambda o: find(o, "ConfigMap", "mercato-offers")["data"].update(
            {"offers.yaml": "currency: EUR\noffers:\n  - {id: pct-5, kind: discount, percent: 5}\n"}
        ),
        "settings",
    ),
    (
        "Redis maxmemory fixed at 768mb while the pod has 4Gi",
        "prod",
        lambda o: container(o, "StatefulSet", "redis")["args"].__setitem__(
            0,
            container(o, "StatefulSet", "redis")["args"][0].replace(
                '"$((REDIS_MEMORY_LIMIT_MIB * 3 / 4))mb"', "768mb"
            ),
        ),
        "redis",
    ),
]


def test_unbroken_overlays_pass(rendered: dict[str, Objs]) -> None:
    for name, objs in rendered.items():
        assert kc.policy_findings(objs) == [], name


@pytest.mark.parametrize(
    ("overlay", "breakage", "check"),
    [pytest.param(ov, fn, check, id=name) for name, ov, fn, check in BREAKAGES],
)
def test_breakage_is_caught(
    rendered: dict[str, Objs], overlay: str, breakage: Callable[[Objs], None], check: str
) -> None:
    objs = copy.deepcopy(rendered[overlay])
    breakage(objs)
    found = [f for f in kc.policy_findings(objs) if f.check == check]
    assert found, f"no [{check}] finding; all: {kc.policy_findings(objs)}"


def test_enough_breakages() -> None:
    assert len(BREAKAGES) >= 15


def test_alert_on_a_metric_no_code_exports_is_caught() -> None:
    rules = yaml.safe_load((kc.K8S / "monitoring" / "prometheus-rules.yaml").read_text())
    exported = kc.exported_metrics()
    assert list(kc.check_alert_metrics([rules], exported)) == []
    assert "mercato_model_loaded_version" in exported
    broken = copy.deepcopy(rules)
    for group in broken["spec"]["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "MercatoModelVersionSkew":
                rule["expr"] = (
                    "count by (service, model) (count by (service, model, version) "
                    "(mercato_model_version_info)) > 1"
                )
    found = list(kc.check_alert_metrics([broken], exported))
    assert [f.obj for f in found] == ["MercatoModelVersionSkew"]
    assert "mercato_model_version_info" in found[0].message
