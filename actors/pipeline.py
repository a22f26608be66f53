"""One step's rollouts on their way: generation streams out of the engines, and every chunk of
finished samples goes to the reward pool the moment it arrives; the step is ready when its last
story is judged. The HRI reference rows go with the first chunk (they need no generation).

What overlaps what (docs/design.md#the-one-step-off-schedule): a story is judged while later chunks still generate;
group statistics need the whole group and the token-mean needs the step's token count, so the
learner starts when the step's last judgment is in. With rollout.max_staleness=1 the coordinator
also launches step k+1 before training step k, so step k+1's generation and judging run while
step k trains (its rows are then one update old and the learner corrects for that).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from actors.data import PromptRecord
from actors.rollout_worker import Sample
from reward.worker import ScoredSample


class StopRequested(Exception):
    """A wait gave up because the run was asked to stop (SIGTERM, `ray job stop`, Ctrl-C)."""


_POLL_S = 0.2
_consumers: set[threading.Thread] = set()  # the stream consumers still running


def join_consumers(timeout_s: float) -> None:
    """Wait for the stream consumers to end. launch.py calls it once the run's actors are killed (a
    stopped step's streams then fail at once): a thread still inside Ray when the driver's Ray
    shuts down makes Ray end the process with status 1."""
    deadline = time.monotonic() + timeout_s
    for thread in list(_consumers):
        thread.join(max(0.0, deadline - time.monotonic()))


@dataclass
class PolicyRow:
    sample: Sample
    tokens: object  # actors.coordinator.Tokenized
    scored: Future  # -> ScoredSample


@dataclass
class ReferenceRow:
    prompt: PromptRecord
    tokens: object
    scored: Future


@dataclass
class InFlightStep:
    step: int
    prompts: list[PromptRecord]
    prompt_ids: dict[str, tuple[int, ...]]
    reference_weight: float
    started: float = field(default_factory=time.perf_counter)
    generated_at: float | None = None
    last_scored_at: float = 0.0
    on_scored: Callable[[int, object, ScoredSample], None] | None = None
    replayed: bool = False  # samples from a checkpoint, not from the engines now
    engine_version: int = 0  # the weight version the engines held when the step was launched
    policy: list[PolicyRow] = field(default_factory=list)
    references: list[ReferenceRow] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def wait_generated(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Every engine has returned its samples (the engines are free for a weight update).
        Raises StopRequested as soon as stop() is true."""
        while not self._done.wait(_POLL_S):
            if stop():
                raise StopRequested
        if self._error is not None:
            raise self._error

    @property
    def generated(self) -> bool:
        return self._done.is_set() and self._error is None

    def wait_scored(self, stop: Callable[[], bool] = lambda: False) -> float:
        """Waits for every judgment; returns when the last one arrived (which may be long before
        this call, when the step waited for its turn at the learner)."""
        self.wait_generated(stop)
        for row in [*self.policy, *self.references]:
            while True:
                try:
                    row.scored.result(timeout=_POLL_S)
                    break
                except FutureTimeout:
                    if stop():
                        raise StopRequested from None
        return self.last_scored_at

    def track(self, future: Future, row) -> Future:
        """Note when the row's judgment arrives, and hand it to on_scored (the rollout log)."""
        def arrived(done: Future) -> None:
            self.last_scored_at = max(self.last_scored_at, time.perf_counter())
            if self.on_scored is not None and done.exception() is None:
                self.on_scored(self.step, row, done.result())
        future.add_done_callback(arrived)
        return future

    @property
    def generate_s(self) -> float:
        return (self.generated_at or time.perf_counter()) - self.started


def stream_rollouts(step: InFlightStep, streams: list, codec, submit, *, references: list[ReferenceRow],
                    job_for) -> None:
    """Consume the engines' streams on background threads (one per engine): each chunk of samples
    is tokenized and submitted for judging as it arrives. submit(job, step=k) -> Future[ScoredSample]
    (the step, for its judge metrics: reward/pool.py); job_for(uid, tokens, key) -> ScoringJob."""
    import ray

    lock = threading.Lock()
    pending = {"engines": len(streams), "references": references}

    def add_chunk(samples: list[Sample]) -> None:
        rows = []
        for s in samples:
            row = PolicyRow(s, codec.response(s.response_ids, s.finish_reason), None)
            job = job_for(s.uid, row.tokens, f"{s.uid}/{s.sample_index}")
            row.scored = step.track(submit(job, step=step.step), row)
            rows.append(row)
        with lock:
            step.policy.extend(rows)
            first, pending["references"] = pending["references"], []
        for ref in first:  # with the first chunk: in a serial step that is after generation
            job = job_for(ref.prompt.uid, ref.tokens, f"{ref.prompt.uid}/ref")
            ref.scored = step.track(submit(job, step=step.step), ref)
            with lock:
                step.references.append(ref)

    def consume(stream) -> None:
        try:
            for ref in stream:
                add_chunk(ray.get(ref))
        except BaseException as e:  # noqa: BLE001 -- handed to whoever waits on the step
            step._error = e
        finally:
            _consumers.discard(threading.current_thread())
            with lock:
                pending["engines"] -= 1
                last = pending["engines"] == 0
            if last:
                step.generated_at = time.perf_counter()
                step._done.set()

    if not streams:
        add_chunk([])
        step.generated_at = time.perf_counter()
        step._done.set()
    for stream in streams:
        thread = threading.Thread(target=consume, args=(stream,), name=f"rollouts-{step.step}", daemon=True)
        _consumers.add(thread)
        thread.start()
