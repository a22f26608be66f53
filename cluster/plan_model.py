"""The run planner's model (docs/design.md#the-run-planner): one step's phase times, the run's hours,
compute cost and judge spend, from the model's shape, the config, per-GPU figures and the stated
assumptions (cluster/plan_inputs.py). Pure arithmetic: no torch, no Ray.

P below is the weights a token passes through as matrix products: the text model less its input
embedding table when the head is untied (a lookup reads one row per token).

- generate: decode is bandwidth-bound. Each decode step of an engine reads its weights (P x b / tp)
  once, the KV cache of its full-attention layers for every active sequence, and reads and writes
  the linear-attention state of every active sequence; the step's generation lasts as many decode
  steps as its longest sample. time = bytes / (HBM bandwidth x decode_efficiency), or the FLOPs
  (2 x P per token, prefill included) / (peak x training_mfu) when that is larger.
- judge: the step's stories reach the judge together when generation ends; with latencies uniform
  over [lo, hi] the last of n answers after lo + (hi - lo) x n / (n + 1); more than
  judge.max_in_flight go in waves; judge.rpm / input_tpm pace the sending.
- train: (6 + 2 per extra forward) x P x tokens / (learners x peak x training_mfu): forward and
  backward, plus the recomputed forward under gradient checkpointing (our learner takes the old
  log-probabilities from the loss's own forward: no separate pass); plus the optimizer step
  (HBM traffic on the GPU, or PCIe + CPU Adam when offloaded).
- sync: ZeRO-3's all-gather of the weights + rank 0's send to the engines + the engines' in-place
  load. Colocated engines take the gathered weights on their own GPU, and the learner moves its
  resident state to host memory and back around each generation (swap).
- the step: on-policy phases run in sequence; rollout.max_staleness=1 overlaps the next step's
  generation with judging and training (separate GPUs) or with judging only (colocated).
Left out: attention's own FLOPs (~2% of conf=polaris's training: 8 of 32 layers attend over ~5k
tokens), tensor-parallel all-reduces in decode, retries of judgments the flex tier sheds (429/503
bill nothing), and start-up.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cluster.plan_inputs import Assumptions, GpuSpec
from conf.errors import ConfigError, EnvironmentSetupError
from learner.memory_plan import DTYPE_BYTES, ENGINE_OVERHEAD_GIB, GIB, MemoryPlan, check, plan_from_config
from learner.model_shapes import ModelShape

LAYOUTS = ("separate", "colocated")
PHASES = ("generate", "judge_tail", "train", "sync", "step")  # as metrics.jsonl's time/<phase>
ADAM_BYTES_PER_PARAM = 32  # GPU AdamW: read param, grad, m, v and fp32 master; write param, m, v, master
LENGTH_GRID = 400  # points over the requested-length range


@dataclass(frozen=True)
class Layout:
    kind: str  # separate: engines and learners on disjoint GPUs | colocated: both on every GPU, in turn
    gpus: int
    engines: int
    learners: int
    tensor_parallel: int

    def describe(self) -> str:
        if self.kind == "colocated":
            return (f"colocated: {self.engines} engine(s) x tp {self.tensor_parallel} and {self.learners} learner "
                    f"rank(s) share all {self.gpus} GPUs in turn")
        return f"separate: {self.engines} engine(s) x tp {self.tensor_parallel} + {self.learners} learner rank(s)"


@dataclass(frozen=True)
class Lengths:
    """Response lengths (tokens) over the requested-length range: means, and the story's share."""

    mean: float
    mean_square: float
    story_mean: float


@dataclass(frozen=True)
class Workload:
    sequences: int  # generated per step
    rows: int  # trained and judged per step (the reference rows included)
    prompt_tokens: float
    decode_steps: int
    lengths: Lengths
    target_words: tuple[float, float]
    val_runs: int
    val_sequences: int
    val_decode_steps: int
    val_lengths: Lengths

    @property
    def train_tokens(self) -> float:
        return self.rows * (self.prompt_tokens + self.lengths.mean)


