"""Every config key does something. For each leaf of conf.schema.Config, setting it to another value
(from conf=tiny, or conf=polaris where the key only matters there) changes what the runtime's own
functions build from the config: the learner's settings, the placement, the engine actors, the
reward pool and its judge, the coordinator's requests and schedules, the inputs check, the
tracker, the memory plan. No Ray, no model: Ray's actor classes are swapped for recorders and the
tiny model's build is recorded, not run. A schema key with no probe here fails
test_every_schema_key_has_a_probe, so no key can be dead silently."""
from __future__ import annotations

import functools
import os
from concurrent.futures import Future
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, get_type_hints

import pytest
import torch
import wandb

import launch
from actors import checkpoint, tracking
from actors.codec import ChatCodec
from actors.coordinator import Coordinator
from actors.data import PromptRecord, PromptSampler
from actors.groups import GroupRow, assemble_step
from cluster import judge_pool, roles
from conf import load_config
from conf.schema import Config
from eval import run as eval_run
from learner import tiny_model
from learner.memory_plan import startup_plan
from reward.components import RewardParams
from reward.judge_server import LocalJudgeServer, judge_endpoint

PROMPTS = [PromptRecord(f"p{i:02d}", ({"role": "user", "content": f"Write a story about a lighthouse ({i})."},),
                        target, "The keeper walked the shore at dawn and counted the gulls. " * 8, "Plan: dawn, gulls.")
           for i, target in enumerate([40, 80, 150, 220, 300, 400, 50, 90, 160, 230, 310, 410])]


# ------------------------------------------------------------------ stand-ins for Ray and the engines

class RecordedActors:
    """A Ray actor class that records the options and constructor arguments of each actor asked for."""

    def __init__(self):
        self.made: list[tuple] = []

    def options(self, **options):
        return SimpleNamespace(remote=lambda *args, **kwargs: self.made.append((options, args, kwargs)))


class FakeRoles:
    """The parts of cluster.roles.Roles the coordinator and generate_and_judge touch: the engines take
    requests and generate nothing, the pool has spent spent_usd, checkpoints hold no learner."""

    def __init__(self, spent_usd: float = 0.0):
        self.weight_version = 0
        self.generation = []
        self.placement = None  # no Ray: nothing placed
        self.reward_pool = SimpleNamespace(total_usd=spent_usd, cache=None, submit=lambda job, **_: Future(),
                                           judge_down=lambda: None)

    def start_generation(self, requests, sampling, chunk):
        self.generation.append((requests, sampling, chunk))
        return []

    def save_checkpoint(self, path, **_):
        pass


def plain(x):
    """x as nested builtins: objects that define no equality compare by their attributes."""
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return type(x).__name__, plain(vars(x))
    return x


