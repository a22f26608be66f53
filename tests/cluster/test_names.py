"""Learner -> checkpoint names, checked against transformers' Qwen3.5 classes and vLLM's own mappers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from cluster.names import checkpoint_name_mapper, vllm_dtype
from cluster.transport import WeightSyncError

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"])
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)


def vllm_mapper(module: str, cls: str):
    """`cls.hf_to_vllm_mapper` as vLLM 0.32 defines it, built with vLLM's WeightsMapper.

    Evaluated from vLLM's source because its Qwen3.5 model module imports torchvision, which
    the CPU install removes; handles the forms used there (WeightsMapper(literal kwargs),
    Other.hf_to_vllm_mapper from an imported module, `|`) and fails on anything else.
    """
    import vllm.model_executor.models as models
    from vllm.model_executor.models.utils import WeightsMapper

    tree = ast.parse((Path(models.__file__).parent / f"{module}.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    value = next(n.value for n in node.body if isinstance(n, ast.Assign)
                 and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["hf_to_vllm_mapper"])

    def evaluate(e: ast.expr):
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.BitOr):
            return evaluate(e.left) | evaluate(e.right)
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "WeightsMapper" and not e.args:
            return WeightsMapper(**{k.arg: ast.literal_eval(k.value) for k in e.keywords})
        if isinstance(e, ast.Attribute) and e.attr == "hf_to_vllm_mapper" and isinstance(e.value, ast.Name):
            other = e.value.id
            source = next((i.module for i in tree.body if isinstance(i, ast.ImportFrom) and i.level == 1
                           and any(a.name == other for a in i.names)), module)
            return vllm_mapper(source, other)
        raise AssertionError(f"vLLM's {module}.{cls}.hf_to_vllm_mapper has a form this test does not read: "
                             f"{ast.unparse(e)}")

    return evaluate(value)


@pytest.fixture(scope="module")
def vllm_mappers():
    return {"multimodal": vllm_mapper("qwen3_5", "Qwen3_5ForConditionalGeneration"),  # Qwen/Qwen3.5-9B's class
            "text": vllm_mapper("qwen3_5", "Qwen3_5ForCausalLMBase")}  # Qwen3_5ForCausalLM's (inherited)


def qwen3_5_names(tie: bool) -> tuple[str, list[str], set[str]]:
    """(learner model_type, learner names as learner/worker.named_weights yields them, checkpoint names)."""
    from transformers import AutoModelForCausalLM, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    config = Qwen3_5Config(text_config={**TEXT, "tie_word_embeddings": tie}, vision_config=VISION,
                           tie_word_embeddings=tie)
    with torch.device("meta"):
        learner = AutoModelForCausalLM.from_config(config)  # what the learner builds from the 9B's config
        checkpoint = Qwen3_5ForConditionalGeneration(config)  # the class the 9B checkpoint was saved from
    assert type(learner).__name__ == "Qwen3_5ForCausalLM"
    names = [n for n, _ in learner.named_parameters()]
    if "lm_head.weight" not in names:
        names.append("lm_head.weight")  # tied: the worker sends the head explicitly
    assert ("lm_head.weight" in dict(learner.named_parameters())) != tie
    return learner.config.model_type, names, set(checkpoint.state_dict())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_qwen3_5_text_names_land_on_the_multimodal_checkpoint_and_vllm_params(tie, vllm_mappers):
    model_type, names, checkpoint = qwen3_5_names(tie)
    assert model_type == "qwen3_5_text"
    assert names[0] == "model.embed_tokens.weight"  # the learner has no language-model prefix
    assert {"model.language_model.embed_tokens.weight", "model.visual.patch_embed.proj.weight"} <= checkpoint
    to_ckpt = checkpoint_name_mapper(model_type)
    mapped = [to_ckpt(n) for n in names]
    text_part = {n for n in checkpoint if not n.startswith("model.visual.")} | {"lm_head.weight"}
    assert len(set(mapped)) == len(names) and set(mapped) == text_part

    vllm = vllm_mappers["multimodal"]
    owned = {vllm.map_name(n) for n in text_part}  # where vLLM puts the real checkpoint's text weights
    assert owned == {vllm.map_name(n) for n in mapped}
    assert all(n.startswith("language_model.model.") for n in owned - {"language_model.lm_head.weight"})
    assert {"language_model.lm_head.weight", "language_model.model.layers.0.linear_attn.in_proj_qkv.weight"} <= owned
    # the learner's own names would miss every one of them (the head aside)
    assert not {vllm.map_name(n) for n in names if n != "lm_head.weight"} & owned

    # a text-only Qwen3.5 engine (e.g. our own exported model) takes the same names back to the learner's
    assert [vllm_mappers["text"].map_name(n) for n in mapped] == names


def test_models_that_transformers_loads_unrenamed_map_by_identity():
    from transformers import AutoModelForCausalLM, Qwen3Config

    name = "model.layers.0.mlp.up_proj.weight"
    for model_type in ("qwen3", "llama", "qwen3_5"):  # the tiny model, a plain LM, the 9B's wrapper trained whole
        assert checkpoint_name_mapper(model_type)(name) == name
    with torch.device("meta"):
        tiny = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=1, num_attention_heads=2,
                                                            num_key_value_heads=1, head_dim=16))
    assert tiny.config.model_type == "qwen3" and type(tiny).__name__ == "Qwen3ForCausalLM"


def test_families_that_need_an_unknown_mapping_fail_clearly():
    with pytest.raises(WeightSyncError, match="transformers renames 'qwen3_moe'.*add the mapping"):
        checkpoint_name_mapper("qwen3_moe")  # transformers fuses the experts on load
    with pytest.raises(WeightSyncError, match="'qwen3_5_moe_text'"):
        checkpoint_name_mapper("qwen3_5_moe_text")
    with pytest.raises(WeightSyncError, match="unexpected qwen3_5_text parameter 'visual.x'"):
        checkpoint_name_mapper("qwen3_5_text")("visual.x")


def test_linear_attention_weights_stack_into_vllms_fused_parameters_at_their_shapes():
    """Qwen3.5 checkpoints keep the Gated DeltaNet input projections apart; vLLM's Qwen3_5Model
    fuses in_proj_qkv + in_proj_z into in_proj_qkvz and in_proj_b + in_proj_a into in_proj_ba. The
    learner's tensors, as sent, must fill those fused parameters exactly, and conv1d must arrive
    in the checkpoint's [conv_dim, 1, kernel] shape, which vLLM's loader expects."""
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    stacked = vllm_mapper("qwen3_5", "Qwen3_5Model")  # applied to names under language_model.model.
    with torch.device("meta"):
        learner = AutoModelForCausalLM.from_config(Qwen3_5TextConfig(**TEXT))
    shapes = {n.removeprefix("model."): tuple(p.shape) for n, p in learner.named_parameters()}
    fused: dict[str, list] = {}
    for name in [n for n in shapes if n.startswith("layers.0.linear_attn.in_proj")]:
        new, shard = stacked._map_name_with_shard(name)
        fused.setdefault(new, []).append((shard, shapes[name]))
    # TEXT: 2 key heads x 8 = key_dim 16, 2 value heads x 8 = value_dim 16, hidden 32; vLLM sizes
    # in_proj_qkvz as key_dim x 2 + value_dim x 2 = 64 rows and in_proj_ba as 2 x 2 value heads = 4
    assert fused == {"layers.0.linear_attn.in_proj_qkvz.weight": [((0, 1, 2), (48, 32)), (3, (16, 32))],
                     "layers.0.linear_attn.in_proj_ba.weight": [(0, (2, 32)), (1, (2, 32))]}
    assert shapes["layers.0.linear_attn.conv1d.weight"] == (48, 1, 4)  # conv_dim = 16 x 2 + 16, kernel 4


def test_the_parameters_vllm_keeps_in_float32_arrive_in_float32():
    """Read from vLLM 0.32's Gated DeltaNet layer: the parameters it creates with dtype=torch.float32."""
    import vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn as gdn

    tree = ast.parse(Path(gdn.__file__).read_text())
    float32 = {target.attr for node in ast.walk(tree) if isinstance(node, ast.Assign)
               for target in node.targets if isinstance(target, ast.Attribute)
               and "nn.Parameter" in ast.unparse(node.value) and "dtype=torch.float32" in ast.unparse(node.value)}
    assert float32 == {"A_log"}
    for name in ("model.language_model.layers.0.linear_attn.A_log", "model.layers.2.linear_attn.A_log"):
        assert vllm_dtype(name, torch.bfloat16) == torch.float32
    for name in ("model.language_model.layers.0.linear_attn.dt_bias", "lm_head.weight"):
        assert vllm_dtype(name, torch.bfloat16) == torch.bfloat16
