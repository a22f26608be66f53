"""OpenAIJudgeAPI against the loopback judge server (and a tiny misbehaving server)."""

import asyncio
import json
import socket
import time

import aiohttp
import pytest
from aiohttp import web

from reward import rubric
from reward.judge_api import JudgeHTTPError
from reward.judge_server import Faults, LocalJudgeServer
from reward.openai_api import OpenAIJudgeAPI

KEY = "sk-planted-SECRET-4711"
STORY = """The night the lighthouse went dark, Ines climbed the hundred steps with a candle \
and her grandmother's sextant, because somebody had to.

"You can't light a lens with a candle," her brother said from the bottom of the stairs.

"Watch me," she said.

She set mirrors from every room in the house around the little flame, and a thin, stubborn \
beam went out across the water, and at two in the morning a fishing boat answered it with three \
short blasts of its horn."""
REQUEST = rubric.build_judge_request("Write about a lighthouse that goes dark.", STORY)


@pytest.fixture(scope="module")
def server():
    with LocalJudgeServer() as srv:
        yield srv


def send(base_url, *, timeout_s=5.0, key=KEY, **options):
    """One send() through a fresh client in a fresh event loop."""
    async def go():
        api = OpenAIJudgeAPI(key, model="gpt-test", base_url=base_url, **options)
        try:
            return await api.send(REQUEST, timeout_s=timeout_s)
        finally:
            await api.aclose()
    return asyncio.run(go())


SEND_ERRORS = (JudgeHTTPError, asyncio.TimeoutError, aiohttp.ClientError, ConnectionError)


def send_error(base_url, **kw) -> Exception:
    """The error send() raises; its text never names the key."""
    with pytest.raises(SEND_ERRORS) as e:
        send(base_url, **kw)
    assert KEY not in str(e.value) and KEY not in repr(e.value)
    return e.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_good_answer_parses_and_counts_tokens(server):
    raw = send(server.base_url + "/v1")
    judgment = rubric.parse_judgment(raw.text)
    assert judgment.positive > 0
    assert raw.input_tokens > 0 and raw.output_tokens == len(raw.text) // 4 + 1 and raw.thought_tokens == 0


def test_reasoning_tokens_are_billed_as_output(server):
    raw = send(server.base_url + "/v1", reasoning_effort="medium")
    visible = len(raw.text) // 4 + 1
    assert raw.output_tokens == 3 * visible  # the stand-in reasons twice as much as it writes
    assert raw.thought_tokens == 2 * visible  # reported apart (completion_tokens_details.reasoning_tokens)


def test_request_body_carries_the_configured_options(server):
    send(server.base_url + "/v1/", seed=42)
    recorded = server.requests[-1]
    body = recorded["body"]
    assert recorded["path"] == "/v1/chat/completions"
    assert body["model"] == "gpt-test" and body["temperature"] == 0.2 and body["seed"] == 42
    assert body["messages"] == [{"role": "system", "content": REQUEST.system_instruction},
                                {"role": "user", "content": REQUEST.user_text}]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "story_judgment", "schema": rubric.response_json_schema(), "strict": True}}
    assert not {"top_p", "max_completion_tokens", "reasoning_effort"} & set(body)

    send(server.base_url + "/v1", top_p=0.9, max_output_tokens=4096, reasoning_effort="low")
    body = server.requests[-1]["body"]
    assert (body["top_p"], body["max_completion_tokens"], body["reasoning_effort"]) == (0.9, 4096, "low")
    assert "seed" not in body


def test_429_carries_retry_after():
    with LocalJudgeServer(faults=Faults(script=["429"], retry_after_s=7)) as srv:
        error = send_error(srv.base_url + "/v1")
    assert isinstance(error, JudgeHTTPError)
    assert error.status == 429 and error.retry_after == 7.0
    assert "rate limited" in error.message


def test_503_is_an_http_error():
    with LocalJudgeServer(faults=Faults(script=["503"])) as srv:
        error = send_error(srv.base_url + "/v1")
    assert isinstance(error, JudgeHTTPError) and error.status == 503 and error.retry_after is None


def test_hang_times_out():
    with LocalJudgeServer(faults=Faults(script=["hang"], hang_s=5.0)) as srv:
        start = time.monotonic()
        error = send_error(srv.base_url + "/v1", timeout_s=0.5)
    assert isinstance(error, asyncio.TimeoutError)
    assert time.monotonic() - start < 2.0


def test_unreachable_service_is_a_connection_error():
    error = send_error(f"http://127.0.0.1:{free_port()}/v1")
    assert isinstance(error, (aiohttp.ClientError, ConnectionError))


def test_key_is_sent_as_bearer_and_never_recorded_or_named(server):
    api = OpenAIJudgeAPI(KEY, model="gpt-test", base_url=server.base_url + "/v1")
    assert api.name == f"{server.base_url}/v1 (gpt-test)"
    send(server.base_url + "/v1")
    assert KEY not in json.dumps(server.requests)


def misbehaving_service(answer: web.Response, seen: list):
    """Run send() against a one-route service that records headers and gives `answer`."""
    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return answer

    async def go(key):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        api = OpenAIJudgeAPI(key, model="m", base_url=f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
        try:
            return await api.send(REQUEST, timeout_s=5)
        finally:
            await api.aclose()
            await runner.cleanup()
    return go


def test_key_echoed_by_the_service_is_scrubbed():
    seen = []
    body = {"error": {"message": f"Incorrect API key provided: {KEY}. " + "x" * 500,
                      "type": "invalid_request_error", "code": "invalid_api_key"}}
    go = misbehaving_service(web.json_response(body, status=401), seen)
    with pytest.raises(JudgeHTTPError) as e:
        asyncio.run(go(KEY))
    assert e.value.status == 401 and e.value.message.startswith("Incorrect API key provided: ***")
    assert KEY not in str(e.value) and len(e.value.message) <= 300
    assert seen[0]["Authorization"] == f"Bearer {KEY}"


def test_answer_without_content_is_a_502_and_no_key_means_no_header():
    seen = []
    go = misbehaving_service(web.json_response({"choices": [], "usage": {}}), seen)
    with pytest.raises(JudgeHTTPError) as e:
        asyncio.run(go(None))
    assert e.value.status == 502 and "without message content" in e.value.message
    assert "Authorization" not in seen[0]


def test_missing_usage_counts_zero_tokens():
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "{}"}}]}
    raw = asyncio.run(misbehaving_service(web.json_response(answer), [])(KEY))
    assert (raw.text, raw.input_tokens, raw.output_tokens) == ("{}", 0, 0)
