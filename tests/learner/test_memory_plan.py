"""The start-up memory plan against hand calculations (learner/memory_plan.py's docstring)."""

import json

import pytest

from conf import ConfigError, EnvironmentSetupError, load_config
from learner.memory_plan import (
    GIB,
    EngineSetup,
    LearnerSetup,
    check,
    format_plan,
    plan_from_config,
    plan_memory,
)
from learner.model_shapes import ModelShape, model_config

# Qwen3.5-9B text model, counted by hand from its config (learner/model_shapes.py):
H, I, V, L = 4096, 12288, 248320, 32
MLP_AND_NORMS = 3 * H * I + 2 * H  # SwiGLU gate/up/down + 2 RMSNorms
FULL_LAYER = (H * 16 * 256 * 2  # q_proj with the output gate
              + 2 * H * 4 * 256  # k_proj, v_proj
              + 16 * 256 * H  # o_proj
              + 2 * 256  # q_norm, k_norm
              + MLP_AND_NORMS)
CONV_DIM = 2 * 16 * 128 + 32 * 128  # q, k (16 key heads x 128) and v (32 value heads x 128)
LINEAR_LAYER = (H * CONV_DIM + H * 32 * 128 + 2 * H * 32  # in_proj_qkv, in_proj_z, in_proj_b/a
                + CONV_DIM * 4 + 2 * 32 + 128  # conv1d, dt_bias, A_log, norm
                + 32 * 128 * H  # out_proj
                + MLP_AND_NORMS)
P = 2 * V * H + H + 8 * FULL_LAYER + 24 * LINEAR_LAYER  # untied embeddings + final norm + layers
VISION = 456_010_480  # the checkpoint's vision tower (transformers 5.19 on the meta device); no engine builds it


def polaris_plan(*overrides, gpu_gib=80.0):
    """conf=polaris without its optimizer offload (the hand calculations below start there)."""
    cfg = load_config(["conf=polaris", "learner.offload_optimizer=false", *overrides])
    return plan_from_config(cfg, model_config(cfg.model.path), gpu_gib)


def test_qwen3_5_9b_shape_matches_the_hand_count():
    shape = ModelShape.from_hf_config(model_config("Qwen/Qwen3.5-9B"))
    assert (shape.full_layer_params, shape.linear_layer_params) == (FULL_LAYER, LINEAR_LAYER)
    assert shape.params == P == 8_953_803_264  # = transformers' Qwen3_5ForCausalLM on the meta device
    assert shape.full_attention_layers == 8 and shape.linear_layers == 24
    assert shape.extra_engine_params == VISION


# A small hybrid model, small enough to count by hand: hidden 64, intermediate 128, vocabulary 256,
# 4 layers (linear, full, linear, full), 4 heads / 2 KV heads of 16, Gated DeltaNet 2 key / 4 value
# heads of 8, conv kernel 4, untied embeddings.
SMALL = {"model_type": "qwen3_5_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "layer_types": ["linear_attention", "full_attention"] * 2, "linear_conv_kernel_dim": 4,
         "linear_key_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
         "linear_value_head_dim": 8, "tie_word_embeddings": False}
# full layer: q + gate 64x128 = 8192, k and v 2 x 64x32 = 4096, o 64x64 = 4096, q/k norms 32,
#   MLP 3 x 64x128 = 24576, 2 norms 128: 41120
# linear layer: conv dim 2x2x8 + 4x8 = 64; qkv 64x64 = 4096, z 64x32 = 2048, b/a 2x64x4 = 512,
#   conv 64x4 = 256, dt_bias/A_log 8, norm 8, out 32x64 = 2048, MLP and norms 24704: 33680
# P = embeddings 2 x 256x64 = 32768 + final norm 64 + 2 x 41120 + 2 x 33680 = 182432
SMALL_P = 182_432


