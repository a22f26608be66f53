"""The loopback judge server as a test double of the judge services: both APIs, the RPM window,
latency, injected faults and statistics, over plain HTTP (urllib). Time-dependent cases run on a
fake clock and a fake sleep: no assertion depends on how fast this machine is."""

import asyncio
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest

from reward import rubric
from reward.judge_server import Faults, LocalJudgeServer

SECRET = "sk-planted-SECRET-0815"
PROMPT = "Write about a ferryman who refuses one passenger."
STORY = """Old Anselm had rowed the river for forty years, and he had refused exactly one \
passenger: his own son, the night the boy came down to the landing with blood on his cuffs.

"Take me across," Teo said. "Please. Before they come."

Anselm looked at the far bank, where the lamps of the border post swung in the wind, and then at \
his son's hands. He did not ask. He had never been a man who asked.

"The river is high," he said. "Wait until morning."

By morning the soldiers had come and gone, and Teo was asleep in the hayloft, and the river had \
dropped a foot. Anselm rowed him across at dawn, slowly, the oars barely whispering, and neither \
of them spoke until the keel scraped gravel.

"Why did you make me wait?" Teo asked.

"Because at night," Anselm said, "you would have asked me to row faster.\""""


def gemini_body(req: rubric.JudgeRequest, schema: dict | None = None) -> dict:
    config = {"temperature": 0.2}
    if schema is not None:
        config["responseJsonSchema"] = schema
    return {"contents": [{"role": "user", "parts": [{"text": req.user_text}]}],
            "systemInstruction": {"parts": [{"text": req.system_instruction}]},
            "generationConfig": config}


def openai_body(req: rubric.JudgeRequest, schema: dict | None = None, **extra) -> dict:
    body = {"model": "gpt-test", "temperature": 0.2, "seed": 42,
            "messages": [{"role": "system", "content": req.system_instruction},
                         {"role": "user", "content": req.user_text}], **extra}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "story_judgment", "schema": schema, "strict": True}}
    return body


GEMINI_PATH = "/v1beta/models/gemini-test:generateContent"
OPENAI_PATH = "/v1/chat/completions"


def post(srv, path, body, headers=None, timeout=30.0):
    """(status, headers, parsed JSON body) of one POST; non-2xx answers too."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(srv.base_url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


class FakeClock:
    """The server's clock, set by hand; its sleep() passes the latency at once in fake time."""

    def __init__(self, now: float = 100.0):
        self.now, self.slept = now, []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def gemini_text(answer: dict) -> str:
    return answer["candidates"][0]["content"]["parts"][0]["text"]