def outcome(call: Callable, *paths: Path):
    """What call returns, or the one-line error it raises (temporary paths named alike)."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 -- a refusal is an outcome too
        text = f"{type(e).__name__}: {e}"
        for path in paths:
            text = text.replace(str(path), "<tmp>")
        return text


# ------------------------------------------------------------------ what the runtime builds from a config

def entry_point(cfg, ctx):
    """Which of check_inputs, train and evaluate launch.run takes."""
    taken = []
    for name in ("check_inputs", "train"):
        ctx.monkeypatch.setattr(launch, name, lambda cfg, name=name: taken.append(name))
    ctx.monkeypatch.setattr(eval_run, "evaluate", lambda cfg: taken.append("evaluate"))
    launch.run(cfg)
    return taken


def learner(cfg, ctx):
    return roles.learner_settings(cfg, model_path="model", pad_token_id=0)


def placement(cfg, ctx):
    return roles.placement_plan(cfg), roles.placement_plan(cfg, learners=False)


def engine_actors(cfg, ctx):
    """The rollout engine actors start_rollouts asks Ray for."""
    engines = RecordedActors()
    ctx.monkeypatch.setattr(roles, "_RolloutActor", engines)
    anywhere = SimpleNamespace(engine=lambda i: {})
    roles.start_rollouts(cfg, "model", stop_token_ids=[1], pad_token_id=0, run_name="run", placement=anywhere)
    return engines.made


def weight_group(cfg, ctx):
    return roles.weight_sync_settings(cfg)


def rewards(cfg, ctx):
    return RewardParams.from_config(cfg.reward), RewardParams.from_config(cfg.reward, validation=True)


def reward_pool(cfg, ctx, evaluation=False):
    """What start_reward_pool hands the limiter actor, each reward worker and the pool, at the URL
    judge_endpoint gives it (the loopback server is not started)."""
    limiter, workers, pool = RecordedActors(), RecordedActors(), {}
    for name, stand_in in (("_LimiterActor", limiter), ("_RewardActor", workers),
                           ("RewardPool", lambda made, **kwargs: pool.update(kwargs)),
                           ("JudgeCache", lambda path: f"JudgeCache({path})")):
        ctx.monkeypatch.setattr(judge_pool, name, stand_in)
    with judge_endpoint(cfg.eval.judge if evaluation else cfg.judge) as (url, _):
        refused = outcome(lambda: judge_pool.start_reward_pool(cfg, url, "run", "out", evaluation=evaluation) and None)
    return refused, plain((limiter.made, workers.made, pool))


def evaluation_pool(cfg, ctx):
    return reward_pool(cfg, ctx, evaluation=True)


def loopback_judge(cfg, ctx, evaluation=False):
    """The loopback server judge_endpoint serves a judge.backend=local judge with."""
    with judge_endpoint(cfg.eval.judge if evaluation else cfg.judge) as (_, server):
        return server.faults, server.latency_s, server.rpm_limit, server.capacity_schedule, server.shed_factor


def evaluation_loopback_judge(cfg, ctx):
    return loopback_judge(cfg, ctx, evaluation=True)


def coordinator(cfg, ctx, spent_usd: float = 1.0) -> Coordinator:
    out = ctx.folder()
    (out / checkpoint.RUN_ID_FILE).write_text("run\n")
    return Coordinator(cfg, FakeRoles(spent_usd), ChatCodec.from_config(ctx.tokenizer, cfg),
                       PromptSampler.from_config(PROMPTS, cfg), SimpleNamespace(run_id="wandb"), out, "model")


def launched_steps(cfg, ctx):
    """Steps 0-2 as the coordinator launches them (with $1 of judge spend so far): the requests,
    sampling and chunk it sends the engines, each step's reference weight and reference rows."""
    c = coordinator(cfg, ctx)
    steps = [c.launch(k) for k in range(3)]
    references = [s and (s.reference_weight, [r.tokens.ids for r in s.references]) for s in steps]
    return c.roles.generation, references, c.stop_reason


def hri_weights(cfg, ctx):
    return [coordinator(cfg, ctx).reference_weight(step) for step in range(60)]


def sample_table(cfg, ctx):
    """The rows a step puts into the W&B samples table."""
    judged = Future()
    judged.set_result(SimpleNamespace(reward=None))
    policy = [SimpleNamespace(sample=SimpleNamespace(uid=p.uid, sample_index=i), scored=judged,
                              tokens=SimpleNamespace(ids=(1, 2), text="A story."))
              for p in PROMPTS[:3] for i in range(2)]
    return coordinator(cfg, ctx).sample_table(SimpleNamespace(step=0, prompts=PROMPTS, policy=policy))


def checkpoint_steps(cfg, ctx):
    return [k for k in range(1, 21) if checkpoint.due(cfg, k)]


def checkpoints_kept(cfg, ctx):
    """The checkpoints left after the coordinator saved steps 1-4."""
    c = coordinator(cfg, ctx)
    for steps_done in range(1, 5):
        c.save_checkpoint(steps_done)
    return [p.name for p in checkpoint.complete_checkpoints(c.output_dir)]


