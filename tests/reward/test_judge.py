"""Judge (retries, deadline, limiter) over the Gemini API, end to end on 127.0.0.1 through google-genai."""

import asyncio
import contextlib
import json
import socket
import threading

import pytest

from conf.errors import EnvironmentSetupError, JudgeError
from reward import rubric
from reward.gemini_api import VERTEX_FLEX_HEADERS, GeminiJudgeAPI
from reward.judge_api import RawAnswer
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


class WireTap:
    """A TCP relay in front of a judge server that keeps the raw bytes the client sent, before the
    server (which drops key headers from what it records) sees them."""

    def __init__(self, port: int):
        self.sent: list[bytearray] = []  # one per connection
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, args=(port,), daemon=True).start()

    def _accept(self, port: int) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", port))
            self.sent.append(bytearray())
            threading.Thread(target=self._pipe, args=(client, upstream, self.sent[-1]), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, record) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def key_lines(self) -> list[str]:
        """Every line of the client's traffic that holds KEY. The key in a request line, a query
        string or a body shows up here as a line that is not the expected header."""
        raw = b"".join(self.sent).decode("latin-1")
        return [line for line in raw.split("\r\n") if KEY in line]

    def requests(self) -> int:
        return b"".join(self.sent).count(b" HTTP/1.1\r\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self._listener.close()


def overall_by_hand(scores: dict, *, evaluation: bool = False) -> float:
    """reward/rubric.py's rule written out: P - N + B' - Pen' with B' = 0 if N > P/2 else B,
    Pen' = min(Pen, 3) if P > 1.5 N else Pen, clipped to [-159, 108]; evaluation min(100, P - N + B)."""
    p = sum(scores[k] for k in ("plot", "character", "prose", "structure", "originality", "emotional_impact"))
    n = sum(scores[k] for k in ("cliche", "purple_prose", "incoherence", "repetition", "unresolved_threads",
                                "telling_not_showing", "flat_dialogue", "pacing", "meta_artifacts", "prompt_neglect"))
    if evaluation:
        return min(100, p - n + scores["bonus"])
    bonus = 0 if n > p / 2 else scores["bonus"]
    penalty = min(scores["penalty"], 3) if p > 1.5 * n else scores["penalty"]
    return max(-159, min(108, p - n + bonus - penalty))


class FixedAnswer:
    """A JudgeAPI that always answers the same scores."""

    name = "fixed"

    def __init__(self, scores: dict):
        self.text = json.dumps({k: {"evidence": "", "score": v} for k, v in scores.items()})

    async def send(self, req, *, timeout_s, standard_tier=False):
        return RawAnswer(self.text, 100, 50)

    async def aclose(self):
        pass


def test_better_story_scores_higher(server):
    good, rep, short = judge_all(server.base_url, [GOOD, REPETITIVE, SHORT])
    assert all(r.ok and r.error is None and r.attempts == 1 for r in (good, rep, short))
    assert good.overall > 30
    assert good.overall > rep.overall + 40 and good.overall > short.overall + 40
    assert rep.judgment.scores["repetition"] == 15
    assert short.judgment.scores["unresolved_threads"] > good.judgment.scores["unresolved_threads"]
    for r in (good, rep, short):
        assert r.overall == overall_by_hand(r.judgment.scores)


def test_overall_of_a_fixed_judgment():
    scores = dict.fromkeys(rubric.DIMENSIONS, 0)
    scores.update(plot=15, character=20, prose=10, originality=15, cliche=12, pacing=8, bonus=5, penalty=6)
    # P = 15 + 20 + 10 + 15 = 60, N = 12 + 8 = 20: N <= P/2 keeps the bonus 5, P > 1.5 N caps
    # the penalty 6 at 3; training 60 - 20 + 5 - 3 = 42, evaluation 60 - 20 + 5 = 45

    async def go(evaluation):
        judge = Judge(FixedAnswer(scores), evaluation=evaluation)
        return (await judge.judge(PROMPT, GOOD)).overall
    assert asyncio.run(go(False)) == 42 and asyncio.run(go(True)) == 45


def test_same_input_same_score(server):
    a, b = judge_all(server.base_url, [GOOD, GOOD])
    assert a.judgment.scores == b.judgment.scores and a.overall == b.overall


def test_usage_tokens_reported(server):
    before = server.stats()["billed"]
    (r,) = judge_all(server.base_url, [GOOD])
    # the request holds the rubric and the story: well over a quarter of the story in tokens
    assert r.input_tokens > len(GOOD) // 4
    body = server.requests[-1]["body"]
    assert body["generationConfig"]["thinkingConfig"]  # thoughts billed as output too:
    answer_tokens = len(json.dumps(r.judgment.scores)) // 4
    assert r.output_tokens > 2 * answer_tokens
    billed = {k: v - before[k] for k, v in server.stats()["billed"].items()}
    # the stand-in thinks twice what it writes and reports it apart (thoughtsTokenCount)
    assert r.thought_tokens == billed["thought_tokens"] == r.output_tokens - billed["output_tokens"] > 0


def test_request_config_and_key_hygiene(server):
    with WireTap(server.port) as tap:
        judge_all(tap.base_url, [SHORT])
    # what the client sent: the key in its header, once per request, nowhere else
    assert tap.requests() == 1 and tap.key_lines() == [f"x-goog-api-key: {KEY}"]
    req = server.requests[-1]
    cfg = req["body"]["generationConfig"]
    assert cfg["temperature"] == 0.2 and cfg["topP"] == 0.9
    assert cfg["responseJsonSchema"] == rubric.response_json_schema()
    thinking = {k.lower().replace("_", ""): v for k, v in cfg["thinkingConfig"].items()}
    assert thinking == {"thinkinglevel": "MEDIUM", "includethoughts": False}
    assert req["body"]["serviceTier"] == "flex"
    assert req["body"]["systemInstruction"]["parts"][0]["text"] == rubric.SYSTEM_INSTRUCTION
    assert req["path"].endswith("/models/gemini-3-flash-preview:generateContent")


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
    with LocalJudgeServer(faults=Faults(script=["hang"])) as srv:  # hang_s: an hour
        (r,) = judge_all(srv.base_url, [GOOD], timeout_s=0.5, backoff_s=0.001)
    answered = srv.stats()["answered"]
    assert r.ok and r.attempts == 2 and len(srv.requests) == 2
    assert answered["hang"] == 0 and answered["ok"] == 1  # the client gave up on the hang


def test_an_attempt_without_an_answer_is_priced_at_its_estimate():
    """A hang past the timeout: the service has the request and bills it when it answers, which
    the client never sees. Priced at our estimate of its input (4 characters a token, the
    limiter's estimate) plus 4096 output tokens (the default price of an answer that never came);
    the answered retry costs what the service billed."""
    with LocalJudgeServer(faults=Faults(script=["hang"])) as srv:
        (r,) = judge_all(srv.base_url, [GOOD], timeout_s=0.5, backoff_s=0.001)
        billed = srv.stats()["billed"]
    req = rubric.build_judge_request(PROMPT, GOOD)
    estimate = (len(req.system_instruction) + len(req.user_text)) // 4 + 1
    assert r.ok and r.attempts == 2
    assert r.input_tokens == estimate + billed["input_tokens"]
    assert r.output_tokens == 4096 + billed["output_tokens"] + billed["thought_tokens"]


def test_a_story_reports_its_billing_as_it_goes():
    """Before each send (the attempt in flight at its estimate) and after each attempt that is
    retried (what the service billed), so an attempt is counted even if the worker dies."""
    reports = []

    async def go(base_url):
        judge = make_judge(base_url, backoff_s=0.001)
        try:
            return await judge.judge(PROMPT, GOOD, report=reports.append)
        finally:
            await judge.aclose()
    with LocalJudgeServer(faults=Faults(script=["truncated"])) as srv:
        r = asyncio.run(go(srv.base_url))
        billed = srv.stats()["billed"]
    req = rubric.build_judge_request(PROMPT, GOOD)
    estimate = (len(req.system_instruction) + len(req.user_text)) // 4 + 1
    first = reports[1]  # the truncated answer, as billed
    assert first.input_tokens == billed["input_tokens"] // 2 and first.attempts == 1  # two equal requests
    assert [(b.input_tokens, b.output_tokens, b.attempts) for b in reports] == [
        (estimate, 4096, 1), (first.input_tokens, first.output_tokens, 1),
        (first.input_tokens + estimate, first.output_tokens + 4096, 2)]
    assert r.ok and (r.input_tokens, r.output_tokens) == (
        billed["input_tokens"], billed["output_tokens"] + billed["thought_tokens"])


def test_a_refused_story_carries_the_status():
    with LocalJudgeServer() as srv:
        srv.refuse_with(401)
        (r,) = judge_all(srv.base_url, [GOOD], backoff_s=0.001)
    assert not r.ok and r.attempts == 1 and r.rejected_status == 401 and "401" in r.error
    (ok,) = judge_all_fresh([GOOD])
    assert ok.rejected_status is None


def test_per_story_deadline_bounds_the_retries():
    delays = []
    with LocalJudgeServer(faults=Faults(p_429=1.0, retry_after_s=5)) as srv:
        (r,) = judge_all(srv.base_url, [GOOD], max_attempts=10, deadline_s=2.0, backoff_s=0.001,
                         sleep=recording_sleep(delays))
        assert delays == []  # a 5 s Retry-After cannot fit: give up at once, no wait
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

    sends, delays = [], []

    async def go():
        judge = make_judge(f"http://127.0.0.1:{port}", sleep=recording_sleep(delays))
        send = judge.api.send

        async def counted(*args, **kwargs):
            sends.append(1)
            return await send(*args, **kwargs)
        judge.api.send = counted
        try:
            await judge.preflight(timeout_s=30)
        finally:
            await judge.aclose()
    with pytest.raises(JudgeError, match="cannot reach") as err:  # not "did not answer within 30s"
        asyncio.run(go())
    assert sends == [1] and delays == []  # one attempt, no retry
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
    with LocalJudgeServer(faults=Faults(script=["429", "schema"], retry_after_s=0)) as srv, \
            WireTap(srv.port) as tap:
        settings = JudgeSettings(backend="openai", model="gpt-5.4", base_url=tap.base_url + "/v1",
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
    assert tap.requests() == 3 and tap.key_lines() == [f"Authorization: Bearer {KEY}"] * 3
    assert r.ok and r.attempts == 3 and r.input_tokens > 0
    assert r.overall == overall_by_hand(r.judgment.scores, evaluation=True)
    assert body["model"] == "gpt-5.4" and body["seed"] == 42 and body["temperature"] == 0.2
    assert body["response_format"]["json_schema"]["schema"] == rubric.response_json_schema()


def test_the_gemini_request_carries_judge_seed_only_when_set(server):
    async def send(seed):
        api = GeminiJudgeAPI(KEY, base_url=server.base_url, seed=seed)
        try:
            await api.send(rubric.build_judge_request(PROMPT, SHORT), timeout_s=10)
        finally:
            await api.aclose()
        return server.requests[-1]["body"]["generationConfig"]
    assert asyncio.run(send(42))["seed"] == 42
    assert "seed" not in asyncio.run(send(None))


class RecordingLimiter:
    """A Limiter that grants at once and records what each attempt asks and reports."""

    def __init__(self):
        self.asked, self.released = [], []

    async def acquire(self, tokens=0, priority=(), retry=False):
        self.asked.append((priority, retry))
        return len(self.asked)

    def release(self, lease_id, actual_tokens=None, latency_s=None, shed=False):
        self.released.append((latency_s is not None, shed))


def test_each_attempt_tells_the_limiter_its_priority_and_what_the_service_did():
    """429 and 503 count as shed, a bad answer as answered (with a latency), the final answer too;
    the story's priority comes first, then the attempts made (nearest its deadline first)."""
    limiter = RecordingLimiter()

    async def go(base_url):
        judge = Judge(GeminiJudgeAPI(KEY, base_url=base_url), retry=RetryPolicy(backoff_s=0.0), limiter=limiter,
                      sleep=recording_sleep([]), seed=0)
        try:
            return await judge.judge(PROMPT, GOOD, priority=(False, 3, -2))
        finally:
            await judge.aclose()
    with LocalJudgeServer(faults=Faults(script=["429", "503", "schema"], retry_after_s=0)) as srv:
        result = asyncio.run(go(srv.base_url))
    assert result.ok and result.attempts == 4
    assert limiter.asked == [((False, 3, -2, 0), False), ((False, 3, -2, -1), True), ((False, 3, -2, -2), True),
                             ((False, 3, -2, -3), True)]
    assert limiter.released == [(False, True), (False, True), (True, False), (True, False)]
