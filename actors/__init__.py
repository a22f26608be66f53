"""Rollout side and the step loop: data (prompts, sampler), codec (chat template, tokens, sample
seeds), engine (engine interface, HF engine), rollout_worker (one engine + its weight version),
groups (GRPO group assembly), pipeline (a step's rollouts streaming into the judge), coordinator
(the step loop), rollout_log (every judged story on disk), checkpoint (run folders), tracking
(metrics.jsonl, W&B, console), live_metrics (Ray gauges). Modules are imported directly so that
light ones (data) never pull in heavy ones (engines, Ray)."""
