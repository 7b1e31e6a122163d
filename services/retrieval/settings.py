"""Settings of the retrieval service (environment variables ``MERCATO_RETRIEVAL_*``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class RetrievalSettings(ServiceSettings):
    """Runtime settings of the retrieval service."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_RETRIEVAL_", extra="ignore")
