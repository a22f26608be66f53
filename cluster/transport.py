"""Weight broadcast from learner rank 0 to the rollout engines, behind one interface.

Two transports share one wire protocol (BucketTransport) and differ only in how one buffer is
broadcast: GlooTransport (CPU, torch gloo) and NcclTransport (GPU, vLLM's PyNcclCommunicator).

Wire protocol of one send (every message is a broadcast from rank 0):
  1. header: int64 [status, version, payload_len];
  2. if payload_len > 0: a uint8 payload (JSON metadata on the first send; the reason on abort);
  3. if status is OK: one flat buffer per bucket, in metadata order.
Metadata (names, shapes, dtypes, bucket layout) travels once, with the first send. Receivers
always take part in every broadcast the header announces, even when they are going to raise
(wrong version), so the group is never left half way through a send.
"""

from __future__ import annotations

import abc
import datetime
import json
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster.netutil import bound_tcp_store
from conf.errors import PolarisError

_OK, _ABORT = 0, 1


class WeightSyncError(PolarisError):
    """The weight broadcast group disagrees (version, tensor set) or a transfer failed."""


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements of the bucket's dtype
    numel: int


@dataclass(frozen=True)
class _Bucket:
    dtype: torch.dtype
    entries: tuple[_Entry, ...]

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)


def plan_buckets(named: list[tuple[str, torch.Tensor]], bucket_mb: float) -> list[_Bucket]:
    """Consecutive tensors of one dtype share a bucket up to bucket_mb; a larger tensor travels alone."""
    limit = bucket_mb * 2**20
    buckets: list[_Bucket] = []
    run: list[_Entry] = []
    dtype, nbytes = None, 0
    for name, t in named:
        size = t.numel() * t.element_size()
        if run and (t.dtype != dtype or nbytes + size > limit):
            buckets.append(_Bucket(dtype, tuple(run)))  # type: ignore[arg-type]
            run, nbytes = [], 0
        offset = run[-1].offset + run[-1].numel if run else 0
        run.append(_Entry(name, tuple(t.shape), offset, t.numel()))
        dtype, nbytes = t.dtype, nbytes + size
    if run:
        buckets.append(_Bucket(dtype, tuple(run)))  # type: ignore[arg-type]
    return buckets


def _encode(buckets: list[_Bucket]) -> bytes:
    return json.dumps([[str(b.dtype).removeprefix("torch."), [[e.name, list(e.shape), e.offset, e.numel]
                                                            for e in b.entries]] for b in buckets]).encode()


def _decode(raw: bytes) -> list[_Bucket]:
    return [_Bucket(getattr(torch, dt), tuple(_Entry(n, tuple(s), o, k) for n, s, o, k in entries))
            for dt, entries in json.loads(raw)]


def _mismatch(buckets: list[_Bucket], named: list[tuple[str, torch.Tensor]]) -> str:
    want = {e.name: (b.dtype, e.shape) for b in buckets for e in b.entries}
    got = {n: (t.dtype, tuple(t.shape)) for n, t in named}
    if len(got) != len(named):
        return "duplicate tensor names in send"
    if want.keys() != got.keys():
        return (f"tensor names changed since the first send: missing {sorted(want.keys() - got.keys())[:5]}, "
                f"new {sorted(got.keys() - want.keys())[:5]}")
    bad = [f"{n}: {want[n]} -> {got[n]}" for n in want if want[n] != got[n]]
    return f"tensor dtype/shape changed since the first send: {bad[:5]}" if bad else ""


