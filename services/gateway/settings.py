"""Settings of the gateway service (environment variables ``MERCATO_GATEWAY_*``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Runtime settings of the gateway service."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_GATEWAY_", extra="ignore")
