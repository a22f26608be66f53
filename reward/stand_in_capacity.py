"""A judge service short of capacity, for the loopback judge (reward/judge_server.py): what the
flex tier does when it sheds load, as a fixed model so that a bench measures the client.

- Capacity C(t) follows a schedule: each level held for step_s seconds, the list repeated, from
  the moment the server starts.
- Requests in service share it (processor sharing): with n in service each progresses at
  min(1, C(t) / n) of full speed, so an answer whose own work is base_latency seconds takes
  base_latency x max(1, n / C(t)) while n and C hold.
- A request arriving while n >= shed_factor x C(t) is shed at once: 429 or 503, alternately.

Runs on the server's event loop: one timer for the next completion or capacity step.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class CapacitySchedule:
    levels: tuple[int, ...]  # requests served at full speed at once
    step_s: float  # each level's duration; the list repeats

    def __post_init__(self):
        if not self.levels or min(self.levels) < 1 or self.step_s <= 0:
            raise ValueError(f"a capacity schedule needs levels >= 1 and step_s > 0, got {self}")

    def at(self, t: float) -> int:
        """C at t seconds after the start."""
        return self.levels[int(max(0.0, t) // self.step_s) % len(self.levels)]

    def next_change(self, t: float) -> float:
        """The first step boundary after t."""
        return (math.floor(max(0.0, t) / self.step_s) + 1) * self.step_s

    def integral(self, t0: float, t1: float) -> float:
        """Capacity-seconds from t0 to t1: what a server of this schedule can serve, in seconds of work."""
        total, t = 0.0, max(0.0, t0)
        while t < t1:
            end = min(t1, self.next_change(t))
            total += self.at(t) * (end - t)
            t = end
        return total


class SharedCapacity:
    """Processor sharing under a capacity schedule, with load shedding."""

    def __init__(self, schedule: CapacitySchedule, shed_factor: float = 1.5,
                 clock: Callable[[], float] = time.monotonic):
        if shed_factor < 1:
            raise ValueError(f"shed_factor must be >= 1, got {shed_factor}")
        self.schedule, self.shed_factor, self._clock = schedule, shed_factor, clock
        self.started = clock()
        self._work: dict[int, float] = {}  # request -> seconds of full-speed work left
        self._done: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._at = self.started  # when _work was last brought up to date
        self._timer: asyncio.TimerHandle | None = None
        self._status = itertools.cycle((429, 503))
        self.served = self.shed_429 = self.shed_503 = 0

    def now(self) -> float:
        """Seconds since the start (the schedule's time)."""
        return self._clock() - self.started

    @property
    def in_service(self) -> int:
        return len(self._work)

    def capacity(self) -> int:
        return self.schedule.at(self.now())

    def shed(self) -> int | None:
        """The status to shed an arriving request with, or None to serve it."""
        if len(self._work) < self.shed_factor * self.capacity():
            return None
        status = next(self._status)
        if status == 429:
            self.shed_429 += 1
        else:
            self.shed_503 += 1
        return status

    async def serve(self, work_s: float) -> None:
        """Until work_s seconds of full-speed service are done (shared with the others in service)."""
        self._advance()
        request = next(self._ids)
        self._work[request] = work_s
        self._done[request] = done = asyncio.get_running_loop().create_future()
        self._reschedule()
        try:
            await done
            self.served += 1
        finally:  # a cancelled request (its client gave up) stops taking a share
            if request in self._work:
                self._advance()
                del self._work[request], self._done[request]
                self._reschedule()

    def stats(self) -> dict:
        t = self.now()
        return {"capacity": self.schedule.at(t), "in_service": len(self._work), "served": self.served,
                "shed_429": self.shed_429, "shed_503": self.shed_503, "since_start_s": t,
                "capacity_s": self.schedule.integral(0.0, t)}

    def _rate(self, t: float) -> float:
        return min(1.0, self.schedule.at(t) / len(self._work)) if self._work else 0.0

    def _advance(self) -> None:
        """Bring every request's work left up to now (capacity is constant between timer events)."""
        now = self._clock()
        progress = (now - self._at) * self._rate(self._at - self.started)
        self._at = now
        for request in self._work:
            self._work[request] -= progress

    def _tick(self) -> None:
        self._timer = None
        self._advance()
        for request in [r for r, left in self._work.items() if left <= 1e-9]:
            del self._work[request]
            future = self._done.pop(request)
            if not future.done():
                future.set_result(None)
        self._reschedule()

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._work:
            return
        t = self._at - self.started
        finish = min(self._work.values()) / self._rate(t)
        delay = min(finish, self.schedule.next_change(t) - t)
        self._timer = asyncio.get_running_loop().call_later(max(1e-4, delay), self._tick)
