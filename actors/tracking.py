"""Where a run's numbers go: metrics.jsonl (one object per training step), W&B (metrics, a table of
sample stories, the redacted config), the console, and at the end a summary figure for offline users."""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import string
from pathlib import Path

from tqdm import tqdm

from actors.live_metrics import LiveMetrics
from cluster.plan_model import plan_metrics


def start_tracker(cfg, output_dir: Path, state: dict | None, run_name: str) -> Tracker:
    """The run's metrics.jsonl, W&B run and progress bar; state: the checkpoint resumed from, if any."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    predicted = {}
    if cfg.trainer.device == "cuda":
        from cluster.plan import run_prediction

        predicted = run_prediction(cfg)[1]
    return Tracker(output_dir, project=cfg.trainer.wandb_project, config=config, total_steps=cfg.trainer.total_steps,
                   start_step=state["steps_done"] if state else 0, progress_bar=cfg.trainer.progress_bar,
                   run_id=state["wandb_run_id"] if state else None, run_name=run_name, predicted=predicted)


class Tracker:
    def __init__(self, output_dir: Path, *, project: str, config: dict, total_steps: int, start_step: int,
                 progress_bar: bool, run_id: str | None = None, run_name: str | None = None,
                 predicted: dict[str, float] | None = None):
        """run_id: the W&B run to continue (a resume); else a new one. Either way it is written to
        output_dir/wandb_run_id and kept in every checkpoint. run_name: the live gauges' "run" tag
        (the run's actor name; default the output folder's name). predicted: the run planner's
        seconds per phase (cluster/plan.py), logged beside the measured ones as plan/*."""
        self.output_dir = output_dir
        self.predicted = predicted or {}
        self.metrics_path = output_dir / "metrics.jsonl"
        self.run_id = run_id or _new_run_id()
        (output_dir / "wandb_run_id").write_text(self.run_id + "\n")
        self._wandb = _start_wandb(output_dir, project, redact(config), self.run_id, resuming=run_id is not None)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         disable=not progress_bar, dynamic_ncols=True)
        self._live = LiveMetrics(run_name=run_name or output_dir.resolve().name)

    def log_step(self, metrics: dict, samples: list[dict] = ()) -> None:
        """samples: a few of the step's stories (dicts of equal keys) for the W&B table."""
        if self.predicted:
            metrics = {**metrics, **plan_metrics(self.predicted, metrics)}
        with open(self.metrics_path, "a") as f:  # appended as it happens: a crash loses nothing logged
            f.write(json.dumps(_no_nan(metrics)) + "\n")
        self._live.publish(metrics)
        if self._wandb is not None:
            import wandb

            extra = {}
            if samples:
                columns = list(samples[0])
                extra["samples"] = wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])
            self._to_wandb(lambda run: run.log({**metrics, **extra}, step=metrics["step"]))
        self._bar.write(step_summary(metrics))
        self._bar.update(1)

    def log_validation(self, row: dict) -> None:
        """A periodic validation (eval/run.py): validation.jsonl, W&B under val/, one console line."""
        with open(self.output_dir / "validation.jsonl", "a") as f:
            f.write(json.dumps(_no_nan(row)) + "\n")
        step = row["step"]
        self._to_wandb(lambda run: run.log({f"val/{k}": v for k, v in row.items() if k != "step"}, step=step))
        self._bar.write(validation_summary(row))

    def close(self) -> None:
        self._bar.close()
        figure = write_summary_figure(self.metrics_path, self.output_dir / "summary.png")
        if self._wandb is not None and figure is not None:
            import wandb

            self._to_wandb(lambda run: run.log({"summary": wandb.Image(str(figure))}))
        self._to_wandb(lambda run: run.finish())

    def _to_wandb(self, call) -> None:
        """W&B never stops training: `ray job stop` signals its service process too, for one."""
        if self._wandb is None:
            return
        try:
            call(self._wandb)
        except Exception as e:  # noqa: BLE001
            print(f"W&B stopped answering ({type(e).__name__}: {e}); metrics go on to metrics.jsonl "
                  f"(`wandb sync {self.output_dir / 'wandb'}` uploads what it wrote)", flush=True)
            self._wandb = None


def _no_nan(row: dict) -> dict:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


_SECRET = re.compile(r"(api_?key|token|secret|password)$", re.IGNORECASE)


def redact(config: dict) -> dict:
    """The config without secret values (a key named like api_key / token / secret / password;
    the *_env keys name an environment variable and are kept). Ours holds none by design; a
    user's extra YAML key might."""
    def clean(node):
        if isinstance(node, dict):
            return {k: "***" if (_SECRET.search(str(k)) and node[k]) else clean(node[k]) for k in node}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node
    return clean(config)


def _new_run_id() -> str:
    """W&B's run id alphabet; made here so the id exists before (and without) W&B."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _start_wandb(output_dir: Path, project: str, config: dict, run_id: str, *, resuming: bool):
    """Offline unless the user set WANDB_MODE or has a key; never fatal for training. A resumed
    run continues the same W&B run (steps the checkpoint did not cover are logged again: W&B
    keeps the first values of a step it has seen)."""
    import wandb

    if os.environ.get("WANDB_MODE") == "disabled":
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        return wandb.init(project=project, dir=str(output_dir), config=config, mode=mode, id=run_id,
                          resume="allow" if resuming else None, settings=wandb.Settings(console="off", silent=True))
    except Exception as e:  # noqa: BLE001 -- e.g. "run ID ... is in use" by a killed run's W&B service
        print(f"W&B did not start ({type(e).__name__}: {e}); training goes on, metrics in metrics.jsonl", flush=True)
        return None


SUMMARY_PANELS = (("reward/mean", "reward (mean)"), ("length/ratio_mean", "length ratio (words / target)"),
                  ("judge/spend_usd_total", "judge spend (USD, total)"), ("time/step", "step time (s)"))


def write_summary_figure(metrics_path: Path, out: Path) -> Path | None:
    """Reward, length ratio, judge spend and step time per step, as one PNG; None without metrics."""
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib.pyplot as plt

    fig = summary_figure(rows, f"{metrics_path.parent.name}: {len(rows)} steps")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary_figure(rows: list[dict], suptitle: str):
    """The matplotlib Figure of write_summary_figure: one panel per SUMMARY_PANELS entry, in order,
    each a line over the steps that logged its key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, SUMMARY_PANELS):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def step_summary(m: dict) -> str:
    """The console's one line per step."""
    return (f"step {m['step']:>4} | reward {m['reward/mean']:+.3f} len {m['length/ratio_mean']:.2f} "
            f"| gen {m['time/generate']:.1f}s judge-tail {m['time/judge_tail']:.1f}s train {m['time/train']:.1f}s "
            f"sync {m['time/sync']:.2f}s = {m['time/step']:.1f}s | judge {m['judge/failed']} failed "
            f"${m['judge/spend_usd_total']:.3f} | v{m['weight_version']}"
            + (f" | {m['plan/step_vs_predicted']:.2f}x plan" if "plan/step_vs_predicted" in m else ""))


def validation_summary(row: dict) -> str:
    def f(key: str) -> str:
        v = row.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"

    return (f"validation after step {row['step']}: quality id {f('quality/id')} near-ood {f('quality/near_ood')} "
            f"far-ood {f('quality/far_ood')} all {f('quality/aggregate')} slope {f('quality/slope')}/bucket | "
            f"length ratio id {row.get('length_ratio/id', float('nan')):.2f} | reward {row.get('reward/mean', float('nan')):.3f} | "
            f"{row['count']} stories, "
            f"{row['failed']} judge failures, {row['time_s']:.1f}s")
