"""The run planner: how long a run takes, what it costs, where it waits (docs/design.md#the-run-planner).

    python -m cluster.plan conf=NAME [key=value ...] [--gpus N] [--gpu a100-80gb|h100|h200]
                           [--layout separate|colocated] [--usd-per-gpu-hour X] [--assume NAME=VALUE ...]
                           [--gpu-check LOG] [--judge-check LOG]

The config is loaded as launch.py loads it. --gpus defaults to the config's own split (learner
ranks + engines x tensor parallel); another count is split between engines and learners at the
fastest split that fits memory. layout=separate is how polaris-rl places its roles (each on GPUs
of its own); colocated (training and generation taking turns on every GPU) is planned for
comparison with runs that did that. --gpu-check reads bench/gpu_check.sh figures in place of the
published efficiency defaults, --judge-check bench/judge_check.py figures in place of the judge's
(thought tokens and the answer's length per judgment, the tier's latency range). Every assumption
is printed with its source. The last line is

    plan: layout=.. gpus=.. run_hours=.. compute_usd=.. judge_usd=.. bottleneck=..
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields, replace
from pathlib import Path

from cluster.plan_inputs import (
    PRICE_SOURCE,
    SOURCES,
    Assumptions,
    GpuSpec,
    gpu_kind_from_device_name,
    gpu_spec,
    with_overrides,
)
from cluster.plan_model import (
    LAYOUTS,
    Layout,
    Lengths,
    RunPlan,
    best_plan,
    evidence_words_for,
    generate_s,
    plan_run,
)
from conf.errors import ConfigError, PolarisError
from learner.memory_plan import GIB

SCALING_GPUS = (4, 8, 16, 32)


def bucket_edges_words() -> tuple[float, ...]:
    from eval.metrics import BUCKET_EDGES_WORDS

    return tuple(float(e) for e in BUCKET_EDGES_WORDS)


def own_layout(cfg) -> Layout:
    ro = cfg.rollout
    return Layout("separate", cfg.learner.world_size + ro.num_engines * ro.tensor_parallel_size, ro.num_engines,
                  cfg.learner.world_size, ro.tensor_parallel_size)


def plan_for(cfg, gpu_kind: str, gpus: int | None, layout: str, assumptions: Assumptions,
             usd_per_hour: float | None = None, *, own_split: bool = True) -> RunPlan:
    """The plan at the config's own split when it matches (own_split; refused with the memory plan's
    numbers when that cannot fit), else at the fastest split of `gpus` that fits."""
    from learner.model_shapes import model_config, run_model_name

    gpu = gpu_spec(gpu_kind, usd_per_hour)
    own = own_layout(cfg)
    gpus = own.gpus if gpus is None else gpus
    shape = model_config(run_model_name(cfg.model))
    if own_split and layout == "separate" and gpus == own.gpus:
        return plan_run(cfg, shape, gpu, own, assumptions, bucket_edges_words())
    return best_plan(cfg, shape, gpu, layout, gpus, assumptions, bucket_edges_words())


def plan_line(plan: RunPlan) -> str:
    return (f"plan: layout={plan.layout.kind} gpus={plan.layout.gpus} run_hours={plan.run_hours:.1f} "
            f"compute_usd={plan.compute_usd:.0f} judge_usd={plan.judge_usd:.0f} bottleneck={plan.step.bottleneck}")


def phase_line(plan: RunPlan) -> str:
    s = plan.step
    swap = f" (+ swap {s.swap_s:.1f})" if s.swap_s else ""
    schedule = "overlapped (rollout.max_staleness=1)" if s.overlapped else "in sequence (on-policy)"
    return (f"per step (s): generate {s.generate_s:.1f} | judge {s.judge_tail_s:.1f} | train {s.train_s:.1f} | "
            f"sync {s.sync_s:.1f}{swap} -> step {s.step_s:.1f}, phases {schedule}")


def run_prediction(cfg, device_name: str | None = None) -> tuple[str, dict[str, float]]:
    """For a run starting on GPUs (launch.py, actors/tracking.py): the planner's prediction of this
    run's own layout on the visible GPU kind, as console lines and StepTimes.by_phase(); ("...", {})
    when the GPU has no entry in the planner's table or the plan cannot be made."""
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return "plan: no prediction (no GPU visible)", {}
        device_name = torch.cuda.get_device_name(0)
    kind = gpu_kind_from_device_name(device_name)
    if kind is None:
        return f"plan: no prediction: the planner has no figures for {device_name!r} (cluster/plan_inputs.py)", {}
    try:
        plan = plan_for(cfg, kind, None, "separate", Assumptions())
    except PolarisError as why:
        return f"plan: no prediction: {str(why).splitlines()[0]}", {}
    text = (f"plan: predicted on {kind} (`python -m cluster.plan` explains every assumption): {phase_line(plan)}; "
            f"metrics.jsonl logs plan/<phase>_s_predicted beside time/<phase>\n{plan_line(plan)}")
    return text, plan.step.by_phase()


