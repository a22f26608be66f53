"""Reward components against hand-computed values (docs/design.md#per-story)."""

import dataclasses

import pytest

from reward.components import (
    LENGTH_SENTENCE_RE, RewardBreakdown, RewardParams, Repetition, blank_flag, length_penalty,
    parse_target_words, score_response, self_repetition, sequence_score, find_story_start,
    story_scalar, strip_length_sentence, token_rewards, word_count,
)

approx = pytest.approx

# ---------------------------------------------------------------- length sentence


def test_parse_target_words_plain_and_with_commas_and_case():
    assert parse_target_words("A lighthouse. The story should be approximately 800 words long.") == 800
    assert parse_target_words("the story SHOULD be Approximately 1,200 words long.") == 1200
    assert parse_target_words("Your story should be approximately 12,000 words long!") == 12000


def test_parse_target_words_absent():
    assert parse_target_words("Write about a dragon who hoards words.") is None
    assert parse_target_words("Write approximately 800 words.") is None  # not "words long"
    assert LENGTH_SENTENCE_RE.search("about 800 words long") is None


def test_strip_length_sentence_removes_the_whole_sentence_only():
    prompt = ("Write a story about a lighthouse keeper. The story should be approximately "
              "1,200 words long. Make it sad.")
    assert strip_length_sentence(prompt) == "Write a story about a lighthouse keeper. Make it sad."


def test_strip_length_sentence_on_its_own_line_and_absent():
    prompt = "Prompt: a dragon.\n\nThe story should be approximately 2,500 words long.\n"
    assert strip_length_sentence(prompt) == "Prompt: a dragon."
    assert strip_length_sentence("  No target here.  ") == "No target here."


# ---------------------------------------------------------------- split / count


THINK_END = 7  # the id of </think> in the token-id cases


@pytest.mark.parametrize("thinking", [True, False])
def test_the_story_starts_after_the_first_close_in_text_and_in_token_ids(thinking):
    text = "<think>\nplan it\n</think>\n\nOnce upon a time."
    assert text[find_story_start(text, "</think>", thinking=thinking):] == "\n\nOnce upon a time."
    assert find_story_start((3, 4, THINK_END, 5, 6), THINK_END, thinking=thinking) == 3


def test_a_repeated_close_leaves_the_later_ones_in_the_story():
    text = "<think>a</think>b</think> story"
    assert text[find_story_start(text, "</think>", thinking=True):] == "b</think> story"
    assert find_story_start((1, THINK_END, 2, THINK_END, 3), THINK_END, thinking=True) == 2


def test_an_unclosed_response_is_all_thinking_when_the_prompt_opened_thinking():
    assert find_story_start("<think>still thinking", "</think>", thinking=True) == len("<think>still thinking")
    assert find_story_start((1, 2, 3), THINK_END, thinking=True) == 3


def test_a_response_without_markers_is_all_story_when_thinking_is_off():
    assert find_story_start("Just a story.", "</think>", thinking=False) == 0
    assert find_story_start((1, 2, 3), THINK_END, thinking=False) == 0
    assert find_story_start((), THINK_END, thinking=True) == 0


def test_word_count_splits_on_any_whitespace():
    assert word_count("a  b\nc\t d") == 4
    assert word_count("   ") == 0


# ---------------------------------------------------------------- length penalty


def test_length_penalty_default_band_edges_are_free():
    # T=800: tol_lo=clip(120, 350, 1000)=350, tol_hi=clip(200, 600, 1500)=600 -> band [450, 1400]
    assert length_penalty(450, 800) == 0.0
    assert length_penalty(1400, 800) == 0.0
    assert length_penalty(800, 800) == 0.0


def test_length_penalty_below_band():
    assert length_penalty(225, 800) == approx(0.5)   # 1 - 225/450
    assert length_penalty(0, 800) == 1.0             # 1 - 0/450
    # T=4000: tol_lo=clip(600, 350, 1000)=600 -> lower edge 3400; 1 - 1700/3400
    assert length_penalty(1700, 4000) == approx(0.5)