def openai_text(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def server():
    with LocalJudgeServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def judge_request():
    return rubric.build_judge_request(PROMPT, STORY)


def test_listens_on_127_0_0_1_only(server):
    assert server.base_url == f"http://127.0.0.1:{server.port}"
    # another loopback address reaches this host, but nothing listens there
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", server.port), timeout=2).close()


@pytest.mark.parametrize("path", [
    "/v1beta/models/m:generateContent",
    "/v1/publishers/google/models/m:generateContent",
    "/v1beta1/projects/p/locations/us-central1/publishers/google/models/m:generateContent",
])
def test_gemini_routes_answer_a_valid_judgment(server, judge_request, path):
    status, _, answer = post(server, path, gemini_body(judge_request, rubric.response_json_schema()))
    assert status == 200
    judgment = rubric.parse_judgment(gemini_text(answer))
    assert judgment.positive > 0


def test_openai_route_answers_the_gemini_scores_with_usage(server, judge_request):
    schema = rubric.response_json_schema()
    _, _, gemini = post(server, GEMINI_PATH, gemini_body(judge_request, schema))
    status, _, answer = post(server, OPENAI_PATH, openai_body(judge_request, schema))
    assert status == 200
    assert answer["object"] == "chat.completion" and answer["model"] == "gpt-test"
    choice = answer["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    judgment = rubric.parse_judgment(openai_text(answer))
    assert judgment.scores == rubric.parse_judgment(gemini_text(gemini)).scores
    usage = answer["usage"]
    visible = len(openai_text(answer)) // 4 + 1
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == visible
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_reasoning_tokens_count_as_completion_tokens(server, judge_request):
    body = openai_body(judge_request, rubric.response_json_schema(), reasoning_effort="medium")
    _, _, answer = post(server, "/chat/completions", body)
    usage, visible = answer["usage"], len(openai_text(answer)) // 4 + 1
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert reasoning > 0 and usage["completion_tokens"] == visible + reasoning


def test_without_schema_both_apis_answer_ok(server, judge_request):
    assert gemini_text(post(server, GEMINI_PATH, gemini_body(judge_request))[2]) == "OK"
    assert openai_text(post(server, OPENAI_PATH, openai_body(judge_request))[2]) == "OK"


def test_key_headers_are_never_recorded(server, judge_request):
    before = len(server.requests)
    keys = {"Authorization": f"Bearer {SECRET}", "x-goog-api-key": SECRET, "X-Trace": "t-1"}
    post(server, OPENAI_PATH, openai_body(judge_request), headers=keys)
    post(server, GEMINI_PATH, gemini_body(judge_request), headers=keys)
    recorded = server.requests[before:]
    assert [r["path"] for r in recorded] == [OPENAI_PATH, GEMINI_PATH]
    assert all(r["headers"].get("X-Trace") == "t-1" for r in recorded)
    assert SECRET not in json.dumps(recorded)


def test_body_that_is_not_json_gets_400(server):
    request = urllib.request.Request(server.base_url + OPENAI_PATH, data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=5)
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_rpm_window_rejects_then_readmits(judge_request):
    clock = FakeClock()
    with LocalJudgeServer(rpm_limit=5, window_s=2.0, clock=clock, sleep=clock.sleep) as srv:
        for t in (100.0, 100.2, 100.4, 100.6, 100.8):
            clock.now = t
            assert post(srv, GEMINI_PATH, gemini_body(judge_request))[0] == 200
        clock.now = 100.9  # the oldest arrival leaves the window at 102.0: 1.1 s, rounded up
        status, headers, answer = post(srv, OPENAI_PATH, openai_body(judge_request))
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"
        assert headers["Retry-After"] == "2"
        clock.now = 101.5  # 0.5 s left
        status, headers, answer = post(srv, GEMINI_PATH, gemini_body(judge_request))
        assert status == 429 and answer["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert headers["Retry-After"] == "1"
        stats = srv.stats()
        assert (stats["arrivals"], stats["accepted"], stats["violations"]) == (7, 5, 2)
        assert stats["accepted_last_window"] == 5 and stats["answered"]["ok"] == 5

        clock.now = 102.05  # 100.0 has left the window (100.05, 102.05]: one slot
        assert post(srv, OPENAI_PATH, openai_body(judge_request))[0] == 200
        assert post(srv, OPENAI_PATH, openai_body(judge_request))[0] == 429  # and only one
        stats = srv.stats()
        assert (stats["arrivals"], stats["accepted"], stats["violations"]) == (9, 6, 3)
        assert stats["accepted_last_window"] == 5  # 100.2 ... 100.8 and 102.05
        assert srv.accepted_since(1.0) == 1 and srv.accepted_since(60.0) == 6


def test_rpm_rejections_skip_latency_and_faults(judge_request):
    clock = FakeClock()
    faults = Faults(script=["503", "truncated"])
    with LocalJudgeServer(faults=faults, rpm_limit=1, latency_s=(0.3, 0.3), clock=clock, sleep=clock.sleep) as srv:
        assert post(srv, GEMINI_PATH, gemini_body(judge_request))[0] == 503  # consumed the quota
        assert post(srv, GEMINI_PATH, gemini_body(judge_request))[0] == 429
        assert clock.slept == [0.3]  # the rejection slept no latency
        clock.now += 60.0
        assert post(srv, GEMINI_PATH, gemini_body(judge_request))[0] == 200  # the script's next: truncated
        answered = srv.stats()["answered"]
    assert (answered["503"], answered["truncated"], answered["ok"]) == (1, 1, 0)
    assert clock.slept == [0.3, 0.3]


def test_latency_draws_lie_in_range_and_are_the_handling_times(judge_request):
    clock = FakeClock()
    with LocalJudgeServer(latency_s=(0.2, 0.4), clock=clock, sleep=clock.sleep) as srv:
        for _ in range(4):
            assert post(srv, OPENAI_PATH, openai_body(judge_request))[0] == 200
        stats = srv.stats()
    assert len(clock.slept) == 4 and len(set(clock.slept)) == 4  # one draw per request
    assert all(0.2 <= d <= 0.4 for d in clock.slept), clock.slept
    # fake time passes only in the sleeps, so each handling time is its draw; nearest rank:
    # the median of four is the 2nd smallest, the 99th percentile the largest
    drawn = sorted(clock.slept)
    assert stats["latency_p50_s"] == pytest.approx(drawn[1]) and stats["latency_p99_s"] == pytest.approx(drawn[3])
    assert stats["answered"]["ok"] == 4


def test_requests_are_handled_concurrently(judge_request):
    held = []

    async def sleep(seconds):  # every request waits here until all four are in flight
        held.append(seconds)
        while len(held) < 4:
            await asyncio.sleep(0.01)

    with LocalJudgeServer(latency_s=(0.1, 0.1), sleep=sleep) as srv, ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: post(srv, OPENAI_PATH, openai_body(judge_request), timeout=60)[0],
                                 range(4)))
        assert statuses == [200] * 4 and srv.stats()["max_in_flight"] == 4


def test_scripted_faults_give_their_answers(judge_request):
    faults = Faults(script=["429", "503", "slow", "truncated", "schema", "schema", "ok"],
                    retry_after_s=7, slow_s=0.3)
    body = gemini_body(judge_request, rubric.response_json_schema())
    with LocalJudgeServer(faults=faults) as srv:
        status, headers, answer = post(srv, GEMINI_PATH, body)
        assert status == 429 and headers["Retry-After"] == "7"
        assert answer["error"]["status"] == "RESOURCE_EXHAUSTED"
        status, _, answer = post(srv, GEMINI_PATH, body)
        assert status == 503 and answer["error"]["status"] == "UNAVAILABLE"

        start = time.monotonic()
        status, _, answer = post(srv, GEMINI_PATH, body)
        assert status == 200 and time.monotonic() - start >= 0.3  # slept slow_s: a lower bound
        rubric.parse_judgment(gemini_text(answer))

        truncated = gemini_text(post(srv, GEMINI_PATH, body)[2])
        with pytest.raises(json.JSONDecodeError):
            json.loads(truncated)

        missing = json.loads(gemini_text(post(srv, GEMINI_PATH, body)[2]))
        as_word = json.loads(gemini_text(post(srv, GEMINI_PATH, body)[2]))
        assert len(missing) == len(rubric.DIMENSIONS) - 1
        assert "high" in [d["score"] for d in as_word.values()]
        for text in (truncated, json.dumps(missing), json.dumps(as_word)):
            with pytest.raises(rubric.JudgeOutputError):
                rubric.parse_judgment(text)

        rubric.parse_judgment(gemini_text(post(srv, GEMINI_PATH, body)[2]))
        assert srv.stats()["answered"] == {"ok": 1, "429": 1, "503": 1, "slow": 1, "hang": 0,
                                           "truncated": 1, "schema": 2}


def test_openai_fault_answers_use_openai_errors(judge_request):
    with LocalJudgeServer(faults=Faults(script=["429", "503"], retry_after_s=7)) as srv:
        status, headers, answer = post(srv, OPENAI_PATH, openai_body(judge_request))
        assert status == 429 and headers["Retry-After"] == "7"
        assert set(answer["error"]) >= {"message", "type", "code"}
        status, _, answer = post(srv, OPENAI_PATH, openai_body(judge_request))
        assert status == 503 and answer["error"]["type"] == "server_error"


def test_hang_outlasts_the_client_timeout(judge_request):
    with LocalJudgeServer(faults=Faults(script=["hang"])) as srv:  # hang_s: an hour
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            post(srv, GEMINI_PATH, gemini_body(judge_request), timeout=0.3)
        assert post(srv, GEMINI_PATH, gemini_body(judge_request))[0] == 200
        deadline = time.monotonic() + 30  # a wait for an event, not a speed requirement
        while srv.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = srv.stats()
    assert stats["in_flight"] == 0 and stats["dropped"] == 1  # the client gave up on it
    assert stats["answered"]["hang"] == 0 and stats["answered"]["ok"] == 1


def test_stop_cancels_a_hung_request(judge_request):
    srv = LocalJudgeServer(faults=Faults(script=["hang"]))  # hang_s defaults to an hour
    srv.start()
    client_errors = []

    def wait_for_answer():
        try:
            post(srv, GEMINI_PATH, gemini_body(judge_request), timeout=600)
        except (OSError, http.client.HTTPException) as e:
            client_errors.append(e)

    client = threading.Thread(target=wait_for_answer)
    client.start()
    while srv.stats()["in_flight"] == 0:
        time.sleep(0.01)
    srv.stop()  # would raise TimeoutError after 30 s if it waited for the hang
    client.join(timeout=30)
    assert not client.is_alive() and client_errors  # the connection closed under it
    stats = srv.stats()
    assert stats["dropped"] == 1 and stats["answered"]["hang"] == 0 and stats["in_flight"] == 0


def test_mixed_faults_spread_over_five_kinds():
    faults = Faults.mixed(0.3, seed=3, hang_s=0.0)
    with LocalJudgeServer(faults=faults) as srv, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: post(srv, OPENAI_PATH, {"messages": []}), range(200)))
        answered = srv.stats()["answered"]
    assert sum(answered.values()) == 200
    assert 40 <= 200 - answered["ok"] <= 80
    assert answered["slow"] == 0
    assert all(5 <= answered[kind] <= 25 for kind in ("429", "503", "hang", "truncated", "schema"))


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"p_429": 1.5}, "p_429"),
    ({"p_hang": -0.1}, "p_hang"),
    ({"p_schema": float("nan")}, "p_schema"),
    ({"p_503": 0.6, "p_truncated": 0.6}, "exceeds 1"),
    ({"script": ["malformed"]}, "script"),
])
def test_fault_rates_are_validated(kwargs, named):
    with pytest.raises(ValueError, match=named):
        Faults(**kwargs)