def assembled_group(cfg, ctx):
    """One group as the coordinator assembles it: three policy rows (one sampled a weight version
    ago) and the reference."""
    def row(score, version, reference=False):
        scored = SimpleNamespace(valid=True, reward=SimpleNamespace(score=score, scalar=score))
        return GroupRow("u", (1,), (2, 3), scored, reference, version)
    rows = [row(1.0, 1), row(2.0, 1), row(4.0, 0), row(3.0, None, reference=True)]
    return assemble_step(cfg, rows, step=5, current_version=1, reference_weight=0.4)


def validation_requests(cfg, ctx):
    """What generate_and_judge (mode=eval and the periodic validation) asks of the engines."""
    fake = FakeRoles()
    eval_run.generate_and_judge(fake, None, [], cfg, label="x", submit=None, progress=False)
    return fake.generation


def periodic_validation(cfg, ctx):
    """The periodic validation's prompts and the steps after which it runs."""
    validation = eval_run.PeriodicValidation(cfg, None, None, PROMPTS, ctx.folder(), None)
    return [p.uid for p in validation.prompts], [k for k in range(1, 41) if validation.due(k)]


def evaluated_folders(cfg, ctx):
    return outcome(lambda: eval_run.checkpoint_folders(cfg))


def checked_inputs(cfg, ctx):
    """The training and held-out prompts launch.check_inputs accepts."""
    found = outcome(lambda: launch.check_inputs(cfg))
    return found if isinstance(found, str) else [[(p.uid, p.target_words) for p in prompts] for prompts in found]


def resumed_state(cfg, ctx):
    """What prepare_resume continues from in an output folder holding a checkpoint at step 2."""
    out = ctx.folder()
    folder = checkpoint.step_dir(out, 2)
    folder.mkdir(parents=True)
    checkpoint.write_state(folder, {"steps_done": 2, "weight_version": 2, "run": checkpoint.run_identity(cfg)})
    return outcome(lambda: checkpoint.prepare_resume(cfg, out)[1], out)


def output_folder(cfg, ctx):
    return checkpoint.output_folder(cfg)


def tracker(cfg, ctx):
    """The W&B project the run's tracker starts and whether its progress bar shows."""
    projects = []
    ctx.monkeypatch.setenv("WANDB_MODE", "offline")
    ctx.monkeypatch.setattr(wandb, "init", lambda **kwargs: projects.append(kwargs["project"]))
    started = tracking.start_tracker(cfg, ctx.folder(), None, "run")
    hidden = started._bar.disable
    started.close()
    return projects, hidden


def memory_plan(cfg, ctx):
    """The start-up memory plan on a machine without the run's GPU."""
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return outcome(lambda: startup_plan(cfg))


def model_folder(cfg, ctx):
    """The model launch.build_or_find_model gives the run (the tiny model's build recorded, not run)."""
    ctx.monkeypatch.setattr(tiny_model, "build_tiny_model",
                            lambda cache_root, seed, architecture: f"tiny({cache_root}, {seed}, {architecture})")
    return launch.build_or_find_model(cfg)


# ------------------------------------------------------------------ one probe per key

@dataclass(frozen=True)
class Probe:
    value: str | Callable  # the other value, as on the command line (or made from the test's context)
    observe: Callable  # observe(cfg, ctx) -> what the runtime builds from cfg
    conf: str = "tiny"
    also: tuple = ()  # overrides on both sides: a setup where the key matters


def hf_folder(name: str) -> Callable:
    def make(ctx) -> str:
        folder = ctx.root / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        return str(folder)
    return make


def data_file(name: str) -> Callable:
    return lambda ctx: str(getattr(ctx.files, name))


FEW_PROMPTS = (("data.train_path", data_file("training_parquet")), "data.prompts_per_step=2")
SAMPLING = (("temperature", "0.7"), ("top_p", "0.8"), ("top_k", "5"), ("repetition_penalty", "1.3"),
            ("max_new_tokens", "16"))
