"""Network exposure: every socket a standalone run listens on is on loopback. And scheduling: its
roles run at the driver's priority (Ray's default would put them at niceness 15).

A tiny `python launch.py` without RAY_ADDRESS starts its own Ray cluster (GCS, raylet, agents,
workers), the loopback judge, DeepSpeed's store and the weight group; while it runs, the test
lists the listening sockets (TCP LISTEN, and UDP sockets bound without a peer) of the driver's
process tree and of every process of the run's Ray session, several times, until it exits.
"""
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.cluster.ray_nodes import SocketWatch

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("ray::LearnerWorker", "ray::RolloutWorker", "ray::RewardWorker")  # their niceness is checked
SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


def run_processes(root: psutil.Process, sessions: set[str]) -> dict[int, psutil.Process]:
    """The driver, its descendants, and every process naming one of the run's Ray sessions (and
    their descendants); `sessions` collects the session names seen in the driver's tree."""
    procs = {}
    try:
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.Error:
        pass
    for p in list(procs.values()):
        try:
            sessions.update(SESSION.findall(" ".join(p.cmdline())))
        except psutil.Error:
            pass
    if sessions:
        for p in psutil.process_iter():
            try:
                if p.pid not in procs and any(s in " ".join(p.cmdline()) for s in sessions):
                    procs.update({q.pid: q for q in [p, *p.children(recursive=True)]})
            except psutil.Error:
                pass
    return procs


def is_judge_server(port: int) -> bool:
    """The stand-in judge answers GET /stats with JSON (reward/judge_server.py)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:
            return isinstance(json.loads(r.read()), dict)
    except Exception:
        return False


@pytest.mark.slow
def test_standalone_run_listens_on_loopback_only(tmp_path, tiny_model_path, quick_run):
    # as a user starts it: no cluster to join, and none of the settings the launcher must make itself
    # (the repo's conftest.py sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for the tests' own Ray)
    env = {k: v for k, v in os.environ.items() if k not in (
        "RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME",
        "VLLM_HOST_IP")}
    env.update(WANDB_MODE="disabled", POLARIS_CACHE=str(Path(tiny_model_path).parent))
    out = tmp_path / "run"
    log = tmp_path / "launch.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "launch.py", "trainer.total_steps=2", f"trainer.output_dir={out}",
                                 "trainer.progress_bar=false", "trainer.eval_every=0", *quick_run.one_engine_args],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    root_niceness = root.nice()
    sessions: set[str] = set()
    watch = SocketWatch()
    probed: set[int] = set()
    judge = gcs = store = False
    role_niceness: dict[str, int] = {}
    deadline = time.monotonic() + 840
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for pid, name, conns in watch.poll(run_processes(root, sessions).values()):
                if name.startswith(ROLES):
                    try:
                        role_niceness[name.split()[0].split(".")[0]] = psutil.Process(pid).nice()
                    except psutil.Error:
                        pass
                for c in conns:
                    if c.status != psutil.CONN_LISTEN:
                        continue
                    gcs = gcs or "gcs_server" in name
                    # a TCPStore's master holds a client of its own server: DeepSpeed's and the weight group's
                    store = store or ("LearnerWorker" in name and any(
                        o.status == psutil.CONN_ESTABLISHED and o.raddr and o.raddr.port == c.laddr.port for o in conns))
                    if pid == proc.pid and c.laddr.port not in probed:
                        probed.add(c.laddr.port)
                        judge = judge or is_judge_server(c.laddr.port)
            time.sleep(0.5)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    listing = watch.listing()
    assert rc == 0, text[-4000:]
    assert watch.polls >= 3 and sessions, f"{watch.polls} polls, sessions {sessions}\n{listing}"
    assert judge and gcs and store, f"judge server {judge}, Ray GCS {gcs}, torch.distributed store {store}:\n{listing}"
    assert set(role_niceness) == set(ROLES), f"roles seen: {role_niceness}"
    assert set(role_niceness.values()) == {root_niceness}, f"driver at {root_niceness}, roles at {role_niceness}"
    exposed = watch.exposed()
    assert not exposed, "beyond loopback:\n" + "\n".join(exposed) + "\nall:\n" + listing
    print(f"{len(watch.listening)} listening sockets over {watch.polls} polls, all on loopback:\n{listing}")