def test_mixed_rates_are_validated():
    assert Faults.mixed(0.5).p_hang == pytest.approx(0.1)
    with pytest.raises(ValueError, match="exceeds 1"):
        Faults.mixed(1.5)


def test_stats_count_the_tokens_the_answers_bill(judge_request):
    schema = rubric.response_json_schema()
    thinking = gemini_body(judge_request, schema)
    thinking["generationConfig"]["thinkingConfig"] = {"thinkingLevel": "MEDIUM"}
    with LocalJudgeServer(faults=Faults(script=["503"])) as srv:
        assert post(srv, GEMINI_PATH, thinking)[0] == 503  # no answer, no usage
        gemini = post(srv, GEMINI_PATH, thinking)[2]["usageMetadata"]
        openai = post(srv, OPENAI_PATH, openai_body(judge_request, schema))[2]["usage"]
        billed = srv.stats()["billed"]
    assert gemini["thoughtsTokenCount"] > 0 and openai["completion_tokens_details"]["reasoning_tokens"] == 0
    assert billed == {"input_tokens": gemini["promptTokenCount"] + openai["prompt_tokens"],
                      "output_tokens": gemini["candidatesTokenCount"] + openai["completion_tokens"],
                      "thought_tokens": gemini["thoughtsTokenCount"]}


