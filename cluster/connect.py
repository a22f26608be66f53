"""The driver's connection to Ray: join the cluster of `ray job submit`, or start one on loopback."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from conf.schema import Config

RUNTIME_ENV = {  # every process of the run: loopback Ray, no usage reports (CPU DeepSpeed where no GPU)
    "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def connect_ray(cfg: Config) -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS is set), else start one on loopback."""
    import ray

    env = {**RUNTIME_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    if cfg.trainer.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    if cfg.model.path == "tiny":  # built locally: nothing to ask the hub
        env["HF_HUB_OFFLINE"] = "1"
    if os.environ.get("RAY_ADDRESS"):
        # Ray refuses a driver whose runtime_env names an env var the job's runtime_env sets: the job's wins
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
        env = {k: v for k, v in env.items() if k not in job.get("env_vars", {})}
        ray.init(address="auto", runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        needed = cfg.learner.world_size + cfg.rollout.num_engines
        ray.init(num_cpus=max(needed, os.cpu_count() or 1), _node_ip_address="127.0.0.1",
                 dashboard_host="127.0.0.1", include_dashboard=False, runtime_env={"env_vars": env})
