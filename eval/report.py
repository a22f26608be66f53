"""An evaluation's outputs, one set for every checkpoint evaluated together:

  results.md               the bucket table (checkpoints side by side), ranges, aggregate, slope
  results.csv              the same numbers, one row per checkpoint and row of the table
  quality_by_length.png    quality and length ratio against requested length, one line per checkpoint
  generations.jsonl        every story with its judgment, quality, length ratio and length score

and the same to W&B (a run of job_type "eval", offline unless a key is set), never fatal.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from eval.metrics import RANGES, EvalSummary, bucket_edges, summarize

RANGE_NAMES = {"id": "in-distribution (buckets 1-2)", "near_ood": "near OOD (buckets 3-4)",
               "far_ood": "far OOD (buckets 5-6)"}
CSV_COLUMNS = ("checkpoint", "row", "count", "failed", "quality", "length_ratio", "length_score")


def table_rows(summary: EvalSummary) -> list[dict]:
    """The table's rows for one checkpoint: six buckets, three ranges, the aggregate, the slope."""
    rows = [{"row": b.label, "count": b.count, "failed": b.failed, "quality": b.quality,
             "length_ratio": b.length_ratio, "length_score": b.length_score} for b in summary.buckets]
    for name in RANGES:
        rows.append({"row": RANGE_NAMES[name], "quality": summary.ranges[name],
                     "length_ratio": summary.range_length_ratio[name]})
    rows.append({"row": "aggregate", "count": summary.count, "failed": summary.failed, "quality": summary.aggregate})
    used = ",".join(str(i + 1) for i in summary.slope_buckets)
    rows.append({"row": f"slope (points/bucket, buckets {used})", "quality": summary.slope})
    return rows


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(summaries: dict[str, EvalSummary], scale: float) -> str:
    labels = list(summaries)
    header = ["requested words" + (f" (x{scale:g})" if scale != 1 else "")]
    for label in labels:
        header += [f"{label}: quality", "length ratio", "length score", "n (failed)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    per_label = {label: table_rows(s) for label, s in summaries.items()}
    for i, first in enumerate(per_label[labels[0]]):
        cells = [first["row"]]
        for label in labels:
            r = per_label[label][i]
            n = f"{r['count']} ({r['failed']})" if "count" in r else ""
            cells += [_fmt(r.get("quality"), 1), _fmt(r.get("length_ratio")), _fmt(r.get("length_score"), 1), n]
        lines.append("| " + " | ".join(cells) + " |")
    outside = {label: s.outside for label, s in summaries.items() if s.outside}
    if outside:
        lines.append(f"\nPrompts outside every bucket (in no row): {outside}")
    return "\n".join(lines) + "\n"


def write_figure(summaries: dict[str, EvalSummary], scale: float, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = quality_figure(summaries, scale)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def quality_figure(summaries: dict[str, EvalSummary], scale: float):
    """The matplotlib Figure of quality_by_length.png: quality (left) and length ratio (right) at
    the bucket centres, one line per checkpoint (labelled with it); buckets without a value are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = bucket_edges(scale)
    centers = [(edges[i] + edges[i + 1]) / 2 for i in range(len(edges) - 1)]
    fig, (ax_q, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, s in summaries.items():
        for ax, values in ((ax_q, [b.quality for b in s.buckets]), (ax_r, [b.length_ratio for b in s.buckets])):
            points = [(c, v) for c, v in zip(centers, values, strict=True) if not math.isnan(v)]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax_q.set_title("story quality (evaluation rubric)", fontsize=10)
    ax_r.set_title("length ratio (generated / requested words)", fontsize=10)
    ax_r.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    for ax in (ax_q, ax_r):
        ax.set_xlabel("requested words (bucket centre)")
        for edge in edges[1:-1]:
            ax.axvline(edge, color="grey", linewidth=0.3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(out: Path, results: dict, cfg) -> dict[str, EvalSummary]:
    """results: {checkpoint label: [EvalStory]}. Writes the four files, logs them to W&B, prints the table."""
    scale = cfg.eval.length_scale
    summaries = {label: summarize([s.record() for s in stories], bucket_edges(scale))
                 for label, stories in results.items()}
    with open(out / "generations.jsonl", "w") as f:
        for stories in results.values():
            for s in stories:
                f.write(json.dumps(asdict(s)) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for label, s in summaries.items():
            for row in table_rows(s):
                writer.writerow({"checkpoint": label, **{k: row.get(k, "") for k in CSV_COLUMNS[1:]}})
    table = markdown(summaries, scale)
    (out / "results.md").write_text(table)
    figure = write_figure(summaries, scale, out / "quality_by_length.png")
    _to_wandb(out, cfg, results, summaries, figure)
    print(table, end="")
    print(f"eval: {out / 'results.md'}, results.csv, quality_by_length.png, generations.jsonl")
    return summaries


def _to_wandb(out: Path, cfg, results: dict, summaries: dict[str, EvalSummary], figure: Path) -> None:
    if os.environ.get("WANDB_MODE") == "disabled":
        return
    try:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        run = wandb.init(project=cfg.trainer.wandb_project, dir=str(out), job_type="eval", mode=mode,
                         name=out.name, config={"eval": asdict(cfg.eval) | {"judge": {"backend": cfg.eval.judge.backend,
                                                                                       "model": cfg.eval.judge.model}}},
                         settings=wandb.Settings(console="off", silent=True))
        with open(out / "results.csv") as f:
            rows = list(csv.reader(f))
        stories = [s for ss in results.values() for s in ss]
        columns = ["checkpoint", "uid", "target_words", "bucket", "words", "length_ratio", "quality", "response"]
        run.log({"results": wandb.Table(columns=rows[0], data=rows[1:]),
                 "generations": wandb.Table(columns=columns, data=[[getattr(s, c) for c in columns] for s in stories]),
                 "quality_by_length": wandb.Image(str(figure)),
                 **{k: v for label, s in summaries.items() for k, v in s.flat(f"eval/{label}/").items()}})
        run.finish()
    except Exception as e:  # noqa: BLE001 -- the files are written; W&B is a copy
        print(f"W&B did not take the evaluation ({type(e).__name__}: {e}); the files in {out} have it all")