def test_stats_endpoint_matches_stats(judge_request):
    with LocalJudgeServer(latency_s=(0.01, 0.02)) as srv:
        for _ in range(3):
            post(srv, GEMINI_PATH, gemini_body(judge_request))
        with urllib.request.urlopen(srv.base_url + "/stats", timeout=5) as resp:
            served = json.loads(resp.read())
        assert served == srv.stats()
        assert served["arrivals"] == 3 and len(srv.requests) == 3  # /stats is not an arrival
    assert set(served) >= {"arrivals", "accepted", "violations", "answered", "in_flight",
                           "max_in_flight", "accepted_last_window", "latency_p50_s",
                           "latency_p99_s"}


def test_a_long_stream_keeps_memory_flat():
    """A run's worth of requests: the server keeps counters and a bounded window of recent
    requests, so what it holds after 600 requests of 16 kB is what it holds after 1800."""
    import tracemalloc

    body = {"contents": [{"role": "user", "parts": [{"text": "a story " * 2000}]}]}  # 16 kB, no schema
    data = json.dumps(body).encode()

    def stream(conn, n):
        for _ in range(n):
            conn.request("POST", GEMINI_PATH, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())

    with LocalJudgeServer() as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)  # one keep-alive connection
        tracemalloc.start()
        try:
            stream(conn, 600)
            held_at_600 = tracemalloc.get_traced_memory()[0]
            stream(conn, 1200)
            held_at_1800 = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
            conn.close()
        stats = srv.stats()
    assert stats["arrivals"] == stats["accepted"] == stats["answered"]["ok"] == 1800  # counters count them all
    assert held_at_1800 - held_at_600 < 1_000_000, (held_at_600, held_at_1800)  # 1200 bodies are 19 MB


def test_control_refuses_every_request_with_a_status_until_told_otherwise(judge_request):
    """What a revoked key looks like: POST /control {"refuse_with": 401} and both APIs answer 401 in
    their own error shape, at once; {"refuse_with": null} serves again."""
    with LocalJudgeServer(latency_s=(0.5, 0.5)) as srv:
        assert post(srv, "/control", {"refuse_with": 401}) == (200, mock.ANY, {"refuse_with": 401})
        status, _, answer = post(srv, GEMINI_PATH, gemini_body(judge_request))
        assert status == 401 and answer["error"]["status"] == "UNAUTHENTICATED"
        status, _, answer = post(srv, OPENAI_PATH, openai_body(judge_request))
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert post(srv, "/control", {"refuse_with": "soon"})[0] == 400
        assert post(srv, "/control", {"refuse_with": None})[2] == {"refuse_with": None}
        assert post(srv, GEMINI_PATH, gemini_body(judge_request))[0] == 200
        stats = srv.stats()
    assert (stats["arrivals"], stats["refused"], stats["accepted"], stats["answered"]["ok"]) == (3, 2, 1, 1)
