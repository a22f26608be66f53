"""A run's per-step numbers as Ray metrics, for the dashboard's Prometheus/Grafana charts.

Ray exports them from the node's metrics agent (`--metrics-export-port`) with a `ray_` prefix:
`ray_polaris_reward_mean{run="tiny"}`. A process reports its metrics to the agent every
`RAY_metrics_report_interval_ms` (10 s by default), so a chart lags by up to that much; a job's
driver reports like any worker. metrics.jsonl stays the record; these are best effort.
"""
from __future__ import annotations

import logging
import math
import sys

logger = logging.getLogger(__name__)

GAUGES = {  # Ray metric name -> the coordinator's metrics key
    "polaris_step": "step",
    "polaris_reward_mean": "reward/mean",
    "polaris_length_ratio_mean": "length/ratio_mean",
    "polaris_judge_in_flight": "judge/in_flight",
    "polaris_judge_queue_depth": "judge/queue_depth",
    "polaris_judge_window": "judge/window",  # the adaptive in-flight window (reward/concurrency.py)
    "polaris_judge_shed_rate": "judge/shed_rate",
    "polaris_judge_goodput_per_s": "judge/goodput_per_s",
    "polaris_judge_retry_budget_used": "judge/retry_budget_used",
    "polaris_judge_failed": "judge/failed",
    "polaris_judge_spend_usd": "judge/spend_usd_total",
    "polaris_weight_version": "weight_version",
}
PHASES = ("generate", "judge_tail", "train", "sync", "step")


class LiveMetrics:
    """publish(metrics) once per training step; a no-op while Ray is not initialised."""

    def __init__(self, run_name: str):
        self.run_name = run_name
        self._metrics: dict | None = None
        self._failed = False

    def publish(self, metrics: dict) -> None:
        if self._failed or not _ray_initialized():
            return
        try:
            self._publish(metrics)
        except Exception as exc:  # never let a chart stop a training run
            self._failed = True
            logger.warning("live metrics disabled: %s", exc)

    def _publish(self, metrics: dict) -> None:
        m = self._metrics or self._create()
        run = {"run": self.run_name}
        for name, key in GAUGES.items():
            if _number(metrics.get(key)):
                m[name].set(float(metrics[key]), tags=run)
        for phase in PHASES:
            if _number(metrics.get(f"time/{phase}")):
                m["polaris_phase_seconds"].set(float(metrics[f"time/{phase}"]), tags={**run, "phase": phase})
        requests, step_s = metrics.get("judge/requests"), metrics.get("time/step")
        if _number(requests) and _number(step_s) and step_s > 0:
            m["polaris_judge_rpm"].set(60.0 * requests / step_s, tags=run)
        if _number(requests) and requests > 0:
            m["polaris_judge_requests"].inc(float(requests), tags=run)

    def _create(self) -> dict:
        from ray.util.metrics import Counter, Gauge

        m = {name: Gauge(name, f"metrics.jsonl '{key}'", tag_keys=("run",)) for name, key in GAUGES.items()}
        m["polaris_phase_seconds"] = Gauge("polaris_phase_seconds", "time/<phase> of the last step",
                                           tag_keys=("run", "phase"))
        m["polaris_judge_rpm"] = Gauge("polaris_judge_rpm", "judge requests per minute over the last step",
                                       tag_keys=("run",))
        m["polaris_judge_requests"] = Counter("polaris_judge_requests", "judge requests, retries included",
                                              tag_keys=("run",))
        self._metrics = m
        return m


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never imported: cannot be initialised, and no import cost here
    return ray is not None and ray.is_initialized()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
