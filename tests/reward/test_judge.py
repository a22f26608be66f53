"""Judge (retries, deadline, limiter) over the Gemini API, end to end on 127.0.0.1 through google-genai."""

import asyncio
import json
import socket
import time

import pytest

from conf.errors import EnvironmentSetupError, JudgeError
from reward import rubric
from reward.gemini_api import VERTEX_FLEX_HEADERS, GeminiJudgeAPI
from reward.judge_client import Judge, JudgeSettings, RetryPolicy, make_api
from reward.judge_server import Faults, LocalJudgeServer
from reward.limiter import RateLimiter, RateLimits

KEY = "test-key-SECRET-4711"
PROMPT = "Write about a lighthouse keeper who counts ships."
GOOD = """The lighthouse keeper, Mara Quill, counted ships that never came. She kept the tally \
in chalk on the iron door: nine strokes for nine winters, one crossed through for the night her \
brother's trawler went down off Hollin Reef.

"You'll wear a groove in that door," said Tobias, the postman, who rowed out every second \
Thursday with flour, lamp oil and letters she did not open.

"Then I'll paint it," she said.

He laughed, but not unkindly. He left the sack on the landing and looked up at the lamp, which \
turned and turned, patient as a clock.

On the ninth night of the ninth winter, the fog came in thick as wool. Mara trimmed the wick, \
polished the great lens until her knuckles bled, and climbed out onto the gallery. Somewhere \
below, an engine coughed. Then a horn: two short blasts, one long. Her brother's signal.

She ran down the hundred and twelve steps - two at a time, then three - and out onto the rocks. \
A hull slid out of the fog, low and battered, its lamps guttering. A figure stood at the bow.

It was a girl of perhaps sixteen, soaked, furious, holding a tin box against her chest.

"Are you Mara?" the girl shouted. "He said you'd still be counting."

Inside the box were letters, dozens, tied with fishing twine, every one stamped from a harbour \
three hundred miles south. "He never drowned," the girl said quietly. "He just never knew how \
to come back. He made me promise I would."

That night Mara did not add a stroke to the door. She scrubbed the chalk away instead, put the \
kettle on, and opened the first letter while the lamp went round above them both."""
REPETITIVE = "The ship came. The keeper waved. " * 60
SHORT = "The ship came and she waved."


@pytest.fixture(scope="module")
def server():
    with LocalJudgeServer() as srv:
        yield srv


def make_judge(base_url, *, vertexai=False, limits=None, sleep=asyncio.sleep, **retry):
    api = GeminiJudgeAPI(KEY, base_url=base_url, vertexai=vertexai)
    limiter = RateLimiter(limits) if limits else None
    return Judge(api, retry=RetryPolicy(**retry), limiter=limiter, sleep=sleep, seed=0)


def judge_all(base_url, stories, **kw):
    async def go():
        judge = make_judge(base_url, **kw)
        try:
            return [await judge.judge(PROMPT, s) for s in stories]
        finally:
            await judge.aclose()
    return asyncio.run(go())


def recording_sleep(delays):
    async def sleep(s):
        delays.append(s)
    return sleep


def test_better_story_scores_higher(server):
    good, rep, short = judge_all(server.base_url, [GOOD, REPETITIVE, SHORT])
    assert all(r.ok and r.error is None and r.attempts == 1 for r in (good, rep, short))
    assert good.overall > 30
    assert good.overall > rep.overall + 40 and good.overall > short.overall + 40
    assert rep.judgment.scores["repetition"] == 15
    assert short.judgment.scores["unresolved_threads"] > good.judgment.scores["unresolved_threads"]
    for r in (good, rep, short):
        assert rubric.OVERALL_MIN <= r.overall <= rubric.OVERALL_MAX
        assert r.overall == rubric.overall_score(r.judgment)


def test_same_input_same_score(server):
    a, b = judge_all(server.base_url, [GOOD, GOOD])
    assert a.judgment.scores == b.judgment.scores and a.overall == b.overall


