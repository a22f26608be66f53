"""The reward worker: judge stories, then fold each judgment and the story's text features into
the POLARIS reward. A plain async class; cluster/judge_pool.py makes it an async Ray actor, one of a
pool that leases rate-limit capacity from one limiter actor (reward/limiter.py)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from reward import rubric
from reward.components import (
    RewardBreakdown,
    RewardParams,
    score_response,
    strip_length_sentence,
)
from reward.judge_client import Judge, JudgeResult, JudgeSettings, Limiter, Secret, make_judge
from reward.rubric import Judgment
from reward.spend import Billing


@dataclass(frozen=True)
class ScoringJob:
    key: str  # "{uid}/{sample_index}" or "{uid}/ref"
    prompt_text: str
    story_text: str  # the response after its thinking (actors/codec.py splits it)
    target_words: int
    num_tokens: int
    story_start: int  # index of the first story token (after </think>) in the response
    truncated: bool
    cached: Judgment | None = None  # a judgment from the cache: no judge call
    priority: tuple | None = None  # its place in the judge's queue, lower first; None: first come, first served

    @property
    def group(self) -> str:
        """The GRPO group it belongs to (the prompt's uid)."""
        return self.key.rpartition("/")[0]

    def judged_texts(self) -> tuple[str, str]:
        """(prompt, story) as the judge sees them: no length sentence, no thinking."""
        return strip_length_sentence(self.prompt_text), self.story_text


@dataclass(frozen=True)
class ScoredSample:
    key: str
    reward: RewardBreakdown | None  # None: the judgment failed after its retries (row invalid)
    judgment: Judgment | None
    judge_error: str | None
    judge_attempts: int  # HTTP attempts; 0 for a cache hit
    input_tokens: int  # billed by the judge for this story (0 for a cache hit; reward/spend.py)
    output_tokens: int  # visible + thought tokens
    cached: bool = False
    latency_s: float = 0.0
    wait_s: float = 0.0
    rejected_status: int | None = None  # the judge refused it with this status, not retried (401: the key)
    thought_tokens: int = 0  # the thought share of output_tokens

    @property
    def valid(self) -> bool:
        return self.reward is not None


class RewardWorker:
    def __init__(self, judge_settings: JudgeSettings, params: RewardParams, limiter: Limiter | None = None,
                 secret: Secret | None = None):
        """limiter: RemoteLimiter(actor) in a pool; None: a private one with default limits.
        secret: the API key from the driver's environment; None: from this process's."""
        self.settings, self.params, self._limiter, self._secret = judge_settings, params, limiter, secret
        self._judge: Judge | None = None

    @property
    def judge(self) -> Judge:
        if self._judge is None:  # built inside the actor's event loop, which its HTTP session binds to
            self._judge = make_judge(self.settings, self._limiter, self._secret)
        return self._judge

    async def score_stream(self, jobs: list[ScoringJob]) -> AsyncIterator[tuple[int, Billing | ScoredSample]]:
        """(index in jobs, event) as it happens: one Ray call per batch, one ScoredSample per story when
        it is done, and before it the story's Billing so far whenever it changes (reward/judge_client.py),
        so that the driver has counted every attempt sent even if this worker dies."""
        events: asyncio.Queue[tuple[int, Billing | ScoredSample | Exception]] = asyncio.Queue()

        async def score(index: int, job: ScoringJob) -> None:
            def report(billing: Billing) -> None:
                events.put_nowait((index, billing))
            try:
                events.put_nowait((index, await self.score_one(job, report)))
            except Exception as e:  # noqa: BLE001 -- raised below: the batch fails, the pool sends it again
                events.put_nowait((index, e))

        tasks = [asyncio.ensure_future(score(i, job)) for i, job in enumerate(jobs)]
        try:
            left = len(jobs)
            while left:
                index, event = await events.get()
                if isinstance(event, Exception):
                    raise event
                left -= isinstance(event, ScoredSample)
                yield index, event
        finally:
            for t in tasks:
                t.cancel()

    async def score_one(self, job: ScoringJob, report: Callable[[Billing], None] = lambda billing: None) -> ScoredSample:
        prompt, story = job.judged_texts()
        if job.cached is not None:
            result = JudgeResult(job.cached, rubric.overall_score(job.cached, evaluation=self.settings.evaluation),
                                 0, 0, 0)
        else:
            result = await self.judge.judge(prompt, story, report, job.priority)
        reward = None
        if result.ok:
            reward = score_response(result.overall / 100.0, story, job.target_words, job.num_tokens,
                                    job.story_start, job.truncated, self.params)
        return ScoredSample(job.key, reward, result.judgment, result.error, result.attempts, result.input_tokens,
                            result.output_tokens, job.cached is not None, result.latency_s, result.wait_s,
                            result.rejected_status, result.thought_tokens)

    async def aclose(self) -> None:
        if hasattr(self._limiter, "flush"):
            self._limiter.flush()
        if self._judge is not None:
            await self._judge.aclose()