def gpu_check_figures(text: str) -> dict[str, float]:
    """`gpu_check: <check>.<figure>=<number>` lines of a bench/gpu_check.sh log."""
    found = re.findall(r"^gpu_check: ([\w.]+)=([-+0-9.eE]+)\s*$", text, flags=re.MULTILINE)
    return {name: float(value) for name, value in found}


def assumptions_from_gpu_check(a: Assumptions, figures: dict[str, float], gpu: GpuSpec) -> tuple[Assumptions, dict]:
    """Measured efficiencies in place of the defaults (the log must come from a `gpu` of this kind):
    learner_step_kernels (Qwen3.5-9B's dims with 4 layers, forward + recomputed forward + backward of
    one row), engine_9b_dummy (decode at the 9B's full shape: the model's time at full bandwidth over
    the measured time), offload_optimizer_1b (CPU Adam on ~1B parameters). Returns the assumptions
    and, per changed name, where its value came from."""
    from learner.model_shapes import MODEL_CONFIGS, ModelShape

    nine_b = ModelShape.from_hf_config(MODEL_CONFIGS["Qwen/Qwen3.5-9B"])
    changes, notes = {}, {}
    tok_s, params_b = figures.get("learner_step_kernels.tok_s"), figures.get("learner_step_kernels.params_b")
    if tok_s and params_b:  # its input embedding table is a lookup: no FLOPs
        weights = params_b * 1e9 - nine_b.vocab_size * nine_b.hidden_size
        changes["training_mfu"] = 8 * weights * tok_s / gpu.peak_bf16_flops
        notes["training_mfu"] = "learner_step_kernels.tok_s (one GPU, one row, no ZeRO: an upper bound)"
    decode_tok_s = figures.get("engine_9b_dummy.decode_tok_s")
    if decode_tok_s:
        from bench.gpu_checks_full import DECODE_REQUESTS, DECODE_TOKENS, PROMPT_TOKENS

        ideal = replace(a, decode_efficiency=1.0, training_mfu=1.0)
        lengths = Lengths(DECODE_TOKENS, DECODE_TOKENS**2, DECODE_TOKENS)  # every request runs to the limit
        at_peak = generate_s(nine_b, gpu, ideal, dtype_bytes=2, sequences=DECODE_REQUESTS, engines=1, tensor_parallel=1,
                             lengths=lengths, prompt_tokens=PROMPT_TOKENS, decode_steps=DECODE_TOKENS)
        changes["decode_efficiency"] = at_peak / (DECODE_REQUESTS * DECODE_TOKENS / decode_tok_s)
        notes["decode_efficiency"] = "engine_9b_dummy.decode_tok_s"
    adam_ms, adam_b = figures.get("offload_optimizer_1b.cpu_adam_ms"), figures.get("offload_optimizer_1b.params_b")
    if adam_ms and adam_b:
        changes["cpu_adam_params_per_s"] = adam_b * 1e9 / (adam_ms / 1000)
        notes["cpu_adam_params_per_s"] = "offload_optimizer_1b.cpu_adam_ms"
    return replace(a, **changes), notes


