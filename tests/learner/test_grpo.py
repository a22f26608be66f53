"""GRPO + HRI math against hand-computed values (docs/design.md#the-algorithm)."""

import math

import pytest
import torch

from learner.grpo import (
    group_advantages,
    policy_loss,
    reference_weight,
    truncated_importance_weights,
)

T, F = True, False


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=tol,
        atol=tol,
    )


# ---------------------------------------------------------------- reference_weight


def test_reference_weight_ramps_to_peak_and_stays():
    assert reference_weight(0) == 0.0  # 0.4 * 0 / 15: step 0 has no injected row
    close(reference_weight(7), 0.4 * 7 / 15)  # = 0.18667
    close(reference_weight(14), 0.4 * 14 / 15)
    assert reference_weight(15) == 0.4
    assert reference_weight(100) == 0.4  # decay_steps = 0: stay at peak


def test_reference_weight_without_warmup_is_peak_from_step_0():
    assert reference_weight(0, warmup_steps=0) == 0.4


def test_reference_weight_decays_linearly_to_final_then_stays():
    kw = dict(peak=0.4, warmup_steps=10, decay_steps=20, final_weight=0.1)
    close(reference_weight(5, **kw), 0.2)  # ramp: 0.4 * 5 / 10
    close(reference_weight(10, **kw), 0.4)  # decay starts at peak
    close(reference_weight(20, **kw), 0.25)  # 0.4 + (0.1 - 0.4) * 10/20
    close(reference_weight(30, **kw), 0.1)  # end of decay
    close(reference_weight(500, **kw), 0.1)  # stays at final
    close(reference_weight(20, peak=0.4, warmup_steps=10, decay_steps=20), 0.2)  # final 0


def test_reference_weight_rejects_negative_step():
    with pytest.raises(ValueError, match="step"):
        reference_weight(-1)


# ---------------------------------------------------------------- group_advantages

# scores 1,2,3,4: mean 2.5; unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3;
# std = sqrt(5/3) = 1.2909944. A = (S - 2.5) / 1.2909944 = -1.1618950, -0.3872983, +0.3872983,
# +1.1618950 (eps 1e-6 changes the 6th digit at most).
STD = math.sqrt(5 / 3)
A4 = [-1.5 / STD, -0.5 / STD, 0.5 / STD, 1.5 / STD]


def test_advantages_without_reference():
    g = group_advantages(
        torch.tensor([1.0, 2.0, 3.0, 4.0]),
        is_reference=torch.tensor([F, F, F, F]),
        valid=torch.tensor([T, T, T, T]),
        reference_weight=0.4,
    )
    close(g.advantages, A4)
    close(A4, [-1.1618950, -0.3872983, 0.3872983, 1.1618950])
    assert g.loss_mask.tolist() == [T, T, T, T]
    assert not g.dropped
    close(g.mean, 2.5)
    close(g.std, 1.2909944)


def test_reference_row_is_excluded_from_stats_and_scaled_by_weight():
    # stats from 1,2,3,4 only (mean 2.5, std 1.2909944); reference 5 -> (5 - 2.5) / 1.2909944
    # = 1.9364917, times w 0.4 = 0.7745967. Had the reference entered the stats, mean would be 3.
    g = group_advantages(
        torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]),
        is_reference=torch.tensor([F, F, F, F, T]),
        valid=torch.tensor([T, T, T, T, T]),
        reference_weight=0.4,
    )
    close(g.advantages, A4 + [0.7745967])
    assert g.loss_mask.tolist() == [T, T, T, T, T]
    close(g.mean, 2.5)


def test_reference_row_with_weight_zero_is_masked_out():
    g = group_advantages(
        torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]),
        is_reference=torch.tensor([F, F, F, F, T]),
        valid=torch.tensor([T, T, T, T, T]),
        reference_weight=0.0,
    )
    close(g.advantages, A4 + [0.0])
    assert g.loss_mask.tolist() == [T, T, T, T, F]


