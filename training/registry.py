"""MLflow: experiments, registration of the serving bundle, and promotion with a gate.

The bundle directory is logged as run artifacts under ``bundle/`` and a model version of
``mercato-two-tower`` is created with that artifact directory as its source and the run
as its run id, so ``services.models.download_bundle`` can fetch it by alias.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from services.common.settings import default_artifact_root, default_tracking_uri
from services.models import registry_sqlite
from services.models.registry import BUNDLE_ARTIFACT_PATH

MODEL_NAME = "mercato-two-tower"
EXPERIMENT = "mercato-two-tower"
DEFAULT_GATE_METRIC = "valid_recall_20"


def artifact_location_for(
    tracking_uri: str, artifact_root: str | None, experiment: str = EXPERIMENT
) -> str | None:
    """Where a new experiment keeps artifacts.

    An explicit root wins. A tracking server (http/https) gets
    ``mlflow-artifacts:/<experiment>``: artifacts go through the server's artifact proxy
    (``mlflow server --serve-artifacts``), so a training pod and a serving pod share
    nothing but the server; a local path here would be the training pod's own disk and
    serving pods could never download the bundle. The embedded default store uses
    ``default_artifact_root()``; another local SQLite store keeps them in ``mlartifacts``
    beside the database; any other store decides for itself (None).
    """
    if artifact_root:
        return artifact_root
    if tracking_uri.startswith(("http://", "https://")):
        return f"mlflow-artifacts:/{experiment}"
    if tracking_uri == default_tracking_uri():
        return default_artifact_root()
    if registry_sqlite.is_sqlite(tracking_uri):
        return (registry_sqlite.db_path(tracking_uri).parent / "mlartifacts").resolve().as_uri()
    return None


def client_for(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    uri = tracking_uri or default_tracking_uri()
    if registry_sqlite.is_sqlite(uri):
        registry_sqlite.db_path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def ensure_experiment(
    client: MlflowClient, name: str, tracking_uri: str, artifact_root: str | None
) -> str:
    """Id of the experiment ``name``, created with the right artifact location."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    return str(
        client.create_experiment(
            name, artifact_location=artifact_location_for(tracking_uri, artifact_root, name)
        )
    )


def register_bundle(
    client: MlflowClient,
    run_id: str,
    model_name: str = MODEL_NAME,
    alias: str | None = "challenger",
    tags: dict[str, str] | None = None,
    description: str = "",
) -> ModelVersion:
    """New version of ``model_name`` from the run's ``bundle/`` artifacts; sets ``alias``.

    ``description`` describes the registered model when this call creates it."""
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(
            model_name,
            description=description
            or "Mercato two-tower retrieval: serving bundle (towers, "
            "item embeddings, FAISS index, vocabularies, popularity).",
        )
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{BUNDLE_ARTIFACT_PATH}"
    all_tags = {"bundle_artifact_path": BUNDLE_ARTIFACT_PATH, **(tags or {})}
    mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=all_tags)
    if alias:
        client.set_registered_model_alias(model_name, alias, mv.version)
    return mv


#: A promotion gate: (client, candidate version, current holder or None) -> (ok, reason,
#: candidate value, baseline value).
Gate = Callable[
    [MlflowClient, ModelVersion, ModelVersion | None],
    tuple[bool, str, float | None, float | None],
]


@dataclass
class PromotionResult:
    promoted: bool
    reason: str
    model_name: str
    alias: str
    version: str
    previous_version: str | None
    metric: str
    candidate_value: float | None
    champion_value: float | None


class PromotionRefused(RuntimeError):
    """The gate refused: the candidate is worse, or not comparable, and --force was not set."""

    def __init__(self, result: PromotionResult) -> None:
        super().__init__(result.reason)
        self.result = result


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _run_facts(client: MlflowClient, run_id: str, metric: str) -> tuple[float | None, str]:
    run = client.get_run(run_id)
    return run.data.metrics.get(metric), run.data.tags.get("split_signature", "")


def promote(
    model_name: str = MODEL_NAME,
    tracking_uri: str | None = None,
    from_alias: str = "challenger",
    to_alias: str = "champion",
    metric: str = DEFAULT_GATE_METRIC,
    version: str | None = None,
    force: bool = False,
    gate: Gate | None = None,
) -> PromotionResult:
    """Point ``to_alias`` at the candidate (``version`` or ``from_alias``) when its
    ``metric`` (a validation metric of its run, higher is better) is not worse than the
    current holder's on the same split, or, with ``gate``, when ``gate(client,
    candidate, current holder or None)`` says so (the ranker's replay gate,
    :func:`training.ranker.replay_gate`). Raises PromotionRefused otherwise, unless
    ``force``. Raises LookupError when there is no candidate."""
    client, _ = client_for(tracking_uri)
    if version is not None:
        cand = client.get_model_version(model_name, str(version))
    else:
        found = _version_by_alias(client, model_name, from_alias)
        if found is None:
            raise LookupError(f"model {model_name!r} has no alias {from_alias!r}")
        cand = found
    current = _version_by_alias(client, model_name, to_alias)
    c_val, c_split = _run_facts(client, cand.run_id or "", metric)
    base: dict[str, Any] = {
        "model_name": model_name,
        "alias": to_alias,
        "version": str(cand.version),
        "previous_version": str(current.version) if current else None,
        "metric": metric,
        "candidate_value": c_val,
        "champion_value": None,
    }
    ok, reason = True, f"no {to_alias} yet"
    if current is not None and str(current.version) == str(cand.version):
        ok, reason = True, f"version {cand.version} already holds {to_alias}"
    elif gate is not None:
        ok, reason, base["candidate_value"], base["champion_value"] = gate(client, cand, current)
    elif current is not None:
        h_val, h_split = _run_facts(client, current.run_id or "", metric)
        base["champion_value"] = h_val
        if c_val is None:
            ok, reason = False, f"candidate run has no metric {metric!r}"
        elif h_split != c_split:
            ok, reason = (
                False,
                (
                    f"not comparable: candidate split {c_split or '?'} != {to_alias} split "
                    f"{h_split or '?'} (re-train on the same data and split, or --force)"
                ),
            )
        elif h_val is not None and c_val < h_val:
            ok, reason = False, f"{metric} {c_val:.5f} < {to_alias} v{current.version} {h_val:.5f}"
        else:
            reason = f"{metric} {c_val:.5f} >= {to_alias} v{current.version} " + (
                f"{h_val:.5f}" if h_val is not None else "(no metric)"
            )
    if not ok and not force:
        raise PromotionRefused(PromotionResult(promoted=False, reason=reason, **base))
    if not ok:
        reason = f"forced: {reason}"
    client.set_registered_model_alias(model_name, to_alias, cand.version)
    return PromotionResult(promoted=True, reason=reason, **base)
