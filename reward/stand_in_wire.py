"""The wire formats the loopback judge server speaks: Gemini generateContent and OpenAI chat
completions. Each API reads a request into a Call and writes answers and error bodies."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from reward.stand_in_scores import first_key


@dataclass(frozen=True)
class Call:
    """What the stand-in needs from a request, whichever API it came through."""
    all_text: str  # system + user, for the prompt token count
    user: str
    schema: dict | None
    thinking: bool
    model: str


_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
_OPENAI_KIND = {400: ("invalid_request_error", "invalid_json"),
                401: ("invalid_request_error", "invalid_api_key"),
                403: ("invalid_request_error", "permission_denied"),
                404: ("invalid_request_error", "model_not_found"),
                429: ("requests", "rate_limit_exceeded"),
                503: ("server_error", "service_unavailable")}


class Gemini:
    @staticmethod
    def call(body: dict, request: web.Request) -> Call:
        def texts(content) -> list[str]:
            parts = (content or {}).get("parts", [])
            return [p.get("text", "") for p in parts if isinstance(p, dict)]
        user = "\n".join(t for c in body.get("contents", []) for t in texts(c))
        system = "\n".join(texts(first_key(body, "systemInstruction", "system_instruction")))
        config = first_key(body, "generationConfig", "generation_config") or {}
        schema = first_key(config, "responseJsonSchema", "responseSchema", "response_json_schema",
                           "response_schema")
        thinking = first_key(config, "thinkingConfig", "thinking_config") is not None
        return Call(system + "\n" + user, user, schema, thinking,
                    request.match_info.get("model", ""))

    @staticmethod
    def answer(call: Call, text: str, prompt_tokens: int, out_tokens: int,
               thought_tokens: int) -> dict:
        return {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": out_tokens,
                "thoughtsTokenCount": thought_tokens,
                "totalTokenCount": prompt_tokens + out_tokens + thought_tokens,
            },
            "modelVersion": call.model,
        }

    @staticmethod
    def error(code: int, message: str) -> dict:
        return {"error": {"code": code, "message": message,
                          "status": _GEMINI_STATUS.get(code, "INTERNAL")}}


class OpenAI:
    @staticmethod
    def call(body: dict, request: web.Request) -> Call:
        def text(content) -> str:  # a string, or a list of {"type": "text", "text": ...} parts
            if isinstance(content, list):
                return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
        messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
        system = "\n".join(text(m.get("content")) for m in messages
                           if m.get("role") in ("system", "developer"))
        user = "\n".join(text(m.get("content")) for m in messages if m.get("role") == "user")
        fmt = body.get("response_format")
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        thinking = body.get("reasoning_effort") not in (None, "none")
        return Call(system + "\n" + user, user, schema, thinking, str(body.get("model", "")))

    @staticmethod
    def answer(call: Call, text: str, prompt_tokens: int, out_tokens: int,
               thought_tokens: int) -> dict:
        completion = out_tokens + thought_tokens  # OpenAI counts reasoning as completion tokens
        return {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion,
                      "completion_tokens_details": {"reasoning_tokens": thought_tokens}},
        }

    @staticmethod
    def error(code: int, message: str) -> dict:
        kind, name = _OPENAI_KIND.get(code, ("server_error", None))
        return {"error": {"message": message, "type": kind, "param": None, "code": name}}


Wire = type[Gemini] | type[OpenAI]
