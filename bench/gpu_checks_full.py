"""Tier `full` of bench/gpu_check.py: a machine set up with `./install.sh gpu` (CUDA vLLM, Ray,
DeepSpeed), one or more GPUs, no internet.

- engine_tiny35: our VLLMEngine (CUDA graphs) on the tiny Qwen3.5-shaped model, and the weight
  sync into it: the learner's own weights sent back leave its samples as they were; a version of
  zeros leaves every vLLM parameter zero (vLLM only warns about a weight it did not load); two
  perturbed versions give the learner's logprobs (transformers, bf16) at temperatures 1.0 and 0.8.
- engine_9b_dummy: the same engine at Qwen3.5-9B's shape with dummy weights: start-up, decode
  throughput of 24 x 8192 tokens, one full in-place reload (zeros) at the learner's names and shapes.
- nccl_broadcast_verified: `python launch.py conf=tiny35` on two GPUs with vLLM and the NCCL
  weight group, every sync verified.

vLLM, Ray and DeepSpeed are imported inside the checks: this module imports on any machine.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.gpu_check import GIB, ROOT, Check, Context, Skip

# The tiny model's default warm-up (300 steps) takes minutes on CPU; 20 steps already give peaked
# distributions (loss 7.2 -> 2.3), which is what makes a wrongly loaded weight show in logprobs.
TINY_WARMUP_STEPS = 20
TINY_NEW_TOKENS = 64
TEMPERATURES = (1.0, 0.8)  # rollout.sampling and rollout.val_sampling
PERTURBATION = 0.02  # std of the noise added to every learner weight for a new version
SYNC_TIMEOUT_S = 60.0
BUCKET_MB = 16
# The same bytes reloaded and the same seeded batch: kernels are deterministic, so any gap is a bug
# (a wrongly loaded weight moves logprobs by far more)
SAME_WEIGHTS_TOLERANCE = 1e-5

NINE_B = "Qwen/Qwen3.5-9B"
DECODE_REQUESTS, DECODE_TOKENS, PROMPT_TOKENS = 24, 8192, 256  # max_model_len 8448, as conf=polaris

LAUNCH_TIMEOUT_S = 420  # under the check's own limit: a run past it is stopped here, Ray and vLLM with it


def _require_cuda_vllm() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        raise Skip(f"vLLM here is not the CUDA build (platform {current_platform.device_name})")


def _start_vllm_here(ctx: Context) -> None:
    """For a check that starts vLLM in its own process (CUDA vLLM; the CPU build under --smoke). Functions shipped to vLLM's worker
    (apply_model, collective_rpc with a callable) travel pickled, which vLLM allows only with
    VLLM_ALLOW_INSECURE_SERIALIZATION (a local socket between our own processes). The engine process
    is spawned, not forked: this one may have run torch's CPU threads (the tiny model's build)."""
    if not ctx.smoke:
        _require_cuda_vllm()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    for key in ("VLLM_NO_USAGE_STATS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny_built(architecture: str = "qwen3_5") -> Path:
    """The tiny model (Qwen3.5-shaped by default) with a short warm-up, in the shared model cache ($POLARIS_CACHE or
    ~/.cache/polaris-rl, keyed by its build parameters): built once for every check and run."""
    from learner.tiny_model import build_tiny_model

    return build_tiny_model(architecture=architecture, warmup_steps=TINY_WARMUP_STEPS, show_progress=False)


def _tiny_in(architecture: str, dtype, scratch: Path) -> Path:
    """The tiny model saved in `dtype`: engine and learner start from the same bytes, so the
    learner's weights sent back must leave the engine exactly as it was."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built, folder = _tiny_built(architecture), scratch / "tiny"
    AutoModelForCausalLM.from_pretrained(built, dtype=dtype).save_pretrained(folder)
    AutoTokenizer.from_pretrained(built).save_pretrained(folder)
    return folder


# --- run inside vLLM's worker process (pickled by reference: this module imports there) ---

