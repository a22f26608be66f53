"""Is the judge dead? A judge that refuses every story (a key revoked mid-run) or answers none
(an outage) makes every story invalid and every group dropped: the run would "train" to
trainer.total_steps doing nothing. The coordinator stops it instead, after a checkpoint, with
the reason this watch gives (docs/design.md#the-judge). Two signs, each off at 0:

- judge.max_consecutive_rejections (K): K stories in a row refused with a status that is never
  retried (400/401/403/404: a revoked key, a wrong model). A story the judge scored breaks the
  run; a cache hit or a transient failure neither counts nor breaks it.
- judge.max_steps_without_judgment (M): M training steps in a row in which the judge scored no
  story. 429, 503, timeouts and the story deadline are what the flex tier does under load, so a
  single such step is tolerated; M of them in a row is an outage.

Pure; the reward pool feeds it (under its lock) and the coordinator reads `reason`.
"""
from __future__ import annotations

from reward.judge_client import JudgeSettings
from reward.worker import ScoredSample


def describe(s: JudgeSettings) -> str:
    """The judge in a message: backend, model, endpoint (never a key)."""
    return f"{s.backend} {s.model}" + (f" at {s.base_url}" if s.base_url else "")


def way_out(status: int, s: JudgeSettings) -> str:
    if status in (401, 403):
        return f"check the key in ${s.api_key_env}" + (" (or the Vertex AI credentials)" if s.vertex else "")
    if status in (400, 404):
        return "check judge.model and judge.base_url"
    return "check the judge's settings"


def _first_line(error: str | None) -> str:
    return error.splitlines()[0][:200] if error and error.strip() else "no error text"


class JudgeWatch:
    def __init__(self, settings: JudgeSettings, *, max_rejections: int, max_dry_steps: int):
        self.settings, self.max_rejections, self.max_dry_steps = settings, max_rejections, max_dry_steps
        self.reason: str | None = None  # set once, when the judge is taken for dead
        self._refused_in_a_row = self._dry_steps = 0
        self._last_error: str | None = None

    def story(self, sample: ScoredSample) -> None:
        if sample.cached:
            return
        if sample.judgment is not None:
            self._refused_in_a_row = 0
            return
        self._last_error = sample.judge_error
        if sample.rejected_status is None:
            return
        self._refused_in_a_row += 1
        if self.reason is None and 0 < self.max_rejections <= self._refused_in_a_row:
            status = sample.rejected_status
            detail = _first_line(sample.judge_error).removeprefix("JudgeHTTPError: ").removeprefix(f"HTTP {status}: ")
            self.reason = (f"the judge ({describe(self.settings)}) refused {self._refused_in_a_row} stories in a row "
                           f"with HTTP {status} ({detail}); {way_out(status, self.settings)}")

    def step(self, stories: int, failed: int) -> None:
        """A training step is over: `stories` were submitted, `failed` of them got no judgment."""
        if not stories:
            return
        self._dry_steps = self._dry_steps + 1 if failed == stories else 0
        if self.reason is None and 0 < self.max_dry_steps <= self._dry_steps:
            self.reason = (f"the judge ({describe(self.settings)}) judged no story in {self._dry_steps} steps in a row "
                           f"(last error: {_first_line(self._last_error)}); check the service and the network, or "
                           "give each story longer (judge.story_deadline_s, judge.max_attempts)")
