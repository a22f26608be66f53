"""The launcher refuses bad input with one line naming the culprit, in seconds, before any model,
engine, Ray or judge is started; and it accepts the original POLARIS training files."""
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_launch(args, tmp_path, env_extra=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "GEMINI_API_KEY"}
    env.update({"POLARIS_CACHE": str(tmp_path / "cache"), **(env_extra or {})})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def assert_one_error(stderr, words):
    """One message (a data error may list every bad row under it), no traceback."""
    assert stderr.startswith("error: ") and stderr.count("error: ") == 1, stderr
    assert "Traceback" not in stderr, stderr
    for word in words:
        assert word in stderr, stderr


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_row(i, **changes):
    row = {"uid": f"u{i}", "prompt": "Write a story about a fox. The story should be approximately 90 words long.",
           "target_word_count": 90, "story": "A fox ran.", "ground_truth_reasoning": "Plan: fox."}
    row.update(changes)
    return row


def bad_data_cases(tmp, polaris_files):
    no_story = good_row(1)
    del no_story["story"]
    missing_prompt = good_row(1)
    del missing_prompt["prompt"]
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin1.jsonl").write_bytes(json.dumps(good_row(0)).encode() + b"\n" + b'{"uid": "caf\xe9"}\n')
    whole = polaris_files.training_parquet.read_bytes()
    (tmp / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    return [
        ("empty file", tmp / "empty.jsonl", ["empty.jsonl"]),
        ("duplicate uid", write_jsonl(tmp / "dup.jsonl", [good_row(0), good_row(0)]), ["dup.jsonl", "uid", "u0"]),
        ("missing prompt", write_jsonl(tmp / "noprompt.jsonl", [good_row(0), missing_prompt]), ["noprompt.jsonl", "row 1", "prompt"]),
        ("zero target", write_jsonl(tmp / "zero.jsonl", [good_row(0, target_word_count=0)]), ["zero.jsonl", "row 0", "target_word_count"]),
        ("fractional target", write_jsonl(tmp / "frac.jsonl", [good_row(0, target_word_count=12.5)]), ["frac.jsonl", "target_word_count"]),
        ("no reference with HRI", write_jsonl(tmp / "nostory.jsonl", [good_row(0), no_story]), ["nostory.jsonl", "row 1", "story"]),
        ("non-UTF-8 bytes", tmp / "latin1.jsonl", ["latin1.jsonl", "UTF-8"]),
        ("truncated parquet", tmp / "truncated.parquet", ["truncated.parquet"]),
        ("missing file", tmp / "absent.jsonl", ["absent.jsonl"]),
        ("no target anywhere", write_jsonl(tmp / "notarget.jsonl", [good_row(0, prompt="Write a story.", target_word_count=None)]),
         ["notarget.jsonl", "row 0", "target"]),
        ("fewer prompts than a step", write_jsonl(tmp / "few.jsonl", [good_row(i) for i in range(7)]),
         ["few.jsonl", "7 prompt(s)", "data.prompts_per_step=8"]),
    ]


CONFIG_AND_ENVIRONMENT = [  # (name, args, environment, words the one message must contain)
    ("unknown key", ["trainer.totl_steps=3"], {}, ["trainer.totl_steps", "did you mean 'total_steps'"]),
    ("wrong type", ["trainer.total_steps=many"], {}, ["trainer.total_steps"]),
    ("out of range", ["learner.lr=-1"], {}, ["learner.lr"]),
    ("rollout.n too small", ["rollout.n=2"], {}, ["rollout.n"]),
    ("unknown conf name", ["conf=nosuch"], {}, ["nosuch", "tiny"]),
    ("gemini without an API key", ["judge.backend=gemini"], {}, ["GEMINI_API_KEY"]),
    ("cuda without a GPU", ["trainer.device=cuda"], {}, ["trainer.device=cuda", "no GPU"]),
    ("nccl on CPU", ["weight_sync.backend=nccl"], {}, ["weight_sync.backend", "nccl needs trainer.device=cuda"]),
    ("held-out prompts missing", ["eval.prompts_path=data/nosuch/test.parquet"], {},
     ["eval.prompts_path=data/nosuch/test.parquet", "trainer.eval_every"]),
    ("judge unreachable at start", ["judge.backend=openai", "judge.base_url=http://127.0.0.1:9/v1"],
     {"OPENAI_API_KEY": "sk-test"}, ["judge preflight", "cannot reach", "127.0.0.1:9"]),
]


def bad_input_cases(tmp, polaris_files):
    data = [(name, [f"data.train_path={path}"], {}, words) for name, path, words in bad_data_cases(tmp, polaris_files)]
    return data + CONFIG_AND_ENVIRONMENT


@pytest.mark.parametrize("case", range(21))
def test_bad_input_is_refused_with_one_line_before_anything_starts(case, tmp_path, polaris_files):
    """The catalogue: dataset, config and environment. Each exits 2 in seconds with one line naming
    the culprit; no model is built (the model cache stays empty), no actor, no judge call is made."""
    cases = bad_input_cases(tmp_path, polaris_files)
    assert len(cases) == 21  # the parametrization covers every case
    name, args, env, words = cases[case]
    proc, elapsed = run_launch([*args, f"trainer.output_dir={tmp_path / 'out'}"], tmp_path, env_extra=env)
    assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
    assert_one_error(proc.stderr, words)
    assert elapsed < 30, f"{name}: took {elapsed:.1f}s"
    assert not (tmp_path / "cache").exists(), f"{name}: the model was built before the input was refused"
    assert not (tmp_path / "out").exists()


def test_original_polaris_training_files_validate_and_load(tmp_path, polaris_files):
    proc, _ = run_launch(["mode=check", f"data.train_path={polaris_files.training_parquet}",
                          f"eval.prompts_path={polaris_files.validation_parquet}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "8 training prompts" in proc.stdout and "2 evaluation prompts" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_training_steps_write_metrics_config_and_a_loadable_policy(engine, tmp_path, ray_address, tiny_model_path,
                                                                       quick_run):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    env = {"RAY_ADDRESS": ray_address, "POLARIS_CACHE": str(Path(tiny_model_path).parent), "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "trainer.total_steps=2", f"rollout.engine={engine}",
                           f"trainer.output_dir={out}", "trainer.progress_bar=false", *quick_run.args],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        for key in ("reward/mean", "reward/std", "length/ratio_mean", "judge/failed", "weight_version",
                    "time/step", "time/generate", "time/judge_tail", "time/train", "time/sync"):
            assert math.isfinite(r[key]), (key, r[key])
        assert r["time/step"] >= r["time/generate"] + r["time/train"]
        assert r["rollout/logprob_diff"] < 1e-3  # engine and learner agree on the sampled tokens
    assert [r["weight_version"] for r in rows] == [0, 1]  # step 1 sampled from the broadcast weights
    assert rows[0]["hri/weight"] == 0.0 and rows[1]["hri/weight"] == pytest.approx(0.4 / 15)

    saved = OmegaConf.load(out / "config.yaml")
    assert saved.trainer.total_steps == 2 and saved.model.path == "tiny" and saved.rollout.engine == engine

    model = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf_model")
    assert (out / "hf_model" / "model.safetensors").exists()
    assert model.config.vocab_size >= len(tokenizer)
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run files"


def test_polaris_check_prints_the_memory_plan_and_refuses_one_that_cannot_fit(tmp_path, polaris_files):
    data = [f"data.train_path={polaris_files.training_parquet}",
            "eval.prompts_path=data/synthetic/test.jsonl"]  # the periodic validation's prompts are checked too
    key = {"GEMINI_API_KEY": "not-a-real-key"}
    proc, _ = run_launch(["conf=polaris", "mode=check", *data], tmp_path, key)
    assert "memory plan" in proc.stdout and "learner rank" in proc.stdout and "rollout engine" in proc.stdout
    assert proc.stdout.count(": fits") == 2
    [sync] = [line for line in proc.stdout.splitlines() if line.startswith("plan: weight sync")]
    assert sync == ("plan: weight sync (GiB): learner rank 0 3.79 in 2 send buffers + 1.89 gathered parameter; "
                    "every engine worker 3.79 in 2 receive buffers + 0.41 for the layer being reloaded")
    [kernels] = [line for line in proc.stdout.splitlines() if line.startswith("kernels: ")]
    assert "linear_attention -> chunk_gated_delta_rule=" in kernels and "full_attention -> sdpa" in kernels
    assert "learner: optimizer cpu_adam (learner.optimizer=auto)" in proc.stdout
    if proc.returncode:  # on a machine without the run's GPU, the device check comes after the plan
        assert_one_error(proc.stderr, ["no GPU is visible"])
    proc, _ = run_launch(["conf=polaris", "mode=check", "learner.offload_optimizer=false", *data], tmp_path, key)
    assert proc.returncode == 2
    assert_one_error(proc.stderr, ["memory plan does not fit", "learner rank", "88.78", "learner.offload_optimizer"])


def test_checks_import_none_of_the_heavy_stack():
    code = ("import sys, launch; from conf import load_config; launch.check_inputs(load_config([])); "
            "print(sorted(m for m in ('ray', 'deepspeed', 'vllm', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def launch_run(args, env, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "trainer.progress_bar=false", *args],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_faulty_judge_run_completes_and_its_repeat_pays_only_for_what_failed(tmp_path, ray_address, tiny_model_path,
                                                                              quick_run):
    """30% mixed judge faults (429, 503, hangs, truncated and schema-violating JSON), two attempts
    per story: every story is judged or counted invalid, no invalid one is trained on, and the
    same step run again from the same judge cache pays only for the stories that failed."""
    env = {"RAY_ADDRESS": ray_address, "POLARIS_CACHE": str(Path(tiny_model_path).parent)}
    stories = quick_run.stories  # step 0 has no reference row yet
    common = [*quick_run.one_engine_args, "trainer.total_steps=1", f"judge.cache_path={tmp_path / 'judge_cache.sqlite'}",
              "judge.local.rpm_limit=600", "judge.timeout_s=3"]
    # asked for 2 steps under a budget that step 0 (about $0.02 at the loopback's token counts) leaves
    # too little of for a second: the run stops cleanly before step 1 and still saves the policy
    faulty = launch_run([*common, f"trainer.output_dir={tmp_path / 'faulty'}", "judge.local.fault_rate=0.3",
                         "judge.max_attempts=2", "trainer.total_steps=2", "judge.budget_usd=0.03"], env)
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert "0 rate-limit violations" in faulty.stdout
    assert "judge.budget_usd=$0.03" in faulty.stdout and "stopped before step 1" in faulty.stdout
    assert (tmp_path / "faulty" / "hf_model" / "model.safetensors").exists()
    (m,) = [json.loads(line) for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert m["judge/stories"] == stories and m["judge/retries"] > 0
    assert m["judge/requests"] == m["judge/stories"] + m["judge/retries"]
    assert m["groups/dropped"] == 0 and m["groups/rows_trained"] == stories - m["judge/failed"]  # invalid: not trained
    assert m["judge/spend_usd"] > 0
    # every story is in rollouts/ with its judgment: the failed ones without a reward
    logged = [json.loads(line) for line in (tmp_path / "faulty" / "rollouts" / "step_000000.jsonl").open()]
    assert len(logged) == stories and len({s["key"] for s in logged}) == stories
    failed = [s for s in logged if not s["valid"]]
    assert len(failed) == m["judge/failed"] and all(s["reward"] is None and s["judge_error"] for s in failed)
    judged = [s for s in logged if s["valid"]]
    assert all(s["judgment"] and math.isfinite(s["reward"]["score"]) and s["response"] for s in judged)
    assert sum(s["judge_attempts"] for s in logged) == m["judge/requests"]

    repeat = launch_run([*common, f"trainer.output_dir={tmp_path / 'repeat'}"], env)
    assert repeat.returncode == 0, repeat.stderr[-3000:]
    (r,) = [json.loads(line) for line in (tmp_path / "repeat" / "metrics.jsonl").read_text().splitlines()]
    assert r["judge/cache_hits"] == stories - m["judge/failed"]  # the same stories: every judged one is a hit
    assert r["judge/requests"] == m["judge/failed"] and r["judge/failed"] == 0
    assert r["judge/cache_hit_rate"] == pytest.approx(r["judge/cache_hits"] / stories)
    if m["judge/failed"] == 0:
        assert r["judge/spend_usd"] == 0


@pytest.mark.slow
def test_a_run_against_a_judge_that_sheds_load_judges_every_story_or_counts_it_invalid(tmp_path, ray_address,
                                                                                       tiny_model_path, quick_run):
    """The loopback judge with capacity for 2 stories at a time and then 1, shedding (429/503) at
    1.5x that: the adaptive window shrinks to it, shed stories are retried, and the run completes."""
    env = {"RAY_ADDRESS": ray_address, "POLARIS_CACHE": str(Path(tiny_model_path).parent)}
    proc = launch_run([*quick_run.one_engine_args, "trainer.total_steps=1", f"trainer.output_dir={tmp_path}",
                       "judge.cache=false", "judge.local.capacity=[2,1]", "judge.local.capacity_step_s=3",
                       "judge.local.latency_min_s=0.2", "judge.local.latency_max_s=0.3", "judge.backoff_s=0.2",
                       "judge.initial_in_flight=8"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shed = int(re.search(r"(\d+) shed for want of capacity", proc.stdout).group(1))
    assert shed > 0 and "0 rate-limit violations" in proc.stdout
    (m,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert m["judge/stories"] == quick_run.stories, "every story judged or counted invalid"
    assert m["judge/retries"] >= 1 and m["judge/requests"] == m["judge/stories"] + m["judge/retries"]
    assert m["groups/rows_trained"] == quick_run.stories - m["judge/failed"]
    assert 1 <= m["judge/window"] < 8, "the window came down from its start towards the capacity"
    assert 0 < m["judge/shed_rate"] < 1 and m["judge/goodput_per_s"] > 0


@pytest.mark.slow
def test_one_step_off_policy_overlap_trains_rows_one_update_old(tmp_path, ray_address, tiny_model_path, quick_run):
    """max_staleness=1: step k+1 generates before step k's update, so from step 1 on every policy
    row is one update old and the learner weighs it by the truncated importance ratio."""
    env = {"RAY_ADDRESS": ray_address, "POLARIS_CACHE": str(Path(tiny_model_path).parent)}
    out = tmp_path / "overlap"
    proc = launch_run([*quick_run.one_engine_args, "trainer.total_steps=3", "rollout.max_staleness=1",
                       f"trainer.output_dir={out}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["rollout/policy_lag_max"] for r in rows] == [0, 1, 1]
    assert [r["weight_version"] for r in rows] == [0, 0, 1]  # sampled before the update it trains after
    assert all(r["rollout/stale_refused"] == 0 for r in rows)
    assert rows[0]["train/tis_ratio_max"] == 1.0 and rows[0]["train/tis_clipped_fraction"] == 0.0
    assert all(r["train/tis_ratio_max"] != 1.0 for r in rows[1:])  # one update old: corrected
    assert all(0 <= r["train/tis_clipped_fraction"] <= 1 for r in rows)
    assert all(r["time/judge_tail"] >= 0 and r["time/step"] > 0 for r in rows)
    assert "step    2 |" in proc.stdout  # the one-line step summary
    for r in rows:  # step k+1 was judged while step k trained: each step's judge metrics are its own stories'
        stories = [json.loads(line) for line in (out / "rollouts" / f"step_{r['step']:06d}.jsonl").open()]
        assert r["judge/stories"] == len(stories) == quick_run.stories
        assert r["judge/input_tokens"] == sum(s["judge_input_tokens"] for s in stories)
        assert r["judge/output_tokens"] == sum(s["judge_output_tokens"] for s in stories)
        assert 0 < r["judge/thought_tokens"] == sum(s["judge_thought_tokens"] for s in stories) < r["judge/output_tokens"]