def _parameter_sums(model) -> dict[str, int]:
    """Each parameter's checksum (cluster/sync_verify.py): which ones a reload changed."""
    from cluster.sync_verify import checksum

    return {name: int(checksum(p.data)) for name, p in model.named_parameters()}


def _nonzero_parameters(model) -> list[str]:
    """Parameters with an element other than zero: after a version of all zeros, those it did not
    load whole (a checksum that changed would miss half of a stacked gate_up_proj left behind)."""
    return [name for name, p in model.named_parameters() if p.data.count_nonzero().item()]


def _reload_zeros(worker, layout: list[tuple[str, list[int], str]]) -> tuple[float, int]:
    """The in-place reload WeightSyncExtension.receive_weights runs, fed zeros of the learner's
    names, shapes and vLLM dtypes, made on this GPU one at a time. Returns its seconds and the
    memory it allocated beyond what the engine held (the largest input tensor included)."""
    import torch

    weights = ((name, torch.zeros(shape, dtype=getattr(torch, dtype), device="cuda")) for name, shape, dtype in layout)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() - held


def _memory(worker) -> tuple[int, int]:
    """Bytes: the most the worker's allocator held so far, and what the whole GPU has in use."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return torch.cuda.max_memory_reserved(), total - free


# --- engine_tiny35 ---

class _LearnerRank0:
    """The learner's side of a gloo weight group, sending from a thread of this process while the
    engine's vLLM worker (its own process) receives. The learner's model is a transformers model on
    the GPU; its weights go under the names the engine loads, streamed in layout order as
    LearnerWorker.broadcast_weights sends them. (gloo: NCCL cannot put two ranks on one GPU;
    nccl_broadcast_verified checks the NCCL transport.)"""

    def __init__(self, engine, model):
        from cluster.netutil import free_port
        from cluster.transport import make_transport

        self.engine, self.model, self.thread = engine, model, ThreadPoolExecutor(1)
        port = free_port()
        joined = self.thread.submit(make_transport, "gloo", "127.0.0.1", port, 0, 2, bucket_mb=BUCKET_MB,
                                    timeout_s=SYNC_TIMEOUT_S)
        engine.init_weight_sync("gloo", "127.0.0.1", port, 1, 2, BUCKET_MB, SYNC_TIMEOUT_S)
        self.transport = joined.result()

    def weights(self) -> list:
        """(name, tensor) of every weight the learner sends, under the names the engine loads."""
        from cluster.names import engine_parameters

        return [(n, p.detach()) for n, p in engine_parameters(self.model)]

    def push(self, version: int, named: list | None = None):
        """Send the model's weights (or `named`) as `version`; returns (sent checksums, the
        engine's, seconds the engine took to receive and reload them)."""
        from cluster.transport import spec_of

        named = self.weights() if named is None else named
        sending = self.thread.submit(self.transport.send, iter(named), version, None, spec_of(named))
        start = time.perf_counter()
        received = self.engine.receive_weights(version)
        seconds = time.perf_counter() - start
        return sending.result(), received, seconds

    def close(self) -> None:
        self.transport.close()
        self.thread.shutdown(wait=False)  # a send left waiting by a failed receive ends at SYNC_TIMEOUT_S


def _chat_requests(tokenizer, count: int) -> list:
    from actors.engine import GenerationRequest

    texts = ("Write a story about a lighthouse.", "A tale of two cats.", "The storm.", "A letter from the moon.")
    return [GenerationRequest(f"r{k}", tuple(tokenizer.apply_chat_template(
        [{"role": "user", "content": texts[k % len(texts)]}], add_generation_prompt=True, tokenize=True,
        return_dict=False)), 1000 + k) for k in range(count)]


def _sampling(temperature: float, max_new_tokens: int):
    """rollout.sampling's settings (conf/schema.py) at this temperature and length."""
    from actors.engine import SamplingParams

    return SamplingParams(temperature, top_p=0.95, top_k=20, repetition_penalty=1.1, max_new_tokens=max_new_tokens)


