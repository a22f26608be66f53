"""Group assembly: advantages per prompt, the reference injected with its weight, invalid and
stale rows refused."""
import math

import pytest

from actors.groups import GroupRow, assemble_batch
from reward.components import RewardBreakdown
from reward.worker import ScoredSample


def scored(score, valid=True):
    reward = RewardBreakdown(sq=0.5, self_rep=0.0, length_penalty=0.0, blank=0.0, scalar=score / 10, score=score,
                             word_count=10, target_words=10, length_ratio=1.0) if valid else None
    return ScoredSample("k", reward, None, None if valid else "HTTP 503", 1, 100, 20)


def row(uid, score, *, ref=False, valid=True, version=0, n_tokens=3):
    return GroupRow(uid, (1, 2), tuple(range(10, 10 + n_tokens)), scored(score, valid), ref, None if ref else version)


def test_policy_only_groups_get_standard_advantages():
    rows = [row("a", s) for s in (1.0, 2.0, 3.0, 4.0)]
    out = assemble_batch(rows, step=0, current_version=0, max_staleness=0, reference_weight=0.0, eps=1e-6)
    # mean 2.5, unbiased std sqrt(5/3) = 1.290994
    expected = [(s - 2.5) / (math.sqrt(5 / 3) + 1e-6) for s in (1.0, 2.0, 3.0, 4.0)]
    assert [r.advantage for r in out.batch.rows] == pytest.approx(expected)
    assert out.batch.num_tokens == 12 and out.policy_rewards == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_reference_row_is_scored_against_policy_statistics_and_weighted():
    rows = [row("a", s) for s in (1.0, 3.0)] + [row("a", 5.0, ref=True)]
    out = assemble_batch(rows, step=7, current_version=0, max_staleness=0, reference_weight=0.4, eps=0.0)
    # policy mean 2, std sqrt(2); reference A = 0.4 * (5 - 2) / sqrt(2)
    ref = [r for r in out.batch.rows if r.is_reference]
    assert len(ref) == 1 and ref[0].advantage == pytest.approx(0.4 * 3 / math.sqrt(2))
    assert out.reference_advantages == pytest.approx([0.4 * 3 / math.sqrt(2)])
    assert out.policy_rewards == pytest.approx([0.1, 0.3])  # the reference is not a policy reward


def test_invalid_rows_are_excluded_and_thin_groups_dropped():
    rows = [row("a", 1.0), row("a", 2.0), row("a", 9.0, valid=False),  # 2 valid policy rows: kept
            row("b", 1.0), row("b", 5.0, valid=False)]  # 1 valid policy row: dropped
    out = assemble_batch(rows, step=0, current_version=0, max_staleness=0, reference_weight=0.0, eps=1e-6)
    assert out.groups_dropped == 1
    assert len(out.batch.rows) == 2 and all(r.prompt_ids == (1, 2) for r in out.batch.rows)
    # group a: mean 1.5, std sqrt(0.5); A = +-0.5 / sqrt(0.5) = +-0.7071
    assert sorted(round(r.advantage, 4) for r in out.batch.rows) == [-0.7071, 0.7071]


def test_stale_rows_are_refused_and_counted():
    rows = [row("a", 1.0, version=3), row("a", 2.0, version=3), row("a", 3.0, version=2)]
    on_policy = assemble_batch(rows, step=0, current_version=3, max_staleness=0, reference_weight=0.0, eps=1e-6)
    assert on_policy.stale_refused == 1 and len(on_policy.batch.rows) == 2
    one_behind = assemble_batch(rows, step=0, current_version=3, max_staleness=1, reference_weight=0.0, eps=1e-6)
    assert one_behind.stale_refused == 0 and len(one_behind.batch.rows) == 3
    assert sorted(r.policy_lag for r in one_behind.batch.rows) == [0, 0, 1]  # the learner corrects lag-1 rows
    two_behind = assemble_batch([*rows, row("a", 4.0, version=1)], step=0, current_version=3, max_staleness=1,
                                reference_weight=0.0, eps=1e-6)
    assert two_behind.stale_refused == 1 and max(r.policy_lag for r in two_behind.batch.rows) == 1
