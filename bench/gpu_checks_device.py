"""Tier `device` of bench/gpu_check.py: one GPU, torch + transformers and the small wheels that
travel with the code (DeepSpeed, flash-linear-attention: bench/gpu_wheels.sh); no Ray, no vLLM.

- learner_step_kernels / learner_step_reference: the learner's forward + backward at the 9B's layer
  dims (hidden 4096, vocabulary 248,320, 3 Gated DeltaNet + 1 gated attention layer), one
  8448-token row, bf16, gradient checkpointing, chunked logprobs, the GRPO loss; with the
  flash-linear-attention kernels, then with transformers' torch reference.
- zero3_cpu_adam: our LearnerWorker (no Ray) on the tiny Qwen3.5 shape under DeepSpeed ZeRO-3,
  bf16, optimizer offloaded and stepped by DeepSpeed's CPU Adam.
- offload_optimizer_1b: one optimizer step over ~1B fp32 parameters: CPU Adam, torch AdamW on
  one thread and on every core, and AdamW on the GPU (no offload).
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time

from bench.gpu_check import GIB, Check, Context, Skip

SEQ_9B = 8448  # the longest POLARIS row: 448 prompt + 8000 response tokens
KERNEL_MODULES = ("fla", "causal_conv1d")


def _sync(ctx: Context) -> None:
    import torch

    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def _timed(ctx: Context, step, warmup: int, iters: int) -> float:
    """Median seconds of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        _sync(ctx)
        start = time.perf_counter()
        step()
        _sync(ctx)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nine_b_layer_config(smoke: bool):
    """Qwen3.5-9B's text config with 4 of its 32 layers (3 linear-attention, 1 full), or toy dims."""
    from transformers import Qwen3_5TextConfig

    from learner.model_shapes import MODEL_CONFIGS

    text = dict(MODEL_CONFIGS["Qwen/Qwen3.5-9B"]["text_config"])
    text.update(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"], use_cache=False,
                mtp_num_hidden_layers=0, max_position_embeddings=SEQ_9B + 64)
    if smoke:
        text.update(hidden_size=128, intermediate_size=256, vocab_size=2048, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32,
                    linear_num_key_heads=2, linear_num_value_heads=4)
    for key in ("model_type", "full_attention_interval"):
        text.pop(key, None)
    return Qwen3_5TextConfig(**text)


