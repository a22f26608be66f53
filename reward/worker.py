"""The reward worker: judge a story, then fold the judgment and the text features into the
POLARIS reward. A plain async class; cluster/roles.py makes it an async Ray actor."""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from conf.errors import EnvironmentSetupError
from reward.components import RewardBreakdown, RewardParams, score_response, split_thinking, strip_length_sentence


@dataclass(frozen=True)
class ScoringJob:
    key: str  # "{uid}/{sample_index}" or "{uid}/ref"
    prompt_text: str
    response_text: str
    target_words: int
    num_tokens: int
    story_start: int  # index of the first story token (after </think>) in the response
    truncated: bool


@dataclass(frozen=True)
class ScoredSample:
    key: str
    reward: RewardBreakdown | None  # None: the judgment failed after its retries (row invalid)
    judge_error: str | None
    judge_attempts: int
    input_tokens: int
    output_tokens: int

    @property
    def valid(self) -> bool:
        return self.reward is not None


@dataclass(frozen=True)
class JudgeSettings:
    backend: str
    model: str
    base_url: str
    api_key_env: str
    vertex: bool
    flex: bool
    temperature: float
    top_p: float
    thinking_level: str
    max_attempts: int
    timeout_s: float
    max_concurrency: int


def make_judge(s: JudgeSettings):
    from reward.judge_client import GeminiJudge

    if s.backend == "openai":
        raise NotImplementedError("judge.backend=openai arrives with the reward-pool issue; use local or gemini")
    api_key = os.environ.get(s.api_key_env) if s.backend == "gemini" else "loopback"
    if s.backend == "gemini" and not api_key and not s.vertex:
        raise EnvironmentSetupError(f"judge.backend=gemini needs an API key in the environment variable {s.api_key_env}")
    return GeminiJudge(api_key, model=s.model, base_url=s.base_url or None, vertexai=s.vertex, flex=s.flex,
                       temperature=s.temperature, top_p=s.top_p, thinking_level=s.thinking_level,
                       max_attempts=s.max_attempts, timeout_s=s.timeout_s, concurrency=s.max_concurrency)


class RewardWorker:
    def __init__(self, judge_settings: JudgeSettings, params: RewardParams):
        self.judge = make_judge(judge_settings)
        self.params = params

    async def preflight(self) -> None:
        await self.judge.preflight()

    async def score(self, jobs: list[ScoringJob]) -> list[ScoredSample]:
        return list(await asyncio.gather(*(self._score_one(job) for job in jobs)))

    async def _score_one(self, job: ScoringJob) -> ScoredSample:
        _, story = split_thinking(job.response_text)
        result = await self.judge.judge(strip_length_sentence(job.prompt_text), story)
        reward = None
        if result.ok:
            reward = score_response(result.overall / 100.0, story, job.target_words, job.num_tokens,
                                    job.story_start, job.truncated, self.params)
        return ScoredSample(job.key, reward, result.error, result.attempts, result.input_tokens, result.output_tokens)