P = Probe
PROBES: dict[str, Probe] = {
    "mode": P("check", entry_point),
    **{f"trainer.{k}": P(v, learner) for k, v in (("total_steps", "7"), ("seed", "7"), ("device", "cuda"))},
    "trainer.output_dir": P("outputs/elsewhere", output_folder),
    "trainer.save_every": P("3", checkpoint_steps),
    "trainer.keep_checkpoints": P("3", checkpoints_kept),
    "trainer.resume": P("never", resumed_state),
    "trainer.eval_every": P("4", periodic_validation),
    "trainer.gpu_memory_gib": P("141", memory_plan, conf="polaris"),
    "trainer.wandb_project": P("elsewhere", tracker),
    "trainer.progress_bar": P("false", tracker),
    "trainer.wandb_samples": P("2", sample_table),
    "data.train_path": P(data_file("release_parquet"), checked_inputs, also=FEW_PROMPTS),
    "data.prompts_per_step": P("3", launched_steps),
    "data.max_prompt_tokens": P("512", engine_actors),
    "model.path": P("some/folder", model_folder),
    "model.tiny.seed": P("7", model_folder),
    "model.tiny.architecture": P("qwen3_5", model_folder),
    "model.tiny.cache_dir": P("/elsewhere", model_folder),
    "model.dtype": P("bfloat16", learner),
    "model.gradient_checkpointing": P("true", learner),
    "model.enable_thinking": P("false", launched_steps),
    "rollout.engine": P("vllm", engine_actors),
    "rollout.max_engine_restarts": P("1", engine_actors),
    "rollout.n": P("4", launched_steps),
    "rollout.stream_chunk": P("4", launched_steps),
    "rollout.num_engines": P("1", placement),
    "rollout.tensor_parallel_size": P("2", placement, conf="polaris"),
    "rollout.max_staleness": P("1", assembled_group),
    **{f"rollout.sampling.{k}": P(v, launched_steps) for k, v in SAMPLING},
    **{f"rollout.val_sampling.{k}": P(v, validation_requests) for k, v in SAMPLING},
    "algorithm.hri.enable": P("false", hri_weights),
    "algorithm.hri.peak_weight": P("0.2", hri_weights),
    "algorithm.hri.warmup_steps": P("5", hri_weights),
    "algorithm.hri.decay_steps": P("10", hri_weights),
    "algorithm.hri.final_weight": P("0.1", hri_weights, also=("algorithm.hri.decay_steps=10",)),
    "algorithm.adv_eps": P("0.5", assembled_group),
    **{f"algorithm.{k}": P(v, learner) for k, v in (("clip_low", "0.1"), ("clip_high", "0.4"), ("tis_cap", "3"))},
    "learner.world_size": P("2", placement),
    **{f"learner.{k}": P(v, learner) for k, v in (
        ("zero_stage", "2"), ("lr", "1e-3"), ("weight_decay", "0.1"), ("adam_beta1", "0.8"), ("adam_beta2", "0.99"),
        ("warmup_steps", "3"), ("lr_schedule", "cosine"), ("min_lr_ratio", "0.1"), ("grad_clip", "0.5"),
        ("micro_batch_size", "4"), ("max_tokens_per_micro_batch", "4096"), ("logprob_chunk_tokens", "256"),
        ("offload_optimizer", "true"))},
    "learner.offload_params": P("true", learner, conf="polaris"),
    "learner.optimizer": P("torch_adamw", learner, conf="polaris"),
    **{f"reward.{k}": P(v, rewards) for k, v in (
        ("weights.self_rep", "1.0"), ("weights.length", "0.5"), ("weights.blank", "0.5"),
        ("val_weights.self_rep", "1.0"), ("val_weights.length", "0.5"), ("val_weights.blank", "0.5"),
        ("length.min_target", "30"), ("length.lo_frac", "0.3"), ("length.lo_min", "8"), ("length.lo_max", "50"),
        ("length.hi_frac", "0.5"), ("length.hi_min", "20"), ("length.hi_max", "80"), ("blank_min_visible_ratio", "0.2"),
        ("blank_min_words", "20"), ("think_budget_tokens", "50"), ("think_overflow_penalty", "0.1"),
        ("truncation_start_tokens", "200"), ("truncation_scale_tokens", "32"), ("token_clip", "1.5"),
        ("score_mode", "last"), ("judge_addressed_penalty", "0.5"))},
    "judge.budget_usd": P("0.5", launched_steps),
    "weight_sync.backend": P("gloo", weight_group, conf="polaris"),
    "weight_sync.bucket_mb": P("32", weight_group),
    "weight_sync.timeout_s": P("30", weight_group),
    "weight_sync.verify": P("5", weight_group),
    "weight_sync.probe_tolerance": P("0.5", weight_group),
    "weight_sync.fault.kind": P("corrupt_bucket", weight_group),
    "weight_sync.fault.engine": P("1", weight_group, also=("weight_sync.fault.kind=engine_dies", "rollout.num_engines=2")),
    **{f"weight_sync.fault.{k}": P(v, weight_group, also=("weight_sync.fault.kind=engine_dies",))
       for k, v in (("version", "2"), ("after_bucket", "3"))},
    "eval.checkpoint": P(hf_folder("a"), evaluated_folders),
    "eval.compare": P(hf_folder("b"), evaluated_folders, also=(("eval.checkpoint", hf_folder("a")),)),
    "eval.prompts_path": P(data_file("release_jsonl"), checked_inputs, also=FEW_PROMPTS),
    "eval.length_scale": P("0.07", periodic_validation),
    "eval.subset_size": P("5", periodic_validation),
}
# The judge service, training (judge.*) and evaluation (eval.judge.*) alike. conf=tiny's judges are
# the loopback server; what only a remote service reads is probed on conf=polaris, whose judge is
# Gemini and whose evaluation judge is OpenAI-compatible.
SERVICE = (("backend", "openai"), ("model", "another-model"), ("temperature", "0.5"), ("top_p", "0.5"), ("seed", "7"),
           ("thinking_level", "high"), ("max_output_tokens", "1000"), ("rpm", "100"), ("rpm_burst", "5"),
           ("input_tpm", "1000"), ("max_in_flight", "4"), ("num_workers", "3"), ("dispatch_batch", "4"),
           ("max_attempts", "2"), ("backoff_s", "0.5"), ("max_backoff_s", "5"), ("timeout_s", "30"),
           ("story_deadline_s", "60"), ("price.input_per_mtok", "1.0"), ("price.output_per_mtok", "5.0"),
           ("price.flex_factor", "0.25"), ("cache", "false"), ("cache_path", "/elsewhere/cache.sqlite"),
           ("unanswered_output_tokens", "100"), ("adaptive_in_flight", "false"), ("initial_in_flight", "4"),
           ("retry_budget", "0.5"), ("retry_budget_min_per_s", "2"), ("order", "fifo"))
