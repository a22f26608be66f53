"""How far is a polaris-rl step from the floor of its work? Runs (A) polaris-rl conf=tiny with HRI off
(launch.py: Ray, the HF engine actor, the DeepSpeed learner, the reward pool, the loopback judge) and
(B) the same work in one process, no Ray: the same model, prompts per step (PromptSampler), chat
rendering and stop ids (ChatCodec), per-sample seeds (sample_seed) and generate call (HFEngine, built
in-process); the loopback judge's scores computed in-process (stand_in_scores.judge_json -> rubric ->
sq, zero latency); the same reward (score_response, conf=tiny's reward.*), groups (assemble_step) and
loss (the learner's micro-batches, pad_rows, chunked token_logprobs, policy_loss), one AdamW step
(learner.lr, betas, weight decay, grad_clip), float32, torch.set_num_threads(os.cpu_count()) as
cluster/roles.py _threads gives our engine and learner on CPU (printed: "torch threads").

    .venv/bin/python bench/step_floor.py [--steps 12] [--rounds 2] [--judge-latency LO HI] [key=value ...]

Both: rollout.n=6 (8 prompts x 6 samples, <= 256 new tokens, T=1.0 top_p .95 top_k 20 repetition 1.1),
lr 1e-4, trainer.eval_every=0, WANDB_MODE=disabled unless set; key=value overrides go to both configs
(the floor always generates with HFEngine: rollout.engine=vllm changes only ours). --judge-latency:
ours runs rollout.max_staleness=1, judge.max_in_flight=64 and the loopback judge's latency
uniform(LO, HI) (bench/pipeline.py's keys); the floor, after scoring a step, sleeps the max of one
uniform(LO, HI) draw per story (seeded as the loopback server seeds its draws), then trains.

Where the floor differs: one model generates, on every core in one batch, and trains (ours: conf=tiny's
two one-thread engines, half the requests each, and a separate learner, with the weight sync); the HF
engine seeds a batch from its requests' seeds, so ours' stories are not the floor's: compare the steps'
tokens_mean, and with rollout.num_engines=1 both generate the same stories (the work check); AdamW
steps parameter by parameter and torch clips (DeepSpeed ZeRO-1: one flat buffer): the same math, not
the same bits, so stories may part after step 0 (each round prints how many came out identical, ours'
rollout log against the floor's); with --judge-latency ours generates step k+1 before training step k
(rows one update old, TIS-weighted), the floor is serial and on-policy; ours also checkpoints
(save_every=5: the following step's time holds it) and writes the judge cache, rollout log and metrics.

Seconds per step: the steps from step 2 on (0, 1: start-up; with --judge-latency also not the last,
where ours' pipeline drains). Rounds go ABBA (round 1: ours, floor; round 2: floor, ours; ...). Within
a round, step k of ours is paired with step k of the floor (the same prompts and, at zero judge
latency, the same stories: the same work): ratio = the median of those per-step ratios over every
round, ratio_spread = their interquartile range (p75 - p25); polaris_s, floor_s: medians over every
round's steps; the per-round ratios of medians are printed too. Memory and CPU (psutil), every ~2 s:
the summed PSS (shared pages once) of the launch.py child and all its descendants (GCS, raylet,
agents, ray:: workers, any compiler DeepSpeed starts, wandb if on); the floor runs as a child of this
script (--floor-child), measured alike. pss_gib: the peak from step 2 on; pss_peak_all_gib: over the
whole run, start-up included; cpu: each role's CPU seconds from step 2 on.
Last line: step_floor: polaris_s=<a> floor_s=<b> ratio=<median per-step ours/floor> ratio_spread=<IQR>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BASE = ["algorithm.hri.enable=false", "rollout.n=6", "trainer.eval_every=0", "trainer.progress_bar=false"]
FIRST_MEASURED = 2


# ---------------------------------------------------------------- memory and CPU of a process tree

def _label(proc: psutil.Process) -> str:
    """A process's role: the Ray actor class (not its current method), the Python script, or the
    program (gcs_server, raylet)."""
    argv = [a for a in proc.cmdline() if a] or ["?"]
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    if os.path.basename(argv[0]).startswith("python"):
        script = next((a for a in argv[1:] if not a.startswith("-")), "?")
        return "python " + ("-m " + argv[argv.index("-m") + 1] if "-m" in argv else os.path.basename(script))
    return os.path.basename(argv[0])[:40]


class TreeSampler:
    """Every `every_s`, in a thread: the summed PSS of `root` and all its descendants (Ray's GCS,
    raylet, agents and ray:: workers stay descendants of the driver), its peak over the whole run
    (`peak_kb`) and once warm() is true (`steady_kb`, `parts`); and each process's CPU seconds
    since the run was warm (a process started later: all of it)."""

    def __init__(self, root: int, warm, every_s: float = 2.0):
        self.root, self.warm, self.every_s = psutil.Process(root), warm, every_s
        self.peak_kb, self.steady_kb, self.parts = 0, 0, {}
        self.warm_at = self.last_at = None
        self.cpu: dict[int, list] = {}  # pid -> [label, CPU s when warm, CPU s at the last sample]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> dict[int, tuple[str, int, float]]:
        """pid -> (label, PSS kB, CPU seconds) of every live process of the tree."""
        found = {}
        try:
            members = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return found
        for proc in members:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    found[proc.pid] = (_label(proc), proc.memory_full_info().pss // 1024, times.user + times.system)
            except psutil.Error:
                continue
        return found

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = self._sample()
            total = sum(kb for _, kb, _ in sample.values())
            self.peak_kb = max(self.peak_kb, total)
            if self.warm():
                if total > self.steady_kb:
                    self.steady_kb, self.parts = total, {f"{label}[{pid}]": kb for pid, (label, kb, _) in sample.items()}
                if self.warm_at is None:
                    self.warm_at, base = time.monotonic(), {pid: cpu for pid, (_, _, cpu) in sample.items()}
                else:
                    base = {}
                for pid, (label, _, cpu) in sample.items():
                    self.cpu.setdefault(pid, [label, base.get(pid, 0.0), cpu])[2] = cpu
                self.last_at = time.monotonic()
            self._stop.wait(self.every_s)

    def cpu_breakdown(self) -> tuple[float, dict[str, float]]:
        """(seconds sampled since warm, {role: CPU seconds in them}) summed over each role's processes."""
        roles: dict[str, float] = {}
        for label, first, last in self.cpu.values():
            roles[label] = roles.get(label, 0.0) + last - first
        return (self.last_at or 0.0) - (self.warm_at or 0.0), roles

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])[:6]
        return f"{len(self.parts)} processes at the measured peak; largest (GiB): " + ", ".join(
            f"{name} {kb / 2**20:.2f}" for name, kb in top)


