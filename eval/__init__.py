"""Evaluation by requested length: metrics (buckets, ranges, slope: pure), run (mode=eval and the
periodic validation during training), report (table, CSV, figure, generations, W&B)."""
