"""How long until conf=tiny writes stories of the asked length? Trains conf=tiny (its model build and
reward config as they are) with each rollout engine and stops the run once the 5-step moving mean of
the training stories' length ratio (words / target, metrics' length/ratio_mean) lies within
[0.9, 1.1], or at 80 steps ("not reached").

    .venv/bin/python bench/time_to_target.py [--engines hf vllm] [--cap 80] [--window 5] [key=value ...]

The run is launch.py with trainer.total_steps=<cap> (the lr schedule spans the cap, as a user who
asked for that many steps would get), trainer.eval_every=0, W&B off unless WANDB_MODE is set; it is
stopped with SIGTERM once the target is met (launch.py checkpoints and exits). Per engine:
  time_to_target: engine=<e> start_ratio=<step 0> reached_step=<s|not reached> wall_s=<from launch>
                  train_s=<sum of time/step up to s> step_s=<median time/step> final_ratio=<moving mean>
wall_s counts start-up (Ray, model load, engines) too; train_s only the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOW, HIGH = 0.9, 1.1


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def moving_means(ratios: list[float], window: int) -> list[float]:
    """The mean of each `window` consecutive ratios (entry i ends at step i + window - 1)."""
    return [statistics.fmean(ratios[i - window:i]) for i in range(window, len(ratios) + 1)]


def reached(ratios: list[float], window: int) -> int | None:
    """The step at which the moving mean first lies in [LOW, HIGH], or None."""
    for i, mean in enumerate(moving_means(ratios, window)):
        if LOW <= mean <= HIGH:
            return i + window - 1
    return None


def run(engine: str, args, out: Path) -> str:
    cmd = [sys.executable, str(ROOT / "launch.py"), f"trainer.total_steps={args.cap}", f"trainer.output_dir={out}",
           "trainer.eval_every=0", "trainer.progress_bar=false", f"rollout.engine={engine}", *args.overrides]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    metrics, step = out / "metrics.jsonl", None
    start = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            ratios = [r["length/ratio_mean"] for r in _rows(metrics)]
            step = reached([r for r in ratios if r is not None], args.window)
            if step is not None:
                wall = time.perf_counter() - start
                os.killpg(proc.pid, signal.SIGTERM)  # launch.py checkpoints on SIGTERM and exits
                break
            time.sleep(1.0)
        proc.wait()
    rows = _rows(metrics)
    if not rows:
        sys.exit(f"time_to_target: the {engine} run wrote no metrics:\n{Path(f'{out}.log').read_text()[-3000:]}")
    ratios = [r["length/ratio_mean"] for r in rows if r.get("length/ratio_mean") is not None]
    if step is None:  # finished (or failed) on its own: read what it wrote
        step = reached(ratios, args.window)
        wall = time.perf_counter() - start
    done = rows if step is None else rows[:step + 1]
    means = moving_means(ratios[:len(done)], args.window)
    return (f"time_to_target: engine={engine} start_ratio={ratios[0]:.2f} "
            f"reached_step={'not reached' if step is None else step} wall_s={wall:.0f} "
            f"train_s={sum(r['time/step'] for r in done):.0f} step_s={statistics.median(r['time/step'] for r in done):.2f} "
            f"final_ratio={means[-1] if means else float('nan'):.2f} steps_run={len(rows)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--cap", type=int, default=80, help="steps at most")
    ap.add_argument("--window", type=int, default=5, help="steps in the moving mean")
    ap.add_argument("overrides", nargs="*", help="more key=value config overrides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="time_to_target-") as tmp:
        for engine in args.engines:
            print(run(engine, args, Path(tmp) / engine), flush=True)


if __name__ == "__main__":
    main()