def learner_step(ctx: Context, *, kernels: bool) -> None:
    if not kernels:
        for name in KERNEL_MODULES:  # transformers then resolves its torch reference, as without the packages
            sys.modules[name] = None
    elif any(_missing(m) for m in KERNEL_MODULES[:1]):
        raise Skip("flash-linear-attention not installed")
    import torch
    from transformers import Qwen3_5ForCausalLM

    from learner.grpo import policy_loss
    from learner.kernels import kernel_line, model_kernel_paths, resolved_kernels
    from learner.logprobs import token_logprobs

    seq, chunk = (256, 64) if ctx.smoke else (SEQ_9B, 1024)
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    config = nine_b_layer_config(ctx.smoke)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = Qwen3_5ForCausalLM(config).to(dtype)
    model.gradient_checkpointing_enable()
    model.train()
    print(kernel_line(model_kernel_paths(model), ctx.device.type), flush=True)
    resolved = resolved_kernels(sys.modules[type(model).__module__])
    ctx.figure("delta_rule_kernel", resolved["chunk_gated_delta_rule"])
    ctx.figure("conv_kernel", resolved["causal_conv1d_fn"])
    if kernels and resolved["chunk_gated_delta_rule"] == "torch":
        raise AssertionError("flash-linear-attention is installed but transformers runs the torch reference")
    params = sum(p.numel() for p in model.parameters())
    ctx.figure("params_b", params / 1e9)

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (1, seq), generator=g).to(ctx.device)
    attention = torch.ones_like(input_ids)
    mask = torch.zeros((1, seq - 1), dtype=torch.bool, device=ctx.device)
    mask[:, seq // 16:] = True  # the response after the prompt
    advantage = torch.tensor([0.5], device=ctx.device)

    def step():
        logprobs = token_logprobs(model, input_ids, attention, 1.0, chunk)
        loss, _ = policy_loss(logprobs, logprobs.detach(), advantage, mask, torch.zeros(1, dtype=torch.bool,
                              device=ctx.device), clip_low=0.2, clip_high=0.28, total_tokens=int(mask.sum()))
        loss.backward()
        if not torch.isfinite(loss):
            raise AssertionError(f"loss {loss.item()}")
        model.zero_grad(set_to_none=True)

    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _timed(ctx, step, warmup=1, iters=1 if ctx.smoke else 2)
    ctx.figure("fwd_bwd_ms", seconds * 1000)
    ctx.figure("tok_s", seq / seconds)
    if ctx.device.type == "cuda":
        ctx.figure("peak_gib", torch.cuda.max_memory_allocated() / GIB)


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def zero3_cpu_adam(ctx: Context) -> None:
    import torch
    from safetensors import safe_open

    from cluster.names import checkpoint_name_mapper
    from cluster.netutil import free_port
    from learner.settings import LearnerSettings
    from learner.tiny_model import _model
    from learner.worker import LearnerWorker, TrainBatch, TrainRow

    if ctx.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    folder = ctx.scratch / "tiny35"
    shape = {"architecture": "qwen3_5", "hidden_size": 192, "num_layers": 4, "num_heads": 4, "num_kv_heads": 1,
             "intermediate_size": 512, "max_position_embeddings": 1024}
    _model(shape, vocab_size=8192, eos_id=1, pad_id=0).save_pretrained(folder)
    settings = LearnerSettings(
        model_path=str(folder), dtype="float32" if ctx.smoke else "bfloat16", device=ctx.device.type, zero_stage=3,
        lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, micro_batch_size=2,
        gradient_checkpointing=True, clip_low=0.2, clip_high=0.28, temperature=1.0, pad_token_id=0, seed=0,
        checkpoint_names=True, logprob_chunk_tokens=64, offload_optimizer=True, optimizer="cpu_adam")
    start = time.perf_counter()
    worker = LearnerWorker(settings, 0, 1, "127.0.0.1", free_port("127.0.0.1"), num_threads=os.cpu_count() or 1)
    ctx.figure("init_s", time.perf_counter() - start)  # CPU Adam's one-time build included, when not cached
    print(worker.startup_line(), flush=True)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if type(worker.engine.basic_optimizer) is not DeepSpeedCPUAdam:
        raise AssertionError(f"stepped by {type(worker.engine.basic_optimizer).__name__}, not DeepSpeed's CPU Adam")

    before = {name: t.float().clone() for name, t in worker.named_weights()}
    g = torch.Generator().manual_seed(0)
    rows = tuple(TrainRow(tuple(torch.randint(1, 8000, (8,), generator=g).tolist()),
                          tuple(torch.randint(1, 8000, (n,), generator=g).tolist()), a, False)
                 for n, a in ((120, 1.0), (64, -1.0), (200, 0.5), (30, -0.5)))
    start = time.perf_counter()
    metrics = worker.train_step(TrainBatch(rows, step=0))
    ctx.figure("step_s", time.perf_counter() - start)
    after = dict(worker.named_weights())
    if not math.isfinite(metrics["loss"]) or not math.isfinite(metrics["grad_norm"]):
        raise AssertionError(f"loss {metrics['loss']}, grad norm {metrics['grad_norm']}")
    changed = sum(not torch.equal(before[n], after[n].float()) for n in before)
    ctx.figure("weights_changed", f"{changed}/{len(before)}")
    if changed < len(before) // 2:
        raise AssertionError(f"only {changed} of {len(before)} weights changed after a step at lr 1e-3")

    to_checkpoint = checkpoint_name_mapper("qwen3_5_text")
    with safe_open(folder / "model.safetensors", "pt") as f:
        saved = {to_checkpoint(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sent = {name: tuple(t.shape) for name, t in after.items()}
    if sent != saved:
        raise AssertionError(f"sent names/shapes differ from the safetensors': only sent {sorted(set(sent) - set(saved))[:3]}, "
                             f"only saved {sorted(set(saved) - set(sent))[:3]}")


def offload_optimizer_1b(ctx: Context) -> None:
    """One AdamW step over the same ~1B fp32 parameters and gradients, four ways."""
    import torch

    cores = os.cpu_count() or 1
    numel, pieces = (2_000_000, 4) if ctx.smoke else (1_073_741_824, 16)
    ctx.figure("params_b", numel / 1e9)

    torch.set_num_threads(cores)
    torch.manual_seed(0)
    base = [(torch.empty(numel // pieces).uniform_(-1, 1), torch.empty(numel // pieces).uniform_(-1e-3, 1e-3))
            for _ in range(pieces)]

    def tensors(device):
        params = [torch.nn.Parameter(w.to(device, copy=True)) for w, _ in base]
        for p, (_, grad) in zip(params, base):
            p.grad = grad.to(device, copy=True)
        return params

    def measure(name, make_optimizer, device="cpu", threads=cores):
        torch.set_num_threads(threads)
        params = tensors(device)
        optimizer = make_optimizer(params)
        seconds = _timed(ctx, optimizer.step, warmup=1, iters=1 if threads == 1 else 2)  # warm-up allocates state
        ctx.figure(f"{name}_ms", seconds * 1000)
        del optimizer, params
        return seconds

    adamw = dict(lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0)
    torch_1t = measure("torch_adamw_1thread", lambda p: torch.optim.AdamW(p, **adamw), threads=1)
    measure(f"torch_adamw_{cores}threads", lambda p: torch.optim.AdamW(p, **adamw))
    if ctx.device.type == "cuda":
        measure("gpu_adamw_no_offload", lambda p: torch.optim.AdamW(p, fused=True, **adamw), device=ctx.device)
        torch.cuda.empty_cache()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cpu_adam = measure("cpu_adam", lambda p: DeepSpeedCPUAdam(p, adamw_mode=True, **adamw))
    ctx.figure("cpu_adam_speedup_vs_torch_1thread", torch_1t / cpu_adam)


CHECKS = [
    Check("learner_step_kernels", "device", "9B layer dims, one 8448-token row, bf16, checkpointing, chunked logprobs, "
          "flash-linear-attention: fwd+bwd ms, tok/s, peak memory", ("torch", "transformers", "fla"),
          lambda ctx: learner_step(ctx, kernels=True), timeout_s=90),
    Check("learner_step_reference", "device", "the same step on transformers' torch reference kernels",
          ("torch", "transformers"), lambda ctx: learner_step(ctx, kernels=False), timeout_s=120),
    Check("zero3_cpu_adam", "device", "LearnerWorker without Ray: ZeRO-3 bf16, CPU Adam offload, tiny Qwen3.5 shape: "
          "finite loss, weights change, sent names = the safetensors'", ("torch", "transformers", "deepspeed"),
          zero3_cpu_adam, timeout_s=150),
    Check("offload_optimizer_1b", "device", "an AdamW step on ~1B fp32 parameters: CPU Adam vs torch AdamW at 1 and "
          "all threads vs the GPU", ("torch", "deepspeed"), offload_optimizer_1b, timeout_s=150),
]
