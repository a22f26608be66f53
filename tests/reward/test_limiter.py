"""The project-wide rate limiter: sliding windows of requests and tokens, in-flight cap, FIFO.
Every case runs on an event loop with virtual time (the limiter's clock is the loop's): grant
times are exact, whatever the load on this machine."""
import asyncio

import pytest

from reward.limiter import Ask, RateLimiter, RateLimits
from tests.reward.virtual_time import run


def limiter(limits):
    return RateLimiter(limits, clock=asyncio.get_running_loop().time)


def now():
    return asyncio.get_running_loop().time()


def max_in_any_window(times, span):
    return max(sum(1 for u in times if t <= u < t + span) for t in times)


def test_requests_per_window_never_exceeded_and_first_burst_is_immediate():
    limits = RateLimits(rpm=5, burst=5, window_s=0.6, margin_s=0.1)

    async def go():
        lim, grants = limiter(limits), []

        async def one():
            lease = await lim.acquire()
            grants.append(now())
            lim.release(lease)
        await asyncio.gather(*(one() for _ in range(12)))
        return grants
    grants = sorted(run(go()))
    # 5 at once; the next 5 when the first leave the 0.7 s span (window + margin; the timer
    # fires 1 ms after the change), the last 2 one span later
    assert grants == pytest.approx([0.0] * 5 + [0.701] * 5 + [1.402] * 2, abs=1e-9)
    assert max_in_any_window(grants, 0.7) <= 5


def test_requests_are_paced_at_the_limits_rate_after_the_burst():
    limits = RateLimits(rpm=20, burst=2, window_s=1.0, margin_s=0.0)

    async def go():
        lim, grants = limiter(limits), []
        for _ in range(8):
            lim.release(await lim.acquire())
            grants.append(now())
        return grants
    # the burst of 2 back to back, then one per window / rpm = 50 ms: the bucket refills
    # continuously, so the 1 ms timer slack is made up by the next gap and never accumulates
    assert run(go()) == pytest.approx([0.0, 0.0, 0.051, 0.101, 0.151, 0.201, 0.251, 0.301], abs=1e-9)


def test_in_flight_cap_waits_for_a_release():
    async def go():
        lim = limiter(RateLimits(max_in_flight=2))
        a, b = await lim.acquire(), await lim.acquire()
        third = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(60)
        assert not third.done() and lim.stats()["waiting"] == 1
        lim.release(a)
        c = await third
        assert lim.stats()["in_flight"] == 2 and now() == 60  # granted at the release
        lim.release(b)
        lim.release(c)
        lim.release(c)  # twice is harmless
        assert lim.stats()["in_flight"] == 0
    run(go())


def test_input_tokens_per_window_use_the_actual_usage_once_known():
    async def go():
        lim = limiter(RateLimits(input_tpm=100, window_s=0.5, margin_s=0.0))
        first = await lim.acquire(60)
        second = asyncio.ensure_future(lim.acquire(60))
        await asyncio.sleep(0.05)
        assert not second.done()  # 60 + 60 > 100
        lim.release(first, actual_tokens=10)  # the estimate was high: 10 + 60 fits
        await second
        assert lim.stats()["tokens_in_window"] == 70 and now() == 0.05  # at once, not when 60 left
    run(go())


def test_a_request_larger_than_the_token_limit_goes_alone():
    async def go():
        lim = limiter(RateLimits(input_tpm=100, window_s=0.3, margin_s=0.0))
        lim.release(await lim.acquire(50))
        lim.release(await lim.acquire(500))  # waits for the window to empty, then goes
        return now()
    assert run(go()) == pytest.approx(0.301, abs=1e-9)  # the 50 leave at 0.3, the timer fires 1 ms later


def test_fifo_a_big_request_is_not_starved_by_small_ones():
    async def go():
        lim = limiter(RateLimits(input_tpm=100, window_s=0.3, margin_s=0.0))
        lim.release(await lim.acquire(90))
        order = []

        async def one(name, tokens):
            lim.release(await lim.acquire(tokens))
            order.append(name)
        big = asyncio.ensure_future(one("big", 50))
        await asyncio.sleep(0.01)
        await asyncio.gather(big, one("small", 5))  # small fits now, but queues behind big
        return order
    assert run(go()) == ["big", "small"]


