"""Two Ray nodes on one machine, as the README grows a run from one node to several: a head from
cluster/start_head.sh labelled for the learner, a second node from cluster/start_worker.sh
labelled for the rollout engines, both on 127.0.0.1 (cluster/loopback_ray.py says why not
127.0.0.2/.3). A conf=tiny job submitted with `ray job submit` places its roles by those labels,
forms the weight group across the nodes and records each role's node; the worker node's raylet
SIGKILLed mid-run stops the run with one error naming the lost engine and the last complete
checkpoint (no other node carries the label, so nothing can take the engine: recovery would
only wait); the node started again, the same command resumes from that checkpoint and completes.
Nothing of either node, the jobs or their actors listens or connects beyond 127.0.0.0/8."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from actors import checkpoint
from tests.cluster.ray_nodes import RAY, ROOT, Node, SocketWatch, free_ports, http_get, node_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.two_node]

RUNNING = ("PENDING", "RUNNING")  # a job's status before it ends
HEAD_LABEL, WORKER_LABEL = "polaris-role=learner", "polaris-role=rollout"
RUN = ["conf=tiny", "trainer.progress_bar=false", "trainer.eval_every=0", "trainer.total_steps=3",
       "trainer.save_every=1",
       "placement.learner.labels.polaris-role=learner", "placement.engines.labels.polaris-role=rollout"]


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="pol2n"))  # short: Ray's socket paths must fit 107 bytes
    token = tmp / "token"
    token.write_text("0123456789abcdef" * 4)
    (gcs, dashboard, metrics, client, agent, agent_grpc, env_agent, dash_metrics, autoscaler_metrics,
     w_metrics, w_agent, w_agent_grpc, w_env_agent) = free_ports(13)
    head_env = node_env(tmp, token, BIND="127.0.0.1", NUM_CPUS="2", NUM_GPUS="0", TEMP_DIR=str(tmp / "head"),
                        RAY_PORT=str(gcs), DASHBOARD_PORT=str(dashboard), METRICS_PORT=str(metrics),
                        DASHBOARD_METRIC_PORT=str(dash_metrics), AUTOSCALER_METRIC_PORT=str(autoscaler_metrics),
                        # a lost node declared dead after ~2 s of missed health checks, not Ray's ~15 s
                        RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4")
    head = Node.start("start_head.sh", ["--labels", HEAD_LABEL, "--ray-client-server-port", str(client),
                                        "--dashboard-agent-listen-port", str(agent),
                                        "--dashboard-agent-grpc-port", str(agent_grpc),
                                        "--runtime-env-agent-port", str(env_agent)], head_env, tmp / "head.log")
    url = f"http://127.0.0.1:{dashboard}"
    worker_env = node_env(tmp, token, NODE_IP="127.0.0.1", NUM_CPUS="2", NUM_GPUS="0", TEMP_DIR=str(tmp / "worker"),
                          METRICS_PORT=str(w_metrics))
    worker_args = [f"127.0.0.1:{gcs}", "--labels", WORKER_LABEL, "--dashboard-agent-listen-port", str(w_agent),
                   "--dashboard-agent-grpc-port", str(w_agent_grpc), "--runtime-env-agent-port", str(w_env_agent)]
    state = {"head": head, "tmp": tmp, "url": url, "token": token.read_text(),
             "client_env": {k: v for k, v in head_env.items() if k != "BLOCK"} | {"RAY_ADDRESS": url}}

    def start_worker() -> Node:
        node = Node.start("start_worker.sh", worker_args, worker_env, tmp / f"worker{time.monotonic_ns()}.log")
        wait_for(lambda: len(alive_nodes(state)) == 2, 120, node.proc, node.log)
        return node

    try:
        wait_for(lambda: http_get(f"{url}/api/jobs/", state["token"]) is not None, 120, head.proc, head.log)
        state.update(worker=start_worker(), start_worker=start_worker)
        yield state
    finally:
        for node in (state.get("worker"), head):
            if node is not None:
                node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def alive_nodes(state) -> list[dict]:
    """The cluster's live nodes, from the dashboard's state API."""
    text = http_get(f"{state['url']}/api/v0/nodes?detail=1", state["token"])
    nodes = json.loads(text)["data"]["result"]["result"] if text else []
    return [n for n in nodes if n["state"] == "ALIVE"]


def node_processes(state) -> list[psutil.Process]:
    """Every process of both nodes: the scripts' `ray start` trees and whatever names the temp dir."""
    tmp = str(state["tmp"])
    procs = {}
    for p in psutil.process_iter():
        try:
            if tmp in " ".join(p.cmdline()):
                procs.update({q.pid: q for q in [p, *p.children(recursive=True)]})
        except psutil.Error:
            pass
    return list(procs.values())


