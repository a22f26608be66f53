"""The step loop (DESIGN.md section 3): prompts -> rollouts -> judge -> groups -> update -> weights."""
from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from actors.data import PromptRecord, PromptSampler
from actors.engine import SamplingParams
from actors.groups import GroupRow, assemble_batch
from actors.tracking import Tracker
from cluster.roles import Roles
from conf.schema import Config
from learner.grpo import reference_weight
from reward.spend import budget_stop_reason
from reward.worker import ScoringJob


@dataclass(frozen=True)
class Tokenized:
    """One response as the reward and the learner need it."""

    ids: tuple[int, ...]
    text: str  # decoded, the stop token removed, <think> markers kept
    story_start: int
    truncated: bool


class ChatCodec:
    """Chat template + tokenizer conventions shared by prompts, rollouts and reference rows."""

    def __init__(self, tokenizer, *, enable_thinking: bool, max_new_tokens: int):
        self.tok = tokenizer
        self.enable_thinking = enable_thinking
        self.max_new_tokens = max_new_tokens
        self.stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                tokenizer.convert_tokens_to_ids("<|endoftext|>")} - {None, tokenizer.unk_token_id})
        self.think_end = tokenizer.convert_tokens_to_ids("</think>")

    def prompt_ids(self, record: PromptRecord) -> tuple[int, ...]:
        text = self.tok.apply_chat_template(list(record.messages), tokenize=False, add_generation_prompt=True,
                                            enable_thinking=self.enable_thinking)
        return tuple(self.tok.encode(text, add_special_tokens=False))

    def response(self, ids: tuple[int, ...], finish_reason: str) -> Tokenized:
        body = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        if self.think_end in body:
            story_start = body.index(self.think_end) + 1
        else:  # never closed its thinking: all of it is thinking (split_thinking agrees)
            story_start = len(ids) if self.enable_thinking else 0
        return Tokenized(ids, self.tok.decode(body, skip_special_tokens=False), story_start, finish_reason == "length")

    def reference(self, record: PromptRecord) -> Tokenized:
        """The human reference as a response: <think>reasoning</think> story <eos>, truncated."""
        text = f"<think>\n{record.reasoning}\n</think>\n\n{record.story}" if self.enable_thinking else record.story
        ids = tuple(self.tok.encode(text, add_special_tokens=False)) + (self.stop_ids[0],)
        truncated = len(ids) > self.max_new_tokens
        return self.response(ids[:self.max_new_tokens], "length" if truncated else "stop")


