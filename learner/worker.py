"""One data-parallel learner rank: a DeepSpeed engine around the policy, the GRPO/HRI loss, and
(on rank 0) the weight broadcast to the rollout engines. A plain class; cluster/roles.py makes it
a Ray actor."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from conf.errors import WeightSyncError
from learner.grpo import policy_loss, truncated_importance_weights
from learner.logprobs import PolicyLogprobs, token_logprobs  # noqa: F401  (token_logprobs: re-exported)
from learner.microbatch import pack_micro_batches
from learner.settings import DTYPES, LearnerSettings, build_optimizer, deepspeed_config

def flush_denormals() -> None:
    """Flush float32 denormals to zero, process-wide: AdamW moments of rarely seen tokens decay
    into denormals, which made CPU steps ~10x slower (measured); results are unaffected.
    numpy computes its float limits once per process and warns that "the smallest subnormal is
    zero" if that happens after the flush: computing them first keeps the warning away."""
    import numpy as np

    for dtype in (np.float16, np.float32, np.float64):
        np.finfo(dtype)
    torch.set_flush_denormal(True)


@dataclass(frozen=True)
class TrainRow:
    """One sequence of a training batch: prompt + response tokens and its advantage."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    advantage: float
    is_reference: bool
    behaviour_logprobs: tuple[float, ...] | None = None  # the engine's, for policy rows
    policy_lag: int = 0  # optimizer steps between the weights that sampled the row and the learner's

    def __post_init__(self):
        if self.behaviour_logprobs is not None and len(self.behaviour_logprobs) != len(self.response_ids):
            raise ValueError(f"TrainRow: {len(self.behaviour_logprobs)} behaviour logprobs for "
                             f"{len(self.response_ids)} response tokens")


@dataclass(frozen=True)
class TrainBatch:
    rows: tuple[TrainRow, ...]
    step: int

    @property
    def num_tokens(self) -> int:
        """Response tokens in the whole optimizer step: the token-mean's denominator."""
        return sum(len(r.response_ids) for r in self.rows)


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's training metrics from every rank's sums.

    tis_*: over the policy tokens of off-policy rows (policy_lag > 0 with behaviour logprobs);
    with none, tis_ratio_mean = tis_ratio_max = 1.0 (the weight every on-policy token gets) and
    tis_clipped_fraction = 0.0. engine_learner_kl: mean of (engine - learner) logprob over the
    sampled tokens of rows with behaviour logprobs, the k1 estimate of KL(engine || learner).
    """
    maxima = ("ratio_max", "tis_weight_max", "grad_norm", "lr")
    total = {k: sum(m[k] for m in per_rank) for k in per_rank[0] if k not in maxima}
    off_policy = total["tis_tokens"] > 0
    return {
        "loss": total["loss"],
        "clip_fraction": total["clipped_tokens"] / max(1.0, total["policy_tokens"]),
        "ratio_max": max(m["ratio_max"] for m in per_rank),
        "grad_norm": per_rank[0]["grad_norm"],
        "lr": per_rank[0]["lr"],
        "logprob_diff": total["logprob_diff_sum"] / max(1.0, total["logprob_diff_tokens"]),
        "engine_learner_kl": total["engine_kl_sum"] / max(1.0, total["logprob_diff_tokens"]),
        "tis_ratio_mean": total["tis_weight_sum"] / total["tis_tokens"] if off_policy else 1.0,
        "tis_ratio_max": max(m["tis_weight_max"] for m in per_rank) if off_policy else 1.0,
        "tis_clipped_fraction": total["tis_clipped_tokens"] / max(1.0, total["tis_tokens"]),
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


def behaviour_logprobs(rows: list[TrainRow], learner_logprobs: torch.Tensor,
                       response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The behaviour policy's logprobs aligned to learner_logprobs [B, T-1], and which rows are
    off-policy [B]. An off-policy row (a policy row with policy_lag > 0 and the engine's logprobs)
    carries the engine's logprobs at its response positions; every other row carries the
    learner's own (detached), so its importance weight is exactly 1."""
    behaviour = learner_logprobs.detach().clone()
    off_policy = torch.zeros(len(rows), dtype=torch.bool, device=behaviour.device)
    for i, row in enumerate(rows):
        if row.policy_lag > 0 and row.behaviour_logprobs is not None and not row.is_reference:
            behaviour[i, response_mask[i]] = torch.tensor(row.behaviour_logprobs, dtype=behaviour.dtype,
                                                          device=behaviour.device)
            off_policy[i] = True
    return behaviour, off_policy


