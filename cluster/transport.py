"""Weight broadcast from learner rank 0 to the rollout engines, behind one interface.

Two transports share one wire protocol (BucketTransport) and differ only in how one buffer is
broadcast: GlooTransport (CPU, torch gloo, here) and NcclTransport (GPU, vLLM's
PyNcclCommunicator, cluster/nccl_transport.py).

Wire protocol of one send (every message is a broadcast from rank 0):
  1. header: int64 [status, version, payload_len];
  2. if payload_len > 0: a uint8 payload (JSON metadata on the first send; the reason on abort);
  3. if status is OK: one flat buffer per bucket, in metadata order.
Metadata (names, shapes, dtypes, bucket layout) travels once, with the first send. Receivers
always take part in every broadcast the header announces, even when they are going to raise
(wrong version), so the group is never left half way through a send.

Deadlines: every broadcast, sent or received, waits at most `timeout_s`; past it the transport
raises WeightSyncError and is unusable (the group must be re-formed). Both sides checksum every
bucket (cluster/sync_verify.py): the sender what it packed, a receiver what arrived, before the
engine loads any of it.
"""

from __future__ import annotations

import abc
import datetime
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster.netutil import bound_tcp_store
from cluster.sync_verify import checksum
from conf.errors import WeightSyncError

_OK, _ABORT = 0, 1
BucketHook = Callable[[int, torch.Tensor], None]  # (bucket index, its flat buffer): cluster/sync_faults.py


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


Spec = tuple[str, tuple[int, ...], torch.dtype]  # what a tensor will be: name, shape, dtype


def spec_of(named: Iterable[tuple[str, torch.Tensor]]) -> list[Spec]:
    return [(n, tuple(t.shape), t.dtype) for n, t in named]


def plan_buckets(layout: list[Spec], bucket_mb: float) -> list[_Bucket]:
    """Consecutive tensors of one dtype share a bucket up to bucket_mb; a larger tensor travels alone."""
    limit = bucket_mb * 2**20
    buckets: list[_Bucket] = []
    run: list[_Entry] = []
    dtype, nbytes = None, 0
    for name, shape, t_dtype in layout:
        numel = math.prod(shape)
        size = numel * t_dtype.itemsize
        if run and (t_dtype != dtype or nbytes + size > limit):
            buckets.append(_Bucket(dtype, tuple(run)))  # type: ignore[arg-type]
            run, nbytes = [], 0
        offset = run[-1].offset + run[-1].numel if run else 0
        run.append(_Entry(name, tuple(shape), offset, numel))
        dtype, nbytes = t_dtype, nbytes + size
    if run:
        buckets.append(_Bucket(dtype, tuple(run)))  # type: ignore[arg-type]
    return buckets


def _encode(buckets: list[_Bucket]) -> bytes:
    return json.dumps([[str(b.dtype).removeprefix("torch."), [[e.name, list(e.shape), e.offset, e.numel]
                                                            for e in b.entries]] for b in buckets]).encode()


def _decode(raw: bytes) -> list[_Bucket]:
    return [_Bucket(getattr(torch, dt), tuple(_Entry(n, tuple(s), o, k) for n, s, o, k in entries))
            for dt, entries in json.loads(raw)]


def _mismatch(buckets: list[_Bucket], layout: list[Spec]) -> str:
    want = {e.name: (b.dtype, e.shape) for b in buckets for e in b.entries}
    got = {n: (dtype, tuple(shape)) for n, shape, dtype in layout}
    if len(got) != len(layout):
        return "duplicate tensor names in send"
    if want.keys() != got.keys():
        return (f"tensor names changed since the first send: missing {sorted(want.keys() - got.keys())[:5]}, "
                f"new {sorted(got.keys() - want.keys())[:5]}")
    bad = [f"{n}: {want[n]} -> {got[n]}" for n in want if want[n] != got[n]]
    return f"tensor dtype/shape changed since the first send: {bad[:5]}" if bad else ""


