"""The online judge: Gemini through google-genai's async client (DESIGN.md section 2, "Judge").

One GeminiJudge per reward worker. judge() builds the rubric request, sends it with the
configured sampling, thinking level, JSON schema and (by default) the flex tier, validates the
answer with rubric.parse_judgment and returns a JudgeResult; it never raises for a failed
story (the error is in the result). The SDK's own retries are switched off (they ignore
Retry-After): we retry 408/429/5xx, timeouts, connection errors and unparsable answers with
exponential backoff, honouring Retry-After when the server sends it.

Flex: on the Developer API `service_tier="flex"` in the request config (google-genai >= 1.69;
the installed 3.x has GenerateContentConfig.service_tier); on Vertex the two request headers
below. The API key is passed in by the caller (read from the environment there); it is
scrubbed from every error text this module produces.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from conf.errors import EnvironmentSetupError, JudgeError
from reward import rubric
from reward.rubric import Judgment, JudgeOutputError

log = logging.getLogger(__name__)

VERTEX_FLEX_HEADERS = {
    "X-Vertex-AI-LLM-Request-Type": "shared",
    "X-Vertex-AI-LLM-Shared-Request-Type": "flex",
}
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
PREFLIGHT_STORY = ("The lighthouse keeper counted ships that never came. On the ninth night "
                   "one did, and she had forgotten how to wave.")


@dataclass(frozen=True)
class JudgeResult:
    judgment: Judgment | None
    overall: float | None  # rubric.overall_score; None when the judgment failed
    input_tokens: int  # summed over every attempt that got an answer
    output_tokens: int  # candidates + thoughts (thoughts are billed as output)
    attempts: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.judgment is not None


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class GeminiJudge:
    """Create and use within one event loop (the SDK's HTTP session and the semaphore bind
    to it). flex=True: flex tier for judge(); preflight() always runs on the standard tier."""

    def __init__(self, api_key: str | None, *, model: str = "gemini-3-flash-preview",
                 base_url: str | None = None, vertexai: bool = False,
                 project: str | None = None, location: str | None = None,
                 flex: bool = True, temperature: float = 0.2, top_p: float = 0.9,
                 thinking_level: str = "medium", max_output_tokens: int | None = None,
                 max_attempts: int = 6, backoff_s: float = 2.0, max_backoff_s: float = 120.0,
                 timeout_s: float = 600.0, concurrency: int = 32, evaluation: bool = False,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if not api_key and not vertexai:
            raise EnvironmentSetupError("GeminiJudge needs a Gemini API key (none was given)")
        self.model, self.base_url, self.vertexai, self.flex = model, base_url, vertexai, flex
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s, self.evaluation, self._sleep = timeout_s, evaluation, sleep
        self._secret = api_key or ""
        self._sem = asyncio.Semaphore(concurrency)
        self._rng = random.Random()
        self._thinking = types.ThinkingConfig(thinking_level=thinking_level.upper(),
                                              include_thoughts=False)
        self._sampling = dict(temperature=temperature, top_p=top_p,
                              max_output_tokens=max_output_tokens)
        self._client = self._make_client(api_key, project, location, flex=flex)
        self._standard_client = self._make_client(api_key, project, location, flex=False)

    def _make_client(self, api_key, project, location, *, flex: bool) -> genai.Client:
        headers = dict(VERTEX_FLEX_HEADERS) if (flex and self.vertexai) else None
        http = types.HttpOptions(base_url=self.base_url, headers=headers,
                                 retry_options=types.HttpRetryOptions(attempts=1))
        if self.vertexai:
            if api_key:  # Vertex express mode
                return genai.Client(vertexai=True, api_key=api_key, http_options=http)
            return genai.Client(vertexai=True, project=project, location=location,
                                http_options=http)
        return genai.Client(api_key=api_key, http_options=http)

    def _config(self, system_instruction: str, *, flex: bool) -> types.GenerateContentConfig:
        return types.GenerateContentConfig(
            system_instruction=system_instruction,
            thinking_config=self._thinking,
            response_mime_type="application/json",
            response_json_schema=rubric.response_json_schema(),
            service_tier="flex" if (flex and not self.vertexai) else None,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            **self._sampling,
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    async def _once(self, client: genai.Client, req: rubric.JudgeRequest, *, flex: bool,
                    timeout_s: float) -> tuple[Judgment, int, int]:
        """One attempt: (judgment, input tokens, output tokens); tokens are attached to a
        JudgeOutputError as .tokens, since an unparsable answer is still billed."""
        resp = await asyncio.wait_for(
            client.aio.models.generate_content(
                model=self.model, contents=req.user_text,
                config=self._config(req.system_instruction, flex=flex)),
            timeout=timeout_s)
        um = resp.usage_metadata
        tin = (um.prompt_token_count or 0) if um else 0
        tout = ((um.candidates_token_count or 0) + (um.thoughts_token_count or 0)) if um else 0
        try:
            return rubric.parse_judgment(resp.text or ""), tin, tout
        except JudgeOutputError as e:
            e.tokens = (tin, tout)
            raise

    def _classify(self, e: BaseException) -> _Retryable | None:
        """A retryable failure (with Retry-After seconds if sent), or None if final."""
        if isinstance(e, genai_errors.APIError):
            if e.code not in RETRY_STATUS:
                return None
            headers = getattr(getattr(e, "response", None), "headers", None) or {}
            try:
                after = float(headers.get("Retry-After"))
            except (TypeError, ValueError):
                after = None
            return _Retryable(f"HTTP {e.code} {e.status or ''}".strip(), after)
        if isinstance(e, (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError)):
            return _Retryable(f"{type(e).__name__}: {e}")
        if isinstance(e, JudgeOutputError):
            return _Retryable(str(e))
        try:  # the SDK falls back to httpx when aiohttp is absent
            import httpx
            if isinstance(e, httpx.TransportError):
                return _Retryable(f"{type(e).__name__}: {e}")
        except ImportError:
            pass
        return None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        delay *= 0.5 + 0.5 * self._rng.random()  # jitter spreads a burst of 429s
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay

    async def judge(self, prompt_text: str, story: str) -> JudgeResult:
        """Judge one story. prompt_text must already lack its length sentence."""
        req = rubric.build_judge_request(prompt_text, story)
        tin = tout = 0
        error = "not attempted"
        for attempt in range(1, self.max_attempts + 1):
            try:
                async with self._sem:
                    j, i, o = await self._once(self._client, req, flex=self.flex,
                                               timeout_s=self.timeout_s)
                tin, tout = tin + i, tout + o
                return JudgeResult(j, rubric.overall_score(j, evaluation=self.evaluation),
                                   tin, tout, attempt)
            except Exception as e:  # noqa: BLE001 -- classified below; never escapes
                if isinstance(e, JudgeOutputError):
                    i, o = getattr(e, "tokens", (0, 0))
                    tin, tout = tin + i, tout + o
                retry = self._classify(e)
                error = self._scrub(str(retry) if retry else f"{type(e).__name__}: {e}")
                if retry is None or attempt == self.max_attempts:
                    log.warning("judge failed after %d attempt(s): %s", attempt, error)
                    return JudgeResult(None, None, tin, tout, attempt, error)
                delay = self._backoff(attempt, retry.retry_after)
                log.info("judge attempt %d failed (%s); retrying in %.1fs", attempt, error, delay)
                await self._sleep(delay)
        raise AssertionError("unreachable")

    async def preflight(self, timeout_s: float = 60.0) -> None:
        """One tiny judgment on the standard tier (fast; validates key, model, thinking level
        and schema). Raises JudgeError with an actionable message if it fails; only 429/5xx
        are retried (twice), so an unreachable judge fails at once."""
        where = self.base_url or ("Vertex AI" if self.vertexai else "the Gemini API")
        req = rubric.build_judge_request("Write a two-sentence story.", PREFLIGHT_STORY)
        try:
            for attempt in range(1, 4):  # a busy judge (429/5xx) gets two more chances
                try:
                    await self._once(self._standard_client, req, flex=False,
                                     timeout_s=timeout_s)
                    return
                except genai_errors.APIError as e:
                    if e.code not in RETRY_STATUS or attempt == 3:
                        raise
                    await self._sleep(self._backoff(attempt, self._classify(e).retry_after))
        except genai_errors.APIError as e:
            hint = (" (check the API key / credentials)" if e.code in (401, 403)
                    else " (check judge.model and the request config)" if e.code in (400, 404)
                    else "")
            raise JudgeError(self._scrub(
                f"judge preflight: {where} answered HTTP {e.code} {e.status or ''} for model "
                f"{self.model}{hint}: {e.message or ''}")) from None
        except JudgeOutputError as e:
            raise JudgeError(self._scrub(
                f"judge preflight: {where} ({self.model}) answered without valid rubric "
                f"JSON: {e}")) from None
        except asyncio.TimeoutError:
            raise JudgeError(f"judge preflight: {where} ({self.model}) did not answer within "
                             f"{timeout_s:g}s") from None
        except Exception as e:  # noqa: BLE001 -- unreachable host, refused connection, ...
            raise JudgeError(self._scrub(
                f"judge preflight: cannot reach {where} ({self.model}): "
                f"{type(e).__name__}: {e}")) from None

    async def aclose(self) -> None:
        for c in (self._client, self._standard_client):
            await c.aio.aclose()
