"""The reward pool on Ray: async workers under one limiter, batched dispatch, per-story futures,
the judge cache and spend; against the loopback judge."""
import asyncio
import itertools
import time

import pytest
import ray

from cluster.roles import reward_params
from conf import load_config
from reward.cache import JudgeCache
from reward.judge_client import JudgeSettings, RetryPolicy
from reward.judge_server import Faults, LocalJudgeServer
from reward.limiter import LimiterService, RateLimits, RemoteLimiter
from reward.pool import RewardPool
from reward.spend import Prices
from reward.worker import RewardWorker, ScoringJob

STORY = ("<think>\nplan the turn\n</think>\n\nMara counted ships. \"Nine winters,\" she said, and the lamp "
         "turned above her while the fog came in thick as wool.\n\nA hull slid out of the dark. She ran down "
         "the steps, two at a time, and did not count again.")

POOLS = itertools.count()


def jobs(n, tag="s"):
    return [ScoringJob(f"u{i}/{tag}", f"Write about ship {i}. The story should be approximately 60 words long.",
                       STORY.replace("Nine", f"Nine-{i}-{tag}"), 60, 80, 6, False) for i in range(n)]


def flex_usd(billed):
    """The server's billed tokens at the default Gemini Flash prices, by hand: $0.50 per million
    input tokens, $3.00 per million output tokens (thoughts are output), flex at half price."""
    return (billed["input_tokens"] * 0.50 + (billed["output_tokens"] + billed["thought_tokens"]) * 3.00) / 1e6 * 0.5


