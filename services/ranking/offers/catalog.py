"""The offer catalog: offers, their cost model, eligibility and budgets (from YAML).

Cost model of an offer, in currency units, for an order of value ``v``:

- ``redeem_cost(v) = min(percent / 100 * v + amount, max)`` is paid when the customer
  buys with the offer (``max`` 0 = no cap);
- ``fixed`` is paid when the offer is given at all (for example sending a reminder).

Every decision reserves ``redeem_cost`` of the order value it was made for and spends
``fixed`` at once; the issued incentive is worth at most the reserved amount, so the
settled cost of a redemption never exceeds the reservation and a budget is never
overrun.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mercato.v1 import common_pb2
from services.ranking.rules import SURFACES

NONE_OFFER_ID = "none"

KINDS: dict[str, int] = {
    "none": common_pb2.OFFER_KIND_NONE,
    "percent_off": common_pb2.OFFER_KIND_PERCENT_OFF,
    "amount_off": common_pb2.OFFER_KIND_AMOUNT_OFF,
    "free_shipping": common_pb2.OFFER_KIND_FREE_SHIPPING,
    "bundle": common_pb2.OFFER_KIND_BUNDLE,
    "cart_recovery": common_pb2.OFFER_KIND_CART_RECOVERY,
}


class CatalogError(ValueError):
    """The offer catalog is malformed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Period(StrEnum):
    """Budget period; budgets reset at the start of each (UTC)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    TOTAL = "total"

    def key(self, now: float) -> str:
        """The period ``now`` (unix seconds) falls in, for example ``2026-01-05``."""
        t = dt.datetime.fromtimestamp(now, dt.UTC)
        if self is Period.DAY:
            return t.strftime("%Y-%m-%d")
        if self is Period.WEEK:
            year, week, _ = t.isocalendar()
            return f"{year}-W{week:02d}"
        if self is Period.MONTH:
            return t.strftime("%Y-%m")
        return "total"


class Cost(_Strict):
    """What an offer costs the retailer (see the module doc)."""

    percent: float = Field(0.0, ge=0.0, le=100.0)
    amount: float = Field(0.0, ge=0.0)
    max: float = Field(0.0, ge=0.0, description="Cap on the redemption cost (0 = no cap).")
    fixed: float = Field(0.0, ge=0.0, description="Paid whenever the offer is given.")

    def redeem_cost(self, order_value: float) -> float:
        cost = self.percent / 100.0 * max(order_value, 0.0) + self.amount
        return min(cost, self.max) if self.max > 0 else cost


class Eligibility(_Strict):
    """When an offer may be given. Empty lists mean any."""

    surfaces: tuple[str, ...] = ("cart", "checkout", "email")
    segments: tuple[str, ...] = ()
    min_cart_value: float = Field(0.0, ge=0.0)
    max_cart_value: float = Field(0.0, ge=0.0, description="0 = no upper bound.")
    min_cart_items: int = Field(0, ge=0)
    min_idle_minutes: float = Field(0.0, ge=0.0, description="Cart unchanged for this long.")

    @model_validator(mode="after")
    def _known_surfaces(self) -> Eligibility:
        bad = set(self.surfaces) - set(SURFACES)
        if bad:
            raise ValueError(f"unknown surfaces {sorted(bad)}; known: {list(SURFACES)}")
        return self


class Budget(_Strict):
    """Spend allowed per period (amount 0 = unlimited)."""

    amount: float = Field(0.0, ge=0.0)
    period: Period = Period.DAY


class OfferSpec(_Strict):
    """One offer of the catalog."""

    id: str = Field(min_length=1, max_length=64)
    kind: str
    value: float = Field(0.0, ge=0.0)
    description: str = ""
    min_cart_value: float = Field(0.0, ge=0.0, description="Shown to the customer.")
    item_ids: tuple[str, ...] = ()
    cost: Cost = Cost()
    eligibility: Eligibility = Eligibility()
    budget: Budget = Budget()

    @model_validator(mode="after")
    def _check(self) -> OfferSpec:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if (self.kind == "none") != (self.id == NONE_OFFER_ID):
            raise ValueError(f"the offer of kind 'none' must have id {NONE_OFFER_ID!r}")
        return self

    @property
    def is_none(self) -> bool:
        return self.id == NONE_OFFER_ID

    def to_proto(self) -> common_pb2.Offer:
        return common_pb2.Offer(
            offer_id=self.id,
            kind=KINDS[self.kind],  # type: ignore[arg-type]
            value=self.value,
            description=self.description,
            min_cart_value=self.min_cart_value,
            item_ids=list(self.item_ids),
        )


class Exploration(_Strict):
    """Safe exploration of the offer policy."""

    max_share: float = Field(0.05, ge=0.0, le=1.0)
    prior_lift_sd: float = Field(0.5, gt=0.0, le=5.0)
    window: int = Field(1000, ge=10, description="Decisions the exploration share spans.")


class CatalogFile(_Strict):
    """The catalog file's schema."""

    margin_rate: float = Field(0.35, gt=0.0, le=1.0)
    default_order_value: float = Field(40.0, gt=0.0)
    attribution_days: float = Field(7.0, gt=0.0)
    expired_is_no_conversion: bool = True
    exploration: Exploration = Exploration()
    offers: tuple[OfferSpec, ...]


@dataclass(frozen=True)
class Catalog:
    """The validated catalog; ``offers`` always starts with the ``none`` offer."""

    settings: CatalogFile
    offers: tuple[OfferSpec, ...]

    @property
    def by_id(self) -> dict[str, OfferSpec]:
        return {o.id: o for o in self.offers}

    @property
    def fingerprint(self) -> str:
        """Short hash of the catalog content (part of the policy version)."""
        blob = json.dumps(self.settings.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Catalog:
        try:
            parsed = CatalogFile.model_validate(raw)
        except ValidationError as exc:
            raise CatalogError(str(exc)) from exc
        ids = [o.id for o in parsed.offers]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise CatalogError(f"duplicate offer ids {dupes}")
        offers: Sequence[OfferSpec] = parsed.offers
        if NONE_OFFER_ID not in ids:
            offers = [OfferSpec(id=NONE_OFFER_ID, kind="none", description="No incentive")]
            offers += list(parsed.offers)
        else:
            offers = sorted(offers, key=lambda o: not o.is_none)
        return cls(parsed, tuple(offers))

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CatalogError(f"{path}: {exc}") from exc
        if not isinstance(raw, Mapping):
            raise CatalogError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_mapping(raw)
        except CatalogError as exc:
            raise CatalogError(f"{path}: {exc}") from exc