def _probe_logprobs(model, probe) -> tuple[float, ...]:
    """The probe's log-probabilities at temperature 1, as LearnerWorker.probe_logprobs scores them."""
    import torch

    from learner.logprobs import token_logprobs

    ids = torch.tensor([list(probe)], device=model.device)
    with torch.no_grad():
        return tuple(token_logprobs(model, ids, torch.ones_like(ids), 1.0)[0].tolist())


def _learner_gaps(model, requests, generations, temperature: float):
    """|engine - learner| log-probability of every sampled token (a flat tensor)."""
    import torch

    from learner.logprobs import token_logprobs

    gaps = []
    for r, g in zip(requests, generations):
        ids = torch.tensor([r.prompt_token_ids + g.token_ids], device=model.device)
        with torch.no_grad():
            learner = token_logprobs(model, ids, torch.ones_like(ids), temperature)[0, len(r.prompt_token_ids) - 1:]
        gaps.append((learner.float().cpu() - torch.tensor(g.logprobs)).abs())
    return torch.cat(gaps)


def _perturb(model, seed: int) -> None:
    """Move every weight by seeded noise: the learner after an update."""
    import torch

    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(PERTURBATION * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))


def _own_weights_back(ctx: Context, engine, sender: _LearnerRank0, requests) -> float:
    """(a) The learner's weights as loaded are the engine's own bytes: sent back as version 1, the
    seeded samples must not move. Returns the reload's seconds."""
    import torch

    from cluster.sync_verify import SyncReport, verify_sync

    own = engine.llm.apply_model(_parameter_sums)[0]
    before = engine.generate(requests, _sampling(1.0, TINY_NEW_TOKENS))
    sent, received, reload_s = sender.push(1)
    verify_sync(1, SyncReport((sent,)), [SyncReport(received)], 0.0)  # the bytes arrived as sent
    after = engine.generate(requests, _sampling(1.0, TINY_NEW_TOKENS))
    sums = engine.llm.apply_model(_parameter_sums)[0]
    changed = sorted(n for n in sums if sums[n] != own[n])
    ctx.figure("same_weights_changed_params", len(changed))
    moved = f"vLLM parameters whose bytes changed: {changed[:8]}"
    if [b.token_ids for b in before] != [a.token_ids for a in after]:
        raise AssertionError(f"the engine's own weights sent back changed its seeded samples; {moved}")
    gap = max(torch.tensor(b.logprobs).sub(torch.tensor(a.logprobs)).abs().max().item() for b, a in zip(before, after))
    ctx.figure("same_weights_gap_nats", gap)
    if gap > SAME_WEIGHTS_TOLERANCE:
        raise AssertionError(f"the engine's own weights sent back moved its logprobs by up to {gap:.3g}; {moved}")
    return reload_s


def _zeros_version(engine, sender: _LearnerRank0) -> float:
    """(c) Version 2, every weight zero: every element of every vLLM parameter must be zero after it,
    so every text weight the engine holds is one the learner sends. Returns the reload's seconds."""
    import torch

    from cluster.sync_verify import SyncReport, verify_sync

    sent, received, seconds = sender.push(2, [(n, torch.zeros_like(t)) for n, t in sender.weights()])
    verify_sync(2, SyncReport((sent,)), [SyncReport(received)], 0.0)
    left = engine.llm.apply_model(_nonzero_parameters)[0]
    if left:
        raise AssertionError(f"{len(left)} vLLM parameters not (wholly) loaded from the learner's weights: {left[:8]}")
    return seconds


