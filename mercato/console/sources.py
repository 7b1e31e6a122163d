"""Where the console reads from: only public interfaces.

- the exported event log (``mercato export-events``), reloaded when the file changes;
- the profile and gateway gRPC APIs (catalog, profiles, carts, live recommendations);
- the MLflow registry and runs (model versions, training runs, their evaluation tables,
  the two-tower champion for the demand forecast);
- each service's Prometheus ``/metrics`` endpoint (every address a host name resolves
  to is one replica), sampled in the background so that rates cover the last hour.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from mercato.console.analytics import Scorer, Shopper

log = logging.getLogger(__name__)


# --- the exported event log ---------------------------------------------------------------


class EventLog:
    """The export file as a DataFrame, re-read when its modification time changes.
    With ``export_cmd`` (local use: the ``mercato export-events`` command) the console
    refreshes the export itself when it is older than ``max_age_s``."""

    def __init__(
        self, path: Path, export_cmd: Sequence[str] | None = None, max_age_s: float = 300.0
    ) -> None:
        self.path = Path(path)
        self.export_cmd = list(export_cmd) if export_cmd else None
        self.max_age_s = max_age_s
        self._frame: pd.DataFrame | None = None
        self._mtime = 0.0
        self._lock = threading.Lock()
        self.exported_at: float = 0.0

    def refresh(self, force: bool = False) -> bool:
        """Run the export command (when configured) if the file is missing or stale."""
        if not self.export_cmd:
            return False
        age = time.time() - self.path.stat().st_mtime if self.path.exists() else float("inf")
        if not force and age < self.max_age_s:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp" + self.path.suffix)
        subprocess.run(
            [*self.export_cmd, "--out", str(tmp), "--no-progress"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.replace(tmp, self.path)
        return True

    def frame(self) -> pd.DataFrame:
        from services.profile.export import read_events_frame

        with self._lock:
            try:
                self.refresh()
            except subprocess.CalledProcessError as exc:
                log.warning("export-events failed: %s", exc.stderr.decode(errors="replace"))
            if not self.path.exists():
                raise FileNotFoundError(
                    f"no event export at {self.path}: run `mercato export-events --out "
                    f"{self.path}` (or start the console with --export)"
                )
            mtime = self.path.stat().st_mtime
            if self._frame is None or mtime != self._mtime:
                self._frame = read_events_frame(self.path)
                self._mtime = mtime
            return self._frame

    @property
    def version(self) -> float:
        return self._mtime


def local_export_command() -> list[str]:
    """``mercato export-events`` of this installation (reads the configured store)."""
    return [sys.executable, "-m", "mercato.cli", "export-events"]


# --- metrics ------------------------------------------------------------------------------


@dataclass
class Target:
    """One service's metrics URL; its host may resolve to several replicas."""

    service: str
    url: str


