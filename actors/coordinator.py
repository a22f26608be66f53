"""The step loop (docs/design.md#roles-and-the-step): prompts -> rollouts -> judge -> groups -> update -> weights."""
from __future__ import annotations

import contextlib
import dataclasses
import pickle
import random
import signal
import statistics
import time
from pathlib import Path

import ray
import torch

from actors import checkpoint
from actors.codec import ChatCodec, Tokenized, sample_seed
from actors.data import PromptSampler
from actors.engine import SamplingParams
from actors.groups import GroupRow, assemble_step
from actors.pipeline import InFlightStep, ReferenceRow, StopRequested, stream_rollouts
from actors.rollout_log import RolloutLog
from actors.tracking import Tracker
from cluster.roles import Roles
from conf.errors import JudgeError, RoleLostError, WeightSyncError
from conf.schema import Config
from learner.grpo import reference_weight
from reward.spend import budget_stop_reason
from reward.worker import ScoringJob


class Coordinator:
    def __init__(self, cfg: Config, roles: Roles, codec: ChatCodec, sampler: PromptSampler, tracker: Tracker,
                 output_dir: Path, model_path: str, validation=None):
        self.cfg, self.roles, self.codec, self.sampler, self.tracker = cfg, roles, codec, sampler, tracker
        self.output_dir = output_dir
        self.sampling = SamplingParams.from_config(cfg.rollout.sampling)
        self.stop_reason: str | None = None
        self.rollout_log = RolloutLog(output_dir)
        self._last_step_usd = 0.0
        self.stop_requested: str | None = None  # set by a signal handler: SIGTERM, SIGINT
        self._sampler_before: dict[int, dict] = {}
        self._saved_at: int | None = None
        self.model_path = model_path
        self.validation = validation  # eval.run.PeriodicValidation, or None
        self.engine_restarts = 0
        self.judge_down: str | None = None  # why the judge is taken for dead (reward/judge_watch.py)

    def run(self, start_step: int = 0, restored: InFlightStep | None = None) -> str | None:
        """Train to trainer.total_steps; returns why it stopped early (judge budget, a signal), or
        None. A learner rank that dies stops the run with RoleLostError (the last complete
        checkpoint is what a resume starts from); an engine that dies is restarted (_generated). A
        judge taken for dead stops the run like a signal, then raises JudgeError naming the checkpoint."""
        try:
            stopped = self._run(start_step, restored)
        except ray.exceptions.RayActorError as e:
            raise self._role_lost(e) from None
        if self.judge_down:
            raise JudgeError(f"{self.judge_down}, then run the same command to resume from "
                             f"{checkpoint.complete_checkpoints(self.output_dir)[-1]}")
        return stopped

    def _run(self, start_step: int, restored: InFlightStep | None) -> str | None:
        """The step loop.

        On-policy (max_staleness 0): launch step k, train it, sync, then launch step k+1.
        max_staleness 1: step k+1 is launched as soon as step k's generation is done, before
        step k trains; the weight sync waits until step k+1's generation is done too (engines
        are never updated mid-generation), so step k+1's rows are exactly one update old.
        On GPUs step k trains while step k+1 generates; on CPU (shared cores) after it.
        A stop request (self.stop_requested) is honoured between phases: a step not yet training
        is dropped, a training step finishes; either way a checkpoint is written first."""
        total, overlap = self.cfg.trainer.total_steps, self.cfg.rollout.max_staleness > 0
        upcoming = restored or (self.launch(start_step) if start_step < total else None)
        iteration_start = time.perf_counter()
        while upcoming is not None:
            current, upcoming = upcoming, None
            try:
                current = self._generated(current)
                upcoming = self.launch(current.step + 1) if overlap and current.step + 1 < total else None
                if upcoming is not None and self.cfg.trainer.device == "cpu":
                    # one set of cores for every role: training while the engines generate only
                    # thrashes them (measured: generation 3.6 s -> 13.8 s), so on CPU the overlap is
                    # step k's judging with step k+1's generation, and step k+1's judging with training
                    upcoming = self._generated(upcoming)
                current.wait_scored(self._stopping)
                if self._stopping():  # e.g. the judge refused the step's stories faster than any wait polled
                    raise StopRequested
            except StopRequested:
                self.save_checkpoint(current.step, in_flight=current)
                return self.stop_reason
            metrics = self.train_step(current)
            synced = True
            if upcoming is not None:
                try:
                    upcoming = self._generated(upcoming)
                except StopRequested:  # its generation is dropped; the resumed run redoes it
                    synced = False
            t_sync = time.perf_counter()
            if metrics["groups/rows_trained"] and synced:
                self._sync(current.step + 1)
            end = time.perf_counter()
            metrics.update(self.phase_times(current, metrics, iteration_start, t_sync, end))
            metrics.update(self.roles.last_sync)
            metrics["rollout/engine_restarts"] = self.engine_restarts  # in the run so far
            metrics.update(self.roles.placement.node_ids() if self.roles.placement else {})
            self._last_step_usd = metrics["judge/spend_usd"]
            self.tracker.log_step(metrics, samples=self.sample_table(current))
            iteration_start = end
            steps_done = current.step + 1
            if self.validation is not None and self.validation.due(steps_done):  # the engines are idle here
                self.validation.run(current.step)
                iteration_start = time.perf_counter()  # not in the next step's time
            stopping = self._stopping()  # asked once: a stop must find the checkpoint written
            if stopping or checkpoint.due(self.cfg, steps_done):
                self.save_checkpoint(steps_done, in_flight=upcoming if synced else None, updates_unsent=int(not synced))
            if stopping:
                return self.stop_reason
            if not overlap and steps_done < total:
                upcoming = self.launch(steps_done)
            if upcoming is None and self._saved_at != steps_done:  # the end, or the judge budget
                self.save_checkpoint(steps_done)
        return self.stop_reason

    def _generated(self, inflight: InFlightStep) -> InFlightStep:
        """Wait for the step's generation. An engine that crashed (its stream failed) or that Ray
        restarted unnoticed (samples below the current weight version) is re-joined and re-synced
        (Roles.recover_engines, version checked), and the step generated again: same prompts, same
        seeds, so the judge cache answers what was already judged."""
        for _ in range(self.cfg.rollout.max_engine_restarts + 1):
            try:
                inflight.wait_generated(self._stopping)
                versions = {r.sample.weight_version for r in inflight.policy}
                if inflight.replayed or versions <= {inflight.engine_version}:
                    return inflight
                reason = f"samples at weight version(s) {sorted(versions)}, not v{inflight.engine_version}"
            except ray.exceptions.RayActorError as e:
                if self.roles.dead_learners():
                    raise
                reason = f"{type(e).__name__}"
            version = self._recover_engines()
            self.engine_restarts += 1
            print(f"engine restart: step {inflight.step} lost its generation ({reason}); weight group re-formed, "
                  f"v{version} re-sent to every engine and checked; generating step {inflight.step} again", flush=True)
            inflight.on_scored = None  # its stories still being judged are not the step's: not logged
            inflight = self.launch(inflight.step, restore={"prompts": inflight.prompts})
        raise RoleLostError(f"step {inflight.step}: the engines failed {self.cfg.rollout.max_engine_restarts + 1} "
                            f"times in a row (rollout.max_engine_restarts={self.cfg.rollout.max_engine_restarts})")

    def _sync(self, steps_done: int) -> None:
        """The learner's update to every engine, verified (cluster/sync_verify.py). An engine that
        died, stopped taking part or received it wrong gets it again on recovery: group re-formed,
        update re-sent and verified. When that fails too, the update is checkpointed and the run
        stops; a learner that died stops the run (its last checkpoint is what a resume starts from)."""
        started = time.perf_counter()
        try:
            self.roles.sync_weights()
        except (ray.exceptions.RayActorError, WeightSyncError) as e:
            failed_at = time.perf_counter()
            print(f"weight sync failed after {failed_at - started:.1f}s: {str(e).splitlines()[0][:300]}", flush=True)
            if self.roles.dead_learners():
                raise self._role_lost(e) from None
            try:
                version = self._recover_engines(version=self.roles.weight_version + 1)
            except WeightSyncError as again:
                folder = self.save_checkpoint(steps_done, updates_unsent=1)
                raise WeightSyncError(f"{again}; it failed again after the weight group was re-formed, so the run "
                                      f"stops with the update saved in {folder}") from None
            self.engine_restarts += 1
            print(f"weight sync recovered: weight group re-formed, v{version} re-sent to every engine and verified "
                  f"in {time.perf_counter() - failed_at:.1f}s", flush=True)

    def _recover_engines(self, version: int | None = None) -> int:
        try:
            return self.roles.recover_engines(self.cfg, version=version)
        except RoleLostError as e:  # e.g. an engine's node lost, no other node to take it
            raise RoleLostError(f"{e}; the run stops: {self._resume_hint()}") from None

    def _role_lost(self, error: Exception) -> RoleLostError:
        dead = self.roles.dead_learners()
        what = f"learner rank(s) {dead} died" if dead else "an actor of the run failed for good"
        return RoleLostError(f"{what} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                             f"the run stops: {self._resume_hint()}")

    def _resume_hint(self) -> str:
        complete = checkpoint.complete_checkpoints(self.output_dir)
        return (f"the last complete checkpoint is {complete[-1]}; run the same command to resume from it"
                if complete else "no checkpoint was written yet")

    def _stopping(self) -> bool:
        if not self.stop_requested and (down := self.roles.reward_pool.judge_down()):
            self.judge_down, self.stop_requested = down, "the judge is down"
        if self.stop_requested and not self.stop_reason:
            self.stop_reason = f"{self.stop_requested}: stopped after a checkpoint"
        return bool(self.stop_requested)

    def reference_weight(self, step: int) -> float:
        h = self.cfg.algorithm.hri
        if not h.enable:
            return 0.0
        return reference_weight(step, peak=h.peak_weight, warmup_steps=h.warmup_steps, decay_steps=h.decay_steps,
                                final_weight=h.final_weight)

    def launch(self, step: int, restore: dict | None = None) -> InFlightStep | None:
        """Take the step's prompts and start its rollouts streaming into the judge; None when the
        judge budget would not cover another step. restore: a checkpoint's in-flight step (its
        prompts and generated samples), sent to the judge again (the cache answers); or only the
        prompts of a step whose generation was lost, generated again."""
        if restore is None:
            self.stop_reason = budget_stop_reason(self.roles.reward_pool.total_usd, self._last_step_usd,
                                                  self.cfg.judge.budget_usd)
            if self.stop_reason:
                self.stop_reason += f"; stopped before step {step}"
                return None
        cfg = self.cfg
        # the data cursor before each step in flight (at most two), for a checkpoint that drops them
        self._sampler_before = {k: v for k, v in self._sampler_before.items() if k >= step - 1}
        self._sampler_before.setdefault(step, self.sampler.state_dict())  # not again for a regenerated step
        prompts = restore["prompts"] if restore else self.sampler.next_batch()
        ref_weight = self.reference_weight(step)
        n_policy = cfg.rollout.n - 1 if ref_weight > 0 else cfg.rollout.n
        prompt_ids = {p.uid: self.codec.prompt_ids(p) for p in prompts}
        requests = [(p.uid, i, prompt_ids[p.uid], sample_seed(cfg.trainer.seed, step, p.uid, i))
                    for p in prompts for i in range(n_policy)]
        replay = restore is not None and "samples" in restore
        inflight = InFlightStep(step, prompts, prompt_ids, ref_weight, on_scored=self.rollout_log.record, replayed=replay,
                                engine_version=self.roles.weight_version)
        by_uid = {p.uid: p for p in prompts}

        def job_for(uid: str, tok: Tokenized, key: str) -> ScoringJob:
            p = by_uid[uid]
            return ScoringJob(key, p.prompt_text, tok.story, p.target_words, len(tok.ids), tok.story_start,
                              tok.truncated)
        references = [ReferenceRow(p, self.codec.reference(p), None) for p in prompts] if ref_weight > 0 else []
        if replay:
            streams = [[ray.put(restore["samples"])]]
        else:
            streams = self.roles.start_generation(requests, self.sampling, cfg.rollout.stream_chunk)
        stream_rollouts(inflight, streams, self.codec, self.roles.reward_pool.submit, references=references,
                        job_for=job_for)
        return inflight

    def train_step(self, inflight: InFlightStep) -> dict:
        """Wait for the step's last judgment, assemble the groups, take the optimizer step."""
        cfg, step = self.cfg, inflight.step
        t_scored = inflight.wait_scored()
        order = {p.uid: k for k, p in enumerate(inflight.prompts)}  # arrival order must not matter
        policy = sorted(inflight.policy, key=lambda r: (order[r.sample.uid], r.sample.sample_index))
        references = sorted(inflight.references, key=lambda r: order[r.prompt.uid])
        scored = [r.scored.result() for r in policy]
        ref_scored = [r.scored.result() for r in references]
        group_rows = [GroupRow(r.sample.uid, r.sample.prompt_ids, r.tokens.ids, sc, False, r.sample.weight_version,
                               r.sample.logprobs) for r, sc in zip(policy, scored)]
        group_rows += [GroupRow(r.prompt.uid, inflight.prompt_ids[r.prompt.uid], r.tokens.ids, sc, True, None)
                       for r, sc in zip(references, ref_scored)]
        assembled = assemble_step(cfg, group_rows, step=step, current_version=self.roles.weight_version,
                                  reference_weight=inflight.reference_weight)
        t_train = time.perf_counter()
        train_metrics = self.roles.train(assembled.batch) if assembled.batch.rows else {}
        train_s = time.perf_counter() - t_train

        valid = [sc.reward for sc in scored if sc.valid]
        rewards = assembled.policy_rewards
        ratios = [r.length_ratio for r in valid if r.length_ratio is not None]
        generated = sum(len(r.tokens.ids) for r in policy)
        versions = [r.sample.weight_version for r in policy]
        return {
            "step": step,
            "reward/mean": statistics.fmean(rewards) if rewards else float("nan"),
            "reward/std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
            "reward/sq_mean": _mean(r.sq for r in valid),
            "reward/self_rep_mean": _mean(r.self_rep for r in valid),
            "reward/length_penalty_mean": _mean(r.length_penalty for r in valid),
            "reward/blank_frac": _mean(r.blank for r in valid),
            "reward/judge_addressed": _mean(r.judge_addressed for r in valid),
            "score/mean": _mean(r.score for r in valid),
            "length/ratio_mean": _mean(ratios),
            "length/words_mean": _mean(r.word_count for r in valid),
            "length/tokens_mean": generated / max(1, len(policy)),
            "length/truncated_frac": _mean(float(r.tokens.truncated) for r in policy),
            **self.roles.judge_metrics(step),
            "groups/dropped": assembled.groups_dropped,
            "groups/rows_trained": len(assembled.batch.rows),
            "rollout/stale_refused": assembled.stale_refused,
            "rollout/policy_lag_max": max(self.roles.weight_version - v for v in versions) if versions else 0,
            "hri/weight": inflight.reference_weight,
            "hri/ref_advantage_mean": _mean(assembled.reference_advantages),
            "weight_version": min(versions) if versions else self.roles.weight_version,
            **{f"train/{k}": v for k, v in train_metrics.items() if k != "logprob_diff"},
            "rollout/logprob_diff": train_metrics.get("logprob_diff", float("nan")),
            "time/generate": inflight.generate_s,
            "time/judge_tail": max(0.0, t_scored - inflight.generated_at),
            "time/train": train_s,
            "throughput/gen_tokens_per_s": generated / max(inflight.generate_s, 1e-9),
        }

    @staticmethod
    def phase_times(inflight: InFlightStep, metrics: dict, start: float, sync_start: float, end: float) -> dict:
        """The step's wall time (end of the previous step to the end of this one's sync) and how
        much of it each role sat idle. Engine busy time counts the generation that ran inside
        this window (with max_staleness 1 that is mostly the next step's)."""
        step_s, sync_s, train_s = end - start, end - sync_start, metrics["time/train"]
        return {
            "time/step": step_s,
            "time/sync": sync_s,
            "time/idle_learner": max(0.0, step_s - train_s - sync_s),
            "time/idle_engines": max(0.0, step_s - min(step_s, inflight.generate_s) - sync_s),
            "util/learner": train_s / step_s if step_s else 0.0,
        }

    def sample_table(self, inflight: InFlightStep) -> list[dict]:
        """A few of the step's judged stories for the W&B table: the first samples of its first prompts."""
        rows, targets = [], {p.uid: p for p in inflight.prompts}
        for row in sorted(inflight.policy, key=lambda r: (r.sample.sample_index, r.sample.uid)):
            if len(rows) == self.cfg.trainer.wandb_samples:
                break
            prompt, reward = targets[row.sample.uid], row.scored.result().reward
            rows.append({"step": inflight.step, "uid": row.sample.uid, "sample": row.sample.sample_index,
                         "target_words": prompt.target_words, "words": reward.word_count if reward else None,
                         "tokens": len(row.tokens.ids), "judge_score": reward.score if reward else None,
                         "reward": reward.scalar if reward else None, "story": row.tokens.text})
        return rows

    # --- checkpoints (actors/checkpoint.py has the layout) ---
    def recommended_sampling(self) -> dict:
        return dataclasses.asdict(self.cfg.rollout.val_sampling)

    def save_checkpoint(self, steps_done: int, in_flight: InFlightStep | None = None, updates_unsent: int = 0) -> Path:
        """Everything a resume needs to continue exactly: learner (DeepSpeed), judge cache,
        coordinator state, and a generated step in flight (max_staleness 1, or a stop that came
        while it was being judged) with its samples, so the resumed run judges (from the cache)
        and trains exactly those rows. updates_unsent: the learner is that many updates ahead of
        the engines (a stop came before the sync); the resumed run sends them as that version."""
        t0 = time.perf_counter()
        keep = in_flight if in_flight is not None and in_flight.generated else None
        next_fresh = keep.step + 1 if keep else steps_done
        partial = checkpoint.begin(self.output_dir, steps_done)
        self.roles.save_checkpoint(str(partial), tokenizer_path=self.model_path, generation=self.recommended_sampling())
        pool = self.roles.reward_pool
        if pool.cache is not None:
            pool.cache.backup(partial / checkpoint.CACHE_FILE)
        if keep:
            with open(partial / checkpoint.IN_FLIGHT_FILE, "wb") as f:
                pickle.dump({"step": keep.step, "prompts": keep.prompts,
                             "samples": [r.sample for r in keep.policy]}, f)
        checkpoint.write_state(partial, {
            "steps_done": steps_done,
            "in_flight_step": keep.step if keep else None,
            "sampler": self._sampler_before.get(next_fresh, self.sampler.state_dict()),
            "weight_version": self.roles.weight_version + updates_unsent,
            "wandb_run_id": self.tracker.run_id,
            "run_id": checkpoint.run_id(self.output_dir),
            "judge": {"total_usd": pool.total_usd, "last_step_usd": self._last_step_usd},
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state().tolist()},
            "run": checkpoint.run_identity(self.cfg),
        })
        final = checkpoint.commit(partial)
        checkpoint.prune(self.output_dir, self.cfg.trainer.keep_checkpoints)
        self._saved_at = steps_done
        print(f"checkpoint: {final} ({time.perf_counter() - t0:.1f}s)", flush=True)
        return final

    def restore(self, folder: Path) -> tuple[int, InFlightStep | None]:
        """Load a checkpoint into the running roles; returns (first step to run, restored step in flight)."""
        state = checkpoint.read_state(folder)
        self.roles.load_checkpoint(str(folder))
        self.roles.push_weights(state["weight_version"], restoring=True)
        self.sampler.load_state_dict(state["sampler"])
        self.roles.reward_pool.total_usd = state["judge"]["total_usd"]
        self._last_step_usd = state["judge"]["last_step_usd"]
        version, internal, gauss = state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        self._saved_at = state["steps_done"]
        restored = None
        if state["in_flight_step"] is not None:
            with open(folder / checkpoint.IN_FLIGHT_FILE, "rb") as f:
                saved = pickle.load(f)
            restored = self.launch(saved["step"], restore=saved)
        return state["steps_done"], restored

    def export(self) -> Path:
        path = self.output_dir / "hf_model"
        self.roles.save_hf(str(path), self.model_path, generation=self.recommended_sampling())
        return path


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


@contextlib.contextmanager
def stop_on_signals(coordinator):
    """SIGTERM (`ray job stop`) or Ctrl-C: checkpoint, then exit; a second one exits at once."""
    def request_stop(signum, _frame):
        if coordinator.stop_requested:
            raise KeyboardInterrupt
        coordinator.stop_requested = signal.Signals(signum).name
        print(f"{coordinator.stop_requested}: writing a checkpoint, then stopping (again: stop now)", flush=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
