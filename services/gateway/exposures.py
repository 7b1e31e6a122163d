"""Exposures: what the gateway showed to whom, logged as events off the request path.

Every Recommend / GetRelatedItems / GetCartRecommendations answer for a known customer id
becomes one ``EVENT_TYPE_EXPOSURE`` event in the profile service's event log:

- ``customer_id``, ``surface``, ``request_id``, ``timestamp`` (gateway clock);
- ``experiment`` / ``variant``: the first experiment assignment (if any);
- ``offer_id`` and attribute ``decision_id`` when an offer was shown;
- attributes (JSON strings): ``items`` (item ids in the order shown; position = index + 1),
  ``experiments`` ({experiment: variant}), ``models`` (["name:version@alias", ...]),
  ``call`` (recommend | related | cart), ``degraded`` (comma-separated stages),
  ``anchor_item_id`` (related items).

The request handler only puts the event on a bounded queue (``put_nowait``): when the
queue is full the exposure is dropped and counted, never waited for. One background task
sends batches with the profile service's TrackEvents (idempotent by event id, so a retry
after a timeout is safe). On shutdown (SIGTERM, after in-flight calls drained) the queue
is flushed within a bounded time. ``mercato report ab`` reads these events back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence

import grpc
from prometheus_client import Counter, Gauge

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc

log = logging.getLogger(__name__)

EXPOSURES = Counter(
    "mercato_gateway_exposures_total",
    "Exposure events by outcome: logged (durable in profile) or dropped (and why).",
    ["outcome"],
)
EXPOSURES_DROPPED = Counter(
    "mercato_gateway_exposures_dropped_total",
    "Exposure events not logged: queue full, send failed, or left at shutdown.",
    ["reason"],
)
EXPOSURE_QUEUE = Gauge("mercato_gateway_exposure_queue", "Exposure events waiting to be sent.")


def exposure_event(
    *,
    customer_id: str,
    request_id: str,
    surface: int,
    call: str,
    item_ids: Sequence[str],
    experiments: Sequence[tuple[str, str]] = (),
    models: Sequence[common_pb2.ModelVersion] = (),
    offer_id: str = "",
    decision_id: str = "",
    degraded: Sequence[str] = (),
    anchor_item_id: str = "",
    now: float | None = None,
) -> common_pb2.Event:
    """The exposure event of one answer."""
    ts = now if now is not None else time.time()
    ev = common_pb2.Event(
        event_id=f"x-{uuid.uuid4().hex}",
        customer_id=customer_id,
        type=common_pb2.EVENT_TYPE_EXPOSURE,
        surface=surface,  # type: ignore[arg-type]
        request_id=request_id,
        offer_id=offer_id,
    )
    ev.timestamp.FromNanoseconds(int(ts * 1e9))
    if experiments:
        ev.experiment, ev.variant = experiments[0]
    attrs = ev.attributes
    attrs["call"] = call
    attrs["items"] = json.dumps(list(item_ids), separators=(",", ":"))
    if experiments:
        attrs["experiments"] = json.dumps(dict(experiments), separators=(",", ":"))
    if models:
        attrs["models"] = json.dumps(
            [f"{m.name}:{m.version}@{m.alias}" for m in models], separators=(",", ":")
        )
    if decision_id:
        attrs["decision_id"] = decision_id
    if degraded:
        attrs["degraded"] = ",".join(degraded)
    if anchor_item_id:
        attrs["anchor_item_id"] = anchor_item_id
    return ev


def exposure_items(ev: common_pb2.Event) -> list[str]:
    """The item ids of an exposure event, in the order shown."""
    raw = ev.attributes.get("items", "")
    return list(json.loads(raw)) if raw else []


class ExposureLog:
    """Bounded queue + one sender task writing exposure batches to the profile service."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        max_queue: int = 10_000,
        batch_size: int = 200,
        flush_interval: float = 0.2,
        timeout: float = 2.0,
        enabled: bool = True,
    ) -> None:
        self.stub = profile_pb2_grpc.ProfileServiceStub(channel)
        self.queue: asyncio.Queue[common_pb2.Event] = asyncio.Queue(max_queue)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.timeout = timeout
        self.enabled = enabled
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy = False  # a batch taken off the queue is being sent

    def log(self, event: common_pb2.Event) -> None:
        """Queue an exposure; drops (and counts) it when the queue is full. Never blocks."""
        if not self.enabled or self._closing:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            EXPOSURES_DROPPED.labels("queue_full").inc()
            EXPOSURES.labels("dropped").inc()
            return
        EXPOSURE_QUEUE.set(self.queue.qsize())
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _next_batch(self) -> list[common_pb2.Event]:
        batch = [await self.queue.get()]
        self._busy = True
        end = time.monotonic() + self.flush_interval
        while len(batch) < self.batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = end - time.monotonic()
            if left <= 0 or self._closing:
                break
            try:
                # short slices, so that a shutdown sends a partial batch at once
                batch.append(await asyncio.wait_for(self.queue.get(), min(left, 0.05)))
            except TimeoutError:
                continue
        return batch

    async def _send(self, batch: list[common_pb2.Event]) -> None:
        request = profile_pb2.ProfileServiceTrackEventsRequest(events=batch, partial_accept=True)
        for attempt in range(2):  # idempotent by event id: one retry is safe
            try:
                resp = await self.stub.TrackEvents(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                if attempt == 0 and exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    await asyncio.sleep(0.05)
                    continue
                EXPOSURES_DROPPED.labels("send_failed").inc(len(batch))
                EXPOSURES.labels("dropped").inc(len(batch))
                log.warning(
                    "exposures not logged",
                    extra={"count": len(batch), "code": exc.code().name},
                )
                return
            bad = len(resp.errors)
            EXPOSURES.labels("logged").inc(resp.accepted + resp.duplicates)
            if bad:
                EXPOSURES_DROPPED.labels("rejected").inc(bad)
                EXPOSURES.labels("dropped").inc(bad)
                log.warning("exposures rejected", extra={"first": resp.errors[0].message})
            return

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                EXPOSURE_QUEUE.set(self.queue.qsize())
                await self._send(batch)
            except Exception:  # never let one bad batch stop the sender
                EXPOSURES_DROPPED.labels("send_failed").inc(len(batch))
                EXPOSURES.labels("dropped").inc(len(batch))
                log.exception("exposure batch failed")
            finally:
                self._busy = False

    async def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (bounded by ``timeout``), then stop the sender."""
        self._closing = True
        if self._task is None:
            return
        end = time.monotonic() + timeout
        while (not self.queue.empty() or self._busy) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        left = self.queue.qsize()
        if left:
            EXPOSURES_DROPPED.labels("shutdown").inc(left)
            EXPOSURES.labels("dropped").inc(left)
        EXPOSURE_QUEUE.set(0)
