"""Model shapes for the memory plan: a Hugging Face config.json read from a local folder (or the
local Hugging Face cache), else a table of the models this project names, and the parameter
counts the plan needs. Pure: json and dataclasses only.

Parameter counts are exact for the Qwen3 and Qwen3.5 layouts (checked against transformers 5.19
built on the meta device: Qwen3.5-9B text model 8,953,803,264, its vision tower 456,010,480);
attention biases are ignored (< 0.01% where a family has them).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from conf.errors import ConfigError

# Qwen/Qwen3.5-9B: could not be downloaded here. The values below agree across three stored
# sources: (1) transformers 5.19's Qwen3_5TextConfig / Qwen3_5VisionConfig defaults, whose
# docstrings call them "the Qwen3.5-9B style configuration" (vision out_hidden_size is 4096 for
# the 9B, 3584 is the class default); (2) a public test suite that uses "the real Qwen3.5-9B
# config as a fixture" (text_config as below, tie_word_embeddings false, checkpoint total
# 19,306,216,416 bytes in bf16 = 9,653,108,208 params = text 8,953,803,264 + vision 456,010,480
# + one MTP layer 243,294,464 by our count); (3) model pages (fitmygpu.com, a GGUF review):
# 32 layers, hidden 4096, FFN 12288, 16 heads / 4 KV heads, vocab 248,320, full attention every
# 4th layer (8 of 32 layers keep a KV cache). Check against the real config.json when it is
# local: model_config() prefers it.
_QWEN3_5_9B = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_5_text",
        "vocab_size": 248320,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "attn_output_gate": True,  # q_proj also emits a sigmoid output gate: 2 x heads x head_dim
        "full_attention_interval": 4,
        "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 8,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_value_head_dim": 128,
        "mamba_ssm_dtype": "float32",
        "max_position_embeddings": 262144,
        "mtp_num_hidden_layers": 1,  # the engine does not load it without speculative decoding
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
        "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
        "num_position_embeddings": 2304,
    },
}

# "tiny": learner/tiny_model.py's defaults (Qwen3, hidden 192, 6 layers, 4 / 2 heads, tied).
# Its vocabulary is the trained tokenizer's size rounded up to 64, at most 8192: the bound here.
_TINY = {
    "model_type": "qwen3", "vocab_size": 8192, "hidden_size": 192, "intermediate_size": 512,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48,
    "tie_word_embeddings": True,
}

# conf=tiny35's model (model.tiny.architecture=qwen3_5): 4 layers, 3 Gated DeltaNet to 1 full, untied.
_TINY_QWEN3_5 = {
    "model_type": "qwen3_5_text", "vocab_size": 8192, "hidden_size": 192, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 48,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"], "linear_conv_kernel_dim": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 48, "linear_value_head_dim": 48,
    "tie_word_embeddings": False,
}

MODEL_CONFIGS: dict[str, dict] = {"Qwen/Qwen3.5-9B": _QWEN3_5_9B, "tiny": _TINY, "tiny:qwen3_5": _TINY_QWEN3_5}


def run_model_name(model_cfg) -> str:
    """model_config's name for a run's model (conf.schema.ModelConfig): its path, or for the
    locally built model the shape of its architecture."""
    if model_cfg.path != "tiny" or model_cfg.tiny.architecture == "qwen3":
        return model_cfg.path
    return f"tiny:{model_cfg.tiny.architecture}"


def model_config(path_or_name: str) -> dict:
    """config.json of a local folder, else of the local Hugging Face cache (no network), else the
    table above. The dict is returned as the file has it (Qwen3.5 nests the text model's keys
    under "text_config"; ModelShape.from_hf_config reads both layouts)."""
    folder = Path(path_or_name).expanduser()
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    cached = _cached_config(path_or_name)
    if cached is not None:
        return json.loads(Path(cached).read_text())
    if path_or_name in MODEL_CONFIGS:
        return copy.deepcopy(MODEL_CONFIGS[path_or_name])
    raise ConfigError(
        f"no shape for model {path_or_name!r}: not a folder with a config.json, not in the local Hugging Face "
        f"cache, and not one of {', '.join(sorted(MODEL_CONFIGS))} (learner/model_shapes.py); "
        f"download the model or add its config.json values to MODEL_CONFIGS")


def _cached_config(name: str) -> str | None:
    if name.count("/") != 1 or Path(name).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(name, "config.json")
    return found if isinstance(found, str) else None


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet (Qwen3-Next / Qwen3.5 linear-attention layers): a fixed-size state per sequence."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    state_bytes: int  # bytes per element of the recurrent state (mamba_ssm_dtype)

    @property
    def conv_dim(self) -> int:  # q, k and v channels through the causal conv
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim

    def params(self, hidden: int) -> int:
        value_dim = self.num_value_heads * self.value_head_dim
        return (hidden * self.conv_dim  # in_proj_qkv
                + hidden * value_dim  # in_proj_z (output gate)
                + 2 * hidden * self.num_value_heads  # in_proj_b, in_proj_a
                + self.conv_dim * self.conv_kernel  # depthwise conv1d
                + 2 * self.num_value_heads + self.value_head_dim  # dt_bias, A_log, gated RMSNorm
                + value_dim * hidden)  # out_proj


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    full_attention_layers: int  # layers with a growing KV cache; the rest are linear attention
    attn_output_gate: bool = False
    qk_norm: bool = False
    linear: LinearAttention | None = None
    extra_engine_params: int = 0  # a vision tower: in the checkpoint, built by no role of ours (text only)

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelShape:
        text = config.get("text_config") or config
        try:
            hidden, layers = text["hidden_size"], text["num_hidden_layers"]
            heads = text["num_attention_heads"]
            shape = {"vocab_size": text["vocab_size"], "hidden_size": hidden, "num_layers": layers,
                     "intermediate_size": text["intermediate_size"], "num_heads": heads}
        except KeyError as missing:
            raise ConfigError(f"model config lacks {missing} (keys: {', '.join(sorted(text))})") from None
        if "num_experts" in text:
            raise ConfigError("mixture-of-experts configs are not supported by the memory plan")
        kinds = text.get("layer_types")
        if kinds:
            full = sum(k != "linear_attention" for k in kinds)  # sliding windows counted as full: an upper bound
        elif text.get("full_attention_interval"):
            full = layers // text["full_attention_interval"]
        else:
            full = layers
        linear = None
        if full < layers:
            linear = LinearAttention(
                num_key_heads=text["linear_num_key_heads"], num_value_heads=text["linear_num_value_heads"],
                key_head_dim=text["linear_key_head_dim"], value_head_dim=text["linear_value_head_dim"],
                conv_kernel=text.get("linear_conv_kernel_dim", 4),
                state_bytes=4 if text.get("mamba_ssm_dtype", "float32") == "float32" else 2)
        model_type = text.get("model_type", config.get("model_type", ""))
        return cls(**shape, num_kv_heads=text.get("num_key_value_heads", heads),
                   head_dim=text.get("head_dim") or hidden // heads,
                   tie_word_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
                   full_attention_layers=full,
                   # Qwen3-Next / Qwen3.5 gate attention output always; their configs may omit the key
                   attn_output_gate=bool(text.get("attn_output_gate", linear is not None)),
                   qk_norm=model_type.startswith("qwen3"), linear=linear,
                   extra_engine_params=_vision_params(config.get("vision_config")))

    @property
    def linear_layers(self) -> int:
        return self.num_layers - self.full_attention_layers

    @property
    def full_layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q * (2 if self.attn_output_gate else 1) + 2 * h * kv + q * h
        return attention + (2 * self.head_dim if self.qk_norm else 0) + self._mlp_and_norms

    @property
    def linear_layer_params(self) -> int:
        return self.linear.params(self.hidden_size) + self._mlp_and_norms if self.linear else 0

    @property
    def _mlp_and_norms(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size  # SwiGLU + 2 RMSNorms

    @property
    def params(self) -> int:
        """The text model: what the learner trains."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return (embeddings + self.hidden_size  # + final norm
                + self.full_attention_layers * self.full_layer_params
                + self.linear_layers * self.linear_layer_params)


def _vision_params(vision: dict | None) -> int:
    """A Qwen3-VL / Qwen3.5 vision tower: patch embed, position table, ViT blocks, patch merger."""
    if not vision or "depth" not in vision:
        return 0
    h, i, out = vision["hidden_size"], vision["intermediate_size"], vision["out_hidden_size"]
    patch = vision.get("in_channels", 3) * vision.get("temporal_patch_size", 2) * vision.get("patch_size", 16) ** 2
    merged = h * vision.get("spatial_merge_size", 2) ** 2
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)  # 2 LayerNorms, qkv, proj, MLP
    merger = 2 * h + (merged * merged + merged) + (merged * out + out)
    return patch * h + h + vision.get("num_position_embeddings", 2304) * h + vision["depth"] * block + merger
