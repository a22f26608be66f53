"""bench/gpu_check.sh --dry-run, as CI runs it: every check listed with what it needs, and on this
GPU-less machine, a SKIP verdict for each GPU check rather than an attempt."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_dry_run_lists_every_check_and_what_it_needs():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = [line for line in proc.stdout.splitlines() if line.startswith("check ")]
    names = [line.split()[1] for line in listed]
    assert {"learner_step_kernels", "learner_step_reference", "zero3_cpu_adam", "offload_optimizer_1b"} <= set(names)
    assert all("needs " in line and "here: would " in line for line in listed)
    assert all("would SKIP(" in line for line in listed), "no GPU here: every check would be skipped"
    assert f"gpu_check: dry_run checks={len(listed)}" in proc.stdout
