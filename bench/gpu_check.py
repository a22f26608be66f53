"""One-GPU learner check: the learner's hot loop (chunked token logprobs -> GRPO loss -> backward ->
AdamW step) on a ~1B-parameter Qwen3 with random weights, bf16, gradient checkpointing, batch 1,
at long sequence lengths. Needs torch + transformers only (no Ray, DeepSpeed or vLLM) and no
network: the model is built from a config. Run through bench/gpu_check.sh on the GPU machine.

    python bench/gpu_check.py [--seqs 4096,8192] [--layers 16] [--hidden 2048] [--vocab 151936]
    python bench/gpu_check.py --device cpu --seq 256 --layers 2   # smoke test: a ~3M model on CPU

MFU counts model FLOPs, 6 x N x tokens + 12 x layers x (heads x head_dim) x seq^2 per sequence
(the PaLM appendix B convention: attention not halved for the causal mask, recomputation not
counted; with gradient checkpointing the hardware does about 8/6 of that), with N the matmul
parameters (all but the input embedding; the lm_head counted), over the bf16 dense peak
(H200/H100 SXM: 989 TFLOP/s). Beside the measured peak memory it prints the memory plan's
estimate (learner/memory_plan.py) of the activations + logits chunk at the same shape, to
calibrate that estimate.

Last line: gpu_check: params_b=<x> seq=4096 tok_s=<a> mfu=<b> seq=8192 tok_s=<c> mfu=<d> peak_gib=<e>
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

GIB = 2**30


def load_token_logprobs():
    try:
        from learner.logprobs import token_logprobs
        return token_logprobs
    except ImportError as err:
        print(f"note: learner.logprobs not importable ({err}); using the inline chunked log-softmax below", flush=True)
        return _inline_token_logprobs


def _inline_token_logprobs(model, input_ids, attention_mask, temperature, chunk_tokens=0):
    """The same computation as learner/logprobs.py: decoder once, then head + log_softmax per chunk
    of positions, each chunk recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    def chunk_lp(head, h, t):
        return torch.log_softmax(head(h).float() / temperature, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)

    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden, targets, head = hidden[:, :-1], input_ids[:, 1:], model.get_output_embeddings()
    step = chunk_tokens if chunk_tokens > 0 else hidden.shape[1]
    return torch.cat([checkpoint(chunk_lp, head, hidden[:, s:s + step], targets[:, s:s + step], use_reentrant=False)
                      for s in range(0, hidden.shape[1], step)], dim=1)


def grpo_loss(logprobs: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The learner's clipped token-mean loss (learner/grpo.py) on one policy row."""
    try:
        from learner.grpo import policy_loss
    except ImportError:
        ratio = torch.exp(logprobs - logprobs.detach())
        per_token = -torch.minimum(ratio * advantage[:, None], ratio.clamp(0.8, 1.28) * advantage[:, None])
        return (per_token * mask).sum() / mask.sum()
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantage, mask, torch.zeros_like(advantage, dtype=torch.bool),
                          clip_low=0.2, clip_high=0.28, total_tokens=int(mask.sum()))
    return loss


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         head_dim=args.hidden // args.heads, max_position_embeddings=max(args.seqs) + 1,
                         tie_word_embeddings=args.tied, max_window_layers=args.layers, use_cache=False)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        model = Qwen3ForCausalLM(config)
    torch.set_default_dtype(previous)
    model.gradient_checkpointing_enable()  # as the learner does (learner/worker.py)
    model.train()
    return config, model


