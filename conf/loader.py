"""Command line -> validated Config: `[conf=NAME] [key.sub=value ...]`.

A conf NAME is a YAML file in this folder (or a path to one). A YAML may start with
`base: OTHER` to override another conf instead of the schema defaults.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from conf.errors import ConfigError
from conf.schema import SYNC_FAULT_KINDS, Config

CONF_DIR = Path(__file__).resolve().parent
DEFAULT_CONF = "tiny"
# Keys that existed once: a YAML or command line that still sets one gets this instead of "unknown".
REMOVED_KEYS = {
    "algorithm.kl_coef": "removed: it never had an effect (there is no KL term; the original run has none)",
    "data.val_path": "removed: use eval.prompts_path (the periodic validation's prompts; this file was only "
                     "checked, never used)",
    "eval.judge.budget_usd": "removed: it never had an effect (an evaluation is not capped; judge.budget_usd "
                             "caps a training run, its periodic validation included)",
}


def available_confs() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def load_config(argv: Sequence[str]) -> Config:
    conf_name, overrides = _split_argv(argv)
    cfg = OmegaConf.structured(Config)
    for layer in _conf_chain(conf_name):
        cfg = _merge(cfg, layer.pop("__source__"), layer)
    cfg = _merge(cfg, "the command line", _parse_overrides(overrides))
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(config)
    return config


def resolve_path(path: str) -> str:
    """A data path from config: relative to the working directory first, then to the project folder."""
    here = CONF_DIR.parent / path
    return path if Path(path).exists() or not here.exists() else str(here)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _split_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    conf_args = [a for a in argv if a.startswith("conf=")]
    if len(conf_args) > 1:
        raise ConfigError(f"conf= given {len(conf_args)} times ({', '.join(conf_args)}); give it at most once")
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"argument {arg!r} is not key=value (usage: launch.py [conf=NAME] [key.sub=value ...])")
    name = conf_args[0].split("=", 1)[1] if conf_args else DEFAULT_CONF
    return name, [a for a in argv if not a.startswith("conf=")]


def _conf_chain(name: str, seen: tuple[str, ...] = ()) -> list[dict]:
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown conf {name!r}; valid names: {', '.join(available_confs())} (or a path to a .yaml file)")
    if name in seen:
        raise ConfigError(f"conf {name!r}: 'base' chain loops ({' -> '.join(seen + (name,))})")
    try:
        layer = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception as exc:  # yaml errors carry line numbers
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(layer, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    base = layer.pop("base", None)
    layer["__source__"] = str(path)
    return (_conf_chain(str(base), seen + (name,)) if base else []) + [layer]


def _parse_overrides(overrides: list[str]) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse command-line overrides: {exc}") from None


def _merge(cfg: Any, source: str, layer: dict) -> Any:
    for key, message in REMOVED_KEYS.items():
        if _has_key(layer, key):
            raise ConfigError(f"{source}: config key '{key}' {message}")
    try:
        return OmegaConf.merge(cfg, layer)
    except ConfigKeyError as exc:
        raise ConfigError(f"{source}: {_unknown_key_message(exc.full_key or str(exc.key))}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: bad value for config key '{key}': {reason}") from None


def _has_key(layer: dict, dotted: str) -> bool:
    node: Any = layer
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _unknown_key_message(full_key: str) -> str:
    parts = full_key.split(".")
    node: Any = Config
    for i, part in enumerate(parts):
        names = [f.name for f in fields(node)]
        if part not in names:
            parent = ".".join(parts[:i]) or "the top level"
            hint = difflib.get_close_matches(part, names, n=1)
            maybe = f" (did you mean '{hint[0]}'?)" if hint else ""
            return f"unknown config key '{full_key}'{maybe}; valid keys under {parent}: {', '.join(names)}"
        node = get_type_hints(node)[part]
        if not is_dataclass(node):
            break
    return f"unknown config key '{full_key}'"



def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(c or repr(c) for c in choices)}")


def validate(c: Config) -> None:
    """Range and cross-field checks that types alone cannot express."""
    _one_of(c.mode, "mode", ("train", "check", "eval"))
    _check(c.trainer.total_steps >= 1, "trainer.total_steps", "must be >= 1")
    _check(c.trainer.save_every >= 0, "trainer.save_every", "must be >= 0 (0 = only at the end and on SIGTERM)")
    _check(c.trainer.keep_checkpoints >= 0, "trainer.keep_checkpoints", "must be >= 0 (0 = keep all)")
    _check(c.trainer.wandb_samples >= 0, "trainer.wandb_samples", "must be >= 0")
    _check(bool(c.trainer.resume), "trainer.resume", "must be auto, never or a checkpoint folder")
    _check(c.trainer.eval_every >= 0, "trainer.eval_every", "must be >= 0 (0 = never)")
    _one_of(c.trainer.device, "trainer.device", ("cpu", "cuda"))
    _check(c.data.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1")
    _check(c.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    _one_of(c.model.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
    _one_of(c.model.tiny.architecture, "model.tiny.architecture", ("qwen3", "qwen3_5"))
    _one_of(c.rollout.engine, "rollout.engine", ("hf", "vllm"))
    policy_rows = c.rollout.n - 1 if c.algorithm.hri.enable else c.rollout.n
    _check(
        policy_rows >= 2,
        "rollout.n",
        f"{c.rollout.n} leaves {policy_rows} policy row(s) per group"
        f"{' (one row is the injected reference)' if c.algorithm.hri.enable else ''}; GRPO needs >= 2",
    )
    _check(c.rollout.num_engines >= 1, "rollout.num_engines", "must be >= 1")
    _check(c.rollout.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be >= 1")
    _check(c.rollout.tensor_parallel_size == 1 or c.rollout.engine == "vllm", "rollout.tensor_parallel_size",
           "> 1 needs rollout.engine=vllm (the hf engine runs on one device)")
    _check(c.rollout.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
    _check(c.rollout.max_engine_restarts >= 0, "rollout.max_engine_restarts", "must be >= 0")
    for name in ("sampling", "val_sampling"):
        s = getattr(c.rollout, name)
        _check(s.temperature > 0, f"rollout.{name}.temperature", "must be > 0")
        _check(0 < s.top_p <= 1, f"rollout.{name}.top_p", "must be in (0, 1]")
        _check(s.repetition_penalty > 0, f"rollout.{name}.repetition_penalty", "must be > 0")
        _check(s.max_new_tokens >= 1, f"rollout.{name}.max_new_tokens", "must be >= 1")
    a = c.algorithm
    _check(0 <= a.clip_low < 1, "algorithm.clip_low", "must be in [0, 1)")
    _check(a.clip_high >= a.clip_low, "algorithm.clip_high", f"({a.clip_high}) must be >= algorithm.clip_low ({a.clip_low})")
    _check(a.adv_eps > 0, "algorithm.adv_eps", "must be > 0")
    _check(a.hri.peak_weight >= 0, "algorithm.hri.peak_weight", "must be >= 0")
    _check(a.hri.warmup_steps >= 0, "algorithm.hri.warmup_steps", "must be >= 0")
    _check(a.hri.decay_steps >= 0, "algorithm.hri.decay_steps", "must be >= 0")
    _check(a.hri.final_weight >= 0, "algorithm.hri.final_weight", "must be >= 0")
    l = c.learner
    _check(l.world_size >= 1, "learner.world_size", "must be >= 1")
    _check(l.zero_stage in (0, 1, 2, 3), "learner.zero_stage", f"{l.zero_stage} is not one of 0, 1, 2, 3")
    _check(l.lr >= 0, "learner.lr", f"must be >= 0 (0 freezes the policy; got {l.lr})")
    _check(l.weight_decay >= 0, "learner.weight_decay", "must be >= 0")
    _check(l.grad_clip > 0, "learner.grad_clip", "must be > 0")
    _check(l.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
    _one_of(l.lr_schedule, "learner.lr_schedule", ("constant", "linear", "cosine"))
    _check(0 <= l.min_lr_ratio <= 1, "learner.min_lr_ratio", "must be in [0, 1]")
    _check(l.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1")
    _check(l.max_tokens_per_micro_batch >= 0, "learner.max_tokens_per_micro_batch", "must be >= 0 (0 = by rows)")
    _check(l.logprob_chunk_tokens >= 0, "learner.logprob_chunk_tokens", "must be >= 0 (0 = unchunked)")
    _check(not l.offload_optimizer or l.zero_stage >= 1, "learner.offload_optimizer", "needs learner.zero_stage >= 1")
    _check(not l.offload_params or l.zero_stage == 3, "learner.offload_params", "needs learner.zero_stage=3")
    _one_of(l.optimizer, "learner.optimizer", ("auto", "torch_adamw", "cpu_adam"))
    _check(l.optimizer != "cpu_adam" or l.offload_optimizer, "learner.optimizer",
           "cpu_adam steps an optimizer state held in CPU memory: it needs learner.offload_optimizer=true")
    _check(c.rollout.stream_chunk >= 0, "rollout.stream_chunk", "must be >= 0 (0 = one engine call)")
    _check(c.rollout.max_staleness <= 1, "rollout.max_staleness",
           "must be 0 (on-policy) or 1 (generation of step k+1 overlaps training of step k)")
    _check(a.tis_cap >= 1, "algorithm.tis_cap", "must be >= 1")
    r = c.reward
    _one_of(r.score_mode, "reward.score_mode", ("sum", "mean", "last"))
    _check(r.token_clip > 0, "reward.token_clip", "must be > 0")
    _check(r.length.min_target >= 1, "reward.length.min_target", "must be >= 1")
    _check(0 <= r.blank_min_visible_ratio <= 1, "reward.blank_min_visible_ratio", "must be in [0, 1]")
    _check(r.judge_addressed_penalty >= 0, "reward.judge_addressed_penalty", "must be >= 0")
    _check_judge(c.judge, "judge")
    _check(c.judge.budget_usd >= 0, "judge.budget_usd", "must be >= 0 (0 = none)")
    for name in ("max_consecutive_rejections", "max_steps_without_judgment"):
        _check(getattr(c.judge, name) >= 0, f"judge.{name}", "must be >= 0 (0 = never)")
    _check_judge(c.eval.judge, "eval.judge")
    e = c.eval
    _check(e.length_scale > 0, "eval.length_scale", "must be > 0")
    _check(e.subset_size >= 1, "eval.subset_size", "must be >= 1")
    if c.mode == "eval":
        _check(bool(e.checkpoint), "eval.checkpoint", "mode=eval needs the Hugging Face folder to evaluate "
               "(eval.checkpoint=PATH; export a training checkpoint with `python -m learner.export`)")
    _one_of(c.weight_sync.backend, "weight_sync.backend", ("auto", "gloo", "nccl"))
    w = c.weight_sync
    _check(w.bucket_mb >= 1, "weight_sync.bucket_mb", "must be >= 1")
    _check(w.timeout_s > 0, "weight_sync.timeout_s", "must be > 0")
    _check(w.verify >= 0, "weight_sync.verify", "must be >= 0 (0 = never, 1 = every sync, N = first and every N-th)")
    _check(w.probe_tolerance >= 0, "weight_sync.probe_tolerance", "must be >= 0 (0 = by model.dtype)")
    _one_of(w.fault.kind, "weight_sync.fault.kind", SYNC_FAULT_KINDS)
    _check(0 <= w.fault.engine < c.rollout.num_engines, "weight_sync.fault.engine",
           f"must be an engine index, 0..{c.rollout.num_engines - 1}")
    _check(w.fault.version >= 1, "weight_sync.fault.version", "must be >= 1 (the first update is version 1)")
    _check(w.fault.after_bucket >= 0, "weight_sync.fault.after_bucket", "must be >= 0")
    _check(
        not (c.trainer.device == "cpu" and c.weight_sync.backend == "nccl"),
        "weight_sync.backend",
        "nccl needs trainer.device=cuda",
    )
    for role in ("learner", "engines"):
        _check_node_selector(getattr(c.placement, role), f"placement.{role}")


def _check_judge(j, at: str) -> None:
    _one_of(j.backend, f"{at}.backend", ("local", "gemini", "openai"))
    _one_of(j.service_tier, f"{at}.service_tier", ("flex", "standard"))
    _one_of(j.thinking_level, f"{at}.thinking_level", ("minimal", "low", "medium", "high"))
    _one_of(j.order, f"{at}.order", ("deadline", "fifo"))
    for name in ("rpm", "rpm_burst", "input_tpm", "max_output_tokens", "local.rpm_limit"):
        _check(_get(j, name) >= 0, f"{at}.{name}", "must be >= 0 (0 = none)")
    for name in ("max_in_flight", "initial_in_flight", "num_workers", "dispatch_batch", "max_attempts"):
        _check(_get(j, name) >= 1, f"{at}.{name}", "must be >= 1")
    _check(j.unanswered_output_tokens >= 0, f"{at}.unanswered_output_tokens", "must be >= 0")
    for name in ("timeout_s", "story_deadline_s", "backoff_s", "max_backoff_s", "retry_budget_min_per_s",
                 "local.capacity_step_s"):
        _check(_get(j, name) > 0, f"{at}.{name}", "must be > 0")
    for name in ("price.input_per_mtok", "price.output_per_mtok", "price.flex_factor", "local.latency_min_s",
                 "retry_budget"):
        _check(_get(j, name) >= 0, f"{at}.{name}", "must be >= 0")
    _check(all(c >= 1 for c in j.local.capacity), f"{at}.local.capacity",
           f"{list(j.local.capacity)}: every capacity level must be >= 1 (requests served at once); [] = none")
    _check(j.local.shed_factor >= 1, f"{at}.local.shed_factor", "must be >= 1 (shed at this multiple of capacity)")
    _check(j.local.latency_max_s >= j.local.latency_min_s, f"{at}.local.latency_max_s",
           f"({j.local.latency_max_s}) must be >= {at}.local.latency_min_s ({j.local.latency_min_s})")
    _check(0 <= j.local.fault_rate <= 1, f"{at}.local.fault_rate", "must be in [0, 1]")


# Ray's node label syntax (Kubernetes'): a name or value of <= 63 characters, alphanumeric at both
# ends, "-_." inside; a key may carry a DNS-subdomain prefix "prefix/name"
_LABEL_PART = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _check_node_selector(selector, at: str) -> None:
    for key, value in selector.labels.items():
        _check(not isinstance(value, dict), f"{at}.labels.{key}", "a label key with dots is split by the command "
               f"line: write {at}.labels={{{key}.NAME: VALUE}}")
        prefix, _, name = key.rpartition("/")
        _check(bool(_LABEL_PART.fullmatch(name)) and all(_LABEL_PART.fullmatch(p) for p in prefix.split(".") if prefix),
               f"{at}.labels", f"{key!r} is not a Ray label key (alphanumerics and -_. inside, <= 63 characters)")
        _check(not key.startswith("ray.io/"), f"{at}.labels", f"{key!r}: the ray.io/ prefix is Ray's own")
        _check(bool(_LABEL_PART.fullmatch(str(value))), f"{at}.labels.{key}",
               f"{value!r} is not a Ray label value (alphanumerics and -_. inside, <= 63 characters)")
    for name, amount in selector.resources.items():
        _check(name not in _RAY_RESOURCES and not name.startswith("node:"), f"{at}.resources",
               f"{name!r} is Ray's own resource: name a custom one (`ray start --resources`)")
        _check(amount > 0, f"{at}.resources.{name}", "must be > 0")


def _get(node, dotted: str):
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
