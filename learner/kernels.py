"""Which kernel each layer type of the policy runs in training, as transformers resolved it.

transformers picks the linear-attention kernels when its modeling module is imported: the
flash-linear-attention package's Triton gated delta rule and the causal-conv1d package's short
convolution when they are installed (`./install.sh gpu` tries both: the `gpu-kernels` extra), its
own torch reference code when not. The reference is correct but, on an H100, more than an
order of magnitude slower for the delta rule, so a GPU run on it is worth a loud line.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
import warnings

# The kernels a training forward and backward call (the decode-step ones matter to engines only).
TRAINING_KERNELS = {"chunk_gated_delta_rule": "flash-linear-attention", "causal_conv1d_fn": "causal-conv1d"}
PACKAGE_NAMES = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}


def modeling_module_name(model_type: str) -> str:
    """transformers' modeling module for a config's model_type ("qwen3_5" -> ...modeling_qwen3_5)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    return f"transformers.models.{name}.modeling_{name}"


def resolved_kernels(module) -> dict[str, str]:
    """{kernel name: the package it runs from, or "torch"} for every kernel of the module that
    transformers resolves at import (its use_kernel_func_from_hub_with_fallback functions)."""
    found = {}
    for value in vars(module).values():
        if not inspect.isfunction(value):
            continue
        try:
            scope = inspect.getclosurevars(value).nonlocals
        except (TypeError, ValueError):
            continue
        if "func_name" in scope and "is_new_implementation" in scope:
            package = scope.get("package", "?")
            found[scope["func_name"]] = PACKAGE_NAMES.get(package, package) if scope["is_new_implementation"] else "torch"
    return found


def kernel_paths(module_name: str, layer_types: list[str], attention: str) -> dict[str, str]:
    """{layer type: how its training forward runs}, e.g. {"linear_attention": "flash-linear-attention
    chunk_gated_delta_rule + causal-conv1d causal_conv1d_fn", "full_attention": "sdpa"}."""
    paths = {}
    for layer_type in dict.fromkeys(layer_types):
        if layer_type == "linear_attention":
            kernels = resolved_kernels(importlib.import_module(module_name))
            parts = []
            for kernel, package in TRAINING_KERNELS.items():
                runs = kernels.get(kernel, "unknown")
                parts.append(f"{kernel}={runs}" if runs != "torch" else f"{kernel}=torch reference ({package} not installed)")
            paths[layer_type] = ", ".join(parts)
        else:
            paths[layer_type] = attention
    return paths


def uses_reference_kernels(paths: dict[str, str]) -> bool:
    return any("torch reference" in p for p in paths.values())


def kernel_line(paths: dict[str, str], device: str) -> str:
    text = "kernels: " + "; ".join(f"{layer} -> {path}" for layer, path in paths.items())
    if device == "cuda" and uses_reference_kernels(paths):
        text += (" -- the torch reference is much slower on GPU (>10x for the delta rule); "
                 "`./install.sh gpu` installs the gpu-kernels extra")
    return text


def config_kernel_paths(hf_config: dict, attention: str = "sdpa") -> dict[str, str]:
    """kernel_paths of a config.json dict (Qwen3.5 nests its layer types under text_config), as
    this machine would run it; attention: what from_pretrained picks by default."""
    text = hf_config.get("text_config") or hf_config
    return kernel_paths(modeling_module_name(hf_config["model_type"]),
                        list(text.get("layer_types") or ["full_attention"]), attention)


def model_kernel_paths(model) -> dict[str, str]:
    """kernel_paths of a loaded transformers model."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    return kernel_paths(type(model).__module__, list(getattr(text, "layer_types", None) or ["full_attention"]),
                        config._attn_implementation or "eager")


def planned_kernel_line(model_path: str, device: str) -> str:
    """The kernel line for a model by name or folder, as this machine's packages would run it (each
    learner rank prints its own at start: its node may have other packages)."""
    from learner.model_shapes import model_config

    return kernel_line(config_kernel_paths(model_config(model_path)), device) + " [this machine]"


# the C++ ops DeepSpeed JIT-builds for our learner: its name -> DeepSpeed's op builder
DEEPSPEED_OPS = {"deepspeed_shm_comm": "ShareMemCommBuilder", "cpu_adam": "CPUAdamBuilder"}


def build_native_ops() -> list[str]:
    """Build DeepSpeed's ops for a CPU learner now, as the learner would (./install.sh runs this:
    `python -m learner.kernels`), so that no run or test pays for it: 1-2 minutes on 2 cores.
    Quick when built. Returns the ops built or found; an op this machine cannot build is skipped
    (DeepSpeed then falls back as it would at a learner start)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    prepare_native_builds()
    from deepspeed.accelerator import get_accelerator

    ready = []
    for name, builder_name in DEEPSPEED_OPS.items():
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
            ready.append(name)
    return ready


def prepare_native_builds() -> None:
    """Before DeepSpeed JIT-builds its C++ ops (its shared-memory collectives when it starts, CPU
    Adam): build them with this interpreter's ninja, into this interpreter's own build folder, and
    clear the locks of builds that were killed.

    torch runs the first `ninja` on PATH. A venv's Python run without activating the venv leaves
    the system's ninja first (1.11 here) while Ray's workers get the venv's (1.13, PATH set by
    cluster/connect.py); sharing one build folder, each took the other's build for a changed
    command (their .ninja_log hashes alternate) and rebuilt the op, ~50 s per start on 2 cores.
    Two checkouts with their own venvs did the same to each other through torch's one default
    folder (their compile commands name their own include paths), hence a folder per interpreter
    unless TORCH_EXTENSIONS_DIR says otherwise.
    """
    tools = os.path.dirname(sys.executable)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if os.path.exists(os.path.join(tools, "ninja")) and path[:1] != [tools]:
        os.environ["PATH"] = os.pathsep.join([tools, *(p for p in path if p != tools)])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", native_build_root())
    for op in DEEPSPEED_OPS:
        clear_stale_build_lock(op)


def native_build_root(prefix: str | None = None) -> str:
    """A JIT-build folder for the interpreter at prefix (default sys.prefix: this venv), under
    torch's default root: ~/.cache/torch_extensions/py311-<hash of the prefix>."""
    import hashlib

    from torch.utils.cpp_extension import get_default_build_root

    tag = hashlib.sha256(os.path.realpath(prefix or sys.prefix).encode()).hexdigest()[:10]
    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}-{tag}")


def clear_stale_build_lock(op_name: str, stale_after_s: float = 60.0) -> bool:
    """Remove the lock file a killed JIT build of a native op (DeepSpeed's CPU Adam) left behind.

    torch guards an extension's build folder with a bare lock file and makes every later build wait
    while it exists, forever when its builder was killed. A lock is stale when it is older than
    stale_after_s and no process works in the folder (the build's ninja and compilers do).
    """
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = os.path.realpath(_get_build_directory(op_name, verbose=False))
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.stat(lock).st_mtime
    except FileNotFoundError:
        return False
    if age < stale_after_s or _a_process_works_in(build_dir):
        return False
    os.remove(lock)
    warnings.warn(f"removed a stale build lock {lock} ({age:.0f} s old, no build running): "
                  f"an earlier build of {op_name} was killed", stacklevel=2)
    return True


def _a_process_works_in(folder: str) -> bool:
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.path.realpath(proc.cwd()) == folder:
                return True
        except psutil.Error:
            continue
    return False


if __name__ == "__main__":
    print(f"DeepSpeed ops built for this interpreter: {', '.join(build_native_ops()) or 'none'} "
          f"(in {os.environ['TORCH_EXTENSIONS_DIR']})")
