"""One data-parallel learner rank: a DeepSpeed engine around the policy, the GRPO/HRI loss, and
(on rank 0) the weight broadcast to the rollout engines. A plain class; cluster/roles.py makes it
a Ray actor."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from learner.grpo import policy_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainRow:
    """One sequence of a training batch: prompt + response tokens and its advantage."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    advantage: float
    is_reference: bool
    behaviour_logprobs: tuple[float, ...] | None = None  # the engine's, for policy rows


@dataclass(frozen=True)
class TrainBatch:
    rows: tuple[TrainRow, ...]
    step: int

    @property
    def num_tokens(self) -> int:
        """Response tokens in the whole optimizer step: the token-mean's denominator."""
        return sum(len(r.response_ids) for r in self.rows)


@dataclass(frozen=True)
class LearnerSettings:
    model_path: str
    dtype: str
    device: str
    zero_stage: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    micro_batch_size: int
    gradient_checkpointing: bool
    clip_low: float
    clip_high: float
    temperature: float  # logprobs are of logits / temperature, as the engines report them
    pad_token_id: int
    seed: int
    checkpoint_names: bool = False  # send vLLM's checkpoint-format names (cluster/names.py)


def shard_rows(rows: tuple[TrainRow, ...], rank: int, world_size: int, micro_batch_size: int) -> list[list[TrainRow]]:
    """This rank's micro-batches. Rows are sorted by length and dealt round robin so ranks get
    similar token counts; every rank gets the same number of micro-batches (ZeRO reduces inside
    each backward, so ranks must call it equally often); a rank short of rows gets empty ones."""
    ordered = sorted(rows, key=lambda r: len(r.prompt_ids) + len(r.response_ids), reverse=True)
    mine = ordered[rank::world_size]
    per_rank = -(-len(ordered) // world_size)
    num_micro = max(1, -(-per_rank // micro_batch_size))
    return [mine[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(num_micro)]


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's training metrics from every rank's sums."""
    total = {k: sum(m[k] for m in per_rank) for k in per_rank[0] if k not in ("ratio_max", "grad_norm")}
    return {
        "loss": total["loss"],
        "clip_fraction": total["clipped_tokens"] / max(1.0, total["policy_tokens"]),
        "ratio_max": max(m["ratio_max"] for m in per_rank),
        "grad_norm": per_rank[0]["grad_norm"],
        "logprob_diff": total["logprob_diff_sum"] / max(1.0, total["logprob_diff_tokens"]),
    }


def pad_rows(rows: list[TrainRow], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and the response-token mask aligned to logprobs."""
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, r in enumerate(rows):
        seq = r.prompt_ids + r.response_ids
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        # logprob at position t scores token t+1; response tokens start at len(prompt)
        response_mask[i, len(r.prompt_ids) - 1:len(seq) - 1] = True
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask}


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for every position, [B, T-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


class LearnerWorker:
    def __init__(self, settings: LearnerSettings, rank: int, world_size: int, master_addr: str, master_port: int,
                 *, num_threads: int = 0):
        import deepspeed
        from transformers import AutoModelForCausalLM

        from cluster.netutil import bound_tcp_store

        self.s, self.rank, self.world_size = settings, rank, world_size
        if num_threads:
            torch.set_num_threads(num_threads)
        torch.set_flush_denormal(True)  # float32 denormals slow CPU math ~10x; no effect on results
        self.device = torch.device(settings.device if settings.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        store = bound_tcp_store(master_addr, master_port, is_master=rank == 0, timeout_s=300)
        torch.distributed.init_process_group("gloo" if settings.device == "cpu" else "nccl",
                                             store=store, rank=rank, world_size=world_size)
        torch.manual_seed(settings.seed)
        model = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=DTYPES[settings.dtype])
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=settings.betas,
                                      weight_decay=settings.weight_decay)
        ds_config = {
            "train_micro_batch_size_per_gpu": settings.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # step() is the boundary: micro-batch count varies
            "gradient_clipping": settings.grad_clip,
            "zero_optimization": {"stage": settings.zero_stage},
            "bf16": {"enabled": settings.dtype == "bfloat16"},
            "fp16": {"enabled": settings.dtype == "float16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.transport = None

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over this rank's share of the batch. Returns sums and counts that
        Roles.train adds up over ranks (see combine_rank_metrics)."""
        self.engine.train()
        total_tokens = batch.num_tokens
        sums = {"loss": 0.0, "policy_tokens": 0.0, "clipped_tokens": 0.0, "ratio_max": 0.0,
                "logprob_diff_sum": 0.0, "logprob_diff_tokens": 0.0}
        for micro in shard_rows(batch.rows, self.rank, self.world_size, self.s.micro_batch_size):
            loss, metrics = self._micro_loss(micro, total_tokens)
            # DeepSpeed averages gradients over ranks; the loss is already a global token-mean.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            for key, value in metrics.items():
                sums[key] = max(sums[key], value) if key == "ratio_max" else sums[key] + value
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # DeepSpeed reports it under ZeRO >= 1 only
        sums["grad_norm"] = float("nan") if norm is None else float(norm)
        return sums

    def _micro_loss(self, rows: list[TrainRow], total_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not rows:  # keeps ranks in lockstep: a zero loss that still touches every parameter
            dummy = TrainRow((self.s.pad_token_id,), (self.s.pad_token_id,), 0.0, False)
            loss, _ = self._micro_loss([dummy], total_tokens)
            return loss * 0.0, {}
        tensors = {k: v.to(self.device) for k, v in pad_rows(rows, self.s.pad_token_id).items()}
        logprobs = token_logprobs(self.engine, tensors["input_ids"], tensors["attention_mask"], self.s.temperature)
        mask = tensors["response_mask"]
        advantages = torch.tensor([r.advantage for r in rows], device=self.device)
        is_reference = torch.tensor([r.is_reference for r in rows], device=self.device)
        # Fully on-policy, one optimizer step: the old policy is the current one (ratio 1).
        loss, m = policy_loss(logprobs, logprobs.detach(), advantages, mask, is_reference,
                              clip_low=self.s.clip_low, clip_high=self.s.clip_high, total_tokens=total_tokens)
        policy_tokens = float((mask & ~is_reference[:, None]).sum())
        out = {"loss": loss.item(), "policy_tokens": policy_tokens, "ratio_max": m["ratio_max"],
               "clipped_tokens": m["clip_fraction"] * policy_tokens}
        out.update(self._engine_gap(rows, logprobs.detach(), mask))
        return loss, out

    @staticmethod
    def _engine_gap(rows: list[TrainRow], logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Sum of |engine - learner| logprob over sampled tokens: on-policy it should be ~0."""
        total, count = 0.0, 0
        for i, row in enumerate(rows):
            if row.behaviour_logprobs is None:
                continue
            learner = logprobs[i][mask[i]].cpu()
            total += float((learner - torch.tensor(row.behaviour_logprobs)).abs().sum())
            count += len(row.behaviour_logprobs)
        return {"logprob_diff_sum": total, "logprob_diff_tokens": float(count)}

    @torch.no_grad()
    def compute_logprobs(self, rows: list[TrainRow]) -> list[list[float]]:
        """The learner's logprobs of each row's response tokens (parity checks, off-policy)."""
        self.engine.eval()
        out = []
        for row in rows:
            tensors = {k: v.to(self.device) for k, v in pad_rows([row], self.s.pad_token_id).items()}
            lp = token_logprobs(self.engine, tensors["input_ids"], tensors["attention_mask"], self.s.temperature)
            out.append(lp[0][tensors["response_mask"][0]].tolist())
        return out

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors under the names the engines load (the learner's own for the HF engine,
        checkpoint format for vLLM). Under ZeRO-3 every rank must iterate this together: each
        parameter is gathered collectively."""
        import deepspeed

        from cluster.names import checkpoint_name_mapper

        module = self.engine.module
        rename = checkpoint_name_mapper(module.config.model_type) if self.s.checkpoint_names else (lambda n: n)
        names = {name for name, _ in module.named_parameters()}
        for name, param in module.named_parameters():
            if self.s.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([param]):
                    yield rename(name), param.detach().clone()
            else:
                yield rename(name), param.detach()
        if getattr(module.config, "tie_word_embeddings", False) and "lm_head.weight" not in names:
            # vLLM's loader keeps its own head unless it is sent explicitly
            embed = module.get_input_embeddings().weight
            with deepspeed.zero.GatheredParameters([embed], enabled=self.s.zero_stage == 3):
                yield "lm_head.weight", embed.detach().clone()

    # --- weight broadcast (rank 0 only) ---
    def init_weight_sync(self, backend: str, host: str, port: int, world_size: int, bucket_mb: int) -> None:
        from cluster.transport import make_transport

        if self.transport is not None:  # re-forming (an engine was replaced): a torch group cannot swap a member
            self.transport.close()
        self.transport = make_transport(backend, host, port, 0, world_size, bucket_mb=bucket_mb)

    def broadcast_weights(self, version: int) -> None:
        """Called on every rank (ZeRO-3 gathers are collective); rank 0 sends."""
        weights = self.named_weights()
        if self.rank == 0:
            self.transport.send(weights, version)
        else:
            for _ in weights:
                pass

    def save_hf(self, path: str, tokenizer_path: str) -> str:
        """The policy as a Hugging Face folder (safetensors + tokenizer)."""
        from transformers import AutoTokenizer

        if self.rank == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.engine.module.save_pretrained(path, safe_serialization=True)
            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
        return path

    def call(self, fn, *args):
        """Run fn(self, *args) in this worker's process (benchmarks, diagnostics)."""
        return fn(self, *args)
