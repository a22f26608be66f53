"""The driver's side of the reward pool: submit stories one by one, get one future each.

Submissions that arrive together are dispatched as one batch (one Ray call) to the reward worker
with the fewest stories outstanding, counted as the worker is chosen (so the choice does not
depend on when asyncio runs the batch's task); the worker streams each story's result back as
soon as it is judged (a Ray streaming generator), so no story waits for its batch. Before
dispatch a story is looked up in the judge cache: a hit goes to the worker with its judgment
(scored, never sent to the judge, costs nothing); a fresh judgment is written to the cache as it
arrives.

Spend is metered here from what the workers report as they go (reward/spend.py): a story's cost
so far before each attempt is sent and after each retried one. A worker that dies has reported
every attempt it sent; its stories go to another worker and those attempts stay counted. Each
story carries its training step, and take_metrics(step) counts that step's stories only (with
rollout.max_staleness=1 the next step is judged while this one trains). The judge watch
(reward/judge_watch.py) sees every story and every step's outcome: judge_down().

Order (order="deadline"): each story carries a priority to the limiter's queue, the story closest
to blocking a step first: the oldest step, then the group with most rows already judged when it
is dispatched (the judge client adds the attempts made: the story nearest its deadline);
validation stories last. order="fifo": first come, first served.

Everything runs on one background asyncio loop; submit() and the metrics are thread-safe.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import statistics
import threading
from collections import Counter
from dataclasses import dataclass, field

from conf.errors import JudgeError
from reward.cache import JudgeCache, cache_key
from reward.judge_watch import JudgeWatch
from reward.spend import Billing, Prices, dollars
from reward.worker import ScoredSample, ScoringJob


@dataclass
class _Item:
    job: ScoringJob
    future: concurrent.futures.Future
    step: int | None = None  # the training step it belongs to
    per_step: bool = True  # counted in take_metrics (validation stories are not; their spend is in the total)
    key: str | None = None  # cache key
    resubmits: int = 0
    reported: Billing = Billing()  # what the worker judging it now has reported


@dataclass
class _Counters:
    stories: int = 0
    failed: int = 0
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    thought_tokens: int = 0  # of output_tokens, over the answers received
    usd: float = 0.0
    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)


class RewardPool:
    def __init__(self, workers: list, *, cache_params: dict, prices: Prices, flex: bool,
                 cache: JudgeCache | None = None, batch_size: int = 16, batch_wait_s: float = 0.005,
                 max_resubmits: int = 2, watch: JudgeWatch | None = None, order: str = "deadline",
                 resubmit_backoff_s: float = 0.5):
        if not workers:
            raise ValueError("a reward pool needs at least one worker")
        if order not in ("deadline", "fifo"):
            raise ValueError(f"order must be deadline or fifo, got {order!r}")
        self.order, self.resubmit_backoff_s = order, resubmit_backoff_s
        self._judged: Counter[tuple[int | None, str]] = Counter()  # (step, group) -> stories judged
        self._resubmitting: dict[int, tuple[asyncio.TimerHandle, _Item]] = {}
        self.workers, self.cache, self.cache_params = workers, cache, cache_params
        self.prices, self.flex = prices, flex
        self.batch_size, self.batch_wait_s, self.max_resubmits = batch_size, batch_wait_s, max_resubmits
        self.watch = watch
        self.total_usd = 0.0
        self.batches_sent = 0
        self._outstanding = [0] * len(workers)
        self._steps: dict[int | None, _Counters] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue[_Item] | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(started,), name="reward-pool", daemon=True)
        self._thread.start()
        started.wait()

    def _run_loop(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._queue = asyncio.Queue()
        self._loop.create_task(self._dispatch_forever())
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    # --- driver API ---
    def submit(self, job: ScoringJob, *, step: int | None = None, per_step: bool = True) -> concurrent.futures.Future:
        """step: the training step the story belongs to (take_metrics(step)). per_step=False: a story
        outside the training steps (validation): its spend goes into the run's total only."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _Item(job, future, step, per_step))
        return future

    def score(self, jobs: list[ScoringJob]) -> list[ScoredSample]:
        futures = [self.submit(job) for job in jobs]
        return [f.result() for f in futures]

    def take_metrics(self, step: int | None = None) -> dict[str, float]:
        """judge/* of the step's stories not taken yet (None: of those submitted without a step).
        Taken once the step's stories are all judged, it also tells the judge watch whether the
        step judged any. Earlier steps' counters still open (stories of a generation that was
        replaced, judged after their step) are dropped; their spend is in the total."""
        with self._lock:
            c = self._steps.pop(step, _Counters())
            if step is not None:
                for earlier in [s for s in self._steps if s is not None and s < step]:
                    del self._steps[earlier]
                for key in [k for k in self._judged if k[0] is not None and k[0] <= step]:
                    del self._judged[key]
                if self.watch is not None:
                    self.watch.step(c.stories, c.failed)
            total = self.total_usd
        return {
            "judge/stories": c.stories,
            "judge/failed": c.failed,
            "judge/requests": c.requests,
            "judge/retries": c.retries,
            "judge/cache_hits": c.cache_hits,
            "judge/cache_hit_rate": c.cache_hits / c.stories if c.stories else 0.0,
            "judge/input_tokens": c.input_tokens,
            "judge/output_tokens": c.output_tokens,
            "judge/thought_tokens": c.thought_tokens,
            "judge/spend_usd": c.usd,
            "judge/spend_usd_total": total,
            "judge/latency_p50_s": _quantile(c.latencies, 0.5),
            "judge/latency_p99_s": _quantile(c.latencies, 0.99),
            "judge/lease_wait_mean_s": statistics.fmean(c.waits) if c.waits else 0.0,
        }

    def judge_down(self) -> str | None:
        """Why the judge is taken for dead (reward/judge_watch.py), or None."""
        return self.watch.reason if self.watch is not None else None

    def close(self) -> None:
        """Stop dispatching; stories still unanswered fail with JudgeError. Idempotent."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            if self.cache is not None:
                self.cache.close()

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for timer, item in self._resubmitting.values():
            timer.cancel()
            item.future.set_exception(JudgeError("the reward pool was closed"))
        self._resubmitting.clear()
        while not self._queue.empty():
            self._queue.get_nowait().future.set_exception(JudgeError("the reward pool was closed"))

    # --- the loop ---
    async def _dispatch_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = self._loop.time() + self.batch_wait_s
            while len(batch) < self.batch_size:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), deadline - self._loop.time()))
                except asyncio.TimeoutError:
                    break
            for item in batch:
                self._look_up(item)
                item.job = dataclasses.replace(item.job, priority=self._priority(item))
            worker = min(range(len(self.workers)), key=self._outstanding.__getitem__)
            self._outstanding[worker] += len(batch)  # before the next batch is placed; _run_batch takes it off
            self._loop.create_task(self._run_batch(worker, batch))

    def _priority(self, item: _Item) -> tuple | None:
        if self.order == "fifo":
            return None
        step = item.step if item.step is not None else math.inf
        return (not item.per_step, step, -self._judged[item.step, item.job.group])

    def _look_up(self, item: _Item) -> None:
        if self.cache is None or item.key is not None:
            return
        item.key = cache_key(self.cache_params, *item.job.judged_texts())
        cached = self.cache.get(item.key)
        if cached is not None:
            item.job = dataclasses.replace(item.job, cached=cached)

    async def _run_batch(self, worker: int, batch: list[_Item]) -> None:
        pending = dict(enumerate(batch))
        self.batches_sent += 1
        try:
            stream = self.workers[worker].score_stream.options(num_returns="streaming").remote(
                [item.job for item in batch])
            async for ref in stream:
                index, event = await ref
                if isinstance(event, Billing):
                    self._charge(pending[index], event)
                else:
                    self._finish(pending.pop(index), event)
            if pending:
                raise RuntimeError(f"the stream ended with {len(pending)} stories unanswered")
        except asyncio.CancelledError:
            for item in pending.values():
                item.future.set_exception(JudgeError("the reward pool was closed"))
            raise
        except Exception as e:  # noqa: BLE001 -- a worker died or failed: its unanswered stories go again
            for item in pending.values():
                item.reported = Billing()  # what the failed worker reported stays counted
                if item.resubmits < self.max_resubmits:  # after a pause: Ray may be restarting the worker
                    item.resubmits += 1
                    delay = self.resubmit_backoff_s * 2 ** (item.resubmits - 1)
                    self._resubmitting[id(item)] = (self._loop.call_later(delay, self._resubmit, item), item)
                else:
                    item.future.set_exception(JudgeError(
                        f"reward worker failed on {item.job.key} {item.resubmits + 1} times: {type(e).__name__}: {e}"))
        finally:
            self._outstanding[worker] -= len(batch)

    def _resubmit(self, item: _Item) -> None:
        del self._resubmitting[id(item)]
        self._queue.put_nowait(item)

    def _counters(self, item: _Item) -> _Counters:
        return self._steps.setdefault(item.step, _Counters()) if item.per_step else _Counters()

    def _charge(self, item: _Item, billing: Billing) -> None:
        """The story's cost on its current worker is now `billing`: count the difference."""
        was, item.reported = item.reported, billing
        d_in, d_out = billing.input_tokens - was.input_tokens, billing.output_tokens - was.output_tokens
        usd = dollars(d_in, d_out, self.prices, flex=self.flex)
        with self._lock:
            self.total_usd += usd
            c = self._counters(item)
            c.requests += billing.attempts - was.attempts
            c.input_tokens += d_in
            c.output_tokens += d_out
            c.usd += usd

    def _finish(self, item: _Item, sample: ScoredSample) -> None:
        if self.cache is not None and sample.judgment is not None and not sample.cached:
            self.cache.put(item.key, sample.judgment, sample.input_tokens, sample.output_tokens)
        self._charge(item, Billing(sample.input_tokens, sample.output_tokens, sample.judge_attempts))
        with self._lock:
            self._judged[item.step, item.job.group] += 1
            c = self._counters(item)
            c.stories += 1
            c.failed += not sample.valid
            c.cache_hits += sample.cached
            c.retries += max(0, sample.judge_attempts - 1)
            c.thought_tokens += sample.thought_tokens
            if not sample.cached:
                c.latencies.append(sample.latency_s)
                c.waits.append(sample.wait_s)
            if self.watch is not None:
                self.watch.story(sample)
        item.future.set_result(sample)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
