"""What the run planner (cluster/plan.py) takes as given: per-GPU vendor figures, GPU prices, and
the efficiency and workload assumptions, each with its source (docs/design.md#the-run-planner).
Pure: dataclasses only. Every assumption can be overridden (`--assume NAME=VALUE`) and the
planner prints each one with its value and source."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from conf.errors import ConfigError


@dataclass(frozen=True)
class GpuSpec:
    kind: str  # the planner's name for it (--gpu)
    name: str
    peak_bf16_flops: float  # dense tensor-core bf16, no sparsity
    hbm_bytes_per_s: float
    memory_gib: float  # what torch / nvidia-smi report, as the memory plan counts it
    nvlink_bytes_per_s: float  # one direction (datasheets give both directions summed)
    pcie_bytes_per_s: float  # one direction, GPU to host
    network_bytes_per_s: float  # one direction, per GPU, between nodes
    usd_per_hour: float  # per GPU, on demand


# Vendor datasheets (read 2026-12-03):
# - A100 80GB SXM: NVIDIA A100 datasheet (nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
#   nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 tensor core 312 TFLOPS (624 with sparsity),
#   HBM2e 2,039 GB/s, NVLink 600 GB/s, PCIe Gen4 64 GB/s (both directions). nvidia-smi: 81,920 MiB.
# - H100 SXM: NVIDIA H100 datasheet (resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet):
#   BF16 1,979 TFLOPS "with sparsity" = 989 dense, HBM3 3.35 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s.
#   nvidia-smi: 81,559 MiB.
# - H200 SXM: nvidia.com/en-us/data-center/h200: the H100's compute (BF16 1,979 TFLOPS with sparsity),
#   141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s. nvidia-smi: 143,771 MiB.
# - between nodes, one NIC per GPU: DGX A100 datasheet 8x ConnectX-6 200 Gb/s HDR InfiniBand (25 GB/s);
#   DGX H100 / H200 datasheets 8x ConnectX-7 400 Gb/s (50 GB/s).
# Prices: on-demand $/GPU-hour, midpoints of the specialty-cloud ranges in Mercatus "Cloud GPU pricing"
# (mercatus-ai.com/blog/cloud-gpu-pricing, May 2026): A100 80GB $1.10-1.50, H100 SXM $2.50-3.50,
# H200 SXM $3.50-4.50 (hyperscalers charge ~2x). An assumption: --usd-per-gpu-hour overrides it.
GPUS: dict[str, GpuSpec] = {
    "a100-80gb": GpuSpec("a100-80gb", "NVIDIA A100 80GB SXM", 312e12, 2039e9, 80.0, 300e9, 32e9, 25e9, 1.30),
    "h100": GpuSpec("h100", "NVIDIA H100 SXM", 989e12, 3350e9, 79.6, 450e9, 64e9, 50e9, 3.00),
    "h200": GpuSpec("h200", "NVIDIA H200 SXM", 989e12, 4800e9, 140.4, 450e9, 64e9, 50e9, 4.00),
}
PRICE_SOURCE = "midpoint of Mercatus' May 2026 specialty-cloud on-demand range; --usd-per-gpu-hour overrides"


def gpu_spec(kind: str, usd_per_hour: float | None = None) -> GpuSpec:
    if kind not in GPUS:
        raise ConfigError(f"--gpu {kind!r} is not a GPU the planner knows; known: {', '.join(GPUS)} "
                          "(cluster/plan_inputs.py holds their datasheet figures)")
    if usd_per_hour is not None and usd_per_hour < 0:
        raise ConfigError(f"--usd-per-gpu-hour must be >= 0 (got {usd_per_hour})")
    spec = GPUS[kind]
    return spec if usd_per_hour is None else replace(spec, usd_per_hour=usd_per_hour)


def gpu_kind_from_device_name(device_name: str) -> str | None:
    """The planner's kind for a torch.cuda device name (e.g. "NVIDIA A100-SXM4-80GB"), or None when
    it has no entry (PCIe boards differ from the SXM figures above)."""
    name = device_name.upper()
    if "PCIE" in name:
        return None
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100"
    if "A100" in name and "80GB" in name:
        return "a100-80gb"
    return None


@dataclass(frozen=True)
class Assumptions:
    training_mfu: float = 0.40
    decode_efficiency: float = 0.60
    link_efficiency: float = 0.70
    gpus_per_node: int = 8
    cpu_adam_params_per_s: float = 2e9
    tokens_per_word: float = 4 / 3
    chars_per_token: float = 4.0
    thinking_fill: float = 0.5
    prompt_fill: float = 0.5
    longest_sample_fill: float = 1.0
    judge_thought_tokens: int = 1500
    judge_evidence_words: int = 25
    flex_latency_min_s: float = 60.0
    flex_latency_max_s: float = 900.0
    standard_latency_min_s: float = 10.0
    standard_latency_max_s: float = 120.0


SOURCES = {
    "training_mfu": "share of peak bf16 the learner reaches on every FLOP it runs: Llama 3 paper (Dubey et al. "
                    "2024, Table 4) 38-43% BF16 MFU on H100; a veRL user reports 0.5 for actor updates on one node "
                    "(verl-project/verl#2579); bench/gpu_check.sh learner_step_kernels measures yours",
    "decode_efficiency": "share of HBM bandwidth a decode step moves (MBU): ~0.6 for 7B models at small batch on "
                         "A100s in Databricks/MosaicML's 'LLM Inference Performance Engineering' (2023); "
                         "bench/gpu_check.sh engine_9b_dummy measures yours",
    "link_efficiency": "share of a link's one-way peak a large NCCL transfer or pinned host copy reaches (our round "
                       "figure; NCCL's nccl-tests bus bandwidth typically lands at 70-80% of NVLink peak)",
    "gpus_per_node": "HGX / DGX boards hold 8 GPUs: collectives over more cross the inter-node network",
    "cpu_adam_params_per_s": "DeepSpeed CPU Adam on one node's cores (ZeRO-Offload, Ren et al. 2021, reports it 5-7x "
                             "faster than PyTorch's CPU Adam); bench/gpu_check.sh offload_optimizer_1b measures yours",
    "tokens_per_word": "English text: ~3/4 of a word per BPE token (OpenAI's tokenizer guide); Qwen's 248k "
                       "vocabulary is assumed alike",
    "chars_per_token": "the judge client's own input estimate (reward/judge_client.py), Google's '~4 characters "
                       "per token' for Gemini",
    "thinking_fill": "thinking tokens per response as a share of reward.think_budget_tokens (past it the reward "
                     "penalises thinking); our guess, no published figure",
    "prompt_fill": "prompt tokens as a share of data.max_prompt_tokens; our guess",
    "longest_sample_fill": "a step's generation lasts as long as its longest sample: at 1.0 one of the step's "
                           "samples runs to rollout.sampling.max_new_tokens (the reward's truncation term exists "
                           "because they do)",
    "judge_thought_tokens": "Gemini thinking tokens per judgment, billed as output: 'medium' uses ~1-2k per request "
                            "in a third-party guide (tiptinker.com on Gemini 3 Flash thinking levels); Google gives "
                            "levels, not token counts",
    "judge_evidence_words": "the rubric asks for evidence quotes under 25 words (reward/rubric.py)",
    "flex_latency_min_s": "Gemini API flex tier: 'Minutes (1-15 min target)' (ai.google.dev/gemini-api/docs/"
                          "optimization); a judgment's latency is taken uniform over that range",
    "flex_latency_max_s": "the same range's upper end; a step waits for its slowest judgment",
    "standard_latency_min_s": "standard tier: 'seconds to minutes' on the same page; our reading of it",
    "standard_latency_max_s": "the same, upper end",
}


def with_overrides(assumptions: Assumptions, pairs: list[str]) -> Assumptions:
    """Apply `--assume NAME=VALUE` pairs; a bad name or value is one ConfigError naming the flag."""
    types = {f.name: f.type for f in fields(Assumptions)}
    changes = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in types:
            raise ConfigError(f"--assume {pair!r}: expected NAME=VALUE with NAME one of {', '.join(types)}")
        try:
            value = int(text) if types[name] == "int" else float(text)
        except ValueError:
            raise ConfigError(f"--assume {name}={text!r}: not a number") from None
        if value < 0 or (value == 0 and name in ("training_mfu", "decode_efficiency", "link_efficiency",
                                                   "gpus_per_node", "cpu_adam_params_per_s", "tokens_per_word",
                                                   "chars_per_token")):
            raise ConfigError(f"--assume {name}={text}: must be > 0")
        changes[name] = value
    merged = replace(assumptions, **changes)
    for tier in ("flex", "standard"):
        lo, hi = getattr(merged, f"{tier}_latency_min_s"), getattr(merged, f"{tier}_latency_max_s")
        if hi < lo:
            raise ConfigError(f"--assume {tier}_latency_max_s ({hi:g}) must be >= {tier}_latency_min_s ({lo:g})")
    return merged
