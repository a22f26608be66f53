"""GRPO with human reference injection (HRI), as pure functions (docs/design.md#the-algorithm).

Three pieces, each checkable with a pencil:

- `reference_weight(step)`: w(step), the scale on the reference row's advantage.
- `group_advantages(...)`: one group's advantages, A = (S - mean) / (std + eps), with the
  statistics taken over the valid policy rows only; the reference row's A is scaled by w.
- `policy_loss(...)`: one micro-batch's share of the optimizer step's token-mean loss: PPO's
  asymmetric clipped surrogate for policy rows, -A * logp for teacher-forced reference rows.

torch only: no Ray, no torch.distributed, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def reference_weight(
    step: int,
    *,
    peak: float = 0.4,
    warmup_steps: int = 15,
    decay_steps: int = 0,
    final_weight: float = 0.0,
) -> float:
    """w(step): linear ramp 0 -> peak over `warmup_steps`, then peak.

    With `decay_steps > 0`, after the warmup w falls linearly from `peak` to `final_weight`
    over `decay_steps` steps and stays there. `decay_steps = 0` (the original
    system's setting) keeps w at peak forever.
    """
    if step < 0 or warmup_steps < 0 or decay_steps < 0:
        raise ValueError(
            f"reference_weight: step, warmup_steps and decay_steps must be >= 0, got "
            f"step={step}, warmup_steps={warmup_steps}, decay_steps={decay_steps}"
        )
    if step < warmup_steps:
        return peak * step / warmup_steps
    if decay_steps == 0:
        return peak
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return peak + (final_weight - peak) * progress


@dataclass(frozen=True)
class GroupAdvantages:
    """One group's advantages [n] and which rows enter the loss [n].

    `mean` and `std` are the policy-row statistics (nan when the group is dropped).
    """

    advantages: Tensor
    loss_mask: Tensor
    dropped: bool
    mean: float
    std: float


def group_advantages(
    scores: Tensor,
    *,
    is_reference: Tensor,
    valid: Tensor,
    reference_weight: float,
    eps: float = 1e-6,
) -> GroupAdvantages:
    """Advantages for ONE group of n rows (docs/design.md#advantages).

    scores: float [n]; is_reference, valid: bool [n]. Invalid rows (failed judgments) get
    A = 0, are left out of the statistics and out of the loss; their scores may be nan.
    A group with fewer than 2 valid policy rows is dropped (all masks False).

    When every valid policy row has the same score (std = 0) all advantages are 0, the
    reference row's too: the formula would give it (S_ref - mean) / 1e-6, an unbounded step
    from one row, and a group whose policy rows cannot be told apart carries no GRPO signal.
    """
    if not (scores.shape == is_reference.shape == valid.shape) or scores.dim() != 1:
        raise ValueError(
            f"group_advantages: scores, is_reference and valid must be 1-D of one length, got "
            f"{tuple(scores.shape)}, {tuple(is_reference.shape)}, {tuple(valid.shape)}"
        )
    valid = valid.bool()
    is_reference = is_reference.bool()
    policy = valid & ~is_reference
    zeros = torch.zeros_like(scores)
    if int(policy.sum()) < 2:
        no_rows = torch.zeros_like(valid)
        return GroupAdvantages(zeros, no_rows, dropped=True, mean=math.nan, std=math.nan)

    # float64 so that equal scores give a std of exactly 0
    policy_scores = scores[policy].double()
    mean = policy_scores.mean()
    std = policy_scores.std()  # unbiased, as torch.std
    if std == 0:
        advantages = zeros
    else:
        raw = ((scores.double() - mean) / (std + eps)).to(scores.dtype)
        weights = torch.where(is_reference, reference_weight, 1.0).to(scores.dtype)
        advantages = torch.where(valid, raw * weights, zeros)
    loss_mask = valid & ~(is_reference & (reference_weight == 0))
    return GroupAdvantages(advantages, loss_mask, dropped=False, mean=float(mean), std=float(std))


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    token_mask: Tensor,
    is_reference: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    total_tokens: int,
    behaviour_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One micro-batch's share of the step loss, and its metrics.

    logprobs, old_logprobs, token_mask (and behaviour_logprobs): [B, T];
    advantages, is_reference: [B]. token_mask must already be False on rows the group step
    left out (GroupAdvantages.loss_mask False).

    Per token, policy rows: -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A) with
    r = exp(logp - old_logp); reference rows (teacher forced): -A * logp.
    The loss is the SUM over masked tokens divided by `total_tokens`, the masked token count of
    the whole optimizer step (all micro-batches, all ranks, reference rows included), so the
    micro-batch losses add up to one token-mean however the rows were split.

    Off-policy rows (behaviour_logprobs given): the policy rows' per-token loss is multiplied by
    min(exp(old_logp - behaviour_logp), tis_cap), detached (truncated importance sampling).
    """
    mask = token_mask.bool()
    num_tokens = int(mask.sum())
    if total_tokens <= 0 or num_tokens > total_tokens:
        raise ValueError(
            f"policy_loss: total_tokens ({total_tokens}) must be > 0 and cover this "
            f"micro-batch's {num_tokens} masked tokens"
        )
    if behaviour_logprobs is not None and tis_cap is None:
        raise ValueError("policy_loss: behaviour_logprobs given without tis_cap")

    is_ref_tok = is_reference.bool()[:, None].expand_as(mask)
    policy_tok = mask & ~is_ref_tok
    adv = advantages[:, None].to(logprobs.dtype)

    # Mask log-ratios before exp: padding may hold any value, and inf * 0 = nan in backward.
    log_ratio = torch.where(policy_tok, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    policy_tok_loss = torch.maximum(-ratio * adv, -clipped_ratio * adv)

    metrics: dict[str, float] = {"num_tokens": float(num_tokens)}
    if behaviour_logprobs is not None:
        tis, capped = truncated_importance_weights(old_logprobs, behaviour_logprobs, policy_tok, tis_cap)
        policy_tok_loss = policy_tok_loss * tis
        metrics["tis_mean"] = _masked_mean(tis, policy_tok)
        metrics["tis_clipped_fraction"] = _masked_mean(capped.float(), policy_tok)

    tok_loss = torch.where(is_ref_tok, -adv * logprobs, policy_tok_loss)

    loss = torch.where(mask, tok_loss, 0.0).sum() / total_tokens

    with torch.no_grad():
        clipped = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
        metrics["clip_fraction"] = _masked_mean(clipped.float(), policy_tok)
        metrics["ratio_mean"] = _masked_mean(ratio, policy_tok)
        metrics["ratio_max"] = float(ratio[policy_tok].max()) if policy_tok.any() else 0.0
    return loss, metrics


def truncated_importance_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, token_mask: Tensor, tis_cap: float
) -> tuple[Tensor, Tensor]:
    """min(exp(old_logp - behaviour_logp), tis_cap) on masked tokens, 1 elsewhere (detached), and
    where the cap cut the weight. Equal old and behaviour logprobs give exactly 1."""
    # Mask before exp: padding may hold any value.
    log_w = torch.where(token_mask, old_logprobs - behaviour_logprobs, 0.0).detach()
    raw = torch.exp(log_w)
    return raw.clamp(max=tis_cap), raw > tis_cap


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of values where mask is True; 0.0 when nothing is masked in."""
    count = int(mask.sum())
    return float(torch.where(mask, values, 0.0).sum()) / count if count else 0.0
