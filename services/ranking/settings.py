"""Settings of the ranking service (environment variables ``MERCATO_RANKING_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, default_tracking_uri, mercato_home

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OFFERS_FILE = REPO_ROOT / "config" / "offers.yaml"


class RankingSettings(ServiceSettings):
    """Runtime settings of the ranking service."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_RANKING_", extra="ignore")

    rules_file: str = Field(
        "",
        description="YAML/JSON business-rules config per surface; empty = built-in defaults.",
    )
    max_candidates: int = Field(
        2000, ge=1, le=100_000, description="Most candidates one Rank call may send."
    )
    max_k: int = Field(1000, ge=1, le=100_000, description="Largest k one Rank call may ask.")
    catalog_target: str = Field(
        "",
        description=(
            "host:port of the profile service whose catalogue (ListItems) fills ranking's "
            "item table; empty = no table (only items sent in RankRequest.items are known)."
        ),
    )
    catalog_refresh_s: float = Field(
        2.0,
        gt=0,
        description=(
            "Seconds between refreshes of the item table from the catalogue (the items "
            "changed since the last one; the whole catalogue with catalog_changes off). "
            "Bounds how stale the stock (sold-out filter) and the item details that Rank "
            "returns can be: the gateway takes both from ranking."
        ),
    )
    catalog_changes: bool = Field(
        True,
        description=(
            "Follow the catalogue's change feed (ListItemChanges) after one full load; off = "
            "load the whole catalogue (ListItems) at every refresh, as before the feed."
        ),
    )
    catalog_fetch_timeout_ms: float = Field(
        50,
        gt=0,
        description=(
            "Deadline of the GetItems call for candidates created since the last reload "
            "(at most half of what is left of the caller's deadline)."
        ),
    )
    catalog_page_size: int = Field(
        10_000, ge=1, le=10_000, description="Items per ListItems page when loading the table."
    )
    offers_file: str = Field(
        "",
        description="YAML offer catalog; empty = config/offers.yaml shipped with Mercato.",
    )
    offers_state_path: str = Field(
        "",
        description="Offer policy state (SQLite); default MERCATO_HOME/ranking/offers.db. "
        "One replica only: use offers_state_url to run several.",
    )
    offers_state_url: str = Field(
        "",
        description="redis://... : keep the offer state in Redis, shared by every replica "
        "(budgets enforced across replicas, outcomes accepted by any); empty = SQLite.",
    )
    offers_state_prefix: str = Field(
        "mercato-offers:", description="Key prefix of the offer state in Redis."
    )
    offers_retention_days: float = Field(
        90.0, gt=0, description="Days a settled offer decision is kept (then NOT_FOUND)."
    )
    offers_seed: int = Field(
        -1, ge=-1, description="Seed of the offer policy's sampler (-1 = from the OS)."
    )

    ranker_enabled: bool = Field(
        True, description="Follow the registry for the trained ranker (false = rules-only)."
    )
    ranker_model_name: str = Field("mercato-ranker", description="Registered ranker to serve.")
    ranker_aliases: str = Field(
        "champion,challenger",
        description="Comma-separated registry aliases kept loaded from the start.",
    )
    ranker_default_alias: str = Field(
        "champion", description="Alias of Rank requests that name none."
    )
    ranker_max_aliases: int = Field(
        8, ge=1, le=64, description="Most aliases loaded at once (per-request aliases included)."
    )
    tracking_uri: str = Field(
        "", description="MLflow tracking URI; empty = MERCATO_MLFLOW_TRACKING_URI or local."
    )
    ranker_poll_interval_s: float = Field(
        10.0, gt=0, description="Seconds between registry checks for moved aliases."
    )
    ranker_cache_dir: str = Field(
        "", description="Where ranker versions are downloaded; default MERCATO_HOME/ranking/models."
    )

    def ranker_alias_list(self) -> list[str]:
        """Aliases watched from the start (the default alias first)."""
        out = [self.ranker_default_alias]
        for a in self.ranker_aliases.split(","):
            a = a.strip()
            if a and a not in out:
                out.append(a)
        return out

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI in force."""
        return self.tracking_uri or default_tracking_uri()

    def resolved_ranker_cache_dir(self) -> Path:
        """Download folder of ranker versions."""
        if self.ranker_cache_dir:
            return Path(self.ranker_cache_dir)
        return mercato_home() / "ranking" / "models"

    def resolved_offers_file(self) -> Path:
        """The offer catalog file in force."""
        return Path(self.offers_file) if self.offers_file else DEFAULT_OFFERS_FILE

    def resolved_offers_state_path(self) -> Path:
        """Where the offer policy keeps its state."""
        if self.offers_state_path:
            return Path(self.offers_state_path)
        return mercato_home() / "ranking" / "offers.db"
