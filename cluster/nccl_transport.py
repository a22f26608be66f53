"""The GPU weight transport: vLLM's PyNcclCommunicator over a group formed on our own TCP store.

Imported only when weight_sync.backend resolves to nccl (cluster/transport.py make_transport):
it needs CUDA and vLLM's GPU build, and this machine kind has neither, so what runs here is the
pure part (shared_gpus) and the refusals; the transfer itself is checked on a GPU machine
(bench/gpu_check.sh).
"""
from __future__ import annotations

import socket
import time
from collections.abc import Callable

import torch

from cluster.netutil import bound_tcp_store
from cluster.transport import BucketTransport
from conf.errors import WeightSyncError


def shared_gpus(gpus: list[str | None]) -> list[list[int]]:
    """Groups of ranks (each of 2 or more) whose GPU identity is equal; None means unknown."""
    ranks: dict[str, list[int]] = {}
    for rank, gpu in enumerate(gpus):
        if gpu is not None:
            ranks.setdefault(gpu, []).append(rank)
    return [r for r in ranks.values() if len(r) > 1]


def join_gpu_group(host: str, port: int, rank: int, world_size: int, *, timeout_s: float,
                   gpu: str | None, where: str = "weight group"):
    """vLLM StatelessProcessGroup on our bound store; every rank learns every rank's GPU.

    StatelessProcessGroup.create builds its own TCPStore (it binds a listen socket to host, but
    with no say over libuv or timeouts of ours); the group is a plain dataclass over any store,
    so it is built from bound_tcp_store directly. The all-gather of GPU identities doubles as
    the join barrier (bounded by `timeout_s`). Two ranks of one NCCL communicator on one GPU
    would hang or fail inside NCCL: every rank raises the same WeightSyncError before that.
    """
    from vllm.distributed.utils import StatelessProcessGroup

    try:
        store = bound_tcp_store(host, port, is_master=rank == 0, timeout_s=timeout_s)
        group = StatelessProcessGroup(rank=rank, world_size=world_size, store=store)
        gpus = group.all_gather_obj(gpu)
        group.barrier(timeout=timeout_s)  # rank 0 (the store) stays until every rank has read every identity
    except (RuntimeError, OSError) as e:
        raise WeightSyncError(f"{where}: could not form the group within {timeout_s}s "
                              f"(are all {world_size} ranks started with this port?): {e}") from e
    clash = shared_gpus(gpus)
    if clash:
        raise WeightSyncError(f"{where}: ranks {clash} share one GPU ({gpus[clash[0][0]]}); NCCL needs one GPU "
                              f"per rank: place the learner and each engine worker on different GPUs")
    return group


class NcclTransport(BucketTransport):
    """GPU transport: vLLM's PyNcclCommunicator over a StatelessProcessGroup on our bound store.

    Assumes one GPU per rank: the learner's rank 0 and each engine worker (engines x TP ranks)
    each own a distinct GPU; ranks that share one are refused at join (detected by GPU UUID).
    `device` defaults to the current CUDA device (the one DeepSpeed / the vLLM worker set).
    NCCL kernels have no timeout of their own: a peer that died or stopped taking part leaves a
    broadcast spinning on the GPU forever. So every broadcast records a CUDA event behind it and
    its wait polls that event for at most `timeout_s`; past it the communicator is aborted
    (ncclCommAbort, which ends the stuck kernel), and the wait raises. `timeout_s` also bounds the
    join. The default torch.distributed group is never touched.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, bucket_mb: float = 256.0,
                 timeout_s: float = 300.0, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(host, port, rank, world_size, bucket_mb=bucket_mb, dtype=dtype, timeout_s=timeout_s)
        self._comm, self._store = None, None
        if not torch.cuda.is_available():
            raise WeightSyncError(f"{self._where}: the NCCL transport needs a CUDA GPU and none is visible; "
                                  f"use backend 'gloo' on CPU")
        self.device = torch.device("cuda" if device is None else device)
        if self.device.type != "cuda":
            raise WeightSyncError(f"{self._where}: the NCCL transport needs a CUDA device, got {device!r}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        try:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.utils.nccl import unpinned_nccl_env
        except ImportError as e:
            raise WeightSyncError(f"{self._where}: the NCCL transport needs vLLM (GPU build): {e}") from e
        uuid = getattr(torch.cuda.get_device_properties(self.device), "uuid", None)
        gpu = f"{socket.gethostname()}/{uuid}" if uuid is not None else None
        group = join_gpu_group(host, port, rank, world_size, timeout_s=timeout_s, gpu=gpu, where=self._where)
        self._store = group.store
        try:
            with unpinned_nccl_env():  # as vLLM's own weight transfer: a shared communicator without vLLM's NCCL pins
                self._comm = PyNcclCommunicator(group, device=self.device)
        except RuntimeError as e:
            raise WeightSyncError(f"{self._where}: NCCL communicator init failed: {e}") from e
        if self._comm.disabled:  # vLLM disables it silently when libnccl is missing or VLLM_DISABLE_PYNCCL
            raise WeightSyncError(f"{self._where}: vLLM could not load NCCL (VLLM_NCCL_SO_PATH, VLLM_DISABLE_PYNCCL)")

    def _start_broadcast(self, buf: torch.Tensor) -> Callable[[], None]:
        if self._comm is None:
            raise WeightSyncError(f"{self._where}: transport is closed")
        # explicit stream: the buffers are written and read on torch's current stream
        stream = torch.cuda.current_stream(self.device)
        self._comm.broadcast(buf, src=0, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        return lambda: self._wait(done)

    def _wait(self, done: torch.cuda.Event) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                self.close()  # aborts the communicator: the stuck kernel ends, later work on the stream runs
                raise RuntimeError(f"NCCL broadcast not done after {self.timeout_s:g}s; communicator aborted")
            time.sleep(0.0005)

    def close(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
        self._comm, self._store = None, None


