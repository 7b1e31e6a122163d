"""Offer selection: the catalog, the learned policy (contextual bandit) and its state."""

from services.ranking.offers.catalog import Catalog, CatalogError, OfferSpec
from services.ranking.offers.features import OfferContext, features, offer_context
from services.ranking.offers.policy import Choice, OfferPolicy, OfferStatusRow
from services.ranking.offers.store import MemoryStore, OfferStore, RedisStore, SqliteStore

__all__ = [
    "Catalog",
    "CatalogError",
    "Choice",
    "MemoryStore",
    "OfferContext",
    "OfferPolicy",
    "OfferSpec",
    "OfferStatusRow",
    "OfferStore",
    "RedisStore",
    "SqliteStore",
    "features",
    "offer_context",
]