@dataclass(frozen=True)
class StepTimes:
    generate_s: float
    judge_tail_s: float
    train_s: float
    sync_s: float
    swap_s: float  # colocated: the learner's state to host memory and back
    step_s: float
    overlapped: bool  # rollout.max_staleness=1: the next generation runs beside this step's judging

    def by_phase(self) -> dict[str, float]:
        return {"generate": self.generate_s, "judge_tail": self.judge_tail_s, "train": self.train_s,
                "sync": self.sync_s + self.swap_s, "step": self.step_s}

    def _waits(self) -> dict[str, float]:
        return {"generate": self.generate_s, "judge": self.judge_tail_s, "train": self.train_s,
                "sync": self.sync_s + self.swap_s}

    @property
    def bottleneck(self) -> str:
        waits = self._waits()
        return max(waits, key=waits.get)

    @property
    def bottleneck_share(self) -> float:
        return self._waits()[self.bottleneck] / self.step_s


@dataclass(frozen=True)
class JudgeCall:
    input_tokens: float
    output_tokens: float
    usd: float


@dataclass(frozen=True)
class RunPlan:
    layout: Layout
    gpu: GpuSpec
    assumptions: Assumptions
    model_params: int
    matmul_params: int
    workload: Workload
    step: StepTimes
    validation_s: float  # one periodic validation
    judge_call: JudgeCall
    val_judge_call: JudgeCall
    steps: int
    memory: MemoryPlan

    @property
    def run_hours(self) -> float:
        return (self.steps * self.step.step_s + self.workload.val_runs * self.validation_s) / 3600

    @property
    def compute_usd(self) -> float:
        return self.layout.gpus * self.run_hours * self.gpu.usd_per_hour

    @property
    def judge_calls(self) -> int:
        return self.steps * self.workload.rows + self.workload.val_runs * self.workload.val_sequences

    @property
    def judge_usd(self) -> float:
        return (self.steps * self.workload.rows * self.judge_call.usd
                + self.workload.val_runs * self.workload.val_sequences * self.val_judge_call.usd)


def plan_metrics(predicted: dict[str, float], measured: dict) -> dict[str, float]:
    """The step's predicted phase times beside the measured ones (metrics.jsonl, W&B): predicted is
    StepTimes.by_phase() of the run's plan; plan/step_vs_predicted = measured time/step / predicted."""
    out = {f"plan/{phase}_s_predicted": seconds for phase, seconds in predicted.items()}
    step = measured.get("time/step")
    if isinstance(step, (int, float)) and predicted.get("step"):
        out["plan/step_vs_predicted"] = step / predicted["step"]
    return out


def matmul_params(shape: ModelShape) -> int:
    return shape.params - (0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size)


def response_lengths(cap: int, think: float, tokens_per_word: float, words: tuple[float, float]) -> Lengths:
    """Requested words uniform over `words`; a response is its thinking and a story of the
    requested length, cut at the response limit."""
    lo, hi = words
    points = [lo + (hi - lo) * (k + 0.5) / LENGTH_GRID for k in range(LENGTH_GRID)]
    totals = [min(cap, think + tokens_per_word * w) for w in points]
    return Lengths(mean=sum(totals) / len(totals), mean_square=sum(t * t for t in totals) / len(totals),
                   story_mean=sum(max(0.0, t - think) for t in totals) / len(totals))


def workload(cfg, a: Assumptions, bucket_edges_words: tuple[float, ...]) -> Workload:
    """bucket_edges_words: the evaluation's length buckets (eval/metrics.py). Training prompts ask
    for the in-distribution range (its first two buckets), the periodic validation for all of them."""
    ro, hri = cfg.rollout, cfg.algorithm.hri.enable
    scale = cfg.eval.length_scale
    think = a.thinking_fill * cfg.reward.think_budget_tokens if cfg.model.enable_thinking else 0.0
    train_words = (bucket_edges_words[0] * scale, bucket_edges_words[2] * scale)
    val_words = (bucket_edges_words[0] * scale, bucket_edges_words[-1] * scale)
    policy_rows = ro.n - 1 if hri else ro.n  # the reference row needs no generation (from step 1 on)
    every = cfg.trainer.eval_every
    return Workload(
        sequences=cfg.data.prompts_per_step * policy_rows, rows=cfg.data.prompts_per_step * ro.n,
        prompt_tokens=a.prompt_fill * cfg.data.max_prompt_tokens,
        decode_steps=math.ceil(a.longest_sample_fill * ro.sampling.max_new_tokens),
        lengths=response_lengths(ro.sampling.max_new_tokens, think, a.tokens_per_word, train_words),
        target_words=train_words, val_runs=cfg.trainer.total_steps // every if every else 0,
        val_sequences=cfg.eval.subset_size,
        val_decode_steps=math.ceil(a.longest_sample_fill * ro.val_sampling.max_new_tokens),
        val_lengths=response_lengths(ro.val_sampling.max_new_tokens, think, a.tokens_per_word, val_words))


