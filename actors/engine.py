"""Rollout engines behind one interface: token ids in, sampled token ids + logprobs out.

Logprobs are of the sampled tokens under the policy at the sampling temperature, before
top-k/top-p/repetition-penalty processing: the same quantity the learner recomputes from its
logits / temperature, so on-policy rows have an importance ratio of exactly 1.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from cluster.sync_faults import SyncFault, bucket_hook, misloaded


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int

    @classmethod
    def from_config(cls, s) -> SamplingParams:
        """From conf.schema.SamplingConfig (rollout.sampling or rollout.val_sampling)."""
        return cls(s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_new_tokens)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class Generation:
    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str  # "stop" | "length"


class RolloutEngine(ABC):
    """An engine owns its end(s) of the weight group: one rank per model shard (tensor-parallel
    workers of a vLLM engine each join), ranks first_rank .. first_rank + shards - 1."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]: ...

    @abstractmethod
    def init_weight_sync(self, backend: str, host: str, port: int, first_rank: int, world_size: int,
                         bucket_mb: float, timeout_s: float) -> None: ...

    @abstractmethod
    def receive_weights(self, version: int, fault: SyncFault | None = None) -> tuple[tuple[int, ...], ...]:
        """Receive `version` from learner rank 0 and apply it in place (checkpoint-format names).
        Returns each shard's bucket checksums, taken as the bytes arrived (cluster/sync_verify.py).
        `fault`: a test's injected fault (cluster/sync_faults.py)."""

    @abstractmethod
    def score_probe(self, token_ids: Sequence[int], temperature: float) -> list[float]:
        """log p(token t+1 | tokens <= t) of logits / temperature for each probe position t."""

    def needs_restart(self) -> bool:
        """True when a failed update left the engine unusable (only a fresh process recovers it)."""
        return False


class HFEngine(RolloutEngine):
    """transformers' generate on one device. Batches all requests of a call together; the batch's
    sampling RNG is seeded from the requests' seeds (per-sample seeding is the vLLM engine's)."""

    def __init__(self, model_path: str, *, dtype: torch.dtype, device: str, stop_token_ids: Sequence[int],
                 pad_token_id: int, max_batch_size: int = 64):
        from transformers import AutoModelForCausalLM

        from actors.hf_attention import grouped_sdpa

        attention = grouped_sdpa() if device == "cpu" else None  # no KV-cache copy per decode step
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                          attn_implementation=attention).to(device).eval()
        self.device = device
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        out: list[Generation] = []
        for start in range(0, len(requests), self.max_batch_size):
            out += self._generate_batch(requests[start:start + self.max_batch_size], sampling)
        return out

    def _generate_batch(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[Generation]:
        width = max(len(r.prompt_token_ids) for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, r in enumerate(requests):  # left padding: every row's next token sits at the right edge
            input_ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            attention_mask[i, width - len(r.prompt_token_ids):] = 1
        torch.manual_seed(hash(tuple(r.seed for r in requests)) % (2**63))
        result = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else None,
            repetition_penalty=sampling.repetition_penalty, max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.stop_token_ids, pad_token_id=self.pad_token_id,
            output_logits=True, return_dict_in_generate=True,
        )
        new_tokens = result.sequences[:, width:].cpu()
        raw_logits = torch.stack(result.logits, dim=1).float().cpu()  # [B, T, V], unprocessed
        logprobs = torch.log_softmax(raw_logits / sampling.temperature, dim=-1)
        token_logprobs = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        generations = []
        for i, r in enumerate(requests):
            ids = new_tokens[i].tolist()
            length, finish = len(ids), "length"
            for t, tok in enumerate(ids):
                if tok in self.stop_token_ids:
                    length, finish = t + 1, "stop"
                    break
            generations.append(Generation(r.request_id, tuple(ids[:length]),
                                          tuple(token_logprobs[i, :length].tolist()), finish))
        return generations

    def init_weight_sync(self, backend: str, host: str, port: int, first_rank: int, world_size: int,
                         bucket_mb: float, timeout_s: float) -> None:
        from cluster.transport import make_transport

        if getattr(self, "transport", None) is not None:
            self.transport.close()
        self.transport = make_transport(backend, host, port, first_rank, world_size, bucket_mb=bucket_mb,
                                        timeout_s=timeout_s, dtype=self.model.dtype)

    @torch.no_grad()
    def receive_weights(self, version: int, fault: SyncFault | None = None) -> tuple[tuple[int, ...], ...]:
        params = self.model.state_dict(keep_vars=True)  # includes tied aliases such as lm_head.weight
        weights = self.transport.receive(version, on_bucket=bucket_hook(fault))
        if fault is not None and fault.kind == "corrupt_loaded":
            weights = misloaded(weights)
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"engine model has no weight named {name!r}")
            params[name].copy_(tensor)
        return (self.transport.received_checksums,)

    @torch.no_grad()
    def score_probe(self, token_ids: Sequence[int], temperature: float) -> list[float]:
        from learner.logprobs import token_logprobs

        ids = torch.tensor([list(token_ids)], device=self.device)
        return token_logprobs(self.model, ids, torch.ones_like(ids), temperature)[0].tolist()


def build_engine(kind: str, model_path: str, *, dtype: torch.dtype, device: str,
                 stop_token_ids: Sequence[int], pad_token_id: int, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, seed: int = 0, cpu_cores: str | None = None) -> RolloutEngine:
    """`max_model_len` (vLLM): prompt + response tokens; None = the model's context length.
    `cpu_cores` (vLLM on CPU): the cores its workers bind to, as VLLM_CPU_OMP_THREADS_BIND."""
    if kind == "hf":
        if tensor_parallel_size != 1:
            raise ValueError(f"rollout.engine=hf runs on one device; tensor_parallel_size={tensor_parallel_size} "
                             f"needs rollout.engine=vllm")
        return HFEngine(model_path, dtype=dtype, device=device, stop_token_ids=stop_token_ids,
                        pad_token_id=pad_token_id)
    if kind == "vllm":
        from actors.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=dtype, device=device, stop_token_ids=stop_token_ids,
                          tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed,
                          cpu_cores=cpu_cores)
    raise ValueError(f"unknown rollout engine {kind!r}; valid: 'hf', 'vllm'")
