"""Evaluation by requested length, as the POLARIS paper reports it: pure math, no Ray, no I/O.

Stories are grouped by requested words into six buckets, [1k,2k) [2k,4k) [4k,6k) [6k,8k) [8k,10k)
[10k,12k] (the last one closed; every edge times eval.length_scale). Per bucket: mean story quality
(the evaluation rubric, min(100, P - N + B)), mean length ratio (generated / requested words), mean
length score 100 x (1 - lp) with the length band (docs/design.md#per-story) at a symmetric tolerance
max(50, 0.1 x target) (the 50 also scaled), the count and the judge failures.

A story whose judgment failed has no quality: it is counted in `failed` and left out of every
quality mean; its length ratio and score need no judge and are kept. The three ranges of the paper
(in-distribution = buckets 1-2, near OOD = 3-4, far OOD = 5-6) and the aggregate are means over
prompts, not over bucket means; the slope is the least-squares slope of the bucket quality means
against the bucket index (points per bucket step), over the buckets that have one.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from reward.components import length_penalty

BUCKET_EDGES_WORDS = (1000, 2000, 4000, 6000, 8000, 10000, 12000)
RANGES = {"id": (0, 1), "near_ood": (2, 3), "far_ood": (4, 5)}
TOLERANCE_FRAC, TOLERANCE_MIN_WORDS = 0.10, 50


def bucket_edges(scale: float = 1.0) -> tuple[float, ...]:
    return tuple(e * scale for e in BUCKET_EDGES_WORDS)


def bucket_label(index: int, edges: tuple[float, ...]) -> str:
    close = "]" if index == len(edges) - 2 else ")"
    return f"[{edges[index]:g},{edges[index + 1]:g}{close}"


def bucket_of(target_words: float, edges: tuple[float, ...]) -> int | None:
    """The bucket index of a requested length; None outside [first edge, last edge]."""
    if target_words < edges[0] or target_words > edges[-1]:
        return None
    for i in range(len(edges) - 1):
        if target_words < edges[i + 1]:
            return i
    return len(edges) - 2  # the last edge itself: the closed last bucket


def length_score(words: int, target_words: int, scale: float = 1.0) -> float:
    """100 x (1 - lp): 100 inside target +- max(50 x scale, 0.1 x target), falling linearly outside."""
    tol_min = TOLERANCE_MIN_WORDS * scale
    lp = length_penalty(words, target_words, min_target=0, lo_frac=TOLERANCE_FRAC, lo_min=tol_min, lo_max=math.inf,
                        hi_frac=TOLERANCE_FRAC, hi_min=tol_min, hi_max=math.inf)
    return 100.0 * (1.0 - lp)


@dataclass(frozen=True)
class EvalRecord:
    """One prompt's story. quality is None when the judgment failed."""

    uid: str
    target_words: int
    words: int
    quality: float | None
    length_score: float

    @property
    def length_ratio(self) -> float:
        return self.words / self.target_words


@dataclass(frozen=True)
class BucketStats:
    label: str
    count: int
    failed: int
    quality: float  # nan when no story of the bucket was judged
    length_ratio: float  # nan when the bucket is empty
    length_score: float


@dataclass
class EvalSummary:
    buckets: list[BucketStats]
    ranges: dict[str, float]  # quality over the range's prompts
    range_length_ratio: dict[str, float]
    aggregate: float  # quality over every judged prompt in a bucket
    slope: float  # quality points per bucket; nan with fewer than two buckets judged
    slope_buckets: list[int]  # the bucket indices the slope was fitted on
    outside: int  # prompts whose target lies outside every bucket (not in any figure)
    failed: int = 0
    count: int = 0
    extra: dict = field(default_factory=dict)

    def flat(self, prefix: str = "") -> dict[str, float]:
        """One level of keys for a metrics row / W&B."""
        out = {f"{prefix}quality/aggregate": self.aggregate, f"{prefix}quality/slope": self.slope,
               f"{prefix}count": self.count, f"{prefix}failed": self.failed}
        for name, value in self.ranges.items():
            out[f"{prefix}quality/{name}"] = value
            out[f"{prefix}length_ratio/{name}"] = self.range_length_ratio[name]
        for i, b in enumerate(self.buckets):
            out[f"{prefix}bucket{i + 1}/quality"] = b.quality
            out[f"{prefix}bucket{i + 1}/length_ratio"] = b.length_ratio
            out[f"{prefix}bucket{i + 1}/length_score"] = b.length_score
            out[f"{prefix}bucket{i + 1}/count"] = b.count
        return out


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return math.nan
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def summarize(records: list[EvalRecord], edges: tuple[float, ...]) -> EvalSummary:
    by_bucket: list[list[EvalRecord]] = [[] for _ in range(len(edges) - 1)]
    outside = 0
    for r in records:
        b = bucket_of(r.target_words, edges)
        if b is None:
            outside += 1
        else:
            by_bucket[b].append(r)
    buckets = [BucketStats(bucket_label(i, edges), len(rs), sum(r.quality is None for r in rs),
                           _mean([r.quality for r in rs if r.quality is not None]),
                           _mean([r.length_ratio for r in rs]), _mean([r.length_score for r in rs]))
               for i, rs in enumerate(by_bucket)]
    ranges, range_ratio = {}, {}
    for name, members in RANGES.items():
        rs = [r for b in members for r in by_bucket[b]]
        ranges[name] = _mean([r.quality for r in rs if r.quality is not None])
        range_ratio[name] = _mean([r.length_ratio for r in rs])
    in_buckets = [r for rs in by_bucket for r in rs]
    fitted = [i for i, b in enumerate(buckets) if not math.isnan(b.quality)]
    return EvalSummary(
        buckets=buckets, ranges=ranges, range_length_ratio=range_ratio,
        aggregate=_mean([r.quality for r in in_buckets if r.quality is not None]),
        slope=least_squares_slope([float(i) for i in fitted], [buckets[i].quality for i in fitted]),
        slope_buckets=fitted, outside=outside, failed=sum(r.quality is None for r in in_buckets),
        count=len(in_buckets))
