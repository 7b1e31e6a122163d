"""Validate Mercato's Kubernetes manifests: render, check the schemas, then our own rules.

For every overlay under ``k8s/overlays`` (each folder with a kustomization that is not a
Component), this renders the manifests with ``kubectl kustomize``, validates every object
with kubernetes-validate in strict mode against a pinned Kubernetes version, and runs the
checks a schema cannot do: probes, limits and security context on every container, thread
settings that follow the CPU limit, Service selectors and ports that reach a workload, ports
that agree with ``services.common.settings.DEFAULT_PORTS``, pinned images, NetworkPolicies
that let only the right clients in, and no secret values anywhere.

    python -m tools.k8s_check                      # every overlay (what `make k8s-validate` runs)
    python -m tools.k8s_check k8s/overlays/dev     # one overlay
    python -m tools.k8s_check --list               # the overlays it would check

The tests (tests/k8s) import the same functions.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The health-check name liveness probes ask for, and the services' ports.
from services.common.server import LIVENESS_SERVICE
from services.common.settings import DEFAULT_PORTS

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = K8S / "overlays"
OPERATIONS_GUIDE = REPO / "docs" / "operations.md"

# The Kubernetes version the manifests are validated against (kubernetes-validate ships
# the schemas; 1.32 is also the kubectl here). Raise it deliberately, with the clusters.
KUBERNETES_VERSION = "1.32.0"


Obj = dict[str, Any]

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
SERVING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
NAME_LABEL = "app.kubernetes.io/name"
PART_OF_LABEL = "app.kubernetes.io/part-of"
COMPONENT_LABEL = "app.kubernetes.io/component"

# Who may open a connection to whom (by app.kubernetes.io/name; "training" stands for
# every pod of component training). Metrics ports are for Prometheus and checked apart.
ALLOWED_CLIENTS: dict[str, frozenset[str]] = {
    # ranking reads the catalogue (ListItems) into its item table.
    "profile": frozenset({"gateway", "console", "ranking"}),
    "retrieval": frozenset({"gateway"}),
    "ranking": frozenset({"gateway"}),
    "mlflow": frozenset({"retrieval", "ranking", "training", "console"}),
    # events-export: the console's event log export (components/profile-redis).
    "redis": frozenset({"profile", "ranking", "training", "events-export"}),
    "postgres": frozenset({"mlflow"}),
}

SECRET_PATTERNS = (
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}\b"),
)
SECRET_ENV_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# Settings that name where a secret lives, not the secret.
SECRET_LOCATION_SUFFIXES = ("_FILE", "_PATH", "_DIR")


def _looks_like_credential(name: str, value: object) -> bool:
    return (
        bool(SECRET_ENV_NAME.search(name))
        and not name.upper().endswith(SECRET_LOCATION_SUFFIXES)
        and bool(str(value).strip())
    )


@dataclass(frozen=True)
class Finding:
    """One broken rule: which check, which object, what is wrong."""

    check: str
    obj: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.obj}: {self.message}"


class RenderError(RuntimeError):
    """kubectl kustomize failed."""


# --------------------------------------------------------------------------- rendering


def find_kubectl() -> str | None:
    """kubectl from $KUBECTL, the PATH, or beside this Python (a pip-installed kubectl)."""
    explicit = os.environ.get("KUBECTL")
    if explicit:
        return explicit
    found = shutil.which("kubectl")
    if found:
        return found
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else None


def _kustomization_file(folder: Path) -> Path | None:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (folder / name).is_file():
            return folder / name
    return None


def discover_overlays(root: Path = OVERLAYS) -> list[Path]:
    """Every folder under ``root`` holding a kustomization that is not a Component."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_dir():
            continue
        kfile = _kustomization_file(path)
        if kfile is None:
            continue
        doc = yaml.safe_load(kfile.read_text()) or {}
        if doc.get("kind") != "Component":
            found.append(path)
    return found


def render(path: Path, kubectl: str | None = None) -> list[Obj]:
    """The objects ``kubectl kustomize path`` renders."""
    kubectl = kubectl or find_kubectl()
    if kubectl is None:
        raise RenderError("kubectl not found (set KUBECTL or install kubectl)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


# ------------------------------------------------------------------------- schema check


def schema_findings(
    objs: Iterable[Obj], version: str = KUBERNETES_VERSION, strict: bool = True
) -> list[Finding]:
    """kubernetes-validate on every object; an object without a schema is a finding too."""
    from kubernetes_validate import utils as kv

    findings = []
    for obj in objs:
        try:
            kv.validate(obj, version, strict)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(top)"
            findings.append(Finding("schema", ref(obj), f"{where}: {exc.message}"))
        except kv.SchemaNotFoundError as exc:
            findings.append(Finding("schema", ref(obj), exc.message))
        except kv.VersionNotSupportedError as exc:
            raise SystemExit(
                f"kubernetes-validate does not support Kubernetes {exc.version}"
            ) from None
    return findings


# ------------------------------------------------------------------------------ helpers


def ref(obj: Mapping[str, Any]) -> str:
    """Kind/name of an object."""
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def pod_template(obj: Mapping[str, Any]) -> Obj | None:
    """The pod template of a workload (None for other kinds)."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    if kind in WORKLOAD_KINDS:
        return spec.get("template")
    return None


def workloads(objs: Iterable[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) pairs."""
    for obj in objs:
        template = pod_template(obj)
        if template is not None:
            yield obj, template


def pod_labels(template: Mapping[str, Any]) -> dict[str, str]:
    return dict((template.get("metadata") or {}).get("labels") or {})


def all_containers(pod_spec: Mapping[str, Any]) -> list[Obj]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector (or a plain map, as Services use) selects ``labels``."""
    if selector is None:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        match_labels = selector.get("matchLabels") or {}
        expressions = selector.get("matchExpressions") or []
    else:
        match_labels, expressions = selector, []
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in expressions:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def cpu_cores(quantity: str | int | float) -> float:
    """A CPU quantity in cores: "500m" -> 0.5, "2" -> 2.0."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str | int) -> float:
    text = str(quantity)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def configmaps_by_name(objs: Iterable[Obj]) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o.get("kind") == "ConfigMap"}


def effective_env(container: Mapping[str, Any], configmaps: Mapping[str, Obj]) -> dict[str, Any]:
    """The container's environment: envFrom ConfigMaps first, then env (which wins).

    Values are strings, or the ``valueFrom`` mapping for values resolved at run time.
    """
    env: dict[str, Any] = {}
    for source in container.get("envFrom") or []:
        cm_ref = source.get("configMapRef")
        if cm_ref and cm_ref.get("name") in configmaps:
            prefix = source.get("prefix", "")
            data = configmaps[cm_ref["name"]].get("data") or {}
            env.update({prefix + k: str(v) for k, v in data.items()})
    for var in container.get("env") or []:
        env[var["name"]] = var["valueFrom"] if "valueFrom" in var else str(var.get("value", ""))
    return env


