"""Every story as it is judged: trainer.output_dir/rollouts/step_NNNNNN.jsonl, one line per policy
sample or HRI reference with its text, judgment and reward components. Each line is appended and
flushed when its judgment arrives, so a crash loses no judged story; users read their stories
here."""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

from reward.worker import ScoredSample


class RolloutLog:
    def __init__(self, output_dir: Path):
        self.folder = Path(output_dir) / "rollouts"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:06d}.jsonl"

    def record(self, step: int, row, scored: ScoredSample) -> None:
        """row: actors.pipeline.PolicyRow or ReferenceRow."""
        sample = getattr(row, "sample", None)
        line = {
            "step": step,
            "key": scored.key,
            "reference": sample is None,
            "weight_version": sample.weight_version if sample else None,
            "finish_reason": sample.finish_reason if sample else None,
            "response": row.tokens.text,
            "response_tokens": len(row.tokens.ids),
            "truncated": row.tokens.truncated,
            "valid": scored.valid,
            "judge_error": scored.judge_error,
            "judge_attempts": scored.judge_attempts,
            "judge_cached": scored.cached,
            "judge_input_tokens": scored.input_tokens,
            "judge_output_tokens": scored.output_tokens,
            "judge_thought_tokens": scored.thought_tokens,
            "judgment": scored.judgment.scores if scored.judgment else None,
            "evidence": scored.judgment.evidence if scored.judgment else None,
            "reward": dataclasses.asdict(scored.reward) if scored.reward else None,
        }
        text = json.dumps(line, ensure_ascii=False) + "\n"
        with self._lock, open(self.path(step), "a", encoding="utf-8") as f:
            f.write(text)