def test_invalid_rows_get_zero_and_are_excluded_from_stats():
    # the nan (failed judgment) row is skipped: stats again from 1,2,3,4
    g = group_advantages(
        torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0, 9.0]),
        is_reference=torch.tensor([F, F, F, F, F, T]),
        valid=torch.tensor([T, F, T, T, T, F]),
        reference_weight=0.4,
    )
    close(g.advantages, [A4[0], 0.0, A4[1], A4[2], A4[3], 0.0])
    assert g.loss_mask.tolist() == [T, F, T, T, T, F]
    close(g.mean, 2.5)


def test_fewer_than_two_valid_policy_rows_drops_the_group():
    g = group_advantages(
        torch.tensor([1.0, 2.0, 3.0]),
        is_reference=torch.tensor([F, F, T]),
        valid=torch.tensor([T, F, T]),  # one valid policy row; the reference does not count
        reference_weight=0.4,
    )
    assert g.dropped
    assert g.loss_mask.tolist() == [F, F, F]
    assert g.advantages.tolist() == [0.0, 0.0, 0.0]


def test_identical_rewards_give_exactly_zero_advantages():
    # std 0 -> every A is 0, the reference's too (instead of (0.9 - 0.1) / 1e-6 = 8e5)
    g = group_advantages(
        torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.9]),
        is_reference=torch.tensor([F, F, F, F, F, T]),
        valid=torch.tensor([T, T, T, T, T, T]),
        reference_weight=0.4,
    )
    assert g.advantages.tolist() == [0.0] * 6
    assert g.std == 0.0
    assert not g.dropped
    assert g.loss_mask.tolist() == [T] * 6


# ---------------------------------------------------------------- policy_loss

NO_REF = torch.tensor([F])


def test_asymmetric_clip_token_mean():
    # one row per case, one token each, clip_low 0.2 / high 0.28 -> ratio bounds [0.8, 1.28]
    #  A  ratio  -min(r*A, clip(r)*A)           clipped?
    # +1  1.5    -min(1.5, 1.28)   = -1.28      yes (above 1 + high, A > 0)
    # -1  0.5    -min(-0.5, -0.8)  = +0.8       yes (below 1 - low, A < 0)
    # +1  0.5    -min(0.5, 0.8)    = -0.5       no
    # -1  1.5    -min(-1.5, -1.28) = +1.5       no
    # +1  1.1    -min(1.1, 1.1)    = -1.1       no
    # +1  1.25   -min(1.25, 1.25)  = -1.25      no  (a symmetric 0.2 clip would cut it to 1.2)
    # -1  0.75   -min(-0.75, -0.8) = +0.8       yes (a 0.28 low clip would leave it at 0.75)
    # sum = -1.28 + 0.8 - 0.5 + 1.5 - 1.1 - 1.25 + 0.8 = -1.03; / 7 tokens = -0.1471429
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1, 1.25, 0.75])
    old = torch.full((7, 1), -2.0)
    lp = (old + ratios.log()[:, None]).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0])
    loss, m = policy_loss(
        lp, old, adv, torch.ones(7, 1, dtype=torch.bool), torch.zeros(7, dtype=torch.bool),
        total_tokens=7,
    )
    close(loss, -1.03 / 7)
    close(m["clip_fraction"], 3 / 7)
    close(m["ratio_mean"], (1.5 + 0.5 + 0.5 + 1.5 + 1.1 + 1.25 + 0.75) / 7)
    close(m["ratio_max"], 1.5)
    assert m["num_tokens"] == 7.0
    loss.backward()
    # clipped tokens give no gradient; unclipped: d(-r*A)/dlp = -r*A / 7
    close(lp.grad[:, 0], [0.0, 0.0, -0.5 / 7, 1.5 / 7, -1.1 / 7, -1.25 / 7, 0.0])


