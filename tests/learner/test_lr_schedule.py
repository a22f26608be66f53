"""The learning rate per training step against hand-computed values."""
import pytest

from learner.lr_schedule import learning_rate


def lrs(total=5, **kw):
    return [learning_rate(s, lr=1.0, total_steps=total, **kw) for s in range(total)]


def test_constant_without_warmup_is_the_original_run():
    assert lrs() == [1.0] * 5


def test_warmup_rises_linearly_to_the_peak_at_its_last_step():
    assert lrs(warmup_steps=4) == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_linear_decays_to_min_ratio_at_the_last_step():
    # warmup 1: step 0 at the peak; steps 1..4 at progress 0, 1/3, 2/3, 1 toward 0.1
    assert lrs(warmup_steps=1, schedule="linear", min_ratio=0.1) == pytest.approx([1.0, 1.0, 0.7, 0.4, 0.1])


def test_cosine_passes_the_midpoint_and_ends_at_min_ratio():
    # no warmup: progress 0, 1/4, 1/2, 3/4, 1; cos(pi/4) = 0.70711
    expected = [1.0, 0.5 * (1 + 0.70711), 0.5, 0.5 * (1 - 0.70711), 0.0]
    assert lrs(schedule="cosine") == pytest.approx(expected, abs=1e-5)


def test_a_single_decay_step_and_an_unknown_schedule():
    assert learning_rate(1, lr=2.0, total_steps=2, warmup_steps=1, schedule="cosine", min_ratio=0.5) == 1.0
    with pytest.raises(ValueError, match="cosine"):
        learning_rate(0, lr=1.0, total_steps=2, schedule="exponential")
