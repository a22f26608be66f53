"""Learner parameter names -> the checkpoint (HF) names vLLM's loader expects.

The engines load weights with `is_checkpoint_format=True`: names as in the model's safetensors,
which vLLM then maps onto its own modules (its `hf_to_vllm_mapper`). The learner's names usually
are checkpoint names already, except where transformers renames a checkpoint on load. Qwen3.5
is such a case: Qwen/Qwen3.5-9B is a multimodal checkpoint (Qwen3_5ForConditionalGeneration,
text under `model.language_model.`, vision under `model.visual.`, head at `lm_head.`), while
AutoModelForCausalLM builds the text-only Qwen3_5ForCausalLM (config model_type "qwen3_5_text",
text under `model.`, head at `lm_head.`). vLLM's Qwen3_5ForConditionalGeneration maps
`model.language_model.` -> `language_model.model.` and `lm_head.` -> `language_model.lm_head.`;
its text-only Qwen3_5ForCausalLM strips `model.language_model.` to `model.` and so accepts both
layouts. Sending the multimodal layout therefore suits either engine class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.transport import WeightSyncError

# model_type -> (learner prefix, checkpoint prefix); names outside the prefix keep their name
_PREFIXES = {"qwen3_5_text": ("model.", "model.language_model.")}


def checkpoint_name_mapper(model_type: str) -> Callable[[str], str]:
    """The learner -> checkpoint name mapping for a learner model of `model_type` (its config's).

    Identity where transformers loads the checkpoint without renaming (qwen3, the tiny model,
    llama, a multimodal wrapper trained whole); a prefix change for Qwen3.5 text models; an
    error for a model type that transformers renames on load and this module does not know.
    """
    if model_type in _PREFIXES:
        learner, checkpoint = _PREFIXES[model_type]

        def to_checkpoint(name: str) -> str:
            if name.startswith(learner):
                return checkpoint + name[len(learner):]
            if name.startswith("lm_head."):
                return name
            raise WeightSyncError(f"unexpected {model_type} parameter {name!r}: expected '{learner}...' or "
                                  f"'lm_head...'")
        return to_checkpoint

    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    renames = get_checkpoint_conversion_mapping(model_type)
    if renames:
        raise WeightSyncError(
            f"transformers renames {model_type!r} checkpoints on load ({renames}), so the learner's parameter "
            f"names are not the names vLLM loads; add the mapping for {model_type!r} to cluster/names.py")
    return _identity


def _identity(name: str) -> str:
    return name


def engine_parameters(model, checkpoint_names: bool = True) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every tensor the engines load from a transformers model, under
    checkpoint names (vLLM) or the model's own (the HF engine). A tied head goes too, under
    lm_head.weight: vLLM does not reload a head it never receives, and on CPU its packed copy of
    the head would keep the first weights."""
    rename = checkpoint_name_mapper(model.config.model_type) if checkpoint_names else _identity
    sent = [(rename(name), param) for name, param in model.named_parameters()]
    if getattr(model.config, "tie_word_embeddings", False) and all(n != "lm_head.weight" for n, _ in sent):
        sent.append(("lm_head.weight", model.get_input_embeddings().weight))
    return sent


# Parameters vLLM 0.32 creates in float32 whatever the model's dtype: the Gated DeltaNet layer's
# A_log (vllm/model_executor/layers/mamba/gdn/qwen_gdn_linear_attn.py; tests/cluster/test_names.py
# reads that source). Cast to the model dtype on arrival, they would lose precision for nothing.
_FLOAT32_IN_VLLM = (".linear_attn.A_log",)


def vllm_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a vLLM engine running in model_dtype holds checkpoint parameter `name` in."""
    return torch.float32 if name.endswith(_FLOAT32_IN_VLLM) else model_dtype
