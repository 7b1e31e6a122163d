"""Settings of the retrieval service (environment variables ``MERCATO_RETRIEVAL_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, default_tracking_uri, mercato_home


class RetrievalSettings(ServiceSettings):
    """Runtime settings of the retrieval service."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_RETRIEVAL_", extra="ignore")

    model_name: str = Field("mercato-two-tower", description="Registered model to serve.")
    aliases: str = Field(
        "champion,challenger",
        description="Comma-separated registry aliases kept loaded from the start.",
    )
    default_alias: str = Field("champion", description="Alias of requests that name none.")
    two_tower_weight: float | None = Field(
        None,
        ge=0.0,
        description=(
            "Weight of the two-tower's ranks in Retrieve's fused score; unset = the weight "
            "the training run chose on validation (shipped in the bundle), else 1."
        ),
    )
    item2item_weight: float | None = Field(
        None,
        ge=0.0,
        description=(
            "Weight of the item-to-item neighbours' ranks in Retrieve's fused score "
            "(0 = two-tower candidates only); unset = the bundle's, else 1."
        ),
    )
    max_aliases: int = Field(
        8, ge=1, le=64, description="Most aliases loaded at once (per-request aliases included)."
    )
    tracking_uri: str = Field(
        "", description="MLflow tracking URI; empty = MERCATO_MLFLOW_TRACKING_URI or local."
    )
    poll_interval_s: float = Field(
        10.0, gt=0, description="Seconds between registry checks for moved aliases."
    )
    cache_dir: str = Field(
        "", description="Where model versions are downloaded; default MERCATO_HOME/retrieval."
    )
    exact_max_items: int = Field(
        20_000,
        ge=0,
        description=(
            "Catalogs up to this size use an exact Flat index; above, the approximate "
            "index serves when it reaches MIN_RECALL and is faster than exact (measured "
            "at load)."
        ),
    )
    ann_index: Literal["ivf", "hnsw"] = Field(
        "ivf",
        description="Approximate index tried above EXACT_MAX_ITEMS: ivf or hnsw.",
    )
    min_recall: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="Recall@RECALL_K against exact the approximate index must reach at load.",
    )
    recall_k: int = Field(100, ge=1, le=10_000, description="k of the load-time recall check.")
    recall_queries: int = Field(
        200, ge=1, le=100_000, description="Sample queries of the load-time recall check."
    )
    ann_must_beat_exact: bool = Field(
        True, description="Serve the approximate index only when faster than exact."
    )
    ivf_nlist: int = Field(0, ge=0, description="IVF lists (0 = about 2 * sqrt(items)).")
    ivf_nprobe: int = Field(
        4, ge=1, le=65536, description="Starting nprobe; doubled at load until MIN_RECALL."
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree when one is built.")
    hnsw_ef_construction: int = Field(80, ge=8, description="HNSW efConstruction when built.")
    hnsw_ef_search: int = Field(
        32, ge=8, le=4096, description="Starting HNSW efSearch; doubled at load until MIN_RECALL."
    )
    mmap_index: bool = Field(
        True, description="Memory-map the FAISS index, item embeddings and tower tables."
    )
    oversample: float = Field(
        2.0, ge=1.0, le=100.0, description="First search fetches k * oversample + exclusions."
    )
    max_fetch: int = Field(
        20_000, ge=100, description="Most index results one request reads while filtering."
    )
    exact_subset_max: int = Field(
        50_000,
        ge=0,
        description="Category filters covering at most this many items search them exactly.",
    )
    max_k: int = Field(1000, ge=1, le=100_000, description="Largest k of one call.")
    max_new_items: int = Field(
        100_000, ge=0, description="Items IndexItems may add to one loaded version."
    )

    def alias_list(self) -> list[str]:
        """Aliases watched from the start (the default alias first)."""
        out = [self.default_alias]
        for a in self.aliases.split(","):
            a = a.strip()
            if a and a not in out:
                out.append(a)
        return out

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI in force."""
        return self.tracking_uri or default_tracking_uri()

    def resolved_cache_dir(self) -> Path:
        """Download folder of model versions."""
        return Path(self.cache_dir) if self.cache_dir else mercato_home() / "retrieval" / "models"
