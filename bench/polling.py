"""Waiting for a condition by polling it against a deadline, in place of fixed sleeps.

Shared by the tests and the benchmarks (bench must not import tests/).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Call `condition` every `interval` s until it returns something truthy or `timeout` s pass.

    Returns whether it did. It never raises on the deadline: the caller asserts (or raises)
    on the result, so a timeout reads as the caller's own failure.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


async def wait_until_async(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """`wait_until` inside an event loop: sleeps with asyncio so other tasks run meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True