def planned_dynamic_bytes(config, seq: int, chunk: int, dtype: str) -> int:
    """The memory plan's activations + logits chunk for one micro-batch of `seq` tokens."""
    from learner.memory_plan import EngineSetup, LearnerSetup, plan_memory
    from learner.model_shapes import ModelShape

    shape = ModelShape.from_hf_config(config.to_dict())
    plan = plan_memory(shape, LearnerSetup(1, 0, dtype, True, seq, chunk), EngineSetup(1, 1, seq, 1, 0.9, dtype), 1000)
    return sum(v for k, v in plan.learner.gpu.items() if k.startswith("activations") or k == "logits chunk")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_length(model, optimizer, token_logprobs, seq: int, args, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seq)
    input_ids = torch.randint(0, args.vocab, (1, seq), generator=g).to(device)
    attention_mask = torch.ones_like(input_ids)
    mask = torch.zeros((1, seq - 1), dtype=torch.bool, device=device)
    mask[:, min(256, seq // 4):] = True  # response tokens after a prompt of up to 256 tokens
    advantage = torch.tensor([0.5], device=device)

    def step():
        logprobs = token_logprobs(model, input_ids, attention_mask, 1.0, chunk_tokens=args.chunk)
        grpo_loss(logprobs, advantage, mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    static = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"seconds": statistics.median(times), "peak": peak, "static": static}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seqs", default="4096,8192", help="comma-separated sequence lengths (batch 1)")
    ap.add_argument("--seq", dest="seqs", help="alias of --seqs")
    # None: the GPU default, or a small model on --device cpu (a smoke test of well under a minute)
    sizes = {"layers": (16, 2), "hidden": (2048, 256), "intermediate": (6144, 768), "heads": (16, 4),
             "kv_heads": (8, 2), "vocab": (151936, 4096), "chunk": (1024, 64), "warmup": (2, 1), "iters": (5, 2)}
    for name, (gpu_default, cpu_default) in sizes.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help=f"default {gpu_default} on cuda, {cpu_default} on cpu")
    ap.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attn", default="sdpa", help="transformers attention implementation")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (H200/H100 SXM bf16)")
    args = ap.parse_args()
    args.seqs = [int(s) for s in str(args.seqs).split(",")]
    device = torch.device(args.device)
    for name, defaults in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[device.type == "cpu"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: FAIL torch sees no CUDA device", flush=True)
        return 2
    dtype = getattr(torch, args.dtype)
    token_logprobs = load_token_logprobs()

    t0 = time.perf_counter()
    config, model = build_model(args, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    embedding = 0 if args.tied else args.vocab * args.hidden  # a lookup, no matmul
    matmul_params = params - embedding
    # states in the params' dtype; fused on cuda: no parameter-sized temporaries in the peak
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; model Qwen3 {params / 1e9:.3f}B params "
          f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, intermediate {config.intermediate_size}, "
          f"tied {args.tied}), {args.dtype}, gradient checkpointing, AdamW, logprob chunk {args.chunk}; "
          f"built in {time.perf_counter() - t0:.1f}s", flush=True)

    summary, peak_all = [], 0
    for seq in args.seqs:
        try:
            r = run_length(model, optimizer, token_logprobs, seq, args, device)
        except torch.cuda.OutOfMemoryError as err:
            print(f"seq {seq}: out of memory ({str(err).splitlines()[0]})", flush=True)
            summary.append(f"seq={seq} tok_s=oom mfu=oom")
            torch.cuda.empty_cache()
            continue
        flops = 6 * matmul_params * seq + 12 * args.layers * args.heads * (args.hidden // args.heads) * seq**2
        tok_s = seq / r["seconds"]
        mfu = flops / r["seconds"] / (args.peak_tflops * 1e12) if device.type == "cuda" else math.nan
        planned = planned_dynamic_bytes(config, seq, args.chunk, args.dtype)
        grads = params * (2 if args.dtype == "bfloat16" else 4)
        measured = r["peak"] - r["static"] - grads
        peak_all = max(peak_all, r["peak"])
        memory = (f"peak {r['peak'] / GIB:.2f} GiB (static {r['static'] / GIB:.2f} + grads {grads / GIB:.2f} + "
                  f"activations/logits {measured / GIB:.2f}; the memory plan says {planned / GIB:.2f})"
                  if device.type == "cuda" else f"memory not measured on cpu (the memory plan says {planned / GIB:.3f} "
                  "GiB of activations/logits)")
        print(f"seq {seq}: {r['seconds'] * 1000:.0f} ms/step, {tok_s:,.0f} tok/s, {flops / 1e12:.2f} model TFLOP/step, "
              f"MFU {mfu:.3f}; {memory}", flush=True)
        summary.append(f"seq={seq} tok_s={tok_s:.0f} mfu={mfu:.3f}")
    print(f"gpu_check: params_b={params / 1e9:.3f} {' '.join(summary)} peak_gib={peak_all / GIB:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
