"""The kernel line: what transformers resolved for each layer type, read from its own modules."""
import os
import shutil
import subprocess
import sys
import time
import types

import pytest

from learner.kernels import DEEPSPEED_OPS, clear_stale_build_lock, config_kernel_paths, prepare_native_builds, kernel_line, kernel_paths, model_kernel_paths, native_build_root, resolved_kernels
from learner.model_shapes import model_config


def test_this_cpu_install_runs_qwen3_5_linear_attention_on_the_torch_reference():
    paths = config_kernel_paths(model_config("Qwen/Qwen3.5-9B"))
    assert list(paths) == ["linear_attention", "full_attention"]
    assert paths["linear_attention"] == ("chunk_gated_delta_rule=torch reference (flash-linear-attention not installed), "
                                         "causal_conv1d_fn=torch reference (causal-conv1d not installed)")
    assert paths["full_attention"] == "sdpa"


def test_a_kernel_package_that_is_installed_is_reported_as_the_path():
    """transformers' own resolver, given a package that is present (json stands in for fla): the
    line names the package, not the reference."""
    from transformers.integrations import use_kernel_func_from_hub_with_fallback

    module = types.ModuleType("stand_in_modeling")

    @use_kernel_func_from_hub_with_fallback("dumps", "json")
    def torch_dumps(obj):
        raise AssertionError("the reference ran although the package is installed")

    @use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "no_such_package_here")
    def torch_chunk(query):
        return query

    module.torch_dumps, module.torch_chunk = torch_dumps, torch_chunk
    assert resolved_kernels(module) == {"dumps": "json", "chunk_gated_delta_rule": "torch"}
    assert module.torch_dumps([1]) == "[1]"


def test_only_a_gpu_run_on_the_reference_gets_the_warning():
    paths = {"linear_attention": "chunk_gated_delta_rule=torch reference (flash-linear-attention not installed)",
             "full_attention": "sdpa"}
    assert "much slower on GPU" in kernel_line(paths, "cuda") and "gpu-kernels" in kernel_line(paths, "cuda")
    assert kernel_line(paths, "cpu") == ("kernels: linear_attention -> chunk_gated_delta_rule=torch reference "
                                         "(flash-linear-attention not installed); full_attention -> sdpa")
    fast = {"linear_attention": "chunk_gated_delta_rule=flash-linear-attention", "full_attention": "sdpa"}
    assert "slower" not in kernel_line(fast, "cuda")


def test_a_plain_transformer_has_one_layer_type(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model_kernel_paths(model) == {"full_attention": model.config._attn_implementation}
    assert kernel_paths("transformers.models.qwen3.modeling_qwen3", ["full_attention"], "eager") == {"full_attention": "eager"}


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_ones_kept(tmp_path, monkeypatch):
    """torch waits forever on an extension's lock file: a killed build's must go, a running one's stay."""
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = _get_build_directory("some_op", verbose=False)
    lock = os.path.join(build_dir, "lock")
    open(lock, "w").close()
    assert not clear_stale_build_lock("some_op")  # fresh: its builder may be writing build.ninja
    assert os.path.exists(lock)

    old = time.time() - 600
    os.utime(lock, (old, old))
    compiler = subprocess.Popen(["sleep", "30"], cwd=build_dir)  # a build's ninja works in the folder
    try:
        assert not clear_stale_build_lock("some_op")
        assert os.path.exists(lock)
    finally:
        compiler.kill()
        compiler.wait()
    with pytest.warns(UserWarning, match="stale build lock"):
        assert clear_stale_build_lock("some_op")
    assert not os.path.exists(lock)
    assert not clear_stale_build_lock("some_op")


def test_deepspeed_ops_build_with_this_interpreter_s_ninja(monkeypatch):
    """Two ninja versions sharing a build folder rebuild each other's ops: the venv's goes first."""
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    prepare_native_builds()
    assert shutil.which("ninja") == os.path.join(os.path.dirname(sys.executable), "ninja")
    assert os.environ["PATH"].split(os.pathsep)[1:] == ["/usr/bin", "/bin"]
    prepare_native_builds()  # once first, it stays where it is
    assert os.environ["PATH"].split(os.pathsep)[1:] == ["/usr/bin", "/bin"]


def test_each_interpreter_builds_native_ops_in_its_own_folder(monkeypatch, tmp_path):
    """Two venvs sharing torch's one default folder rebuild each other's ops; a set
    TORCH_EXTENSIONS_DIR is the user's and stays."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "placeholder")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    prepare_native_builds()
    ours = os.environ["TORCH_EXTENSIONS_DIR"]
    assert ours == native_build_root() == native_build_root(sys.prefix)
    assert native_build_root(str(tmp_path / "other-venv")) != ours
    assert os.path.dirname(ours) == os.path.dirname(native_build_root(str(tmp_path / "other-venv")))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    prepare_native_builds()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


def test_the_ops_install_builds_are_the_ones_the_learner_loads():
    """./install.sh builds DEEPSPEED_OPS through these builders; the learner's DeepSpeed loads the
    ops by these names (a renamed builder would leave the first run to build it again)."""
    from deepspeed.accelerator import get_accelerator

    for name, builder in DEEPSPEED_OPS.items():
        assert get_accelerator().create_op_builder(builder).NAME == name
