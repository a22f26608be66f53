"""A rollout worker: one engine, the weight version it holds, and its end of the weight group.
A plain class; cluster/roles.py makes it a Ray actor."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from actors.engine import GenerationRequest, SamplingParams, build_engine
from cluster.sync_faults import SyncFault
from cluster.sync_verify import SyncReport
from cluster.transport import WeightSyncError


@dataclass(frozen=True)
class Sample:
    """One policy rollout, stamped with the weight version that produced it."""

    uid: str
    sample_index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    weight_version: int


class RolloutWorker:
    def __init__(self, engine_kind: str, model_path: str, *, dtype: str, device: str,
                 stop_token_ids: list[int], pad_token_id: int, num_threads: int = 0,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None, seed: int = 0,
                 cpu_cores: str | None = None):
        import torch

        from learner.settings import DTYPES
        from learner.worker import flush_denormals

        if num_threads:
            torch.set_num_threads(num_threads)
        flush_denormals()
        self.engine = build_engine(engine_kind, model_path, dtype=DTYPES[dtype], device=device,
                                   stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                                   tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed,
                                   cpu_cores=cpu_cores)
        self.weight_version = 0

    def generate(self, requests: list[tuple[str, int, tuple[int, ...], int]], sampling: SamplingParams) -> list[Sample]:
        """requests: (uid, sample_index, prompt token ids, seed)."""
        engine_requests = [GenerationRequest(f"{uid}/{i}", ids, seed) for uid, i, ids, seed in requests]
        generations = self.engine.generate(engine_requests, sampling)
        return [
            Sample(uid, i, ids, g.token_ids, g.logprobs, g.finish_reason, self.weight_version)
            for (uid, i, ids, _), g in zip(requests, generations)
        ]

    def generate_stream(self, requests: list[tuple[str, int, tuple[int, ...], int]], sampling: SamplingParams,
                        chunk: int) -> Iterator[list[Sample]]:
        """generate() in engine calls of `chunk` requests (0: one call), each call's samples yielded
        as soon as it returns: through Ray, a streaming generator the judge can start on."""
        size = chunk or max(1, len(requests))
        for start in range(0, len(requests), size):
            yield self.generate(requests[start:start + size], sampling)

    def init_weight_sync(self, backend: str, host: str, port: int, rank: int, world_size: int, bucket_mb: float,
                         timeout_s: float) -> None:
        self.engine.init_weight_sync(backend, host, port, rank, world_size, bucket_mb, timeout_s)

    def receive_weights(self, version: int, *, restoring: bool = False, probe: tuple | None = None,
                        fault: SyncFault | None = None) -> SyncReport:
        """Receive version `version` from learner rank 0 and load it; the sender checks the same
        number, so an engine that missed an update refuses the next one instead of drifting.
        restoring: a resumed run's engines take the checkpoint's version from the base model.
        probe: (token ids, temperature) to score once loaded (cluster/sync_verify.py).
        fault: a test's injected fault (cluster/sync_faults.py)."""
        if version != self.weight_version + 1 and not restoring:
            raise WeightSyncError(f"engine holds weight version {self.weight_version}; refusing to jump to {version}")
        if fault is not None:
            fault = SyncFault(fault.kind, fault.after_bucket, pid=os.getpid())
        checksums = self.engine.receive_weights(version, fault)
        self.weight_version = version
        return SyncReport(checksums, tuple(self.engine.score_probe(*probe)) if probe else ())

    def needs_restart(self) -> bool:
        return self.engine.needs_restart()

    def get_weight_version(self) -> int:
        return self.weight_version

    def call(self, fn, *args):
        """Run fn(self, *args) in this worker's process (benchmarks, diagnostics)."""
        return fn(self, *args)
