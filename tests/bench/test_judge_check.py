"""bench/judge_check.py on conf=tiny (the loopback judge), as CI runs it: the judge's figures from
the run's own request path, read back by the run planner; bad input stops it before any judgment."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STORY = re.compile(r"^judge_check: story (\S+) words=(\d+) input_tokens=(\d+) output_tokens=(\d+) "
                   r"\(thoughts (\d+), visible (\d+)\) .* ok$")
LAST = re.compile(r"^judge_check: backend=local model=gemini-3-flash-preview thinking=medium tier=flex calls=(\d+) "
                  r"failed=0 thought_tokens=(\d+) usd_per_call=([0-9.]+)$")


def judge_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/judge_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def dry_run():
    proc = judge_check("--stories", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_dry_run_judges_reference_stories_spread_over_the_file_and_sums_up(dry_run):
    lines = dry_run.splitlines()
    stories = [STORY.match(line) for line in lines if line.startswith("judge_check: story ")]
    assert len(stories) == 5 and all(stories), lines
    rows = [json.loads(line) for line in (ROOT / "data/tiny/train.jsonl").read_text().splitlines()]
    assert {m.group(1) for m in stories} == {rows[i * len(rows) // 5]["uid"] for i in range(5)}
    # the loopback judge thinks twice what it writes, and Gemini's usage reports thoughts apart
    assert all(int(m.group(5)) == 2 * int(m.group(6)) and int(m.group(4)) == int(m.group(5)) + int(m.group(6))
               for m in stories)
    figures = dict(re.findall(r"^judge_check: (\w+)=([-+0-9.eE]+)$", dry_run, flags=re.MULTILINE))
    thoughts = [int(m.group(5)) for m in stories]
    assert float(figures["thought_tokens"]) == pytest.approx(sum(thoughts) / 5, rel=1e-5)
    assert float(figures["story_words"]) == pytest.approx(sum(int(m.group(2)) for m in stories) / 5, rel=1e-5)
    last = LAST.match(lines[-1])
    assert last and last.group(1) == "5" and int(last.group(2)) == round(sum(thoughts) / 5)
    # flex: half of $0.50 in / $3.00 out per million tokens, thoughts billed as output
    usd = sum(int(m.group(3)) * 0.25 + int(m.group(4)) * 1.5 for m in stories) / 1e6 / 5
    assert float(last.group(3)) == pytest.approx(usd, abs=1e-5)


def test_the_planner_takes_the_measured_thought_tokens(dry_run, tmp_path):
    log = tmp_path / "judge_check.log"
    log.write_text(dry_run)
    thoughts = int(LAST.match(dry_run.splitlines()[-1]).group(2))
    plan = subprocess.run([sys.executable, "-m", "cluster.plan", "conf=polaris", "--judge-check", str(log)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert re.search(rf"^  judge_thought_tokens +{thoughts} +measured: thought_tokens in {re.escape(str(log))}: "
                     r"5 judgments by local gemini-3-flash-preview \(the loopback judge", plan.stdout, re.MULTILINE)
    assert f"(thoughts {thoughts})" in plan.stdout


def test_over_the_spend_cap_it_stops_before_the_first_judgment():
    proc = judge_check("--stories", "3", "--max-usd", "0.001")
    assert proc.returncode == 2
    assert "would spend ~$0.02, over --max-usd 0.001" in proc.stderr
    assert "judge_check: story" not in proc.stdout


def test_training_data_without_reference_stories_is_one_error_naming_the_row(tmp_path):
    data = tmp_path / "prompts.jsonl"
    rows = [{"uid": "a", "prompt": "Write a story. The story should be approximately 100 words long.",
             "target_word_count": 100, "story": "Once there was a lamp.", "ground_truth_reasoning": "A lamp."},
            {"uid": "b", "prompt": "Write a story. The story should be approximately 100 words long.",
             "target_word_count": 100}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = judge_check(f"data.train_path={data}")
    assert proc.returncode == 2
    assert re.search(rf"{re.escape(str(data))}: 1 bad row\(s\) of 2 .*\n  row 1 \(0-based; line 2\): field 'story'", proc.stderr), proc.stderr
    assert "judge_check: story" not in proc.stdout


def test_token_figures_come_from_stories_answered_first_time_and_cost_from_every_story():
    from bench.judge_check import billed_usd, figures
    from conf import load_config
    from reward.judge_client import JudgeResult
    from reward.rubric import Judgment

    judge = load_config(["conf=polaris"]).judge
    judged = Judgment({}, {})
    once = JudgeResult(judged, 50.0, 4000, 3000, 1, latency_s=100.0, thought_tokens=2500)
    # a timeout, then an answer: its tokens sum both attempts, the first at its estimate
    retried = JudgeResult(judged, 50.0, 8000, 7096, 2, latency_s=950.0, thought_tokens=2600)
    failed = JudgeResult(None, None, 4000, 4096, 6, error="HTTP 503")
    found = figures([once, retried, failed], [2000, 3000, 2500], judge)
    assert (found["thought_tokens"], found["visible_tokens"], found["input_tokens"]) == (2500, 500, 4000)
    assert found["story_words"] == 2000 and found["answered_first_time"] == 1 and found["attempts"] == 3
    assert (found["latency_min_s"], found["latency_max_s"]) == (100.0, 950.0)
    total = billed_usd(judge, 16000, 14192)
    assert found["usd_per_call"] == pytest.approx(total / 3) and total == pytest.approx((16000 * 0.25 + 14192 * 1.5) / 1e6)
    assert figures([retried, failed], [3000, 2500], judge) == {}