def test_length_penalty_above_band_and_cap():
    assert length_penalty(2100, 800) == approx(0.5)    # 2100/1400 - 1
    assert length_penalty(5000, 800) == 1.0            # min(1, 5000/1400 - 1 = 2.57)
    # T=4000: tol_hi=clip(1000, 600, 1500)=1000 -> upper edge 5000; 6000/5000 - 1
    assert length_penalty(6000, 4000) == approx(0.2)
    # T=10000: tol_hi=clip(2500, 600, 1500)=1500 (cap) -> 11500; 13800/11500 - 1
    assert length_penalty(13800, 10000) == approx(0.2)
    # T=10000: tol_lo=clip(1500, 350, 1000)=1000 (cap) -> 9000 is still in band
    assert length_penalty(9000, 10000) == 0.0


def test_length_penalty_small_target_uses_min_target_and_empty_lower_band():
    # target 50 -> T=150; tol_lo=350 -> T - tol_lo = -200 <= 0: nothing is too short
    assert length_penalty(0, 50) == 0.0
    # tol_hi=600 -> upper edge 750; 900/750 - 1 = 0.2; 1500/750 - 1 = 1.0
    assert length_penalty(900, 50) == approx(0.2)
    assert length_penalty(1500, 50) == 1.0


def test_length_penalty_tiny_config_floors():
    tiny = dict(min_target=20, lo_min=5, lo_max=50, hi_min=10, hi_max=100)
    # T=40: tol_lo=clip(6, 5, 50)=6, tol_hi=clip(10, 10, 100)=10 -> band [34, 50]
    assert length_penalty(34, 40, **tiny) == 0.0
    assert length_penalty(50, 40, **tiny) == 0.0
    assert length_penalty(17, 40, **tiny) == approx(0.5)   # 1 - 17/34
    assert length_penalty(60, 40, **tiny) == approx(0.2)   # 60/50 - 1
    # target 10 -> T=20: tol_lo=clip(3, 5, 50)=5 -> 15; tol_hi=clip(5, 10, 100)=10 -> 30
    assert length_penalty(12, 10, **tiny) == approx(0.2)   # 1 - 12/15
    assert length_penalty(36, 10, **tiny) == approx(0.2)   # 36/30 - 1


# ---------------------------------------------------------------- blank


def test_blank_by_word_count():
    assert blank_flag("w " * 150) == 0.0   # 150 words, visible 150/300
    assert blank_flag("w " * 149) == 1.0   # 149 < 150 words
    assert blank_flag("a b c", min_words=3) == 0.0


def test_blank_by_visible_ratio():
    assert blank_flag(("a" + " " * 9) * 150) == 0.0    # 150/1500 = 0.10, not < 0.10
    assert blank_flag(("a" + " " * 10) * 150) == 1.0   # 150/1650 = 0.09
    # control characters are not visible: 150 visible of 150*12 = 1800 chars (0.083), 150 words
    assert blank_flag(("a" + "\x00" * 10 + " ") * 150) == 1.0


def test_blank_empty_story():
    assert blank_flag("") == 1.0
    assert blank_flag("", min_words=0) == 1.0


# ---------------------------------------------------------------- self-repetition


def test_self_repetition_ngrams_and_window_with_case_and_punctuation():
    # tokens: the cat sat on the mat the cat sat on the mat (12)
    # 4-grams: 9; the last three repeat 4-grams 0, 1, 2 -> r4 = 3/9
    # r_local: idx 4 "the", then idx 6..11 all seen -> 7/12; one line -> r_dup = 0
    # score = 0.8*(0.7*(1/3 - 0.08) + 0.3*7/12) = 0.8*(0.177333 + 0.175) = 0.281867
    rep = self_repetition("The cat sat on the mat. The CAT, sat on the mat!")
    assert rep.r4 == approx(1 / 3)
    assert rep.r_local == approx(7 / 12)
    assert rep.r_dup == 0.0
    assert rep.score == approx(0.2818667, abs=1e-6)