def test_loss_sums_over_micro_batches_to_one_token_mean():
    # 4 rows of lengths 5, 2, 6, 1 (14 tokens), row 3 a reference row. Split into
    # micro-batches {0, 1} (padded to T=5) and {2, 3} (padded to T=6): the summed losses and the
    # gradients must equal one batch of all 4 rows (padded to T=6).
    torch.manual_seed(0)
    lengths = [5, 2, 6, 1]
    total = sum(lengths)
    is_ref = torch.tensor([F, F, F, T])
    adv = torch.tensor([0.7, -1.3, 0.4, 0.3])
    lp_full = -torch.rand(4, 6) * 3
    old_full = lp_full + 0.3 * torch.randn(4, 6)  # ratios near 1, some clipped
    mask_full = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    lp_full[~mask_full] = 200.0  # garbage in padding must not leak (exp(200) = inf)

    lp1 = lp_full.clone().requires_grad_()
    loss_one, _ = policy_loss(lp1, old_full, adv, mask_full, is_ref, total_tokens=total)
    loss_one.backward()

    loss_split = 0.0
    grads = []
    for rows, width in (([0, 1], 5), ([2, 3], 6)):
        lp = lp_full[rows, :width].clone().requires_grad_()
        part, _ = policy_loss(
            lp, old_full[rows, :width], adv[rows], mask_full[rows, :width], is_ref[rows],
            total_tokens=total,
        )
        part.backward()
        loss_split = loss_split + part
        grads.append(lp.grad)

    close(loss_split, loss_one)
    close(grads[0], lp1.grad[[0, 1], :5])
    close(grads[1], lp1.grad[[2, 3], :6])
    assert lp1.grad[0, 5] == 0 and lp1.grad[1, 2:].abs().sum() == 0  # padding: no gradient

    # and the value is the plain token-mean over all 14 tokens
    ratio = (lp_full - old_full).exp()
    a = adv[:, None]
    tok = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
    tok[3] = -0.3 * lp_full[3]
    close(loss_one, tok[mask_full].sum() / 14)


def test_reference_row_loss_is_minus_a_logp_and_ignores_old_logprobs():
    # reference row, A = 0.4 * 1.5 = 0.6 (weight already applied), logp -1, -2, -3 (masked 3rd)
    # loss = -0.6 * (-1 - 2) / 2 = 0.9; grad = -0.6 / 2 = -0.3 on unmasked tokens
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[T, T, F]])
    losses = []
    for old in (torch.zeros(1, 3), torch.full((1, 3), -40.0)):  # ratio would be huge/clipped
        loss, m = policy_loss(lp, old, torch.tensor([0.6]), mask, torch.tensor([T]), total_tokens=2)
        losses.append(loss)
        assert m["clip_fraction"] == 0.0  # no policy tokens
    close(losses[0], 0.9)
    close(losses[1], 0.9)
    losses[0].backward()
    close(lp.grad, [[-0.3, -0.3, 0.0]])


def test_truncated_importance_sampling_caps_the_weight():
    # on-policy ratio 1 (old == lp), A = 1 -> per-token loss -1 before TIS.
    # old - behaviour = log 4, log 0.5, 0 -> weights min(4, 2) = 2, 0.5, 1
    # loss = -(2 + 0.5 + 1) / 3 = -7/6; tis_mean = 3.5 / 3; clipped fraction 1/3
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    lp = old.clone().requires_grad_()
    behaviour = (old - torch.tensor([[math.log(4.0), math.log(0.5), 0.0]])).requires_grad_()
    loss, m = policy_loss(
        lp, old, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool), NO_REF,
        total_tokens=3, behaviour_logprobs=behaviour, tis_cap=2.0,
    )
    close(loss, -7 / 6)
    close(m["tis_mean"], 3.5 / 3)
    close(m["tis_clipped_fraction"], 1 / 3)
    loss.backward()
    close(lp.grad, [[-2 / 3, -0.5 / 3, -1 / 3]])
    assert behaviour.grad is None  # the weight is a constant (detached)


def test_equal_old_and_behaviour_logprobs_give_a_weight_of_exactly_one():
    # padding (mask False) may hold anything, inf included: its weight is 1 and nothing is nan
    old = torch.tensor([[-0.123456789, -7.5, float("-inf")]])
    weights, capped = truncated_importance_weights(old, old.clone(), torch.tensor([[T, T, F]]), 2.0)
    assert weights.tolist() == [[1.0, 1.0, 1.0]]
    assert not capped.any()


def test_tis_needs_a_cap():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="tis_cap"):
        policy_loss(x, x, torch.ones(1), x.bool(), NO_REF, total_tokens=1, behaviour_logprobs=x)


def test_total_tokens_must_cover_the_micro_batch():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="total_tokens"):
        policy_loss(x, x, torch.ones(1), x == 0, NO_REF, total_tokens=2)