@dataclass
class Scrape:
    """One scrape of one replica: (metric name, labels) -> value."""

    ts: float
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Replica:
    service: str
    address: str
    url: str
    scrapes: deque[Scrape] = field(default_factory=lambda: deque(maxlen=400))
    error: str = ""


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _replica_urls(url: str) -> list[tuple[str, str]]:
    """(address, url) for every address the URL's host resolves to."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [(f"{host}:{port}", url)]
    seen = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in seen:
            seen.append(addr)
    out = []
    for addr in seen:
        netloc = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        out.append((netloc, urlunsplit((parts.scheme, netloc, parts.path, "", ""))))
    return out


class MetricsSampler:
    """Scrapes every target every ``interval_s`` and keeps an hour of samples."""

    def __init__(self, targets: Sequence[Target], interval_s: float = 15.0) -> None:
        self.targets = list(targets)
        self.interval_s = interval_s
        self.replicas: dict[tuple[str, str], Replica] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape_once(self) -> None:
        now = time.time()
        for t in self.targets:
            for address, url in _replica_urls(t.url):
                key = (t.service, address)
                with self._lock:
                    rep = self.replicas.setdefault(key, Replica(t.service, address, url))
                try:
                    with urllib.request.urlopen(url, timeout=3) as resp:
                        values = parse_metrics(resp.read().decode())
                except OSError as exc:
                    rep.error = str(exc)
                    continue
                with self._lock:
                    rep.error = ""
                    rep.scrapes.append(Scrape(now, values))
                    while rep.scrapes and now - rep.scrapes[0].ts > 3600 + self.interval_s:
                        rep.scrapes.popleft()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scrape_once()
            except Exception:  # never let the sampler die
                log.exception("metrics scrape failed")
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> list[Replica]:
        with self._lock:
            return [
                Replica(r.service, r.address, r.url, deque(r.scrapes), r.error)
                for r in self.replicas.values()
            ]


def delta(first: float | None, last: float) -> float:
    """Counter increase between two samples (a reset restarts from zero)."""
    if first is None or last < first:
        return last
    return last - first


def quantile_from_buckets(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Quantile of a histogram from cumulative (upper bound, count) pairs, linear within
    a bucket (as Prometheus' histogram_quantile)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            width = count - prev_count
            frac = (rank - prev_count) / width if width > 0 else 1.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


def window_deltas(rep: Replica) -> tuple[float, dict[Any, float]]:
    """(seconds covered, per-series increase) between the oldest and newest scrape."""
    if not rep.scrapes:
        return 0.0, {}
    first, last = rep.scrapes[0], rep.scrapes[-1]
    span = last.ts - first.ts
    if len(rep.scrapes) == 1:
        return 0.0, dict(last.values)
    return span, {k: delta(first.values.get(k), v) for k, v in last.values.items()}


def overview_metrics(replicas: Sequence[Replica]) -> dict[str, Any]:
    """Requests and errors per method, latency per gateway stage (p50/p95 over the
    window), the model version each alias serves on each replica, and a per-minute
    request series for the chart."""
    methods: dict[tuple[str, str], dict[str, float]] = {}
    stages: dict[str, list[tuple[float, float]]] = {}
    stage_counts: dict[str, float] = {}
    models = []
    spans = []
    series: dict[str, dict[int, float]] = {}
    for rep in replicas:
        span, d = window_deltas(rep)
        spans.append(span)
        for (name, labels), v in d.items():
            lab = dict(labels)
            if name == "mercato_rpc_requests_total" and lab.get("service") == rep.service:
                m = methods.setdefault(
                    (rep.service, lab.get("method", "")), {"requests": 0.0, "errors": 0.0}
                )
                m["requests"] += v
                if lab.get("code") != "OK":
                    m["errors"] += v
            elif name == "mercato_gateway_hop_latency_seconds_bucket":
                hop = lab.get("hop", "")
                le = float(lab.get("le", "inf"))
                stages.setdefault(hop, [])
                stages[hop].append((le, v))
            elif name == "mercato_gateway_hop_latency_seconds_count":
                stage_counts[lab.get("hop", "")] = stage_counts.get(lab.get("hop", ""), 0) + v
        if rep.scrapes:
            for (name, labels), v in rep.scrapes[-1].values.items():
                if name == "mercato_model_loaded_version":
                    lab = dict(labels)
                    models.append(
                        {
                            "service": rep.service,
                            "replica": rep.address,
                            "model": lab.get("model", ""),
                            "alias": lab.get("alias", ""),
                            "version": int(v),
                        }
                    )
        # gateway requests per minute between consecutive scrapes
        if rep.service == "gateway":
            prev: Scrape | None = None
            prev_total = 0.0
            for sc in rep.scrapes:
                total = sum(
                    v
                    for (name, labels), v in sc.values.items()
                    if name == "mercato_rpc_requests_total"
                    and dict(labels).get("service") == "gateway"
                )
                if prev is not None and sc.ts > prev.ts:
                    rate = delta(prev_total, total) / (sc.ts - prev.ts) * 60.0
                    s = series.setdefault("gateway", {})
                    s[int(sc.ts)] = s.get(int(sc.ts), 0.0) + rate
                prev, prev_total = sc, total
    stage_rows = []
    for hop, pairs in sorted(stages.items()):
        merged: dict[float, float] = {}
        for le, v in pairs:
            merged[le] = merged.get(le, 0.0) + v
        b = sorted(merged.items())
        p50, p95 = quantile_from_buckets(b, 0.5), quantile_from_buckets(b, 0.95)
        stage_rows.append(
            {
                "stage": hop,
                "calls": int(stage_counts.get(hop, 0)),
                "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                "p95_ms": None if p95 is None else round(p95 * 1000, 2),
            }
        )
    return {
        "window_seconds": round(max(spans), 1) if spans else 0.0,
        "methods": [
            {
                "service": s,
                "method": m,
                "requests": int(v["requests"]),
                "errors": int(v["errors"]),
                "error_share": round(v["errors"] / v["requests"], 4) if v["requests"] else 0.0,
            }
            for (s, m), v in sorted(methods.items())
            if v["requests"] > 0
        ],
        "stages": stage_rows,
        "models": sorted(models, key=lambda r: (r["service"], r["replica"], r["model"])),
        "replicas": [
            {"service": r.service, "replica": r.address, "up": not r.error, "error": r.error}
            for r in replicas
        ],
        "requests_per_minute": [
            {"t": t, "requests": v} for t, v in sorted(series.get("gateway", {}).items())
        ],
    }


def default_targets(host: str = "127.0.0.1") -> list[Target]:
    """The local services' metrics endpoints (``MERCATO_<SERVICE>_METRICS_PORT``)."""
    from services.common.supervisor import ports_from_env

    return [
        Target(name, f"http://{host}:{metrics}/metrics")
        for name, (_, metrics) in ports_from_env().items()
        if metrics > 0
    ]


