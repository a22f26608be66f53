"""The judge's own figures, measured: what one judgment of a full-length story takes in, writes,
thinks and costs, and how long it takes, on the configured judge (model, thinking level, tier).
The run planner takes them in place of its judge defaults (`python -m cluster.plan ... --judge-check LOG`).

    GEMINI_API_KEY=... .venv/bin/python bench/judge_check.py conf=polaris [key=value ...] [--stories 24]
    .venv/bin/python bench/judge_check.py     # conf=tiny: the loopback judge, a dry run (CI runs it)

The stories judged are the human reference stories of the config's training data
(data.train_path, rows spread evenly over the file): a run judges one in every group, and they are
as long as the stories the policy is asked to write. The request is the run's own (rubric,
schema, sampling, thinking level, tier, retries, rate limits). Before any paid call it checks the
judge with one tiny standard-tier request and prints the spend it expects (every answer at
judge.unanswered_output_tokens); past --max-usd it stops there. Each judgment prints a line; the
figures are `judge_check: <name>=<value>` lines (token means over the stories answered at
their first attempt), and the last line is

    judge_check: backend=.. model=.. thinking=.. tier=.. calls=.. failed=.. thought_tokens=.. usd_per_call=..
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conf.errors import ConfigError, PolarisError  # noqa: E402


def pick_stories(records: list, count: int) -> list:
    """`count` rows spread evenly over the file (its order mixes lengths; the first rows may not)."""
    if count >= len(records):
        return list(records)
    return [records[i * len(records) // count] for i in range(count)]


def billed_usd(judge, input_tokens: int, output_tokens: int) -> float:
    from reward.spend import Prices, dollars

    return dollars(input_tokens, output_tokens, Prices.of(judge.price), flex=judge.service_tier == "flex")


def expected_usd(requests: list, judge) -> float:
    """The spend if every judgment writes judge.unanswered_output_tokens (the run's price for an
    answer never seen) and is answered first time."""
    from reward.judge_client import estimate_input_tokens

    return sum(billed_usd(judge, estimate_input_tokens(r), judge.unanswered_output_tokens) for r in requests)


async def judge_all(j, settings, texts: list[tuple[str, str, str]]) -> list:
    """Every (uid, prompt, story) at once, under the config's rate limits, printing each as it ends."""
    from reward.judge_client import make_judge
    from reward.limiter import RateLimiter, RateLimits

    limits = RateLimits(rpm=j.rpm, burst=j.rpm_burst, input_tpm=j.input_tpm,
                        max_in_flight=max(1, min(j.max_in_flight, len(texts))))
    client = make_judge(settings, RateLimiter(limits))
    started = time.monotonic()

    async def one(uid: str, prompt: str, story: str):
        result = await client.judge(prompt, story)
        visible = result.output_tokens - result.thought_tokens
        state = "ok" if result.ok else f"FAILED ({result.error})"
        print(f"judge_check: story {uid} words={len(story.split())} input_tokens={result.input_tokens} "
              f"output_tokens={result.output_tokens} (thoughts {result.thought_tokens}, visible {visible}) "
              f"latency_s={result.latency_s:.1f} attempts={result.attempts} at {time.monotonic() - started:.0f}s "
              f"{state}", flush=True)
        return result

    try:
        return await asyncio.gather(*(one(*t) for t in texts))
    finally:
        await client.aclose()


def figures(results: list, words: list[int], judge) -> dict[str, float]:
    """Token figures over the stories answered at their first attempt (a retried story's tokens sum
    its attempts, an unanswered one at its estimate); latency over every story answered; cost per
    judgment over all, retries and failures included."""
    first_time = [(r, w) for r, w in zip(results, words) if r.ok and r.attempts == 1]
    answered = [r for r in results if r.ok]
    if not first_time:
        return {}
    mean = statistics.fmean
    latencies = sorted(r.latency_s for r in answered)
    return {
        "story_words": mean(w for _, w in first_time),
        "input_tokens": mean(r.input_tokens for r, _ in first_time),
        "thought_tokens": mean(r.thought_tokens for r, _ in first_time),
        "visible_tokens": mean(r.output_tokens - r.thought_tokens for r, _ in first_time),
        "answered_first_time": len(first_time),
        "attempts": mean(r.attempts for r in results),
        "latency_min_s": latencies[0],
        "latency_p50_s": latencies[len(latencies) // 2],
        "latency_max_s": latencies[-1],
        "usd_per_call": sum(billed_usd(judge, r.input_tokens, r.output_tokens) for r in results) / len(results),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/judge_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="conf=NAME and key.sub=value, as launch.py takes them")
    ap.add_argument("--stories", type=int, default=24, help="stories to judge (default 24)")
    ap.add_argument("--max-usd", type=float, default=1.0, help="stop before judging if more is expected (default 1)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except PolarisError as exc:
        print(f"judge_check: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    from actors.data import load_prompts
    from cluster.judge_pool import judge_settings
    from conf.loader import load_config
    from reward.components import strip_length_sentence
    from reward.judge_client import preflight
    from reward.judge_server import judge_endpoint
    from reward.rubric import build_judge_request

    if args.stories < 1:
        raise ConfigError(f"--stories must be >= 1 (got {args.stories})")
    cfg = load_config(args.overrides)
    j = cfg.judge
    rows = pick_stories(load_prompts(cfg.data.train_path, require_reference=True), args.stories)
    texts = [(r.uid, strip_length_sentence(r.prompt_text), r.story) for r in rows]
    usd = expected_usd([build_judge_request(p, s) for _, p, s in texts], j)
    tier = j.service_tier
    print(f"judge_check: {len(texts)} reference stories of {cfg.data.train_path} to {j.backend} {j.model} "
          f"(thinking {j.thinking_level}, {tier} tier); expected spend ~${usd:.3f} (at {j.unanswered_output_tokens} "
          "tokens out a judgment, judge.unanswered_output_tokens)", flush=True)
    if usd > args.max_usd:
        raise ConfigError(f"the check would spend ~${usd:.2f}, over --max-usd {args.max_usd:g} "
                          "(fewer --stories, or raise --max-usd)")
    with judge_endpoint(j) as (url, _server):
        settings = judge_settings(j, url)
        preflight(settings)  # a bad key, model or endpoint fails here, in seconds and for nothing
        results = asyncio.run(judge_all(j, settings, texts))
    found = figures(results, [len(s.split()) for _, _, s in texts], j)
    for name, value in found.items():
        print(f"judge_check: {name}={value:.6g}")
    failed = sum(not r.ok for r in results)
    print(f"judge_check: backend={j.backend} model={j.model} thinking={j.thinking_level} tier={tier} "
          f"calls={len(results)} failed={failed} thought_tokens={found.get('thought_tokens', float('nan')):.0f} "
          f"usd_per_call={found.get('usd_per_call', float('nan')):.5f}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
