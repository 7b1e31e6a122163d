"""Settings of the profile service (environment variables ``MERCATO_PROFILE_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, mercato_home
from services.profile.logic import ProfileConfig


class ProfileSettings(ServiceSettings):
    """Runtime settings of the profile service."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_PROFILE_", extra="ignore")

    server_mode: str = Field(
        "sync",
        pattern="^(asyncio|sync)$",
        description="gRPC server: 'sync' (default: grpc.server with a thread pool; the reads "
        "of the Recommend path run on the pool threads, measured cheaper per call than "
        "asyncio, docs/profile.md) or 'asyncio' (grpc.aio, every call on the event loop).",
    )
    backend: Literal["sqlite", "redis"] = Field(
        "sqlite", description="Store backend: sqlite (one file, embedded) or redis (replicas)."
    )
    sqlite_path: str = Field(
        "", description="SQLite file; empty = $MERCATO_HOME/profile/profile.db."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (backend=redis).")
    redis_prefix: str = Field("mercato:", description="Prefix of every Redis key.")
    redis_timeout_seconds: float = Field(
        2.0, gt=0, description="Redis connect / command timeout; past it calls get UNAVAILABLE."
    )
    store_check_seconds: float = Field(
        1.0, gt=0, description="How often health pings the store (NOT_SERVING while it fails)."
    )
    max_batch: int = Field(1000, ge=1, description="Most events / items / ids in one request.")
    max_future_skew_seconds: float = Field(
        300.0, ge=0, description="How far in the future an event timestamp may be."
    )
    recent_items_limit: int = Field(
        50, ge=1, le=1000, description="Recent items kept per customer."
    )
    purchases_limit: int = Field(
        200, ge=0, description="Purchased items returned in a profile (0 = all; all are kept)."
    )
    affinity_half_life_days: float = Field(
        30.0, gt=0, description="Half-life of category affinity."
    )
    trending_half_life_hours: float = Field(24.0, gt=0, description="Half-life of trending scores.")
    rfm_recency_days: list[float] = Field(
        [30, 90, 180, 365], description="Recency days ending scores 5, 4, 3, 2 (beyond: 1)."
    )
    rfm_frequency_orders: list[float] = Field(
        [2, 4, 8, 16], description="Orders needed for frequency scores 2, 3, 4, 5."
    )
    rfm_monetary: list[float] = Field(
        [100, 500, 2000, 10000], description="Spend needed for monetary scores 2, 3, 4, 5."
    )
    price_band_low_below: float = Field(5.0, ge=0, description="Mean unit price below: low.")
    price_band_high_from: float = Field(20.0, ge=0, description="Mean unit price from: high.")
    segment_at_risk_days: float = Field(90.0, gt=0, description="Days since purchase: at_risk.")
    segment_lapsed_days: float = Field(365.0, gt=0, description="Days since purchase: lapsed.")
    segment_loyal_orders: int = Field(4, ge=1, description="Orders that make a customer loyal.")

    def resolved_sqlite_path(self) -> Path:
        """The SQLite file in use."""
        return (
            Path(self.sqlite_path)
            if self.sqlite_path
            else mercato_home() / "profile" / "profile.db"
        )

    def profile_config(self) -> ProfileConfig:
        """The derivation knobs as the pure logic takes them."""
        return ProfileConfig(
            recent_items_limit=self.recent_items_limit,
            purchases_limit=self.purchases_limit,
            affinity_half_life_days=self.affinity_half_life_days,
            trending_half_life_hours=self.trending_half_life_hours,
            rfm_recency_days=tuple(self.rfm_recency_days),
            rfm_frequency_orders=tuple(self.rfm_frequency_orders),
            rfm_monetary=tuple(self.rfm_monetary),
            price_band_low_below=self.price_band_low_below,
            price_band_high_from=self.price_band_high_from,
            segment_at_risk_days=self.segment_at_risk_days,
            segment_lapsed_days=self.segment_lapsed_days,
            segment_loyal_orders=self.segment_loyal_orders,
        )
