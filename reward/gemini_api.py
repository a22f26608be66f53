"""Gemini through google-genai's async client: one judge call (reward/judge_api.JudgeAPI).

Flex tier (docs/design.md#the-judge): on the Developer API `service_tier="flex"` in the request
config; on Vertex the two request headers below. The SDK's own retries are off (they ignore
Retry-After): reward/judge_client.Judge owns retries. The API key comes from the caller (who
read it from the environment) and is scrubbed from every error text this module produces.
"""
from __future__ import annotations

import asyncio

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from conf.errors import EnvironmentSetupError
from reward import rubric
from reward.judge_api import JudgeHTTPError, RawAnswer, parse_retry_after

VERTEX_FLEX_HEADERS = {
    "X-Vertex-AI-LLM-Request-Type": "shared",
    "X-Vertex-AI-LLM-Shared-Request-Type": "flex",
}


class GeminiJudgeAPI:
    """Create and use within one event loop (the SDK's HTTP session binds to it)."""

    def __init__(self, api_key: str | None, *, model: str = "gemini-3-flash-preview",
                 base_url: str | None = None, vertexai: bool = False, project: str | None = None,
                 location: str | None = None, flex: bool = True, temperature: float = 0.2,
                 top_p: float = 0.9, thinking_level: str = "medium", max_output_tokens: int | None = None,
                 seed: int | None = None):
        if not api_key and not vertexai:
            raise EnvironmentSetupError("the Gemini judge needs an API key (none was given)")
        self.model, self.base_url, self.vertexai, self.flex = model, base_url, vertexai, flex
        self.name = f"{base_url or ('Vertex AI' if vertexai else 'the Gemini API')} ({model})"
        self._secret = api_key or ""
        self._thinking = types.ThinkingConfig(thinking_level=thinking_level.upper(), include_thoughts=False)
        self._sampling = {"temperature": temperature, "top_p": top_p, "max_output_tokens": max_output_tokens,
                          "seed": seed}
        self._configs: dict[tuple[str, bool], types.GenerateContentConfig] = {}
        self._flex_client = self._client(api_key, project, location, flex=flex)
        self._standard_client = self._client(api_key, project, location, flex=False)

    def _client(self, api_key, project, location, *, flex: bool) -> genai.Client:
        headers = dict(VERTEX_FLEX_HEADERS) if (flex and self.vertexai) else None
        http = types.HttpOptions(base_url=self.base_url, headers=headers,
                                 retry_options=types.HttpRetryOptions(attempts=1))
        if self.vertexai:
            if api_key:  # Vertex express mode
                return genai.Client(vertexai=True, api_key=api_key, http_options=http)
            return genai.Client(vertexai=True, project=project, location=location, http_options=http)
        return genai.Client(api_key=api_key, http_options=http)

    def _config(self, system_instruction: str, *, flex: bool) -> types.GenerateContentConfig:
        """Built once per (rubric, tier): building the schema and config per request costs CPU
        that the pipelined step takes from generation."""
        key = (system_instruction, flex)
        if key not in self._configs:
            self._configs[key] = self._new_config(system_instruction, flex=flex)
        return self._configs[key]

    def _new_config(self, system_instruction: str, *, flex: bool) -> types.GenerateContentConfig:
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

    async def send(self, req: rubric.JudgeRequest, *, timeout_s: float, standard_tier: bool = False) -> RawAnswer:
        flex = self.flex and not standard_tier
        client = self._flex_client if flex else self._standard_client
        try:
            resp = await asyncio.wait_for(
                client.aio.models.generate_content(model=self.model, contents=req.user_text,
                                                   config=self._config(req.system_instruction, flex=flex)),
                timeout=timeout_s)
        except genai_errors.APIError as e:
            headers = getattr(getattr(e, "response", None), "headers", None) or {}
            message = self._scrub(f"{e.status or ''} {e.message or ''}".strip())
            raise JudgeHTTPError(e.code, message, parse_retry_after(headers.get("Retry-After"))) from None
        um = resp.usage_metadata
        tin = (um.prompt_token_count or 0) if um else 0
        thoughts = (um.thoughts_token_count or 0) if um else 0
        tout = ((um.candidates_token_count or 0) + thoughts) if um else 0
        return RawAnswer(resp.text or "", tin, tout, thoughts)

    async def aclose(self) -> None:
        for c in (self._flex_client, self._standard_client):
            await c.aio.aclose()
