"""Weight broadcast over gloo: 1 sender + receivers as plain subprocesses of this file (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.netutil import free_port
from cluster.nccl_transport import shared_gpus
from cluster.transport import GlooTransport, WeightSyncError, make_transport, plan_buckets, spec_of

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
BUCKET_MB = 256 / 2**20  # 256 bytes: forces several buckets on the small state below


def state(step: int) -> dict[str, torch.Tensor]:
    """Mixed dtypes in runs: fp32, fp32, bf16, bf16, int64 buffer, fp32 (bytes 512/132/64/10/96/84)."""
    g = torch.Generator().manual_seed(step)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layer.w": torch.randn(33, generator=g),
        "norm.weight": torch.randn(8, 4, generator=g).bfloat16(),
        "norm.bias": torch.randn(5, generator=g).bfloat16(),
        "pos.ids": torch.arange(12) * step,
        "head.weight": torch.randn(3, 7, generator=g),
    }


def enc(t: torch.Tensor) -> list:
    return [str(t.dtype), list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes().hex()]


def expected(step: int, dtype: torch.dtype | None = None) -> dict[str, list]:
    return {n: enc(t.to(dtype) if dtype and t.is_floating_point() else t) for n, t in state(step).items()}


def listening() -> list[list]:
    import psutil
    return [[c.laddr.ip, c.laddr.port] for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"]


# ---- scenarios, run in child processes: (rank, ports, dtype) -> JSON-able result -------------

def _transport(rank: int, port: int, world: int, dtype: str | None = None, timeout_s: float = 60) -> GlooTransport:
    return GlooTransport(HOST, port, rank, world, bucket_mb=BUCKET_MB, timeout_s=timeout_s,
                         dtype=getattr(torch, dtype) if dtype else None)


def _receive(t: GlooTransport, version: int) -> dict:
    try:
        return {"tensors": {n: enc(x) for n, x in t.receive(version)}}
    except WeightSyncError as e:
        return {"error": type(e).__name__, "msg": str(e)}


def scenario_sync(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    import torch.distributed as dist

    import cluster.transport as T
    from cluster.netutil import bound_tcp_store
    if rank > 0:
        t = _transport(rank, ports[0], world, dtype)
        out = {"v1": _receive(t, 1), "v2": _receive(t, 2), "listen": listening()}
        t.close()
        return out
    # a default group exists (as DeepSpeed's would) and must be left alone
    dist.init_process_group("gloo", store=bound_tcp_store(HOST, ports[1], is_master=True, timeout_s=60),
                            rank=0, world_size=1)
    encodes, orig = [], T._encode
    T._encode = lambda b: (encodes.append(1), orig(b))[1]
    t = _transport(0, ports[0], world)
    t.send(state(1).items(), 1)
    t.send(reversed(list(state(2).items())), 2)  # order may differ: metadata order wins
    x = torch.ones(1)
    dist.all_reduce(x)
    out = {"encodes": len(encodes), "buckets": len(t._buckets or []), "listen": listening(),
           "default_world": dist.get_world_size(), "allreduce": x.item()}
    t.close()
    dist.destroy_process_group()
    return out


def scenario_version(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    t = _transport(rank, ports[0], world)
    if rank == 0:
        t.send(state(1).items(), 1)
        t.send(state(2).items(), 2)
        return {}
    first = 1 if rank == 1 else 5  # rank 2 expects the wrong version
    return {"first": _receive(t, first), "second": _receive(t, 2)}


def scenario_abort(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    t = _transport(rank, ports[0], world)
    if rank > 0:
        return {"v1": _receive(t, 1), "v2": _receive(t, 2), "v3": _receive(t, 3)}
    t.send(state(1).items(), 1)
    renamed = {("lm_head.weight" if n == "head.weight" else n): x for n, x in state(2).items()}
    try:
        t.send(renamed.items(), 2)
        err = None
    except WeightSyncError as e:
        err = str(e)
    t.send(state(3).items(), 3)
    return {"error": err}


def scenario_early_stop(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    t = _transport(rank, ports[0], world)
    if rank == 0:
        t.send(state(1).items(), 1)
        t.send(state(2).items(), 2)
        return {}
    stream = t.receive(1)
    first = next(stream)[0]
    stream.close()  # the engine gives up mid-send: the rest of version 1 is drained
    return {"first": first, "v2": _receive(t, 2)}


def scenario_reform(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    t = _transport(rank, ports[0], world)
    first = t.send(state(1).items(), 1) if rank == 0 else _receive(t, 1)
    t.close()
    time.sleep(0.2)
    after_close = listening()
    t = _transport(rank, ports[1], world)
    second = t.send(state(2).items(), 2) if rank == 0 else _receive(t, 2)
    t.close()
    return {"first": first, "second": second, "after_close": after_close}


def scenario_timeout(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    import datetime
    t = _transport(rank, ports[0], world, timeout_s=3)
    assert t._store is not None
    if rank == 0:  # never sends; stays in the group until the receiver has given up
        t._store.wait(["gave_up"], datetime.timedelta(seconds=60))
        return {}
    start = time.monotonic()
    out = _receive(t, 1)
    t._store.set("gave_up", "1")
    return {**out, "waited": time.monotonic() - start}


def scenario_checksums(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    """Rank 2's link flips one bit of bucket 2 (the corrupt_bucket fault's hook)."""
    from cluster.sync_faults import SyncFault, bucket_hook
    t = _transport(rank, ports[0], world)
    if rank == 0:
        return {"sums": list(t.send(state(1).items(), 1))}
    hook = bucket_hook(SyncFault("corrupt_bucket", after_bucket=2)) if rank == 2 else None
    got = {n: enc(x) for n, x in t.receive(1, on_bucket=hook)}
    return {"sums": list(t.received_checksums), "intact": got == expected(1)}


def scenario_streamed(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    """The learner's way under ZeRO-3: a layout first, then each tensor handed over and taken
    back (zeroed, as a re-partitioned parameter) before the next; then a stream out of order."""
    t = _transport(rank, ports[0], world)
    if rank > 0:
        return {"v1": _receive(t, 1), "v2": _receive(t, 2)}
    layout = spec_of(state(1).items())

    def handed_over(step):
        for name, tensor in state(step).items():
            gathered = tensor.clone()
            yield name, gathered
            gathered.zero_()  # gone once the next one is asked for
    sums = t.send(handed_over(1), 1, layout=layout)
    try:
        t.send(reversed(list(handed_over(2))), 2, layout=layout[::-1])
        error = None
    except WeightSyncError as e:
        error = str(e)
    return {"sums": len(sums), "error": error}


def scenario_stops_mid_send(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    """Rank 1 refuses the rest of the send after bucket 1 (or dies there, dtype="dies"), rank 2
    takes all of it: the sender and rank 2 return within the 3 s deadline, whatever happens."""
    import datetime

    from cluster.sync_faults import SyncFault, bucket_hook
    t = _transport(rank, ports[0], world, timeout_s=3)
    assert t._store is not None
    start = time.monotonic()
    if rank == 0:
        try:
            t.send(state(1).items(), 1)
            out = {"error": None}
        except WeightSyncError as e:
            out = {"error": str(e)}
        return {**out, "waited": time.monotonic() - start}
    if rank == 1:
        print("RESULT {}", flush=True)  # what a dying rank leaves
        kind = "engine_dies" if dtype == "dies" else "engine_refuses"
        out = _receive_with(t, 1, bucket_hook(SyncFault(kind, after_bucket=1)))
        t._store.wait(["done"], datetime.timedelta(seconds=60))  # alive, no longer taking part
        return out
    out = _receive(t, 1)
    t._store.set("done", "1")
    return {**out, "waited": time.monotonic() - start}


def _receive_with(t: GlooTransport, version: int, hook) -> dict:
    try:
        return {"tensors": {n: enc(x) for n, x in t.receive(version, on_bucket=hook)}}
    except WeightSyncError as e:
        return {"error": type(e).__name__, "msg": str(e)}


def scenario_gpu_group(rank: int, ports: list[int], world: int, dtype: str | None) -> dict:
    """NCCL's rendezvous half (vLLM StatelessProcessGroup on our bound store), no GPU needed."""
    from cluster.nccl_transport import join_gpu_group
    group = join_gpu_group(HOST, ports[0], rank, world, timeout_s=30, gpu=f"node/GPU-{rank}")
    token = group.broadcast_obj("from-0" if rank == 0 else None, src=0)  # as PyNccl sends its unique id
    out = {"token": token, "world": group.world_size, "listen": listening()}
    try:  # every rank claims the same GPU: all must refuse, none may be left waiting
        join_gpu_group(HOST, ports[1], rank, world, timeout_s=30, gpu="node/GPU-0")
        out["clash"] = None
    except WeightSyncError as e:
        out["clash"] = str(e)
    return out


