"""The reward pool on Ray: async workers under one limiter, batched dispatch, per-story futures,
the judge cache and spend; against the loopback judge."""
import asyncio
import concurrent.futures
import itertools
import threading
import time

import pytest
import ray

from reward.components import RewardParams
from conf import load_config
from reward.cache import JudgeCache
from reward.judge_client import JudgeSettings, RetryPolicy
from reward.judge_server import Faults, LocalJudgeServer
from reward.limiter import LimiterService, RateLimits, RemoteLimiter
from reward.pool import RewardPool
from reward.spend import Prices
from reward.worker import RewardWorker, ScoredSample, ScoringJob

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
              .remote(settings, RewardParams.from_config(cfg.reward), RemoteLimiter(name, "test"))
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
    assert metrics["judge/thought_tokens"] == billed["thought_tokens"] == sum(r.thought_tokens for r in results)
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


class HeldWorker:
    """A reward worker's stand-in without Ray: `score_stream.options(...).remote(jobs)` records the
    jobs and streams an answer for each (billed `tokens`) once `answer` is set."""

    def __init__(self, answer: concurrent.futures.Future, tokens=(1000, 200), dispatched=None):
        self.answer, self.tokens, self.dispatched = answer, tokens, dispatched
        self.jobs = []
        self.score_stream = self

    def options(self, **_):
        return self

    def remote(self, batch):
        self.jobs += batch
        if self.dispatched is not None:
            self.dispatched.release()
        return self._stream(batch)

    async def _stream(self, batch):
        await asyncio.wrap_future(self.answer)
        for i, job in enumerate(batch):
            yield answered(i, ScoredSample(job.key, None, None, "held", 1, *self.tokens))


async def answered(*value):
    return value


def test_stories_that_arrive_together_spread_over_the_workers_whatever_the_scheduling():
    """Eight stories queue while the pool's loop is held, then one per batch: the loop dispatches
    them back to back without running a single batch in between (the order Python 3.12 takes when
    a queue is not empty). Each still goes to the least-loaded worker."""
    answer, dispatched = concurrent.futures.Future(), threading.Semaphore(0)
    workers = [HeldWorker(answer, dispatched=dispatched) for _ in range(4)]
    pool = RewardPool(workers, cache_params={}, prices=Prices(), flex=True, batch_size=1)
    try:
        held = threading.Event()
        pool._loop.call_soon_threadsafe(held.wait)  # the pool's loop waits here until every story is queued
        futures = [pool.submit(job) for job in jobs(8)]
        held.set()
        for _ in range(8):
            assert dispatched.acquire(timeout=60)
        assert [len(w.jobs) for w in workers] == [2, 2, 2, 2]
        answer.set_result(None)
        assert sorted(f.result(timeout=60).key for f in futures) == sorted(j.key for j in jobs(8))
    finally:
        pool.close()


def test_each_steps_judge_metrics_count_its_own_stories_only():
    """max_staleness=1: step 1's stories are judged before step 0's metrics are taken. Step 0's
    metrics are its three stories (1000 input + 200 output tokens each, flex, by hand:
    (1000 x 0.50 + 200 x 3.00) / 1e6 / 2 = $0.00055 a story); step 1's its five."""
    answer = concurrent.futures.Future()
    pool = RewardPool([HeldWorker(answer)], cache_params={}, prices=Prices(), flex=True)
    try:
        futures = [pool.submit(job, step=0) for job in jobs(3, tag="step0")]
        futures += [pool.submit(job, step=1) for job in jobs(5, tag="step1")]
        answer.set_result(None)
        concurrent.futures.wait(futures, timeout=60)
        step0, step1 = pool.take_metrics(0), pool.take_metrics(1)
    finally:
        pool.close()
    assert (step0["judge/stories"], step0["judge/requests"], step0["judge/input_tokens"]) == (3, 3, 3000)
    assert step0["judge/spend_usd"] == pytest.approx(3 * 0.00055)
    assert (step1["judge/stories"], step1["judge/input_tokens"]) == (5, 5000)
    assert step1["judge/spend_usd"] == pytest.approx(5 * 0.00055) and step1["judge/failed"] == 5
    assert step1["judge/spend_usd_total"] == pytest.approx(8 * 0.00055)