# ---------------------------------------------------------------- the two runs

def _conf(overrides: list[str]) -> list[str]:
    return [] if any(o.startswith("conf=") for o in overrides) else ["conf=tiny"]


def run_child(kind: str, args, out: Path) -> tuple[list[dict], TreeSampler]:
    """One run as a child process, its PSS sampled; its per-step rows (ours: metrics.jsonl)."""
    out.mkdir(parents=True)
    if kind == "polaris":
        latency = ([] if args.judge_latency is None else
                   ["rollout.max_staleness=1", "judge.max_in_flight=64",
                    f"judge.local.latency_min_s={args.judge_latency[0]}",
                    f"judge.local.latency_max_s={args.judge_latency[1]}"])
        cmd = [sys.executable, str(ROOT / "launch.py"), *_conf(args.overrides), f"trainer.total_steps={args.steps}",
               f"trainer.output_dir={out}", *BASE, *latency, *args.overrides]
        rows_path = out / "metrics.jsonl"
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-child", "--steps", str(args.steps),
               "--out", str(out), *(["--judge-latency", *map(str, args.judge_latency)] if args.judge_latency else []),
               *args.overrides]
        rows_path = out / "floor.jsonl"
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)  # our own loopback cluster, never one the shell points at

    def warm() -> bool:  # the start-up steps are done
        return rows_path.exists() and len(rows_path.read_text().splitlines()) >= FIRST_MEASURED

    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, warm)
        rc = proc.wait()
        sampler.stop()
    if rc != 0 or not rows_path.exists():
        sys.exit(f"step_floor: {kind} run failed (rc {rc}):\n{(out.parent / f'{out.name}.log').read_text()[-3000:]}")
    return [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()], sampler


