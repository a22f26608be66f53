"""Evaluation end to end on the tiny model with the loopback judge: a one-step run validates
periodically into its own file; its checkpoint, exported, is evaluated against the base model in one
table, CSV, figure and jsonl. Plus the subset, the refusals and the report's table."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from actors.data import PromptRecord
from eval.metrics import EvalRecord, bucket_edges, bucket_of, summarize
from eval.report import quality_figure
from eval.run import checkpoint_folders, validation_subset

ROOT = Path(__file__).resolve().parents[2]


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def launch(args, env, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "trainer.progress_bar=false", *args],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_address, tiny_model_path, quick_run):
    """A one-step tiny run with trainer.eval_every=1, and its checkpoint exported."""
    out = tmp_path_factory.mktemp("eval") / "run"
    env = {"RAY_ADDRESS": ray_address, "POLARIS_CACHE": str(Path(tiny_model_path).parent), "WANDB_MODE": "offline"}
    proc = launch([*quick_run.one_engine_args, "trainer.total_steps=1", "trainer.eval_every=1", f"trainer.output_dir={out}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = out.parent / "exported"
    proc_export = subprocess.run([sys.executable, "-m", "learner.export", str(out / "checkpoints" / "step_000001"),
                                  str(exported)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc_export.returncode == 0, proc_export.stderr[-3000:]
    return out, exported, env, proc.stdout, quick_run


def test_periodic_validation_writes_its_own_rows(trained):
    out, _, _, stdout, quick_run = trained
    rows = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and rows[0]["count"] == 12  # conf=tiny: eval.subset_size=12
    assert rows[0]["failed"] == 0 and finite(rows[0]["quality/aggregate"])
    assert rows[0]["bucket1/count"] == 2 and rows[0]["weight_version"] == 1  # after the step's weight sync
    stories = [json.loads(line) for line in (out / "validation" / "step_000000.jsonl").read_text().splitlines()]
    assert len(stories) == 12 and all(finite(s["quality"]) and finite(s["reward"]) for s in stories)
    assert rows[0]["reward/mean"] == pytest.approx(sum(s["reward"] for s in stories) / 12)  # reward.val_weights
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and not any(k.startswith(("quality", "bucket")) for k in metrics[0])
    assert metrics[0]["judge/stories"] == quick_run.stories  # the validation's stories are not in the step's counters
    assert "validation after step 0: quality id" in stdout


def test_eval_of_an_exported_checkpoint_against_the_base_model(trained, tiny_model_path, tmp_path):
    _, exported, env, _, quick_run = trained
    proc = launch(["mode=eval", f"eval.checkpoint={exported}", f"eval.compare={tiny_model_path}",
                   f"trainer.output_dir={tmp_path}", *quick_run.one_engine_args], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = Path(tiny_model_path).resolve().name
    folder = tmp_path / "eval" / f"exported_vs_{base}"
    table = (folder / "results.md").read_text()
    assert "exported: quality" in table and f"{base}: quality" in table  # both in one table
    for row in ("[35,70)", "[350,420]", "in-distribution", "near OOD", "far OOD", "aggregate", "slope"):
        assert row in table, row
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["checkpoint"] for r in rows} == {"exported", base} and len(rows) == 2 * 11
    stories = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
    assert len(stories) == 2 * 24 and all(s["judgment"] is not None for s in stories)
    by_bucket = {}
    for s in stories:
        by_bucket.setdefault((s["checkpoint"], s["bucket"]), []).append(s["quality"])
    first = [r for r in rows if r["checkpoint"] == "exported" and r["row"] == "[35,70)"][0]
    assert float(first["quality"]) == pytest.approx(sum(by_bucket[("exported", 0)]) / 4)
    height, width, _ = matplotlib.image.imread(folder / "quality_by_length.png").shape
    assert (width, height) == (1100, 420)  # the figure (its data: test_the_figure_plots_each_checkpoints_buckets)
    assert list((folder / "wandb").glob("offline-run-*")), "W&B offline run files"


def test_a_training_checkpoint_or_an_empty_folder_is_refused_before_anything_starts(trained, tmp_path):
    out, _, env, _, _ = trained
    proc = launch(["mode=eval", f"eval.checkpoint={out / 'checkpoints' / 'step_000001'}"], env, timeout=60)
    assert proc.returncode == 2 and "python -m learner.export" in proc.stderr and "eval.checkpoint" in proc.stderr
    proc = launch(["mode=eval", f"eval.checkpoint={tmp_path}"], env, timeout=60)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    proc = launch(["mode=eval"], env, timeout=60)
    assert proc.returncode == 2 and "eval.checkpoint" in proc.stderr


def test_checkpoint_labels_are_distinct(tmp_path):
    class Cfg:
        class eval:
            checkpoint = str(tmp_path / "a" / "hf_model")
            compare = str(tmp_path / "b" / "hf_model")
    for name in ("a", "b"):
        (tmp_path / name / "hf_model").mkdir(parents=True)
        (tmp_path / name / "hf_model" / "config.json").write_text("{}")
    assert list(checkpoint_folders(Cfg)) == ["a/hf_model", "b/hf_model"]


def test_validation_subset_is_fixed_and_spread_over_the_buckets():
    from actors.data import load_prompts

    prompts = load_prompts(ROOT / "data" / "tiny" / "test.jsonl", require_reference=False)
    subset = validation_subset(prompts, 12, 0.035)
    assert subset == validation_subset(list(reversed(prompts)), 12, 0.035)  # order of the file does not matter
    edges = bucket_edges(0.035)
    assert sorted(bucket_of(p.target_words, edges) for p in subset) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    outside = PromptRecord("x", ({"role": "user", "content": "hi"},), 5000, None, None)
    assert outside not in validation_subset([*prompts, outside], 100, 0.035)


def test_the_figure_plots_each_checkpoints_buckets():
    # scale 1: buckets [1000,2000) [2000,4000) [4000,6000) [6000,8000) [8000,10000) [10000,12000],
    # centres 1500, 3000, 5000, 7000, 9000, 11000
    a = [EvalRecord("a1", 1500, 1200, 40.0, 100.0), EvalRecord("a2", 1500, 1800, 60.0, 100.0),  # 50, ratio 1.0
         EvalRecord("a3", 3000, 3000, None, 100.0),  # judgment failed: a length ratio, no quality
         EvalRecord("a4", 5000, 2500, 30.0, 0.0)]  # 30, ratio 0.5
    b = [EvalRecord("b1", 11000, 11000, 70.0, 100.0)]
    fig = quality_figure({"a": summarize(a, bucket_edges(1.0)), "b": summarize(b, bucket_edges(1.0))}, 1.0)
    quality, ratio = fig.axes
    lines = {(ax, line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in (quality, ratio) for line in ax.lines if not line.get_label().startswith("_")}  # not the rules
    assert lines == {(quality, "a"): ([1500, 5000], [50.0, 30.0]), (quality, "b"): ([11000], [70.0]),
                     (ratio, "a"): ([1500, 3000, 5000], [1.0, 1.0, 0.5]), (ratio, "b"): ([11000], [1.0])}
