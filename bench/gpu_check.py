"""The GPU acceptance checks, in two tiers; run through bench/gpu_check.sh.

    bench/gpu_check.sh device           # one GPU, torch + transformers (+ carried wheels): <= 5 min
    bench/gpu_check.sh full             # a machine set up with ./install.sh gpu, one or more GPUs
    bench/gpu_check.sh --dry-run        # every check, what it needs, and whether this machine has it
    bench/gpu_check.sh device --smoke   # the device tier's code at toy sizes on CPU (CI runs it)

Each check runs in a process of its own (a crash or an out-of-memory ends that check only) and
prints `PASS <check> (<s>s)`, `FAIL <check>: <why>` or `SKIP(<why>) <check>`; its measurements
are `gpu_check: <check>.<figure>=<value>` lines, which the run planner reads. The last line is
`gpu_check: tier=<tier> passed=<n> failed=<n> skipped=<n>`; the exit status is 1 when a check failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VERDICT = "verdict:"
GIB = 2**30


class Skip(Exception):
    """Raised by a check whose needs this machine does not meet (the reason is printed)."""


@dataclass(frozen=True)
class Check:
    name: str
    tier: str  # device | full
    what: str  # one line: what it checks and measures
    needs: tuple[str, ...]  # python modules
    run: Callable[["Context"], None]
    min_gpus: int = 1
    timeout_s: int = 120
    smoke: bool = True  # runs at toy sizes on CPU under --smoke


@dataclass
class Context:
    """What a check gets: where it runs, its figures, a scratch folder."""

    check: str
    smoke: bool
    scratch: Path
    figures: dict = field(default_factory=dict)

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.smoke else "cuda")

    def figure(self, name: str, value) -> None:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        self.figures[name] = value
        print(f"gpu_check: {self.check}.{name}={text}", flush=True)


def all_checks() -> list[Check]:
    from bench import gpu_checks_device

    try:
        from bench import gpu_checks_full
    except ImportError:
        return gpu_checks_device.CHECKS
    return [*gpu_checks_device.CHECKS, *gpu_checks_full.CHECKS]


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def unmet(check: Check, smoke: bool) -> str | None:
    """Why this machine cannot run the check, or None."""
    missing = [m for m in check.needs if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if smoke:
        return None if check.smoke else "GPU only (no CPU smoke form)"
    gpus = gpu_count()
    if gpus < check.min_gpus:
        return f"needs {check.min_gpus} GPU{'s' * (check.min_gpus > 1)}, this machine has {gpus}"
    return None


def dry_run(checks: list[Check], smoke: bool) -> int:
    for c in checks:
        why = unmet(c, smoke)
        needs = ", ".join([*c.needs, f"{c.min_gpus} GPU{'s' * (c.min_gpus > 1)}"])
        here = "would run" if why is None else f"would SKIP({why})"
        print(f"check {c.name} [tier {c.tier}, <= {c.timeout_s}s]: {c.what}; needs {needs}; here: {here}")
    print(f"gpu_check: dry_run checks={len(checks)}")
    return 0


def run_child(name: str, smoke: bool) -> int:
    """One check in this process; its last line is the verdict."""
    [check] = [c for c in all_checks() if c.name == name]
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as scratch:
        ctx = Context(name, smoke, Path(scratch))
        try:
            check.run(ctx)
        except Skip as why:
            print(f"{VERDICT} SKIP {why}", flush=True)
            return 0
        except Exception as err:  # noqa: BLE001 - a failed check is reported, the others still run
            traceback.print_exc()
            print(f"{VERDICT} FAIL {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
            return 1
    print(f"{VERDICT} PASS", flush=True)
    return 0


def run_tier(checks: list[Check], tier: str, smoke: bool) -> int:
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for c in checks:
        why = unmet(c, smoke)
        if why is not None:
            print(f"SKIP({why}) {c.name}", flush=True)
            counts["SKIP"] += 1
            continue
        start = time.perf_counter()
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", c.name, *(["--smoke"] if smoke else [])]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(c.timeout_s, proc.kill)
        watchdog.start()
        verdict, lines = None, []
        for line in proc.stdout:  # streamed: figures show as they are measured
            if line.startswith(VERDICT):
                verdict = (line[len(VERDICT):].strip() + " ").split(" ", 1)
            elif line.startswith("gpu_check:"):
                print(line, end="", flush=True)
            else:
                lines.append(line)
        code = proc.wait()
        watchdog.cancel()
        if verdict is None:
            over = time.perf_counter() - start >= c.timeout_s
            verdict = ["FAIL", f"over its {c.timeout_s}s limit" if over else f"ended without a verdict (exit {code})"]
        seconds = time.perf_counter() - start
        status, reason = verdict[0], verdict[1].strip()
        if status == "PASS":
            print(f"PASS {c.name} ({seconds:.1f}s)", flush=True)
        elif status == "SKIP":
            print(f"SKIP({reason}) {c.name}", flush=True)
        else:
            status = "FAIL"
            print("".join(lines[-40:]), end="", flush=True)  # the failing check's own output, last part
            print(f"FAIL {c.name}: {reason} ({seconds:.1f}s)", flush=True)
        counts[status] += 1
    print(f"gpu_check: tier={tier}{' smoke' * smoke} passed={counts['PASS']} failed={counts['FAIL']} "
          f"skipped={counts['SKIP']}", flush=True)
    return 1 if counts["FAIL"] else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tier", nargs="?", default="all", choices=["device", "full", "all"])
    ap.add_argument("--dry-run", action="store_true", help="list the checks and what each needs; run nothing")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU: the checks' code, not the GPU's figures")
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child, args.smoke)
    checks = [c for c in all_checks() if args.tier in ("all", c.tier)]
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {c.name for c in checks})
        if unknown:
            print(f"gpu_check: no check named {', '.join(unknown)} in tier {args.tier}; "
                  f"known: {', '.join(c.name for c in checks)}", file=sys.stderr)
            return 2
        checks = [c for c in checks if c.name in wanted]
    if args.dry_run:
        return dry_run(checks, args.smoke)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    # the interpreter's scripts (ninja among them): DeepSpeed's CPU Adam build finds and reuses its cache
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return run_tier(checks, args.tier, args.smoke)


if __name__ == "__main__":
    # through the package module, so that the checks' Skip and Context are this module's classes
    from bench.gpu_check import main as package_main

    sys.exit(package_main(sys.argv[1:]))