def generate_s(shape: ModelShape, gpu: GpuSpec, a: Assumptions, *, dtype_bytes: int, sequences: int, engines: int,
               tensor_parallel: int, lengths: Lengths, prompt_tokens: float, decode_steps: int) -> float:
    """One engine's share of a generation (engines run side by side), time per tp GPU."""
    tp, per_engine = tensor_parallel, math.ceil(sequences / engines)
    kv_per_token = shape.full_attention_layers * 2 * max(1, shape.num_kv_heads // tp) * shape.head_dim * dtype_bytes
    state_per_token = 0  # linear attention: the recurrent state read and written at every decode step
    if shape.linear is not None:
        lin = shape.linear
        state_per_token = 2 * shape.linear_layers * math.ceil(lin.num_value_heads / tp) * lin.key_head_dim \
            * lin.value_head_dim * lin.state_bytes
    # a sequence of L tokens reads its context at each of its decode steps: sum over steps = L^2 / 2 + prompt x L
    contexts = per_engine * (lengths.mean_square / 2 + prompt_tokens * lengths.mean)
    moved = (decode_steps * matmul_params(shape) * dtype_bytes / tp + contexts * kv_per_token
             + per_engine * lengths.mean * state_per_token)
    flops = 2 * matmul_params(shape) * per_engine * (lengths.mean + prompt_tokens) / tp
    return max(moved / (gpu.hbm_bytes_per_s * a.decode_efficiency), flops / (gpu.peak_bf16_flops * a.training_mfu))


def judge_call(cfg, a: Assumptions, *, story_tokens: float, prompt_tokens: float) -> JudgeCall:
    """Tokens and dollars of one judgment: the rubric prompt, the writing prompt and the story in;
    the JSON answer (every dimension's evidence at the rubric's word limit) and the thoughts out."""
    from reward.rubric import SYSTEM_INSTRUCTION, build_judge_request
    from reward.spend import Prices, dollars

    j = cfg.judge
    wrapper = len(build_judge_request("", "").user_text)
    tokens_in = (len(SYSTEM_INSTRUCTION) + wrapper) / a.chars_per_token + prompt_tokens + story_tokens
    tokens_out = answer_tokens(a) + a.judge_thought_tokens
    if j.max_output_tokens:
        tokens_out = min(tokens_out, j.max_output_tokens)
    usd = dollars(tokens_in, tokens_out, Prices.of(j.price), flex=j.service_tier == "flex")
    return JudgeCall(tokens_in, tokens_out, usd)


def _answer_frame_tokens(a: Assumptions) -> float:
    """The JSON answer without its evidence texts: every dimension's name, keys and score."""
    from reward.rubric import DIMENSIONS

    return sum(len(f'"{name}": {{"evidence": "", "score": {mx}}}, ') for name, (mx, _) in DIMENSIONS.items()) \
        / a.chars_per_token


def answer_tokens(a: Assumptions) -> float:
    """The judge's visible answer: the JSON frame and every dimension's evidence quote."""
    from reward.rubric import DIMENSIONS

    return _answer_frame_tokens(a) + len(DIMENSIONS) * a.judge_evidence_words * a.tokens_per_word


def evidence_words_for(visible_tokens: float, a: Assumptions) -> int:
    """judge_evidence_words that makes answer_tokens() a measured visible answer (the inverse)."""
    from reward.rubric import DIMENSIONS

    return max(0, round((visible_tokens - _answer_frame_tokens(a)) / (len(DIMENSIONS) * a.tokens_per_word)))


def judge_latency_range(cfg, a: Assumptions) -> tuple[float, float]:
    j = cfg.judge
    if j.backend == "local":
        return j.local.latency_min_s, j.local.latency_max_s
    if j.service_tier == "flex":
        return a.flex_latency_min_s, a.flex_latency_max_s
    return a.standard_latency_min_s, a.standard_latency_max_s


def judge_tail_s(cfg, a: Assumptions, *, calls: int, input_tokens: float) -> float:
    """From the moment a step's stories are generated to its last judgment."""
    j = cfg.judge
    lo, hi = judge_latency_range(cfg, a)
    waves = math.ceil(calls / j.max_in_flight)
    last_wave = calls - (waves - 1) * j.max_in_flight
    tail = (waves - 1) * (lo + hi) / 2 + lo + (hi - lo) * last_wave / (last_wave + 1)
    burst = j.rpm_burst or j.rpm // 10
    paced = max(0, calls - burst) / j.rpm * 60 if j.rpm else 0.0
    if j.input_tpm:  # the first minute's allowance goes at once
        paced = max(paced, max(0.0, calls * input_tokens - j.input_tpm) / j.input_tpm * 60)
    return max(tail, paced + (lo + hi) / 2)


def train_s(shape: ModelShape, gpu: GpuSpec, a: Assumptions, cfg, *, tokens: float, learners: int) -> float:
    lr, b = cfg.learner, DTYPE_BYTES[cfg.model.dtype]
    extra_forwards = 1 if cfg.model.gradient_checkpointing else 0
    flops = (6 + 2 * extra_forwards) * matmul_params(shape) * tokens
    compute = flops / (learners * gpu.peak_bf16_flops * a.training_mfu)
    shard = shape.params / learners if lr.zero_stage >= 1 else shape.params
    link = a.link_efficiency * gpu.pcie_bytes_per_s
    if lr.offload_optimizer:  # gradients down in fp32, weights back up; CPU Adam on the node's cores
        node_params = shard * min(learners, a.gpus_per_node)
        optimizer = shard * (4 + b) / link + node_params / a.cpu_adam_params_per_s
    else:
        optimizer = shard * ADAM_BYTES_PER_PARAM / gpu.hbm_bytes_per_s
    if lr.offload_params:  # each forward and the backward fetch this rank's weight shard from host memory
        optimizer += (2 + extra_forwards) * shape.params / learners * b / link
    return compute + optimizer


def sync_s(shape: ModelShape, gpu: GpuSpec, a: Assumptions, cfg, layout: Layout) -> float:
    b, w = DTYPE_BYTES[cfg.model.dtype], layout.learners
    weights = shape.params * b

    def link(gpus: int) -> float:
        return a.link_efficiency * (gpu.nvlink_bytes_per_s if gpus <= a.gpus_per_node else gpu.network_bytes_per_s)

    gather = weights * (w - 1) / w / link(w) if cfg.learner.zero_stage == 3 and w > 1 else 0.0
    # separate: rank 0's broadcast to every engine (NCCL pipelines it: one pass of the bytes);
    # colocated: each engine loads from the weights gathered on its own GPU
    send = weights / link(layout.gpus) if layout.kind == "separate" else 0.0
    load = 2 * weights / layout.tensor_parallel / gpu.hbm_bytes_per_s  # the in-place load reads and writes
    return gather + send + load


def swap_s(gpu: GpuSpec, a: Assumptions, memory: MemoryPlan) -> float:
    """Colocated: the learner's resident weights and optimizer state go to host memory before each
    generation and come back before training (a sleeping engine drops its KV cache and weights:
    the sync refills them)."""
    resident = memory.learner.gpu.get("weights", 0) + memory.learner.gpu.get("optimizer states", 0)
    return 2 * resident / (a.link_efficiency * gpu.pcie_bytes_per_s)


def step_time(kind: str, staleness: int, generate: float, judge: float, train: float, sync: float) -> float:
    if staleness == 0:
        return generate + judge + train + sync
    if kind == "colocated":  # the next step generates while this one is judged, then training has the GPUs
        return max(generate, judge) + train + sync
    return max(generate, judge + train) + sync


def layout_memory(cfg, model_config: dict, gpu: GpuSpec, layout: Layout) -> MemoryPlan:
    """The memory plan of this split; raises EnvironmentSetupError (with the numbers) when it cannot fit.
    Colocated: the learner trains beside a sleeping engine (its CUDA context and graphs stay)."""
    planned = dataclasses.replace(
        cfg, learner=dataclasses.replace(cfg.learner, world_size=layout.learners),
        rollout=dataclasses.replace(cfg.rollout, num_engines=layout.engines))
    memory = plan_from_config(planned, model_config, gpu.memory_gib)
    if layout.kind == "colocated":
        budget = memory.gpu_memory - int(ENGINE_OVERHEAD_GIB * GIB)
        note = f"the GPU less a sleeping engine's {ENGINE_OVERHEAD_GIB:g} GiB"
        memory = dataclasses.replace(memory, learner=dataclasses.replace(memory.learner, budget=budget,
                                                                         budget_note=note))
    check(memory)
    return memory


def plan_run(cfg, model_config: dict, gpu: GpuSpec, layout: Layout, a: Assumptions,
             bucket_edges_words: tuple[float, ...]) -> RunPlan:
    shape = ModelShape.from_hf_config(model_config)
    memory = layout_memory(cfg, model_config, gpu, layout)
    work = workload(cfg, a, bucket_edges_words)
    b = DTYPE_BYTES[cfg.model.dtype]
    gen = dict(dtype_bytes=b, engines=layout.engines, tensor_parallel=layout.tensor_parallel,
               prompt_tokens=work.prompt_tokens)
    generate = generate_s(shape, gpu, a, sequences=work.sequences, lengths=work.lengths,
                          decode_steps=work.decode_steps, **gen)
    call = judge_call(cfg, a, story_tokens=work.lengths.story_mean, prompt_tokens=work.prompt_tokens)
    judge = judge_tail_s(cfg, a, calls=work.rows, input_tokens=call.input_tokens)
    train = train_s(shape, gpu, a, cfg, tokens=work.train_tokens, learners=layout.learners)
    sync = sync_s(shape, gpu, a, cfg, layout)
    swap = swap_s(gpu, a, memory) if layout.kind == "colocated" else 0.0
    step = step_time(layout.kind, cfg.rollout.max_staleness, generate, judge, train, sync + swap)
    val_call = judge_call(cfg, a, story_tokens=work.val_lengths.story_mean, prompt_tokens=work.prompt_tokens)
    validation = (generate_s(shape, gpu, a, sequences=work.val_sequences, lengths=work.val_lengths,
                             decode_steps=work.val_decode_steps, **gen)
                  + judge_tail_s(cfg, a, calls=work.val_sequences, input_tokens=val_call.input_tokens))
    times = StepTimes(generate, judge, train, sync, swap, step, overlapped=cfg.rollout.max_staleness > 0)
    return RunPlan(layout, gpu, a, shape.params, matmul_params(shape), work, times,
                   validation, call, val_call, cfg.trainer.total_steps, memory)


def candidate_layouts(kind: str, gpus: int, tensor_parallel: int) -> list[Layout]:
    if kind not in LAYOUTS:
        raise ConfigError(f"--layout {kind!r} is not one of {', '.join(LAYOUTS)}")
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1 (got {gpus})")
    if kind == "colocated":
        if gpus % tensor_parallel:
            raise ConfigError(f"--gpus {gpus} is not a multiple of rollout.tensor_parallel_size={tensor_parallel}")
        return [Layout(kind, gpus, gpus // tensor_parallel, gpus, tensor_parallel)]
    return [Layout(kind, gpus, e, gpus - e * tensor_parallel, tensor_parallel)
            for e in range(1, (gpus - 1) // tensor_parallel + 1)]


def best_plan(cfg, model_config: dict, gpu: GpuSpec, kind: str, gpus: int, a: Assumptions,
              bucket_edges_words: tuple[float, ...]) -> RunPlan:
    """The fastest split of `gpus` between engines and learners that fits memory (every GPU used)."""
    plans, refused = [], []
    for layout in candidate_layouts(kind, gpus, cfg.rollout.tensor_parallel_size):
        try:
            plans.append(plan_run(cfg, model_config, gpu, layout, a, bucket_edges_words))
        except EnvironmentSetupError as why:
            lines = str(why).splitlines()
            refused.append(f"{layout.describe()}: {lines[min(1, len(lines) - 1)].strip()[:240]}")
    if not plans:
        tried = "\n  ".join(refused) or "no split leaves a GPU for each role"
        raise EnvironmentSetupError(f"layout {kind} on {gpus} x {gpu.kind}: no split of engines and learners fits "
                                    f"memory:\n  {tried}")
    return min(plans, key=lambda p: (p.step.step_s, -p.layout.learners))
