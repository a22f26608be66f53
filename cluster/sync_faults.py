"""Faults injected into one weight sync by hook, not by timing (weight_sync.fault: a test option).

Roles arms the fault on the regular sync of weight version `version` only, never on a recovery's
re-send, so a restarted engine is not hit again. The transports call the bucket hook with the
bucket's index as each bucket has arrived (receivers, before its checksum) or has been sent
(learner rank 0); `misloaded` stands between the received weights and the engine's loader.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from conf.errors import WeightSyncError

@dataclass(frozen=True)
class SyncFault:
    kind: str
    after_bucket: int = 0
    pid: int = 0  # the process a *_dies fault kills: the actor's (vLLM's workers are its children)

    def as_args(self) -> tuple[str, int, int]:
        """Plain values: what vLLM's collective_rpc carries to its workers."""
        return self.kind, self.after_bucket, self.pid


def bucket_hook(fault: SyncFault | tuple | None) -> Callable[[int, torch.Tensor], None] | None:
    if fault is None:
        return None
    fault = fault if isinstance(fault, SyncFault) else SyncFault(*fault)
    if fault.kind not in ("engine_dies", "engine_refuses", "corrupt_bucket", "learner_dies"):
        return None

    def after_bucket(index: int, flat: torch.Tensor) -> None:
        if index != fault.after_bucket:
            return
        if fault.kind.endswith("_dies"):
            os.kill(fault.pid or os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # a worker process waits for its actor's death to take it too
        if fault.kind == "engine_refuses":
            raise WeightSyncError(f"engine refused the rest of the sync after bucket {index} (injected fault)")
        raw = flat.view(-1).view(torch.uint8)
        raw[raw.numel() // 2] ^= 0x10  # one bit of the bucket, as a faulty link would flip it
    return after_bucket


def misloaded(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The weight stream with layer 0's gate and up projections swapped on their way into the
    loader: what a stacked parameter (vLLM's gate_up_proj) loaded in the wrong order looks like.
    The bytes arrived intact, so only the probe can tell."""
    swap = ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight")
    held: tuple[str, torch.Tensor] | None = None
    for name, tensor in weights:
        if not name.endswith(swap):
            yield name, tensor
        elif held is None:
            held = name, tensor
        else:
            yield held[0], tensor
            yield name, held[1]
            held = None
    if held is not None:
        raise WeightSyncError("corrupt_loaded: the model has no pair of gate and up projections in layer 0")
