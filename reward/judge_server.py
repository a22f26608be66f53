"""A loopback stand-in for the Gemini judge: the generateContent REST API on 127.0.0.1.

It answers POST .../models/{model}:generateContent (Developer API /v1beta/ and /v1/, Vertex
/v1beta1/ and /v1/ with or without projects/{p}/locations/{l}/publishers/google/) with
deterministic rubric scores computed from text features of the delimited story: longer, more
varied, paragraphed text with dialogue scores higher; repetition and very short text are
penalised. The answer follows the request's response schema (JSON or OpenAPI style), so it
is valid against whatever rubric the client sent. Any API key is accepted and none is logged.

Faults (off by default, seeded): 429 with Retry-After, 503, slow answers, malformed JSON;
`script` forces the outcomes of the first requests ("429", "503", "slow", "malformed", "ok").
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from reward import rubric

API_KEY_HEADERS = ("x-goog-api-key", "authorization")

# name -> which feature drives it; unknown schema properties follow overall quality.
_CLICHES = ("suddenly", "little did", "heart pounded", "once upon a time", "in the nick of time",
            "all of a sudden", "a chill ran down", "let out a breath", "testament to")
_TELLING = re.compile(r"\b(felt|feel|feeling|was (very )?(sad|happy|angry|afraid|scared))\b",
                      re.IGNORECASE)

_PROMPT_STOPWORDS = {"write", "story", "about", "that", "with", "your", "their", "there", "this",
                     "from", "they", "have", "what", "when", "which", "where", "would", "should"}


@dataclass
class Faults:
    p_429: float = 0.0
    p_503: float = 0.0
    p_slow: float = 0.0
    p_malformed: float = 0.0
    retry_after_s: int = 1
    slow_s: float = 2.0
    seed: int = 0
    script: list[str] = field(default_factory=list)


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def story_features(story: str, prompt: str = "") -> dict[str, float]:
    """Text features in [0, 1] (1 = more of the thing named)."""
    words = re.findall(r"[a-z']+", story.lower())
    n = len(words)
    window = 50  # moving-average type/token ratio: independent of length
    ttrs = [len(set(words[i:i + window])) / window for i in range(0, max(1, n - window + 1), 10)]
    mattr = sum(ttrs) / len(ttrs) if n >= window else (len(set(words)) / n if n else 0.0)
    grams = [tuple(words[i:i + 4]) for i in range(n - 3)]
    rep4 = (sum(c for c in Counter(grams).values() if c > 1) / len(grams)) if grams else 0.0
    lines = [ln.strip() for ln in story.splitlines() if ln.strip()]
    dup = 1 - len(set(lines)) / len(lines) if lines else 0.0
    sents = [len(s.split()) for s in re.split(r"[.!?]+", story) if s.split()]
    mean = sum(sents) / len(sents) if sents else 0.0
    var = sum((x - mean) ** 2 for x in sents) / len(sents) if sents else 0.0
    p_words = set(re.findall(r"[a-z']{4,}", prompt.lower())) - _PROMPT_STOPWORDS
    return {
        "length": _clamp01(n / 400),
        "diversity": _clamp01((mattr - 0.4) / 0.4),
        "variety": _clamp01((var ** 0.5 / mean) / 0.6) if mean else 0.0,
        "paragraphs": _clamp01((len(re.split(r"\n\s*\n", story.strip())) - 1) / 5),
        "dialogue": _clamp01(story.count('"') / 2 / max(1, len(sents)) * 3),
        "punctuation": len(set(story) & set(",;:!?\"'-()")) / 10,
        "repetition": _clamp01(3 * rep4 + dup),
        "cliche": _clamp01(sum(story.lower().count(c) for c in _CLICHES) / 3),
        "telling": _clamp01(len(_TELLING.findall(story)) / max(1, len(sents)) * 4),
        "adverbs": _clamp01(sum(w.endswith("ly") for w in words) / max(1, n) * 15),
        "meta": _clamp01(len(re.findall(r"^#|\*\*|word count|^title:", story, re.I | re.M)) / 2),
        "on_prompt": len(p_words & set(words)) / len(p_words) if p_words else 1.0,
    }


def _fractions(f: dict[str, float]) -> dict[str, float]:
    """Per rubric dimension, the fraction of its maximum the stand-in judge awards."""
    fresh = f["length"] * (1 - f["repetition"])
    quality = fresh * (0.4 + 0.3 * f["diversity"] + 0.15 * f["variety"] + 0.15 * f["paragraphs"])
    return {
        "plot": fresh * (0.5 + 0.5 * f["paragraphs"]),
        "character": fresh * (0.4 + 0.6 * f["dialogue"]),
        "prose": fresh * (0.3 + 0.4 * f["diversity"] + 0.3 * f["variety"]),
        "structure": fresh * (0.4 + 0.6 * f["paragraphs"]),
        "originality": fresh * f["diversity"],
        "emotional_impact": fresh * (0.4 + 0.3 * f["punctuation"] + 0.3 * f["dialogue"]),
        "cliche": f["cliche"],
        "purple_prose": f["adverbs"],
        "incoherence": 0.5 * (1 - f["diversity"]) + 0.5 * f["repetition"],
        "repetition": f["repetition"],
        "unresolved_threads": 1 - f["length"],
        "telling_not_showing": f["telling"],
        "flat_dialogue": 0.5 * (1 - f["dialogue"]),
        "pacing": 1 - f["variety"],
        "meta_artifacts": f["meta"],
        "prompt_neglect": 1 - f["on_prompt"],
        "bonus": _clamp01((quality - 0.75) * 4),
        "penalty": _clamp01(1 - f["length"] * 4) if f["length"] < 0.25 else f["repetition"] ** 2,
        "": quality,
    }


def _first_sentence(story: str) -> str:
    s = re.split(r"(?<=[.!?])\s", story.strip(), maxsplit=1)[0]
    return s[:120]


def _get(d: dict, *keys: str):
    for k in keys:
        if isinstance(d, dict) and k in d:
            return d[k]
    return None


def judge_json(schema: dict, prompt: str, story: str) -> dict:
    """A JSON object valid against schema (object of {evidence, score} objects, or of ints)."""
    frac = _fractions(story_features(story, prompt))
    quote = _first_sentence(story)
    out = {}
    props = _get(schema, "properties") or {}
    for name, sub in props.items():
        x = frac.get(name, frac[""])
        sub_props = _get(sub, "properties") or {}
        if sub_props:
            score_schema = sub_props.get("score", {})
            out[name] = {"evidence": quote if x > 0 else "",
                         "score": _scaled(score_schema, x)}
        else:
            out[name] = _scaled(sub, x)
    return out


def _scaled(schema: dict, x: float) -> int:
    lo, hi = int(_get(schema, "minimum") or 0), int(_get(schema, "maximum") or 10)
    return lo + round((hi - lo) * _clamp01(x))


def _request_text(body: dict) -> tuple[str, str]:
    """(all text the request carries, the user text)."""
    def texts(content):
        return [p.get("text", "") for p in (content or {}).get("parts", []) if isinstance(p, dict)]
    user = "\n".join(t for c in body.get("contents", []) for t in texts(c))
    system = "\n".join(texts(_get(body, "systemInstruction", "system_instruction")))
    return system + "\n" + user, user


class LocalJudgeServer:
    """with LocalJudgeServer() as srv: genai.Client(http_options={"base_url": srv.base_url})"""

    def __init__(self, port: int = 0, faults: Faults | None = None):
        self.port = port
        self.faults = faults or Faults()
        self.requests: list[dict] = []  # {"path", "body", "headers"} without key headers
        self.in_flight = self.max_in_flight = 0
        self._rng = random.Random(self.faults.seed)
        self._script = list(self.faults.script)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "INVALID_ARGUMENT", "request body is not JSON")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in API_KEY_HEADERS}
        self.requests.append({"path": request.path, "body": body, "headers": headers})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict) -> web.Response:
        outcome = self._script.pop(0) if self._script else self._draw()
        if outcome == "429":
            return _error(429, "RESOURCE_EXHAUSTED", "stand-in judge: rate limited",
                          {"Retry-After": str(self.faults.retry_after_s)})
        if outcome == "503":
            return _error(503, "UNAVAILABLE", "stand-in judge: overloaded")
        if outcome == "slow":
            await asyncio.sleep(self.faults.slow_s)
        all_text, user = _request_text(body)
        config = _get(body, "generationConfig", "generation_config") or {}
        schema = _get(config, "responseJsonSchema", "responseSchema", "response_json_schema",
                      "response_schema")
        found = rubric.extract_delimited(user)
        if schema:
            prompt, story = found if found is not None else ("", user)
            text = json.dumps(judge_json(schema, prompt, story))
        else:
            text = "OK"
        if outcome == "malformed":
            text = text[: len(text) // 2]
        thinking = _get(config, "thinkingConfig") is not None
        prompt_tokens, out_tokens = len(all_text) // 4 + 1, len(text) // 4 + 1
        thought_tokens = 2 * out_tokens if thinking else 0
        return web.json_response({
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": out_tokens,
                "thoughtsTokenCount": thought_tokens,
                "totalTokenCount": prompt_tokens + out_tokens + thought_tokens,
            },
            "modelVersion": request.match_info.get("model", ""),
        })

    def _draw(self) -> str:
        f, u = self.faults, self._rng.random()
        for name, p in (("429", f.p_429), ("503", f.p_503), ("slow", f.p_slow),
                        ("malformed", f.p_malformed)):
            if u < p:
                return name
            u -= p
        return "ok"

    def _app(self) -> web.Application:
        app = web.Application()
        for prefix in ("/{version:v1|v1beta|v1beta1}",
                       "/{version:v1|v1beta|v1beta1}/publishers/google",
                       "/{version:v1|v1beta|v1beta1}/projects/{project}/locations/{location}"
                       "/publishers/google"):
            app.router.add_post(prefix + "/models/{model}:generateContent", self._handle)
        return app

    def start(self) -> str:
        """Serve on 127.0.0.1 in a background thread; returns the base URL."""
        ready, errors = threading.Event(), []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._serve())
            except BaseException as e:  # noqa: BLE001 -- handed to start()'s caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

        self._thread = threading.Thread(target=run, name="local-judge", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        return self.base_url

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            # in-flight requests get shutdown_timeout to finish, then are cancelled
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = self._thread = None

    def __enter__(self) -> LocalJudgeServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _error(code: int, status: str, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "status": status}},
                             status=code, headers=headers)