def _perturbed_versions(ctx: Context, engine, sender: _LearnerRank0, learner, probe, requests) -> list[float]:
    """(b) Versions 3 and 4, each the learner moved further by noise: the probe passes verify_sync,
    and the engine's logprobs of the tokens it samples at each temperature are the learner's
    within the tolerance of the model's dtype. Returns the reloads' seconds."""
    import torch

    from cluster.sync_verify import PROBE_TOLERANCE, SyncReport, verify_sync

    tolerance = PROBE_TOLERANCE[learner.dtype]
    gaps, probe_gaps, reload_s = {t: [] for t in TEMPERATURES}, [], []
    for version in (3, 4):
        _perturb(learner, seed=version)
        sent, received, seconds = sender.push(version)
        reload_s.append(seconds)
        report = verify_sync(version, SyncReport((sent,), _probe_logprobs(learner, probe)),
                             [SyncReport(received, tuple(engine.score_probe(probe, 1.0)))], tolerance)
        probe_gaps.append(report["sync/probe_gap"])
        for t in TEMPERATURES:
            generations = engine.generate(requests, _sampling(t, TINY_NEW_TOKENS))
            gaps[t].append(_learner_gaps(learner, requests, generations, t))
    ctx.figure("probe_gap_nats", max(probe_gaps))
    for t in TEMPERATURES:
        every, name = torch.cat(gaps[t]), f"t{t:.1f}".replace(".", "_")
        mean = every.mean().item()
        ctx.figure(f"max_gap_{name}_nats", every.max().item())
        ctx.figure(f"mean_gap_{name}_nats", mean)
        if not mean <= tolerance:
            raise AssertionError(f"temperature {t}: the engine's logprobs of its sampled tokens are {mean:.4g} nats "
                                 f"per token from the learner's (tolerance {tolerance:g})")
    return reload_s


def engine_tiny35(ctx: Context) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.engine import build_engine
    from cluster.sync_verify import probe_token_ids

    _start_vllm_here(ctx)
    # --smoke: vLLM's CPU build, which cannot load Qwen3.5 (its model module needs torchvision):
    # the tiny Qwen3 in float32, as the suite runs it -- the check's own code, not Qwen3.5's
    architecture, dtype = ("qwen3", torch.float32) if ctx.smoke else ("qwen3_5", torch.bfloat16)
    folder = _tiny_in(architecture, dtype, ctx.scratch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    engine = build_engine("vllm", str(folder), dtype=dtype, device=ctx.device.type,
                          stop_token_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
                          pad_token_id=tokenizer.pad_token_id, max_model_len=1024, seed=0)
    ctx.figure("startup_s", time.perf_counter() - start)
    sender = None
    try:
        learner = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(ctx.device).eval()
        sender = _LearnerRank0(engine, learner)
        requests = _chat_requests(tokenizer, 8)
        reload_s = [_own_weights_back(ctx, engine, sender, requests), _zeros_version(engine, sender)]
        reload_s += _perturbed_versions(ctx, engine, sender, learner, probe_token_ids(tokenizer), requests)
        ctx.figure("reload_s", max(reload_s))
    finally:
        if sender is not None:
            sender.close()
        engine.close()


# --- engine_9b_dummy ---

@contextlib.contextmanager
def _llm_arguments(**extra):
    """VLLMEngine as we run it, with these vllm.LLM arguments added (it takes none of its own)."""
    import vllm

    real = vllm.LLM
    vllm.LLM = lambda *args, **kwargs: real(*args, **kwargs, **extra)
    try:
        yield
    finally:
        vllm.LLM = real


def _nine_b_folder(scratch: Path) -> Path:
    """A model folder holding only Qwen3.5-9B's config.json (learner/model_shapes.py): the
    multimodal checkpoint's, which the engine serves text only."""
    from learner.model_shapes import MODEL_CONFIGS

    folder = scratch / "qwen3_5_9b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MODEL_CONFIGS[NINE_B], indent=1))
    return folder


def _nine_b_layout() -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of every tensor learner rank 0 sends for Qwen3.5-9B, in its order: the
    text model AutoModelForCausalLM builds (on the meta device here), under the checkpoint names
    vLLM loads (cluster/names.py), in the dtype the engine holds each in."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    from cluster.names import checkpoint_name_mapper, vllm_dtype
    from learner.model_shapes import MODEL_CONFIGS

    text = {k: v for k, v in MODEL_CONFIGS[NINE_B]["text_config"].items()
            if k not in ("model_type", "full_attention_interval")}  # the layer types are given
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3_5TextConfig(**text), dtype=torch.bfloat16)
    rename = checkpoint_name_mapper(model.config.model_type)
    return [(rename(n), list(p.shape), str(vllm_dtype(rename(n), torch.bfloat16)).removeprefix("torch."))
            for n, p in model.named_parameters()]


