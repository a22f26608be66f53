"""Judging one story with retries we own, under the project's rate limit.

Judge.judge() builds the rubric request, leases capacity for each attempt, sends it through a
JudgeAPI (Gemini or OpenAI-compatible), validates the answer against the rubric schema and
returns a JudgeResult; it never raises for a failed story (the error is in the result).

Retried: 408/429/5xx, timeouts, connection errors, unparsable or schema-violating answers;
exponential backoff with jitter, never shorter than the service's Retry-After. Bounded by
max_attempts and a per-story deadline counted from the first attempt (time queued behind the
rate limit before it does not count: it is the pool's backlog, not the story's trouble).

Each attempt's lease carries the story's priority (the caller's key, then the attempts it has
made: the story nearest its deadline first) and comes back with what the attempt says about the
service's load: its latency when answered, or that it was shed (429, 503, a timeout).

Billing (reward/spend.py): an attempt sent and never answered is priced at its estimate; a story
reports its cost so far as it goes, so the attempts of a worker that dies are not lost.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from conf.errors import EnvironmentSetupError, JudgeError
from reward import rubric
from reward.judge_api import JudgeAPI, JudgeHTTPError
from reward.limiter import RateLimiter, RateLimits
from reward.rubric import JudgeOutputError, Judgment
from reward.spend import Billing

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
PREFLIGHT_STORY = ("The lighthouse keeper counted ships that never came. On the ninth night "
                   "one did, and she had forgotten how to wave.")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_s: float = 2.0
    max_backoff_s: float = 120.0
    timeout_s: float = 900.0  # one attempt
    deadline_s: float = 3600.0  # all attempts of one story, from the first


@dataclass(frozen=True)
class JudgeResult:
    judgment: Judgment | None
    overall: float | None  # rubric.overall_score; None when the judgment failed
    input_tokens: int  # summed over every attempt billed; one without an answer at its estimate (spend.py)
    output_tokens: int  # visible + thought tokens (thoughts are billed as output)
    attempts: int  # sent
    error: str | None = None
    latency_s: float = 0.0  # first send to final answer
    wait_s: float = 0.0  # time spent waiting for rate-limit leases
    rejected_status: int | None = None  # the HTTP status that failed the story with no retry (400/401/403/404)
    thought_tokens: int = 0  # the thought share of output_tokens, over the attempts answered

    @property
    def ok(self) -> bool:
        return self.judgment is not None


class Limiter(Protocol):
    async def acquire(self, tokens: int = 0, priority: tuple = (), retry: bool = False) -> int: ...

    def release(self, lease_id: int, actual_tokens: int | None = None, latency_s: float | None = None,
                shed: bool = False) -> None: ...


SHED_STATUS = frozenset({429, 503})


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def estimate_input_tokens(req: rubric.JudgeRequest) -> int:
    """~4 characters per token for English text; corrected by the answer's usage on release."""
    return (len(req.system_instruction) + len(req.user_text)) // 4 + 1


def classify(e: BaseException) -> _Retryable | None:
    """A retryable failure (with Retry-After seconds if sent), or None if final."""
    if isinstance(e, JudgeHTTPError):
        return _Retryable(str(e), e.retry_after) if e.status in RETRY_STATUS else None
    if isinstance(e, (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError)):
        return _Retryable(f"{type(e).__name__}: {e}".rstrip(": "))
    if isinstance(e, JudgeOutputError):
        return _Retryable(str(e))
    try:  # google-genai falls back to httpx when aiohttp is absent
        import httpx
        if isinstance(e, httpx.TransportError):
            return _Retryable(f"{type(e).__name__}: {e}")
    except ImportError:
        pass
    return None


def _shed(e: BaseException) -> bool:
    """The service refused the attempt for want of capacity, or did not answer in time."""
    return isinstance(e, asyncio.TimeoutError) or (isinstance(e, JudgeHTTPError) and e.status in SHED_STATUS)


def _never_billed(e: BaseException) -> bool:
    """An error status was answered without a bill; a connection that was never made never
    reached the service. Anything else (a timeout, a dropped connection) may be billed."""
    if isinstance(e, (JudgeHTTPError, aiohttp.ClientConnectorError, ConnectionRefusedError)):
        return True
    try:
        import httpx
        return isinstance(e, httpx.ConnectError)
    except ImportError:
        return False


