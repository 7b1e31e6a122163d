"""Background asyncio tasks: stopping them."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_tasks(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel every task given (``None`` skipped), then wait for each to end; its
    cancellation and any error it ended with are swallowed (a stopping service has no
    one to report them to)."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
