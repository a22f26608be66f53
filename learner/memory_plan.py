"""The start-up memory plan: bytes per GPU for a learner rank and for a rollout engine, and a
check that refuses, before any GPU work, a run that cannot fit. Pure arithmetic on a model shape
(learner/model_shapes.py) and the run's settings.

Formulas (P = the text model's parameters, b = bytes per element of the training dtype, W = the
learner world size, T = padded tokens in one micro-batch, H/I/L/V = hidden, intermediate,
layers, vocabulary). A role's total adds every item at its own peak, although some are never
live together (the gathered lm_head and a recomputed layer): an upper bound by a few GiB.

learner rank
- weights      P x b, / W under ZeRO-3; in CPU memory with offload_params.
- gradients    P x b, / W under ZeRO-2 and 3. (DeepSpeed keeps gradients in the training dtype
               unless data_types.grad_accum_dtype is fp32, which doubles this line.)
- optimizer    AdamW m and v in fp32 (8 bytes/param) + fp32 master weights when training in
               bf16/fp16 (4 bytes/param): 12 x P, or 8 x P in fp32; / W under ZeRO-1, 2 and 3.
               offload_optimizer moves it to CPU memory, with the fp32 gradient partition the
               CPU Adam step reads (4 x P / W).
- ZeRO-3 gather  the largest module gathered on every rank at once with its full gradient before
               the reduce-scatter: 2 x max(V x H, one decoder layer) x b (the lm_head/embedding
               for Qwen vocabularies). DeepSpeed may keep more live (stage3_max_live_parameters).
- activations  with gradient checkpointing: the hidden state at every layer boundary,
               L x T x H x b, + one layer's full activations while it is recomputed for backward;
               without it: L x that layer. One layer keeps ACT_H x H + ACT_I x I elements per
               token, counted from the tensors autograd saves in a Qwen decoder layer: two RMSNorm
               inputs and outputs (4 H), the token mixer's projections, attention output and gate
               (~6 H: q + output gate 2 H, k/v, attention output, gated output; Gated DeltaNet
               layers: qkv, z, conv output, core output), the SwiGLU MLP's gate, up, silu(gate) and
               their product (4 I). Flash/SDPA attention keeps no seq x seq scores. (Korthikanti
               et al. 2022 count 34 x T x H bytes for a GPT layer with a 4 H GeLU MLP; ours is
               (2 x 10 + 2 x 4 x 3) = 44 x T x H bytes for Qwen3.5-9B's 3 H SwiGLU.) An estimate:
               bench/gpu_check.py prints it beside the measured peak.
- logits chunk  positions x V x 4 bytes x 3: the fp32 logits / temperature, the log_softmax
               output kept for backward, and its gradient in backward (the bf16 lm_head output is
               freed once upcast). Each chunk is recomputed in backward (learner/logprobs.py), so
               one chunk is live at a time: positions = min(logit_rows x logprob_chunk_tokens, T),
               or T with no chunking. logit_rows = 1 is the schema's contract ("vocab x chunk"):
               chunks cut from the micro-batch's flattened rows x positions. A chunk that takes
               `chunk` positions of every row side by side holds rows x chunk positions, and a
               micro-batch packed with rows shorter than the chunk puts all T in one chunk.
- sync         rank 0's two send buffers: 2 x max(weight_sync.bucket_mb, the largest tensor,
               V x H x b, which travels alone); under ZeRO-3 the one parameter gathered while it
               is packed (the largest). Not live during training; counted at its own peak.
- overhead     LEARNER_OVERHEAD_GIB: CUDA context, NCCL and DeepSpeed bucket buffers (reduce
               bucket 5e8 elements = 1 GB in bf16), allocator fragmentation.

rollout engine GPU (vLLM: it takes gpu_memory_utilization x the GPU and needs, within it)
- weights      P x b / tensor_parallel_size: the text model only (engines are started with vLLM's
               language_model_only, so a multimodal checkpoint's vision tower is never built).
- KV cache     full-attention layers x 2 (K and V) x max(1, kv_heads / tp) x head_dim x b
               x max_model_len x concurrent sequences: every sequence of a step at full length,
               so the step runs without preemption. Linear-attention layers keep no KV cache.
- linear state per sequence and linear-attention layer: the recurrent state (value heads / tp)
               x key_head_dim x value_head_dim x state bytes (fp32) + the conv state
               conv_dim / tp x (kernel - 1) x b; x concurrent sequences.
- sync         two receive buffers of the same size on every TP worker (it receives whole
               tensors), and the decoder layer vLLM's in-place reload builds before copying it
               into place (the largest layer x b / tp).
- overhead     ENGINE_OVERHEAD_GIB: CUDA context, CUDA graphs, the profiling run's activations
               and sampler buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from conf.errors import ConfigError, EnvironmentSetupError
from learner.model_shapes import ModelShape

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_STATE_BYTES = 8  # fp32 m and v
MASTER_WEIGHT_BYTES = 4  # fp32 copy kept by the mixed-precision optimizer
ACT_H, ACT_I = 10, 4  # saved elements per token per layer: ACT_H x H + ACT_I x I (module docstring)
LOGIT_FP32_COPIES = 3  # logits, log_softmax output, its gradient
# Round figures, not measurements: a CUDA context is ~0.5-1 GiB; DeepSpeed's ZeRO buckets ~1-2 GiB
# in bf16; vLLM's CUDA graphs and profiling peak ~1-2 GiB for a 9B model. bench/gpu_check.py
# measures the learner's side on one GPU.
LEARNER_OVERHEAD_GIB = 3.0
ENGINE_OVERHEAD_GIB = 3.0


@dataclass(frozen=True)
class LearnerSetup:
    world_size: int
    zero_stage: int
    dtype: str  # float32 | bfloat16 | float16
    gradient_checkpointing: bool
    tokens_per_micro_batch: int  # padded tokens (rows x padded width) in the largest micro-batch
    logprob_chunk_tokens: int  # 0 = the whole micro-batch's logits at once
    offload_optimizer: bool = False
    offload_params: bool = False
    logit_rows: int = 1  # rows whose chunks are projected together (1: chunks of the flattened positions)
    sync_bucket_mb: int = 256  # weight_sync.bucket_mb


@dataclass(frozen=True)
class EngineSetup:
    num_engines: int
    tensor_parallel_size: int
    max_model_len: int  # prompt + response tokens
    concurrent_sequences: int  # sequences one engine holds at once
    gpu_memory_utilization: float
    dtype: str
    sync_bucket_mb: int = 256  # weight_sync.bucket_mb


@dataclass(frozen=True)
class RoleMemory:
    """One GPU of one role. `gpu` and `cpu` map an item to bytes; `budget` is what the role may use."""

    role: str
    count: int  # learner ranks, or engines
    gpu: dict[str, int]
    budget: int
    budget_note: str
    cpu: dict[str, int] = field(default_factory=dict)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())


@dataclass(frozen=True)
class MemoryPlan:
    model_params: int
    gpu_memory: int  # bytes per GPU
    learner: RoleMemory
    engine: RoleMemory
    learner_setup: LearnerSetup
    engine_setup: EngineSetup


def plan_memory(model: ModelShape, learner: LearnerSetup, engine: EngineSetup, gpu_memory_gib: float) -> MemoryPlan:
    gpu = int(gpu_memory_gib * GIB)
    return MemoryPlan(model.params, gpu, _learner(model, learner, gpu), _engine(model, engine, gpu), learner, engine)


def _learner(model: ModelShape, s: LearnerSetup, gpu: int) -> RoleMemory:
    if s.dtype not in DTYPE_BYTES:
        raise ConfigError(f"model.dtype {s.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if s.offload_params and s.zero_stage != 3:
        raise ConfigError(f"learner.offload_params needs learner.zero_stage=3 (got {s.zero_stage})")
    if s.offload_optimizer and s.zero_stage == 0:
        raise ConfigError("learner.offload_optimizer needs learner.zero_stage >= 1 (got 0)")
    p, b, w = model.params, DTYPE_BYTES[s.dtype], s.world_size
    opt_shards = w if s.zero_stage >= 1 else 1
    grad_shards = w if s.zero_stage >= 2 else 1
    param_shards = w if s.zero_stage >= 3 else 1
    optimizer = p * (ADAM_STATE_BYTES + (MASTER_WEIGHT_BYTES if b < 4 else 0)) // opt_shards
    weights = p * b // param_shards
    gpu_items: dict[str, int] = {}
    cpu_items: dict[str, int] = {}
    (cpu_items if s.offload_params else gpu_items)["weights"] = weights
    gpu_items["gradients"] = p * b // grad_shards
    if s.offload_optimizer:
        cpu_items["optimizer states"] = optimizer
        cpu_items["gradients (fp32, CPU Adam)"] = p * 4 // opt_shards
    else:
        gpu_items["optimizer states"] = optimizer
    if s.zero_stage == 3 and (w > 1 or s.offload_params):
        largest = max(model.vocab_size * model.hidden_size, model.full_layer_params, model.linear_layer_params)
        gpu_items["ZeRO-3 gathered module + grad"] = 2 * largest * b
    t = s.tokens_per_micro_batch
    layer = t * (ACT_H * model.hidden_size + ACT_I * model.intermediate_size) * b
    if s.gradient_checkpointing:
        gpu_items["activations: layer checkpoints"] = model.num_layers * t * model.hidden_size * b
        gpu_items["activations: one layer"] = layer
    else:
        gpu_items["activations: all layers"] = model.num_layers * layer
    positions = min(s.logit_rows * s.logprob_chunk_tokens, t) if s.logprob_chunk_tokens > 0 else t
    gpu_items["logits chunk"] = positions * model.vocab_size * 4 * LOGIT_FP32_COPIES
    sync = sync_memory(model, s.dtype, s.sync_bucket_mb)
    gpu_items["sync: 2 send buffers (rank 0)"] = sync["buffers"]
    if s.zero_stage == 3:
        gpu_items["sync: gathered param (rank 0)"] = sync["tensor"]
    gpu_items["overhead"] = int(LEARNER_OVERHEAD_GIB * GIB)
    shard = f"ZeRO-{s.zero_stage} {s.dtype} over {w}" + (", optimizer offloaded" if s.offload_optimizer else "") + (
        ", params offloaded" if s.offload_params else "")
    return RoleMemory(f"learner rank ({shard})", w, gpu_items, gpu, "the GPU", cpu_items)


def _engine(model: ModelShape, s: EngineSetup, gpu: int) -> RoleMemory:
    tp, b = s.tensor_parallel_size, DTYPE_BYTES[s.dtype]
    kv_heads = max(1, model.num_kv_heads // tp)
    items = {
        "weights": -(-model.params * b // tp),  # text only: the vision tower is never built (language_model_only)
        "KV cache (full-attention layers)": (model.full_attention_layers * 2 * kv_heads * model.head_dim * b
                                             * s.max_model_len * s.concurrent_sequences),
    }
    if model.linear is not None:
        lin = model.linear
        per_seq = (-(-lin.num_value_heads // tp) * lin.key_head_dim * lin.value_head_dim * lin.state_bytes
                   + -(-lin.conv_dim // tp) * (lin.conv_kernel - 1) * b)
        items["linear-attention state"] = model.linear_layers * per_seq * s.concurrent_sequences
    sync = sync_memory(model, s.dtype, s.sync_bucket_mb)
    items["sync: 2 receive buffers"] = sync["buffers"]  # every TP worker receives whole tensors
    items["sync: layer being reloaded"] = -(-sync["layer"] // tp)
    items["overhead"] = int(ENGINE_OVERHEAD_GIB * GIB)
    budget = int(s.gpu_memory_utilization * gpu)
    note = f"gpu_memory_utilization {s.gpu_memory_utilization:g} x {gpu / GIB:.1f}"
    role = (f"rollout engine GPU (tp {tp}, {s.concurrent_sequences} sequences x {s.max_model_len} tokens)")
    return RoleMemory(role, s.num_engines, items, budget, note)


def sync_memory(model: ModelShape, dtype: str, bucket_mb: int) -> dict[str, int]:
    """Bytes the weight sync holds (cluster/transport.py): a bucket is bucket_mb, or one tensor
    alone when larger (the embedding, V x H); the sender keeps two (one packed while the other
    travels) and a receiver two (one arriving while the engine loads the other). Under ZeRO-3
    rank 0 gathers one parameter at a time as it packs it. vLLM's in-place reload builds a
    layer anew before copying it into place: one decoder layer more."""
    b = DTYPE_BYTES[dtype]
    tensor = max(model.vocab_size * model.hidden_size, model.intermediate_size * model.hidden_size) * b
    bucket = max(bucket_mb * 2**20, tensor)
    return {"buffers": 2 * bucket, "tensor": tensor, "bucket": bucket,
            "layer": max(model.full_layer_params, model.linear_layer_params) * b}


def sync_line(plan: MemoryPlan) -> str:
    learner, engine = plan.learner.gpu, plan.engine.gpu
    gathered = learner.get("sync: gathered param (rank 0)", 0)
    return (f"plan: weight sync (GiB): learner rank 0 {_gib(learner['sync: 2 send buffers (rank 0)'])} "
            f"in 2 send buffers + {_gib(gathered)} gathered parameter; every engine worker "
            f"{_gib(engine['sync: 2 receive buffers'])} in 2 receive buffers + "
            f"{_gib(engine['sync: layer being reloaded'])} for the layer being reloaded")


def check(plan: MemoryPlan, cpu_memory_gib: float | None = None) -> None:
    """Raise EnvironmentSetupError naming every role that does not fit, what exceeds what, and
    the knobs that lower it. `cpu_memory_gib`: host memory of the node the learner ranks share
    (ranks are packed onto one node); None = not checked."""
    problems = []
    for role, knobs in ((plan.learner, _learner_knobs(plan)), (plan.engine, _engine_knobs(plan))):
        if role.gpu_total > role.budget:
            items = ", ".join(f"{k} {_gib(v)}" for k, v in role.gpu.items())
            problems.append(f"{role.role}: needs {_gib(role.gpu_total)} GiB > {_gib(role.budget)} GiB "
                            f"({role.budget_note}): {items}. Lower it with: {knobs}")
    if cpu_memory_gib is not None:
        cpu_need = plan.learner.cpu_total * plan.learner.count
        if cpu_need > cpu_memory_gib * GIB:
            problems.append(f"learner offload: {plan.learner.count} ranks x {_gib(plan.learner.cpu_total)} GiB = "
                            f"{_gib(cpu_need)} GiB of CPU memory > {cpu_memory_gib:.1f} GiB. Lower it with: more "
                            f"learner.world_size (over several nodes), learner.offload_params=false")
    if problems:
        raise EnvironmentSetupError(f"the memory plan does not fit on {_gib(plan.gpu_memory)} GiB GPUs (GiB per GPU):\n  "
                                    + "\n  ".join(problems))


def _learner_knobs(plan: MemoryPlan) -> str:
    s, gpu = plan.learner_setup, plan.learner.gpu
    knobs = [f"learner.world_size (now {s.world_size}; shards the ZeRO-partitioned lines)"]
    if s.zero_stage < 3:
        knobs.append(f"learner.zero_stage=3 (now {s.zero_stage}; also shards gradients and weights)")
    if not s.offload_optimizer and s.zero_stage >= 1:
        knobs.append(f"learner.offload_optimizer=true (moves {_gib(gpu['optimizer states'])} GiB to CPU memory)")
    if not s.offload_params and s.zero_stage == 3:
        knobs.append(f"learner.offload_params=true (moves {_gib(gpu['weights'])} GiB to CPU memory)")
    activations = sum(v for k, v in gpu.items() if k.startswith("activations"))
    knobs.append(f"learner.max_tokens_per_micro_batch (now {s.tokens_per_micro_batch} tokens: "
                 f"{_gib(activations)} GiB of activations)")
    knobs.append(f"learner.logprob_chunk_tokens (now {s.logprob_chunk_tokens}: {_gib(gpu['logits chunk'])} GiB of logits)")
    if not s.gradient_checkpointing:
        knobs.append("model.gradient_checkpointing=true")
    return "; ".join(knobs)


def _engine_knobs(plan: MemoryPlan) -> str:
    s = plan.engine_setup
    return "; ".join([
        f"rollout.tensor_parallel_size (now {s.tensor_parallel_size}; divides weights, KV heads and state)",
        f"rollout.num_engines (now {s.num_engines}; fewer sequences per engine)",
        f"rollout.sampling.max_new_tokens (max_model_len now {s.max_model_len})",
        f"gpu_memory_utilization (now {s.gpu_memory_utilization:g})",
    ])


def format_plan(plan: MemoryPlan) -> str:
    """The console table: GiB per item, one line per item per role."""
    lines = [(f"memory plan (GiB per GPU; text model {plan.model_params:,} params, {_gib(plan.gpu_memory)} GiB GPUs; "
              "each item at its own peak, so the totals are upper bounds)")]
    for role in (plan.learner, plan.engine):
        lines.append(f"{role.role} x {role.count}")
        lines += [f"  {item:<34}{_gib(v):>8}" for item, v in role.gpu.items()]
        verdict = "fits" if role.gpu_total <= role.budget else "DOES NOT FIT"
        lines.append(f"  {'total':<34}{_gib(role.gpu_total):>8}  of {_gib(role.budget)} ({role.budget_note}): {verdict}")
        lines += [f"  CPU: {item:<29}{_gib(v):>8}" for item, v in role.cpu.items()]
        if role.cpu:
            lines.append(f"  CPU: {'total per rank':<29}{_gib(role.cpu_total):>8}")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def plan_from_config(cfg, model_config: dict, gpu_memory_gib: float, *, gpu_memory_utilization: float = 0.85,
                     max_num_seqs: int = 256) -> MemoryPlan:
    """The plan for a conf.schema.Config. `gpu_memory_utilization` is the one actors/vllm_engine.py
    passes (0.85); `max_num_seqs` is vLLM's cap on sequences in flight per engine."""
    lr, ro = cfg.learner, cfg.rollout
    train_len = cfg.data.max_prompt_tokens + ro.sampling.max_new_tokens  # longest training row
    if lr.max_tokens_per_micro_batch > 0:
        tokens = max(lr.max_tokens_per_micro_batch, train_len)  # a row longer than the budget goes alone
    else:
        tokens = lr.micro_batch_size * train_len
    learner = LearnerSetup(
        world_size=lr.world_size, zero_stage=lr.zero_stage, dtype=cfg.model.dtype,
        gradient_checkpointing=cfg.model.gradient_checkpointing, tokens_per_micro_batch=tokens,
        logprob_chunk_tokens=lr.logprob_chunk_tokens, offload_optimizer=lr.offload_optimizer,
        offload_params=lr.offload_params, sync_bucket_mb=cfg.weight_sync.bucket_mb)
    per_engine = -(-ro.n * cfg.data.prompts_per_step // ro.num_engines)
    engine = EngineSetup(
        num_engines=ro.num_engines, tensor_parallel_size=ro.tensor_parallel_size,
        max_model_len=cfg.data.max_prompt_tokens + max(ro.sampling.max_new_tokens, ro.val_sampling.max_new_tokens),
        concurrent_sequences=min(per_engine, max_num_seqs), gpu_memory_utilization=gpu_memory_utilization,
        dtype=cfg.model.dtype, sync_bucket_mb=cfg.weight_sync.bucket_mb)
    return plan_memory(ModelShape.from_hf_config(model_config), learner, engine, gpu_memory_gib)


def startup_plan(cfg) -> str:
    """The plan for this run as a console table; raises (with the numbers) when it cannot fit.
    Uses the visible GPU's memory, else trainer.gpu_memory_gib (planning on a machine without
    the run's GPUs, e.g. `mode=check` on a laptop)."""
    import torch

    from learner.model_shapes import model_config, run_model_name

    gib = cfg.trainer.gpu_memory_gib
    if torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / GIB
    plan = plan_from_config(cfg, model_config(run_model_name(cfg.model)), gib)
    text = format_plan(plan) + "\n" + sync_line(plan)
    check(plan)
    return text
