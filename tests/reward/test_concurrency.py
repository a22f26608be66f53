"""The adaptive window (reward/concurrency.py) inside the limiter, against the loopback judge's
capacity model (reward/stand_in_capacity.py: processor sharing, shed at 1.5 x capacity), on an
event loop with virtual time: a standing backlog of stories, each retried after a shed."""
import asyncio
import random
import statistics

import pytest

from reward.concurrency import AdaptiveWindow, WindowRule
from reward.limiter import RateLimiter, RateLimits
from reward.stand_in_capacity import CapacitySchedule, SharedCapacity
from tests.reward.virtual_time import run


def drive(levels, step_s, seconds, *, max_in_flight=64, initial=16, backlog=200, seed=0):
    """(window every 0.5 s, stories served, attempts shed, most leases ever out)."""
    async def go():
        clock = asyncio.get_running_loop().time
        service = SharedCapacity(CapacitySchedule(tuple(levels), step_s), 1.5, clock)
        limiter = RateLimiter(RateLimits(max_in_flight=max_in_flight, adaptive=True, initial_in_flight=initial,
                                         retry_budget=0.2), clock=clock)
        rng, seen = random.Random(seed), {"shed": 0, "served": 0, "most_out": 0}

        async def story():
            for attempt in range(1, 100):
                lease = await limiter.acquire(0, (), attempt > 1)
                seen["most_out"] = max(seen["most_out"], limiter.stats()["in_flight"])
                if service.shed() is not None:
                    seen["shed"] += 1
                    limiter.release(lease, shed=True)
                    await asyncio.sleep(1.0 + rng.random())
                    continue
                sent = clock()
                await service.serve(rng.uniform(0.8, 1.2))
                seen["served"] += 1
                limiter.release(lease, latency_s=clock() - sent)
                return

        tasks, windows = set(), []
        while clock() - service.started < seconds:
            while len(tasks) < backlog:
                task = asyncio.ensure_future(story())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            windows.append(limiter.stats()["window"])
            await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        return windows, seen["served"], seen["shed"], seen["most_out"]
    return run(go())


def test_grows_to_the_capacity_and_settles_short_of_the_shed_line():
    windows, served, shed, _ = drive([48], 1000, 60, initial=4, max_in_flight=200)  # a ceiling past the shed line
    assert max(windows[:20]) >= 48, "from 4 to the capacity within 10 s"
    settled = windows[40:]
    assert 48 <= statistics.mean(settled) < 1.5 * 48
    assert shed <= 0.01 * served


def test_shrinks_when_capacity_falls_and_grows_back_when_it_returns():
    windows, served, shed, _ = drive([48, 6, 48], 30, 90)
    assert 6 <= statistics.mean(windows[100:120]) < 1.5 * 6, "shrunk to the lower capacity"
    assert min(windows[125:180]) >= 6 and max(windows[120:140]) >= 48, "back up within 10 s"
    assert shed <= 0.02 * served
    # what the window buys: the service's capacity-seconds served, within 10%
    assert served >= 0.9 * (48 + 6 + 48) * 30 / 1.0


def test_never_exceeds_the_hard_in_flight_limit():
    windows, _, _, most_out = drive([1000], 1000, 30, max_in_flight=20)
    assert max(windows) == 20 and most_out == 20


def test_a_shed_cuts_once_a_round_trip_and_frees_no_place():
    w = AdaptiveWindow(initial=40, ceiling=100)
    w.on_answer(1.0, 40, 1.0)
    w.on_shed(in_flight=40, now=2.0)
    assert w.size == int(40 * w.rule.backoff)
    w.on_shed(in_flight=30, now=2.1)  # the same round trip: no second cut, but no place for another try
    assert w.size == 28 == int(40 * w.rule.backoff)
    w.on_shed(in_flight=10, now=2.2)
    assert w.size == 9
    for k in range(50):
        w.on_shed(in_flight=1, now=10.0 + k * 10)
    assert w.size == w.floor == 1


def test_answers_sent_before_a_cut_do_not_cut_again():
    w = AdaptiveWindow(initial=40, ceiling=100)
    w.on_answer(1.0, 40, 1.0)
    w.on_shed(in_flight=40, now=2.0)
    after_shed = w.size
    for k in range(20):  # slow answers to requests sent before the shed
        w.on_answer(8.0, 30, 2.5 + k * 0.1)
    assert w.size == after_shed


def test_a_slower_service_is_learnt_not_taken_for_queueing():
    w, t = AdaptiveWindow(initial=16, ceiling=64), 0.0
    for base in (1.0, 3.0):  # then the service itself gets 3x slower, whatever the load
        for _ in range(3000):
            t += base / w.size
            w.on_answer(base, w.size, t)
    assert w.size == 64, "cut at first, then grown back: with a window of one the latency is the service's own"


@pytest.mark.parametrize("bad", [dict(grow_below=1.5, shrink_above=1.2), dict(backoff=1.0), dict(growth=0)])
def test_a_rule_that_cannot_work_is_refused(bad):
    with pytest.raises(ValueError):
        WindowRule(**bad)