def generation_config(model_config, generation: dict, defaults=None):
    """A transformers GenerationConfig of the run's sampling settings (temperature, top_p, top_k,
    repetition_penalty, max_new_tokens, ...): sampling on, with the stop and pad token ids of the
    model's own generation config (`defaults`) or else of its config."""
    from transformers import GenerationConfig

    settings = dict(generation)
    if "top_k" in settings:  # the run's top_k <= 0 means off; 0 means off to transformers and vLLM
        settings["top_k"] = max(int(settings["top_k"]), 0)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(defaults, key, None)
        value = getattr(model_config, key, None) if value is None else value
        if value is not None:
            settings.setdefault(key, value)
    return GenerationConfig(do_sample=True, **settings)


class LearnerWorker:
    def __init__(self, settings: LearnerSettings, rank: int, world_size: int, master_addr: str, master_port: int,
                 *, num_threads: int = 0):
        import deepspeed
        from transformers import AutoModelForCausalLM

        from cluster.netutil import bound_tcp_store
        from learner.kernels import prepare_native_builds

        prepare_native_builds()  # before deepspeed builds its shared-memory op
        self.s, self.rank, self.world_size = settings, rank, world_size
        self.num_threads = num_threads or torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        flush_denormals()
        self.device = torch.device(settings.device if settings.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not torch.distributed.is_initialized():  # tests build several one-rank workers in one process
            store = bound_tcp_store(master_addr, master_port, is_master=rank == 0, timeout_s=300)
            torch.distributed.init_process_group("gloo" if settings.device == "cpu" else "nccl",
                                                 store=store, rank=rank, world_size=world_size)
        elif (torch.distributed.get_rank(), torch.distributed.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"LearnerWorker: this process's group is rank {torch.distributed.get_rank()} of "
                               f"{torch.distributed.get_world_size()}, not {rank} of {world_size}")
        torch.manual_seed(settings.seed)
        ds_config = deepspeed_config(settings)  # refuses a bad offload setting before any work
        model = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=DTYPES[settings.dtype])
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = build_optimizer(model.parameters(), settings)
        # The engine's forward returns token logprobs: DeepSpeed's per-forward bookkeeping and its
        # backward prologue then cover the chunked logits too (calling the decoder around the
        # engine would skip them, and ZeRO would mis-accumulate gradients).
        policy = PolicyLogprobs(model, temperature=settings.temperature, chunk_tokens=settings.logprob_chunk_tokens)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=ds_config)
        self._optimizer = optimizer  # ZeRO steps it with its param groups: the schedule sets their lr
        self.policy = self.engine.module.causal_lm  # the Hugging Face model, parameters shared with the engine
        self.transport = None

    def startup_line(self) -> str:
        """This rank's optimizer, threads and the kernel path of each layer type of the model."""
        from learner.kernels import kernel_line, model_kernel_paths

        optimizer = {"cpu_adam": "DeepSpeed CPU Adam", "torch_adamw": "torch AdamW"}[self.s.optimizer]
        state = "offloaded to CPU memory" if self.s.offload_optimizer else f"on {self.device.type}"
        return (f"learner: {self.world_size} rank(s), ZeRO-{self.s.zero_stage}, {self.s.dtype}; optimizer {optimizer} "
                f"(state {state}); {self.num_threads} CPU threads per rank\n"
                + kernel_line(model_kernel_paths(self.policy), self.s.device))

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over this rank's share of the batch. Returns sums and counts that
        Roles.train adds up over ranks (see combine_rank_metrics)."""
        self.engine.train()
        # Per call: OpenMP's thread count is per calling thread, and Ray's OMP_NUM_THREADS=1 (one
        # logical CPU per actor) would otherwise hold an offloaded optimizer step to one core.
        torch.set_num_threads(self.num_threads)
        total_tokens = batch.num_tokens
        sums = {"loss": 0.0, "policy_tokens": 0.0, "clipped_tokens": 0.0, "ratio_max": 0.0,
                "logprob_diff_sum": 0.0, "logprob_diff_tokens": 0.0, "engine_kl_sum": 0.0,
                "tis_weight_sum": 0.0, "tis_weight_max": 0.0, "tis_clipped_tokens": 0.0, "tis_tokens": 0.0}
        for indices, min_chunks in self._micro_batches(batch.rows):
            loss, metrics = self._micro_loss([batch.rows[i] for i in indices], total_tokens, min_chunks)
            # DeepSpeed averages gradients over ranks; the loss is already a global token-mean.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            for key, value in metrics.items():
                sums[key] = max(sums[key], value) if key.endswith("_max") else sums[key] + value
        sums["lr"] = self.s.lr_at(batch.step)
        for group in self._optimizer.param_groups:
            group["lr"] = sums["lr"]
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # DeepSpeed reports it under ZeRO >= 1 only
        sums["grad_norm"] = float("nan") if norm is None else float(norm)
        return sums

    def _micro_loss(self, rows: list[TrainRow], total_tokens: int,
                    min_chunks: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not rows:  # keeps ranks in lockstep: a zero loss that still touches every parameter
            dummy = TrainRow((self.s.pad_token_id,), (self.s.pad_token_id,), 0.0, False)
            loss, _ = self._micro_loss([dummy], total_tokens, min_chunks)
            return loss * 0.0, {}
        tensors = {k: v.to(self.device) for k, v in pad_rows(rows, self.s.pad_token_id).items()}
        logprobs = self.engine(tensors["input_ids"], tensors["attention_mask"], min_chunks)
        mask = tensors["response_mask"]
        advantages = torch.tensor([r.advantage for r in rows], device=self.device)
        is_reference = torch.tensor([r.is_reference for r in rows], device=self.device)
        # One optimizer step per batch: the old policy is the current one (PPO ratio 1). Rows
        # sampled by older weights are corrected towards the engine that sampled them (TIS).
        old = logprobs.detach()
        behaviour, off_policy = behaviour_logprobs(rows, old, mask)
        loss, m = policy_loss(logprobs, old, advantages, mask, is_reference,
                              clip_low=self.s.clip_low, clip_high=self.s.clip_high, total_tokens=total_tokens,
                              behaviour_logprobs=behaviour, tis_cap=self.s.tis_cap)
        policy_tokens = float((mask & ~is_reference[:, None]).sum())
        out = {"loss": loss.item(), "policy_tokens": policy_tokens, "ratio_max": m["ratio_max"],
               "clipped_tokens": m["clip_fraction"] * policy_tokens}
        out.update(self._tis_sums(old, behaviour, mask & off_policy[:, None]))
        out.update(self._engine_gap(rows, old, mask))
        return loss, out

    def _tis_sums(self, old: torch.Tensor, behaviour: torch.Tensor, off_policy_tok: torch.Tensor) -> dict[str, float]:
        weights, capped = truncated_importance_weights(old, behaviour, off_policy_tok, self.s.tis_cap)
        tokens = int(off_policy_tok.sum())
        return {"tis_weight_sum": float(weights[off_policy_tok].sum()),
                "tis_weight_max": float(weights[off_policy_tok].max()) if tokens else 0.0,
                "tis_clipped_tokens": float(capped[off_policy_tok].sum()), "tis_tokens": float(tokens)}

    @staticmethod
    def _engine_gap(rows: list[TrainRow], logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Sums of |engine - learner| and of (engine - learner) logprob over sampled tokens:
        on-policy both should be ~0."""
        abs_total, total, count = 0.0, 0.0, 0
        for i, row in enumerate(rows):
            if row.behaviour_logprobs is None:
                continue
            gap = torch.tensor(row.behaviour_logprobs) - logprobs[i][mask[i]].cpu()
            abs_total += float(gap.abs().sum())
            total += float(gap.sum())
            count += len(row.behaviour_logprobs)
        return {"logprob_diff_sum": abs_total, "engine_kl_sum": total, "logprob_diff_tokens": float(count)}

    def _micro_batches(self, rows: tuple[TrainRow, ...]) -> list[tuple[list[int], int]]:
        """This rank's micro-batches (row indices), each with the number of logits chunks the
        widest of that micro-batch on any rank needs: every rank splits into as many (ZeRO-3
        gathers the head's weight on each call, collectively)."""
        lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rows]
        per_rank = [pack_micro_batches(lengths, r, self.world_size, self.s.max_tokens_per_micro_batch,
                                       self.s.micro_batch_size) for r in range(self.world_size)]
        chunk = self.s.logprob_chunk_tokens
        out = []
        for k, indices in enumerate(per_rank[self.rank]):
            # default: an empty micro-batch runs _micro_loss's 2-token stand-in row
            widest = max([lengths[i] for micro in per_rank for i in micro[k]], default=2)
            out.append((indices, -(-(widest - 1) // chunk) if chunk > 0 else 0))
        return out

    @torch.no_grad()
    def compute_logprobs(self, rows: list[TrainRow]) -> list[list[float]]:
        """The learner's logprobs of each row's response tokens (parity checks, off-policy)."""
        self.engine.eval()
        out: list[list[float]] = [[] for _ in rows]
        lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rows]
        for indices in pack_micro_batches(lengths, 0, 1, self.s.max_tokens_per_micro_batch, self.s.micro_batch_size):
            if not indices:  # only when there are no rows at all
                continue
            micro = [rows[i] for i in indices]
            tensors = {k: v.to(self.device) for k, v in pad_rows(micro, self.s.pad_token_id).items()}
            lp = self.engine(tensors["input_ids"], tensors["attention_mask"])
            for i, row_lp, row_mask in zip(indices, lp, tensors["response_mask"]):
                out[i] = row_lp[row_mask].tolist()
        return out

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors under the names the engines load (the learner's own for the HF engine,
        checkpoint format for vLLM), in weight_layout()'s order. Under ZeRO-3 every rank must
        iterate this together (each parameter is gathered collectively), and a tensor is only
        valid until the next one is asked for (it is partitioned again): copy what you keep."""
        import deepspeed

        for name, param in self._sent_parameters():
            with deepspeed.zero.GatheredParameters([param], enabled=self.s.zero_stage == 3):
                yield name, param.detach()

    def weight_layout(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, full shape, dtype) of each tensor named_weights yields, without gathering any."""
        return [(name, tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for name, p in self._sent_parameters()]

    def _sent_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        from cluster.names import engine_parameters

        return engine_parameters(self.policy, self.s.checkpoint_names)

    # --- weight broadcast (rank 0 only) ---
    def init_weight_sync(self, backend: str, host: str, port: int, world_size: int, bucket_mb: float,
                         timeout_s: float) -> None:
        from cluster.transport import make_transport

        if self.transport is not None:  # re-forming (an engine was replaced): a torch group cannot swap a member
            self.transport.close()
        self.transport = make_transport(backend, host, port, 0, world_size, bucket_mb=bucket_mb, timeout_s=timeout_s)

    def broadcast_weights(self, version: int, probe: tuple | None = None, fault=None):
        """Called on every rank (ZeRO-3 gathers are collective); rank 0 sends, and returns the
        SyncReport the engines' are checked against: its bucket checksums and, given probe
        (token ids, temperature), the learner's log-probabilities of the probe. Every rank takes
        part in every gather and in the probe's forward even when rank 0's send failed (it raises
        after), so no rank is left waiting in a collective. fault: cluster/sync_faults.py."""
        from cluster.sync_faults import bucket_hook
        from cluster.sync_verify import SyncReport

        weights, checksums, failed = self.named_weights(), (), None
        if self.rank == 0:
            try:  # streamed: one gathered parameter at a time is held, never the whole model
                checksums = self.transport.send(weights, version, on_bucket=bucket_hook(fault),
                                                layout=self.weight_layout())
            except WeightSyncError as e:
                failed = e
        for _ in weights:  # rank 0: the rest of a send that failed
            pass
        scored = self.probe_logprobs(*probe) if probe else ()
        if failed is not None:
            raise failed
        return SyncReport((checksums,), scored) if self.rank == 0 else None

    @torch.no_grad()
    def probe_logprobs(self, token_ids, temperature: float) -> tuple[float, ...]:
        self.engine.eval()
        ids = torch.tensor([list(token_ids)], device=self.device)
        if temperature != self.s.temperature:
            raise WeightSyncError(f"probe at temperature {temperature}, the learner scores at {self.s.temperature}")
        return tuple(self.engine(ids, torch.ones_like(ids))[0].tolist())

    # --- checkpoints and export (every rank) ---
    def save_checkpoint(self, path: str, *, tokenizer_path: str, generation: dict) -> None:
        """This rank's part of the checkpoint folder `path` (actors/checkpoint.py): every rank writes
        its DeepSpeed shard (weights, optimizer state, RNG) under learner/; rank 0 also writes
        hf_meta/ (config, tokenizer, generation config), which learner/export.py needs."""
        from transformers import AutoTokenizer

        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.engine.save_checkpoint(str(Path(path) / "learner"), tag="ds", save_latest=False,
                                    client_state={"torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng})
        if self.rank == 0:
            meta = Path(path) / "hf_meta"
            self.policy.config.save_pretrained(meta)
            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(meta)
            generation_config(self.policy.config, generation, self.policy.generation_config).save_pretrained(meta)

    def load_checkpoint(self, path: str) -> None:
        """Weights, optimizer state and RNG from checkpoint folder `path` (a fresh worker: under
        ZeRO-3 DeepSpeed cannot load into an engine that has already saved)."""
        from conf.errors import CheckpointError

        learner_dir = Path(path) / "learner"
        if not (learner_dir / "ds").is_dir():  # DeepSpeed would fail an assert with no path in it
            raise CheckpointError(f"{path} holds no learner checkpoint (learner/ds is missing)")
        loaded, client_state = self.engine.load_checkpoint(str(learner_dir), tag="ds", load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the learner checkpoint in {learner_dir} "
                                  "(missing or incomplete files)")
        torch.set_rng_state(client_state["torch_rng"])
        if self.device.type == "cuda" and client_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(client_state["cuda_rng"], self.device)

    def save_hf(self, path: str, tokenizer_path: str, generation: dict | None = None) -> str:
        """The policy as a Hugging Face folder (safetensors + tokenizer, and generation_config.json
        with the given sampling settings). Every rank calls it: ZeRO-3 gathers collectively."""
        import deepspeed
        from transformers import AutoTokenizer

        state = None
        if self.s.zero_stage == 3:  # the module holds empty partitions: gather one parameter at a time
            state = {}  # a tied head once, under its embedding's name, as save_pretrained stores it
            for name, param in self.policy.named_parameters():
                with deepspeed.zero.GatheredParameters([param]):
                    if self.rank == 0:
                        state[name] = param.detach().cpu().clone()
        if self.rank == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.policy.save_pretrained(path, state_dict=state)
            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
            if generation is not None:
                generation_config(self.policy.config, generation, self.policy.generation_config).save_pretrained(path)
        return path

    def call(self, fn, *args):
        """Run fn(self, *args) in this worker's process (benchmarks, diagnostics)."""
        return fn(self, *args)
