"""Rollout side and the step loop: data (prompts, sampler), engine (engine interface, HF engine),
rollout_worker (one engine + its weight version), groups (GRPO group assembly), coordinator
(the step loop), tracking (metrics.jsonl, W&B, console). Modules are imported directly so that
light ones (data) never pull in heavy ones (engines, Ray)."""
