"""The typed config schema. Defaults here are the original POLARIS HRI run (docs/design.md#the-run);
the YAML files in this folder only override them."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerConfig:
    total_steps: int = 160
    output_dir: str = "outputs/polaris"
    seed: int = 42
    save_every: int = 5  # checkpoint every k steps (0: only at the end and on SIGTERM)
    keep_checkpoints: int = 2  # the newest k complete checkpoints are kept (0 = all)
    resume: str = "auto"  # auto: from output_dir's latest complete checkpoint if any | never | a checkpoint folder
    eval_every: int = 20
    device: str = "cuda"  # cpu | cuda
    gpu_memory_gib: float = 80.0  # for the memory plan when no GPU is visible (the original run: A100 80GB)
    wandb_project: str = "polaris-rl"
    wandb_samples: int = 4  # stories per step in the W&B samples table (0 = none)
    progress_bar: bool = True


@dataclass
class DataConfig:
    train_path: str = "data/polaris/train.parquet"
    prompts_per_step: int = 8
    max_prompt_tokens: int = 256


@dataclass
class TinyModelConfig:
    """Used when model.path == "tiny": the locally built model (learner/tiny_model.py)."""

    seed: int = 0
    architecture: str = "qwen3"  # qwen3 | qwen3_5 (Qwen3.5-9B's hybrid linear/full attention at small dims)
    cache_dir: str = ""  # "" = $POLARIS_CACHE or ~/.cache/polaris-rl


@dataclass
class ModelConfig:
    path: str = "Qwen/Qwen3.5-9B"  # a Hugging Face folder/name, or "tiny"
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    enable_thinking: bool = True
    gradient_checkpointing: bool = True
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 20  # <= 0 disables
    repetition_penalty: float = 1.10
    max_new_tokens: int = 8192


def _validation_sampling() -> SamplingConfig:
    return SamplingConfig(temperature=0.8)


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # hf | vllm
    n: int = 6  # group size; with the reference injected, n-1 rows are policy samples
    num_engines: int = 1
    tensor_parallel_size: int = 1
    max_staleness: int = 0  # 1: step k+1 generates while step k trains (rows one update old, TIS-corrected)
    stream_chunk: int = 0  # requests per engine call; each call's samples go to the judge at once; 0 = all
    max_engine_restarts: int = 3  # a crashed engine is restarted by Ray, re-synced and its step regenerated
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    val_sampling: SamplingConfig = field(default_factory=_validation_sampling)


@dataclass
class HRIConfig:
    enable: bool = True
    peak_weight: float = 0.4
    warmup_steps: int = 15
    decay_steps: int = 0  # then linear from peak_weight to final_weight over this many steps; 0 = stay at peak
    final_weight: float = 0.0


@dataclass
class AlgorithmConfig:
    hri: HRIConfig = field(default_factory=HRIConfig)
    clip_low: float = 0.20
    clip_high: float = 0.28
    adv_eps: float = 1e-6
    tis_cap: float = 2.0  # truncated importance weight cap for off-policy rows (max_staleness > 0)


@dataclass
class LearnerConfig:
    world_size: int = 1
    zero_stage: int = 3
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0  # the lr rises linearly over the first warmup_steps steps (learner/lr_schedule.py)
    lr_schedule: str = "constant"  # after the warmup: constant | linear | cosine (to lr x min_lr_ratio at the last step)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 1  # rows per micro-batch per learner rank (when max_tokens_per_micro_batch = 0)
    max_tokens_per_micro_batch: int = 16384  # padded tokens per micro-batch, rows packed by length; 0 = by rows
    logprob_chunk_tokens: int = 1024  # sequence positions per logits chunk (vocab x chunk, never vocab x seq)
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    optimizer: str = "auto"  # auto (cpu_adam when offloading on cuda, else torch_adamw) | torch_adamw | cpu_adam


@dataclass
class RewardWeights:
    self_rep: float = 1.5
    length: float = 0.8
    blank: float = 1.0


def _validation_weights() -> RewardWeights:
    return RewardWeights(self_rep=0.8, length=0.2, blank=1.0)


@dataclass
class LengthBandConfig:
    min_target: int = 150
    lo_frac: float = 0.15
    lo_min: float = 350
    lo_max: float = 1000
    hi_frac: float = 0.25
    hi_min: float = 600
    hi_max: float = 1500


@dataclass
class RewardConfig:
    weights: RewardWeights = field(default_factory=RewardWeights)
    val_weights: RewardWeights = field(default_factory=_validation_weights)  # the periodic validation's reward
    length: LengthBandConfig = field(default_factory=LengthBandConfig)
    blank_min_visible_ratio: float = 0.10
    blank_min_words: int = 150
    think_budget_tokens: int = 3072
    think_overflow_penalty: float = 0.05
    truncation_start_tokens: int = 7680
    truncation_scale_tokens: int = 512
    token_clip: float = 2.0
    score_mode: str = "sum"  # sum | mean | last
    judge_addressed_penalty: float = 1.0  # subtracted from the story scalar when it addresses the judge


@dataclass
class JudgePriceConfig:
    """Dollars per million tokens on the standard tier (docs/design.md#the-judge); thoughts bill as output."""

    input_per_mtok: float = 0.50
    output_per_mtok: float = 3.00
    flex_factor: float = 0.5  # flex costs this fraction of standard


@dataclass
class LocalJudgeConfig:
    """The loopback judge server (judge.backend=local): latency, its own RPM limit, faults."""

    latency_min_s: float = 0.0
    latency_max_s: float = 0.0
    rpm_limit: int = 0  # 0 = none; the server answers 429 beyond it and counts a violation
    fault_rate: float = 0.0  # mixed evenly: 429, 503, hang past the timeout, truncated JSON, schema-violating JSON
    seed: int = 0
    # a service short of capacity (reward/stand_in_capacity.py): [] = none. Capacity levels, each held
    # capacity_step_s, repeated; requests in service share it; shed (429/503) at shed_factor x capacity
    capacity: list[int] = field(default_factory=list)
    capacity_step_s: float = 30.0
    shed_factor: float = 1.5


@dataclass
class JudgeServiceConfig:
    """A judge service and the reward pool that calls it: model, sampling, tier, limits, retries,
    prices, cache, the loopback server. eval.judge is one; judge (JudgeConfig) adds what only a
    training run does with its judge."""

    backend: str = "gemini"  # local | gemini | openai
    model: str = "gemini-3-flash-preview"
    temperature: float = 0.2
    top_p: float = 0.9
    seed: int = -1  # -1 = none (the OpenAI-compatible evaluation judge uses 42)
    thinking_level: str = "medium"
    max_output_tokens: int = 0  # 0 = the service's default
    service_tier: str = "flex"  # flex | standard
    vertex: bool = False
    api_key_env: str = "GEMINI_API_KEY"
    base_url: str = ""  # "" = the service's default endpoint (or the loopback server for local)
    # one rate limit for the whole project, shared by every reward worker
    rpm: int = 600  # requests per minute; 0 = no limit
    rpm_burst: int = 0  # requests that may go back to back before pacing at rpm; 0 = rpm / 10
    input_tpm: int = 2_000_000  # input tokens per minute; 0 = no limit
    max_in_flight: int = 64
    adaptive_in_flight: bool = True  # in flight follows the service's latency and sheds, under max_in_flight
    initial_in_flight: int = 16  # the adaptive window's start (capped by max_in_flight)
    order: str = "deadline"  # deadline: the story closest to blocking a step first, validation last | fifo
    num_workers: int = 4  # async reward workers (parse, score, retry); they lease from one limiter
    dispatch_batch: int = 16  # stories per Ray call to a worker
    # retries we own: 408/429/5xx, timeouts, bad JSON; then the story is invalid
    max_attempts: int = 6
    backoff_s: float = 2.0
    max_backoff_s: float = 120.0
    timeout_s: float = 900.0  # one attempt (flex latency runs to minutes)
    story_deadline_s: float = 3600.0  # all attempts of one story
    retry_budget: float = 0.2  # retries over 10 s at most this share of first attempts, plus the floor below
    retry_budget_min_per_s: float = 1.0  # a retry beyond the budget waits for it (never fails for it)
    price: JudgePriceConfig = field(default_factory=JudgePriceConfig)
    unanswered_output_tokens: int = 4096  # an attempt sent and never answered is priced at its input estimate + this
    cache: bool = True
    cache_path: str = ""  # "" = {trainer.output_dir}/judge_cache.sqlite
    local: LocalJudgeConfig = field(default_factory=LocalJudgeConfig)


@dataclass
class JudgeConfig(JudgeServiceConfig):
    """The training run's judge: the service, a spend cap, and when a dead judge stops the run."""

    budget_usd: float = 0.0  # stop cleanly before a step would pass it; 0 = no cap
    # a dead judge stops the run after a checkpoint (reward/judge_watch.py); 0 = never
    max_consecutive_rejections: int = 8  # stories in a row refused with a status never retried (400/401/403/404)
    max_steps_without_judgment: int = 3  # steps in a row in which no story was judged (429/503/timeouts throughout)


def _evaluation_judge() -> JudgeServiceConfig:
    """The paper's evaluation judge: GPT-5.4 through an OpenAI-compatible client, temperature 0.2, seed 42."""
    return JudgeServiceConfig(backend="openai", model="gpt-5.4", temperature=0.2, top_p=1.0, seed=42,
                              service_tier="standard", api_key_env="OPENAI_API_KEY", rpm=500, input_tpm=0,
                              max_attempts=4, timeout_s=600.0)


@dataclass
class EvalConfig:
    """Evaluation by requested length (eval/): mode=eval on exported checkpoints, and the periodic
    validation every trainer.eval_every steps (on a fixed subset of the same prompts, judged by the
    training judge with the evaluation score)."""

    checkpoint: str = ""  # mode=eval: an exported Hugging Face folder (python -m learner.export, a run's hf_model)
    compare: str = ""  # mode=eval: a second such folder, evaluated alike, in the same table and figure
    prompts_path: str = "data/polaris/test.parquet"  # the POLARIS test split (uid, prompt, target_word_count)
    length_scale: float = 1.0  # bucket edges (1k..12k words) and the 50-word tolerance floor x this
    subset_size: int = 36  # prompts in the periodic validation: a fixed subset spread over the buckets
    judge: JudgeServiceConfig = field(default_factory=_evaluation_judge)


SYNC_FAULT_KINDS = ("", "engine_dies", "engine_refuses", "corrupt_bucket", "corrupt_loaded", "learner_dies")


@dataclass
class SyncFaultConfig:
    """A fault injected into one weight sync, by hook (a test option: cluster/sync_faults.py)."""
    kind: str = ""  # none | engine_dies | engine_refuses | corrupt_bucket | corrupt_loaded | learner_dies
    engine: int = 0  # the engine an engine fault strikes
    version: int = 1  # strikes in the regular sync of this weight version, never in a recovery's re-send
    after_bucket: int = 0  # once this bucket (0-based) has arrived at the engine / left the learner


@dataclass
class WeightSyncConfig:
    """The learner-to-engines weight group (docs/design.md#weight-sync)."""
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | gloo | nccl
    bucket_mb: int = 256
    timeout_s: float = 300.0  # deadline of every transfer (and of forming the group): past it, recovery
    verify: int = 10  # checksums on every sync, the probe on the first and every N-th (1: every sync, 0: neither)
    # (the probe costs about one CPU sync: bench/weight_sync.py; docs/design.md#weight-sync)
    probe_tolerance: float = 0.0  # mean |engine - learner| probe log-probability allowed; 0: model.dtype's
    fault: SyncFaultConfig = field(default_factory=SyncFaultConfig)


@dataclass
class NodeSelectorConfig:
    """The Ray nodes a role may use: each label must match the node's (`ray start --labels k=v`),
    and each custom resource (`ray start --resources '{"name": n}'`) is reserved per learner rank or
    engine. Empty: any node."""
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class PlacementConfig:
    """Where the roles run on a multi-node cluster (docs/design.md#scale-out); checked against the
    cluster at start."""
    learner: NodeSelectorConfig = field(default_factory=NodeSelectorConfig)
    engines: NodeSelectorConfig = field(default_factory=NodeSelectorConfig)


@dataclass
class Config:
    mode: str = "train"  # train | check (validate config, data and environment, then exit) | eval
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