def mercato_service(obj: Mapping[str, Any]) -> str | None:
    """Which of the four services a Deployment runs (by its name label), if any."""
    if obj.get("kind") != "Deployment":
        return None
    name = (obj.get("metadata", {}).get("labels") or {}).get(NAME_LABEL)
    return name if name in DEFAULT_PORTS else None


def client_name(labels: Mapping[str, str]) -> str:
    """The name a pod has in ALLOWED_CLIENTS."""
    if labels.get(COMPONENT_LABEL) == "training":
        return "training"
    return labels.get(NAME_LABEL, "?")


def image_reference(image: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = image.rsplit(":", 1)
        return repo, tag, digest
    return image, None, digest


def script_text(container: Mapping[str, Any]) -> str:
    """command + args as one text, shell comments dropped."""
    words = [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]
    lines = "\n".join(words).splitlines()
    return "\n".join(line for line in lines if not line.strip().startswith("#"))


# ------------------------------------------------------------------------------ checks


def check_labels(objs: list[Obj]) -> Iterator[Finding]:
    for obj, template in workloads(objs):
        labels = pod_labels(template)
        for key in (NAME_LABEL, PART_OF_LABEL):
            if key not in labels:
                yield Finding("labels", ref(obj), f"pod template has no {key} label")


def check_images(objs: list[Obj]) -> Iterator[Finding]:
    for obj, template in workloads(objs):
        for c in all_containers(template.get("spec") or {}):
            image = str(c.get("image", ""))
            _, tag, digest = image_reference(image)
            if not image:
                yield Finding("images", ref(obj), f"container {c['name']} has no image")
            elif digest is None and tag is None:
                yield Finding("images", ref(obj), f"container {c['name']}: untagged image {image}")
            elif digest is None and tag == "latest":
                yield Finding("images", ref(obj), f"container {c['name']}: `latest` tag {image}")


def check_resources(objs: list[Obj]) -> Iterator[Finding]:
    for obj, template in workloads(objs):
        for c in all_containers(template.get("spec") or {}):
            res = c.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            where = f"container {c['name']}"
            missing = [f"requests.{r}" for r in ("cpu", "memory") if r not in req]
            missing += [f"limits.{r}" for r in ("cpu", "memory") if r not in lim]
            if missing:
                yield Finding("resources", ref(obj), f"{where} lacks {', '.join(missing)}")
                continue
            if cpu_cores(lim["cpu"]) < cpu_cores(req["cpu"]):
                yield Finding("resources", ref(obj), f"{where}: cpu limit below request")
            if memory_bytes(lim["memory"]) < memory_bytes(req["memory"]):
                yield Finding("resources", ref(obj), f"{where}: memory limit below request")


def check_security(objs: list[Obj]) -> Iterator[Finding]:
    for obj, template in workloads(objs):
        spec = template.get("spec") or {}
        pod_sc = spec.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                yield Finding("security", ref(obj), f"{flag} is on")
        if spec.get("automountServiceAccountToken") is not False:
            yield Finding("security", ref(obj), "automountServiceAccountToken is not false")
        for c in all_containers(spec):
            sc = c.get("securityContext") or {}
            where = f"container {c['name']}"
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                yield Finding("security", ref(obj), f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                yield Finding("security", ref(obj), f"{where}: runs as uid 0")
            seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                yield Finding(
                    "security", ref(obj), f"{where}: seccompProfile is not RuntimeDefault"
                )
            if sc.get("allowPrivilegeEscalation") is not False:
                yield Finding("security", ref(obj), f"{where}: allowPrivilegeEscalation not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                yield Finding("security", ref(obj), f"{where}: readOnlyRootFilesystem not true")
            if sc.get("privileged"):
                yield Finding("security", ref(obj), f"{where}: privileged")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                yield Finding("security", ref(obj), f"{where}: capabilities do not drop ALL")
            if (sc.get("capabilities") or {}).get("add"):
                yield Finding("security", ref(obj), f"{where}: adds capabilities")


def check_probes(objs: list[Obj]) -> Iterator[Finding]:
    """Serving containers have both probes; the four services use native gRPC probes on
    their port: liveness on the liveness name, readiness on their own service name."""
    for obj, template in workloads(objs):
        if obj["kind"] not in SERVING_KINDS:
            continue
        service = mercato_service(obj)
        for c in (template.get("spec") or {}).get("containers") or []:
            where = f"container {c['name']}"
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    yield Finding("probes", ref(obj), f"{where} has no {probe}")
            if service is None or c["name"] != service:
                continue
            grpc_port = DEFAULT_PORTS[service][0]
            expected = {
                "livenessProbe": LIVENESS_SERVICE,
                "startupProbe": LIVENESS_SERVICE,
                "readinessProbe": f"mercato.v1.{service.capitalize()}Service",
            }
            for probe, want in expected.items():
                if probe not in c:
                    continue
                grpc = c[probe].get("grpc")
                if grpc is None:
                    yield Finding("probes", ref(obj), f"{where}: {probe} is not a gRPC probe")
                    continue
                if grpc.get("port") != grpc_port:
                    yield Finding(
                        "probes",
                        ref(obj),
                        f"{where}: {probe} port {grpc.get('port')}, the service is on {grpc_port}",
                    )
                if grpc.get("service", "") != want:
                    yield Finding(
                        "probes",
                        ref(obj),
                        f"{where}: {probe} asks for {grpc.get('service', '')!r}, want {want!r}",
                    )


def _thread_value_ok(value: Any, container: Mapping[str, Any]) -> bool:
    limit = ((container.get("resources") or {}).get("limits") or {}).get("cpu")
    if isinstance(value, Mapping):
        field = value.get("resourceFieldRef")
        if not field:
            return False
        return (
            field.get("resource") == "limits.cpu"
            and str(field.get("divisor", "1")) == "1"
            and field.get("containerName", container["name"]) == container["name"]
            and limit is not None
        )
    try:
        return limit is not None and int(value) == math.ceil(cpu_cores(limit))
    except ValueError:
        return False


def check_threads(objs: list[Obj]) -> Iterator[Finding]:
    """Thread pools follow the CPU limit: from the limit itself (resourceFieldRef) or a
    literal equal to it rounded up. Services and training containers must set them."""
    configmaps = configmaps_by_name(objs)
    for obj, template in workloads(objs):
        service = mercato_service(obj)
        training = pod_labels(template).get(COMPONENT_LABEL) == "training"
        for c in (template.get("spec") or {}).get("containers") or []:
            env = effective_env(c, configmaps)
            required: list[str] = []
            if service is not None and c["name"] == service:
                required = [f"MERCATO_{service.upper()}_THREADS", *THREAD_VARS]
            elif training:
                required = list(THREAD_VARS)
            for var in required:
                if var not in env:
                    yield Finding("threads", ref(obj), f"container {c['name']} does not set {var}")
            for var, value in env.items():
                is_thread_var = var in THREAD_VARS or re.fullmatch(r"MERCATO_[A-Z]+_THREADS", var)
                if is_thread_var and not _thread_value_ok(value, c):
                    yield Finding(
                        "threads",
                        ref(obj),
                        f"container {c['name']}: {var} does not follow the CPU limit",
                    )


def _container_port(template: Mapping[str, Any], target: Any) -> int | None:
    """The container port a Service targetPort (name or number) lands on, if any."""
    for c in (template.get("spec") or {}).get("containers") or []:
        for port in c.get("ports") or []:
            if isinstance(target, str) and port.get("name") == target:
                return int(port["containerPort"])
            if isinstance(target, int) and port.get("containerPort") == target:
                return target
    return None


def _namespace(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace", ""))


def check_services(objs: list[Obj]) -> Iterator[Finding]:
    """Every Service selects pods of a workload, and each of its ports reaches a port."""
    pods = list(workloads(objs))
    for svc in (o for o in objs if o.get("kind") == "Service"):
        selector = (svc.get("spec") or {}).get("selector")
        if not selector:
            yield Finding("services", ref(svc), "has no selector")
            continue
        matched = [
            t
            for w, t in pods
            if _namespace(w) == _namespace(svc) and selector_matches(selector, pod_labels(t))
        ]
        if not matched:
            yield Finding("services", ref(svc), f"selector {selector} matches no workload")
            continue
        for port in (svc.get("spec") or {}).get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            if not any(_container_port(t, target) is not None for t in matched):
                yield Finding(
                    "services",
                    ref(svc),
                    f"port {port.get('name', port.get('port'))}: targetPort {target!r} "
                    "is no container port of the selected pods",
                )


def check_ingresses(objs: list[Obj]) -> Iterator[Finding]:
    """Ingress backends exist, and a gRPC backend is declared to the controller as gRPC
    (ingress-nginx annotation), or it would speak HTTP/1 to the gateway."""
    services = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "Service"}
    for ing in (o for o in objs if o.get("kind") == "Ingress"):
        annotations = (ing.get("metadata") or {}).get("annotations") or {}
        protocol = str(annotations.get("nginx.ingress.kubernetes.io/backend-protocol", ""))
        for rule in (ing.get("spec") or {}).get("rules") or []:
            for path in (rule.get("http") or {}).get("paths") or []:
                backend = (path.get("backend") or {}).get("service") or {}
                svc = services.get(backend.get("name", ""))
                if svc is None:
                    yield Finding("services", ref(ing), f"backend {backend.get('name')} missing")
                    continue
                want = backend.get("port") or {}
                ports = [
                    p
                    for p in (svc.get("spec") or {}).get("ports") or []
                    if p.get("name") == want.get("name") or p.get("port") == want.get("number")
                ]
                if not ports:
                    yield Finding("services", ref(ing), f"backend port {want} not on {ref(svc)}")
                grpc = any(p.get("appProtocol") == "grpc" or p.get("name") == "grpc" for p in ports)
                if grpc and protocol.upper() not in ("GRPC", "GRPCS"):
                    yield Finding(
                        "ingress",
                        ref(ing),
                        f"backend {ref(svc)} speaks gRPC; "
                        "set nginx.ingress.kubernetes.io/backend-protocol: GRPC",
                    )


def check_ports(objs: list[Obj]) -> Iterator[Finding]:
    """The four services listen where services.common.settings.DEFAULT_PORTS says, on all
    interfaces, and their Services and the gateway's targets agree."""
    configmaps = configmaps_by_name(objs)
    services = [o for o in objs if o.get("kind") == "Service"]
    for obj, template in workloads(objs):
        service = mercato_service(obj)
        if service is None:
            continue
        grpc_port, metrics_port = DEFAULT_PORTS[service]
        prefix = f"MERCATO_{service.upper()}_"
        containers = {c["name"]: c for c in (template.get("spec") or {}).get("containers") or []}
        c = containers.get(service)
        if c is None:
            yield Finding("ports", ref(obj), f"no container named {service}")
            continue
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        for name, want in (("grpc", grpc_port), ("metrics", metrics_port)):
            if ports.get(name) != want:
                yield Finding(
                    "ports",
                    ref(obj),
                    f"container port {name} is {ports.get(name)}, DEFAULT_PORTS says {want}",
                )
        env = effective_env(c, configmaps)
        for var, want in ((f"{prefix}PORT", grpc_port), (f"{prefix}METRICS_PORT", metrics_port)):
            if var in env and str(env[var]) != str(want):
                yield Finding("ports", ref(obj), f"{var}={env[var]}, the container port is {want}")
        for var in (f"{prefix}HOST", f"{prefix}METRICS_HOST"):
            if env.get(var) not in ("0.0.0.0", "::", "[::]"):
                yield Finding(
                    "ports",
                    ref(obj),
                    f"{var}={env.get(var)!r}: must bind all interfaces (probes use the pod IP)",
                )
        for svc in services:
            if not selector_matches((svc.get("spec") or {}).get("selector"), pod_labels(template)):
                continue
            for port in (svc.get("spec") or {}).get("ports") or []:
                expected = {"grpc": grpc_port, "metrics": metrics_port}.get(port.get("name", ""))
                if expected is not None and port.get("port") != expected:
                    yield Finding(
                        "ports",
                        ref(svc),
                        f"port {port['name']} is {port.get('port')}, DEFAULT_PORTS says {expected}",
                    )
        if service == "gateway":
            yield from _check_gateway_targets(obj, env, services)


def _check_gateway_targets(
    gateway: Obj, env: Mapping[str, Any], services: list[Obj]
) -> Iterator[Finding]:
    by_name = {s["metadata"]["name"]: s for s in services}
    for target in ("profile", "retrieval", "ranking"):
        var = f"MERCATO_GATEWAY_{target.upper()}_TARGET"
        value = env.get(var)
        if not isinstance(value, str) or not value.startswith("dns:///") or ":" not in value[7:]:
            yield Finding(
                "ports",
                ref(gateway),
                f"{var}={value!r}: not dns:///SERVICE:PORT (per-call balancing needs every "
                "pod address from a headless Service)",
            )
            continue
        host, _, port = value[len("dns:///") :].rpartition(":")
        svc = by_name.get(host.split(".")[0])
        want = DEFAULT_PORTS[target][0]
        if svc is None:
            yield Finding("ports", ref(gateway), f"{var}={value}: no Service {host.split('.')[0]}")
        elif (svc.get("spec") or {}).get("clusterIP") != "None":
            yield Finding(
                "ports",
                ref(gateway),
                f"{var}={value}: Service {ref(svc)} is not headless (clusterIP: None), so "
                "the gateway would pin each connection to one pod",
            )
        elif port != str(want) or not any(
            p.get("port") == want for p in (svc.get("spec") or {}).get("ports") or []
        ):
            yield Finding("ports", ref(gateway), f"{var}={value}: {target} listens on {want}")


def check_graceful_shutdown(objs: list[Obj]) -> Iterator[Finding]:
    """terminationGracePeriodSeconds covers the preStop pause plus the drain."""
    configmaps = configmaps_by_name(objs)
    for obj, template in workloads(objs):
        service = mercato_service(obj)
        if service is None:
            continue
        spec = template.get("spec") or {}
        budget = float(spec.get("terminationGracePeriodSeconds", 30))
        for c in spec.get("containers") or []:
            if c["name"] != service:
                continue
            env = effective_env(c, configmaps)
            grace = float(env.get(f"MERCATO_{service.upper()}_GRACE_SECONDS", 10.0))
            pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
            pause = float(pre_stop.get("seconds", 0))
            if budget <= grace + pause:
                yield Finding(
                    "shutdown",
                    ref(obj),
                    f"terminationGracePeriodSeconds {budget:g} <= preStop {pause:g}s + "
                    f"grace {grace:g}s: in-flight calls would be killed",
                )


def check_autoscaling(objs: list[Obj]) -> Iterator[Finding]:
    """HPAs target a workload that has CPU requests and leaves replicas to them; every
    service has a PodDisruptionBudget."""
    by_ref = {(o.get("kind"), o["metadata"]["name"]): o for o in objs}
    for hpa in (o for o in objs if o.get("kind") == "HorizontalPodAutoscaler"):
        spec = hpa.get("spec") or {}
        target_ref = spec.get("scaleTargetRef") or {}
        target = by_ref.get((target_ref.get("kind"), target_ref.get("name")))
        if target is None:
            yield Finding("autoscaling", ref(hpa), f"target {target_ref} is not in the manifests")
            continue
        if "replicas" in (target.get("spec") or {}):
            yield Finding(
                "autoscaling",
                ref(target),
                "sets spec.replicas although an HPA scales it (every apply would reset it)",
            )
        if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
            yield Finding("autoscaling", ref(hpa), "minReplicas > maxReplicas")
        template = pod_template(target) or {}
        for c in (template.get("spec") or {}).get("containers") or []:
            if "cpu" not in ((c.get("resources") or {}).get("requests") or {}):
                yield Finding("autoscaling", ref(hpa), f"container {c['name']} has no cpu request")
    pdbs = [o for o in objs if o.get("kind") == "PodDisruptionBudget"]
    for pdb in pdbs:
        selector = (pdb.get("spec") or {}).get("selector")
        if not any(selector_matches(selector, pod_labels(t)) for _, t in workloads(objs)):
            yield Finding("autoscaling", ref(pdb), "selector matches no workload")
    for obj, template in workloads(objs):
        if mercato_service(obj) and not any(
            selector_matches((p.get("spec") or {}).get("selector"), pod_labels(template))
            for p in pdbs
        ):
            yield Finding("autoscaling", ref(obj), "has no PodDisruptionBudget")


def _policies_selecting(policies: list[Obj], labels: Mapping[str, str]) -> list[Obj]:
    return [
        p
        for p in policies
        if (p.get("spec") or {}).get("podSelector") and p["spec"]["podSelector"] != {}
        if selector_matches(p["spec"]["podSelector"], labels)
    ]


def check_network_policies(objs: list[Obj]) -> Iterator[Finding]:
    """Default deny, DNS egress, a policy for every serving workload, and ingress to each
    internal service and store only from its allowed clients."""
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    serving = [(w, t) for w, t in workloads(objs) if w["kind"] in SERVING_KINDS]
    if not serving:
        return
    deny = [
        p
        for p in policies
        if (p.get("spec") or {}).get("podSelector") in ({}, None)
        and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    if not deny:
        yield Finding("netpol", "(namespace)", "no default-deny NetworkPolicy (Ingress+Egress)")
    dns = any(
        port.get("port") == 53
        for p in policies
        for rule in (p.get("spec") or {}).get("egress") or []
        for port in rule.get("ports") or []
    )
    if not dns:
        yield Finding("netpol", "(namespace)", "no NetworkPolicy allows DNS egress (port 53)")

    pods = [(client_name(pod_labels(t)), pod_labels(t)) for _, t in workloads(objs)]
    metrics_ports = {m for _, m in DEFAULT_PORTS.values()}
    for obj, template in serving:
        labels = pod_labels(template)
        selecting = _policies_selecting(policies, labels)
        if not selecting:
            yield Finding("netpol", ref(obj), "no NetworkPolicy selects its pods")
            continue
        name = labels.get(NAME_LABEL, "")
        allowed = ALLOWED_CLIENTS.get(name)
        if allowed is None:
            continue
        for policy in selecting:
            for rule in (policy.get("spec") or {}).get("ingress") or []:
                rule_ports = {p.get("port") for p in rule.get("ports") or []}
                if rule_ports and rule_ports <= metrics_ports:
                    continue  # Prometheus scrapes, checked by the metrics rule below
                peers = rule.get("from") or []
                if not peers:
                    yield Finding("netpol", ref(policy), f"lets anyone reach {name}")
                    continue
                for peer in peers:
                    if "ipBlock" in peer or "namespaceSelector" in peer:
                        yield Finding(
                            "netpol", ref(policy), f"lets other namespaces/IPs reach {name}"
                        )
                        continue
                    reached_by = {
                        c for c, lbl in pods if selector_matches(peer["podSelector"], lbl)
                    }
                    extra = reached_by - allowed
                    if extra:
                        yield Finding(
                            "netpol",
                            ref(policy),
                            f"lets {', '.join(sorted(extra))} reach {name} "
                            f"(only {', '.join(sorted(allowed))} may)",
                        )


def _referenced(template: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, name) of the ConfigMaps, Secrets and claims a pod template uses."""
    spec = template.get("spec") or {}
    for vol in spec.get("volumes") or []:
        if "configMap" in vol:
            yield "ConfigMap", vol["configMap"]["name"]
        if "secret" in vol:
            yield "Secret", vol["secret"]["secretName"]
        if "persistentVolumeClaim" in vol:
            yield "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]
        for source in (vol.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                yield "ConfigMap", source["configMap"]["name"]
            if "secret" in source:
                yield "Secret", source["secret"]["name"]
    for c in all_containers(spec):
        for source in c.get("envFrom") or []:
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"]
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"]
        for var in c.get("env") or []:
            value_from = var.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                yield "ConfigMap", value_from["configMapKeyRef"]["name"]
            if "secretKeyRef" in value_from:
                yield "Secret", value_from["secretKeyRef"]["name"]


def referenced_secrets(objs: list[Obj]) -> set[str]:
    """Names of the Secrets the manifests use (to be created out of band)."""
    names = {name for _, t in workloads(objs) for kind, name in _referenced(t) if kind == "Secret"}
    for ing in (o for o in objs if o.get("kind") == "Ingress"):
        names |= {t["secretName"] for t in (ing.get("spec") or {}).get("tls") or []}
    return names


def check_references(objs: list[Obj], guide: str | None = None) -> Iterator[Finding]:
    """ConfigMaps and claims in use exist in the manifests; Secrets in use do not (they
    are created out of band) and the operations guide says how to create each one."""
    present = {(o.get("kind"), o["metadata"]["name"]) for o in objs}
    for obj, template in workloads(objs):
        for kind, name in _referenced(template):
            if kind != "Secret" and (kind, name) not in present:
                yield Finding("references", ref(obj), f"uses {kind} {name}, which is not defined")
    if guide is not None:
        for name in sorted(referenced_secrets(objs)):
            if name not in guide:
                yield Finding(
                    "secrets", f"Secret/{name}", "is used but docs/operations.md never says how"
                )


def check_secrets(objs: list[Obj]) -> Iterator[Finding]:
    """No secret value in the manifests: no Secret with data, no literal credentials."""
    for obj in objs:
        if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
            yield Finding("secrets", ref(obj), "carries secret values; create it out of band")
        if obj.get("kind") == "ConfigMap":
            for key, value in (obj.get("data") or {}).items():
                if _looks_like_credential(key, value):
                    yield Finding("secrets", ref(obj), f"{key} looks like a credential")
                if any(p.search(str(value)) for p in SECRET_PATTERNS):
                    yield Finding("secrets", ref(obj), f"{key} holds a private key or token")
    for obj, template in workloads(objs):
        for c in all_containers(template.get("spec") or {}):
            for var in c.get("env") or []:
                if _looks_like_credential(var["name"], var.get("value", "")):
                    yield Finding(
                        "secrets",
                        ref(obj),
                        f"container {c['name']}: {var['name']} has a literal value",
                    )


def check_jobs(objs: list[Obj]) -> Iterator[Finding]:
    """Promotion only through the gate; no overlapping retrains; torchrun sizes agree."""
    services = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "Service"}
    for obj, template in workloads(objs):
        if obj["kind"] not in ("Job", "CronJob"):
            continue
        if obj["kind"] == "CronJob" and obj["spec"].get("concurrencyPolicy") != "Forbid":
            yield Finding("jobs", ref(obj), "concurrencyPolicy is not Forbid")
        spec = template.get("spec") or {}
        for c in spec.get("containers") or []:
            text = script_text(c)
            if "promote" in text and "--force" in text:
                yield Finding("jobs", ref(obj), "promotes with --force, bypassing the gate")
            if "torchrun" in text and obj["kind"] == "Job":
                job = obj["spec"]
                nodes = effective_env(c, configmaps_by_name(objs)).get("NNODES")
                sizes = {job.get("completions"), job.get("parallelism")}
                if job.get("completionMode") != "Indexed":
                    yield Finding("jobs", ref(obj), "torchrun job is not an Indexed Job")
                if len(sizes) != 1 or str(sizes.pop()) != str(nodes):
                    yield Finding(
                        "jobs",
                        ref(obj),
                        f"NNODES={nodes} but completions={job.get('completions')}, "
                        f"parallelism={job.get('parallelism')}",
                    )
                sub = services.get(spec.get("subdomain", ""))
                if sub is None or (sub.get("spec") or {}).get("clusterIP") != "None":
                    yield Finding(
                        "jobs", ref(obj), "pods need a headless Service named as their subdomain"
                    )


#: MERCATO_* variables every process reads besides its own service's settings.
GLOBAL_SETTINGS = frozenset(
    {"MERCATO_HOME", "MERCATO_MLFLOW_TRACKING_URI", "MERCATO_MLFLOW_ARTIFACT_ROOT"}
)


def known_settings(service: str) -> set[str]:
    """Environment variables the settings classes of ``service`` read."""
    import importlib

    from pydantic_settings import BaseSettings

    from services.common.settings import ClientTlsSettings

    module = importlib.import_module(f"services.{service}.settings")
    classes: list[type[BaseSettings]] = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, BaseSettings) and c.__module__ == module.__name__
    ]
    names = set(GLOBAL_SETTINGS)
    classes.append(ClientTlsSettings)
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        names.update(prefix + field.upper() for field in cls.model_fields)
    return names


def check_settings(objs: list[Obj]) -> Iterator[Finding]:
    """A MERCATO_* variable no settings class reads is silently ignored (settings allow
    extra keys): a renamed or misspelt setting in a ConfigMap would never take effect."""
    configmaps = configmaps_by_name(objs)
    for obj in objs:
        service = mercato_service(obj)
        template = pod_template(obj)
        if service is None or template is None:
            continue
        known = known_settings(service)
        for container in all_containers(template.get("spec") or {}):
            env = effective_env(container, configmaps)
            for name in sorted(env):
                if name.startswith("MERCATO_") and name not in known:
                    yield Finding(
                        "settings",
                        ref(obj),
                        f"{container.get('name')}: {name} is read by no setting of {service}",
                    )


# ------------------------------------------------------------- what breaks clusters

# Values of Secret keys that the operations guide fixes (docs/operations.md, 2.1): where
# they point, so that edges through them are checked like literal URIs.
SECRET_URIS: dict[tuple[str, str], str] = {("mercato-redis", "url"): "redis://redis:6379/0"}
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
URI_HOST = re.compile(
    r"^(?:[a-z][a-z0-9+.-]*://(?:[^@/]*@)?|dns:///)?([a-z0-9](?:[a-z0-9-]*[a-z0-9])?)"
    r"(?:\.[a-z0-9.-]+)?:(\d+)(?:[/?].*)?$"
)
LOCAL_HOSTS = {"localhost", "0", "127", "0.0.0.0"}
URI_ENV_SUFFIXES = ("_URI", "_URL", "_TARGET")
URI_ARGS = ("--backend-store-uri=",)


def _pod_spec(template: Mapping[str, Any]) -> Obj:
    return dict(template.get("spec") or {})


def _raw_env(container: Mapping[str, Any], configmaps: Mapping[str, Obj]) -> dict[str, Any]:
    """effective_env, with secretKeyRef values the guide fixes replaced by their URI."""
    env = effective_env(container, configmaps)
    for name, value in list(env.items()):
        if isinstance(value, Mapping) and "secretKeyRef" in value:
            key = value["secretKeyRef"]
            known = SECRET_URIS.get((key.get("name", ""), key.get("key", "")))
            if known is not None:
                env[name] = known
    return env


def expand_vars(text: str, env: Mapping[str, Any]) -> str:
    """$(VAR) expanded from ``env`` as the kubelet does (unknown references stay)."""
    return VAR_REF.sub(
        lambda m: str(env[m.group(1)]) if isinstance(env.get(m.group(1)), str) else m.group(0),
        text,
    )


def container_uris(
    container: Mapping[str, Any], configmaps: Mapping[str, Obj]
) -> list[tuple[str, str]]:
    """(where, URI-like value) of a container: env settings ending in _URI/_URL/_TARGET
    and --backend-store-uri arguments, $(VAR) expanded."""
    env = _raw_env(container, configmaps)
    out = []
    for name, value in env.items():
        if isinstance(value, str) and name.endswith(URI_ENV_SUFFIXES) and value:
            out.append((name, expand_vars(value, env)))
    for arg in [str(a) for a in container.get("args") or []]:
        for flag in URI_ARGS:
            if arg.startswith(flag):
                out.append((flag.rstrip("="), expand_vars(arg[len(flag) :], env)))
    return out


def _services_in(objs: list[Obj]) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o.get("kind") == "Service"}


def _host_port(uri: str) -> tuple[str, int] | None:
    """The (first DNS label of the host, port) a URI names; None for files and sockets."""
    m = URI_HOST.match(uri)
    if m is None:
        return None
    return m.group(1), int(m.group(2))


def check_env_uris(objs: list[Obj]) -> Iterator[Finding]:
    """Every Service an environment URI (or a backend store URI) names exists, with that
    port; a URI without a port that names a host is flagged too."""
    configmaps = configmaps_by_name(objs)
    services = _services_in(objs)
    for obj, template in workloads(objs):
        for c in all_containers(_pod_spec(template)):
            for where, uri in container_uris(c, configmaps):
                if "$(" in uri:
                    continue  # reported by check_var_refs
                found = _host_port(uri)
                if found is None:
                    if re.match(r"^[a-z][a-z0-9+.-]*://[a-z]", uri) and not uri.startswith(
                        ("sqlite:", "file:")
                    ):
                        yield Finding(
                            "uris", ref(obj), f"{c['name']}: {where}={uri}: no host:port in it"
                        )
                    continue
                host, port = found
                if host in LOCAL_HOSTS:
                    continue
                svc = services.get(host)
                if svc is None:
                    yield Finding(
                        "uris", ref(obj), f"{c['name']}: {where} names Service {host!r}: none"
                    )
                elif not any(
                    p.get("port") == port for p in (svc.get("spec") or {}).get("ports") or []
                ):
                    yield Finding(
                        "uris", ref(obj), f"{c['name']}: {where}: Service {host} has no port {port}"
                    )


def check_var_refs(objs: list[Obj]) -> Iterator[Finding]:
    """Every $(VAR) in command, args and env values is defined for the container (env
    values only see variables defined before them); the kubelet leaves others as text."""
    configmaps = configmaps_by_name(objs)
    for obj, template in workloads(objs):
        for c in all_containers(_pod_spec(template)):
            defined: set[str] = set()
            secret_env_from = False
            for source in c.get("envFrom") or []:
                cm_ref = source.get("configMapRef")
                if cm_ref and cm_ref.get("name") in configmaps:
                    data = configmaps[cm_ref["name"]].get("data") or {}
                    defined |= {source.get("prefix", "") + k for k in data}
                if "secretRef" in source:
                    secret_env_from = True  # keys unknown here
            for var in c.get("env") or []:
                for name in VAR_REF.findall(str(var.get("value", ""))):
                    if name not in defined and not secret_env_from:
                        yield Finding(
                            "vars",
                            ref(obj),
                            f"{c['name']}: env {var['name']} uses $({name}), not defined before it",
                        )
                defined.add(var["name"])
            for word in [str(w) for w in (c.get("command") or []) + (c.get("args") or [])]:
                for name in VAR_REF.findall(word):
                    if name not in defined and not secret_env_from:
                        yield Finding(
                            "vars", ref(obj), f"{c['name']}: $({name}) in command/args is undefined"
                        )


def _hpa_targets(objs: list[Obj]) -> set[tuple[str, str]]:
    return {
        (
            str(((h.get("spec") or {}).get("scaleTargetRef") or {}).get("kind")),
            str(((h.get("spec") or {}).get("scaleTargetRef") or {}).get("name")),
        )
        for h in objs
        if h.get("kind") == "HorizontalPodAutoscaler"
    }


def _single_writer(obj: Obj, why: str, hpas: set[tuple[str, str]]) -> Iterator[Finding]:
    spec = obj.get("spec") or {}
    name = obj["metadata"]["name"]
    if (obj["kind"], name) in hpas:
        yield Finding("storage", ref(obj), f"{why}, but an HPA scales it")
    if spec.get("replicas", 1) != 1 or "replicas" not in spec:
        yield Finding(
            "storage", ref(obj), f"{why}: needs replicas: 1 (has {spec.get('replicas', 'none')})"
        )
    if obj["kind"] == "Deployment" and (spec.get("strategy") or {}).get("type") != "Recreate":
        yield Finding(
            "storage", ref(obj), f"{why}: needs strategy Recreate (a rollout would run two)"
        )


def sqlite_store(obj: Obj, template: Obj, configmaps: Mapping[str, Obj]) -> str | None:
    """Why this workload keeps its state in SQLite (None when it does not)."""
    service = (obj.get("metadata", {}).get("labels") or {}).get(NAME_LABEL)
    for c in _pod_spec(template).get("containers") or []:
        env = _raw_env(c, configmaps)
        own = c["name"] == service
        if own and service == "profile" and env.get("MERCATO_PROFILE_BACKEND") != "redis":
            return "profile store is SQLite"
        if own and service == "ranking" and not env.get("MERCATO_RANKING_OFFERS_STATE_URL"):
            return "offer state is SQLite"
        for arg in [str(a) for a in c.get("args") or []]:
            if arg.startswith("--backend-store-uri=sqlite:"):
                return "MLflow store is SQLite"
    return None


def check_storage(objs: list[Obj]) -> Iterator[Finding]:
    """A ReadWriteOnce claim or an SQLite store means one writer: replicas 1, Recreate,
    no HPA."""
    configmaps = configmaps_by_name(objs)
    claims = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "PersistentVolumeClaim"}
    hpas = _hpa_targets(objs)
    for obj, template in workloads(objs):
        if obj["kind"] not in ("Deployment",):
            continue
        reasons = []
        for vol in _pod_spec(template).get("volumes") or []:
            claim = claims.get((vol.get("persistentVolumeClaim") or {}).get("claimName", ""))
            modes = set(((claim or {}).get("spec") or {}).get("accessModes") or [])
            if "ReadWriteOnce" in modes or "ReadWriteOncePod" in modes:
                reasons.append(f"mounts ReadWriteOnce claim {claim['metadata']['name']}")  # type: ignore[index]
        why_sqlite = sqlite_store(obj, template, configmaps)
        if why_sqlite:
            reasons.append(why_sqlite)
        if reasons:
            yield from _single_writer(obj, "; ".join(reasons), hpas)


def _allows(
    rule_peers: list[Obj] | None,
    rule_ports: list[Obj] | None,
    labels: Mapping[str, str],
    port: int,
) -> bool:
    """Whether one ingress/egress rule admits pods with ``labels`` on ``port``."""
    if rule_ports and not any(p.get("port") in (port, None) for p in rule_ports):
        return False
    if not rule_peers:
        return True
    return any(
        "podSelector" in peer
        and "namespaceSelector" not in peer
        and (peer["podSelector"] == {} or selector_matches(peer["podSelector"], labels))
        for peer in rule_peers
    )


def _policy_allows(
    policies: list[Obj],
    direction: str,
    selected: Mapping[str, str],
    peer: Mapping[str, str],
    port: int,
) -> bool:
    key, peer_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for pol in policies:
        spec = pol.get("spec") or {}
        if direction not in (spec.get("policyTypes") or ["Ingress"]):
            continue
        sel = spec.get("podSelector")
        if sel is None or not (sel == {} or selector_matches(sel, selected)):
            continue
        for rule in spec.get(key) or []:
            if _allows(rule.get(peer_key), rule.get("ports"), peer, port):
                return True
    return False


def dependency_edges(objs: list[Obj]) -> list[tuple[Obj, Obj, Obj, int]]:
    """(client workload, client template, server template, server container port) for
    every connection the manifests configure: each URI a container has, resolved to a
    Service and the pods it selects."""
    configmaps = configmaps_by_name(objs)
    services = _services_in(objs)
    pods = list(workloads(objs))
    edges = []
    for obj, template in pods:
        for c in all_containers(_pod_spec(template)):
            for _, uri in container_uris(c, configmaps):
                found = _host_port(uri)
                if found is None or found[0] not in services:
                    continue
                svc = services[found[0]]
                for sp in (svc.get("spec") or {}).get("ports") or []:
                    if sp.get("port") != found[1]:
                        continue
                    for _, server in pods:
                        if selector_matches(
                            (svc.get("spec") or {}).get("selector"), pod_labels(server)
                        ):
                            target = _container_port(server, sp.get("targetPort", sp.get("port")))
                            if target is not None:
                                edges.append((obj, template, server, target))
    return edges


def check_dependency_edges(objs: list[Obj]) -> Iterator[Finding]:
    """Each configured connection is allowed both ways: the client's egress and the
    server's ingress; and every workload may reach DNS."""
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    if not policies:
        return
    seen = set()
    for obj, client, server, port in dependency_edges(objs):
        c_labels, s_labels = pod_labels(client), pod_labels(server)
        c_name, s_name = client_name(c_labels), s_labels.get(NAME_LABEL, "?")
        key = (ref(obj), s_name, port)
        if key in seen:
            continue
        seen.add(key)
        if not _policy_allows(policies, "Egress", c_labels, s_labels, port):
            yield Finding("edges", ref(obj), f"{c_name} -> {s_name}:{port}: no egress allows it")
        if not _policy_allows(policies, "Ingress", s_labels, c_labels, port):
            yield Finding(
                "edges", ref(obj), f"{c_name} -> {s_name}:{port}: {s_name}'s ingress refuses it"
            )
    for obj, template in workloads(objs):
        labels = pod_labels(template)
        dns = any(
            _policy_allows(policies, "Egress", labels, {}, 53)
            or any(
                port.get("port") == 53
                for rule in (p.get("spec") or {}).get("egress") or []
                for port in rule.get("ports") or []
                if selector_matches((p.get("spec") or {}).get("podSelector"), labels)
                or (p.get("spec") or {}).get("podSelector") == {}
            )
            for p in policies
        )
        if not dns:
            yield Finding("edges", ref(obj), "no egress to DNS (port 53)")


def check_mlflow_server(objs: list[Obj]) -> Iterator[Finding]:
    """The MLflow server proxies artifacts (clients talk HTTP only), upgrades its schema
    before starting (an init container on the same store), and uses the ServiceAccount
    and probes like the rest."""
    for obj, template in workloads(objs):
        spec = _pod_spec(template)
        for c in spec.get("containers") or []:
            args = [str(a) for a in c.get("args") or []]
            if not (c.get("command") == ["mlflow"] and args[:1] == ["server"]):
                continue
            if "--serve-artifacts" not in args or any(
                a.startswith("--no-serve-artifacts") for a in args
            ):
                yield Finding(
                    "mlflow",
                    ref(obj),
                    "mlflow server without --serve-artifacts: clients "
                    "would write artifacts to their own disks",
                )
            if any(a.startswith("--default-artifact-root=") for a in args):
                yield Finding("mlflow", ref(obj), "--default-artifact-root bypasses the proxy")
            store = next((a for a in args if a.startswith("--backend-store-uri=")), None)
            upgrades = [
                i
                for i in spec.get("initContainers") or []
                if [str(a) for a in i.get("args") or []][:2] == ["db", "upgrade"]
            ]
            if not upgrades:
                yield Finding("mlflow", ref(obj), "no init container runs `mlflow db upgrade`")
            elif store is not None and not any(
                [str(a) for a in i.get("args") or []][2:3] == [store.split("=", 1)[1]]
                for i in upgrades
            ):
                yield Finding(
                    "mlflow", ref(obj), "`mlflow db upgrade` targets another store than the server"
                )


def check_service_accounts(objs: list[Obj]) -> Iterator[Finding]:
    """serviceAccountName names a ServiceAccount of the manifests (or the default)."""
    accounts = {o["metadata"]["name"] for o in objs if o.get("kind") == "ServiceAccount"}
    for obj, template in workloads(objs):
        name = _pod_spec(template).get("serviceAccountName")
        if name and name != "default" and name not in accounts:
            yield Finding("references", ref(obj), f"ServiceAccount {name} is not defined")


def check_redis_memory(objs: list[Obj]) -> Iterator[Finding]:
    """Redis' maxmemory follows the container's memory limit (below it), so the pod is
    never OOM-killed and an overlay that raises the limit raises maxmemory too."""
    for obj, template in workloads(objs):
        for c in _pod_spec(template).get("containers") or []:
            text = script_text(c)
            if "redis-server" not in text:
                continue
            limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
            m = re.search(r"--maxmemory\s+\"?([^\s\"]+)", text)
            if m is None or limit is None:
                yield Finding("redis", ref(obj), "redis-server without --maxmemory and a limit")
                continue
            value = m.group(1)
            env = {v["name"]: v for v in c.get("env") or []}
            var = re.search(r"\$\(?\(?([A-Z_]+)", value)
            if var:
                src = (env.get(var.group(1)) or {}).get("valueFrom") or {}
                field = src.get("resourceFieldRef") or {}
                if field.get("resource") != "limits.memory":
                    yield Finding(
                        "redis", ref(obj), f"maxmemory from {var.group(1)}, not limits.memory"
                    )
                continue
            units = {"kb": 1e3, "mb": 2**20, "gb": 2**30}
            num = re.match(r"(\d+)([a-z]*)", value.lower())
            size = float(num.group(1)) * units.get(num.group(2), 1) if num else 0.0
            if not 0.5 * memory_bytes(limit) <= size < memory_bytes(limit):
                yield Finding(
                    "redis",
                    ref(obj),
                    f"maxmemory {value} is not 50-100% of the memory limit {limit}",
                )


METRIC_DEF = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")
PROMQL_NAME = re.compile(r"\b(mercato_[a-zA-Z0-9_]+)")


def exported_metrics(
    roots: Iterable[Path] = (REPO / "services", REPO / "training", REPO / "mercato"),
) -> set[str]:
    """Metric names the code exports (prometheus_client's suffixes included)."""
    names: set[str] = set()
    for root in roots:
        for path in root.rglob("*.py"):
            for kind, name in METRIC_DEF.findall(path.read_text(errors="replace")):
                if kind == "Counter":
                    base = name.removesuffix("_total")
                    names |= {base + "_total", base + "_created"}
                elif kind in ("Histogram", "Summary"):
                    names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
                else:
                    names.add(name)
    return names


def check_alert_metrics(rules: Iterable[Obj], exported: set[str]) -> Iterator[Finding]:
    """Every mercato_* metric an alert or recording rule queries is one the code exports."""
    for doc in rules:
        for group in (doc.get("spec") or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                for name in sorted(set(PROMQL_NAME.findall(str(rule.get("expr", ""))))):
                    if name not in exported:
                        yield Finding(
                            "alerts",
                            f"{rule.get('alert') or rule.get('record')}",
                            f"queries {name}, which no code exports",
                        )


def monitoring_findings(k8s: Path = K8S) -> list[Finding]:
    """check_alert_metrics on k8s/monitoring/*.yaml."""
    docs = [
        d
        for path in sorted((k8s / "monitoring").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if isinstance(d, dict)
    ]
    return list(check_alert_metrics(docs, exported_metrics()))


def check_offer_catalog(objs: list[Obj]) -> Iterator[Finding]:
    """The offer catalogue ConfigMap loads with the ranking service's own parser (a file
    it refuses makes every ranking pod crash at start)."""
    from services.ranking.offers.catalog import Catalog, CatalogError

    for cm in (o for o in objs if o.get("kind") == "ConfigMap"):
        if not cm["metadata"]["name"].startswith("mercato-offers"):
            continue
        for key, text in (cm.get("data") or {}).items():
            try:
                Catalog.from_mapping(yaml.safe_load(text))
            except (CatalogError, ValueError, TypeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                yield Finding("settings", ref(cm), f"{key} is no valid offer catalogue: {first}")


CHECKS = (
    check_labels,
    check_images,
    check_resources,
    check_security,
    check_probes,
    check_threads,
    check_services,
    check_ingresses,
    check_ports,
    check_graceful_shutdown,
    check_autoscaling,
    check_network_policies,
    check_secrets,
    check_jobs,
    check_settings,
    check_offer_catalog,
)

# Checks across objects: an add-on overlay (the one-off jobs) is checked together with the
# overlay it is applied to (its `context`), reporting only its own objects.
CROSS_CHECKS = (
    check_env_uris,
    check_var_refs,
    check_storage,
    check_dependency_edges,
    check_mlflow_server,
    check_service_accounts,
    check_redis_memory,
)


def policy_findings(
    objs: list[Obj], guide: str | None = None, context: list[Obj] | None = None
) -> list[Finding]:
    """Every check of ours on one rendered overlay (``context``: the objects of the
    overlay it is applied on top of, for the checks across objects)."""
    findings = [f for check in CHECKS for f in check(objs)]
    findings += list(check_references(objs, guide))
    own = {ref(o) for o in objs}
    together = objs + [o for o in context or [] if ref(o) not in own]
    findings += [
        f for check in CROSS_CHECKS for f in check(together) if context is None or f.obj in own
    ]
    return findings


def scan_files_for_secrets(paths: Iterable[Path]) -> list[Finding]:
    """Private keys and tokens in files, and Secret manifests with values."""
    findings = []
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for pattern in SECRET_PATTERNS:
            if pattern.search(text):
                findings.append(Finding("secrets", str(path), "contains a private key or token"))
        if path.suffix in (".yaml", ".yml"):
            try:
                docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
            except yaml.YAMLError:
                continue
            findings += [
                Finding("secrets", f"{path}: {ref(d)}", "Secret with values in the repo")
                for d in docs
                if d.get("kind") == "Secret" and (d.get("data") or d.get("stringData"))
            ]
    return findings


def repo_files_to_scan(repo: Path = REPO) -> list[Path]:
    """The deployment files: everything under k8s/, the Dockerfile, the operations guide."""
    paths = sorted(p for p in (repo / "k8s").rglob("*") if p.is_file())
    return [*paths, repo / "Dockerfile", repo / ".dockerignore", repo / "docs" / "operations.md"]


# -------------------------------------------------------------------------------- main


@dataclass
class OverlayReport:
    path: Path
    objects: int
    schema: list[Finding]
    policy: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.schema and not self.policy


def check_overlay(
    path: Path,
    version: str = KUBERNETES_VERSION,
    kubectl: str | None = None,
    guide: str | None = None,
    schema: bool = True,
) -> OverlayReport:
    """Render one overlay and run the schema validation (unless told not to) and our checks.
    An overlay inside another (``prod/jobs``) is applied on top of it: that one is its
    context."""
    objs = render(path, kubectl)
    parent = path.resolve().parent
    context = (
        render(parent, kubectl) if _kustomization_file(parent) and parent != OVERLAYS else None
    )
    schema_found = schema_findings(objs, version) if schema else []
    return OverlayReport(path, len(objs), schema_found, policy_findings(objs, guide, context))


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlays", nargs="*", type=Path, help="default: every overlay")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    parser.add_argument("--list", action="store_true", help="list the overlays and stop")
    args = parser.parse_args(argv)

    overlays = args.overlays or discover_overlays()
    if args.list:
        print("\n".join(_display(p) for p in overlays))
        return 0
    kubectl = find_kubectl()
    if kubectl is None:
        print("kubectl not found: install it (or set KUBECTL)", file=sys.stderr)
        return 2
    guide = OPERATIONS_GUIDE.read_text() if OPERATIONS_GUIDE.is_file() else ""
    failed = False
    for path in overlays:
        try:
            report = check_overlay(path, args.kubernetes_version, kubectl, guide)
        except RenderError as exc:
            print(f"FAIL {_display(path)}: {exc}")
            failed = True
            continue
        status = "ok  " if report.ok else "FAIL"
        print(
            f"{status} {_display(path)}: {report.objects} objects, "
            f"schema (Kubernetes {args.kubernetes_version}, strict): "
            f"{len(report.schema)} errors, our checks: {len(report.policy)} findings"
        )
        for finding in report.schema + report.policy:
            print(f"     {finding}")
        failed |= not report.ok
    alerts = monitoring_findings()
    print(f"{'FAIL' if alerts else 'ok  '} alert rules query exported metrics: {len(alerts)}")
    for finding in alerts:
        print(f"     {finding}")
    failed |= bool(alerts)
    leaks = scan_files_for_secrets(repo_files_to_scan())
    print(f"{'FAIL' if leaks else 'ok  '} secret scan of k8s/, Dockerfile, docs: {len(leaks)}")
    for finding in leaks:
        print(f"     {finding}")
    return 1 if failed or leaks else 0


if __name__ == "__main__":
    sys.exit(main())
