"""What a run shows its users: the console line, the W&B config without secrets, the summary figure."""
import json

import matplotlib.image

from actors import tracking
from actors.tracking import Tracker, redact, write_summary_figure


def test_secret_values_are_masked_and_the_names_of_their_variables_kept():
    config = {"judge": {"api_key_env": "GEMINI_API_KEY", "api_key": "AIza-secret", "rpm": 600},
              "extra": [{"wandb_token": "t0k"}, {"password": ""}]}
    clean = redact(config)
    assert clean["judge"] == {"api_key_env": "GEMINI_API_KEY", "api_key": "***", "rpm": 600}
    assert clean["extra"] == [{"wandb_token": "***"}, {"password": ""}]
    assert "AIza-secret" not in json.dumps(clean) and config["judge"]["api_key"] == "AIza-secret"


def test_the_summary_figure_plots_every_logged_step(tmp_path, monkeypatch):
    rows = [{"step": 1, "reward/mean": -0.5, "length/ratio_mean": 0.6, "judge/spend_usd_total": 0.01, "time/step": 8.0},
            {"step": 2, "reward/mean": -0.25, "length/ratio_mean": 0.7, "judge/spend_usd_total": 0.02, "time/step": 7.5},
            {"step": 3, "reward/mean": 0.0, "length/ratio_mean": 0.9, "judge/spend_usd_total": 0.03, "time/step": None},
            {"step": 5, "reward/mean": 0.25, "length/ratio_mean": 1.1, "judge/spend_usd_total": 0.05, "time/step": 9.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    draw = tracking.summary_figure
    monkeypatch.setattr(tracking, "summary_figure", lambda *a: drawn.append(draw(*a)) or drawn[-1])
    out = write_summary_figure(tmp_path / "metrics.jsonl", tmp_path / "summary.png")
    (figure,) = drawn  # the figure written to summary.png
    assert figure.get_suptitle() == f"{tmp_path.name}: 4 steps"
    assert [len(ax.lines) for ax in figure.axes] == [1, 1, 1, 1]
    assert {ax.get_title(): (list(ax.lines[0].get_xdata()), list(ax.lines[0].get_ydata())) for ax in figure.axes} == {
        "reward (mean)": ([1, 2, 3, 5], [-0.5, -0.25, 0.0, 0.25]),
        "length ratio (words / target)": ([1, 2, 3, 5], [0.6, 0.7, 0.9, 1.1]),
        "judge spend (USD, total)": ([1, 2, 3, 5], [0.01, 0.02, 0.03, 0.05]),
        "step time (s)": ([1, 2, 5], [8.0, 7.5, 9.0]),  # step 3 logged no time
    }
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (1000, 650)
    assert write_summary_figure(tmp_path / "none.jsonl", tmp_path / "x.png") is None


def test_a_resumed_tracker_keeps_its_run_id_and_a_new_one_gets_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    first = Tracker(tmp_path, project="p", config={}, total_steps=2, start_step=0, progress_bar=False)
    first.close()
    assert (tmp_path / "wandb_run_id").read_text().strip() == first.run_id and len(first.run_id) == 8
    again = Tracker(tmp_path, project="p", config={}, total_steps=4, start_step=2, progress_bar=False,
                    run_id=first.run_id)
    again.close()
    (tmp_path / "other").mkdir()
    other = Tracker(tmp_path / "other", project="p", config={}, total_steps=2, start_step=0, progress_bar=False)
    other.close()
    assert again.run_id == first.run_id and other.run_id != first.run_id


def test_wandb_gets_the_redacted_config_the_metrics_and_a_table_of_stories(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(tmp_path, project="p", config={"judge": {"api_key": "AIza-secret", "rpm": 600}}, total_steps=1,
                      start_step=0, progress_bar=False)
    metrics = {"step": 0, "reward/mean": 0.5, "length/ratio_mean": 0.9, "time/generate": 1.0, "time/judge_tail": 0.5,
               "time/train": 1.0, "time/sync": 0.1, "time/step": 2.6, "judge/failed": 0, "judge/spend_usd_total": 0.1,
               "weight_version": 0}
    samples = [{"step": 0, "uid": "u1", "words": 80, "judge_score": 7.5, "reward": 0.4, "story": "Once."}]
    tracker.log_step(metrics, samples=samples)
    tracker.close()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    files = run / "files"
    (table,) = (files / "media" / "table").glob("samples_0_*.table.json")
    assert json.loads(table.read_text())["data"] == [[0, "u1", 80, 7.5, 0.4, "Once."]]
    (record,) = run.glob("run-*.wandb")  # what `wandb sync` would upload: config, metrics, the table
    assert b"AIza-secret" not in record.read_bytes() and b"***" in record.read_bytes()
    assert (tmp_path / "summary.png").exists() and list((files / "media" / "images").glob("summary_*.png"))