def make_pool(base_url, tmp_path, *, workers=2, limits=RateLimits(), cache=True, **retry):
    cfg = load_config([])
    settings = JudgeSettings(backend="local", model="gemini-3-flash-preview", base_url=base_url,
                             retry=RetryPolicy(**{"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5, **retry}))
    name = f"limiter-{next(POOLS)}"
    limiter = ray.remote(LimiterService).options(name=name, namespace="test", max_concurrency=1000).remote(limits)
    actors = [ray.remote(RewardWorker).options(max_concurrency=1000, max_restarts=1)
              .remote(settings, reward_params(cfg, validation=False), RemoteLimiter(name, "test"))
              for _ in range(workers)]
    pool = RewardPool(actors, cache_params=settings.cache_params(), prices=Prices(), flex=True,
                      cache=JudgeCache(tmp_path / "cache.sqlite") if cache else None)
    return pool, actors, limiter


def test_each_story_gets_its_own_future_and_batches_share_a_call(ray_address, tmp_path):
    with LocalJudgeServer() as srv:
        pool, actors, _ = make_pool(srv.base_url, tmp_path)
        try:
            futures = [pool.submit(job) for job in jobs(20)]
            results = [f.result(timeout=60) for f in futures]
            metrics = pool.take_metrics()
        finally:
            pool.close()
        assert len(srv.requests) == 20
        billed = srv.stats()["billed"]
    assert [r.key for r in results] == [j.key for j in jobs(20)]
    assert all(r.valid and r.judge_attempts == 1 and not r.cached for r in results)
    assert pool.batches_sent < 20  # submitted one by one, dispatched together
    assert metrics["judge/stories"] == 20 and metrics["judge/failed"] == 0 and metrics["judge/requests"] == 20
    assert billed["thought_tokens"] > 0
    assert metrics["judge/input_tokens"] == billed["input_tokens"]
    assert metrics["judge/output_tokens"] == billed["output_tokens"] + billed["thought_tokens"]
    assert metrics["judge/spend_usd"] == pytest.approx(flex_usd(billed)) == metrics["judge/spend_usd_total"]
    assert pool.take_metrics()["judge/stories"] == 0  # per step: counters restart


def test_repeated_stories_are_served_from_the_cache_for_free(ray_address, tmp_path):
    with LocalJudgeServer() as srv:
        first, _, _ = make_pool(srv.base_url, tmp_path)
        fresh = first.score(jobs(6))
        first.take_metrics()
        first.close()
        second, _, _ = make_pool(srv.base_url, tmp_path)  # a new run on the same cache file
        try:
            again = second.score(jobs(6) + jobs(2, tag="new"))
            m = second.take_metrics()
        finally:
            second.close()
        assert len(srv.requests) == 6 + 2
    assert [a.reward for a in again[:6]] == [f.reward for f in fresh]  # same judgment -> same reward
    assert all(a.cached and a.input_tokens == 0 for a in again[:6])
    assert m["judge/cache_hits"] == 6 and m["judge/cache_hit_rate"] == pytest.approx(6 / 8)
    assert m["judge/requests"] == 2


def test_faulty_judge_every_story_judged_or_counted_invalid(ray_address, tmp_path):
    with LocalJudgeServer(faults=Faults(p_429=0.2, p_503=0.2, p_truncated=0.2, retry_after_s=0, seed=3)) as srv:
        pool, _, _ = make_pool(srv.base_url, tmp_path, max_attempts=2)
        try:
            results = pool.score(jobs(30))
            m = pool.take_metrics()
        finally:
            pool.close()
        billed = srv.stats()["billed"]
    failed = [r for r in results if not r.valid]
    assert failed and len(failed) < 30  # 0.6^2: about a third fail after two attempts
    assert all(r.reward is None and r.judgment is None and r.judge_error for r in failed)
    assert m["judge/failed"] == len(failed) and m["judge/retries"] > 0
    assert m["judge/requests"] == sum(r.judge_attempts for r in results)
    assert m["judge/spend_usd"] == pytest.approx(flex_usd(billed))  # truncated answers are billed too
    with JudgeCache(tmp_path / "cache.sqlite") as cache:
        assert len(cache) == 30 - len(failed)  # failures are never cached


def test_workers_share_one_limit_and_the_server_sees_no_violation(ray_address, tmp_path):
    window, limit = 2.0, 6
    with LocalJudgeServer(rpm_limit=limit, window_s=window) as srv:
        pool, _, _ = make_pool(srv.base_url, tmp_path, workers=3, cache=False,
                               limits=RateLimits(rpm=limit, window_s=window, margin_s=0.2))
        try:
            t0 = time.monotonic()
            results = pool.score(jobs(15))
            elapsed = time.monotonic() - t0
        finally:
            pool.close()
        stats = srv.stats()
    assert all(r.valid and r.judge_attempts == 1 for r in results)
    assert stats["violations"] == 0 and stats["accepted"] == 15
    assert elapsed >= 2 * (window + 0.2) - 0.1  # 15 requests at 6 per window take two more windows


def test_a_worker_killed_mid_batch_loses_no_story(ray_address, tmp_path):
    with LocalJudgeServer(faults=Faults(p_slow=1.0, slow_s=1.0)) as srv:
        pool, actors, _ = make_pool(srv.base_url, tmp_path, workers=1, cache=False)
        try:
            futures = [pool.submit(job) for job in jobs(8)]
            time.sleep(0.5)
            ray.kill(actors[0], no_restart=False)  # restarted by Ray; the pool re-sends its stories
            results = [f.result(timeout=120) for f in futures]
        finally:
            pool.close()
    assert all(r.valid for r in results) and len({r.key for r in results}) == 8


def test_remote_limiter_batches_its_calls_and_keeps_the_cap(ray_address):
    name = f"limiter-{next(POOLS)}"
    actor = ray.remote(LimiterService).options(name=name, namespace="test").remote(RateLimits(max_in_flight=8))

    async def go():
        remote = RemoteLimiter(name, "test", release_delay_s=0.05)
        first = await asyncio.gather(*(remote.acquire() for _ in range(8)))
        calls_for_first = remote.calls
        waiting = [asyncio.ensure_future(remote.acquire()) for _ in range(4)]
        await asyncio.sleep(0.3)
        capped = not any(w.done() for w in waiting)
        for lease in first:
            remote.release(lease)
        second = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        for lease in second:
            remote.release(lease)
        remote.flush()
        return first, second, calls_for_first, capped, remote.calls

    first, second, calls_for_first, capped, calls = asyncio.run(go())
    assert len(set(first + second)) == 12 and capped
    assert calls_for_first == 1  # eight acquires in one loop turn: one call
    assert calls == 1 + (1 + 4) + 1 + 1  # the four over the cap queue one by one; two release batches
    deadline = time.monotonic() + 10
    while ray.get(actor.stats.remote())["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.get(actor.stats.remote())["in_flight"] == 0
