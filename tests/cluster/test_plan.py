"""The run planner: its prediction of the published POLARIS run, refusals, the CLI's last line,
scaling, and the predicted phase times beside the measured ones. No Ray, no torch."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.plan import (
    assumptions_from_gpu_check,
    assumptions_from_judge_check,
    gpu_check_figures,
    plan_for,
    run_prediction,
)
from cluster.plan_inputs import Assumptions, gpu_spec, with_overrides
from cluster.plan_model import PHASES, answer_tokens, judge_tail_s, plan_metrics
from conf import load_config
from conf.errors import ConfigError, EnvironmentSetupError
from reward.rubric import DIMENSIONS

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"^plan: layout=(separate|colocated) gpus=(\d+) run_hours=(\d+\.\d) compute_usd=(\d+) "
                       r"judge_usd=(\d+) bottleneck=(generate|judge|train|sync)$")


@pytest.fixture(scope="module")
def published():
    """The published run: conf=polaris on 4 x A100 80GB, training and generation on the same GPUs."""
    cfg = load_config(["conf=polaris"])
    assert (cfg.trainer.total_steps, cfg.data.prompts_per_step, cfg.rollout.n) == (160, 8, 6)
    assert cfg.rollout.sampling.max_new_tokens == 8192 and cfg.model.path == "Qwen/Qwen3.5-9B"
    assert (cfg.judge.model, cfg.judge.service_tier) == ("gemini-3-flash-preview", "flex")
    return plan_for(cfg, "a100-80gb", 4, "colocated", Assumptions())


def test_published_run_colocated_on_four_a100s_is_predicted_within_30_percent_of_48_hours(published):
    assert (published.layout.engines, published.layout.learners, published.layout.gpus) == (4, 4, 4)
    assert 0.7 * 48 <= published.run_hours <= 1.3 * 48


@pytest.mark.xfail(strict=True, reason="with the default assumptions (1,500 judge thought tokens per judgment, "
                   "cluster/plan_inputs.py) the planner predicts ~$36 of judge spend, 40% under the published ~$60; "
                   "the defaults are not tuned to close the gap; bench/judge_check.py measures the figure with a judge "
                   "API key (docs/design.md#the-run-planner)")
def test_published_run_judge_spend_is_predicted_within_30_percent_of_60_usd(published):
    assert 0.7 * 60 <= published.judge_usd <= 1.3 * 60


def test_published_run_waits_on_the_flex_judge_for_its_slowest_of_48_judgments(published):
    # 48 judgments sent together (<= judge.max_in_flight 64), latencies uniform over 60-900 s
    assert published.judge_call.usd > 0 and published.workload.rows == 48
    assert published.step.judge_tail_s == pytest.approx(60 + 840 * 48 / 49)
    assert published.step.bottleneck == "judge"


def test_the_slowest_judgment_goes_in_waves_beyond_max_in_flight_and_paced_by_rpm():
    cfg = load_config(["conf=polaris", "judge.max_in_flight=16"])
    a = Assumptions(flex_latency_min_s=0, flex_latency_max_s=100)
    # three waves of 16: two at the mean latency, then the slowest of 16
    assert judge_tail_s(cfg, a, calls=48, input_tokens=1) == pytest.approx(2 * 50 + 100 * 16 / 17)
    paced = load_config(["conf=polaris", "judge.rpm=30", "judge.rpm_burst=1"])
    # 47 requests past the burst at one every 2 s, the last answered after the mean latency
    assert judge_tail_s(paced, a, calls=48, input_tokens=1) == pytest.approx(47 * 2 + 50)


def test_a_split_that_cannot_fit_is_refused_with_the_memory_numbers():
    cfg = load_config(["conf=polaris", "learner.offload_optimizer=false"])
    with pytest.raises(EnvironmentSetupError, match=r"learner rank .* needs .* GiB > .*learner.offload_optimizer=true"):
        plan_for(cfg, "a100-80gb", None, "separate", Assumptions())  # the config's own 2 engines + 2 learners
    with pytest.raises(EnvironmentSetupError, match=r"layout separate on 2 x a100-80gb: no split .* fits"):
        plan_for(cfg, "a100-80gb", 2, "separate", Assumptions())


def test_unknown_gpu_layout_and_assumption_are_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--gpu 'a100-40gb' .* known: a100-80gb, h100, h200"):
        gpu_spec("a100-40gb")
    cfg = load_config(["conf=polaris"])
    with pytest.raises(ConfigError, match=r"--layout 'mixed'"):
        plan_for(cfg, "h100", 8, "mixed", Assumptions())
    with pytest.raises(ConfigError, match=r"--assume 'mfu=0.5'.*training_mfu"):
        with_overrides(Assumptions(), ["mfu=0.5"])
    assert with_overrides(Assumptions(), ["training_mfu=0.5"]).training_mfu == 0.5


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cluster.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    return done, time.perf_counter() - start


def test_cli_answers_fast_and_ends_with_the_plan_line():
    done, seconds = _cli("conf=polaris", "--gpus", "4", "--gpu", "a100-80gb", "--layout", "colocated")
    assert done.returncode == 0, done.stderr
    match = LAST_LINE.match(done.stdout.strip().splitlines()[-1])
    assert match and match.group(1, 2) == ("colocated", "4")
    assert seconds < 10  # ~1 s here: no torch, no Ray on its import path
    assert "training_mfu" in done.stdout and "flex_latency_max_s" in done.stdout  # every assumption is printed


def test_cli_refuses_bad_input_with_one_line_naming_it():
    for args, named in ((["conf=polaris", "--gpu", "v100"], "--gpu 'v100'"),
                        (["conf=nosuch"], "unknown conf 'nosuch'"),
                        (["conf=polaris", "learner.world_sise=2"], "learner.world_sise"),
                        (["conf=polaris", "learner.offload_optimizer=false", "--gpus", "2"], "no split")):
        done, _ = _cli(*args)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and named in done.stderr, done.stderr


@pytest.mark.parametrize("layout", ["separate", "colocated"])
@pytest.mark.parametrize("overrides", [["conf=polaris"],
                                       # no judge wait: generation and training set the step
                                       ["conf=polaris", "judge.backend=local", "rollout.max_staleness=1"]])
def test_more_gpus_never_predict_a_slower_best_step(layout, overrides):
    cfg = load_config(overrides)
    for gpu in ("a100-80gb", "h100", "h200"):
        plans = [plan_for(cfg, gpu, n, layout, Assumptions(), own_split=False) for n in (4, 8, 16, 32)]
        steps = [p.step.step_s for p in plans]
        assert all(later <= earlier for earlier, later in zip(steps, steps[1:])), (gpu, steps)
        for n, p in zip((4, 8, 16, 32), plans):  # every GPU has a role
            used = p.layout.learners if layout == "colocated" else p.layout.learners + p.layout.engines
            assert used == n


def test_decode_time_is_the_weights_read_once_per_decode_step_at_the_bandwidth_model():
    cfg = load_config(["conf=polaris"])
    plan = plan_for(cfg, "h100", None, "separate", Assumptions())  # the config's 2 engines + 2 learners
    faster = plan_for(cfg, "h200", None, "separate", Assumptions())
    engine_weights = plan.matmul_params * 2 * 8192  # bf16, one read per decode step, at the response limit
    assert engine_weights / (3350e9 * 0.6) < plan.step.generate_s < 1.2 * engine_weights / (3350e9 * 0.6)
    # H200 differs from H100 only in bandwidth (4.8 vs 3.35 TB/s): decode time scales with its inverse
    assert faster.step.generate_s == pytest.approx(plan.step.generate_s * 3.35 / 4.8, rel=1e-6)


def test_gpu_check_figures_replace_the_published_efficiencies():
    log = ("NVIDIA A100-SXM4-80GB, 81920 MiB\ngpu_check: learner_step_kernels.params_b=3.05\n"
           "gpu_check: learner_step_kernels.tok_s=5000\nPASS learner_step_kernels (40.1s)\n"
           "gpu_check: offload_optimizer_1b.params_b=1.0\ngpu_check: offload_optimizer_1b.cpu_adam_ms=500\n")
    a, measured = assumptions_from_gpu_check(Assumptions(), gpu_check_figures(log), gpu_spec("a100-80gb"))
    # 8 FLOPs a weight a token (forward, recomputed forward, backward); the 248,320 x 4,096 embedding is a lookup
    assert a.training_mfu == pytest.approx(8 * (3.05e9 - 248320 * 4096) * 5000 / 312e12)
    assert a.cpu_adam_params_per_s == pytest.approx(1e9 / 0.5)
    assert a.decode_efficiency == Assumptions().decode_efficiency  # not in this log
    assert set(measured) == {"training_mfu", "cpu_adam_params_per_s"}


JUDGE_LOG = """judge_check: 2 reference stories of data/polaris/train.parquet to gemini gemini-3-flash-preview
judge_check: story a words=2400 input_tokens=3900 output_tokens=3800 (thoughts 3300, visible 500) latency_s=70.0 ok
judge_check: story b words=2600 input_tokens=4100 output_tokens=4000 (thoughts 3500, visible 500) latency_s=410.0 ok
judge_check: story_words=2500
judge_check: thought_tokens=3400
judge_check: visible_tokens=500
judge_check: latency_min_s=70
judge_check: latency_max_s=410
judge_check: backend=gemini model=gemini-3-flash-preview thinking=medium tier={tier} calls=2 failed=0 thought_tokens=3400
"""


@pytest.mark.parametrize("tier", ["flex", "standard"])
def test_judge_check_figures_replace_the_judge_defaults_for_the_tier_measured(tier, tmp_path):
    log = tmp_path / "judge_check.log"
    log.write_text(JUDGE_LOG.format(tier=tier))
    judge = load_config(["conf=polaris"]).judge
    a, measured = assumptions_from_judge_check(Assumptions(), log, judge)
    other = "standard" if tier == "flex" else "flex"
    assert a.judge_thought_tokens == 3400
    assert (getattr(a, f"{tier}_latency_min_s"), getattr(a, f"{tier}_latency_max_s")) == (70, 410)
    assert getattr(a, f"{other}_latency_max_s") == getattr(Assumptions(), f"{other}_latency_max_s")
    assert set(measured) == {"judge_thought_tokens", "judge_evidence_words", f"{tier}_latency_min_s",
                             f"{tier}_latency_max_s"}
    # the visible answer as measured: the planner's answer comes out at the measured 500 tokens
    assert answer_tokens(a) == pytest.approx(500, abs=len(DIMENSIONS) * a.tokens_per_word / 2)
    assert answer_tokens(Assumptions()) > answer_tokens(a)  # evidence at the rubric's 25-word limit: more
    assert "2 judgments by gemini gemini-3-flash-preview" in measured["judge_thought_tokens"]


def test_a_judge_check_of_another_model_or_thinking_level_or_of_nothing_is_refused(tmp_path):
    log = tmp_path / "judge_check.log"
    log.write_text(JUDGE_LOG.format(tier="flex"))
    with pytest.raises(ConfigError, match=r"measured thinking 'medium', but the config's judge has 'low' "
                                          r"\(judge.thinking_level\)"):
        assumptions_from_judge_check(Assumptions(), log, load_config(["conf=polaris", "judge.thinking_level=low"]).judge)
    with pytest.raises(ConfigError, match=r"measured model 'gemini-3-flash-preview'.*'gemini-2.5-flash' \(judge.model\)"):
        assumptions_from_judge_check(Assumptions(), log, load_config(["conf=polaris", "judge.model=gemini-2.5-flash"]).judge)
    log.write_text("judge_check: 2 reference stories\n")
    with pytest.raises(ConfigError, match="no judgments measured in it"):
        assumptions_from_judge_check(Assumptions(), log, load_config(["conf=polaris"]).judge)


def test_predicted_phase_times_go_beside_the_measured_ones(published, tmp_path, monkeypatch):
    predicted = published.step.by_phase()
    assert tuple(predicted) == PHASES
    measured = {"step": 3, "time/step": 2 * predicted["step"]}
    extra = plan_metrics(predicted, measured)
    assert set(extra) == {f"plan/{p}_s_predicted" for p in PHASES} | {"plan/step_vs_predicted"}
    assert extra["plan/generate_s_predicted"] == published.step.generate_s
    assert extra["plan/step_vs_predicted"] == pytest.approx(2.0)
    assert plan_metrics(predicted, {"step": 3}).keys() == {f"plan/{p}_s_predicted" for p in PHASES}

    from actors.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(tmp_path, project="p", config={}, total_steps=1, start_step=0, progress_bar=False,
                      predicted=predicted)
    row = {"step": 0, "reward/mean": 0.1, "length/ratio_mean": 1.0, "time/generate": 100.0, "time/judge_tail": 900.0,
           "time/train": 30.0, "time/sync": 1.0, "time/step": predicted["step"], "judge/failed": 0,
           "judge/spend_usd_total": 0.2, "weight_version": 1}
    tracker.log_step(row)
    tracker._bar.close()
    logged = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert logged["plan/judge_tail_s_predicted"] == predicted["judge_tail"] and logged["time/judge_tail"] == 900.0
    assert logged["plan/step_vs_predicted"] == pytest.approx(1.0)


def test_a_run_on_gpus_gets_its_own_layouts_prediction_and_an_unknown_gpu_none():
    cfg = load_config(["conf=polaris"])
    text, phases = run_prediction(cfg, "NVIDIA A100-SXM4-80GB")
    assert tuple(phases) == PHASES and LAST_LINE.match(text.splitlines()[-1]).group(1, 2) == ("separate", "4")
    assert run_prediction(cfg, "NVIDIA A10") == (
        "plan: no prediction: the planner has no figures for 'NVIDIA A10' (cluster/plan_inputs.py)", {})