def test_a_cancelled_acquire_takes_nothing():
    async def go():
        lim = limiter(RateLimits(max_in_flight=1))
        held = await lim.acquire()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lim.acquire(), 0.05)
        lim.release(held)
        await lim.acquire()
        assert lim.stats()["in_flight"] == 1 and lim.granted == 2 and lim.stats()["waiting"] == 0
    run(go())


def test_a_lease_whose_holder_died_is_reclaimed():
    async def go():
        lim = limiter(RateLimits(max_in_flight=1, lease_ttl_s=0.2))
        await lim.acquire()  # never released
        await lim.acquire()
        return now()
    assert run(go()) == pytest.approx(0.201, abs=1e-9)  # reclaimed past its 0.2 s TTL (+1 ms timer)


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError, match="max_in_flight"):
        RateLimits(max_in_flight=0)


def test_try_acquire_grants_the_batch_prefix_that_fits_and_nothing_while_someone_waits():
    async def go():
        lim = limiter(RateLimits(max_in_flight=3))
        batch = lim.try_acquire([Ask()] * 5)
        assert len(batch) == 3 and len(set(batch)) == 3  # the cap: the other two acquire one by one
        queued = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(0.01)
        lim.release(batch[0])
        await asyncio.sleep(0.01)
        assert queued.done()
        blocked = asyncio.ensure_future(lim.acquire())  # waits: the cap is reached again
        await asyncio.sleep(0.01)
        lim.release(batch[1])  # room for one, but the queued request comes first
        assert lim.try_acquire([Ask()]) == []
        await asyncio.sleep(0.01)
        assert blocked.done() and lim.stats()["in_flight"] == 3

    run(go())


def test_waiters_are_granted_by_priority_then_in_arrival_order():
    async def go():
        lim, order = limiter(RateLimits(max_in_flight=1)), []
        held = await lim.acquire()

        async def one(name, priority):
            lim.release(await lim.acquire(0, priority))
            order.append(name)
        tasks = [asyncio.ensure_future(one(name, p)) for name, p in
                 (("validation", (True, 0)), ("step 3", (False, 3)), ("step 2 a", (False, 2)), ("step 2 b", (False, 2)))]
        await asyncio.sleep(0)
        lim.release(held)
        await asyncio.gather(*tasks)
        return order
    assert run(go()) == ["step 2 a", "step 2 b", "step 3", "validation"]


def test_a_retry_over_the_budget_waits_while_first_attempts_go_past_it():
    limits = RateLimits(max_in_flight=100, retry_budget=0.5, retry_budget_min_per_s=0.1, retry_window_s=10)

    async def go():
        lim = limiter(limits)
        await lim.acquire(0, (), retry=True)  # the floor allows one retry in 10 s
        late_retry = asyncio.ensure_future(lim.acquire(0, (), retry=True))
        await asyncio.sleep(1)
        held = lim.stats()["retries_held"]
        await lim.acquire()  # a first attempt is not held up; it adds half a retry to the budget
        await lim.acquire()  # and with this one, a whole one
        await asyncio.sleep(0)
        return held, late_retry.done(), now(), lim.stats()["retry_budget_used"]
    held, retried, t, used = run(go())
    assert held == 1 and retried and t == 1.0 and used == 1.0


def test_the_budget_lets_a_held_retry_go_when_old_retries_leave_its_window():
    limits = RateLimits(max_in_flight=100, retry_budget=0.0, retry_budget_min_per_s=0.1, retry_window_s=10)

    async def go():
        lim = limiter(limits)
        await lim.acquire(0, (), retry=True)
        await lim.acquire(0, (), retry=True)
        return now()
    assert run(go()) == pytest.approx(10.0, abs=0.01)


def test_stats_report_the_window_shed_rate_and_goodput():
    async def go():
        lim = limiter(RateLimits(max_in_flight=8, adaptive=True, initial_in_flight=4, window_s=60))
        leases = [await lim.acquire() for _ in range(4)]
        lim.release(leases[0], latency_s=1.0)
        lim.release(leases[1], latency_s=1.0)
        lim.release(leases[2], latency_s=1.0)
        lim.release(leases[3], shed=True)
        return lim.stats()
    stats = run(go())
    assert stats["shed_rate"] == 0.25 and stats["answered_per_s"] == 3 / 60 and stats["shed"] == 1
    assert 1 <= stats["window"] <= 8
