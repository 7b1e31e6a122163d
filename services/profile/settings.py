"""Settings of the profile service (environment variables ``MERCATO_PROFILE_*``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ProfileSettings(ServiceSettings):
    """Runtime settings of the profile service."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_PROFILE_", extra="ignore")
