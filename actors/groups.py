"""GRPO group assembly: policy rows (+ the injected human reference) -> advantages -> TrainBatch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.grpo import group_advantages
from learner.worker import TrainBatch, TrainRow
from reward.worker import ScoredSample


@dataclass(frozen=True)
class GroupRow:
    """One row of a group before advantages: tokens, its score, and where it came from."""

    uid: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    scored: ScoredSample
    is_reference: bool
    weight_version: int | None  # None for the reference row (teacher-forced, no engine)
    behaviour_logprobs: tuple[float, ...] | None = None  # the engine's; None for the reference


@dataclass(frozen=True)
class AssembledBatch:
    batch: TrainBatch
    policy_rewards: list[float]  # story scalars s of the valid policy rows
    groups_dropped: int
    stale_refused: int
    reference_advantages: list[float]


def assemble_batch(rows: list[GroupRow], *, step: int, current_version: int, max_staleness: int,
                   reference_weight: float, eps: float) -> AssembledBatch:
    """Rows older than the staleness bound are refused (excluded, counted); a group with < 2
    valid policy rows is dropped; everything else gets its GRPO/HRI advantage."""
    groups: dict[str, list[GroupRow]] = {}
    stale = 0
    for row in rows:
        if row.weight_version is not None and current_version - row.weight_version > max_staleness:
            stale += 1
            continue
        groups.setdefault(row.uid, []).append(row)
    train_rows: list[TrainRow] = []
    policy_rewards: list[float] = []
    ref_advantages: list[float] = []
    dropped = 0
    for members in groups.values():
        scores = torch.tensor([m.scored.reward.score if m.scored.valid else float("nan") for m in members])
        is_ref = torch.tensor([m.is_reference for m in members])
        valid = torch.tensor([m.scored.valid for m in members])
        adv = group_advantages(scores, is_reference=is_ref, valid=valid, reference_weight=reference_weight, eps=eps)
        if adv.dropped:
            dropped += 1
            continue
        for m, a, keep in zip(members, adv.advantages.tolist(), adv.loss_mask.tolist()):
            if m.scored.valid and not m.is_reference:
                policy_rewards.append(m.scored.reward.scalar)
            if not keep:
                continue
            if m.is_reference:
                ref_advantages.append(a)
            lag = current_version - m.weight_version if m.weight_version is not None else 0
            train_rows.append(TrainRow(m.prompt_ids, m.response_ids, a, m.is_reference, m.behaviour_logprobs, lag))
    return AssembledBatch(TrainBatch(tuple(train_rows), step), policy_rewards, dropped, stale, ref_advantages)


def assemble_step(cfg, rows: list[GroupRow], *, step: int, current_version: int,
                  reference_weight: float) -> AssembledBatch:
    """assemble_batch under the run's staleness bound (rollout.max_staleness) and advantage
    epsilon (algorithm.adv_eps)."""
    return assemble_batch(rows, step=step, current_version=current_version, max_staleness=cfg.rollout.max_staleness,
                          reference_weight=reference_weight, eps=cfg.algorithm.adv_eps)
