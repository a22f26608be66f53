"""One judge HTTP call, no retries: the small interface every judge service sits behind.

A JudgeAPI sends one rubric request and returns the answer's text with its billed tokens, or
raises: JudgeHTTPError for a non-2xx answer (with Retry-After when the service sent one),
asyncio.TimeoutError past timeout_s, aiohttp.ClientError / ConnectionError when the service is
unreachable. Parsing the text and retrying belong to reward/judge_client.Judge.
"""
from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Protocol

from reward.rubric import JudgeRequest


@dataclass(frozen=True)
class RawAnswer:
    text: str
    input_tokens: int
    output_tokens: int  # everything billed as output: visible + thought/reasoning tokens
    thought_tokens: int = 0  # the thought/reasoning share of output_tokens, where the service reports it


class JudgeHTTPError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        self.status, self.message, self.retry_after = status, message, retry_after


class JudgeAPI(Protocol):
    name: str  # where the requests go, for messages (never contains a key)

    async def send(self, req: JudgeRequest, *, timeout_s: float, standard_tier: bool = False) -> RawAnswer:
        """standard_tier: bypass flex (the preflight wants a fast answer)."""
        ...

    async def aclose(self) -> None: ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent/invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