REMOTE = (("api_key_env", "OTHER_KEY"), ("base_url", "http://judge:8000/v1"))
LOOPBACK = (("local.latency_max_s", "1"), ("local.rpm_limit", "60"), ("local.fault_rate", "0.1"), ("local.seed", "3"),
            ("local.capacity", "[4,2]"))
for prefix, pool, loopback in (("judge", reward_pool, loopback_judge),
                               ("eval.judge", evaluation_pool, evaluation_loopback_judge)):
    PROBES.update({f"{prefix}.{k}": P(v, pool) for k, v in SERVICE})
    PROBES.update({f"{prefix}.{k}": P(v, pool, conf="polaris") for k, v in REMOTE})
    PROBES.update({f"{prefix}.{k}": P(v, loopback) for k, v in LOOPBACK})
    PROBES[f"{prefix}.local.latency_min_s"] = P("0.1", loopback, also=(f"{prefix}.local.latency_max_s=1",))
    PROBES.update({f"{prefix}.local.{k}": P(v, loopback, also=(f"{prefix}.local.capacity=[4,2]",))
                   for k, v in (("capacity_step_s", "5"), ("shed_factor", "2"))})
    PROBES[f"{prefix}.vertex"] = P("true", pool, conf="polaris", also=(f"{prefix}.backend=gemini",))
PROBES.update({f"placement.{role}.{k}": P(v, placement) for role in ("learner", "engines")
               for k, v in (("labels", "{polaris-role: gpu-a}"), ("resources", "{big_node: 1}"))})
