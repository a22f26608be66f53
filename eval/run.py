"""Evaluation by requested length: one story per held-out prompt, generated with the validation
sampling through the rollout engines, judged, scored with the evaluation rubric (min(100, P - N + B)),
summarized by bucket (eval/metrics.py) and reported (eval/report.py). Two entry points:

  python launch.py conf=NAME mode=eval eval.checkpoint=HF_FOLDER [eval.compare=HF_FOLDER2]
      engines serve each folder in turn; the judge is eval.judge (GPT-5.4 by default)
  trainer.eval_every=N during training: PeriodicValidation, after every N-th step's weight sync,
      on a fixed subset of the same prompts, through the run's engines and judge pool

Every story of a prompt is sampled with the same seed for every checkpoint (sample_seed with
step EVAL_STEP), so two checkpoints differ by their weights only.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from tqdm import tqdm

from actors.codec import sample_seed
from actors.data import PromptRecord
from actors.engine import SamplingParams
from conf.errors import CheckpointError
from eval.metrics import (
    EvalRecord,
    EvalSummary,
    bucket_edges,
    bucket_of,
    length_score,
    summarize,
)
from reward import rubric
from reward.components import RewardParams, score_response, word_count
from reward.spend import dollars
from reward.worker import ScoringJob

EVAL_STEP = -1


@dataclass(frozen=True)
class EvalStory:
    checkpoint: str
    uid: str
    target_words: int
    bucket: int | None
    prompt: str
    response: str
    words: int
    tokens: int
    truncated: bool
    quality: float | None  # None: the judgment failed after its retries
    length_ratio: float
    length_score: float
    judgment: dict | None  # {"scores": ..., "evidence": ...}
    judge_error: str | None
    input_tokens: int
    output_tokens: int
    reward: float | None = None  # the periodic validation's story scalar (reward.val_weights)

    def record(self) -> EvalRecord:
        return EvalRecord(self.uid, self.target_words, self.words, self.quality, self.length_score)


def generate_and_judge(roles, codec, prompts: list[PromptRecord], cfg, *, label: str, submit, progress: bool,
                       reward_params: RewardParams | None = None) -> list[EvalStory]:
    """One story per prompt; each goes to the judge as its engine returns it.
    submit(job) -> Future[ScoredSample]. reward_params: also score each judged story's reward
    scalar with them (the training rubric score as sq)."""
    scale, edges = cfg.eval.length_scale, bucket_edges(cfg.eval.length_scale)
    requests = [(p.uid, 0, codec.prompt_ids(p), sample_seed(cfg.trainer.seed, EVAL_STEP, p.uid, 0)) for p in prompts]
    by_uid = {p.uid: p for p in prompts}
    bar = tqdm(total=2 * len(prompts), desc=f"eval {label}", unit="story", disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str("generating")
    pending: dict[concurrent.futures.Future, tuple] = {}
    for stream in roles.start_generation(requests, SamplingParams.from_config(cfg.rollout.val_sampling), cfg.rollout.stream_chunk):
        for ref in stream:
            for sample in ray.get(ref):
                tok = codec.response(sample.response_ids, sample.finish_reason)
                p = by_uid[sample.uid]
                job = ScoringJob(f"{p.uid}/eval", p.prompt_text, tok.story, p.target_words, len(tok.ids),
                                 tok.story_start, tok.truncated)
                pending[submit(job)] = (p, tok)
                bar.update(1)
    bar.set_postfix_str("judging")
    stories = {}
    for future in concurrent.futures.as_completed(pending):
        p, tok = pending[future]
        scored = future.result()
        words = word_count(tok.story)
        j = scored.judgment
        reward = None
        if j is not None and reward_params is not None:
            reward = score_response(rubric.overall_score(j) / 100.0, tok.story, p.target_words, len(tok.ids),
                                    tok.story_start, tok.truncated, reward_params).scalar
        stories[p.uid] = EvalStory(
            checkpoint=label, uid=p.uid, target_words=p.target_words,
            bucket=bucket_of(p.target_words, edges), prompt=p.prompt_text, response=tok.text,
            words=words, tokens=len(tok.ids), truncated=tok.truncated,
            quality=rubric.overall_score(j, evaluation=True) if j is not None else None,
            length_ratio=words / p.target_words, length_score=length_score(words, p.target_words, scale),
            judgment={"scores": j.scores, "evidence": j.evidence} if j is not None else None,
            judge_error=scored.judge_error, input_tokens=scored.input_tokens, output_tokens=scored.output_tokens,
            reward=reward)
        bar.update(1)
    bar.close()
    return [stories[p.uid] for p in prompts]


def validation_subset(prompts: list[PromptRecord], size: int, scale: float) -> list[PromptRecord]:
    """A fixed subset spread over the buckets: round-robin over the buckets, prompts in uid order."""
    edges = bucket_edges(scale)
    buckets: list[list[PromptRecord]] = [[] for _ in range(len(edges) - 1)]
    for p in sorted(prompts, key=lambda p: p.uid):
        b = bucket_of(p.target_words, edges)
        if b is not None:
            buckets[b].append(p)
    chosen: list[PromptRecord] = []
    while len(chosen) < size and any(buckets):
        for bucket in buckets:
            if bucket and len(chosen) < size:
                chosen.append(bucket.pop(0))
    return chosen


class PeriodicValidation:
    """trainer.eval_every: after a step's weight sync (the engines are idle then, in both schedules),
    the subset's stories from the current policy, judged by the run's pool (its spend goes into the
    run's total, not the step's). Each row has the quality table and the mean reward scalar under
    reward.val_weights (reward/mean). Rows go to validation.jsonl, stories to validation/step_N.jsonl,
    never to metrics.jsonl."""

    def __init__(self, cfg, roles, codec, prompts: list[PromptRecord], output_dir: Path, tracker):
        self.cfg, self.roles, self.codec, self.tracker = cfg, roles, codec, tracker
        self.prompts = validation_subset(prompts, cfg.eval.subset_size, cfg.eval.length_scale)
        self.output_dir = output_dir

    def due(self, steps_done: int) -> bool:
        every = self.cfg.trainer.eval_every
        return bool(every and self.prompts and steps_done % every == 0)

    def run(self, step: int) -> EvalSummary:
        t0 = time.perf_counter()
        stories = generate_and_judge(self.roles, self.codec, self.prompts, self.cfg, label=f"step {step}",
                                     submit=lambda job: self.roles.reward_pool.submit(job, per_step=False),
                                     progress=False,
                                     reward_params=RewardParams.from_config(self.cfg.reward, validation=True))
        rewards = [s.reward for s in stories if s.reward is not None]
        summary = summarize([s.record() for s in stories], bucket_edges(self.cfg.eval.length_scale))
        pool = self.roles.reward_pool
        usd = sum(dollars(s.input_tokens, s.output_tokens, pool.prices, flex=pool.flex) for s in stories)
        folder = self.output_dir / "validation"
        folder.mkdir(exist_ok=True)
        with open(folder / f"step_{step:06d}.jsonl", "w") as f:
            for s in stories:
                f.write(json.dumps(asdict(s)) + "\n")
        row = {"step": step, "weight_version": self.roles.weight_version, **summary.flat(),
               "reward/mean": statistics.fmean(rewards) if rewards else math.nan,
               "judge_spend_usd": usd, "time_s": time.perf_counter() - t0}
        self.tracker.log_validation(row)
        return summary


def checkpoint_folders(cfg) -> dict[str, str]:
    """{label: folder} for eval.checkpoint and eval.compare; a folder that is not an exported
    Hugging Face model is refused here, before anything starts."""
    folders: dict[str, str] = {}
    for key in ("checkpoint", "compare"):
        path = getattr(cfg.eval, key)
        if not path:
            continue
        folder = Path(path)
        if (folder / "state.json").is_file() or (folder / "learner").is_dir():
            raise CheckpointError(f"eval.{key}={path} is a training checkpoint; export it first "
                                  f"(python -m learner.export {path} OUT) and give eval.{key}=OUT")
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"eval.{key}={path}: no Hugging Face model there (no config.json)")
        label = folder.resolve().name
        if label == "hf_model":  # a run's end-of-training export: name it after the run
            label = f"{folder.resolve().parent.name}/hf_model"
        while label in folders:
            label += "'"
        folders[label] = str(folder)
    return folders


def evaluate(cfg) -> Path:
    """mode=eval: each folder in turn on fresh engines, one reward pool on eval.judge per folder
    (its cache file is shared), then one report for all of them. Returns the report's folder."""
    from actors.data import filter_long_prompts, load_prompts
    from conf.loader import resolve_path

    folders = checkpoint_folders(cfg)  # refuses a training checkpoint or an empty folder before the heavy imports
    prompts = load_prompts(resolve_path(cfg.eval.prompts_path), require_reference=False)
    from transformers import AutoTokenizer

    from actors.checkpoint import run_name
    from actors.codec import ChatCodec
    from cluster.connect import connect_ray
    from cluster.judge_pool import judge_settings
    from cluster.roles import start_eval_roles
    from eval.report import write_report
    from reward.judge_client import preflight
    from reward.judge_server import judge_endpoint

    out = Path(cfg.trainer.output_dir) / "eval" / "_vs_".join(label.replace("/", "_") for label in folders)
    results: dict[str, list[EvalStory]] = {}
    spend_usd = 0.0
    with judge_endpoint(cfg.eval.judge) as (url, _):
        preflight(judge_settings(cfg.eval.judge, url, evaluation=True))  # a missing key or dead judge: refused here
        out.mkdir(parents=True, exist_ok=True)
        name = run_name(cfg.trainer.output_dir, None)
        connect_ray(cfg)
        for k, (label, folder) in enumerate(folders.items()):
            codec = ChatCodec(AutoTokenizer.from_pretrained(folder), enable_thinking=cfg.model.enable_thinking,
                              max_new_tokens=cfg.rollout.val_sampling.max_new_tokens)
            kept, too_long = filter_long_prompts(prompts, lambda r: len(codec.prompt_ids(r)), cfg.data.max_prompt_tokens)
            print(f"eval {label}: {len(kept)} prompts ({too_long} over {cfg.data.max_prompt_tokens} tokens dropped)")
            roles = start_eval_roles(cfg, model_path=folder, stop_token_ids=codec.stop_ids,
                                     pad_token_id=codec.tok.pad_token_id, judge_base_url=url,
                                     run_name=f"{name}-eval-{k}",
                                     output_dir=str(Path(cfg.trainer.output_dir)))
            try:
                results[label] = generate_and_judge(roles, codec, kept, cfg, label=label,
                                                    submit=roles.reward_pool.submit, progress=cfg.trainer.progress_bar)
                spend_usd += roles.reward_pool.total_usd
            finally:
                roles.shutdown()
    write_report(out, results, cfg)
    print(f"eval: judge spend ${spend_usd:.4f}")
    return out