def sample_seed(seed: int, step: int, uid: str, index: int) -> int:
    """Depends only on (run seed, step, prompt, sample index), not on which engine serves it."""
    digest = hashlib.sha256(f"{seed}/{step}/{uid}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Coordinator:
    def __init__(self, cfg: Config, roles: Roles, codec: ChatCodec, sampler: PromptSampler, tracker: Tracker,
                 output_dir: Path):
        self.cfg, self.roles, self.codec, self.sampler, self.tracker = cfg, roles, codec, sampler, tracker
        self.output_dir = output_dir
        s = cfg.rollout.sampling
        self.sampling = SamplingParams(s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_new_tokens)

    def run(self, start_step: int = 0) -> str | None:
        """Train to trainer.total_steps; returns why it stopped early (the judge budget), or None."""
        last_step_usd = 0.0
        for step in range(start_step, self.cfg.trainer.total_steps):
            reason = budget_stop_reason(self.roles.reward_pool.total_usd, last_step_usd, self.cfg.judge.budget_usd)
            if reason:
                return f"{reason}; stopped before step {step}"
            metrics = self.train_step(step)
            last_step_usd = metrics["judge/spend_usd"]
            self.tracker.log_step(metrics)
        return None

    def reference_weight(self, step: int) -> float:
        h = self.cfg.algorithm.hri
        if not h.enable:
            return 0.0
        return reference_weight(step, peak=h.peak_weight, warmup_steps=h.warmup_steps, decay_steps=h.decay_steps,
                                final_weight=h.final_weight)

    def train_step(self, step: int) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        prompts = self.sampler.next_batch()
        ref_weight = self.reference_weight(step)
        n_policy = cfg.rollout.n - 1 if ref_weight > 0 else cfg.rollout.n
        prompt_ids = {p.uid: self.codec.prompt_ids(p) for p in prompts}
        requests = [(p.uid, i, prompt_ids[p.uid], sample_seed(cfg.trainer.seed, step, p.uid, i))
                    for p in prompts for i in range(n_policy)]
        samples = self.roles.generate(requests, self.sampling)
        t_gen = time.perf_counter()

        # policy rows, then (HRI) one reference row per prompt: all judged by the same reward
        by_uid = {p.uid: p for p in prompts}
        responses = [self.codec.response(s.response_ids, s.finish_reason) for s in samples]
        references = [self.codec.reference(p) for p in prompts] if ref_weight > 0 else []
        owners = [s.uid for s in samples] + [p.uid for p in prompts if references]
        jobs = [ScoringJob(f"{uid}/{k}", by_uid[uid].prompt_text, tok.text, by_uid[uid].target_words, len(tok.ids),
                           tok.story_start, tok.truncated)
                for k, (uid, tok) in enumerate(zip(owners, responses + references))]
        scored = self.roles.score(jobs)
        t_judge = time.perf_counter()

        group_rows = [GroupRow(s.uid, s.prompt_ids, tok.ids, sc, False, s.weight_version, s.logprobs)
                      for s, tok, sc in zip(samples, responses, scored)]
        group_rows += [GroupRow(p.uid, prompt_ids[p.uid], tok.ids, sc, True, None)
                       for p, tok, sc in zip(prompts, references, scored[len(samples):])]
        assembled = assemble_batch(group_rows, step=step, current_version=self.roles.weight_version,
                                   max_staleness=cfg.rollout.max_staleness, reference_weight=ref_weight,
                                   eps=cfg.algorithm.adv_eps)
        train_metrics = self.roles.train(assembled.batch) if assembled.batch.rows else {}
        t_train = time.perf_counter()
        rollout_version = self.roles.weight_version
        if assembled.batch.rows:
            self.roles.sync_weights()
        t_sync = time.perf_counter()

        policy = list(zip(responses, scored))
        valid = [sc.reward for _, sc in policy if sc.valid]
        rewards = assembled.policy_rewards
        ratios = [r.length_ratio for r in valid if r.length_ratio is not None]
        generated = sum(len(tok.ids) for tok, _ in policy)
        return {
            "step": step,
            "reward/mean": statistics.fmean(rewards) if rewards else float("nan"),
            "reward/std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
            "reward/sq_mean": _mean(r.sq for r in valid),
            "reward/self_rep_mean": _mean(r.self_rep for r in valid),
            "reward/length_penalty_mean": _mean(r.length_penalty for r in valid),
            "reward/blank_frac": _mean(r.blank for r in valid),
            "score/mean": _mean(r.score for r in valid),
            "length/ratio_mean": _mean(ratios),
            "length/words_mean": _mean(r.word_count for r in valid),
            "length/tokens_mean": generated / max(1, len(policy)),
            "length/truncated_frac": _mean(float(tok.truncated) for tok, _ in policy),
            **self.roles.judge_metrics(),
            "groups/dropped": assembled.groups_dropped,
            "groups/rows_trained": len(assembled.batch.rows),
            "rollout/stale_refused": assembled.stale_refused,
            "hri/weight": ref_weight,
            "hri/ref_advantage_mean": _mean(assembled.reference_advantages),
            "weight_version": rollout_version,
            **{f"train/{k}": v for k, v in train_metrics.items() if k != "logprob_diff"},
            "rollout/logprob_diff": train_metrics.get("logprob_diff", float("nan")),
            "time/step": t_sync - t0,
            "time/generate": t_gen - t0,
            "time/judge": t_judge - t_gen,
            "time/train": t_train - t_judge,
            "time/sync": t_sync - t_train,
            "throughput/gen_tokens_per_s": generated / max(t_gen - t0, 1e-9),
        }

    def export(self, tokenizer_path: str) -> Path:
        path = self.output_dir / "hf_model"
        self.roles.save_hf(str(path), tokenizer_path)
        return path


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")