def stories(folder: Path) -> dict[tuple[int, str], tuple[str, float]]:
    """(step, "uid/i") -> (response text, GRPO score) of every policy story of a run: ours' rollout
    log (actors/rollout_log.py) or the floor's stories.jsonl, written alike."""
    out = {}
    for path in [*folder.glob("rollouts/step_*.jsonl"), *folder.glob("stories.jsonl")]:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if not row.get("reference"):
                out[(row["step"], row["key"])] = (row["response"], (row.get("reward") or {}).get("score"))
    return out


def same_work(ours: Path, floor_out: Path) -> str:
    a, b = stories(ours), stories(floor_out)
    same = [k for k in a if k in b and a[k][0] == b[k][0]]
    diff = max((abs(a[k][1] - b[k][1]) for k in same if a[k][1] is not None and b[k][1] is not None), default=0.0)
    first = [k for k in a if k[0] == 0]
    return (f"identical stories: step 0 {sum(k[0] == 0 for k in same)}/{len(first)}, all steps {len(same)}/{len(a)}; "
            f"max |score diff| on those {diff:.1e}")


def measured(rows: list[dict], args) -> list[dict]:
    """Steps from FIRST_MEASURED on; with --judge-latency not the last (ours' pipeline drains there)."""
    last = args.steps - (2 if args.judge_latency else 1)
    return [r for r in rows if FIRST_MEASURED <= r["step"] <= last]


