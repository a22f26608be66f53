"""How much of the judge does the pipelined step hide? Trains conf=tiny serial and pipelined in one
invocation, with the loopback judge's latency set so that the judge phase of a serial step is about half of
its generation phase (all of a step's stories in flight at once: judge.max_in_flight=64):

  serial     rollout.max_staleness=0: generate, then judge, then train, then sync
  pipelined  rollout.max_staleness=1: stories go to the judge as their engine returns them; step
             k+1 generates while step k is judged, and is judged while step k trains (on CPU the
             cores are shared, so step k trains after step k+1's generation, not during it)

Both runs train with learner.lr=0 (the optimizer still steps and the weights are still sent), so
both generate the same stories, step by step: with learning on, the two policies part after
step 0, and one story that runs to max_new_tokens makes its step's batched generation ~1.4x
longer, which swamps the judge being measured (seen here: pipelined steps 1, 3, 4, 5 ran to
the limit and the serial run's did not). `--learn` measures with learning on.

Both use rollout.stream_chunk=0 (one engine call per step): on the transformers engine on CPU a
chunked call costs more generation time than it hides (measured here with max_staleness=1:
pipelined step 7.44 s in calls of 24 against a serial 7.25 s; generation 3.97 s in one serial
call, 5.64 s in calls of 24 and 7.3 s in calls of 12, the latter two with the judge working
alongside); add rollout.stream_chunk=N to measure that trade-off.

    .venv/bin/python bench/pipeline.py [--steps 9] [--repeats 2] [--judge-latency 1.6 2.5] [--learn] [key=value ...]

The two runs alternate serial, pipelined, pipelined, serial (`--repeats 2`, the default): the
same work's generation time drifts by 10-15% between runs minutes apart on this shared machine
(seen: a serial run's 5.46 s against the next pipelined run's 4.81 s for the same stories),
which a single pair turns into a hidden share above 1; the ABBA order cancels a linear drift.
Seconds per step are medians, over every repeat, of the steps after the first (start-up) and
before the last (the pipeline drains there). j is the serial run's judge phase. On 2 CPU cores
generation and training compete for the same cores, so the judge is what can be hidden here; what
keeps the share below 1 is the judge side's own CPU (reward workers, limiter, pool and loopback
server), which the pipeline moves from the idle judge phase into generation and training:
measured here, pipelined generation 4.92 s against serial 4.59 s and training 1.55 s against
1.47 s for the same work (it was ~0.6 s per step of 48 stories before the limiter's calls were
batched and the judge request config built once: hidden 0.69 then, 0.84 now).
Last line: pipeline: serial_s=<a> pipelined_s=<b> judge_s=<j> hidden=<(a-b)/j>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODES = {
    "serial": ["rollout.stream_chunk=0", "rollout.max_staleness=0"],
    "pipelined": ["rollout.stream_chunk=0", "rollout.max_staleness=1"],
}
PHASES = ("time/generate", "time/judge_tail", "time/train", "time/sync", "time/step")


def run(mode: str, steps: int, latency: tuple[float, float], extra: list[str], out: Path) -> list[dict]:
    args = [sys.executable, str(ROOT / "launch.py"), f"trainer.total_steps={steps}", f"trainer.output_dir={out}",
            "trainer.eval_every=0",
            "trainer.progress_bar=false", "judge.cache=false", "judge.max_in_flight=64",
            f"judge.local.latency_min_s={latency[0]}",
            f"judge.local.latency_max_s={latency[1]}", *MODES[mode], *extra]
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def middle(rows: list[dict]) -> list[dict]:
    return rows[1:-1] or rows


def medians(rows: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in PHASES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, in the order ABBA...")
    ap.add_argument("--judge-latency", type=float, nargs=2, default=(1.6, 2.5), metavar=("LO", "HI"))
    ap.add_argument("--learn", action="store_true", help="train with conf=tiny's learning rate (the runs diverge)")
    ap.add_argument("overrides", nargs="*", help="more key=value config overrides for both runs")
    args = ap.parse_args()
    if not args.learn:
        args.overrides = ["learner.lr=0", *args.overrides]
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the first and the last step are left out)")

    pairs = [("serial", "pipelined") if k % 2 == 0 else ("pipelined", "serial") for k in range(args.repeats)]
    order = [mode for pair in pairs for mode in pair]  # ABBA...
    rows = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for k, mode in enumerate(order):
            run_rows = middle(run(mode, args.steps, tuple(args.judge_latency), args.overrides, Path(tmp) / f"{k}"))
            rows[mode] += run_rows
            print(f"{mode:>9} run {k}: " + "  ".join(f"{p.split('/')[1]} {v:.2f}s" for p, v in medians(run_rows).items()),
                  flush=True)
    results = {mode: medians(rows[mode]) for mode in MODES}
    for mode in MODES:
        print(f"{mode:>9}: " + "  ".join(f"{p.split('/')[1]} {v:.2f}s" for p, v in results[mode].items()))
    serial, pipelined = results["serial"]["time/step"], results["pipelined"]["time/step"]
    judge = results["serial"]["time/judge_tail"]
    print(f"serial judge phase / generation phase = {judge / results['serial']['time/generate']:.2f}")
    print(f"pipeline: serial_s={serial:.2f} pipelined_s={pipelined:.2f} judge_s={judge:.2f} "
          f"hidden={(serial - pipelined) / judge:.2f}")


if __name__ == "__main__":
    main()
