"""Profile storage: one interface (:class:`ProfileStore`), two backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.profile.store.base import (
    AppendResult,
    CustomerRecord,
    ItemChanges,
    ProfileStore,
    StockChange,
    StoreUnavailable,
    UnknownItems,
)

if TYPE_CHECKING:
    from services.profile.settings import ProfileSettings

__all__ = [
    "AppendResult",
    "CustomerRecord",
    "ItemChanges",
    "ProfileStore",
    "StockChange",
    "StoreUnavailable",
    "UnknownItems",
    "make_store",
]


def make_store(settings: ProfileSettings) -> ProfileStore:
    """The configured backend (not opened yet)."""
    cfg = settings.profile_config()
    if settings.backend == "redis":
        from services.profile.store.redis import RedisStore

        return RedisStore(
            settings.redis_url, cfg, settings.redis_prefix, settings.redis_timeout_seconds
        )
    from services.profile.store.sqlite import SqliteStore

    return SqliteStore(settings.resolved_sqlite_path(), cfg)