PROBES.update({
    "judge.service_tier": P("standard", reward_pool, conf="polaris"),
    "eval.judge.service_tier": P("flex", evaluation_pool, conf="polaris"),
    "judge.max_consecutive_rejections": P("2", reward_pool),
    "judge.max_steps_without_judgment": P("1", reward_pool),
})


# ------------------------------------------------------------------ the tests

def schema_keys(node=Config, prefix: str = "") -> list[str]:
    hints = get_type_hints(node)
    return [key for f in fields(node) for key in (
        schema_keys(hints[f.name], f"{prefix}{f.name}.") if is_dataclass(hints[f.name]) else [prefix + f.name])]


def test_every_schema_key_has_a_probe():
    keys = set(schema_keys())
    assert len(keys) > 150
    unprobed, stale = sorted(keys - set(PROBES)), sorted(set(PROBES) - keys)
    assert not unprobed, (f"schema keys that nothing here shows to do anything: {unprobed}; add a probe, or remove the "
                          "key with a REMOVED_KEYS entry in conf/loader.py")
    assert not stale, f"probes of keys the schema no longer has: {stale}"


@pytest.fixture(scope="module")
def tokenizer():
    rows = [{"prompt": p.prompt_text, "ground_truth_reasoning": p.reasoning, "story": p.story} for p in PROMPTS]
    return tiny_model.train_tokenizer(rows, vocab_size=300)


@pytest.fixture
def ctx(tmp_path, monkeypatch, polaris_files, tokenizer):
    monkeypatch.setenv("GEMINI_API_KEY", "planted-gemini-key")
    monkeypatch.setenv("OPENAI_API_KEY", "planted-openai-key")
    monkeypatch.setattr(LocalJudgeServer, "start", lambda self: "http://127.0.0.1:1")
    monkeypatch.setattr(LocalJudgeServer, "stop", lambda self: None)
    made = iter(range(10**6))

    def folder() -> Path:  # a fresh output folder
        path = tmp_path / f"out{next(made)}"
        path.mkdir()
        return path
    return SimpleNamespace(root=tmp_path, files=polaris_files, tokenizer=tokenizer, monkeypatch=monkeypatch,
                           folder=folder)


def argument(item, ctx) -> str:
    if isinstance(item, str):
        return item
    key, value = item
    return f"{key}={value(ctx)}"


@functools.lru_cache(maxsize=None)
def config(*args: str) -> Config:
    """load_config, once per command line (observers only read the config)."""
    return load_config(list(args))


def value_of(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("key", sorted(PROBES))
def test_changing_the_key_changes_what_the_runtime_builds(key, ctx):
    probe = PROBES[key]
    base_args = [f"conf={probe.conf}", *(argument(a, ctx) for a in probe.also)]
    value = probe.value if isinstance(probe.value, str) else probe.value(ctx)
    base, changed = config(*base_args), config(*base_args, f"{key}={value}")
    assert value_of(changed, key) != value_of(base, key), f"{key}={value} is the base value already"
    seen = probe.observe(base, ctx)
    assert probe.observe(base, ctx) == seen, f"{probe.observe.__name__} differs for one config"
    assert probe.observe(changed, ctx) != seen, f"{key}={value} changes nothing that {probe.observe.__name__} shows"


@pytest.mark.parametrize("engines", [1, 2, 3])
def test_on_cpu_the_engines_share_the_cores_and_the_learner_takes_them_all(engines, monkeypatch):
    """The engines generate side by side, the learner trains alone: 4 cores give 1 engine 4 threads,
    2 engines 2 each, 3 engines 1 each; the learner's threads stay 4, split between its ranks."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    ctx = SimpleNamespace(monkeypatch=monkeypatch)
    cfg = config("conf=tiny", f"rollout.num_engines={engines}")
    threads = [kwargs["num_threads"] for _, _, kwargs in engine_actors(cfg, ctx)]
    assert threads == [4 // engines] * engines
    assert roles.learner_threads(cfg, placement=None) == [4]
    assert roles.learner_threads(config("conf=tiny", "learner.world_size=2"), placement=None) == [2, 2]