class Judge:
    """Create and use within one event loop."""

    def __init__(self, api: JudgeAPI, *, retry: RetryPolicy = RetryPolicy(), limiter: Limiter | None = None,
                 evaluation: bool = False, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                 unanswered_output_tokens: int = 4096):
        self.api, self.retry, self.evaluation = api, retry, evaluation
        self.unanswered_output_tokens = unanswered_output_tokens
        self.limiter = limiter if limiter is not None else RateLimiter(RateLimits())
        self._sleep, self._clock = sleep, clock
        self._rng = random.Random(seed)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        p = self.retry
        delay = min(p.max_backoff_s, p.backoff_s * 2 ** (attempt - 1))
        delay *= 0.5 + 0.5 * self._rng.random()  # jitter spreads a burst of 429s
        if retry_after is not None:  # honoured in full; the per-story deadline bounds it
            delay = max(delay, retry_after)
        return delay

    async def judge(self, prompt_text: str, story: str,
                    report: Callable[[Billing], None] = lambda billing: None,
                    priority: tuple | None = None) -> JudgeResult:
        """Judge one story. prompt_text must already lack its length sentence. report(billing): the
        story's cost so far, before each send (that attempt priced as unanswered) and after each
        attempt that is retried (as billed). priority: the story's place in the limiter's queue
        (lower first; the attempts made are appended, so the story nearest its deadline goes
        first); None: first come, first served."""
        req = rubric.build_judge_request(prompt_text, story)
        estimate, unanswered_out = estimate_input_tokens(req), self.unanswered_output_tokens
        tin = tout = thoughts = 0
        wait_s, first_send, error, rejected = 0.0, None, "not attempted", None
        for attempt in range(1, self.retry.max_attempts + 1):
            t0 = self._clock()
            place = () if priority is None else (*priority, 1 - attempt)
            lease = await self.limiter.acquire(estimate, place, attempt > 1)
            now = self._clock()
            wait_s += now - t0
            first_send = now if first_send is None else first_send
            remaining = self.retry.deadline_s - (now - first_send)
            if remaining <= 0:
                self.limiter.release(lease, 0)
                error += f" (per-story deadline {self.retry.deadline_s:g}s reached)"
                attempt -= 1  # not sent
                break
            report(Billing(tin + estimate, tout + unanswered_out, attempt))
            billed = latency = None
            shed = False
            try:
                answer = await self.api.send(req, timeout_s=min(self.retry.timeout_s, remaining))
                latency = self._clock() - now
                billed = answer.input_tokens
                tin, tout = tin + answer.input_tokens, tout + answer.output_tokens
                thoughts += answer.thought_tokens
                judgment = rubric.parse_judgment(answer.text)
                return JudgeResult(judgment, rubric.overall_score(judgment, evaluation=self.evaluation), tin, tout,
                                   attempt, None, self._clock() - first_send, wait_s, thought_tokens=thoughts)
            except Exception as e:  # noqa: BLE001 -- classified below; never escapes
                retry = classify(e)
                error = str(retry) if retry else f"{type(e).__name__}: {e}"
                if billed is None and not _never_billed(e):
                    tin, tout = tin + estimate, tout + unanswered_out
                rejected = e.status if isinstance(e, JudgeHTTPError) and retry is None else None
                shed = _shed(e)
            finally:
                self.limiter.release(lease, billed, latency, shed)
            if retry is None or attempt == self.retry.max_attempts:
                break
            report(Billing(tin, tout, attempt))
            delay = self.backoff(attempt, retry.retry_after)
            if self._clock() + delay - first_send >= self.retry.deadline_s:
                error += f" (per-story deadline {self.retry.deadline_s:g}s reached)"
                break
            log.info("judge attempt %d failed (%s); retrying in %.1fs", attempt, error, delay)
            await self._sleep(delay)
        log.warning("judge failed after %d attempt(s): %s", attempt, error)
        latency = self._clock() - first_send if first_send is not None else 0.0
        return JudgeResult(None, None, tin, tout, attempt, error, latency, wait_s, rejected, thoughts)

    async def preflight(self, timeout_s: float = 60.0) -> None:
        """One tiny judgment on the standard tier (fast; checks key, model, thinking level and
        schema). Raises JudgeError with an actionable message; only 429/5xx are retried (twice),
        so an unreachable or misconfigured judge fails at once."""
        req = rubric.build_judge_request("Write a two-sentence story.", PREFLIGHT_STORY)
        where = self.api.name
        try:
            for attempt in range(1, 4):
                try:
                    answer = await self.api.send(req, timeout_s=timeout_s, standard_tier=True)
                    rubric.parse_judgment(answer.text)
                    return
                except JudgeHTTPError as e:
                    if e.status not in RETRY_STATUS or attempt == 3:
                        raise
                    await self._sleep(self.backoff(attempt, e.retry_after))
        except JudgeHTTPError as e:
            hint = (" (check the API key / credentials)" if e.status in (401, 403)
                    else " (check judge.model, judge.base_url and the request config)" if e.status in (400, 404)
                    else "")
            raise JudgeError(f"judge preflight: {where} answered {e}{hint}") from None
        except JudgeOutputError as e:
            raise JudgeError(f"judge preflight: {where} answered without valid rubric JSON: {e}") from None
        except asyncio.TimeoutError:
            raise JudgeError(f"judge preflight: {where} did not answer within {timeout_s:g}s") from None
        except Exception as e:  # noqa: BLE001 -- unreachable host, refused connection, ...
            raise JudgeError(f"judge preflight: cannot reach {where}: {type(e).__name__}: {e}") from None

    async def aclose(self) -> None:
        await self.api.aclose()


