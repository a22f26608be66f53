"""Does the default run learn? Trains conf=tiny for 20 steps on each of several seeds and prints,
per seed, the mean of reward/mean over the first and the last five steps, the spread of the
first five, the median step time and the peak memory of the whole run (driver + Ray workers).

    .venv/bin/python bench/learning.py [key=value overrides] [--seeds 0 1 2] [--steps 20]

A seed passes when mean(last 5) - mean(first 5) > std(first 5).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_seed(seed: int, steps: int, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: resume=auto would continue an old one
    args = [sys.executable, str(ROOT / "launch.py"), f"trainer.seed={seed}", f"trainer.total_steps={steps}",
            f"trainer.output_dir={out}", "trainer.progress_bar=false", *extra]
    peak, done = [0], threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "w"))

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    code = proc.wait()
    done.set()
    if code != 0:
        raise SystemExit(f"seed {seed}: launch.py exited {code}; see {out.with_suffix('.log')}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows]
    first, last = rewards[:5], rewards[-5:]
    return {
        "seed": seed, "first5": statistics.fmean(first), "last5": statistics.fmean(last),
        "std_first5": statistics.stdev(first), "median_step_s": statistics.median(r["time/step"] for r in rows),
        "peak_gib": peak[0] / 2**30, "wall_s": time.perf_counter() - start,
        "length_ratio_first5": statistics.fmean(r["length/ratio_mean"] for r in rows[:5]),
        "length_ratio_last5": statistics.fmean(r["length/ratio_mean"] for r in rows[-5:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_learning"))
    args, extra = parser.parse_known_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    print("seed  reward first5 -> last5   gain / std(first5)  length ratio first5 -> last5  "
          "median step  peak mem  result")
    for seed in args.seeds:
        r = run_seed(seed, args.steps, out_root / f"seed{seed}", extra)
        gain = r["last5"] - r["first5"]
        verdict = "PASS" if gain > r["std_first5"] else "FAIL"
        print(f"{seed:>4}  {r['first5']:+.3f} -> {r['last5']:+.3f}   {gain:+.3f} / {r['std_first5']:.3f}"
              f"        {r['length_ratio_first5']:.2f} -> {r['length_ratio_last5']:.2f}"
              f"                  {r['median_step_s']:5.1f} s    {r['peak_gib']:.1f} GiB  {verdict}"
              f"  (wall {r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
