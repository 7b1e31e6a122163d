"""Serving copies of trained models (no training code): the two-tower bundle and the
registry helpers that fetch it from MLflow."""

from services.models.registry import ModelVersionInfo, download_bundle, resolve_alias
from services.models.two_tower import (
    BundleError,
    ItemFeatures,
    TwoTowerBundle,
    UserQuery,
)

__all__ = [
    "BundleError",
    "ItemFeatures",
    "ModelVersionInfo",
    "TwoTowerBundle",
    "UserQuery",
    "download_bundle",
    "resolve_alias",
]
