"""Stopped and resumed runs lose and repeat nothing: a run killed after a checkpoint continues
exactly; SIGTERM (what `ray job stop` sends) checkpoints before exiting; a resume with a larger
trainer.total_steps extends the run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.checkpoint import latest_checkpoint, read_state, step_dir

ROOT = Path(__file__).resolve().parents[1]


def start(args, env):
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "trainer.progress_bar=false", *args], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def wait_for(condition, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stories(out: Path) -> dict[int, list[tuple]]:
    """Per step: every judged story's (key, reward) in a fixed order."""
    per_step = {}
    for path in sorted((out / "rollouts").glob("step_*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        per_step[int(path.stem[5:])] = sorted((s["key"], s["response"], s["reward"]["scalar"]) for s in lines)
    return per_step


@pytest.fixture
def env(ray_address, tiny_model_path):
    return {"RAY_ADDRESS": ray_address, "POLARIS_CACHE": str(Path(tiny_model_path).parent)}


@pytest.fixture
def common(quick_run):
    return [*quick_run.one_engine_args, "judge.local.latency_max_s=0.2"]


@pytest.mark.slow
def test_a_run_killed_after_its_third_step_resumes_exactly(tmp_path, env, common):
    common = [*common, "trainer.total_steps=6", "trainer.save_every=3"]
    straight = start([*common, f"trainer.output_dir={tmp_path / 'straight'}"], env)
    finish(straight)

    out = tmp_path / "killed"
    killed = start([*common, f"trainer.output_dir={out}"], env)
    wait_for(lambda: latest_checkpoint(out) is not None, killed)
    os.killpg(killed.pid, signal.SIGKILL)  # the driver and anything it started: no chance to clean up
    killed.wait()
    assert latest_checkpoint(out) == step_dir(out, 3)
    logged_before_kill = len(metrics(out))
    assert 3 <= logged_before_kill < 6

    resumed = finish(start([*common, f"trainer.output_dir={out}"], env))
    assert f"resume: from {step_dir(out, 3)}" in resumed
    a, b = metrics(tmp_path / "straight"), metrics(out)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]  # none repeated or skipped
    assert [r["reward/mean"] for r in b] == [r["reward/mean"] for r in a]
    assert [r["weight_version"] for r in b] == [r["weight_version"] for r in a]
    assert stories(out) == stories(tmp_path / "straight")  # same prompts, samples and rewards per step
    assert read_state(step_dir(out, 6))["wandb_run_id"] == (out / "wandb_run_id").read_text().strip()
    assert (out / "summary.png").stat().st_size > 0


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_larger_total_extends_the_run(tmp_path, env, common):
    """With max_staleness=1 a step is always in flight: the checkpoint keeps it (or drops it and
    rewinds the data cursor), and the resumed run never trains a row older than the bound."""
    out = tmp_path / "run"
    common = [*common, "rollout.max_staleness=1", "trainer.save_every=0", f"trainer.output_dir={out}"]
    proc = start([*common, "trainer.total_steps=3"], env)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    stdout = finish(proc)
    assert "SIGTERM" in stdout and "stopped:" in stdout
    done = len(metrics(out))
    assert done < 3 and latest_checkpoint(out) == step_dir(out, done)
    assert not (out / "hf_model").exists()  # no export on the way out: the time is the checkpoint's

    extended = finish(start([*common, "trainer.total_steps=4"], env))
    assert f"resume: from {step_dir(out, done)}" in extended
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(4))
    assert all(r["rollout/policy_lag_max"] <= 1 and r["rollout/stale_refused"] == 0 for r in rows)
    assert latest_checkpoint(out) == step_dir(out, 4) and (out / "hf_model").is_dir()
    again = finish(start([*common, "trainer.total_steps=4"], env))
    assert "done already" in again and len(metrics(out)) == 4