class WeightTransport(abc.ABC):
    """Rank 0 sends named tensors; every other rank receives them, bucket by bucket."""

    @abc.abstractmethod
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    @abc.abstractmethod
    def receive(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields tensors as their bucket arrives; consume it to the end (closing it early drains)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class BucketTransport(WeightTransport):
    """The wire protocol above, over one primitive: broadcast a byte buffer from rank 0.

    Subclasses form their group in the constructor, set `device` (where buffers live) and
    implement `_broadcast_bytes` and `close`. Tensors travel as bytes (exact for every dtype);
    `dtype` casts floating tensors on arrival (the engine dtype).
    """

    device = torch.device("cpu")

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, bucket_mb: float,
                 dtype: torch.dtype | None) -> None:
        if not 0 <= rank < world_size or world_size < 2:
            raise WeightSyncError(f"weight group needs 0 <= rank < world_size and world_size >= 2, "
                                  f"got rank={rank} world_size={world_size}")
        self.rank, self.world_size, self.bucket_mb, self.dtype = rank, world_size, bucket_mb, dtype
        self._where = f"weight group {host}:{port} rank {rank}/{world_size}"
        self._buckets: list[_Bucket] | None = None
        self._send_buffers: list[torch.Tensor] | None = None

    @abc.abstractmethod
    def _broadcast_bytes(self, buf: torch.Tensor) -> None:
        """Broadcast `buf` (contiguous uint8 on `device`) from rank 0 into every rank's `buf`.
        Raises RuntimeError when the transfer fails, WeightSyncError when the transport is closed."""

    def _start_broadcast(self, buf: torch.Tensor) -> Callable[[], None]:
        """Begin broadcasting `buf`; returns the wait. Default: done at once (stream-ordered
        transports such as NCCL need no more); gloo overrides it to overlap transfers."""
        self._broadcast_bytes(buf)
        return lambda: None

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        return self._begin(t)()

    def _begin(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start broadcasting tensor t; the returned call waits and gives t back."""
        try:
            wait = self._start_broadcast(t.view(torch.uint8) if t.dtype != torch.uint8 else t)
        except RuntimeError as e:
            raise self._failed(e) from e

        def finish() -> torch.Tensor:
            try:
                wait()
            except RuntimeError as e:
                raise self._failed(e) from e
            return t

        return finish

    def _failed(self, e: Exception) -> WeightSyncError:
        return WeightSyncError(f"{self._where}: broadcast failed or timed out; re-form the group: {e}")

    def _header(self, status: int = 0, version: int = 0, payload: bytes = b"") -> tuple[int, int, bytes]:
        head = self._bcast(torch.tensor([status, version, len(payload)], dtype=torch.int64, device=self.device))
        status, version, n = head.tolist()
        if not n:
            return status, version, b""
        buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device) if payload
               else torch.empty(n, dtype=torch.uint8, device=self.device))
        return status, version, bytes(self._bcast(buf).cpu().numpy())

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self.rank != 0:
            raise WeightSyncError(f"{self._where}: only rank 0 sends")
        named = [(n, t.detach()) for n, t in named_tensors]
        first = self._buckets is None
        buckets = plan_buckets(named, self.bucket_mb) if self._buckets is None else self._buckets
        reason = _mismatch(buckets, named)
        if reason:  # tell receivers before raising, so they raise too instead of waiting
            self._header(_ABORT, version, reason.encode())
            raise WeightSyncError(f"{self._where}: {reason}")
        self._header(_OK, version, _encode(buckets) if first else b"")
        self._buckets, tensors = buckets, dict(named)
        # one bucket travels while the next is packed, into two buffers kept across sends
        # (fresh ones would page-fault the whole model in again on every update)
        size = max(b.numel * b.dtype.itemsize for b in buckets)
        if self._send_buffers is None or self._send_buffers[0].numel() < size:
            self._send_buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        in_flight: Callable[[], torch.Tensor] | None = None
        for i, b in enumerate(buckets):
            flat = self._send_buffers[i % 2][:b.numel * b.dtype.itemsize].view(b.dtype)
            torch.cat([tensors[e.name].reshape(-1).to(self.device) for e in b.entries], out=flat)
            started = self._begin(flat)
            if in_flight is not None:
                in_flight()
            in_flight = started
        if in_flight is not None:
            in_flight()

    def receive(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        if self.rank == 0:
            raise WeightSyncError(f"{self._where}: rank 0 sends, it does not receive")
        status, sent_version, payload = self._header()
        if status == _ABORT:
            raise WeightSyncError(f"{self._where}: sender aborted version {sent_version}: {payload.decode()}")
        if payload:
            self._buckets = _decode(payload)
        if self._buckets is None:
            raise WeightSyncError(f"{self._where}: no metadata received (joined after the first send?)")
        pending = list(self._buckets)
        if sent_version != version:
            for b in pending:  # drain, so sender and other receivers finish this send
                self._bcast(torch.empty(b.numel, dtype=b.dtype, device=self.device))
            raise WeightSyncError(f"{self._where}: expected weight version {version}, sender sent {sent_version}")
        if not pending:
            return
        # one bucket ahead: the next bucket arrives while the consumer loads the current one
        in_flight: Callable[[], torch.Tensor] | None = self._begin(torch.empty(pending[0].numel, dtype=pending[0].dtype, device=self.device))
        started = 1
        try:
            for b in pending:
                assert in_flight is not None  # started before the loop or in the previous round
                flat = in_flight()
                in_flight = None
                if started < len(pending):
                    nxt = pending[started]
                    in_flight = self._begin(torch.empty(nxt.numel, dtype=nxt.dtype, device=self.device))
                    started += 1
                for e in b.entries:
                    t = flat[e.offset:e.offset + e.numel].view(e.shape)
                    yield e.name, (t.to(self.dtype) if self.dtype and t.is_floating_point() else t)
        except GeneratorExit:  # consumer stopped early: finish the send for everyone else
            if in_flight is not None:
                in_flight()
            for b in pending[started:]:
                self._bcast(torch.empty(b.numel, dtype=b.dtype, device=self.device))
            raise


class GlooTransport(BucketTransport):
    """CPU transport: a standalone gloo group on its own TCPStore, both bound to `host`.

    Never touches the default torch.distributed group (the learner's DeepSpeed one). The
    constructor blocks until all `world_size` ranks joined (at most `timeout_s`, which also
    bounds every broadcast); receivers may join before the sender.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, bucket_mb: float = 256.0,
                 timeout_s: float = 300.0, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(host, port, rank, world_size, bucket_mb=bucket_mb, dtype=dtype)
        if device is not None and torch.device(device).type != "cpu":
            raise WeightSyncError(f"{self._where}: the gloo transport keeps buffers on the CPU, got "
                                  f"device={device!r}; use backend 'nccl' for GPU engines")
        try:
            self._store: dist.TCPStore | None = bound_tcp_store(host, port, is_master=rank == 0,
                                                                 timeout_s=timeout_s)
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in torch's stubs
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]  # gloo listens on host only
            opts._timeout = datetime.timedelta(seconds=timeout_s)
            self._pg: dist.ProcessGroupGloo | None = dist.ProcessGroupGloo(self._store, rank, world_size, opts)
        except (RuntimeError, OSError) as e:
            raise WeightSyncError(f"{self._where}: could not form the group within {timeout_s}s "
                                  f"(are all {world_size} ranks started with this port?): {e}") from e

    def _broadcast_bytes(self, buf: torch.Tensor) -> None:
        self._start_broadcast(buf)()

    def _start_broadcast(self, buf: torch.Tensor) -> Callable[[], None]:
        if self._pg is None:
            raise WeightSyncError(f"{self._where}: transport is closed")
        return self._pg.broadcast([buf], dist.BroadcastOptions()).wait  # type: ignore[attr-defined]  # stub gap

    def close(self) -> None:
        if self._pg is not None:
            self._pg.shutdown()
        self._pg, self._store = None, None  # the master's store closes its listening socket


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
    `timeout_s` bounds the join only: NCCL broadcasts have no timeout, a peer that never joins a
    send blocks it. The default torch.distributed group is never touched. vLLM is imported here,
    not at module import, so this module imports on machines without CUDA or vLLM.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, bucket_mb: float = 256.0,
                 timeout_s: float = 300.0, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(host, port, rank, world_size, bucket_mb=bucket_mb, dtype=dtype)
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

    def _broadcast_bytes(self, buf: torch.Tensor) -> None:
        if self._comm is None:
            raise WeightSyncError(f"{self._where}: transport is closed")
        # explicit stream: the buffers are written and read on torch's current stream
        self._comm.broadcast(buf, src=0, stream=torch.cuda.current_stream(self.device))

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        super().send(named_tensors, version)
        torch.cuda.current_stream(self.device).synchronize()  # returned = this rank's part is done

    def receive(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield from super().receive(version)
        torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
        self._comm, self._store = None, None


def make_transport(backend: str, host: str, port: int, rank: int, world_size: int, *,
                   bucket_mb: float = 256.0, timeout_s: float = 300.0, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> WeightTransport:
    """The transport for `backend`: "gloo" (CPU engines) or "nccl" (GPU engines)."""
    transports = {"gloo": GlooTransport, "nccl": NcclTransport}
    if backend not in transports:
        raise WeightSyncError(f"unknown weight transport backend {backend!r}; valid: 'gloo', 'nccl'")
    return transports[backend](host, port, rank, world_size, bucket_mb=bucket_mb, timeout_s=timeout_s,
                               dtype=dtype, device=device)