def test_small_plan_equals_numbers_worked_out_by_hand():
    shape = ModelShape.from_hf_config(SMALL)
    assert shape.params == SMALL_P
    engine = EngineSetup(num_engines=1, tensor_parallel_size=4, max_model_len=300, concurrent_sequences=5,
                         gpu_memory_utilization=0.5, dtype="bfloat16", sync_bucket_mb=1)
    # 2 ranks, ZeRO-3, bf16, checkpointing, 512 tokens per micro-batch, chunks of 128 positions from 2 rows
    zero3 = LearnerSetup(world_size=2, zero_stage=3, dtype="bfloat16", gradient_checkpointing=True,
                         tokens_per_micro_batch=512, logprob_chunk_tokens=128, logit_rows=2, sync_bucket_mb=1)
    plan = plan_memory(shape, zero3, engine, 16)
    assert plan.learner.gpu == {
        "weights": 182_432,  # 182432 x 2 bytes / 2 ranks
        "gradients": 182_432,  # the same
        "optimizer states": 1_094_592,  # 182432 x (4 + 4 + 4: fp32 m, v, master) / 2
        "ZeRO-3 gathered module + grad": 164_480,  # a full layer (41120 > 256x64 = 16384) x 2 x 2 bytes
        "activations: layer checkpoints": 262_144,  # 4 layers x 512 tokens x 64 x 2 bytes
        "activations: one layer": 1_179_648,  # 512 x (10 x 64 + 4 x 128 = 1152) x 2 bytes
        "logits chunk": 786_432,  # min(2 x 128, 512) = 256 positions x 256 x 4 bytes x 3 copies
        "sync: 2 send buffers (rank 0)": 2_097_152,  # 2 x 1 MiB buckets (the largest tensor, 256x64x2, fits one)
        "sync: gathered param (rank 0)": 32_768,  # one at a time: the largest, 256 x 64 x 2 bytes
        "overhead": 3 * GIB,
    }
    assert plan.learner.cpu == {}
    # engine, tp 4: weights 182432 x 2 bytes / 4; KV cache 2 layers x (K, V) x 1 head (2 KV heads
    # over 4 ranks, at least 1) x 16 x 2 bytes x 300 tokens x 5 sequences; linear state 2 layers
    # x 5 sequences x (1 value head (4 / 4) x 8 x 8 x 4 bytes + 64 / 4 conv channels x 3 x 2 bytes)
    assert plan.engine.gpu == {
        "weights": 91_216,
        "KV cache (full-attention layers)": 192_000,
        "linear-attention state": 3_520,  # 10 x (256 + 96)
        "sync: 2 receive buffers": 2_097_152,  # whole buckets on every TP worker
        "sync: layer being reloaded": 20_560,  # the full layer, 41120 x 2 bytes / 4
        "overhead": 3 * GIB,
    }
    assert plan.engine.budget == 8 * GIB  # 0.5 x 16 GiB

    # 4 ranks, ZeRO-2, fp32, no checkpointing, the optimizer on CPU, the logits at once
    offload = LearnerSetup(world_size=4, zero_stage=2, dtype="float32", gradient_checkpointing=False,
                           tokens_per_micro_batch=512, logprob_chunk_tokens=0, offload_optimizer=True, sync_bucket_mb=1)
    plan = plan_memory(shape, offload, engine, 16)
    assert plan.learner.gpu == {
        "weights": 729_728,  # 182432 x 4 bytes, whole under ZeRO-2
        "gradients": 182_432,  # 182432 x 4 / 4 ranks
        "activations: all layers": 9_437_184,  # 4 layers x 512 x 1152 x 4 bytes
        "logits chunk": 1_572_864,  # all 512 positions x 256 x 4 bytes x 3
        "sync: 2 send buffers (rank 0)": 2_097_152,  # sent from the module itself: no gathered parameter
        "overhead": 3 * GIB,
    }
    assert plan.learner.cpu == {"optimizer states": 364_864,  # 182432 x 8 (m, v; fp32 needs no master) / 4
                                "gradients (fp32, CPU Adam)": 182_432}  # 182432 x 4 / 4


def test_polaris_plan_totals():
    """conf=polaris: 2 learner ranks ZeRO-3 bf16, 2 vLLM engines of tp 1, 80 GiB GPUs."""
    plan = polaris_plan()
    # GiB: weights 8.34 + gradients 8.34 + optimizer 50.03 + lm_head gathered 3.79 + checkpoints 4.00
    # + one layer 2.75 + logits 2.84 + sync 3.79 + 1.89 + overhead 3.00 = 88.78 > 80
    embedding = V * H * 2 / GIB  # 1.89: larger than a 256 MiB bucket, it travels alone
    assert plan.learner.gpu["sync: 2 send buffers (rank 0)"] / GIB == pytest.approx(2 * embedding)
    assert plan.learner.gpu["sync: gathered param (rank 0)"] / GIB == pytest.approx(embedding)
    assert plan.learner.gpu_total / GIB == pytest.approx(83.09 + 3 * embedding, abs=0.01)
    assert plan.learner.cpu == {}
    # the text model's weights 16.68 (no vision tower: language_model_only) + KV cache 6.19 + linear
    # state 1.15 + sync receive 3.79 + the largest layer reloaded + overhead 3.00
    layer = max(FULL_LAYER, LINEAR_LAYER) * 2 / GIB
    assert plan.engine.gpu["weights"] == P * 2
    assert plan.engine.gpu_total / GIB == pytest.approx(16.68 + 6.19 + 1.15 + 2 * embedding + layer + 3.00, abs=0.01)
    assert plan.engine.budget == int(0.85 * 80 * GIB)


