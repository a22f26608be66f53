"""One rate limit for the whole project: requests and input tokens per sliding window, and
requests in flight. Plain asyncio; cluster/judge_pool.py runs one instance as an async Ray actor that
every reward worker leases from (one lease per HTTP attempt, retries included).

The windows are sliding logs of grant times, the way a service counts arrivals: that is the
guarantee. A token bucket alone would not hold it (a full bucket lets a burst through and then
rpm more within the same minute). The log alone lets the whole minute's quota go at once and
then stalls for the rest of the minute, so requests are also paced: a bucket of `burst`
requests refilled at rpm per window spreads them evenly at the limit's rate.

Requests arrive at the service a little after their grant (a Ray reply, the request built and
sent), so the window is widened by margin_s: grants inside any window_s + margin_s never exceed
the limit, hence arrivals inside any window_s never do unless one trails its grant by more.

Under those hard limits (which hold whatever else happens):
- adaptive: the in-flight cap follows the service (reward/concurrency.py): every attempt's outcome
  comes back on release (its latency, or that it was shed), and one window serves every worker.
- order: waiters are granted by priority (lowest first; equal ones first come, first served), the
  key the caller sends (reward/pool.py: the story closest to blocking a step first).
- retry budget: retries granted in the last retry_window_s stay under retry_budget x first
  attempts + retry_budget_min_per_s x retry_window_s; a retry beyond it waits (it never fails for
  it) while first attempts go past it, so a shedding service is not hammered.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from reward.concurrency import AdaptiveWindow


@dataclass(frozen=True)
class RateLimits:
    rpm: int = 0  # requests per window; 0 = no limit
    burst: int = 0  # requests that may go back to back; 0 = rpm / 10
    input_tpm: int = 0  # input tokens per window; 0 = no limit
    max_in_flight: int = 32
    window_s: float = 60.0
    margin_s: float = 1.0
    lease_ttl_s: float = 3600.0  # a lease whose holder died is reclaimed after this
    adaptive: bool = False  # the in-flight cap follows the service's latency and sheds, under max_in_flight
    initial_in_flight: int = 16  # the adaptive window's start
    retry_budget: float | None = None  # retries per first attempt (plus the floor below); None: no budget
    retry_budget_min_per_s: float = 1.0
    retry_window_s: float = 10.0

    def __post_init__(self):
        if self.rpm < 0 or self.input_tpm < 0 or self.max_in_flight < 1 or self.window_s <= 0 or self.margin_s < 0 \
                or self.initial_in_flight < 1 or (self.retry_budget is not None and self.retry_budget < 0) \
                or self.retry_budget_min_per_s < 0 or self.retry_window_s <= 0:
            raise ValueError(f"invalid rate limits: {self}")


class Ask(NamedTuple):
    """One attempt's request for a lease."""
    tokens: int = 0  # estimated input tokens
    priority: tuple = ()  # lower goes first
    retry: bool = False  # not the story's first attempt: under the retry budget

    @classmethod
    def of(cls, tokens=0, priority=(), retry=False) -> Ask:
        """From what a caller (or a Ray message) sends: tokens never negative, priority a tuple."""
        return cls(max(0, int(tokens)), tuple(priority), bool(retry))


@dataclass
class _Lease:
    granted: float
    tokens: int


