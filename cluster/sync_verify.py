"""Proof that a weight sync arrived and loaded as sent (docs/design.md#weight-sync).

Two checks, each naming the part that failed:
- transport: every receiving rank checksums each bucket's bytes as they arrived, before the
  engine loads them; the learner checksums what it packed. Unequal sums = the wire (or a
  buffer) changed the bytes.
- load: the engine scores a fixed probe text after loading and the learner scores the same
  tokens; their log-probabilities must agree within the dtype's tolerance. A stacked or
  repacked parameter loaded wrong, or a reload that left NaN logits, shows here whatever the
  engine does inside.
Plain functions: no Ray, no engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from conf.errors import WeightSyncError

# Mean |engine - learner| log-probability over the probe tokens that still counts as the same
# weights. fp32 engines agree to ~1e-5 on CPU; bf16 kernels differ by ~1e-2; a parameter loaded
# wrong moves the mean by far more (docs/design.md#weight-sync).
PROBE_TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 1e-1, torch.float16: 5e-2}

PROBE_TEXT = ("The lighthouse keeper climbed the spiral stairs at dusk, counting each step as her father "
              "had taught her. Below, the sea turned the colour of slate, and a single gull rode the wind "
              "toward the harbour. She lit the lamp, wrote the hour in the log, and waited for the ships.")
PROBE_TOKENS = 64


def checksum(buf: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 tensor on buf's device: the wrapping sum of buf's bytes read as 64-bit words
    (the tail as bytes). Any changed word changes it; stays on the device (no sync per bucket)."""
    raw = buf.reshape(-1).view(torch.uint8)
    words = raw.numel() // 8 * 8
    total = raw[:words].view(torch.int64).sum() if words else torch.zeros((), dtype=torch.int64, device=buf.device)
    return total + raw[words:].to(torch.int64).sum()


def probe_token_ids(tokenizer, n: int = PROBE_TOKENS) -> tuple[int, ...]:
    """The probe: the first n tokens of PROBE_TEXT (repeated when a tokenizer packs it shorter)."""
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    return tuple((ids * (n // max(len(ids), 1) + 1))[:n])


def probe_tolerance(dtype: torch.dtype, configured: float = 0.0) -> float:
    return configured if configured > 0 else PROBE_TOLERANCE.get(dtype, 1e-1)


@dataclass(frozen=True)
class SyncReport:
    """One side of one sync: per receiving rank (the sender: one entry) the bucket checksums, and
    the probe's log-probabilities (empty when the sync was not verified)."""
    checksums: tuple[tuple[int, ...], ...]
    probe: tuple[float, ...] = field(default=())


def verify_sync(version: int, sent: SyncReport, received: list[SyncReport], tolerance: float) -> dict[str, float]:
    """Raises WeightSyncError naming the engine and the failing part; returns the figures."""
    want = sent.checksums[0]
    for engine, report in enumerate(received):
        for shard, got in enumerate(report.checksums):
            bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
            if len(got) != len(want) or bad:
                where = f"bucket {bad[0]} of {len(want)}" if bad else f"{len(got)} buckets of {len(want)}"
                raise WeightSyncError(f"weight sync v{version} failed verification (transport): engine {engine} "
                                      f"shard {shard} received {where} with a checksum other than the learner sent")
    if not sent.probe:
        return {}
    gaps = []
    for engine, report in enumerate(received):
        if len(report.probe) != len(sent.probe):
            raise WeightSyncError(f"weight sync v{version} failed verification (load): engine {engine} scored "
                                  f"{len(report.probe)} probe tokens, the learner {len(sent.probe)}")
        if not all(math.isfinite(x) for x in report.probe):
            raise WeightSyncError(f"weight sync v{version} failed verification (load): engine {engine} gives "
                                  f"non-finite log-probabilities on the probe after loading")
        gap = sum(abs(a - b) for a, b in zip(report.probe, sent.probe)) / len(sent.probe)
        if not gap <= tolerance:
            raise WeightSyncError(f"weight sync v{version} failed verification (load): engine {engine} scores the "
                                  f"probe {gap:.4g} nats per token away from the learner (tolerance {tolerance:g}): "
                                  f"a parameter was loaded wrong")
        gaps.append(gap)
    return {"sync/probe_gap": max(gaps)}