def test_usage_tokens_reported(server):
    (r,) = judge_all(server.base_url, [GOOD])
    # the request holds the rubric and the story: well over a quarter of the story in tokens
    assert r.input_tokens > len(GOOD) // 4
    body = server.requests[-1]["body"]
    assert body["generationConfig"]["thinkingConfig"]  # thoughts billed as output too:
    answer_tokens = len(json.dumps(r.judgment.scores)) // 4
    assert r.output_tokens > 2 * answer_tokens


def test_request_config_and_key_hygiene(server):
    judge_all(server.base_url, [SHORT])
    req = server.requests[-1]
    cfg = req["body"]["generationConfig"]
    assert cfg["temperature"] == 0.2 and cfg["topP"] == 0.9
    assert cfg["responseJsonSchema"] == rubric.response_json_schema()
    thinking = {k.lower().replace("_", ""): v for k, v in cfg["thinkingConfig"].items()}
    assert thinking == {"thinkinglevel": "MEDIUM", "includethoughts": False}
    assert req["body"]["serviceTier"] == "flex"
    assert req["body"]["systemInstruction"]["parts"][0]["text"] == rubric.SYSTEM_INSTRUCTION
    assert req["path"].endswith("/models/gemini-3-flash-preview:generateContent")
    assert KEY not in json.dumps(req)  # the server keeps no key header


def test_vertex_flex_uses_headers_not_service_tier(server):
    (r,) = judge_all(server.base_url, [GOOD], vertexai=True)
    req = server.requests[-1]
    assert r.ok and "/publishers/google/models/" in req["path"]
    for k, v in VERTEX_FLEX_HEADERS.items():
        assert req["headers"][k] == v
    assert "serviceTier" not in req["body"]


def test_429_and_503_are_retried_honouring_retry_after():
    delays = []
    with LocalJudgeServer(faults=Faults(script=["429", "503"], retry_after_s=7)) as srv:
        (r,) = judge_all(srv.base_url, [GOOD], backoff_s=0.01, sleep=recording_sleep(delays))
        assert len(srv.requests) == 3
    assert r.ok and r.attempts == 3 and r.error is None
    assert delays[0] == 7  # Retry-After beats the 0.01 s backoff
    assert delays[1] < 0.05  # 503 without Retry-After: exponential backoff only


@pytest.mark.parametrize("fault", ["truncated", "schema"])
def test_bad_json_is_retried_and_every_attempt_billed(fault):
    with LocalJudgeServer(faults=Faults(script=[fault])) as srv:
        (r,) = judge_all(srv.base_url, [GOOD], backoff_s=0.001)
    (clean,) = judge_all_fresh([GOOD])
    assert r.ok and r.attempts == 2 and r.overall == clean.overall
    assert r.input_tokens == 2 * clean.input_tokens
    assert clean.output_tokens < r.output_tokens


def judge_all_fresh(stories, **kw):
    with LocalJudgeServer() as srv:
        return judge_all(srv.base_url, stories, **kw)


def test_retries_are_bounded_and_errors_hide_the_key():
    delays = []
    with LocalJudgeServer(faults=Faults(p_503=1.0)) as srv:
        (r,) = judge_all(srv.base_url, [GOOD], max_attempts=3, backoff_s=1.0, sleep=recording_sleep(delays))
        assert len(srv.requests) == 3
    assert not r.ok and r.overall is None and r.attempts == 3
    assert "503" in r.error and KEY not in r.error
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0  # exponential, jittered


def test_hang_past_the_timeout_is_retried():
    with LocalJudgeServer(faults=Faults(script=["hang"], hang_s=30)) as srv:
        t0 = time.monotonic()
        (r,) = judge_all(srv.base_url, [GOOD], timeout_s=0.5, backoff_s=0.001)
        assert time.monotonic() - t0 < 5
    assert r.ok and r.attempts == 2


