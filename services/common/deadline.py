"""Stop work nobody waits for: check the caller's remaining deadline before an
expensive stage (#14).

When the caller's deadline has passed, the caller already has DEADLINE_EXCEEDED from
its own gRPC library; anything the server still computes is wasted CPU that delays the
calls someone does wait for. :func:`ensure_time_left` raises
:class:`~services.common.errors.DeadlineExceeded` instead (counted per service and
stage in ``mercato_deadline_skipped_total``).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from prometheus_client import Counter

from services.common.errors import DeadlineExceeded

SKIPPED = Counter(
    "mercato_deadline_skipped_total",
    "Stages skipped because the caller's deadline had passed.",
    ["stage"],
)
_children: dict[str, Counter] = {}


def check_time_left(time_remaining: Callable[[], float | None] | None, stage: str) -> None:
    """Raise DeadlineExceeded when ``time_remaining()`` (seconds, None = no deadline)
    is not positive."""
    if time_remaining is None:
        return
    left = time_remaining()
    if left is not None and left <= 0:
        child = _children.get(stage)
        if child is None:
            child = _children[stage] = SKIPPED.labels(stage)
        child.inc()
        raise DeadlineExceeded(f"the caller's deadline passed before {stage}; work skipped")


def ensure_time_left(context: grpc.aio.ServicerContext, stage: str) -> None:
    """:func:`check_time_left` for a servicer context."""
    check_time_left(context.time_remaining, stage)
