"""The operator's path: a head from cluster/start_head.sh, launch.py submitted with `ray job submit`
and cluster/runtime_env.yaml, live metrics scraped from the head's Prometheus endpoint while the
job runs, `ray job stop` leaving the driver time to save.

The head is a second, module-scoped cluster next to the suite's shared one (which has no
dashboard, hence no job API, and which other tests expect as it is): its own temp dir, token and
free ports, stopped by its pid (never `ray stop`: that ends every Ray process on the machine)."""
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.cluster.ray_nodes import RAY, ROOT, Node, free_ports, http_get, node_env, wait_for

SMALL = ["data.prompts_per_step=2", "rollout.sampling.max_new_tokens=64"]  # 2 steps in seconds, not minutes
SERIES = re.compile(r"^(?P<name>\w+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def head():
    tmp = Path(tempfile.mkdtemp(prefix="polray"))  # short: Ray's socket paths must fit 107 bytes
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    ports = dict(zip(("ray", "dashboard", "metrics", "client", "agent", "agent_grpc", "env_agent", "dashboard_metrics",
                      "autoscaler_metrics"), free_ports(9)))
    env = node_env(tmp, token, NUM_CPUS="4", TEMP_DIR=str(tmp / "ray"), RAY_PORT=str(ports["ray"]),
                   DASHBOARD_PORT=str(ports["dashboard"]), METRICS_PORT=str(ports["metrics"]),
                   DASHBOARD_METRIC_PORT=str(ports["dashboard_metrics"]),  # Ray fixes 44227, 44217: one cluster a machine
                   AUTOSCALER_METRIC_PORT=str(ports["autoscaler_metrics"]),
                   RAY_metrics_report_interval_ms="1000")  # Ray's 10 s would outlast a 2-step run's last step
    node = Node.start("start_head.sh", ["--ray-client-server-port", str(ports["client"]),
                                        "--dashboard-agent-listen-port", str(ports["agent"]),
                                        "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
                                        "--runtime-env-agent-port", str(ports["env_agent"])], env, tmp / "head.log")
    url = f"http://127.0.0.1:{ports['dashboard']}"
    client_env = {**env, "RAY_ADDRESS": url}
    del client_env["BLOCK"]
    try:
        wait_for(lambda: http_get(f"{url}/api/jobs/", token.read_text()) is not None, 90, node.proc, node.log)
        yield {"url": url, "token": token.read_text(), "ports": ports, "env": client_env, "proc": node.proc}
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_run(head, tiny_model_path, tmp_path_factory):
    """`ray job submit --no-wait` of a 2-step tiny run; the metrics endpoint scraped while it runs."""
    tmp = tmp_path_factory.mktemp("job")
    out = tmp / "run"
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(POLARIS_CACHE=str(Path(tiny_model_path).parent), WANDB_MODE="offline",
                                   HF_HUB_OFFLINE="1")
    (tmp / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    start = time.monotonic()
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--no-wait", "--working-dir", str(ROOT), "--runtime-env", str(tmp / "runtime_env.yaml"),
         "--", "python", "launch.py", "conf=tiny", "trainer.total_steps=2", f"trainer.output_dir={out}",
         "trainer.progress_bar=false", *SMALL],
        cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)

    scraped, status = "", None
    while time.monotonic() - start < 240:
        text = http_get(f"http://127.0.0.1:{head['ports']['metrics']}/metrics") or ""
        if not scraped and any(v >= 1 for _, v in _series(text, "ray_polaris_step", run=run_tag(out))):
            scraped = text
        status = _job(head, job_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.25)
    logs = json.loads(http_get(f"{head['url']}/api/jobs/{job_id}/logs", head["token"]))["logs"]
    return {"status": status, "logs": logs, "out": out, "scraped": scraped}


def run_tag(out):
    """The live gauges' run tag: the run's name (its folder's basename and run id), once it has one."""
    return f"{out.name}-{(out / 'run_id').read_text().strip()}" if (out / "run_id").exists() else None


