"""A checkpoint as a Hugging Face model folder (safetensors, config, tokenizer, generation config):

    python -m learner.export CHECKPOINT OUT_DIR [--dtype bfloat16] [--vision-from BASE_FOLDER]

CHECKPOINT is a complete step folder (actors/checkpoint.py) or a run's output_dir (its latest
complete checkpoint). The weights come from the learner's DeepSpeed checkpoint: under ZeRO 1-3
the fp32 master weights of the optimizer shards (DeepSpeed's zero_to_fp32); under ZeRO-0 the
module states file, in the dtype the learner trained in. They are saved in `dtype`, by default
the dtype in the checkpoint's config (the learner's training dtype).
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

import torch

from actors.checkpoint import CHECKPOINTS, is_complete, latest_checkpoint
from conf.errors import CheckpointError, PolarisError
from learner.settings import DTYPES

PREFIX = "causal_lm."  # the learner's DeepSpeed module is PolicyLogprobs(model): learner/logprobs.py


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The complete step folder `checkpoint` names: itself, or a run's latest."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    if path.name.startswith("step_"):
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (a .partial folder is still being "
                                  "written or was left by a crash; use a step_NNNNNN folder)")
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (looked for {run_dir / CHECKPOINTS}/step_NNNNNN)")
    return latest


def policy_weights(learner_dir: Path) -> dict[str, torch.Tensor]:
    """The policy's weights from the learner's DeepSpeed checkpoint (tag "ds"), Hugging Face names."""
    tag_dir = learner_dir / "ds"
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO >= 1: one optimizer shard per rank
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout is the CLI's one line
            state = get_fp32_state_dict_from_zero_checkpoint(str(learner_dir), tag="ds")
    else:  # ZeRO-0: the module states file holds the weights (and the optimizer's state)
        module_file = tag_dir / "mp_rank_00_model_states.pt"
        if not module_file.is_file():
            raise CheckpointError(f"{learner_dir} holds no DeepSpeed checkpoint (no {module_file.name} "
                                  "or optimizer shards under ds/)")
        state = torch.load(module_file, map_location="cpu", weights_only=False, mmap=True)["module"]
    return {name.removeprefix(PREFIX): tensor for name, tensor in state.items()}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                      vision_from: str | Path | None = None) -> Path:
    """Write the policy of `checkpoint` (a step folder or a run's output_dir) to `out_dir`, which
    must not exist or be empty; with vision_from, as that base model's multimodal checkpoint.
    Returns out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    step = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty: export into a new folder")
    meta = step / "hf_meta"
    if not (meta / "config.json").is_file():
        raise CheckpointError(f"{step} has no hf_meta/config.json (the model config the export needs)")
    config = AutoConfig.from_pretrained(meta)
    name = dtype or str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    weights = policy_weights(step / "learner")
    with torch.device("meta"):  # no memory or init time for weights about to be replaced
        model = AutoModelForCausalLM.from_config(config)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{step}: the learner's weights do not fit the model in hf_meta: {e}") from e
    model.tie_weights()  # assign=True gives each name its own parameter; tied ones must share again
    if vision_from is not None:
        model = with_vision_tower(model, Path(vision_from))
    model.to(DTYPES[name])
    if (meta / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(meta)

    # Written next to out_dir and renamed at the end: a failed export leaves no half-written model.
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(meta).save_pretrained(partial)
    for processor_file in sorted(Path(vision_from).glob("*processor*.json")) if vision_from else ():
        shutil.copyfile(processor_file, partial / processor_file.name)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out


def with_vision_tower(text_model, base: Path):
    """The multimodal model of `base`'s class and config, holding text_model's weights as its
    language model and base's own vision tower."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig

    if not (base / "config.json").is_file():
        raise CheckpointError(f"--vision-from {base}: no Hugging Face model there (no config.json)")
    config = AutoConfig.from_pretrained(base)
    if getattr(config, "vision_config", None) is None or getattr(config, "text_config", None) is None:
        raise CheckpointError(f"--vision-from {base}: a {config.model_type} model has no vision tower; give the "
                              "multimodal base model the run started from (e.g. a Qwen/Qwen3.5-9B folder)")
    text = text_model.config
    differ = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
              if getattr(config.text_config, k) != getattr(text, k)]
    if differ:
        raise CheckpointError(f"--vision-from {base}: its text model differs from the trained one in "
                              + ", ".join(f"{k} ({getattr(config.text_config, k)} vs {getattr(text, k)})" for k in differ))
    config.text_config = text
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    weights = {n if n.startswith("lm_head.") else "model.language_model." + n.removeprefix("model."): t
               for n, t in text_model.state_dict().items()}
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("model.visual.")})
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise CheckpointError(f"--vision-from {base}: {len(missing)} weights of {config.architectures[0]} found "
                              f"neither in the checkpoint nor in {base} (first: {missing[:3]})")
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.export",
                                     description="Export a polaris-rl checkpoint as a Hugging Face model folder.")
    parser.add_argument("checkpoint", help="a checkpoints/step_NNNNNN folder, or a run's output_dir (its latest)")
    parser.add_argument("out_dir", help="a new (or empty) folder for the model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the dtype the learner trained in")
    parser.add_argument("--vision-from", metavar="BASE_FOLDER",
                        help="write the base model's multimodal checkpoint: its vision tower, the trained text model")
    args = parser.parse_args(argv)
    try:
        step = resolve_checkpoint(args.checkpoint)
        out = export_checkpoint(step, args.out_dir, dtype=args.dtype, vision_from=args.vision_from)
    except PolarisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {step} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
