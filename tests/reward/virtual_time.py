"""An event loop with virtual time, for timing tests that must not depend on this machine's load:
when nothing is ready, time jumps to the next timer instead of passing."""
import asyncio
import selectors


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """When nothing is ready, time jumps to the next timer instead of passing; with no timer
    either, nothing could ever wake a waiter: an error, not a hang."""

    def __init__(self):
        super().__init__(selectors.DefaultSelector())
        self._now = 0.0
        select = self._selector.select

        def jump(timeout=None):
            events = select(0)
            if not events and timeout is None:
                raise RuntimeError("deadlock: tasks wait and no timer is set")
            if not events:
                self._now += timeout
            return events
        self._selector.select = jump

    def time(self) -> float:
        return self._now


def run(coro):
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