@pytest.mark.slow
def test_launch_runs_as_a_ray_job_and_writes_its_outputs(tiny_run):
    assert tiny_run["status"] == "SUCCEEDED", tiny_run["logs"][-3000:]
    assert re.search(r"^done: metrics in .*metrics\.jsonl", tiny_run["logs"], re.MULTILINE), tiny_run["logs"][-3000:]
    rows = [json.loads(line) for line in (tiny_run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert (tiny_run["out"] / "hf_model" / "model.safetensors").exists()


@pytest.mark.slow
def test_live_metrics_reach_the_prometheus_endpoint_during_the_run(tiny_run):
    text = tiny_run["scraped"]
    assert text, "no ray_polaris_step >= 1 for this run while the job ran"
    run = run_tag(tiny_run["out"])
    for name in ("ray_polaris_reward_mean", "ray_polaris_judge_rpm", "ray_polaris_judge_in_flight",
                 "ray_polaris_weight_version", "ray_polaris_judge_requests_total"):
        assert _series(text, name, run=run), name
    phases = {labels["phase"]: v for labels, v in _series(text, "ray_polaris_phase_seconds", run=run)}
    assert set(phases) == {"generate", "judge_tail", "train", "sync", "step"} and phases["step"] > 0
    assert [v for _, v in _series(text, "ray_polaris_judge_spend_usd", run=run)][0] > 0  # the loopback judge bills


@pytest.mark.slow
def test_the_head_listens_on_loopback_only_and_asks_for_the_token(head):
    listening = set()
    for proc in [psutil.Process(head["proc"].pid), *psutil.Process(head["proc"].pid).children(recursive=True)]:
        try:
            listening |= {c.laddr.ip for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:  # a worker that just exited
            pass
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{head['url']}/api/jobs/", timeout=10)
    assert denied.value.code == 401


@pytest.mark.slow
def test_job_stop_gives_the_driver_time_to_save(head, tmp_path):
    """Ray SIGKILLs a stopped job's driver 3 s after SIGTERM unless RAY_JOB_STOP_WAIT_TIME_S (from
    cluster/runtime_env.yaml) says otherwise: a driver that needs 5 s to save gets them."""
    (tmp_path / "driver.py").write_text(
        "import signal, sys, time\n"
        "def save(*_):\n"
        "    time.sleep(5)\n"
        f"    open({str(tmp_path / 'saved')!r}, 'w').write('ok')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, save)\n"
        "print('running', flush=True)\n"
        "time.sleep(120)\n")
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump({"env_vars": runtime_env["env_vars"]}))  # no upload
    submit = subprocess.run([str(RAY), "job", "submit", "--no-wait", "--runtime-env", str(tmp_path / "runtime_env.yaml"),
                             "--", "python", str(tmp_path / "driver.py")],
                            env=head["env"], capture_output=True, text=True, timeout=60)
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    wait_for(lambda: "running" in (http_get(f"{head['url']}/api/jobs/{job_id}/logs", head["token"]) or ""), 60)
    stop = subprocess.run([str(RAY), "job", "stop", job_id], env=head["env"], capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    wait_for(lambda: _job(head, job_id)["status"] == "STOPPED", 30)
    assert (tmp_path / "saved").read_text() == "ok"


def test_live_metrics_are_a_no_op_without_ray():
    """The tracker publishes every step; without Ray (or before ray.init) that must cost nothing."""
    code = ("import sys; from actors.live_metrics import LiveMetrics\n"
            "m = {'step': 1, 'reward/mean': float('nan'), 'judge/requests': 3, 'time/step': 2.0}\n"
            "LiveMetrics('r').publish(m); print('ray' in sys.modules)\n"
            "import ray; LiveMetrics('r').publish(m); print(ray.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def _series(text: str, name: str, **match) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of `name` in Prometheus text whose labels include `match`."""
    found = []
    for m in SERIES.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if m["name"] == name and match.items() <= labels.items():
            found.append((labels, float(m["value"])))
    return found


def _job(head, job_id) -> dict:
    return json.loads(http_get(f"{head['url']}/api/jobs/{job_id}", head["token"]))
