"""Does the reward pool keep the judge saturated right up to the project's rate limit?

Starts the loopback judge with its own RPM limit (it answers 429 beyond it and counts every such
arrival as a violation) and latencies drawn uniformly from a range, then keeps the real reward
pool (limiter actor + async reward workers on a local Ray cluster, built by cluster/roles.py
from config) busy with a backlog of distinct stories for --duration seconds.

    .venv/bin/python bench/judge_throughput.py [--workers N] [--limit-rpm 600] [--latency 0.2 2.0]
                                               [--duration 150] [--words 600]

achieved = requests the server accepted in the final 60 s; p50/p99 = a story's judge latency
(first send to final answer; time queued behind the limit is not in it). Before the last line
it prints what decided the pool's shape: the lease round trip to the limiter actor and the
client CPU per judge request in one process.
Last line: judge_throughput: limit_rpm=<l> achieved_rpm=<a> ratio=<a/l> violations=<v> p50_s=<x> p99_s=<y>
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the keeper lamp ship fog harbour letter brother winter stair rope salt tide bell door chalk "
         "engine horn signal girl box twine stamp kettle night light wave rock hull bow deck gull").split()


def story(index: int, words: int) -> str:
    rng = random.Random(index)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
                 for _ in range(words // 11)]
    return f"Story {index}.\n\n" + "\n\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5))


def job(index: int, words: int):
    from reward.worker import ScoringJob

    return ScoringJob(f"bench/{index}", f"Write story number {index} about a lighthouse.", story(index, words),
                      words, words * 4 // 3, 0, False)


def lease_round_trip_ms(n: int = 200) -> float:
    """On a limiter actor of its own, so that the measured leases count against no one."""
    import ray

    from reward.limiter import LimiterService, RateLimits

    limiter = ray.remote(LimiterService).remote(RateLimits())
    ray.get(limiter.stats.remote())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        lease = ray.get(limiter.acquire.remote(0))
        times.append(time.perf_counter() - t0)
        limiter.release.remote(lease)
    return 1000 * statistics.median(times)


def client_cpu_ms_per_request(words: int, n: int = 40) -> tuple[float, float]:
    """CPU milliseconds one process spends per story: (judge call: request build, SDK, HTTP and
    parse; reward: the text features of score_response). The judge answering sits in another
    process so its CPU is not counted, and the measured server sees only the pool's requests."""
    import subprocess

    from cluster.netutil import free_port
    from reward.components import RewardParams
    from conf import load_config
    from reward.components import score_response
    from reward.judge_client import JudgeSettings, make_judge

    port = free_port("127.0.0.1")
    server = subprocess.Popen([sys.executable, "-m", "reward.judge_server", "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)

    async def go(base_url):
        judge = make_judge(JudgeSettings(backend="local", model="gemini-3-flash-preview", base_url=base_url))
        try:
            await judge.judge("warm up", story(-1, words))
            t0 = time.process_time()
            await asyncio.gather(*(judge.judge("Write a story.", story(-2 - i, words)) for i in range(n)))
            return (time.process_time() - t0) / n
        finally:
            await judge.aclose()
    try:
        server.stdout.readline()  # "stand-in judge at ..." once it listens
        judge_s = asyncio.run(go(f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(10)
    params = RewardParams.from_config(load_config(["conf=polaris", "judge.backend=local"]).reward)
    t0 = time.process_time()
    for i in range(5):
        score_response(0.5, story(i, words), words, words * 4 // 3, 0, False, params)
    return 1000 * judge_s, 1000 * (time.process_time() - t0) / 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=None, help="reward workers (default: the config default)")
    ap.add_argument("--limit-rpm", type=int, default=600)
    ap.add_argument("--latency", type=float, nargs=2, default=(0.2, 2.0), metavar=("LO", "HI"))
    ap.add_argument("--duration", type=float, default=150.0)
    ap.add_argument("--words", type=int, default=600)
    args = ap.parse_args()
    if args.duration < 60:
        ap.error("--duration must be >= 60 (achieved counts the final 60 s)")

    import ray

    from cluster.judge_pool import start_reward_pool
    from conf import load_config
    from reward.judge_server import LocalJudgeServer

    # the POLARIS run's pool (conf=polaris), judged by the loopback server
    overrides = ["conf=polaris", "judge.backend=local", "judge.cache=false", f"judge.rpm={args.limit_rpm}"]
    if args.workers is not None:
        overrides.append(f"judge.num_workers={args.workers}")
    cfg = load_config(overrides)
    with LocalJudgeServer(latency_s=tuple(args.latency), rpm_limit=args.limit_rpm) as server, \
            tempfile.TemporaryDirectory() as out:
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        (judge_ms, reward_ms), rtt_ms = client_cpu_ms_per_request(args.words), lease_round_trip_ms()
        limiter, workers, pool = start_reward_pool(cfg, server.base_url, "bench", out)  # handles keep them alive
        accepted_before = server.stats()["accepted"]

        backlog = 2 * args.limit_rpm // 60 * int(args.latency[1] + 1) + 50  # never lets the pool idle
        futures, latencies, submitted = set(), [], 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.duration:
            while len(futures) < backlog:
                futures.add(pool.submit(job(submitted, args.words)))
                submitted += 1
            done = {f for f in futures if f.done()}
            latencies += [f.result().latency_s for f in done if f.result().valid]
            futures -= done
            time.sleep(0.05)
        achieved = server.accepted_since(60.0)
        stats = server.stats()
        pool.close()
        ray.shutdown()

    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"setting: {cfg.judge.num_workers} reward workers, max_in_flight {cfg.judge.max_in_flight}, "
          f"latency uniform {args.latency[0]}-{args.latency[1]} s, {args.duration:g} s, {args.words}-word stories")
    print(f"server: accepted {stats['accepted'] - accepted_before}, answered {stats['answered']}, "
          f"max in flight {stats['max_in_flight']}; stories judged {len(latencies)}")
    print(f"shape: lease round trip {rtt_ms:.2f} ms per attempt; per story in one process {judge_ms:.2f} ms CPU "
          f"for the judge call + {reward_ms:.2f} ms for the reward (one process tops out near "
          f"{60_000 / (judge_ms + reward_ms):.0f} stories/min)")
    print(f"judge_throughput: limit_rpm={args.limit_rpm} achieved_rpm={achieved} ratio={achieved / args.limit_rpm:.3f} "
          f"violations={stats['violations']} p50_s={p50:.2f} p99_s={p99:.2f}")


if __name__ == "__main__":
    main()
