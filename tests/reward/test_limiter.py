"""The project-wide rate limiter: sliding windows of requests and tokens, in-flight cap, FIFO."""
import asyncio
import time

import pytest

from reward.limiter import RateLimiter, RateLimits


def run(coro):
    return asyncio.run(coro)


def max_in_any_window(times, span):
    return max(sum(1 for u in times if t <= u < t + span) for t in times)


def test_requests_per_window_never_exceeded_and_first_burst_is_immediate():
    limits = RateLimits(rpm=5, burst=5, window_s=0.6, margin_s=0.1)

    async def go():
        limiter, grants, t0 = RateLimiter(limits), [], time.monotonic()

        async def one():
            lease = await limiter.acquire()
            grants.append(time.monotonic() - t0)
            limiter.release(lease)
        await asyncio.gather(*(one() for _ in range(12)))
        return grants
    grants = sorted(run(go()))
    assert len(grants) == 12
    assert grants[4] < 0.1  # the first 5 go at once
    assert max_in_any_window(grants, 0.7 - 0.02) <= 5  # window + margin, minus timer slack
    assert grants[5] >= 0.68 and grants[10] >= 1.38  # then 5 more each span, not sooner


def test_requests_are_paced_at_the_limits_rate_after_the_burst():
    limits = RateLimits(rpm=20, burst=2, window_s=1.0, margin_s=0.0)

    async def go():
        limiter, grants, t0 = RateLimiter(limits), [], time.monotonic()
        for _ in range(8):
            limiter.release(await limiter.acquire())
            grants.append(time.monotonic() - t0)
        return grants
    grants = run(go())
    assert grants[1] < 0.02  # the burst goes back to back
    # then one per window / rpm = 50 ms: grant k no earlier than (k - 1) x 50 ms (the bucket refills
    # continuously, so a timer that fired late is made up by the next gap), and none much later
    assert all(g >= (k - 1) * 0.05 - 1e-3 for k, g in enumerate(grants) if k >= 2), grants
    gaps = [b - a for a, b in zip(grants[1:], grants[2:])]
    assert all(g < 0.1 for g in gaps) and grants[-1] < 6 * 0.05 + 0.1, grants


def test_in_flight_cap_waits_for_a_release():
    async def go():
        limiter = RateLimiter(RateLimits(max_in_flight=2))
        a, b = await limiter.acquire(), await limiter.acquire()
        third = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0.05)
        assert not third.done() and limiter.stats()["waiting"] == 1
        limiter.release(a)
        c = await asyncio.wait_for(third, 1)
        assert limiter.stats()["in_flight"] == 2
        limiter.release(b)
        limiter.release(c)
        limiter.release(c)  # twice is harmless
        assert limiter.stats()["in_flight"] == 0
    run(go())


def test_input_tokens_per_window_use_the_actual_usage_once_known():
    async def go():
        limiter = RateLimiter(RateLimits(input_tpm=100, window_s=0.5, margin_s=0.0))
        first = await limiter.acquire(60)
        second = asyncio.ensure_future(limiter.acquire(60))
        await asyncio.sleep(0.05)
        assert not second.done()  # 60 + 60 > 100
        limiter.release(first, actual_tokens=10)  # the estimate was high: 10 + 60 fits
        await asyncio.wait_for(second, 0.1)
        assert limiter.stats()["tokens_in_window"] == 70
    run(go())


def test_a_request_larger_than_the_token_limit_goes_alone():
    async def go():
        limiter = RateLimiter(RateLimits(input_tpm=100, window_s=0.3, margin_s=0.0))
        t0 = time.monotonic()
        limiter.release(await limiter.acquire(50))
        limiter.release(await limiter.acquire(500))  # waits for the window to empty, then goes
        return time.monotonic() - t0
    assert 0.28 <= run(go()) < 1.0


def test_fifo_a_big_request_is_not_starved_by_small_ones():
    async def go():
        limiter = RateLimiter(RateLimits(input_tpm=100, window_s=0.3, margin_s=0.0))
        limiter.release(await limiter.acquire(90))
        order = []

        async def one(name, tokens):
            limiter.release(await limiter.acquire(tokens))
            order.append(name)
        big = asyncio.ensure_future(one("big", 50))
        await asyncio.sleep(0.01)
        await asyncio.gather(big, one("small", 5))  # small fits now, but queues behind big
        return order
    assert run(go()) == ["big", "small"]


def test_a_cancelled_acquire_takes_nothing():
    async def go():
        limiter = RateLimiter(RateLimits(max_in_flight=1))
        held = await limiter.acquire()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(limiter.acquire(), 0.05)
        limiter.release(held)
        await asyncio.wait_for(limiter.acquire(), 0.5)
        assert limiter.stats()["in_flight"] == 1 and limiter.granted == 2
    run(go())


def test_a_lease_whose_holder_died_is_reclaimed():
    async def go():
        limiter = RateLimiter(RateLimits(max_in_flight=1, lease_ttl_s=0.2))
        await limiter.acquire()  # never released
        t0 = time.monotonic()
        await asyncio.wait_for(limiter.acquire(), 2)
        return time.monotonic() - t0
    assert 0.15 <= run(go()) < 1.0


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError, match="max_in_flight"):
        RateLimits(max_in_flight=0)


def test_try_acquire_grants_the_batch_prefix_that_fits_and_nothing_while_someone_waits():
    async def go():
        limiter = RateLimiter(RateLimits(max_in_flight=3))
        batch = limiter.try_acquire([0, 0, 0, 0, 0])
        assert len(batch) == 3 and len(set(batch)) == 3  # the cap: the other two acquire one by one
        queued = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0.01)
        limiter.release(batch[0])
        await asyncio.sleep(0.01)
        assert queued.done()
        blocked = asyncio.ensure_future(limiter.acquire())  # waits: the cap is reached again
        await asyncio.sleep(0.01)
        limiter.release(batch[1])  # room for one, but the queued request comes first
        assert limiter.try_acquire([0]) == []
        await asyncio.sleep(0.01)
        assert blocked.done() and limiter.stats()["in_flight"] == 3

    run(go())
