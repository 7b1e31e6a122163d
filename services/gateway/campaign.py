"""``mercato campaign``: recommendations and the chosen offer for every customer of a
segment, in batch, streamed to CSV or Parquet.

The segment comes from the profile service (``ListAbandonedCarts`` for abandoned carts,
``ListCustomers`` for lapsed customers by RFM recency and for a category's fans); every
customer's answer comes from the gateway's public gRPC API, the same online path as a
shop's call (same models, rules, experiments, offer policy and budgets; exposures are
logged with surface ``email``). Calls run with bounded concurrency; rows are written as
answers arrive (one row per recommended item, the offer repeated on each row; a customer
with no items gets one row with rank 0 so that the offer is not lost).
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mercato.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)

SEGMENTS = ("abandoned-carts", "lapsed", "category-fans")
COLUMNS = (
    "customer_id", "segment", "rank", "item_id", "title", "category", "price", "score",
    "reasons", "offer_id", "offer_kind", "offer_description", "offer_decision_id",
    "degraded", "models", "request_id",
)  # fmt: skip


@dataclass(frozen=True)
class CampaignSpec:
    """Who is in the campaign and what each gets."""

    segment: str
    k: int = 10
    idle_hours: float = 24.0  # abandoned carts: idle at least this long
    max_idle_days: float = 30.0  # ... and not longer than this (0 = no limit)
    lapsed_days: float = 180.0  # lapsed: last purchase at least this long ago
    category: str = ""  # category fans: this category ...
    min_affinity: float = 0.2  # ... with at least this share of interest
    limit: int = 0  # at most this many customers (0 = all)
    page_size: int = 500
    # "Now" for the idle and lapsed windows, microseconds since the epoch (0 = the
    # profile service's clock); on historical data, the data's own time (see data_clock).
    as_of_us: int = 0
    wall_us: int = 0  # the wall clock when as_of_us was chosen (for the lapsed offset)

    def __post_init__(self) -> None:
        if self.segment not in SEGMENTS:
            raise ValueError(f"segment must be one of {', '.join(SEGMENTS)}")
        if self.segment == "category-fans" and not self.category:
            raise ValueError("category-fans needs --category")
        if not 1 <= self.k <= 100:
            raise ValueError("k must be between 1 and 100")


async def segment_customers(
    profile: profile_pb2_grpc.ProfileServiceStub, spec: CampaignSpec, timeout: float = 30.0
) -> AsyncIterator[str]:
    """Customer ids of the segment, page by page."""
    token = ""
    count = 0
    seen: set[str] = set()
    while True:
        ids: list[str]
        if spec.segment == "abandoned-carts":
            carts_req = profile_pb2.ListAbandonedCartsRequest(
                idle_seconds=max(1, int(spec.idle_hours * 3600)),
                max_idle_seconds=int(spec.max_idle_days * 86400),
                page_size=min(1000, spec.page_size),
                page_token=token,
            )
            if spec.as_of_us:
                carts_req.as_of.FromMicroseconds(spec.as_of_us)
            resp = await profile.ListAbandonedCarts(carts_req, timeout=timeout)
            ids = [c.customer_id for c in resp.carts]
            token = resp.next_page_token
        else:
            req = profile_pb2.ListCustomersRequest(
                page_size=min(1000, spec.page_size), page_token=token
            )
            if spec.segment == "lapsed":
                # The service measures recency from its own clock: move the threshold
                # by how far the chosen "now" lies behind it.
                behind = (spec.wall_us - spec.as_of_us) / 86_400e6 if spec.as_of_us else 0.0
                req.min_recency_days = spec.lapsed_days + max(0.0, behind)
            else:
                req.category = spec.category
                req.min_category_affinity = spec.min_affinity
            lc = await profile.ListCustomers(req, timeout=timeout)
            ids = [p.customer_id for p in lc.profiles]
            token = lc.next_page_token
        for cid in ids:
            if cid in seen:  # a scan may return a customer twice (Redis SCAN)
                continue
            seen.add(cid)
            yield cid
            count += 1
            if spec.limit and count >= spec.limit:
                return
        if not token:
            return


async def latest_cart_change(
    profile: profile_pb2_grpc.ProfileServiceStub, timeout: float = 30.0
) -> int:
    """The newest change of any open cart (microseconds; 0 when there is none): how
    recent the shop's activity is, from the profile service's public API."""
    token, latest = "", 0
    while True:
        resp = await profile.ListAbandonedCarts(
            profile_pb2.ListAbandonedCartsRequest(idle_seconds=1, page_size=1000, page_token=token),
            timeout=timeout,
        )
        for cart in resp.carts:
            latest = max(latest, cart.updated_at.ToMicroseconds())
        token = resp.next_page_token
        if not token:
            return latest


def data_clock(latest_us: int, wall_us: int, as_of: str = "auto") -> tuple[int, str]:
    """(as_of_us, text): "now" for the windows and what it is. ``as_of`` is "auto"
    (the data's time when its newest activity is over a week older than the wall clock,
    as on the demo's historical data; else the wall clock), "now", or an ISO time."""
    import pandas as pd

    from mercato.console.analytics import clock_of

    wall = pd.Timestamp(wall_us * 1000, tz="UTC")
    if as_of == "now":
        return 0, f"wall clock {wall:%Y-%m-%d %H:%M} UTC"
    if as_of != "auto":
        try:
            t = pd.Timestamp(as_of)
        except ValueError as exc:
            raise ValueError(f"--as-of must be auto, now or an ISO time, got {as_of!r}") from exc
        t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
        return int(t.value // 1000), f"as of {t:%Y-%m-%d %H:%M} UTC (given)"
    latest = pd.Timestamp(latest_us * 1000, tz="UTC") if latest_us else None
    clock = clock_of(latest, wall)
    if clock.source == "data":
        return int(clock.now.value // 1000), clock.describe().replace(
            "the newest shopper event", "the newest cart change"
        )
    return 0, clock.describe()


def _rows(
    customer_id: str,
    segment: str,
    items: Sequence[gateway_pb2.RecommendedItem],
    offer: common_pb2.Offer,
    decision_id: str,
    degraded: Sequence[common_pb2.Degradation],
    models: Sequence[common_pb2.ModelVersion],
    request_id: str,
) -> list[dict[str, Any]]:
    base = {
        "customer_id": customer_id,
        "segment": segment,
        "offer_id": offer.offer_id,
        "offer_kind": common_pb2.OfferKind.Name(offer.kind).removeprefix("OFFER_KIND_").lower()
        if offer.offer_id
        else "",
        "offer_description": offer.description,
        "offer_decision_id": decision_id,
        "degraded": ",".join(f"{d.stage}:{d.fallback}" for d in degraded),
        "models": ",".join(f"{m.name}:{m.version}@{m.alias}" for m in models),
        "request_id": request_id,
    }
    empty = {"rank": 0, "item_id": "", "title": "", "category": "", "price": 0.0, "score": 0.0}
    if not items:
        return [{**base, **empty, "reasons": ""}]
    return [
        {
            **base,
            "rank": r.rank,
            "item_id": r.item.item_id,
            "title": r.item.title,
            "category": r.item.category,
            "price": r.item.price,
            "score": float(r.score),
            "reasons": ",".join(
                common_pb2.Reason.Name(x).removeprefix("REASON_").lower() for x in r.reasons
            ),
        }
        for r in items
    ]


class CampaignWriter:
    """Streams rows to .csv or .parquet (by suffix)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.kind = out.suffix.lower().lstrip(".")
        if self.kind not in ("csv", "parquet"):
            raise ValueError(f"--out must end in .csv or .parquet, got {out.name!r}")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._pq: Any = None
        self._file: Any = None
        self._csv: Any = None
        if self.kind == "csv":
            self._file = open(out, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
            self._csv.writeheader()

    def _schema(self) -> Any:
        import pyarrow as pa

        types = {"rank": pa.int32(), "price": pa.float64(), "score": pa.float64()}
        return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.rows += len(rows)
        if self._csv is not None:
            self._csv.writerows(rows)
            return
        self._buffer.extend(rows)
        if len(self._buffer) >= 5000:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(self._buffer, schema=self._schema())
        if self._pq is None:
            self._pq = pq.ParquetWriter(str(self.out), self._schema())
        self._pq.write_table(table)
        self._buffer = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            return
        self._flush()
        if self._pq is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([], schema=self._schema()), str(self.out))
        else:
            self._pq.close()


@dataclass
class CampaignResult:
    customers: int = 0
    rows: int = 0
    offers: int = 0
    degraded: int = 0
    failed: int = 0
    offers_by_id: dict[str, int] | None = None


async def run_campaign(
    spec: CampaignSpec,
    gateway: grpc.aio.Channel,
    profile: grpc.aio.Channel,
    out: Path,
    *,
    api_key: str = "",
    concurrency: int = 8,
    timeout: float = 2.0,
    progress: Any = None,
) -> CampaignResult:
    """Compute the campaign through the gateway and write it to ``out``."""
    gw = gateway_pb2_grpc.GatewayServiceStub(gateway)
    prof = profile_pb2_grpc.ProfileServiceStub(profile)
    metadata = (("x-api-key", api_key),) if api_key else ()
    writer = CampaignWriter(out)
    result = CampaignResult(offers_by_id={})
    sem = asyncio.Semaphore(concurrency)
    email = common_pb2.Context(surface=common_pb2.SURFACE_EMAIL)

    async def one(cid: str) -> None:
        try:
            for attempt in range(3):  # every gateway call is idempotent
                try:
                    if spec.segment == "abandoned-carts":
                        cr = await gw.GetCartRecommendations(
                            gateway_pb2.GetCartRecommendationsRequest(
                                customer_id=cid, k=spec.k, context=email, include_offer=True
                            ),
                            timeout=timeout,
                            metadata=metadata,
                        )
                        rows = _rows(
                            cid, spec.segment, cr.items, cr.offer, cr.offer_decision_id,
                            cr.degraded, cr.models, cr.request_id,
                        )  # fmt: skip
                        offer_id, degraded = cr.offer.offer_id, bool(cr.degraded)
                    else:
                        rr = await gw.Recommend(
                            gateway_pb2.RecommendRequest(
                                customer_id=cid,
                                context=email,
                                k=spec.k,
                                include_offer=True,
                                categories=[spec.category] if spec.category else [],
                            ),
                            timeout=timeout,
                            metadata=metadata,
                        )
                        rows = _rows(
                            cid, spec.segment, rr.items, rr.offer, rr.offer_decision_id,
                            rr.degraded, rr.models, rr.request_id,
                        )  # fmt: skip
                        offer_id, degraded = rr.offer.offer_id, bool(rr.degraded)
                    break
                except grpc.aio.AioRpcError as exc:
                    retry = exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
                    if not retry or attempt == 2:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
        except grpc.aio.AioRpcError:
            result.failed += 1
            return
        finally:
            sem.release()
            if progress is not None:
                progress.update(1)
        writer.write(rows)
        result.customers += 1
        result.rows += len(rows)
        if offer_id:
            result.offers += 1
            assert result.offers_by_id is not None
            result.offers_by_id[offer_id] = result.offers_by_id.get(offer_id, 0) + 1
        result.degraded += degraded

    tasks: set[asyncio.Task[None]] = set()
    try:
        async for cid in segment_customers(prof, spec):
            await sem.acquire()
            task = asyncio.create_task(one(cid))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        writer.close()
    return result


def offers_summary(result: CampaignResult) -> str:
    """One line about the offers given."""
    return json.dumps(result.offers_by_id or {}, sort_keys=True)
