"""What every learner rank is built from: its settings (cluster/roles.py fills them from the
config) and the DeepSpeed config they make."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.lr_schedule import learning_rate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# learner.optimizer: auto = DeepSpeed's CPU Adam where ZeRO offloads the optimizer to a GPU run's
# host (vectorised C++ over every core; torch's AdamW steps parameter by parameter), torch AdamW
# everywhere else (CPU Adam compiles on first use, ~90 s on 2 cores: not worth it for tiny runs).
OPTIMIZERS = ("auto", "torch_adamw", "cpu_adam")


def resolve_optimizer(choice: str, *, device: str, offload_optimizer: bool) -> str:
    """The optimizer learner.optimizer names on this device: torch_adamw or cpu_adam."""
    if choice == "auto":
        return "cpu_adam" if offload_optimizer and device == "cuda" else "torch_adamw"
    if choice == "cpu_adam" and not offload_optimizer:
        raise ValueError("learner.optimizer=cpu_adam steps an optimizer state held in CPU memory: it needs "
                         "learner.offload_optimizer=true")
    return choice


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
    max_tokens_per_micro_batch: int = 0  # padded tokens per micro-batch; 0 = micro_batch_size rows
    logprob_chunk_tokens: int = 0  # positions per logits chunk (learner/logprobs.py); 0 = unchunked
    offload_optimizer: bool = False  # ZeRO optimizer state (fp32 master weights, Adam moments) in CPU memory
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    tis_cap: float = 2.0  # truncated importance weight cap for rows with policy_lag > 0
    total_steps: int = 1  # the learning-rate schedule (learner/lr_schedule.py) runs over the run's steps
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    optimizer: str = "torch_adamw"  # resolved: torch_adamw | cpu_adam (resolve_optimizer)

    def lr_at(self, step: int) -> float:
        return learning_rate(step, lr=self.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                             schedule=self.lr_schedule, min_ratio=self.min_lr_ratio)


def deepspeed_config(s: LearnerSettings) -> dict:
    """The DeepSpeed config for these settings."""
    if s.offload_optimizer and s.zero_stage < 1:
        raise ValueError("learner.offload_optimizer=true needs learner.zero_stage >= 1 (ZeRO owns the "
                         f"optimizer state it offloads), got learner.zero_stage={s.zero_stage}")
    if s.offload_params and s.zero_stage != 3:
        raise ValueError("learner.offload_params=true needs learner.zero_stage=3 (only ZeRO-3 partitions "
                         f"parameters), got learner.zero_stage={s.zero_stage}")
    zero: dict = {"stage": s.zero_stage}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # step() is the boundary: micro-batch count varies
        "gradient_clipping": s.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": s.dtype == "bfloat16"},
        "fp16": {"enabled": s.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        # Offload with torch AdamW: DeepSpeed refuses a client optimizer there unless told so.
        "zero_force_ds_cpu_optimizer": s.optimizer == "cpu_adam",
        "steps_per_print": 10**9,
    }


def build_optimizer(parameters, s: LearnerSettings) -> torch.optim.Optimizer:
    """The AdamW the DeepSpeed engine steps (ZeRO wraps it; the lr is set per step)."""
    if s.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(parameters, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, adamw_mode=True)
    if s.optimizer != "torch_adamw":
        raise ValueError(f"LearnerSettings.optimizer={s.optimizer!r}: expected torch_adamw or cpu_adam "
                         "(resolve learner.optimizer with resolve_optimizer)")
    return torch.optim.AdamW(parameters, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
