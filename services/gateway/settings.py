"""Settings of the gateway (environment variables ``MERCATO_GATEWAY_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Runtime settings of the gateway: downstream targets, per-hop deadlines, breakers,
    API keys and experiments."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_GATEWAY_", extra="ignore")

    profile_target: str = Field("127.0.0.1:50052", description="host:port of profile.")
    retrieval_target: str = Field("127.0.0.1:50053", description="host:port of retrieval.")
    ranking_target: str = Field("127.0.0.1:50054", description="host:port of ranking.")

    default_deadline_ms: float = Field(
        800, gt=0, description="Budget of a call whose caller set no deadline."
    )
    profile_timeout_ms: float = Field(80, gt=0, description="Deadline of a profile hop.")
    retrieval_timeout_ms: float = Field(150, gt=0, description="Deadline of a retrieval hop.")
    ranking_timeout_ms: float = Field(150, gt=0, description="Deadline of a ranking hop.")
    rank_sends_items: bool = Field(
        False,
        description=(
            "Send the candidates' catalog details in RankRequest.items (for a ranking "
            "service without its own item table); false = ids and scores only."
        ),
    )
    max_in_flight: int = Field(
        64,
        ge=0,
        description=(
            "Most recommendation calls (Recommend, GetRelatedItems, GetCartRecommendations) "
            "in progress at once; past it a call is answered at once per OVERLOAD_ANSWER "
            "instead of queueing (0 = no bound)."
        ),
    )
    server_threads: int = Field(
        96,
        ge=1,
        le=256,
        description=(
            "Threads of the synchronous server (SERVER_MODE=sync): above MAX_IN_FLIGHT, "
            "since each admitted call holds one while it runs on the event loop and the "
            "calls past the bound need free ones to be answered at once."
        ),
    )
    admission: Literal["adaptive", "fixed"] = Field(
        "adaptive",
        description=(
            "'adaptive': the bound on recommendation calls in progress moves between "
            "ADMIT_MIN_IN_FLIGHT and MAX_IN_FLIGHT with the latency of the admitted calls "
            "(AIMD: cut when more than a tenth of a window's calls take longer than "
            "ADMIT_TARGET_MS); 'fixed': the bound is MAX_IN_FLIGHT."
        ),
    )
    admit_target_ms: float = Field(
        150,
        gt=0,
        description="Adaptive admission: the latency the admitted calls' p90 is kept under.",
    )
    admit_late_ms: float = Field(
        100,
        ge=0,
        description=(
            "With half the admission bound in use, a Recommend that starts with less than "
            "this left of its caller's deadline is shed like one past the bound (it "
            "queued before the gateway got to it); 0 = never."
        ),
    )
    admit_lag_ms: float = Field(
        10,
        ge=0,
        description=(
            "Adaptive admission: a ticker measures how late the gateway's event loop wakes "
            "it (every 5 ms); a 50 ms window in which half the bound was in use and more "
            "than a tenth of the ticks woke later than this cuts the bound like slow calls "
            "do (calls queue in front of the handler while the loop lags, which the "
            "calls' latency does not see); 0 = off."
        ),
    )
    admit_min_in_flight: int = Field(
        4, ge=1, description="Adaptive admission: the bound never goes below this."
    )
    overload_answer: Literal["degraded", "resource_exhausted"] = Field(
        "degraded",
        description=(
            "Past MAX_IN_FLIGHT: 'degraded' answers Recommend from the cached popular items "
            "(no downstream call; RESOURCE_EXHAUSTED when none is cached, and for the other "
            "calls); 'resource_exhausted' refuses every such call with RESOURCE_EXHAUSTED."
        ),
    )
    offer_timeout_ms: float = Field(80, gt=0, description="Deadline of an offer decision.")
    details_timeout_ms: float = Field(80, gt=0, description="Deadline of the item lookup.")
    track_timeout_ms: float = Field(2000, gt=0, description="Deadline of event forwarding.")
    reserve_ms: float = Field(
        5, ge=0, description="Time kept back from the caller's deadline to build the answer."
    )
    read_retries: int = Field(
        1, ge=0, le=3, description="Extra attempts of idempotent reads on UNAVAILABLE."
    )

    candidates_k: int = Field(200, ge=1, le=1000, description="Candidates asked of retrieval.")
    max_k: int = Field(100, ge=1, le=1000, description="Largest k a caller may ask for.")

    breaker_failures: int = Field(
        5, ge=1, description="Consecutive failures that open a downstream's circuit breaker."
    )
    breaker_reset_seconds: float = Field(
        2.0, gt=0, description="How long an open breaker waits before one probe call."
    )

    api_keys_file: str = Field(
        "", description="YAML/JSON file of hashed API keys; empty = no authentication."
    )
    experiments_file: str = Field("", description="YAML/JSON experiments config.")
    offer_surfaces: str = Field(
        "cart,checkout,email", description="Surfaces on which Recommend may return an offer."
    )
    exposures_enabled: bool = Field(
        True, description="Log every answer as an exposure event in the profile event log."
    )
    exposure_queue_size: int = Field(
        10_000, ge=1, description="Exposures waiting to be sent before new ones are dropped."
    )
    exposure_batch_size: int = Field(
        200, ge=1, le=1000, description="Exposure events per TrackEvents batch."
    )
    exposure_flush_ms: float = Field(
        200, gt=0, description="Longest wait to fill an exposure batch."
    )
    details_cache_seconds: float = Field(
        2.0,
        ge=0,
        description=(
            "How long item details (incl. stock) are reused by the item lookups that remain "
            "(ranking failed or answered without details, related items, shed answers' "
            "popular list); 0 = off."
        ),
    )
    details_cache_items: int = Field(200_000, ge=0, description="Items kept in that cache.")
    trending_cache_seconds: float = Field(
        2.0, ge=0, description="How long a trending list is reused; 0 = off."
    )