class RateLimiter:
    """FIFO: a request that does not fit yet blocks the ones behind it, so a big story is never
    starved by a stream of small ones. A single request bigger than input_tpm goes alone."""

    def __init__(self, limits: RateLimits, clock=time.monotonic):
        self.limits, self._clock = limits, clock
        self._span = limits.window_s + limits.margin_s
        self._burst = limits.burst or max(1, limits.rpm // 10)
        self._pace_per_s = limits.rpm / self._span  # the rate the window sustains, margin included
        self._bucket, self._bucket_at = float(self._burst), clock()
        self._requests: deque[float] = deque()  # grant times inside the span
        self._tokens: deque[_Lease] = deque()  # leases inside the span (tokens counted)
        self._tokens_in_window = 0
        self._open: dict[int, _Lease] = {}
        self._ids = itertools.count(1)
        self._waiters: list[tuple[tuple, int, Ask, asyncio.Future]] = []  # a heap: (priority, arrival, ask, future)
        self._arrivals = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self.window = (AdaptiveWindow(limits.initial_in_flight, limits.max_in_flight) if limits.adaptive else None)
        self._firsts: deque[float] = deque()  # grant times of first attempts inside retry_window_s
        self._retries: deque[float] = deque()  # and of retries
        self._answers: deque[float] = deque()  # release times of answered attempts inside window_s
        self._sheds: deque[float] = deque()  # and of shed ones
        self.retries_held = 0
        self.granted = self.shed = 0
        self.wait_s_total = 0.0

    def try_acquire(self, asks: list[tuple]) -> list[int]:
        """Leases for the leading asks (Ask fields) of a batch that fit now, without waiting (none
        while anyone queues); the caller acquires the rest one by one."""
        now = self._clock()
        self._prune(now)
        granted = []
        if not self._waiters:
            for ask in (Ask.of(*a) for a in asks):
                if not (self._fits(ask.tokens) and (not ask.retry or self._retry_allowed())):
                    break
                granted.append(self._grant(ask, now))
        self._grant_ready()
        return granted

    async def acquire(self, tokens: int = 0, priority: tuple = (), retry: bool = False) -> int:
        """Wait for capacity; returns a lease id for release()."""
        future, ask = asyncio.get_running_loop().create_future(), Ask.of(tokens, priority, retry)
        heapq.heappush(self._waiters, (ask.priority, next(self._arrivals), ask, future))
        self._grant_ready()
        start = self._clock()
        try:
            lease_id = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as we were cancelled
                self.release(future.result())
            self._grant_ready()  # whoever queued behind us may fit now
            raise
        self.wait_s_total += self._clock() - start
        return lease_id

    def release(self, lease_id: int, actual_tokens: int | None = None, latency_s: float | None = None,
                shed: bool = False) -> None:
        """The attempt ended. actual_tokens (from the answer's usage) replaces the estimate;
        latency_s: it was answered after that long; shed: refused for want of capacity or timed out."""
        now = self._clock()
        in_flight = len(self._open)
        lease = self._open.pop(lease_id, None)
        if lease is None:
            return
        if actual_tokens is not None and now - lease.granted < self._span:
            self._tokens_in_window += actual_tokens - lease.tokens
            lease.tokens = actual_tokens
        if shed:
            self.shed += 1
            self._sheds.append(now)
            if self.window is not None:
                self.window.on_shed(in_flight, now)
        elif latency_s is not None:
            self._answers.append(now)
            if self.window is not None:
                self.window.on_answer(latency_s, in_flight, now)
        self._grant_ready()

    def stats(self) -> dict:
        self._prune(self._clock())
        answered, shed = len(self._answers), len(self._sheds)
        budget = self._retry_allowance()
        return {"granted": self.granted, "in_flight": len(self._open), "waiting": len(self._waiters),
                "requests_in_window": len(self._requests), "tokens_in_window": self._tokens_in_window,
                "wait_s_total": self.wait_s_total, "window": self._cap(),
                "answered_per_s": answered / self.limits.window_s,  # goodput over the last window_s
                "shed_rate": shed / (answered + shed) if answered + shed else 0.0,
                "shed": self.shed, "retries_held": self.retries_held,
                "retry_budget_used": len(self._retries) / budget if budget else 0.0}

    def _cap(self) -> int:
        return self.window.size if self.window is not None else self.limits.max_in_flight

    def _retry_allowance(self) -> float:
        """Retries the budget allows in the trailing retry_window_s; inf without a budget."""
        lim = self.limits
        if lim.retry_budget is None:
            return float("inf")
        return lim.retry_budget * len(self._firsts) + lim.retry_budget_min_per_s * lim.retry_window_s

    def _retry_allowed(self) -> bool:
        return len(self._retries) < self._retry_allowance()

    def _prune(self, now: float) -> None:
        self._bucket = min(self._burst, self._bucket + (now - self._bucket_at) * self._pace_per_s)
        self._bucket_at = now
        while self._requests and now - self._requests[0] >= self._span:
            self._requests.popleft()
        while self._tokens and now - self._tokens[0].granted >= self._span:
            self._tokens_in_window -= self._tokens.popleft().tokens
        for lease_id in [i for i, lease in self._open.items() if now - lease.granted > self.limits.lease_ttl_s]:
            del self._open[lease_id]
        for times, span in ((self._firsts, self.limits.retry_window_s), (self._retries, self.limits.retry_window_s),
                            (self._answers, self.limits.window_s), (self._sheds, self.limits.window_s)):
            while times and now - times[0] >= span:
                times.popleft()

    def _fits(self, tokens: int) -> bool:
        lim = self.limits
        if len(self._open) >= self._cap():
            return False
        if lim.rpm and (len(self._requests) >= lim.rpm or self._bucket < 1):
            return False
        return not lim.input_tpm or self._tokens_in_window + tokens <= lim.input_tpm or not self._tokens

    def _grant(self, ask: Ask, now: float) -> int:
        tokens = ask.tokens
        (self._retries if ask.retry else self._firsts).append(now)
        lease_id, lease = next(self._ids), _Lease(now, tokens)
        self._open[lease_id] = lease
        self._requests.append(now)
        self._tokens.append(lease)
        self._tokens_in_window += tokens
        self._bucket -= 1
        self.granted += 1
        return lease_id

    def _next_change(self, now: float) -> float | None:
        """Seconds until the pacing bucket holds a request, the oldest window entry leaves or
        the oldest lease expires."""
        times = [self._requests[0] + self._span] if self._requests else []
        if self.limits.rpm and self._bucket < 1:
            times.append(now + (1 - self._bucket) / self._pace_per_s)
        if self._tokens:
            times.append(self._tokens[0].granted + self._span)
        if self._open:
            times.append(min(lease.granted for lease in self._open.values()) + self.limits.lease_ttl_s)
        if self.retries_held and self._retries:
            times.append(self._retries[0] + self.limits.retry_window_s)
        return max(0.0, min(times) - now) if times else None

    def _grant_ready(self) -> None:
        """Grant the best waiter while it fits (a retry over the budget steps aside for the ones
        behind it); then wake up when the window next moves (a timer, not a task: nothing is left
        pending when the process ends)."""
        now = self._clock()
        self._prune(now)
        held = []
        while self._waiters:
            ask, future = self._waiters[0][2:]
            if future.done():  # a cancelled acquire takes nothing
                heapq.heappop(self._waiters)
            elif ask.retry and not self._retry_allowed():
                held.append(heapq.heappop(self._waiters))
            elif self._fits(ask.tokens):
                heapq.heappop(self._waiters)
                future.set_result(self._grant(ask, now))
            else:
                break
        for waiter in held:
            heapq.heappush(self._waiters, waiter)
        self.retries_held = len(held)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delay = self._next_change(now) if self._waiters else None
        if delay is not None:
            self._timer = asyncio.get_running_loop().call_later(delay + 1e-3, self._grant_ready)


class LimiterService:
    """RateLimiter with every method a coroutine, so that in an async Ray actor all of them run on
    the actor's one event loop (a plain method there may run on another thread)."""

    def __init__(self, limits: RateLimits):
        self.limiter = RateLimiter(limits)

    async def acquire(self, tokens: int = 0, priority: tuple = (), retry: bool = False) -> int:
        return await self.limiter.acquire(tokens, priority, retry)

    async def try_acquire(self, asks: list[tuple]) -> list[int]:
        return self.limiter.try_acquire(asks)

    async def release(self, lease_id: int, actual_tokens: int | None = None, latency_s: float | None = None,
                      shed: bool = False) -> None:
        self.limiter.release(lease_id, actual_tokens, latency_s, shed)

    async def release_many(self, leases: list[tuple]) -> None:
        """(lease_id, actual_tokens, latency_s, shed) each."""
        for lease in leases:
            self.limiter.release(*lease)

    async def stats(self) -> dict:
        return self.limiter.stats()


class RemoteLimiter:
    """The named LimiterService actor as a Limiter, from inside a reward worker's event loop. Found
    by name, so a restarted worker's constructor arguments hold no actor handle.

    Batched, because two Ray calls per judge request cost the judge side more CPU than the HTTP
    call itself: acquires made in the same loop turn go as one try_acquire (what fits now is
    granted at once; the rest wait in the limiter's queue one by one, as before), and releases
    gather for release_delay_s and go as one call (a lease held a little longer only makes the
    in-flight cap stricter; the windows count grant times, not releases)."""

    def __init__(self, name: str, namespace: str, release_delay_s: float = 0.05):
        self.name, self.namespace, self.release_delay_s = name, namespace, release_delay_s
        self._handle = None
        self._acquires: list[tuple[Ask, asyncio.Future]] = []
        self._releases: list[tuple] = []
        self._release_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0  # Ray calls made (acquire, try_acquire, release_many)

    @property
    def handle(self):
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return self._handle

    async def acquire(self, tokens: int = 0, priority: tuple = (), retry: bool = False) -> int:
        future = asyncio.get_running_loop().create_future()
        self._acquires.append((Ask(tokens, priority, retry), future))
        if len(self._acquires) == 1:
            self._spawn(self._send_acquires())
        return await future

    def release(self, lease_id: int, actual_tokens: int | None = None, latency_s: float | None = None,
                shed: bool = False) -> None:
        self._releases.append((lease_id, actual_tokens, latency_s, shed))
        if self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_later(self.release_delay_s, self.flush)

    def flush(self) -> None:
        """Send the gathered releases now."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._releases:
            batch, self._releases = self._releases, []
            self.calls += 1
            self.handle.release_many.remote(batch)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_acquires(self) -> None:
        await asyncio.sleep(0)  # let this loop turn's other acquires join the batch
        batch, self._acquires = self._acquires, []
        try:
            self.calls += 1
            leases = await self.handle.try_acquire.remote([tuple(ask) for ask, _ in batch])
        except Exception as e:  # noqa: BLE001 -- every waiter of the batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), lease in zip(batch, leases):
            self._hand_over(future, lease)
        for ask, future in batch[len(leases):]:
            self._spawn(self._acquire_one(ask, future))

    async def _acquire_one(self, ask: Ask, future: asyncio.Future) -> None:
        try:
            self.calls += 1
            self._hand_over(future, await self.handle.acquire.remote(*ask))
        except Exception as e:  # noqa: BLE001
            if not future.done():
                future.set_exception(e)

    def _hand_over(self, future: asyncio.Future, lease: int) -> None:
        if future.done():  # the acquire was cancelled meanwhile: give the lease back
            self.release(lease, 0)
        else:
            future.set_result(lease)

    def __getstate__(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "release_delay_s": self.release_delay_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