def test_self_repetition_duplicate_lines():
    # non-empty stripped lines: Hello there. x3, Goodbye now. -> r_dup = 2/4
    # tokens: hello there hello there hello there goodbye now (8)
    # 4-grams 5, the 3rd repeats the 1st -> r4 = 1/5; r_local: idx 2..5 -> 4/8
    # score = 0.8*(0.7*0.12 + 0.3*0.5) + 0.4*0.5 = 0.8*0.234 + 0.2 = 0.3872
    rep = self_repetition("Hello there.\n\nHello there.\n  Hello there.  \nGoodbye now.\n")
    assert rep == Repetition(r4=approx(0.2), r_local=approx(0.5), r_dup=approx(0.5),
                             score=approx(0.3872))


def test_self_repetition_local_window_is_64_tokens():
    inside = " ".join(f"w{i}" for i in range(64)) + " w0"   # w0 is 64 tokens back: seen
    outside = " ".join(f"w{i}" for i in range(65)) + " w0"  # 65 tokens back: not seen
    assert self_repetition(inside).r_local == approx(1 / 65)
    assert self_repetition(outside).r_local == 0.0


def test_self_repetition_r4_below_threshold_counts_nothing():
    # all distinct: r4 = 0 -> max(0, 0 - 0.08) = 0; score 0
    assert self_repetition("one two three four five six").score == 0.0
    assert self_repetition("").score == 0.0


def test_self_repetition_maximal_text_stays_below_cap():
    # "a" on 1000 lines: r4 = 996/997, r_local = 999/1000, r_dup = 999/1000
    # score = 0.8*(0.7*(0.998997 - 0.08) + 0.3*0.999) + 0.4*0.999 = 1.153998 (< 1.5 cap)
    rep = self_repetition("a\n" * 1000)
    assert rep.r4 == approx(996 / 997)
    assert rep.score == approx(1.1539983, abs=1e-6)
    assert rep.score <= 1.1552


# ---------------------------------------------------------------- scalar, tokens, score


def test_story_scalar_training_and_validation_weights():
    assert story_scalar(0.7, 0.2, 0.5, 0.0) == approx(0.0)            # 0.7 - 0.3 - 0.4
    assert story_scalar(0.9, 0.1, 0.25, 1.0) == approx(-0.45)         # 0.9-0.15-0.2-1
    v = RewardParams.validation()
    assert story_scalar(0.9, 0.1, 0.25, 1.0, w_self_rep=v.w_self_rep, w_length=v.w_length,
                        w_blank=v.w_blank) == approx(-0.23)           # 0.9-0.08-0.05-1


def test_token_rewards_think_overflow():
    # thinking = idx 0..5, budget 4 -> idx 4, 5 get -0.05
    r = token_rewards(10, 6, 0.5, truncated=False, think_budget=4)
    assert r == approx([0.5] * 4 + [0.45] * 2 + [0.5] * 4)
    # budget past the end of thinking: no penalty
    assert token_rewards(10, 3, 0.5, truncated=False, think_budget=4) == approx([0.5] * 10)


def test_token_rewards_truncation_spread_over_story():
    # total (10 - 6)/2 = 2 over story idx 4..9 (6 tokens) -> -1/3 each
    r = token_rewards(10, 4, 0.0, truncated=True, trunc_start=6, trunc_scale=2)
    assert r == approx([0.0] * 4 + [-1 / 3] * 6)
    assert sum(r) == approx(-2.0)
    assert token_rewards(10, 4, 0.0, truncated=False, trunc_start=6, trunc_scale=2) == [0.0] * 10
    assert token_rewards(5, 4, 0.0, truncated=True, trunc_start=6, trunc_scale=2) == [0.0] * 5


def test_token_rewards_truncation_without_story_spreads_over_all():
    # never closed its thinking: total 2 over all 10 tokens -> -0.2 each
    r = token_rewards(10, 10, 0.0, truncated=True, trunc_start=6, trunc_scale=2)
    assert r == approx([-0.2] * 10)