class WeightTransport(abc.ABC):
    """Rank 0 sends named tensors; every other rank receives them, bucket by bucket."""

    received_checksums: tuple[int, ...] = ()  # of the last receive, one per bucket

    @abc.abstractmethod
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             on_bucket: BucketHook | None = None, layout: list[Spec] | None = None) -> tuple[int, ...]:
        """Returns the checksum of each bucket sent. Without `layout` every tensor is taken first
        (any order). With it (name, shape, dtype of each tensor, in the order they come and the
        first send's order), each tensor is packed as it comes and may be freed once the next
        is asked for: only the bucket being packed and the one in flight are ever held."""

    @abc.abstractmethod
    def receive(self, version: int, on_bucket: BucketHook | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields tensors as their bucket arrives; consume it to the end (closing it early drains).
        Afterwards received_checksums holds each bucket's checksum, taken before it was yielded."""

    @abc.abstractmethod
    def close(self) -> None: ...


class BucketTransport(WeightTransport):
    """The wire protocol above, over one primitive: broadcast a byte buffer from rank 0.

    Subclasses form their group in the constructor, set `device` (where buffers live) and
    implement `_start_broadcast` and `close`. Tensors travel as bytes (exact for every dtype);
    `dtype` casts floating tensors on arrival (the engine dtype).
    """

    device = torch.device("cpu")

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, bucket_mb: float,
                 dtype: torch.dtype | None, timeout_s: float) -> None:
        if not 0 <= rank < world_size or world_size < 2:
            raise WeightSyncError(f"weight group needs 0 <= rank < world_size and world_size >= 2, "
                                  f"got rank={rank} world_size={world_size}")
        self.rank, self.world_size, self.bucket_mb, self.dtype = rank, world_size, bucket_mb, dtype
        self.timeout_s = timeout_s
        self._where = f"weight group {host}:{port} rank {rank}/{world_size}"
        self._buckets: list[_Bucket] | None = None
        self._send_buffers: list[torch.Tensor] | None = None

    @abc.abstractmethod
    def _start_broadcast(self, buf: torch.Tensor) -> Callable[[], None]:
        """Begin broadcasting `buf` (contiguous uint8 on `device`) from rank 0 into every rank's
        `buf`; returns the wait. The wait raises RuntimeError when the transfer failed or ran past
        timeout_s (the transport is unusable after); a closed transport raises WeightSyncError."""

    def _broadcast_bytes(self, buf: torch.Tensor) -> None:
        """Broadcast `buf` and wait for it (benchmarks: the floor of a send)."""
        self._start_broadcast(buf)()

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
        return WeightSyncError(f"{self._where}: broadcast failed or ran past weight_sync.timeout_s="
                               f"{self.timeout_s:g}s (a rank died or stopped taking part); re-form the group: {e}")

    def _header(self, status: int = 0, version: int = 0, payload: bytes = b"") -> tuple[int, int, bytes]:
        head = self._bcast(torch.tensor([status, version, len(payload)], dtype=torch.int64, device=self.device))
        status, version, n = head.tolist()
        if not n:
            return status, version, b""
        buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device) if payload
               else torch.empty(n, dtype=torch.uint8, device=self.device))
        return status, version, bytes(self._bcast(buf).cpu().numpy())

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             on_bucket: BucketHook | None = None, layout: list[Spec] | None = None) -> tuple[int, ...]:
        # On CPU, packing on one thread: the engines reload on the other cores meanwhile, and a
        # parallel copy's threads then wait on each other behind them (bench/weight_sync.py:
        # syncs of 0.12-0.37 s became 0.10-0.12 s)
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            return self._send(named_tensors, version, on_bucket, layout)
        finally:
            torch.set_num_threads(threads)

    def _send(self, named_tensors, version, on_bucket, layout):
        if self.rank != 0:
            raise WeightSyncError(f"{self._where}: only rank 0 sends")
        streamed = layout is not None
        if layout is None:
            named = {n: t.detach() for n, t in named_tensors}
            layout = spec_of(named.items())
        first = self._buckets is None
        buckets = plan_buckets(layout, self.bucket_mb) if self._buckets is None else self._buckets
        reason = _mismatch(buckets, layout)
        if not reason and streamed and [n for n, _, _ in layout] != [e.name for b in buckets for e in b.entries]:
            reason = "a streamed send must come in the order of the first send"
        if reason:  # tell receivers before raising, so they raise too instead of waiting
            self._header(_ABORT, version, reason.encode())
            raise WeightSyncError(f"{self._where}: {reason}")
        self._header(_OK, version, _encode(buckets) if first else b"")
        self._buckets = buckets
        arriving = iter(named_tensors) if streamed else None

        def take(e: _Entry) -> torch.Tensor:
            if arriving is None:
                return named[e.name]
            name, t = next(arriving)
            if name != e.name or tuple(t.shape) != e.shape:
                raise WeightSyncError(f"{self._where}: the layout promised {e.name} {e.shape}, "
                                      f"the stream gave {name} {tuple(t.shape)}")
            return t
        # one bucket travels while the next is packed, into two buffers kept across sends
        # (fresh ones would page-fault the whole model in again on every update)
        size = max(b.numel * b.dtype.itemsize for b in buckets)
        if self._send_buffers is None or self._send_buffers[0].numel() < size:
            self._send_buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        sums: list[torch.Tensor] = []
        in_flight: Callable[[], torch.Tensor] | None = None
        for i, b in enumerate(buckets):
            flat = self._send_buffers[i % 2][:b.numel * b.dtype.itemsize].view(b.dtype)
            for e in b.entries:  # streamed: each tensor is packed while it is still gathered (ZeRO-3)
                flat[e.offset:e.offset + e.numel].copy_(take(e).reshape(-1))
            sums.append(checksum(flat))
            started = self._begin(flat)
            if in_flight is not None:
                self._sent(i - 1, in_flight, on_bucket)
            in_flight = started
        if in_flight is not None:
            self._sent(len(buckets) - 1, in_flight, on_bucket)
        return tuple(torch.stack(sums).tolist()) if sums else ()

    @staticmethod
    def _sent(index: int, wait: Callable[[], torch.Tensor], on_bucket: BucketHook | None) -> None:
        flat = wait()
        if on_bucket is not None:
            on_bucket(index, flat)

    def receive(self, version: int, on_bucket: BucketHook | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        if self.rank == 0:
            raise WeightSyncError(f"{self._where}: rank 0 sends, it does not receive")
        self.received_checksums = ()
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
        started, sums = 1, []
        try:
            for i, b in enumerate(pending):
                assert in_flight is not None  # started before the loop or in the previous round
                flat = in_flight()
                in_flight = None
                if started < len(pending):
                    nxt = pending[started]
                    in_flight = self._begin(torch.empty(nxt.numel, dtype=nxt.dtype, device=self.device))
                    started += 1
                if on_bucket is not None:
                    on_bucket(i, flat)
                sums.append(checksum(flat))  # as it arrived, before anything is loaded from it
                for e in b.entries:
                    t = flat[e.offset:e.offset + e.numel].view(e.shape)
                    yield e.name, (t.to(self.dtype) if self.dtype and t.is_floating_point() else t)
        except GeneratorExit:  # consumer stopped early: finish the send for everyone else
            if in_flight is not None:
                in_flight()
            for b in pending[started:]:
                self._bcast(torch.empty(b.numel, dtype=b.dtype, device=self.device))
            raise
        self.received_checksums = tuple(torch.stack(sums).tolist())


class GlooTransport(BucketTransport):
    """CPU transport: a standalone gloo group on its own TCPStore, both bound to `host`.

    Never touches the default torch.distributed group (the learner's DeepSpeed one). The
    constructor blocks until all `world_size` ranks joined (at most `timeout_s`); receivers may
    join before the sender. The deadline of every broadcast is gloo's own, the group's timeout
    option (`timeout_s`); a rank that died fails its peers' broadcasts at once (sockets close).
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, bucket_mb: float = 256.0,
                 timeout_s: float = 300.0, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> None:
        super().__init__(host, port, rank, world_size, bucket_mb=bucket_mb, dtype=dtype, timeout_s=timeout_s)
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

    def _start_broadcast(self, buf: torch.Tensor) -> Callable[[], None]:
        if self._pg is None:
            raise WeightSyncError(f"{self._where}: transport is closed")
        return self._pg.broadcast([buf], dist.BroadcastOptions()).wait  # type: ignore[attr-defined]  # stub gap

    def close(self) -> None:
        if self._pg is not None:
            self._pg.shutdown()
        self._pg, self._store = None, None  # the master's store closes its listening socket


def make_transport(backend: str, host: str, port: int, rank: int, world_size: int, *,
                   bucket_mb: float = 256.0, timeout_s: float = 300.0, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> WeightTransport:
    """The transport for `backend`: "gloo" (CPU engines) or "nccl" (GPU engines)."""
    if backend not in ("gloo", "nccl"):
        raise WeightSyncError(f"unknown weight transport backend {backend!r}; valid: 'gloo', 'nccl'")
    kwargs = dict(bucket_mb=bucket_mb, timeout_s=timeout_s, dtype=dtype, device=device)
    if backend == "nccl":
        from cluster.nccl_transport import NcclTransport  # here: this module imports without CUDA or vLLM

        return NcclTransport(host, port, rank, world_size, **kwargs)
    return GlooTransport(host, port, rank, world_size, **kwargs)