def test_polaris_on_80gib_gpus_is_refused_with_the_numbers_and_the_knobs():
    with pytest.raises(EnvironmentSetupError) as err:
        check(polaris_plan())
    message = str(err.value)
    assert "learner rank" in message and "needs 88.78 GiB > 80.00 GiB" in message
    assert "optimizer states 50.03" in message
    for knob in ("learner.world_size", "learner.offload_optimizer=true", "learner.max_tokens_per_micro_batch",
                 "learner.logprob_chunk_tokens"):
        assert knob in message
    assert "rollout engine" not in message  # the engines fit: 27.87 of 68 GiB


def test_offload_moves_the_optimizer_to_cpu_and_then_it_fits():
    plan = polaris_plan("learner.offload_optimizer=true")
    assert "optimizer states" not in plan.learner.gpu
    assert plan.learner.cpu == {"optimizer states": P * 12 // 2, "gradients (fp32, CPU Adam)": P * 4 // 2}
    assert plan.learner.gpu_total == polaris_plan().learner.gpu_total - P * 12 // 2
    check(plan)
    with pytest.raises(EnvironmentSetupError, match="CPU memory"):
        check(plan, cpu_memory_gib=100)  # 2 ranks x 66.71 GiB


def test_an_engine_that_cannot_hold_its_sequences_is_refused():
    plan = polaris_plan("rollout.num_engines=1", "rollout.sampling.max_new_tokens=131072", gpu_gib=80)
    with pytest.raises(EnvironmentSetupError) as err:
        check(plan)
    assert "rollout engine GPU" in str(err.value) and "rollout.tensor_parallel_size" in str(err.value)


def test_only_full_attention_layers_keep_a_kv_cache():
    shape = ModelShape.from_hf_config(model_config("Qwen/Qwen3.5-9B"))
    learner = LearnerSetup(1, 0, "bfloat16", True, 1024, 0)
    engine = EngineSetup(1, 2, max_model_len=1000, concurrent_sequences=3, gpu_memory_utilization=0.9,
                         dtype="bfloat16")
    plan = plan_memory(shape, learner, engine, 80)
    # 8 of 32 layers; tensor parallel 2 halves the 4 KV heads and the 32 value heads of the state
    assert plan.engine.gpu["KV cache (full-attention layers)"] == 8 * 2 * 2 * 256 * 2 * 1000 * 3
    assert plan.engine.gpu["linear-attention state"] == 24 * (16 * 128 * 128 * 4 + CONV_DIM // 2 * 3 * 2) * 3
    assert plan.engine.gpu["weights"] == P * 2 // 2  # the text model alone: no engine builds the vision tower


def test_zero_stages_shard_optimizer_then_gradients_then_weights():
    shape = ModelShape.from_hf_config(model_config("tiny"))
    engine = EngineSetup(1, 1, 512, 8, 0.9, "float32")
    p = shape.params
    for stage, (weights, grads, opt) in {0: (p * 4, p * 4, p * 8), 1: (p * 4, p * 4, p * 8 // 4),
                                         2: (p * 4, p * 4 // 4, p * 8 // 4), 3: (p * 4 // 4, p * 4 // 4, p * 8 // 4)}.items():
        gpu = plan_memory(shape, LearnerSetup(4, stage, "float32", False, 512, 128), engine, 16).learner.gpu
        assert (gpu["weights"], gpu["gradients"], gpu["optimizer states"]) == (weights, grads, opt)  # fp32: no master


def test_the_tiny_plan_fits_and_prints_one_line_per_item():
    cfg = load_config([])
    plan = plan_from_config(cfg, model_config(cfg.model.path), 16)
    check(plan)
    table = format_plan(plan)
    assert "activations: all layers" in table  # tiny trains without gradient checkpointing
    assert table.count("fits") == 2 and "DOES NOT FIT" not in table


def test_offloading_params_needs_zero_3():
    shape = ModelShape.from_hf_config(model_config("tiny"))
    with pytest.raises(ConfigError, match="zero_stage=3"):
        plan_memory(shape, LearnerSetup(2, 2, "float32", False, 512, 0, offload_params=True),
                    EngineSetup(1, 1, 512, 8, 0.9, "float32"), 16)


def test_model_config_reads_a_local_folder_with_a_nested_text_config(tmp_path):
    nested = model_config("Qwen/Qwen3.5-9B")
    (tmp_path / "config.json").write_text(json.dumps(nested))
    assert model_config(str(tmp_path)) == nested
    flat = ModelShape.from_hf_config(nested["text_config"])
    assert flat.params == ModelShape.from_hf_config(nested).params  # same text model either way


def test_an_unknown_model_is_named_in_the_error():
    with pytest.raises(ConfigError, match="no-such/model"):
        model_config("no-such/model")