def parse_targets(spec: str) -> list[Target]:
    """``gateway=http://h:9101/metrics,profile=...``."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, url = part.partition("=")
        if not url:
            raise ValueError(f"metrics target must be service=url, got {part!r}")
        out.append(Target(name.strip(), url.strip()))
    return out


# --- MLflow ------------------------------------------------------------------------------

MODELS = ("mercato-two-tower", "mercato-ranker")


def training_runs(tracking_uri: str, limit: int = 6) -> list[dict[str, Any]]:
    """The newest training runs with their metrics and evaluation table (eval/table.csv)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return []
    runs = client.search_runs(exps, order_by=["attributes.start_time DESC"], max_results=limit)
    versions: dict[str, list[str]] = {}
    for name in MODELS:
        try:
            for mv in client.search_model_versions(f"name='{name}'"):
                aliases = list(getattr(mv, "aliases", []) or [])
                label = f"{name} v{mv.version}" + (f" @{','.join(aliases)}" if aliases else "")
                versions.setdefault(mv.run_id or "", []).append(label)
        except Exception:  # registry without that model
            continue
    out = []
    for r in runs:
        table: list[dict[str, str]] = []
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(r.info.run_id, "eval/table.csv", tmp)
                table = eval_table(pd.read_csv(path))
        except Exception:
            table = []
        out.append(
            {
                "run_id": r.info.run_id,
                "name": r.info.run_name,
                "status": r.info.status,
                "started": pd.Timestamp(r.info.start_time, unit="ms", tz="UTC").isoformat(),
                "family": r.data.tags.get("model_family", ""),
                "dataset": r.data.tags.get("dataset", ""),
                "versions": versions.get(r.info.run_id, []),
                "metrics": {
                    k: round(v, 4)
                    for k, v in sorted(r.data.metrics.items())
                    if k.startswith("valid")
                },
                "eval_table": table,
            }
        )
    return out


#: Columns of the evaluation table shown per run (the rest stays in MLflow).
EVAL_METRICS = ("recall@20", "ndcg@20", "hit@20", "coverage@20", "recall@100")


def eval_table(df: pd.DataFrame) -> list[dict[str, str]]:
    """A run's eval/table.csv (long: split, model, metric, value) as one row per split
    and model with the headline metrics as columns."""
    if {"split", "model", "metric", "value"} <= set(df.columns):
        df = df[df["metric"].isin(EVAL_METRICS)]
        wide = df.pivot_table(
            index=["split", "model"], columns="metric", values="value", aggfunc="first"
        )
        wide = wide[[m for m in EVAL_METRICS if m in wide.columns]].round(4).reset_index()
        return wide.astype(str).to_dict("records")
    return df.astype(str).to_dict("records")


class TwoTowerScorer:
    """The two-tower champion from the registry as the demand forecast's model: top
    ``k`` items per shopper with their scores. Reloaded when the alias moves."""

    def __init__(self, tracking_uri: str, alias: str = "champion", k: int = 50) -> None:
        self.tracking_uri = tracking_uri
        self.alias = alias
        self.k = k
        self.bundle: Any = None
        self.version = ""
        self._dir = Path(tempfile.mkdtemp(prefix="mercato-console-model-"))

    def load(self) -> bool:
        from services.models.registry import download_bundle, resolve_alias
        from services.models.two_tower import TwoTowerBundle

        try:
            info = resolve_alias("mercato-two-tower", self.alias, self.tracking_uri)
        except LookupError:
            return False
        if info.version == self.version and self.bundle is not None:
            return True
        _, local = download_bundle(
            "mercato-two-tower", self.alias, self.tracking_uri, self._dir / info.version
        )
        self.bundle = TwoTowerBundle.load(local)
        self.version = info.version
        return True

    @property
    def label(self) -> str:
        return f"mercato-two-tower v{self.version} @{self.alias}"

    def __call__(self, shoppers: Sequence[Shopper]) -> list[list[tuple[str, float]]]:
        """Top ``k`` items per shopper with the model's scores."""
        from services.models.two_tower import UserQuery

        b = self.bundle
        out: list[list[tuple[str, float]]] = []
        for start in range(0, len(shoppers), 256):
            chunk = shoppers[start : start + 256]
            queries = [
                UserQuery(
                    recent_item_ids=s.recent_item_ids,
                    purchased_item_ids=s.purchased_item_ids,
                    cart_item_ids=[],
                    surface="home",
                    category_affinity=s.category_affinity,
                )
                for s in chunk
            ]
            scores, rows = b.search(b.encode_users(queries), self.k)
            for sc, rw in zip(scores, rows, strict=True):
                out.append(
                    [(b.item_ids[int(r)], float(x)) for r, x in zip(rw, sc, strict=True) if r >= 0]
                )
        return out


def scorer_or_none(scorer: TwoTowerScorer | None) -> Scorer | None:
    if scorer is None:
        return None
    try:
        return scorer if scorer.load() else None
    except Exception:
        log.exception("loading the two-tower champion failed; the forecast uses the trend")
        return None


def csv_bytes(rows: list[dict[str, Any]], columns: Sequence[str]) -> bytes:
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()
