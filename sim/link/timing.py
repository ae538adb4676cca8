"""Sub-millisecond timers for asyncio.

epoll_wait counts whole milliseconds, rounding up, so a plain asyncio timer
fires up to 1 ms late — as much as the whole RTT tolerance we promise. The
selector below first waits with select() on the epoll descriptor itself,
which has microsecond resolution, then collects the ready events with a
non-blocking epoll. What remains is the OS's wake-up latency (~0.1–0.2 ms on a
busy VM); `Waker` learns it and aims that much early.
"""

from __future__ import annotations

import asyncio
import select
import selectors
from typing import Callable, Coroutine, TypeVar

T = TypeVar("T")
_MAX_BIAS_S = 0.001  # bounds how early a delivery can be if the load suddenly vanishes

if hasattr(selectors, "EpollSelector"):

    class PreciseSelector(selectors.EpollSelector):
        def select(self, timeout=None):
            fd = self.fileno()
            if timeout is not None and timeout > 0 and fd < 1024:  # select() needs fd < FD_SETSIZE
                select.select([fd], [], [], timeout)
                timeout = 0
            return super().select(timeout)

else:  # pragma: no cover - non-Linux
    PreciseSelector = selectors.DefaultSelector  # type: ignore[misc,assignment]


def new_event_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(PreciseSelector())


def run(coro: Coroutine[object, object, T]) -> T:
    """asyncio.run with the precise-timer loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


class Waker:
    """Sleeps until absolute times, aiming early by the wake-up lateness it has seen."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.bias = 0.0

    def due(self, t: float) -> bool:
        return t - self.bias <= self.clock()

    async def sleep_until(self, t: float) -> None:
        aim = t - self.bias
        wait = aim - self.clock()
        if wait <= 0:
            return
        await asyncio.sleep(wait)
        late = self.clock() - aim
        # late is measured against the early aim, so it estimates the full lateness
        self.bias = min(_MAX_BIAS_S, max(0.0, 0.9 * self.bias + 0.1 * late))
