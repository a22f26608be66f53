"""The judge's side of a run: one limiter actor (the project's rate limit and adaptive window), N
async reward workers leasing from it, and the driver-side pool that batches stories to them, all
kept beside the driver."""
from __future__ import annotations

import ray

from actors.checkpoint import judge_cache_file
from cluster import NAMESPACE
from conf.schema import Config, JudgeServiceConfig
from reward.cache import JudgeCache
from reward.components import RewardParams
from reward.judge_client import JudgeSettings, RetryPolicy, Secret
from reward.judge_watch import JudgeWatch
from reward.limiter import LimiterService, RateLimits, RemoteLimiter
from reward.pool import RewardPool
from reward.spend import Prices
from reward.worker import RewardWorker

_RewardActor = ray.remote(RewardWorker)
_LimiterActor = ray.remote(LimiterService)


def start_reward_pool(cfg: Config, judge_base_url: str, run_name: str, output_dir: str, *, evaluation: bool = False):
    """One limiter actor (the project's rate limit), N async reward workers leasing from it, and
    the driver-side pool that batches stories to them. The workers are restarted if they die;
    the pool re-sends their unanswered stories. The judge is cfg.judge, or cfg.eval.judge for evaluation."""
    j = cfg.eval.judge if evaluation else cfg.judge
    limits = RateLimits(rpm=j.rpm, burst=j.rpm_burst, input_tpm=j.input_tpm, max_in_flight=j.max_in_flight,
                        lease_ttl_s=j.timeout_s + 60, adaptive=j.adaptive_in_flight,
                        initial_in_flight=j.initial_in_flight, retry_budget=j.retry_budget,
                        retry_budget_min_per_s=j.retry_budget_min_per_s)
    limiter_name = f"{run_name}/judge-limiter"
    beside_driver = _beside_driver()
    limiter = _LimiterActor.options(name=limiter_name, namespace=NAMESPACE, num_cpus=0, max_concurrency=10_000,
                                    **beside_driver).remote(limits)
    settings = judge_settings(j, judge_base_url, evaluation=evaluation)
    secret = Secret.from_environment(settings)  # the driver's environment: workers may not share it
    workers = [
        _RewardActor.options(name=f"{run_name}/reward-{i}", namespace=NAMESPACE, num_cpus=0, max_restarts=3,
                             max_concurrency=10_000, **beside_driver)
        .remote(settings, RewardParams.from_config(cfg.reward), RemoteLimiter(limiter_name, NAMESPACE), secret)
        for i in range(j.num_workers)
    ]
    cache_file = judge_cache_file(j, output_dir, evaluation=evaluation)
    cache = JudgeCache(cache_file) if cache_file is not None else None
    watch = None if evaluation else JudgeWatch(settings, max_rejections=cfg.judge.max_consecutive_rejections,
                                               max_dry_steps=cfg.judge.max_steps_without_judgment)
    pool = RewardPool(workers, cache_params=settings.cache_params(), cache=cache, batch_size=j.dispatch_batch,
                      prices=Prices.of(j.price),
                      flex=settings.flex, watch=watch, order=j.order)
    return limiter, workers, pool


def _beside_driver() -> dict:
    """The judge's actors on the driver's node (preferred, not required): they hold no device, and
    a lost engine or learner node must not take the run's rate limiter with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}


def judge_settings(j: JudgeServiceConfig, base_url: str, *, evaluation: bool = False) -> JudgeSettings:
    retry = RetryPolicy(max_attempts=j.max_attempts, backoff_s=j.backoff_s, max_backoff_s=j.max_backoff_s,
                        timeout_s=j.timeout_s, deadline_s=j.story_deadline_s)
    return JudgeSettings(backend=j.backend, model=j.model, base_url=base_url or j.base_url, api_key_env=j.api_key_env,
                         vertex=j.vertex, flex=j.service_tier == "flex", temperature=j.temperature, top_p=j.top_p,
                         seed=None if j.seed < 0 else j.seed, thinking_level=j.thinking_level,
                         max_output_tokens=j.max_output_tokens or None, retry=retry, evaluation=evaluation,
                         unanswered_output_tokens=j.unanswered_output_tokens)