def test_token_rewards_clipping():
    # -1.9 - 0.5 = -2.4 -> -2.0 on thinking idx 0, 1 (budget 0)
    r = token_rewards(4, 2, -1.9, truncated=False, think_budget=0, think_penalty=0.5)
    assert r == approx([-2.0, -2.0, -1.9, -1.9])
    assert token_rewards(3, 0, 2.5, truncated=False) == [2.0] * 3
    assert token_rewards(3, 0, 2.5, truncated=False, clip=3.0) == [2.5] * 3


def test_token_rewards_training_defaults():
    # 8192 tokens, story from 4000: idx 3072..3999 (928) get 0.45; truncation total
    # (8192 - 7680)/512 = 1.0 over 4192 story tokens.
    # sum = 3072*0.5 + 928*0.45 + 4192*0.5 - 1 = 1536 + 417.6 + 2096 - 1 = 4048.6
    r = token_rewards(8192, 4000, 0.5, truncated=True)
    assert r[3071] == 0.5 and r[3072] == approx(0.45)
    assert r[4000] == approx(0.5 - 1 / 4192)
    assert sum(r) == approx(4048.6)


def test_sequence_score_modes():
    assert sequence_score([1.0, 2.0, 3.0]) == 6.0
    assert sequence_score([1.0, 2.0, 3.0], "mean") == 2.0
    assert sequence_score([1.0, 2.0, 3.0], "last") == 3.0
    assert sequence_score([], "mean") == 0.0
    with pytest.raises(ValueError, match="sum, mean, last"):
        sequence_score([1.0], "max")


# ---------------------------------------------------------------- end to end


STORY_200 = " ".join(f"w{i}" for i in range(200))  # 200 distinct words on one line: self_rep 0


def test_score_response_training():
    # target 800 -> band [450, 1400]; lp = 1 - 200/450 = 5/9; blank 0; self_rep 0
    # s = 0.8 - 0.8*5/9 = 0.355556; 100 tokens, no overflow/truncation -> S = 35.5556
    b = score_response(0.8, STORY_200, 800, num_tokens=100, story_start=10, truncated=False)
    assert b == RewardBreakdown(sq=0.8, self_rep=0.0, length_penalty=approx(5 / 9), blank=0.0,
                                scalar=approx(0.8 - 0.8 * 5 / 9), score=approx(35.5556, abs=1e-3),
                                word_count=200, target_words=800, length_ratio=0.25)


def test_score_response_validation_weights_and_mean_mode():
    # s = 0.8 - 0.2*5/9 = 0.688889; sum over 100 tokens = 68.8889
    b = score_response(0.8, STORY_200, 800, 100, 10, False, RewardParams.validation())
    assert b.scalar == approx(0.688889, abs=1e-6)
    assert b.score == approx(68.8889, abs=1e-3)
    m = score_response(0.8, STORY_200, 800, 100, 10, False, RewardParams(score_mode="mean"))
    assert m.score == approx(m.scalar)


def test_score_response_blank_and_no_target():
    # no target: lp 0; "" is blank -> s = 0.5 - 1 = -0.5; 4 tokens -> S = -2
    b = score_response(0.5, "", None, num_tokens=4, story_start=4, truncated=False)
    assert (b.length_penalty, b.blank, b.length_ratio) == (0.0, 1.0, None)
    assert b.scalar == approx(-0.5) and b.score == approx(-2.0)


def test_params_are_frozen_and_validation_keeps_other_knobs():
    v = RewardParams.validation(min_target=20)
    assert (v.w_self_rep, v.w_length, v.w_blank, v.min_target) == (0.8, 0.2, 1.0, 20)
    assert v.think_budget == RewardParams().think_budget == 3072
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.clip = 1.0


def test_reward_params_come_from_the_config_s_reward_section():
    from conf import load_config

    r = load_config(["conf=tiny", "reward.weights.length=0.3", "reward.val_weights.length=0.1"]).reward
    train, val = RewardParams.from_config(r), RewardParams.from_config(r, validation=True)
    assert (train.min_target, train.lo_min, train.score_mode, train.trunc_start) == (20, 5, "mean", 240)
    assert (train.w_length, val.w_length) == (0.3, 0.1)
    assert val.w_self_rep == r.val_weights.self_rep and train.w_self_rep == r.weights.self_rep
