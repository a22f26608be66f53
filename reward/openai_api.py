"""An OpenAI-compatible chat-completions service as the judge: one call (reward/judge_api.JudgeAPI).

Works with OpenAI and with servers that speak its API (vLLM, the loopback judge server). The
answer is constrained by the rubric's JSON schema (response_format json_schema, strict). The
key, when given, goes in `Authorization: Bearer`; it is scrubbed from every error text this
module produces. No retries: reward/judge_client.Judge owns them.
"""
from __future__ import annotations

import asyncio
import json

import aiohttp

from reward import rubric
from reward.judge_api import JudgeHTTPError, RawAnswer, parse_retry_after

ERROR_MESSAGE_MAX_CHARS = 300


class OpenAIJudgeAPI:
    """May be built outside an event loop; the HTTP session is opened by the first send()."""

    def __init__(self, api_key: str | None, *, model: str, base_url: str = "https://api.openai.com/v1",
                 temperature: float = 0.2, top_p: float | None = None, seed: int | None = None,
                 max_output_tokens: int | None = None, reasoning_effort: str | None = None):
        self.model = model
        self.name = f"{base_url} ({model})"
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._secret = api_key or ""
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        options = {"temperature": temperature, "top_p": top_p, "seed": seed,
                   "max_completion_tokens": max_output_tokens, "reasoning_effort": reasoning_effort}
        self._options = {k: v for k, v in options.items() if v is not None}
        self._session: aiohttp.ClientSession | None = None

    def request_body(self, req: rubric.JudgeRequest) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": req.system_instruction},
                         {"role": "user", "content": req.user_text}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "story_judgment", "schema": rubric.response_json_schema(), "strict": True}},
            **self._options,
        }

    async def send(self, req: rubric.JudgeRequest, *, timeout_s: float, standard_tier: bool = False) -> RawAnswer:
        """standard_tier is accepted for the interface; this client always uses the default tier."""
        if self._session is None or self._session.closed:
            # no session-wide timeout: timeout_s bounds each call
            self._session = aiohttp.ClientSession(headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return await asyncio.wait_for(self._post(self.request_body(req)), timeout=timeout_s)

    async def _post(self, body: dict) -> RawAnswer:
        async with self._session.post(self._url, json=body) as resp:
            text = await resp.text(errors="replace")
            if not 200 <= resp.status < 300:
                raise JudgeHTTPError(resp.status, self._error_message(text),
                                     parse_retry_after(resp.headers.get("Retry-After")))
        envelope = _json_object(text)
        try:
            content = envelope["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise JudgeHTTPError(502, "answer without message content")
        usage = envelope.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        details = usage.get("completion_tokens_details")
        reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
        return RawAnswer(content, int(usage.get("prompt_tokens") or 0),
                         int(usage.get("completion_tokens") or 0), int(reasoning or 0))

    def _error_message(self, text: str) -> str:
        error = _json_object(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = str(message) if message else text.strip()
        if self._secret:
            message = message.replace(self._secret, "***")
        return message[:ERROR_MESSAGE_MAX_CHARS]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _json_object(text: str) -> dict:
    """text as a JSON object; {} when it is not one."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