def judge_check_figures(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """The figures (`judge_check: <name>=<number>` lines) of a bench/judge_check.py log, and what
    its last line says was measured (backend, model, thinking, tier)."""
    found = re.findall(r"^judge_check: (\w+)=([-+0-9.eE]+)\s*$", text, flags=re.MULTILINE)
    last = re.findall(r"^judge_check: (backend=.*)$", text, flags=re.MULTILINE)
    identity = dict(pair.split("=", 1) for pair in last[-1].split()) if last else {}
    return {name: float(value) for name, value in found}, identity


def assumptions_from_judge_check(a: Assumptions, log: Path, judge) -> tuple[Assumptions, dict]:
    """The judge's measured thought tokens per judgment and latency range (for the tier measured)
    in place of the defaults; refused when the log measured another model or thinking level than
    the config's judge (`judge`), or measured nothing."""
    if not log.is_file():
        raise ConfigError(f"--judge-check {log}: no such file")
    figures, identity = judge_check_figures(log.read_text())
    if "thought_tokens" not in figures or not identity:
        raise ConfigError(f"--judge-check {log}: no judgments measured in it (bench/judge_check.py writes "
                          "'judge_check: thought_tokens=..' and a last 'judge_check: backend=..' line)")
    for key, setting, wanted in (("model", "model", judge.model), ("thinking", "thinking_level", judge.thinking_level)):
        if identity.get(key) != wanted:
            raise ConfigError(f"--judge-check {log}: measured {key} {identity.get(key)!r}, but the config's judge "
                              f"has {wanted!r} (judge.{setting})")
    where = f"{log}: {identity.get('calls', '?')} judgments by {identity.get('backend')} {identity['model']}"
    if identity.get("backend") == "local":
        where += " (the loopback judge: a dry run, not the service)"
    changes = {"judge_thought_tokens": round(figures["thought_tokens"])}
    notes = {"judge_thought_tokens": f"measured: thought_tokens in {where}, stories of "
                                     f"{figures.get('story_words', float('nan')):.0f} words on average"}
    if "visible_tokens" in figures:  # the answer as written, in place of evidence quotes at the rubric's limit
        changes["judge_evidence_words"] = evidence_words_for(figures["visible_tokens"], a)
        notes["judge_evidence_words"] = (f"measured: visible_tokens in {where} "
                                         f"({figures['visible_tokens']:.0f} tokens an answer)")
    tier = identity.get("tier")
    if tier in ("flex", "standard") and {"latency_min_s", "latency_max_s"} <= figures.keys():
        for end in ("min", "max"):
            changes[f"{tier}_latency_{end}_s"] = figures[f"latency_{end}_s"]
            notes[f"{tier}_latency_{end}_s"] = f"measured: latency_{end}_s in {where}"
    return replace(a, **changes), notes


def format_report(cfg, conf_name: str, plan: RunPlan, sources: dict[str, str],
                  scaling: list[tuple[int, RunPlan | str]], other: RunPlan | str) -> str:
    w, g, a, j = plan.workload, plan.gpu, plan.assumptions, cfg.judge
    memory = plan.memory
    lines = [
        f"run plan: conf={conf_name}, {cfg.model.path} ({plan.model_params / 1e9:.2f}B params), "
        f"{plan.layout.gpus} x {g.name}, layout {plan.layout.describe()}",
        f"gpu: {g.peak_bf16_flops / 1e12:.0f} TFLOPS bf16 dense, HBM {g.hbm_bytes_per_s / 1e9:.0f} GB/s, "
        f"NVLink {g.nvlink_bytes_per_s / 1e9:.0f} GB/s and PCIe {g.pcie_bytes_per_s / 1e9:.0f} GB/s one way, "
        f"{g.network_bytes_per_s / 1e9:.0f} GB/s per GPU between nodes, {g.memory_gib:g} GiB, "
        f"${g.usd_per_hour:.2f}/GPU-hour ({sources.get('usd_per_hour', PRICE_SOURCE)})",
        f"workload per step: {cfg.data.prompts_per_step} prompts x group {cfg.rollout.n}: {w.sequences} generated, "
        f"{w.rows} trained and judged; requested {w.target_words[0]:.0f}-{w.target_words[1]:.0f} words (the "
        f"evaluation's in-distribution buckets) -> responses of {w.lengths.mean:.0f} tokens on average (limit "
        f"{cfg.rollout.sampling.max_new_tokens}; stories {w.lengths.story_mean:.0f}), {w.train_tokens:,.0f} "
        f"training tokens; P = {plan.matmul_params / 1e9:.2f}B weights a token passes through",
        "assumptions (--assume NAME=VALUE overrides; --gpu-check LOG and --judge-check LOG take measured ones):",
        *[f"  {f.name:<24}{getattr(a, f.name):<10.4g}{sources[f.name]}" for f in fields(Assumptions)],
        f"memory (GiB per GPU): learner rank {memory.learner.gpu_total / GIB:.1f} of {memory.learner.budget / GIB:.1f}"
        f", engine {memory.engine.gpu_total / GIB:.1f} of {memory.engine.budget / GIB:.1f}: fits",
        phase_line(plan),
        f"judge: {plan.judge_calls:,} calls ({w.rows} a step, {w.val_sequences} per validation), "
        f"{plan.judge_call.input_tokens:,.0f} tokens in / {plan.judge_call.output_tokens:,.0f} out "
        f"(thoughts {a.judge_thought_tokens}) at ${plan.judge_call.usd:.4f} each on {j.service_tier} "
        f"(${j.price.input_per_mtok:g} / ${j.price.output_per_mtok:g} per M x {j.price.flex_factor:g} flex); "
        f"limits {j.rpm} rpm, {j.input_tpm:,} input tpm, {j.max_in_flight} in flight",
        f"validation: {w.val_runs} runs of {plan.validation_s:.0f} s ({w.val_sequences} prompts, every "
        f"{cfg.trainer.eval_every} steps)",
        f"run: {plan.steps} steps x {plan.step.step_s:.0f} s + validations = {plan.run_hours:.1f} h; compute "
        f"{plan.layout.gpus} GPUs x {plan.run_hours:.1f} h x ${g.usd_per_hour:.2f} = ${plan.compute_usd:,.0f}; judge "
        f"${plan.judge_usd:,.2f}; bottleneck {plan.step.bottleneck} ({plan.step.bottleneck_share:.0%} of a step)",
        f"scaling, layout {plan.layout.kind}, best split of each count:",
        f"  {'gpus':>4}  {'split':<34}{'step_s':>8}{'run_h':>8}{'compute_usd':>13}{'judge_usd':>11}  bottleneck",
    ]
    for gpus, scaled in scaling:
        if isinstance(scaled, str):
            lines.append(f"  {gpus:>4}  {scaled}")
            continue
        split = f"{scaled.layout.engines} engine(s) + {scaled.layout.learners} learner(s)"
        lines.append(f"  {gpus:>4}  {split:<34}{scaled.step.step_s:>8.0f}{scaled.run_hours:>8.1f}"
                     f"{scaled.compute_usd:>13,.0f}{scaled.judge_usd:>11,.0f}  {scaled.step.bottleneck}")
    if isinstance(other, str):
        lines.append(f"beside it: {other}")
    else:
        lines.append(f"beside it: layout {other.layout.describe()}: step {other.step.step_s:.0f} s, "
                     f"{other.run_hours:.1f} h, ${other.compute_usd:,.0f} compute, bottleneck {other.step.bottleneck}")
    lines.append(plan_line(plan))
    return "\n".join(lines)


def _plan_or_reason(make) -> RunPlan | str:
    try:
        return make()
    except PolarisError as why:
        return str(why).splitlines()[0]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="conf=NAME and key.sub=value, as launch.py takes them")
    ap.add_argument("--gpus", type=int, default=None, help="GPU count (default: the config's own split)")
    ap.add_argument("--gpu", default="a100-80gb", help="a100-80gb (default: the original run's) | h100 | h200")
    ap.add_argument("--layout", default="separate", help=f"{' | '.join(LAYOUTS)} (default: separate, polaris-rl's)")
    ap.add_argument("--usd-per-gpu-hour", type=float, default=None, help="price per GPU-hour (default: per GPU kind)")
    ap.add_argument("--assume", action="append", default=[], metavar="NAME=VALUE", help="override an assumption")
    ap.add_argument("--gpu-check", type=Path, default=None, metavar="LOG", help="a bench/gpu_check.sh log")
    ap.add_argument("--judge-check", type=Path, default=None, metavar="LOG", help="a bench/judge_check.py log")
    args = ap.parse_args(argv)
    try:
        print(report(args))
    except PolarisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def report(args) -> str:
    from conf.loader import DEFAULT_CONF, load_config

    cfg = load_config(args.overrides)
    conf_name = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("conf=")), DEFAULT_CONF)
    gpu = gpu_spec(args.gpu, args.usd_per_gpu_hour)
    if args.layout not in LAYOUTS:
        raise ConfigError(f"--layout {args.layout!r} is not one of {', '.join(LAYOUTS)}")
    assumptions = with_overrides(Assumptions(), args.assume)
    sources = dict(SOURCES)
    if args.gpu_check is not None:
        if not args.gpu_check.is_file():
            raise ConfigError(f"--gpu-check {args.gpu_check}: no such file")
        figures = gpu_check_figures(args.gpu_check.read_text())
        assumptions, measured = assumptions_from_gpu_check(assumptions, figures, gpu)
        sources.update({name: f"measured: {figure} in {args.gpu_check}" for name, figure in measured.items()})
    if args.judge_check is not None:
        assumptions, measured = assumptions_from_judge_check(assumptions, args.judge_check, cfg.judge)
        sources.update(measured)
    assumptions = with_overrides(assumptions, args.assume)  # over measured figures too: an explicit --assume wins
    for pair in args.assume:
        sources[pair.split("=", 1)[0]] = f"--assume {pair}"
    if args.usd_per_gpu_hour is not None:
        sources["usd_per_hour"] = "--usd-per-gpu-hour"
    plan = plan_for(cfg, args.gpu, args.gpus, args.layout, assumptions, args.usd_per_gpu_hour)
    scaling = [(n, _plan_or_reason(lambda n=n: plan_for(cfg, args.gpu, n, args.layout, assumptions,
                                                         args.usd_per_gpu_hour, own_split=False)))
               for n in SCALING_GPUS]
    other_kind = "colocated" if args.layout == "separate" else "separate"
    other = _plan_or_reason(lambda: plan_for(cfg, args.gpu, plan.layout.gpus, other_kind, assumptions,
                                             args.usd_per_gpu_hour))
    return format_report(cfg, conf_name, plan, sources, scaling, other)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