def engine_9b_dummy(ctx: Context) -> None:
    import random

    import torch

    from actors.engine import GenerationRequest
    from actors.vllm_engine import VLLMEngine

    _start_vllm_here(ctx)
    folder = _nine_b_folder(ctx.scratch)
    start = time.perf_counter()
    # no tokenizer offline: token-id prompts, and no end-of-sequence token (every request runs to max_tokens)
    with _llm_arguments(load_format="dummy", skip_tokenizer_init=True):
        engine = VLLMEngine(str(folder), dtype=torch.bfloat16, device="cuda", stop_token_ids=(),
                            max_model_len=PROMPT_TOKENS + DECODE_TOKENS, seed=0)
    ctx.figure("startup_s", time.perf_counter() - start)
    try:
        rng = random.Random(0)
        requests = [GenerationRequest(f"r{k}", tuple(rng.randrange(100_000) for _ in range(PROMPT_TOKENS)), k)
                    for k in range(DECODE_REQUESTS)]
        start = time.perf_counter()
        generations = engine.generate(requests, _sampling(1.0, DECODE_TOKENS))
        seconds = time.perf_counter() - start
        lengths = [len(g.token_ids) for g in generations]
        ctx.figure("decode_tok_s", sum(lengths) / seconds)
        if set(lengths) != {DECODE_TOKENS}:
            raise AssertionError(f"requests stopped early: {sorted(lengths)[:4]} tokens of {DECODE_TOKENS}")
        peak, used = engine.llm.collective_rpc(_memory)[0]
        ctx.figure("peak_gib", peak / GIB)
        ctx.figure("used_gib", used / GIB)

        layout = _nine_b_layout()
        reload_s, extra = engine.llm.collective_rpc(_reload_zeros, args=(layout,))[0]
        ctx.figure("reload_s", reload_s)
        ctx.figure("reload_extra_gib", extra / GIB)
        left = engine.llm.apply_model(_nonzero_parameters)[0]
        if left:
            raise AssertionError(f"{len(left)} vLLM parameters not (wholly) loaded from the learner's {len(layout)} "
                                 f"tensors: {left[:8]}")
        engine.llm.reset_prefix_cache()  # as VLLMEngine.receive_weights does after a reload
        [again] = engine.generate(requests[:1], _sampling(1.0, 32))
        if not all(math.isfinite(x) for x in again.logprobs):
            raise AssertionError("non-finite logprobs after the reload")
    finally:
        engine.close()


# --- nccl_broadcast_verified ---