@dataclass(frozen=True)
class JudgeSettings:
    """What a reward worker needs to build its judge (cluster/judge_pool.py fills it from config)."""

    backend: str  # local | gemini | openai
    model: str
    base_url: str = ""
    api_key_env: str = "GEMINI_API_KEY"
    vertex: bool = False
    flex: bool = True
    temperature: float = 0.2
    top_p: float = 0.9
    seed: int | None = None
    thinking_level: str = "medium"
    max_output_tokens: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    evaluation: bool = False
    unanswered_output_tokens: int = 4096  # the output an attempt without an answer is priced at (spend.py)

    def cache_params(self) -> dict:
        """Everything that changes a judgment besides the texts (goes into the cache key)."""
        return {"backend": self.backend, "model": self.model, "rubric": rubric.RUBRIC_VERSION,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "thinking_level": self.thinking_level, "max_output_tokens": self.max_output_tokens,
                "endpoint": self.base_url if self.backend == "openai" else ""}


def api_key(s: JudgeSettings) -> str | None:
    """The key from the environment (never from config); errors name the variable."""
    if s.backend == "local":
        return "loopback"
    key = os.environ.get(s.api_key_env) or None
    if s.backend == "gemini" and not key and not s.vertex:
        raise EnvironmentSetupError(f"judge.backend=gemini needs an API key in the environment variable "
                                    f"{s.api_key_env}")
    if s.backend == "openai" and not key and not s.base_url:
        raise EnvironmentSetupError(f"judge.backend=openai with the default endpoint needs an API key in the "
                                    f"environment variable {s.api_key_env} (a self-hosted judge: set judge.base_url)")
    return key


@dataclass(frozen=True)
class Secret:
    """An API key on its way from the driver's environment to a reward worker (a worker on another
    node, or in a cluster started before the key was exported, does not have it in its own
    environment). Its repr never shows the value."""

    value: str | None = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(***)"

    @classmethod
    def from_environment(cls, s: JudgeSettings) -> Secret:
        return cls(api_key(s))


def make_api(s: JudgeSettings, secret: Secret | None = None) -> JudgeAPI:
    key = secret.value if secret is not None else api_key(s)
    if s.backend == "openai":
        from reward.openai_api import OpenAIJudgeAPI

        return OpenAIJudgeAPI(key, model=s.model, base_url=s.base_url or "https://api.openai.com/v1",
                              temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                              max_output_tokens=s.max_output_tokens)
    from reward.gemini_api import GeminiJudgeAPI

    return GeminiJudgeAPI(key, model=s.model, base_url=s.base_url or None, vertexai=s.vertex, flex=s.flex,
                          temperature=s.temperature, top_p=s.top_p, thinking_level=s.thinking_level,
                          max_output_tokens=s.max_output_tokens, seed=s.seed)


def make_judge(s: JudgeSettings, limiter: Limiter | None = None, secret: Secret | None = None) -> Judge:
    """secret: the key read by the driver; None: read it from this process's environment."""
    unanswered = min(s.unanswered_output_tokens, s.max_output_tokens or s.unanswered_output_tokens)
    return Judge(make_api(s, secret), retry=s.retry, limiter=limiter, evaluation=s.evaluation,
                 unanswered_output_tokens=unanswered)


def preflight(settings: JudgeSettings, timeout_s: float = 60.0) -> None:
    """Judge.preflight from this process (the driver, before any actor or model starts): one tiny
    judgment on the standard tier; an unreachable or misconfigured judge fails in seconds."""
    async def check() -> None:
        judge = make_judge(settings)
        try:
            await judge.preflight(timeout_s)
        finally:
            await judge.aclose()

    asyncio.run(check())
