"""The vLLM worker extension: the engine side of the weight group, inside vLLM's worker processes.

vLLM mixes this class into its worker class (`LLM(worker_extension_cls=WORKER_EXTENSION)`), one
worker per tensor-parallel rank, each in the engine-core process or a process of its own. The
rollout actor reaches these methods with `LLM.collective_rpc(name, args=...)`: every TP worker
runs the method and the call returns their results as a list. Only metadata travels through
that RPC (tensors passed as RPC arguments arrive as lists); tensors travel over the weight
group (cluster/transport.py), where each TP worker is one receiving rank and gets full,
unsharded tensors in checkpoint format; vLLM's loader shards them.

Expected failures (a wrong version, a sender that aborted, a group that does not form) come
back as an error string in the result instead of an exception, so the engine process stays up
and the caller raises WeightSyncError with the message. This module imports nothing heavy at
import time: vLLM imports it in every worker by its qualified name.
"""
from __future__ import annotations

import itertools

WORKER_EXTENSION = f"{__name__}.WeightSyncExtension"


class WeightSyncExtension:
    """Methods added to every vLLM worker. Names must not clash with the worker's own
    attributes (vLLM asserts this at start-up), hence the `_polaris_` prefix on state."""

    def init_weight_sync(self, backend: str, host: str, port: int, first_rank: int, world_size: int,
                         bucket_mb: float, dtype_name: str, timeout_s: float) -> tuple[int, str]:
        """Join the weight group as rank first_rank + this worker's TP rank; blocks until every
        rank joined (learner rank 0 hosts the store and may join after us). Re-forms the group
        when called again. Returns (rank, error or "")."""
        import torch
        from vllm.distributed.parallel_state import get_tp_group

        from cluster.transport import WeightSyncError, make_transport

        self.close_weight_sync()
        rank = first_rank + get_tp_group().rank_in_group
        self._polaris_dtype = getattr(torch, dtype_name)
        try:  # tensors arrive as sent; receive_weights casts each to the dtype vLLM holds it in
            self._polaris_transport = make_transport(backend, host, port, rank, world_size, bucket_mb=bucket_mb,
                                                     timeout_s=timeout_s, dtype=None)
        except WeightSyncError as e:
            return rank, str(e)
        return rank, ""

    def receive_weights(self, version: int, fault: tuple | None = None) -> tuple[int, str, bool, tuple[int, ...]]:
        """Receive `version` and reload it in place. Returns (version, error or "", whether the
        model is intact: True unless loading failed half way, the buckets' checksums as they
        arrived). `fault`: a test's injected fault, SyncFault.as_args() (cluster/sync_faults.py).

        `reload_weights(..., is_checkpoint_format=True)` runs the model's own loader (name
        mapping, TP sharding, stacked qkv/gate_up) and then the backend's post-processing (the
        CPU backend repacks linear weights, which is why plain `model.load_weights` fails after
        start). It moves layers to the meta device before loading, so the first bucket is
        taken before calling it: a wrong version or an aborted send raises at the header and
        leaves the model untouched. A failure after that leaves the model half loaded: the
        error says so and the engine refuses to generate until restarted.
        """
        from cluster.names import vllm_dtype
        from cluster.sync_faults import SyncFault, bucket_hook, misloaded
        from cluster.transport import WeightSyncError

        transport = getattr(self, "_polaris_transport", None)
        if transport is None:
            return -1, "no weight group on this engine: init_weight_sync first", True, ()
        received = transport.receive(version, on_bucket=bucket_hook(fault))
        weights = ((n, t.to(vllm_dtype(n, self._polaris_dtype)) if t.is_floating_point() else t) for n, t in received)
        if fault is not None and SyncFault(*fault).kind == "corrupt_loaded":
            weights = misloaded(weights)
        try:
            first = next(weights)
        except StopIteration:
            return version, "", True, transport.received_checksums  # nothing was sent
        except WeightSyncError as e:
            return -1, str(e), True, ()
        try:
            self.reload_weights(weights_iterator=itertools.chain([first], weights), is_checkpoint_format=True)
        except Exception as e:  # noqa: BLE001 - reported to the caller, which marks the engine broken
            received.close()  # drain the rest of the send so the other ranks finish it
            return -1, f"weights partly applied: {type(e).__name__}: {e}", False, ()
        return version, "", True, transport.received_checksums

    def set_logit_temperature(self, temperature: float) -> int:
        """Divide the model's logits by `temperature` (the sampler then runs at temperature 1).

        vLLM's logprob modes are either raw (before temperature) or processed (after
        temperature *and* top-k/top-p/penalties). Scaling the logits inside the model makes
        "raw_logprobs" equal log_softmax(logits / T) before any sampling processor: what the
        learner recomputes. Sampling is unchanged: softmax((l / T)) is temperature-T
        sampling, and the repetition penalty (divide positive logits, multiply negative ones)
        commutes with a positive scale. Returns how many logits layers were scaled.
        """
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        layers = [m for m in self.model_runner.get_model().modules() if isinstance(m, LogitsProcessor)]
        for layer in layers:
            if not hasattr(layer, "_polaris_base_scale"):
                layer._polaris_base_scale = layer.scale  # a model's own logit scale, if any
            layer.scale = layer._polaris_base_scale / temperature
        return len(layers)

    def close_weight_sync(self) -> None:
        transport = getattr(self, "_polaris_transport", None)
        if transport is not None:
            transport.close()
        self._polaris_transport = None