def wait_until(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_worker_killed_mid_step_leaves_no_attempt_unbilled(ray_address, tmp_path):
    """Each story's first answer is truncated (billed, retried), its second hangs; the worker dies
    with the four retries in flight and Ray restarts it. Every attempt is counted: the four
    truncated answers the service billed, the four it received and never answered at our price
    of an unanswered attempt (input estimate + 4096 output tokens), and the four answers of the
    restarted worker. So the run's count never falls below the service's bill: judge.budget_usd holds."""
    from reward import rubric
    from reward.judge_client import estimate_input_tokens
    from reward.spend import budget_stop_reason, dollars

    four = jobs(4)
    unanswered = sum(estimate_input_tokens(rubric.build_judge_request(*job.judged_texts())) for job in four)
    with LocalJudgeServer(faults=Faults(script=["truncated"] * 4 + ["hang"] * 4)) as srv:
        pool, actors, _ = make_pool(srv.base_url, tmp_path, workers=1, cache=False)
        try:
            futures = [pool.submit(job) for job in four]
            wait_until(lambda: srv.stats()["in_flight"] == 4, "the retries did not reach the judge")
            before_kill = flex_usd(srv.stats()["billed"]) + dollars(unanswered, 4 * 4096, Prices(), flex=True)
            wait_until(lambda: pool.total_usd == pytest.approx(before_kill), "the worker did not report its attempts")
            ray.kill(actors[0], no_restart=False)
            results = [f.result(timeout=120) for f in futures]
            m = pool.take_metrics()
        finally:
            pool.close()
        billed = srv.stats()["billed"]
        assert srv.stats()["answered"]["truncated"] == 4 and srv.stats()["answered"]["ok"] == 4
    assert all(r.valid and r.judge_attempts == 1 for r in results)  # the restarted worker's answers
    expected = flex_usd(billed) + dollars(unanswered, 4 * 4096, Prices(), flex=True)
    assert pool.total_usd == pytest.approx(expected) and m["judge/spend_usd"] == pytest.approx(expected)
    assert m["judge/requests"] == 4 + 4 + 4
    assert pool.total_usd > flex_usd(billed)
    assert budget_stop_reason(pool.total_usd, 0.0, flex_usd(billed)) is not None  # a budget the bill reached stops the run


def test_a_judge_that_refuses_every_story_is_noticed(ray_address, tmp_path):
    from reward.judge_watch import JudgeWatch

    with LocalJudgeServer() as srv:
        pool, _, _ = make_pool(srv.base_url, tmp_path, workers=2)
        pool.watch = JudgeWatch(JudgeSettings(backend="local", model="stand-in"), max_rejections=3, max_dry_steps=0)
        try:
            assert all(r.valid for r in pool.score(jobs(2)))
            assert pool.judge_down() is None
            srv.refuse_with(403)
            results = pool.score(jobs(4, tag="late"))
        finally:
            pool.close()
    assert [r.rejected_status for r in results] == [403] * 4
    assert "refused 3 stories in a row with HTTP 403" in pool.judge_down()


def test_a_step_without_a_judged_story_counts_toward_the_stop_when_its_metrics_are_taken(ray_address, tmp_path):
    from reward.judge_watch import JudgeWatch

    with LocalJudgeServer(faults=Faults(p_503=1.0)) as srv:
        pool, _, _ = make_pool(srv.base_url, tmp_path, workers=1, max_attempts=1)
        pool.watch = JudgeWatch(JudgeSettings(backend="local", model="stand-in"), max_rejections=3, max_dry_steps=2)
        try:
            for step in (0, 1):
                results = [f.result(timeout=60) for f in [pool.submit(j, step=step) for j in jobs(3, tag=str(step))]]
                assert not any(r.valid for r in results) and pool.judge_down() is None  # the step is not over yet
                assert pool.take_metrics(step)["judge/failed"] == 3
        finally:
            pool.close()
    assert "judged no story in 2 steps in a row (last error: HTTP 503" in pool.judge_down()


def test_each_story_is_sent_with_its_place_in_the_judges_queue():
    """Deadline order: the oldest step first, then the group with most rows judged, validation last;
    order=fifo sends every story with the same priority (first come, first served)."""
    workers = [HeldWorker(concurrent.futures.Future()) for _ in range(2)]
    workers[0].answer.set_result(None)  # the first worker answers at once, the second holds
    first = ScoringJob("g1/0", "p", "s", 10, 10, 0, False)
    pool = RewardPool(workers, cache_params={}, prices=Prices(), flex=True, batch_size=1)
    try:
        pool.submit(first, step=4).result(timeout=60)  # one row of group g1 judged
        for job, where in ((ScoringJob("g1/1", "p", "s", 10, 10, 0, False), dict(step=4)),
                           (ScoringJob("g2/0", "p", "s", 10, 10, 0, False), dict(step=4)),
                           (ScoringJob("v/0", "p", "s", 10, 10, 0, False), dict(step=None, per_step=False))):
            pool.submit(job, **where)
        wait_until(lambda: sum(len(w.jobs) for w in workers) == 4, "every story dispatched")
    finally:
        pool.close()
    sent = {job.key: job.priority for w in workers for job in w.jobs}
    assert sent["g1/1"] < sent["g2/0"] < sent["v/0"] and sent["g1/1"] == (False, 4, -1)
    assert sent["v/0"][0] is True
    fifo = RewardPool([HeldWorker(concurrent.futures.Future())], cache_params={}, prices=Prices(), flex=True,
                      order="fifo")
    try:
        fifo.submit(first, step=4)
        wait_until(lambda: fifo.workers[0].jobs, "dispatched")
        assert fifo.workers[0].jobs[0].priority is None
    finally:
        fifo.close()