def _med(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def report(kind: str, k: int, all_rows: list[dict], rows: list[dict], sampler: TreeSampler) -> float:
    """Prints one run: `rows` are its measured steps."""
    median = _med(rows, "time/step")
    print(f"step_floor: run={kind} round={k} steps={len(all_rows)} median_s={median:.2f} "
          f"pss_gib={sampler.steady_kb / 2**20:.2f} pss_peak_all_gib={sampler.peak_kb / 2**20:.2f}", flush=True)
    print("  step_s: " + " ".join(f"{r['time/step']:.2f}" for r in all_rows))
    judge = (f"judge_s={_med(rows, 'time/judge'):.2f}" if kind == "floor" else
             f"judge_tail_s={_med(rows, 'time/judge_tail'):.2f} sync_s={_med(rows, 'time/sync'):.2f}")
    print(f"  medians: generate_s={_med(rows, 'time/generate'):.2f} {judge} train_s={_med(rows, 'time/train'):.2f} "
          f"tokens_mean={_med(rows, 'length/tokens_mean'):.1f} reward_mean={_med(rows, 'reward/mean'):.3f} "
          f"logprob_diff={_med(rows, 'rollout/logprob_diff'):.1e}"
          + (f"; torch threads {all_rows[0]['threads']}" if kind == "floor" else ""))
    print(f"  pss: {sampler.summary()}", flush=True)
    window, roles = sampler.cpu_breakdown()
    busy = sorted(((cpu, role) for role, cpu in roles.items() if cpu >= 0.5), reverse=True)
    print(f"  cpu over {window:.0f} s from step {FIRST_MEASURED} on ({sum(roles.values()) / max(window, 1e-9):.2f} "
          f"cores busy): " + ", ".join(f"{role} {cpu:.1f}s" for cpu, role in busy), flush=True)
    return median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2, help="(ours, floor) pairs, in the order ABBA...")
    ap.add_argument("--judge-latency", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    ap.add_argument("--floor-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="more key=value config overrides for both runs")
    args = ap.parse_args()
    if args.floor_child:
        return floor(args)
    if not measured([{"step": k} for k in range(args.steps)], args):
        ap.error(f"--steps {args.steps} leaves no step measured (0..{FIRST_MEASURED - 1}: start-up; with "
                 "--judge-latency the last is left out too)")
    if not getattr(psutil.Process().memory_full_info(), "pss", 0):
        sys.exit("step_floor: this system gives no PSS (Linux's /proc/<pid>/smaps_rollup): it cannot be measured")
    medians, steps, paired = {"polaris": [], "floor": []}, {"polaris": [], "floor": []}, []
    peaks = {"polaris": 0, "floor": 0}
    with tempfile.TemporaryDirectory(prefix="step_floor-") as tmp:
        for k in range(1, args.rounds + 1):
            seconds = {}  # kind -> {step: seconds} of this round
            for kind in ("polaris", "floor") if k % 2 else ("floor", "polaris"):
                rows, sampler = run_child(kind, args, Path(tmp) / f"{k}-{kind}")
                kept = measured(rows, args)
                medians[kind].append(report(kind, k, rows, kept, sampler))
                steps[kind] += kept
                seconds[kind] = {r["step"]: r["time/step"] for r in kept}
                peaks[kind] = max(peaks[kind], sampler.steady_kb)
            paired += [s / seconds["floor"][step] for step, s in seconds["polaris"].items() if step in seconds["floor"]]
            check = same_work(Path(tmp) / f"{k}-polaris", Path(tmp) / f"{k}-floor")
            print(f"step_floor: round {k} work check: {check}")
    by_round = [a / b for a, b in zip(medians["polaris"], medians["floor"])]
    print("step_floor: per-round ratios of medians " + " ".join(f"{r:.2f}" for r in by_round))
    ratios = sorted(paired)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"step_floor: pss_gib polaris={peaks['polaris'] / 2**20:.2f} floor={peaks['floor'] / 2**20:.2f} "
          f"(peak summed PSS of the measured steps, over every round)")
    ours, floor_s = _med(steps["polaris"], "time/step"), _med(steps["floor"], "time/step")
    print(f"step_floor: polaris_s={ours:.2f} floor_s={floor_s:.2f} ratio={statistics.median(ratios):.2f} "
          f"ratio_spread={quartiles[2] - quartiles[0]:.2f}")


# ---------------------------------------------------------------- the floor (a child process)

def floor(args) -> None:
    import random

    import torch

    import launch
    from actors.codec import sample_seed
    from actors.data import PromptSampler
    from actors.engine import GenerationRequest, HFEngine, SamplingParams
    from actors.groups import GroupRow, assemble_step
    from conf import load_config
    from learner.settings import DTYPES
    from learner.worker import flush_denormals
    from reward import rubric
    from reward.components import RewardParams, score_response, strip_length_sentence
    from reward.stand_in_scores import judge_json
    from reward.worker import ScoredSample

    cfg = load_config([*_conf(args.overrides), f"trainer.total_steps={args.steps}", *BASE, *args.overrides])
    threads = (os.cpu_count() or 1) if cfg.trainer.device == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    flush_denormals()
    prompts, held_out = launch.check_inputs(cfg)
    model_path, codec, prompts, _ = launch.prepare(cfg, prompts, held_out)
    sampler = PromptSampler.from_config(prompts, cfg)
    engine = HFEngine(model_path, dtype=DTYPES[cfg.model.dtype], device=cfg.trainer.device,
                      stop_token_ids=codec.stop_ids, pad_token_id=codec.tok.pad_token_id)
    model, device, pad = engine.model, engine.device, codec.tok.pad_token_id  # one model: no weight sync
    torch.manual_seed(cfg.trainer.seed)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lr = cfg.learner
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr.lr, betas=(lr.adam_beta1, lr.adam_beta2),
                                  weight_decay=lr.weight_decay)
    params = RewardParams.from_config(cfg.reward)
    sampling = SamplingParams.from_config(cfg.rollout.sampling)
    schema = rubric.response_json_schema()
    latency_rng = random.Random(f"latency:{cfg.judge.local.seed}")
    if cfg.rollout.engine != "hf":
        print(f"floor: generates with HFEngine (ours: rollout.engine={cfg.rollout.engine})")
    print(f"floor: {threads} torch threads, model {model_path}", flush=True)

    for step in range(args.steps):
        t0 = time.perf_counter()
        batch_prompts = sampler.next_batch()
        prompt_ids = {p.uid: codec.prompt_ids(p) for p in batch_prompts}
        pairs = [(p, i) for p in batch_prompts for i in range(cfg.rollout.n)]
        requests = [GenerationRequest(f"{p.uid}/{i}", prompt_ids[p.uid], sample_seed(cfg.trainer.seed, step, p.uid, i))
                    for p, i in pairs]
        model.eval()
        generations = engine.generate(requests, sampling)
        t_gen = time.perf_counter()
        group_rows, generated, told = [], 0, []
        for (p, _), g in zip(pairs, generations):
            tok = codec.response(g.token_ids, g.finish_reason)
            judgment = rubric.parse_judgment(json.dumps(judge_json(schema, strip_length_sentence(p.prompt_text),
                                                                   tok.story)))
            reward = score_response(rubric.overall_score(judgment) / 100.0, tok.story, p.target_words, len(tok.ids),
                                    tok.story_start, tok.truncated, params)
            scored = ScoredSample(g.request_id, reward, judgment, None, 1, 0, 0)
            group_rows.append(GroupRow(p.uid, prompt_ids[p.uid], tok.ids, scored, False, step, g.logprobs))
            generated += len(tok.ids)
            told.append({"step": step, "key": g.request_id, "response": tok.text, "reward": {"score": reward.score}})
        if args.judge_latency:  # one concurrent judge batch: its slowest story
            time.sleep(max(latency_rng.uniform(*args.judge_latency) for _ in generations))
        t_judged = time.perf_counter()
        assembled = assemble_step(cfg, group_rows, step=step, current_version=step, reference_weight=0.0)
        batch = assembled.batch
        loss, norm, gap = train(model, optimizer, batch, cfg, step, device, pad) if batch.rows else (0.0, None, None)
        end = time.perf_counter()
        rewards = assembled.policy_rewards
        row = {"step": step, "time/step": end - t0, "time/generate": t_gen - t0, "time/judge": t_judged - t_gen,
               "time/train": end - t_judged, "length/tokens_mean": generated / max(1, len(generations)),
               "reward/mean": statistics.fmean(rewards) if rewards else None, "train/loss": loss,
               "train/grad_norm": norm, "groups/rows_trained": len(batch.rows), "threads": threads,
               "rollout/logprob_diff": gap}
        with open(args.out / "stories.jsonl", "a") as f:  # after the step: not in its time
            f.writelines(json.dumps(line) + "\n" for line in told)
        with open(args.out / "floor.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"floor step {step}: {json.dumps(row)}", flush=True)


def train(model, optimizer, batch, cfg, step: int, device, pad: int) -> tuple[float, float, float]:
    """LearnerWorker.train_step and _micro_loss without DeepSpeed: (loss, grad norm, |engine - learner|)."""
    import torch

    from learner.grpo import policy_loss, truncated_importance_weights
    from learner.logprobs import token_logprobs
    from learner.lr_schedule import learning_rate
    from learner.microbatch import pack_micro_batches
    from learner.worker import LearnerWorker, behaviour_logprobs, pad_rows

    lr, algo, chunk = cfg.learner, cfg.algorithm, cfg.learner.logprob_chunk_tokens
    model.train()
    lengths = [len(row.prompt_ids) + len(row.response_ids) for row in batch.rows]
    loss_sum, gap, gap_tokens = 0.0, 0.0, 0.0
    for indices in pack_micro_batches(lengths, 0, 1, lr.max_tokens_per_micro_batch, lr.micro_batch_size):
        rows = [batch.rows[i] for i in indices]
        widest = max(lengths[i] for i in indices)
        t = {k: v.to(device) for k, v in pad_rows(rows, pad).items()}
        logprobs = token_logprobs(model, t["input_ids"], t["attention_mask"], cfg.rollout.sampling.temperature,
                                  chunk, min_chunks=-(-(widest - 1) // chunk) if chunk > 0 else 0)
        mask, old = t["response_mask"], logprobs.detach()
        advantages = torch.tensor([row.advantage for row in rows], device=device)
        is_reference = torch.tensor([row.is_reference for row in rows], device=device)
        behaviour, off_policy = behaviour_logprobs(rows, old, mask)
        loss, _ = policy_loss(logprobs, old, advantages, mask, is_reference, clip_low=algo.clip_low,
                              clip_high=algo.clip_high, total_tokens=batch.num_tokens,
                              behaviour_logprobs=behaviour, tis_cap=algo.tis_cap)
        loss.backward()
        truncated_importance_weights(old, behaviour, mask & off_policy[:, None], algo.tis_cap)  # the learner's metric
        engine_gap = LearnerWorker._engine_gap(rows, old, mask)
        gap, gap_tokens = gap + engine_gap["logprob_diff_sum"], gap_tokens + engine_gap["logprob_diff_tokens"]
        loss_sum += loss.item()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, lr=lr.lr, total_steps=cfg.trainer.total_steps, warmup_steps=lr.warmup_steps,
                                    schedule=lr.lr_schedule, min_ratio=lr.min_lr_ratio)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), lr.grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm, gap / max(1.0, gap_tokens)


if __name__ == "__main__":
    main()
