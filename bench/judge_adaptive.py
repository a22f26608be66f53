"""Does the reward pool get the most out of a judge service that sheds load?

The loopback judge models a flex tier short of capacity (reward/stand_in_capacity.py): capacity
48 for 30 s, 6 for 30 s, 24 for 30 s, twice; requests in service share it (each answer takes
uniform(0.8, 1.2) s x max(1, in service / capacity)); an arrival with 1.5 x capacity in service
is shed at once with 429 or 503. The real reward pool (limiter actor, async reward workers on a
local Ray cluster, built from conf=polaris by cluster/judge_pool.py) is offered steps of 48
stories (8 groups of 6) and 12 validation stories every fourth step, a new step whenever fewer
than three steps' worth of stories are unjudged: more than the service can take at every moment. Four modes, one line each:

  adaptive    the adaptive window (judge.adaptive_in_flight), under max_in_flight 128
  fixed_peak  a fixed 48 in flight, the schedule's peak
  fixed_low   a fixed 6 in flight, its minimum
  constant    the adaptive pool against an unshed server with a 600 RPM limit (goodput against the limit)

    .venv/bin/python bench/judge_adaptive.py [--modes adaptive fixed_peak fixed_low constant] [--order deadline|fifo]

goodput_ratio = stories judged in the schedule's 180 s / (capacity-seconds / 1.0 s mean base
latency); wasted = shed attempts / all attempts; p99_story_s: a story's first send to its final
answer; step_tail_s: the mean over steps of the wait from the step's 90th-percentile story to its
last (what a training step waits for its stragglers); violations: arrivals over the RPM limit,
plus 1 if more were ever in service than max_in_flight.
Lines: judge_adaptive: mode=<m> goodput_ratio=.. wasted=.. p99_story_s=.. step_tail_s=.. violations=..
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.judge_throughput import job  # noqa: E402 -- after the path insert

LEVELS, STEP_S, ROUNDS = (48, 6, 24), 30.0, 2
GROUPS, GROUP_SIZE, VALIDATION, AHEAD = 8, 6, 12, 3
WORDS = 150
MODES = {  # judge.* overrides, server kind
    "adaptive": (["judge.adaptive_in_flight=true", "judge.max_in_flight=128"], "shedding"),
    "fixed_peak": (["judge.adaptive_in_flight=false", "judge.max_in_flight=48"], "shedding"),
    "fixed_low": (["judge.adaptive_in_flight=false", "judge.max_in_flight=6"], "shedding"),
    "constant": (["judge.adaptive_in_flight=true", "judge.rpm=600"], "constant"),
}


class Offered:
    """Steps of stories offered to the pool, a new one whenever fewer than AHEAD steps' worth of
    stories are unjudged (stories waiting out a backoff do not hold new ones back); when each
    story was judged."""

    def __init__(self, pool):
        self.pool, self.next_step, self.index = pool, 0, 0
        self.outstanding: dict[int, set] = {}
        self.done_at: dict[int, list[float]] = defaultdict(list)
        self.latencies: list[tuple[float, float]] = []  # (answered at, first send to answer)

    def top_up(self) -> None:
        while sum(map(len, self.outstanding.values())) < AHEAD * GROUPS * GROUP_SIZE:
            step, futures = self.next_step, set()
            for g in range(GROUPS):
                for i in range(GROUP_SIZE):
                    futures.add(self._submit(f"s{step}g{g}/{i}", step=step))
            if step % 4 == 3:
                for i in range(VALIDATION):
                    self._submit(f"val{step}/{i}", step=None, per_step=False)
            self.outstanding[step] = futures
            self.next_step += 1

    def _submit(self, key: str, **where):
        scoring = dataclasses.replace(job(self.index, WORDS), key=key)
        self.index += 1
        future = self.pool.submit(scoring, **where)
        future.add_done_callback(lambda f: self.latencies.append((time.monotonic(), f.result().latency_s))
                                 if not f.exception() and f.result().valid else None)
        return future

    def collect(self) -> None:
        now = time.monotonic()
        for step, futures in list(self.outstanding.items()):
            finished = {f for f in futures if f.done()}
            self.done_at[step] += [now] * len(finished)
            futures -= finished
            if not futures:
                del self.outstanding[step]

    def step_tail_s(self, until: float) -> float:
        tails = []
        for times in self.done_at.values():
            if len(times) == GROUPS * GROUP_SIZE and max(times) <= until:
                times = sorted(times)
                tails.append(times[-1] - times[int(0.9 * len(times)) - 1])
        return sum(tails) / len(tails) if tails else float("nan")


def run_mode(mode: str, order: str, duration_s: float) -> str:
    import ray

    from cluster.judge_pool import start_reward_pool
    from cluster.netutil import free_port
    from conf import load_config
    from reward.judge_server import LocalJudgeServer
    from reward.stand_in_capacity import CapacitySchedule

    overrides, server_kind = MODES[mode]
    cfg = load_config(["conf=polaris", "judge.backend=local", "judge.cache=false", "judge.input_tpm=0",
                       "judge.rpm=100000", f"judge.order={order}", *overrides])
    port = free_port("127.0.0.1")
    if server_kind == "shedding":
        server = LocalJudgeServer(port, latency_s=(0.8, 1.2), capacity=CapacitySchedule(LEVELS, STEP_S))
    else:
        server = LocalJudgeServer(port, latency_s=(0.8, 1.2), rpm_limit=600)
    with tempfile.TemporaryDirectory() as out:
        limiter, workers, pool = start_reward_pool(cfg, f"http://127.0.0.1:{port}", f"bench-{mode}", out)
        ray.get([w.__ray_ready__.remote() for w in workers])
        server.start()
        offered, t0 = Offered(pool), time.monotonic()
        try:
            while time.monotonic() - t0 < duration_s:
                offered.top_up()
                offered.collect()
                time.sleep(0.05)
            end, stats = time.monotonic(), server.stats()
            accepted_last_minute = server.accepted_since(60.0)
        finally:
            pool.close()
            for actor in [limiter, *workers]:
                ray.kill(actor)
            server.stop()
    latencies = sorted(lat for at, lat in offered.latencies if at <= end)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    violations = stats["violations"] + (stats["max_in_flight"] > cfg.judge.max_in_flight)
    if server_kind == "shedding":
        capacity = stats["capacity"]
        shed = capacity["shed_429"] + capacity["shed_503"]
        goodput = capacity["served"] / (CapacitySchedule(LEVELS, STEP_S).integral(0, capacity["since_start_s"]) / 1.0)
        wasted = shed / stats["arrivals"]
    else:
        goodput, wasted = accepted_last_minute / 600, 0.0
    name = mode if order == "deadline" else f"{mode}_{order}"
    return (f"judge_adaptive: mode={name} goodput_ratio={goodput:.3f} wasted={wasted:.3f} p99_story_s={p99:.2f} "
            f"step_tail_s={offered.step_tail_s(end):.2f} violations={violations}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--order", choices=("deadline", "fifo"), default="deadline")
    ap.add_argument("--constant-s", type=float, default=90.0, help="the constant mode's length (>= 60)")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        for mode in args.modes:
            duration = args.constant_s if MODES[mode][1] == "constant" else ROUNDS * len(LEVELS) * STEP_S
            print(run_mode(mode, args.order, duration), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