def test_per_story_deadline_bounds_the_retries():
    with LocalJudgeServer(faults=Faults(p_429=1.0, retry_after_s=5)) as srv:
        t0 = time.monotonic()
        (r,) = judge_all(srv.base_url, [GOOD], max_attempts=10, deadline_s=2.0, backoff_s=0.001)
        assert time.monotonic() - t0 < 2.0  # a 5 s Retry-After cannot fit: give up at once
        assert len(srv.requests) == 1
    assert not r.ok and "deadline" in r.error and r.attempts == 1


def test_missing_api_key_is_an_environment_error(monkeypatch):
    with pytest.raises(EnvironmentSetupError, match="API key"):
        GeminiJudgeAPI(None)
    monkeypatch.delenv("POLARIS_TEST_NO_KEY", raising=False)
    with pytest.raises(EnvironmentSetupError, match="POLARIS_TEST_NO_KEY"):
        make_api(JudgeSettings(backend="gemini", model="m", api_key_env="POLARIS_TEST_NO_KEY"))


def test_non_retryable_http_error_fails_at_once(server):
    (r,) = judge_all(server.base_url + "/no-such-prefix", [GOOD], backoff_s=0.0)
    assert not r.ok and r.attempts == 1 and "404" in r.error


def test_in_flight_is_bounded_by_the_limiter():
    async def go(base_url):
        judge = make_judge(base_url, limits=RateLimits(max_in_flight=2))
        try:
            return await asyncio.gather(*(judge.judge(PROMPT, GOOD) for _ in range(6)))
        finally:
            await judge.aclose()
    with LocalJudgeServer(faults=Faults(p_slow=1.0, slow_s=0.2)) as srv:
        results = asyncio.run(go(srv.base_url))
        assert srv.max_in_flight == 2
    assert all(r.ok for r in results)


def test_preflight_passes_against_a_live_judge(server):
    async def go():
        judge = make_judge(server.base_url)
        try:
            await judge.preflight(timeout_s=10)
        finally:
            await judge.aclose()
    asyncio.run(go())
    assert "serviceTier" not in server.requests[-1]["body"]  # preflight runs on standard


def test_preflight_fails_fast_when_the_judge_is_unreachable():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now

    async def go():
        judge = make_judge(f"http://127.0.0.1:{port}")
        try:
            await judge.preflight(timeout_s=30)
        finally:
            await judge.aclose()
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match="cannot reach") as err:
        asyncio.run(go())
    assert time.monotonic() - t0 < 5
    assert KEY not in str(err.value)


def test_preflight_reports_a_rejected_request():
    with LocalJudgeServer() as srv:
        async def go():
            judge = make_judge(srv.base_url + "/wrong")
            try:
                await judge.preflight(timeout_s=10)
            finally:
                await judge.aclose()
        with pytest.raises(JudgeError, match="HTTP 404"):
            asyncio.run(go())


def test_openai_compatible_backend_judges_with_retries_and_the_key_from_the_environment(monkeypatch):
    from reward.judge_client import make_judge as judge_from_settings

    monkeypatch.setenv("POLARIS_TEST_OPENAI_KEY", KEY)
    with LocalJudgeServer(faults=Faults(script=["429", "schema"], retry_after_s=0)) as srv:
        settings = JudgeSettings(backend="openai", model="gpt-5.4", base_url=srv.base_url + "/v1",
                                 api_key_env="POLARIS_TEST_OPENAI_KEY", temperature=0.2, seed=42,
                                 retry=RetryPolicy(backoff_s=0.001), evaluation=True)

        async def go():
            judge = judge_from_settings(settings)
            try:
                return await judge.judge(PROMPT, GOOD)
            finally:
                await judge.aclose()
        r = asyncio.run(go())
        body = srv.requests[-1]["body"]
        assert KEY not in json.dumps(srv.requests)
    assert r.ok and r.attempts == 3 and r.input_tokens > 0
    assert r.overall == rubric.overall_score(r.judgment, evaluation=True)
    assert body["model"] == "gpt-5.4" and body["seed"] == 42 and body["temperature"] == 0.2
    assert body["response_format"]["json_schema"]["schema"] == rubric.response_json_schema()