def _run_logged(argv: list[str], env: dict, log: Path, timeout_s: float) -> int:
    """Run argv with its output in `log`; past timeout_s stop its whole process group (launch.py
    checkpoints on SIGTERM; its Ray cluster and vLLM processes go with it) and fail."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    print(_tail(log), flush=True)
    raise AssertionError(f"launch.py ran past {timeout_s:.0f}s")


def _tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _launch_argv(output_dir: Path) -> list[str]:
    """Two steps of conf=tiny35 on GPUs with vLLM in bf16, the NCCL weight group, every sync checked
    by checksums and the probe (the model built with the short warm-up, not the run's 300 steps)."""
    return [sys.executable, str(ROOT / "launch.py"), "conf=tiny35", "trainer.device=cuda", "rollout.engine=vllm",
            "model.dtype=bfloat16", f"model.path={_tiny_built()}", "weight_sync.backend=nccl",
            "weight_sync.verify=1", "trainer.total_steps=2", "trainer.eval_every=0", "trainer.progress_bar=false",
            f"trainer.output_dir={output_dir}"]


def _verified_rows(output_dir: Path) -> list[dict]:
    """The run's metrics rows, once its config says NCCL and every step's sync was verified at the
    first try (a sync that failed its check and was recovered counts an engine restart)."""
    import yaml

    backend = yaml.safe_load((output_dir / "config.yaml").read_text())["weight_sync"]["backend"]
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    if backend != "nccl" or [r["step"] for r in rows] != [0, 1]:
        raise AssertionError(f"weight_sync.backend={backend}, steps {[r['step'] for r in rows]}: expected nccl, [0, 1]")
    for r in rows:
        if r.get("sync/verified") != 1.0 or r.get("rollout/engine_restarts") != 0:
            raise AssertionError(f"step {r['step']}: sync/verified={r.get('sync/verified')}, engine restarts "
                                 f"{r.get('rollout/engine_restarts')}, rows trained {r.get('groups/rows_trained')}")
    return rows


def _largest(rows: list[dict], key: str) -> float:
    return max((r[key] for r in rows if r.get(key) is not None), default=math.nan)  # NaN is logged as null


def nccl_broadcast_verified(ctx: Context) -> None:
    import torch

    from cluster.sync_verify import PROBE_TOLERANCE

    _require_cuda_vllm()
    out, log = ctx.scratch / "run", ctx.scratch / "launch.log"
    # its own Ray cluster on loopback, DeepSpeed on the GPU, nothing asked of the network
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DS_ACCELERATOR")}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    argv = _launch_argv(out)
    start = time.perf_counter()
    code = _run_logged(argv, env, log, LAUNCH_TIMEOUT_S)
    ctx.figure("run_s", time.perf_counter() - start)
    if code != 0:
        print(_tail(log), flush=True)
        raise AssertionError(f"launch.py exited {code}: {_tail(log, 1)}")
    rows = _verified_rows(out)
    probe_gap, tolerance = _largest(rows, "sync/probe_gap"), PROBE_TOLERANCE[torch.bfloat16]
    ctx.figure("step_s", rows[-1]["time/step"])
    ctx.figure("sync_s", _largest(rows, "time/sync"))
    ctx.figure("probe_gap_nats", probe_gap)
    ctx.figure("logprob_diff_nats", _largest(rows, "rollout/logprob_diff"))
    if not probe_gap <= tolerance:
        raise AssertionError(f"probe gap {probe_gap:.4g} nats over the bf16 tolerance {tolerance:g}")


CHECKS = [
    Check("engine_tiny35", "full", "VLLMEngine with CUDA graphs on the tiny Qwen3.5, gloo weight sync: own weights "
          "sent back = same samples, zeros reach every vLLM parameter, 2 perturbed versions = learner logprobs at "
          "T 1.0/0.8; startup, reload, gaps", ("vllm", "transformers", "torch"), engine_tiny35,
          timeout_s=300),
    Check("engine_9b_dummy", "full", "VLLMEngine at Qwen3.5-9B's shape, dummy weights: startup, decode tok/s of "
          f"{DECODE_REQUESTS} x {DECODE_TOKENS} tokens, one in-place reload of every weight at the learner's names, "
          "peak memory",
          ("vllm", "transformers", "torch"), engine_9b_dummy, timeout_s=540, smoke=False),
    Check("nccl_broadcast_verified", "full", "launch.py conf=tiny35 on GPUs, vLLM, NCCL weight group, every sync "
          "verified by checksums and the probe: 2 steps", ("vllm", "ray", "deepspeed"),
          nccl_broadcast_verified, min_gpus=2, timeout_s=540, smoke=False),
]
