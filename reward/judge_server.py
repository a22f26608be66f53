"""A loopback test double of the judge services: Gemini generateContent and OpenAI chat
completions on 127.0.0.1, with the real services' failure modes.

Routes: POST .../models/{model}:generateContent (Developer API /v1beta/ and /v1/, Vertex
/v1beta1/ and /v1/ with or without projects/{p}/locations/{l}/publishers/google/); POST
/v1/chat/completions and /chat/completions (OpenAI-compatible, json_schema response_format);
GET /stats (the stats() dict; neither counted nor rate limited); POST /control
{"refuse_with": 401} (every request refused with that status, as a service refuses a revoked
key; null: serve again). Answers carry deterministic rubric scores from text features
(reward/stand_in_scores.py) that fit the request's schema, in each API's envelope
(reward/stand_in_wire.py); no schema -> the text "OK". Any API key is accepted and none is
recorded (`requests` keeps path, body and the other headers of the latest keep_requests
arrivals). stats() counts the tokens its answers bill (thought tokens apart; a service bills
them as output). Memory stays flat over a run of any length: counters, the last keep_requests
requests, the last LATENCY_WINDOW handling times and the accepted arrivals of the last history_s.

What a request goes through, on either API:
- refuse_with set: answered at once with that status (no latency, not in the RPM window).
- rpm_limit > 0: at most rpm_limit accepted arrivals in any trailing window_s seconds; an
  arrival beyond that is rejected at once with 429 and Retry-After (whole seconds until the
  oldest accepted arrival leaves the window) and counted as a violation.
- an accepted request then draws its outcome (Faults: `script` first, then seeded rates):
  ok, 429 (with Retry-After: retry_after_s), 503, slow (+slow_s), hang (+hang_s, past the
  client's timeout), truncated (JSON cut in half), schema (valid JSON the rubric rejects).
- every accepted request sleeps uniform(latency_s) before answering, faults included.
- capacity (a CapacitySchedule; reward/stand_in_capacity.py): a service short of capacity.
  An arrival with too many in service is shed at once (429 with Retry-After: 1, or 503). Otherwise
  its uniform(latency_s) is service time, shared with the others in service.

    with LocalJudgeServer(rpm_limit=60, latency_s=(0.5, 2.0), faults=Faults.mixed(0.1)) as srv:
        genai.Client(http_options={"base_url": srv.base_url})  # or base_url + "/v1" for OpenAI

`python -m reward.judge_server --port 8000 --rpm 60 --latency 0.5 2 --fault-rate 0.1` serves
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable

from aiohttp import web

from reward import rubric
from reward.stand_in_capacity import CapacitySchedule, SharedCapacity
from reward.stand_in_faults import OUTCOMES, Faults
from reward.stand_in_scores import break_schema, judge_json
from reward.stand_in_wire import Call, Gemini, OpenAI, Wire

API_KEY_HEADERS = ("x-goog-api-key", "authorization", "api-key")
_VERSION = "/{version:v1|v1beta|v1beta1}"
LATENCY_WINDOW = 10_000  # handling times kept for the latency quantiles
_GEMINI_PREFIXES = (_VERSION, _VERSION + "/publishers/google",
                    _VERSION + "/projects/{project}/locations/{location}/publishers/google")


class LocalJudgeServer:
    """Serves on 127.0.0.1 from its own thread; `requests` records every arrival, rejected ones
    included. Gemini clients take base_url, OpenAI clients base_url + "/v1"."""

    def __init__(self, port: int = 0, faults: Faults | None = None, *,
                 latency_s: tuple[float, float] = (0.0, 0.0), rpm_limit: int = 0,
                 window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, keep_requests: int = 256,
                 history_s: float = 600.0, capacity: CapacitySchedule | None = None, shed_factor: float = 1.5):
        """clock: the RPM window's and the handling times' time; sleep: every latency, slow and
        hang delay goes through it (tests pass fakes). keep_requests: the latest arrivals kept in
        `requests`; history_s: how far back accepted_since() can look (at least window_s)."""
        lo, hi = latency_s
        if not 0.0 <= lo <= hi:
            raise ValueError(f"latency_s must be (lo, hi) with 0 <= lo <= hi, got {latency_s}")
        if rpm_limit < 0 or window_s <= 0:
            raise ValueError(f"need rpm_limit >= 0 and window_s > 0, got {rpm_limit}, {window_s}")
        self.port = port
        self.faults = faults or Faults()
        self.latency_s = (float(lo), float(hi))
        self.rpm_limit, self.window_s = rpm_limit, window_s
        self._clock, self._sleep = clock, sleep
        self.capacity_schedule, self.shed_factor = capacity, shed_factor
        self.capacity: SharedCapacity | None = None  # made on the server's loop, when it starts
        self._recent: deque[dict] = deque(maxlen=keep_requests)  # {"path", "body", "headers"} without key headers
        self.history_s = max(history_s, window_s)
        self._refuse_with: int | None = None
        self.in_flight = self.max_in_flight = 0
        self._fault_rng = random.Random(self.faults.seed)
        self._latency_rng = random.Random(f"latency:{self.faults.seed}")
        self._script = list(self.faults.script)
        self._schema_faults = 0
        # Handlers run on the server's loop thread; stats() may be called from any thread.
        self._lock = threading.Lock()
        self._accepted_at: list[float] = []  # clock() of accepted arrivals within history_s, ascending
        self._arrivals = self._accepted = self._violations = self._dropped = self._refused = 0
        self._answered = dict.fromkeys(OUTCOMES, 0)
        self._handling_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._billed = {"input_tokens": 0, "output_tokens": 0, "thought_tokens": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- statistics and control -------------------------------------------------------------

    @property
    def requests(self) -> list[dict]:
        """The latest keep_requests arrivals, oldest first (a copy)."""
        with self._lock:
            return list(self._recent)

    def refuse_with(self, status: int | None) -> None:
        """Refuse every request with this HTTP status from now on (401: a revoked key); None serves again."""
        if status is not None and not (isinstance(status, int) and 400 <= status <= 599):
            raise ValueError(f"refuse_with needs an HTTP error status (400-599) or None, got {status!r}")
        self._refuse_with = status

    def accepted_since(self, seconds_ago: float) -> int:
        """Accepted arrivals in the last seconds_ago seconds (at most history_s)."""
        if seconds_ago > self.history_s:
            raise ValueError(f"accepted_since({seconds_ago}): only the last history_s={self.history_s:g} s are kept")
        with self._lock:
            return self._accepted_after(self._clock() - seconds_ago)

    def _accepted_after(self, t: float) -> int:
        return len(self._accepted_at) - bisect.bisect_right(self._accepted_at, t)

    def stats(self) -> dict:
        with self._lock:
            handling = sorted(self._handling_s)
            return {
                "arrivals": self._arrivals,
                "accepted": self._accepted,
                "violations": self._violations,  # arrivals rejected by the RPM window
                "answered": dict(self._answered),
                "dropped": self._dropped,  # client went away before the answer
                "refused": self._refused,  # answered with refuse_with
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "accepted_last_window": self._accepted_after(self._clock() - self.window_s),
                "rpm_limit": self.rpm_limit,
                "window_s": self.window_s,
                "latency_p50_s": _quantile(handling, 0.50),
                "latency_p99_s": _quantile(handling, 0.99),
                "billed": dict(self._billed),  # usage of every answer sent, faulty JSON included
                "capacity": self.capacity.stats() if self.capacity is not None else None,
            }

    def summary(self) -> str:
        """One line for the end of a run."""
        stats = self.stats()
        capacity = stats["capacity"]
        shed = f", {capacity['shed_429'] + capacity['shed_503']} shed for want of capacity" if capacity else ""
        return f"loopback judge: {stats['accepted']} requests accepted, {stats['violations']} rate-limit violations{shed}"

    # -- request handling -------------------------------------------------------------------

    async def _gemini(self, request: web.Request) -> web.Response:
        return await self._handle(request, Gemini)

    async def _openai(self, request: web.Request) -> web.Response:
        return await self._handle(request, OpenAI)

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _control(self, request: web.Request) -> web.Response:
        try:
            self.refuse_with((await request.json())["refuse_with"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            return web.json_response({"error": f'POST /control takes {{"refuse_with": STATUS or null}}: {e}'},
                                     status=400)
        return web.json_response({"refuse_with": self._refuse_with})

    async def _handle(self, request: web.Request, wire: Wire) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return _error(wire, 400, "request body is not a JSON object")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in API_KEY_HEADERS}
        refuse = self._refuse_with
        with self._lock:
            self._recent.append({"path": request.path, "body": body, "headers": headers})
            if refuse is not None:
                self._arrivals += 1
                self._refused += 1
        if refuse is not None:
            return _error(wire, refuse, f"stand-in judge: refused (HTTP {refuse})")
        wait_s = self._admit()
        if wait_s is not None:
            return _error(wire, 429, "stand-in judge: requests per minute exceeded",
                          retry_after=max(1, math.ceil(wait_s)))
        shed = self.capacity.shed() if self.capacity is not None else None
        if shed is not None:
            return _error(wire, shed, "stand-in judge: over capacity", retry_after=1 if shed == 429 else None)
        outcome = self._script.pop(0) if self._script else self._draw()
        start = self._clock()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        answered = False
        try:
            response = await self._answer(body, request, wire, outcome)
            answered = True
            return response
        finally:
            with self._lock:
                self.in_flight -= 1
                if answered:
                    self._answered[outcome] += 1
                    self._handling_s.append(self._clock() - start)
                else:
                    self._dropped += 1

    def _admit(self) -> float | None:
        """Count an arrival: None if accepted, else seconds until the window frees a slot."""
        with self._lock:
            now = self._clock()
            self._arrivals += 1
            del self._accepted_at[:bisect.bisect_right(self._accepted_at, now - self.history_s)]
            if self.rpm_limit > 0:
                first = bisect.bisect_right(self._accepted_at, now - self.window_s)
                if len(self._accepted_at) - first >= self.rpm_limit:
                    self._violations += 1
                    return self._accepted_at[first] + self.window_s - now
            self._accepted_at.append(now)
            self._accepted += 1
            return None

    def _draw(self) -> str:
        u = self._fault_rng.random()
        for outcome, p in self.faults.rates().items():
            if u < p:
                return outcome
            u -= p
        return "ok"

    async def _answer(self, body: dict, request: web.Request, wire: Wire,
                      outcome: str) -> web.Response:
        delay = self._latency_rng.uniform(*self.latency_s)
        if self.capacity is not None:
            await self.capacity.serve(delay)
            delay = 0.0
        delay += {"slow": self.faults.slow_s, "hang": self.faults.hang_s}.get(outcome, 0.0)
        if delay > 0:
            await self._sleep(delay)
        if outcome == "429":
            return _error(wire, 429, "stand-in judge: rate limited",
                          retry_after=self.faults.retry_after_s)
        if outcome == "503":
            return _error(wire, 503, "stand-in judge: overloaded")
        call = wire.call(body, request)
        text = self._text(call, outcome)
        in_tokens, out_tokens = len(call.all_text) // 4 + 1, len(text) // 4 + 1
        thought_tokens = 2 * out_tokens if call.thinking else 0
        with self._lock:
            self._billed["input_tokens"] += in_tokens
            self._billed["output_tokens"] += out_tokens
            self._billed["thought_tokens"] += thought_tokens
        return web.json_response(wire.answer(call, text, in_tokens, out_tokens, thought_tokens))

    def _text(self, call: Call, outcome: str) -> str:
        found = rubric.extract_delimited(call.user)
        prompt, story = found if found is not None else ("", call.user)
        judgment = judge_json(call.schema, prompt, story) if call.schema else None
        if outcome == "schema":
            judgment = break_schema(judgment or {}, self._schema_faults)
            self._schema_faults += 1
        text = "OK" if judgment is None else json.dumps(judgment)
        return text[: len(text) // 2] if outcome == "truncated" else text

    # -- lifecycle --------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        for prefix in _GEMINI_PREFIXES:
            app.router.add_post(prefix + "/models/{model}:generateContent", self._gemini)
        for path in ("/v1/chat/completions", "/chat/completions"):
            app.router.add_post(path, self._openai)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/control", self._control)
        return app

    @classmethod
    def from_config(cls, judge) -> LocalJudgeServer:
        """From conf.schema.JudgeConfig: its `local` section; hangs outlast the client's timeout."""
        local = judge.local
        faults = Faults.mixed(local.fault_rate, seed=local.seed, hang_s=judge.timeout_s + 30)
        capacity = CapacitySchedule(tuple(local.capacity), local.capacity_step_s) if local.capacity else None
        return cls(faults=faults, latency_s=(local.latency_min_s, local.latency_max_s), rpm_limit=local.rpm_limit,
                   capacity=capacity, shed_factor=local.shed_factor)

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
        # handler_cancellation: a request whose client gave up (timed out) stops being in flight
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.25,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.capacity_schedule is not None:
            self.capacity = SharedCapacity(self.capacity_schedule, self.shed_factor, self._clock)
        self.port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            # in-flight (even hung) requests get 2 x shutdown_timeout to finish, then are cancelled
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = self._thread = None

    def __enter__(self) -> LocalJudgeServer:  # noqa: PYI034 -- typing.Self is 3.11+, we support 3.10
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _error(wire: Wire, code: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(wire.error(code, message), status=code, headers=headers)


def _quantile(ascending: list[float], q: float) -> float | None:
    """Nearest-rank quantile; None without data."""
    if not ascending:
        return None
    return ascending[min(len(ascending) - 1, max(0, math.ceil(q * len(ascending)) - 1))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve the stand-in judge on 127.0.0.1 until Ctrl-C.")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--rpm", type=int, default=0, help="accepted requests per window (0: no limit)")
    p.add_argument("--window", type=float, default=60.0, help="RPM window in seconds")
    p.add_argument("--latency", type=float, nargs=2, default=(0.0, 0.0), metavar=("LO", "HI"))
    p.add_argument("--fault-rate", type=float, default=0.0, help="see Faults.mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity", type=int, nargs="+", default=None, metavar="C",
                   help="capacity levels, each held --capacity-step seconds, repeated")
    p.add_argument("--capacity-step", type=float, default=30.0)
    p.add_argument("--shed-factor", type=float, default=1.5)
    a = p.parse_args(argv)
    capacity = CapacitySchedule(tuple(a.capacity), a.capacity_step) if a.capacity else None
    srv = LocalJudgeServer(a.port, Faults.mixed(a.fault_rate, seed=a.seed), latency_s=tuple(a.latency),
                           rpm_limit=a.rpm, window_s=a.window, capacity=capacity, shed_factor=a.shed_factor)
    print(f"stand-in judge at {srv.start()} (stats: GET /stats); Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        print(json.dumps(srv.stats()))


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def judge_endpoint(judge):
    """(base URL, server) for a conf.schema.JudgeConfig: backend=local starts the loopback server
    here and stops it on exit; other backends use judge.base_url ("" = the service's default)."""
    if judge.backend != "local":
        yield judge.base_url, None
        return
    server = LocalJudgeServer.from_config(judge)
    url = server.start()
    try:
        yield url, server
    finally:
        server.stop()