def run_group(scenario: str, world: int, ports: list[int], dtypes: dict[int, str] | None = None,
              sender_delay: float = 1.5, timeout: float = 90, may_die: tuple[int, ...] = ()) -> list[dict]:
    """Start the receivers, then (after sender_delay) the sender; return each rank's result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(rank: int) -> subprocess.Popen:
        arg = json.dumps([scenario, rank, ports, world, (dtypes or {}).get(rank)])
        return subprocess.Popen([sys.executable, __file__, arg], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = {r: start(r) for r in range(1, world)}
    time.sleep(sender_delay)
    procs[0] = start(0)
    deadline, results = time.monotonic() + timeout, {}
    try:
        for r, p in sorted(procs.items()):
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{scenario}: rank {r} hung for {timeout}s")
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            assert (p.returncode == 0 or r in may_die) and lines, f"{scenario} rank {r} rc={p.returncode}\n{err[-3000:]}"
            results[r] = json.loads(lines[-1][len("RESULT "):])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return [results[r] for r in range(world)]


# ---- tests -------------------------------------------------------------------------------------

def test_plan_buckets_splits_by_dtype_run_and_size():
    plan = plan_buckets(spec_of(state(1).items()), BUCKET_MB)
    layout = [(b.dtype, [(e.name, e.offset, e.numel) for e in b.entries]) for b in plan]
    assert layout == [
        (torch.float32, [("embed.weight", 0, 128)]),  # 512 B > 256 B: alone
        (torch.float32, [("layer.w", 0, 33)]),  # would overflow the first bucket
        (torch.bfloat16, [("norm.weight", 0, 32), ("norm.bias", 32, 5)]),  # 74 B share one
        (torch.int64, [("pos.ids", 0, 12)]),
        (torch.float32, [("head.weight", 0, 21)]),
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would start joining a group")
def test_factory_picks_gloo_and_names_what_is_missing():
    with pytest.raises(WeightSyncError, match="NCCL transport needs a CUDA GPU.*use backend 'gloo'"):
        make_transport("nccl", HOST, 1, 0, 2)  # NcclTransport's own check, before any vLLM import
    with pytest.raises(WeightSyncError, match="valid: 'gloo'"):
        make_transport("mpi", HOST, 1, 0, 2)


@pytest.mark.timeout(120)
def test_receivers_first_get_bit_identical_and_cast_weights_twice():
    ports = [free_port(HOST), free_port(HOST)]
    sender, plain, cast = run_group("sync", 3, ports, dtypes={2: "bfloat16"})
    assert sender["buckets"] == 5
    assert sender["encodes"] == 1  # metadata went out once, the second send reused it
    assert sender["default_world"] == 1 and sender["allreduce"] == 1.0  # default group untouched
    for v in (1, 2):
        assert plain[f"v{v}"]["tensors"] == expected(v)
        assert list(plain[f"v{v}"]["tensors"]) == list(state(v))  # metadata order, streamed
        assert cast[f"v{v}"]["tensors"] == expected(v, torch.bfloat16)
    assert cast["v1"]["tensors"]["pos.ids"][0] == "torch.int64"  # integer buffers never cast


@pytest.mark.timeout(120)
def test_store_and_gloo_listen_only_on_loopback():
    ports = [free_port(HOST), free_port(HOST)]
    results = run_group("sync", 2, ports)
    assert [HOST, ports[0]] in results[0]["listen"]  # the store itself
    for r in results:
        assert r["listen"] and all(ip == HOST for ip, _ in r["listen"]), r["listen"]


@pytest.mark.timeout(120)
def test_wrong_version_raises_after_draining_and_group_goes_on():
    _, good, wrong = run_group("version", 3, [free_port(HOST)])
    assert good["first"]["tensors"] == expected(1)
    assert wrong["first"]["error"] == "WeightSyncError"
    assert "expected weight version 5, sender sent 1" in wrong["first"]["msg"]
    assert good["second"]["tensors"] == wrong["second"]["tensors"] == expected(2)


@pytest.mark.timeout(120)
def test_receiver_stopping_early_drains_the_send():
    _, r1 = run_group("early_stop", 2, [free_port(HOST)])
    assert r1["first"] == "embed.weight"
    assert r1["v2"]["tensors"] == expected(2)


@pytest.mark.timeout(120)
def test_changed_tensor_names_abort_everyone_then_group_goes_on():
    sender, r1, r2 = run_group("abort", 3, [free_port(HOST)])
    assert "names changed" in sender["error"] and "lm_head.weight" in sender["error"]
    for r in (r1, r2):
        assert r["v1"]["tensors"] == expected(1)
        assert r["v2"]["error"] == "WeightSyncError" and "sender aborted version 2" in r["v2"]["msg"]
        assert r["v3"]["tensors"] == expected(3)


@pytest.mark.timeout(120)
def test_group_reforms_on_a_new_port_after_close():
    ports = [free_port(HOST), free_port(HOST)]
    sender, r1, r2 = run_group("reform", 3, ports)
    assert all(port != ports[0] for _, port in sender["after_close"])  # old store socket is gone
    for r in (r1, r2):
        assert r["first"]["tensors"] == expected(1)
        assert r["second"]["tensors"] == expected(2)  # fresh group: metadata sent again


@pytest.mark.timeout(120)
def test_receiver_times_out_instead_of_hanging_when_nothing_is_sent():
    _, r1 = run_group("timeout", 2, [free_port(HOST)], sender_delay=0)
    assert r1["error"] == "WeightSyncError" and "ran past weight_sync.timeout_s=3s" in r1["msg"]
    assert 2 < r1["waited"] < 20  # gloo's 3 s timeout, not the sender leaving


@pytest.mark.timeout(120)
def test_a_streamed_send_packs_each_tensor_as_it_comes_and_refuses_another_order():
    sender, receiver = run_group("streamed", 2, [free_port(HOST)])
    assert sender["sums"] == 5 and receiver["v1"]["tensors"] == expected(1)
    assert "order of the first send" in sender["error"]
    assert "sender aborted version 2" in receiver["v2"]["msg"]


@pytest.mark.timeout(120)
def test_both_sides_checksum_every_bucket_and_a_flipped_bit_shows_in_its_bucket_only():
    sender, plain, flipped = run_group("checksums", 3, [free_port(HOST)])
    assert len(sender["sums"]) == 5 and plain["sums"] == sender["sums"] and plain["intact"]
    assert not flipped["intact"]  # the engine would have loaded the flipped bit
    assert [i for i, (a, b) in enumerate(zip(sender["sums"], flipped["sums"])) if a != b] == [2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["refuses", "dies"])
def test_a_rank_that_stops_mid_send_costs_the_others_at_most_the_deadline(fault):
    sender, stopped, other = run_group("stops_mid_send", 3, [free_port(HOST)], dtypes={1: fault}, may_die=(1,))
    if fault == "refuses":
        assert stopped["error"] == "WeightSyncError" and "after bucket 1 (injected fault)" in stopped["msg"]
    # gloo buffers small sends, so the others may even finish; either way none waits past 3 s + slack
    assert sender["waited"] < 8 and other["waited"] < 8, (sender, other)
    assert sender["error"] is None or "ran past weight_sync.timeout_s=3s" in sender["error"]


def test_shared_gpus_groups_ranks_on_one_gpu_and_ignores_unknown():
    assert shared_gpus(["a/GPU-1", "a/GPU-2", "b/GPU-3"]) == []
    assert shared_gpus(["a/GPU-1", None, "a/GPU-2", None, "a/GPU-1"]) == [[0, 4]]
    assert shared_gpus(["x", "y", "x", "y"]) == [[0, 2], [1, 3]]


@pytest.mark.timeout(120)
def test_nccl_rendezvous_forms_on_a_bound_store_and_refuses_a_shared_gpu():
    ports = [free_port(HOST), free_port(HOST)]
    results = run_group("gpu_group", 2, ports, sender_delay=0.5)
    for r in results:
        assert r["token"] == "from-0" and r["world"] == 2
        assert all(ip == HOST for ip, _ in r["listen"]), r["listen"]  # no NCCL sockets yet: only the store
        assert "ranks [[0, 1]] share one GPU (node/GPU-0)" in r["clash"]
    assert [HOST, ports[0]] in results[0]["listen"]


if __name__ == "__main__":
    name, rank, ports, world, dtype = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(globals()[f"scenario_{name}"](rank, ports, world, dtype)), flush=True)


def test_an_nccl_broadcast_past_its_deadline_aborts_the_communicator_and_raises():
    """NcclTransport's wait, without a GPU: a broadcast whose CUDA event never completes (a peer
    that died or stopped taking part) raises WeightSyncError at the deadline, after aborting the
    communicator (vLLM's destroy: ncclCommAbort), and the transport is closed for good; one that
    completes returns at once."""
    from cluster.nccl_transport import NcclTransport

    class Event:
        def __init__(self, done_after: float):
            self.done_at = time.monotonic() + done_after

        def query(self):
            return time.monotonic() >= self.done_at

    class Comm:
        destroyed = 0

        def destroy(self):
            Comm.destroyed += 1

    t = object.__new__(NcclTransport)  # the GPU half of __init__ cannot run here
    t._where, t.timeout_s, t._comm, t._store = "weight group test rank 0/2", 0.5, Comm(), None
    stuck = [Event(0.1), Event(3600)]
    t._start_broadcast = lambda buf: (lambda event=stuck.pop(0): t._wait(event))  # enqueue: no CUDA here
    t._bcast(torch.zeros(4, dtype=torch.uint8))
    assert Comm.destroyed == 0
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="ran past weight_sync.timeout_s=0.5s .* communicator aborted"):
        t._bcast(torch.zeros(4, dtype=torch.uint8))
    assert 0.5 <= time.monotonic() - start < 2 and Comm.destroyed == 1 and t._comm is None
