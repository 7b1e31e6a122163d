"""A real profile service holding a small kitchen catalogue with a popularity order,
for the gateway's tests with real processes."""

from __future__ import annotations

from pathlib import Path

from mercato.v1 import common_pb2, profile_pb2, profile_pb2_grpc
from tests.procs import ServiceProc, start_service
from tests.profile.factory import NOW_US, event, item


def start_popular_profile(tmp: Path, ids: list[str], popular: int) -> ServiceProc:
    """The profile service with ``ids`` in stock (3 each); the first ``popular`` of them
    viewed by ``popular``, ``popular - 1``, ... customers ``u0``, ``u1``, ... a second
    ago, so they are trending in that order."""
    proc = start_service("profile", tmp)
    with proc.channel() as ch:
        stub = profile_pb2_grpc.ProfileServiceStub(ch)
        items = [item(i, "kitchen", 5.0 + k, stock=3) for k, i in enumerate(ids)]
        stub.UpsertItems(profile_pb2.UpsertItemsRequest(items=items), timeout=10)
        view = common_pb2.EventType.EVENT_TYPE_VIEW
        evs = [
            event(f"v{k}-{j}", f"u{j}", view, i, NOW_US - 10**6)
            for k, i in enumerate(ids[:popular])
            for j in range(popular - k)
        ]
        stub.TrackEvents(profile_pb2.ProfileServiceTrackEventsRequest(events=evs), timeout=30)
    return proc
