"""Background tasks of ``mssd serve`` (schedules, listeners, supervisors): how
one is stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task given (None: nothing to stop) and wait until it has
    ended, so that nothing it does outlives the stop."""
    for task in tasks:
        if task is None:
            continue
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
