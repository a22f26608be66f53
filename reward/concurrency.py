"""How many judge requests to keep in flight when the service's capacity is unknown and moving
(the flex tier sheds load: 429/503 at once, and latency stretched to minutes when it is short).

The rule is a latency gradient in the manner of TCP Vegas and Netflix's concurrency-limits,
with a multiplicative decrease on sheds as in AIMD. Why a gradient and not plain AIMD: AIMD finds
the limit only by hitting it, so every probe of the ceiling is a shed attempt, and it grows one
request per round trip, far too slow when capacity quadruples. Latency says more, and says it
before anything is shed: a service that shares its capacity between the requests in service
answers at its base latency while it has room, and stretches every answer by n / capacity once
it has not. So

    r = smoothed latency / baseline latency      (baseline: the lowest latency seen, smoothed
                                                  more; it drifts up slowly, so a slower service
                                                  is learnt.)
    r < grow_below:     there is room: grow by `growth` per answer (x(1 + growth) per round trip)
    r <= shrink_above:  a little queueing, as wanted: grow by one per round trip
    r > shrink_above:   too much queueing: cut to in_flight x target / r, once per round trip
    a shed (429, 503, a timeout): cut to backoff x size, once per round trip, and never above
                        the requests still out (the shed one does not free its place)

Answers to requests sent before the last cut are not counted: they carry a load already cut
(after capacity falls, they come back slow for a while, and would cut the window again and again).
The window grows only while it is what holds requests back (at least `full_share` of it in
flight), so a quiet spell never leaves a window no one has tested. It stays within
[floor, ceiling]; the ceiling is the configured max_in_flight, and every hard limit (RPM, input
TPM, in flight) is still enforced by the limiter around it. Pure: time comes in as `now`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowRule:
    grow_below: float = 1.15  # latency ratio under which the service has room
    shrink_above: float = 1.3  # latency ratio over which requests queue too much
    target: float = 1.2  # the ratio a cut aims at (shedding starts at 1.5 on the bench's service)
    growth: float = 0.4  # per answer while there is room: x1.4 per round trip
    backoff: float = 0.7  # on a shed
    smoothing: float = 0.1  # EWMA weight of one answer's latency
    drift: float = 0.0005  # per answer, how far the baseline follows a latency that stays higher
    full_share: float = 0.8  # the window counts as full at this share in flight

    def __post_init__(self):
        if not 1.0 <= self.grow_below <= self.shrink_above or not 1.0 <= self.target <= self.shrink_above:
            raise ValueError(f"need 1 <= grow_below <= shrink_above and 1 <= target <= shrink_above: {self}")
        if not 0 < self.backoff < 1 or not 0 < self.smoothing <= 1 or self.growth <= 0:
            raise ValueError(f"need 0 < backoff < 1, 0 < smoothing <= 1, growth > 0: {self}")


class AdaptiveWindow:
    def __init__(self, initial: int, ceiling: int, floor: int = 1, rule: WindowRule = WindowRule()):
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor <= ceiling, got floor={floor} ceiling={ceiling}")
        self.floor, self.ceiling, self.rule = floor, ceiling, rule
        self._size = float(min(max(initial, floor), ceiling))
        self.smoothed: float | None = None  # latency, s
        self._slow: float | None = None
        self.baseline: float | None = None  # the lowest slow-smoothed latency
        self.answers = 0
        self._last_cut = self._last_shed_cut = float("-inf")

    @property
    def size(self) -> int:
        return int(self._size)

    @property
    def ratio(self) -> float:
        """Smoothed over baseline latency (1.0 before any answer)."""
        return self.smoothed / self.baseline if self.smoothed and self.baseline else 1.0

    def on_answer(self, latency_s: float, in_flight: int, now: float) -> None:
        """An answer came back after latency_s, with in_flight requests out (itself included). One
        sent before the last cut is old news (it carries a load already cut) and is not counted."""
        rule = self.rule
        if now - latency_s < max(self._last_cut, self._last_shed_cut):
            return
        self.answers += 1
        if self.smoothed is None:
            self.smoothed = self._slow = latency_s
        warm = 1 / self.answers  # at first, plain averages: an EWMA would keep its first answer for long
        self.smoothed += max(rule.smoothing, warm) * (latency_s - self.smoothed)
        self._slow += max(rule.smoothing / 5, warm) * (latency_s - self._slow)  # less noise in its minimum
        if self.baseline is None or self.answers < 50 or self._slow < self.baseline:  # 50: a settled average
            self.baseline = self._slow
        elif in_flight <= 1:  # it had the service to itself: that latency is the service's own
            self.baseline = self._slow = max(self.baseline, min(self.smoothed, latency_s))
        else:
            self.baseline += rule.drift * (self._slow - self.baseline)
        r, full = self.ratio, in_flight >= min(self.size, rule.full_share * self._size)
        if r > rule.shrink_above:
            if full and now - self._last_cut >= self.smoothed:  # once a round trip: its answers carry the old load
                self._last_cut = now
                self._set(min(self._size, in_flight * rule.target / r))
        elif full:
            self._set(self._size + (rule.growth if r < rule.grow_below else 1 / self._size))

    def on_shed(self, in_flight: int, now: float) -> None:
        """The service refused a request for want of capacity (429/503) or did not answer in time;
        in_flight: the requests out, itself included. A shed never frees a place in the window (the
        service already has more than it can take), and cuts it by `backoff` once a round trip."""
        size = self._size
        if now - self._last_shed_cut >= (self.smoothed or 0.0):
            self._last_shed_cut = now
            size *= self.rule.backoff
        self._set(min(size, in_flight - 1))

    def _set(self, size: float) -> None:
        self._size = min(float(self.ceiling), max(float(self.floor), size))
