"""Network exposure: every socket a standalone run listens on is on loopback.

A tiny `python launch.py` without RAY_ADDRESS starts its own Ray cluster (GCS, raylet, agents,
workers), the loopback judge, DeepSpeed's store and the weight group; while it runs, the test
lists the listening sockets (TCP LISTEN, and UDP sockets bound without a peer) of the driver's
process tree and of every process of the run's Ray session, several times, until it exits.
"""
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


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
                                 "trainer.progress_bar=false", "trainer.eval_every=0", *quick_run.args],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    sessions: set[str] = set()
    seen: dict[tuple[str, str, int], tuple[int, str]] = {}  # (proto, ip, port) -> (pid, process)
    probed: set[int] = set()
    judge = gcs = store = False
    polls = 0
    deadline = time.monotonic() + 840
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for pid, p in run_processes(root, sessions).items():
                try:
                    name = " ".join(p.cmdline())[:120] or p.name()
                    conns = p.net_connections(kind="inet")
                except psutil.Error:
                    continue
                for c in conns:
                    udp = c.type == socket.SOCK_DGRAM
                    if not (c.status == psutil.CONN_LISTEN or (udp and not c.raddr and c.laddr)):
                        continue
                    seen.setdefault(("udp" if udp else "tcp", c.laddr.ip, c.laddr.port), (pid, name))
                    if udp:
                        continue
                    gcs = gcs or "gcs_server" in name
                    # a TCPStore's master holds a client of its own server: DeepSpeed's and the weight group's
                    store = store or ("LearnerWorker" in name and any(
                        o.status == psutil.CONN_ESTABLISHED and o.raddr and o.raddr.port == c.laddr.port for o in conns))
                    if pid == proc.pid and c.laddr.port not in probed:
                        probed.add(c.laddr.port)
                        judge = judge or is_judge_server(c.laddr.port)
            polls += 1
            time.sleep(0.5)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    listing = "\n".join(f"{proto} {ip}:{port} pid {pid} {name}" for (proto, ip, port), (pid, name) in sorted(seen.items()))
    assert rc == 0, text[-4000:]
    assert polls >= 3 and sessions, f"{polls} polls, sessions {sessions}\n{listing}"
    assert judge and gcs and store, f"judge server {judge}, Ray GCS {gcs}, torch.distributed store {store}:\n{listing}"
    exposed = [f"{proto} {ip}:{port} pid {pid} {name}" for (proto, ip, port), (pid, name) in seen.items()
               if not is_loopback(ip)]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed) + "\nall:\n" + listing
    print(f"{len(seen)} listening sockets over {polls} polls, all on loopback:\n{listing}")