def submit(state, out: Path, runtime_env: Path, quick: list[str]) -> str:
    proc = subprocess.run([str(RAY), "job", "submit", "--no-wait", "--working-dir", str(ROOT),
                           "--runtime-env", str(runtime_env), "--", "python", "launch.py", *RUN, *quick,
                           f"trainer.output_dir={out}"],
                          cwd=ROOT, env=state["client_env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)


def job(state, job_id) -> dict:
    return json.loads(http_get(f"{state['url']}/api/jobs/{job_id}", state["token"]))


def job_logs(state, job_id) -> str:
    return json.loads(http_get(f"{state['url']}/api/jobs/{job_id}/logs", state["token"]))["logs"]


def finished(state, job_id, timeout_s: float = 600) -> str:
    wait_for(lambda: job(state, job_id)["status"] in ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s)
    return job(state, job_id)["status"]


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def runs(cluster, tiny_model_path, tmp_path_factory, quick_run):
    """Job 1, its worker node killed after the first checkpoint; the node back; job 2, resuming."""
    tmp = tmp_path_factory.mktemp("two_node")
    out = tmp / "run"
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(POLARIS_CACHE=str(Path(tiny_model_path).parent), WANDB_MODE="offline",
                                   HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo")  # the interface: the cluster's to set
    (tmp / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    watch, stop_watching = SocketWatch(), threading.Event()

    def watching():
        while not stop_watching.is_set():
            watch.poll(node_processes(cluster))
            time.sleep(0.5)

    watcher = threading.Thread(target=watching, daemon=True)
    watcher.start()
    try:
        first = submit(cluster, out, tmp / "runtime_env.yaml", quick_run.one_engine_args)
        wait_for(lambda: checkpoint.complete_checkpoints(out) or job(cluster, first)["status"] not in RUNNING, 600)
        assert job(cluster, first)["status"] == "RUNNING", job_logs(cluster, first)[-3000:]
        saved = [c.name for c in checkpoint.complete_checkpoints(out)]
        killed_at = time.monotonic()
        cluster["worker"].raylet().kill()  # SIGKILL: the node and every process on it gone at once
        first_status = finished(cluster, first)
        stopped_after_s = time.monotonic() - killed_at
        first_logs = job_logs(cluster, first)
        intact = {c.name: checkpoint.read_state(c) for c in checkpoint.complete_checkpoints(out)
                  if list((c / "learner").iterdir())}  # before the resume writes (and prunes) more
        cluster["worker"].stop()
        cluster["worker"] = cluster["start_worker"]()
        second = submit(cluster, out, tmp / "runtime_env.yaml", quick_run.one_engine_args)
        second_status = finished(cluster, second)
        second_logs = job_logs(cluster, second)
    finally:
        stop_watching.set()
        watcher.join()
    return dict(out=out, saved=saved, first=(first_status, first_logs), stopped_after_s=stopped_after_s, intact=intact,
                second=(second_status, second_logs), watch=watch)


def test_losing_the_engine_node_stops_the_run_with_one_error_and_its_checkpoint_intact(runs):
    status, logs = runs["first"]
    assert status == "FAILED", logs[-3000:]
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, logs[-3000:]
    assert re.match(r"error: rollout engine 0 is gone and no live node can take it: placement\.engines: 1 engine\(s\) "
                    r"of \{CPU: 1\} each on nodes labelled \{polaris-role: rollout\}: 0 node\(s\) match, room for 0; "
                    r"the run stops: the last complete checkpoint is .*step_\d{6}; run the same command to resume",
                    errors[0]), errors[0]
    assert "Traceback" not in logs
    print(f"the run stopped {runs['stopped_after_s']:.1f} s after the raylet was killed")
    named = Path(re.search(r"checkpoint is (\S+);", errors[0]).group(1))
    # the newest complete checkpoint when the job ended, at least the one seen before the kill, whole
    assert named.name == max(runs["intact"]) >= runs["saved"][-1], (named, runs["intact"])
    assert runs["intact"][named.name]["steps_done"] == int(named.name.removeprefix("step_"))


def test_the_same_command_resumes_on_the_restarted_node_and_completes(runs):
    status, logs = runs["second"]
    assert status == "SUCCEEDED", logs[-3000:]
    assert "resume: from" in logs and re.search(r"^done: metrics in ", logs, re.MULTILINE), logs[-3000:]
    rows = metrics(runs["out"])
    assert sorted({r["step"] for r in rows}) == [0, 1, 2]
    assert (runs["out"] / "hf_model" / "model.safetensors").exists()


def test_the_roles_ran_on_their_labelled_nodes_and_the_weight_group_spanned_them(runs):
    rows = metrics(runs["out"])
    assert rows and all(r["node/learner-0"] != r["node/rollout-0"] for r in rows)
    # the engine node was replaced between the jobs: a new node id, the learner's unchanged
    assert len({r["node/rollout-0"] for r in rows}) == 2 and len({r["node/learner-0"] for r in rows}) == 1
    # every step sampled from the update before it, sent over the weight group across the two nodes
    assert all(r["weight_version"] == r["step"] for r in rows)
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows), [r["rollout/logprob_diff"] for r in rows]


def test_nothing_listens_or_connects_beyond_loopback(runs):
    watch = runs["watch"]
    names = " ".join(name for _, name in watch.listening.values())
    assert watch.polls >= 10 and "gcs_server" in names and "raylet" in names and "LearnerWorker" in names, \
        watch.listing()
    assert not watch.exposed(), "\n".join(watch.exposed()) + "\nall:\n" + watch.listing()
    print(f"{len(watch.listening)} listening sockets over {watch.polls} polls, all on loopback")
