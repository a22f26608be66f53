"""Where a run's numbers go: metrics.jsonl (one object per training step), W&B, the console."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm


class Tracker:
    def __init__(self, output_dir: Path, *, project: str, config: dict, total_steps: int, start_step: int,
                 progress_bar: bool):
        self.metrics_path = output_dir / "metrics.jsonl"
        self._wandb = _start_wandb(output_dir, project, config)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         disable=not progress_bar, dynamic_ncols=True)

    def log_step(self, metrics: dict) -> None:
        with open(self.metrics_path, "a") as f:  # appended as it happens: a crash loses nothing logged
            f.write(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v
                                for k, v in metrics.items()}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=metrics["step"])
        self._bar.write(step_summary(metrics))
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(output_dir: Path, project: str, config: dict):
    """Offline unless the user set WANDB_MODE or has a key; never fatal for training."""
    import wandb

    if os.environ.get("WANDB_MODE") == "disabled":
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=project, dir=str(output_dir), config=config, mode=mode,
                      settings=wandb.Settings(console="off", silent=True))


def step_summary(m: dict) -> str:
    """The console's one line per step."""
    return (f"step {m['step']:>4} | reward {m['reward/mean']:+.3f} len {m['length/ratio_mean']:.2f} "
            f"| gen {m['time/generate']:.1f}s judge-tail {m['time/judge_tail']:.1f}s train {m['time/train']:.1f}s "
            f"sync {m['time/sync']:.2f}s = {m['time/step']:.1f}s | judge {m['judge/failed']} failed "
            f"${m['judge/spend_usd_total']:.3f} | v{m['weight_version']}")
