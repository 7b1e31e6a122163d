"""Settings of the ranking service (environment variables ``MERCATO_RANKING_*``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RankingSettings(ServiceSettings):
    """Runtime settings of the ranking service."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_RANKING_", extra="ignore")
