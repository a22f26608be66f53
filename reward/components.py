"""POLARIS reward components as pure functions (docs/design.md#per-story).

Flow for one response: find_story_start -> (judge sees the story and the prompt without its length
sentence) -> sq = rubric/100 -> story_scalar(sq, self_repetition, length_penalty, blank_flag,
judge_addressed) -> token_rewards -> sequence_score. score_response composes the story-side part
of that. Stdlib only (and the pure reward/addressing.py); no I/O.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace

from reward.addressing import judge_addressed as _addressing_signals

# "The story should be approximately 1,200 words long." -- the whole sentence, from just after
# the previous sentence end (or line start) through its own full stop. Group 1 is the number.
LENGTH_SENTENCE_RE = re.compile(
    r"[^.!?\n]*\bapproximately\s+(\d{1,3}(?:,\d{3})+|\d+)\s+words?\s+long\b[^.!?\n]*[.!?]?",
    re.IGNORECASE,
)


def parse_target_words(prompt_text: str) -> int | None:
    """N from the first length sentence in the prompt, or None if it has none."""
    m = LENGTH_SENTENCE_RE.search(prompt_text)
    return int(m.group(1).replace(",", "")) if m else None


def strip_length_sentence(prompt_text: str) -> str:
    """The prompt without any length sentence (the judge must not see the target)."""
    text = LENGTH_SENTENCE_RE.sub("", prompt_text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def find_story_start(response, think_end, *, thinking: bool) -> int:
    """Where the story begins in a response, given as token ids (think_end: the id of </think>) or
    as text (think_end: "</think>"): just after the FIRST think_end, where the model closed its
    thinking. Without one, a response to a prompt that opened thinking (thinking=True) never closed
    it and is all thinking (the story is empty); otherwise it is all story. The one rule for the
    judged text and for the thinking-token penalty (actors/codec.py applies it to token ids)."""
    try:
        k = response.index(think_end)
    except ValueError:
        return len(response) if thinking else 0
    return k + (len(think_end) if isinstance(response, str) else 1)


def word_count(text: str) -> int:
    return len(text.split())


def length_penalty(word_count: int, target_words: int, *, min_target: int = 150,
                   lo_frac: float = 0.15, lo_min: float = 350, lo_max: float = 1000,
                   hi_frac: float = 0.25, hi_min: float = 600, hi_max: float = 1500) -> float:
    """0 inside [T - tol_lo, T + tol_hi]; below it 1 - wc/(T - tol_lo); above it
    min(1, wc/(T + tol_hi) - 1); T = max(min_target, target). When T - tol_lo <= 0 the band
    starts at 0 words, so no count is "too short" (and nothing divides by T - tol_lo)."""
    t = max(min_target, target_words)
    tol_lo = min(max(lo_frac * t, lo_min), lo_max)
    tol_hi = min(max(hi_frac * t, hi_min), hi_max)
    lo, hi = t - tol_lo, t + tol_hi
    if word_count < lo:  # implies lo > 0
        return 1.0 - word_count / lo
    if word_count > hi:
        return min(1.0, word_count / hi - 1.0)
    return 0.0


def blank_flag(story: str, *, min_visible_ratio: float = 0.10, min_words: int = 150) -> float:
    """1.0 if the story is empty, its visible characters (printable, non-whitespace) are under
    min_visible_ratio of all characters, or it has fewer than min_words words; else 0.0."""
    if not story:
        return 1.0
    visible = sum(1 for ch in story if ch.isprintable() and not ch.isspace())
    blank = visible / len(story) < min_visible_ratio or word_count(story) < min_words
    return 1.0 if blank else 0.0


REP_WINDOW = 64  # tokens before the current one that r_local looks at


@dataclass(frozen=True)
class Repetition:
    r4: float
    r_local: float
    r_dup: float
    score: float


def _tokens(text: str) -> list[str]:
    """Token = a whitespace-separated word, lowercased, with every non-alphanumeric character
    removed ("Don't," -> "dont"); words left empty (pure punctuation) are dropped."""
    out = ["".join(ch for ch in w.lower() if ch.isalnum()) for w in text.split()]
    return [t for t in out if t]


def self_repetition(story: str) -> Repetition:
    """score = min(1.5, 0.8*(0.7*max(0, r4 - 0.08) + 0.3*r_local) + 0.4*r_dup), where
    r4      = (4-grams of tokens equal to an earlier 4-gram) / (all 4-grams); 0 if none;
    r_local = (tokens i that equal one of tokens i-64 .. i-1) / (all tokens); 0 if none;
    r_dup   = (non-empty lines, whitespace-stripped, equal to an earlier one) / (non-empty
              lines); 0 if none.
    The fractions lie in [0, 1], so score <= 0.8*(0.7*0.92 + 0.3) + 0.4 = 1.1552: the 1.5 cap
    (kept from the original formula) never binds."""
    toks = _tokens(story)
    grams = [tuple(toks[i:i + 4]) for i in range(len(toks) - 3)]
    r4 = _repeat_fraction(grams)
    local = sum(1 for i, t in enumerate(toks) if t in toks[max(0, i - REP_WINDOW):i])
    r_local = local / len(toks) if toks else 0.0
    r_dup = _repeat_fraction([ln.strip() for ln in story.splitlines() if ln.strip()])
    score = min(1.5, 0.8 * (0.7 * max(0.0, r4 - 0.08) + 0.3 * r_local) + 0.4 * r_dup)
    return Repetition(r4, r_local, r_dup, score)


def _repeat_fraction(items: list) -> float:
    """Fraction of items equal to an earlier item (= 1 - distinct/total)."""
    return (len(items) - len(Counter(items))) / len(items) if items else 0.0


def story_scalar(sq: float, self_rep: float, lp: float, blank: float, *, w_self_rep: float = 1.5,
                 w_length: float = 0.8, w_blank: float = 1.0, judge_addressed: float = 0.0,
                 w_judge_addressed: float = 1.0) -> float:
    """judge_addressed: 1.0 when the story addresses its grader (reward/addressing.py), else 0.0."""
    s = sq - w_self_rep * self_rep - w_length * lp - w_blank * blank
    return s - w_judge_addressed * judge_addressed if judge_addressed else s


def token_rewards(num_tokens: int, story_start: int, scalar: float, *, truncated: bool,
                  think_budget: int = 3072, think_penalty: float = 0.05, trunc_start: int = 7680,
                  trunc_scale: float = 512, clip: float = 2.0) -> list[float]:
    """Per-token rewards of one response of num_tokens tokens whose story starts at index
    story_start (thinking = indices below it). Every token gets scalar; each thinking token at
    index >= think_budget gets -think_penalty more; a truncated response of >= trunc_start tokens
    gets -(num_tokens - trunc_start)/trunc_scale in total, split evenly over its story tokens, or
    over all tokens when it has none (it never closed its thinking); each clipped to +-clip."""
    story_start = min(max(story_start, 0), num_tokens)
    r = [scalar] * num_tokens
    for i in range(think_budget, story_start):
        r[i] -= think_penalty
    if truncated and num_tokens >= trunc_start and num_tokens > 0:
        first = story_start if story_start < num_tokens else 0
        share = (num_tokens - trunc_start) / trunc_scale / (num_tokens - first)
        for i in range(first, num_tokens):
            r[i] -= share
    return [min(clip, max(-clip, x)) for x in r]


SCORE_MODES = ("sum", "mean", "last")


def sequence_score(rewards: list[float], mode: str = "sum") -> float:
    """The GRPO score S of one row. "sum" (the original's default) makes S grow with length:
    roughly num_tokens x scalar, so longer stories amplify the signal either way. An empty row
    scores 0.0 in every mode."""
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode {mode!r}; valid modes: {', '.join(SCORE_MODES)}")
    if not rewards:
        return 0.0
    if mode == "sum":
        return float(sum(rewards))
    if mode == "mean":
        return float(sum(rewards) / len(rewards))
    return float(rewards[-1])


@dataclass(frozen=True)
class RewardParams:
    """Every reward knob; the defaults are POLARIS training (docs/design.md#knobs)."""
    min_target: int = 150
    lo_frac: float = 0.15
    lo_min: float = 350
    lo_max: float = 1000
    hi_frac: float = 0.25
    hi_min: float = 600
    hi_max: float = 1500
    min_visible_ratio: float = 0.10
    min_words: int = 150
    w_self_rep: float = 1.5
    w_length: float = 0.8
    w_blank: float = 1.0
    w_judge_addressed: float = 1.0  # subtracted from s when the story addresses the judge
    think_budget: int = 3072
    think_penalty: float = 0.05
    trunc_start: int = 7680
    trunc_scale: float = 512
    clip: float = 2.0
    score_mode: str = "sum"

    @classmethod
    def from_config(cls, r, *, validation: bool = False) -> "RewardParams":
        """From conf.schema's reward section (cfg.reward); validation: its val_weights."""
        w = r.val_weights if validation else r.weights
        return cls(
            min_target=r.length.min_target, lo_frac=r.length.lo_frac, lo_min=r.length.lo_min, lo_max=r.length.lo_max,
            hi_frac=r.length.hi_frac, hi_min=r.length.hi_min, hi_max=r.length.hi_max,
            min_visible_ratio=r.blank_min_visible_ratio, min_words=r.blank_min_words,
            w_self_rep=w.self_rep, w_length=w.length, w_blank=w.blank, w_judge_addressed=r.judge_addressed_penalty,
            think_budget=r.think_budget_tokens, think_penalty=r.think_overflow_penalty,
            trunc_start=r.truncation_start_tokens, trunc_scale=r.truncation_scale_tokens,
            clip=r.token_clip, score_mode=r.score_mode,
        )

    @classmethod
    def validation(cls, **overrides) -> "RewardParams":
        """Validation weights: self_rep 0.8, length 0.2, blank 1.0 (other knobs as training)."""
        return replace(cls(w_self_rep=0.8, w_length=0.2, w_blank=1.0), **overrides)


@dataclass(frozen=True)
class RewardBreakdown:
    sq: float
    self_rep: float
    length_penalty: float
    blank: float
    scalar: float
    score: float
    word_count: int
    target_words: int | None
    length_ratio: float | None  # word_count / target_words; None without a target
    judge_addressed: float = 0.0  # 1.0: the story addresses its grader (reward/addressing.py)


def score_response(sq: float, story: str, target_words: int | None, num_tokens: int,
                   story_start: int, truncated: bool,
                   params: RewardParams = RewardParams()) -> RewardBreakdown:
    """Reward of one response (policy or reference row) given its judge score sq = rubric/100.
    A prompt without a length sentence (target_words None) gets no length penalty."""
    p = params
    wc = word_count(story)
    lp = 0.0 if target_words is None else length_penalty(
        wc, target_words, min_target=p.min_target, lo_frac=p.lo_frac, lo_min=p.lo_min,
        lo_max=p.lo_max, hi_frac=p.hi_frac, hi_min=p.hi_min, hi_max=p.hi_max)
    blank = blank_flag(story, min_visible_ratio=p.min_visible_ratio, min_words=p.min_words)
    rep = self_repetition(story).score
    addressed = 1.0 if _addressing_signals(story) else 0.0
    s = story_scalar(sq, rep, lp, blank, w_self_rep=p.w_self_rep, w_length=p.w_length,
                     w_blank=p.w_blank, judge_addressed=addressed,
                     w_judge_addressed=p.w_judge_addressed)
    rewards = token_rewards(num_tokens, story_start, s, truncated=truncated,
                            think_budget=p.think_budget, think_penalty=p.think_penalty,
                            trunc_start=p.trunc_start, trunc_scale=p.trunc_scale, clip=p.clip)
    return RewardBreakdown(sq=sq, self_rep=rep, length_penalty=lp, blank=blank, scalar=s,
                           score=sequence_score(rewards, p.score_mode), word_count=wc,
                           target_words=target_words,
                           length_ratio=wc / target_words if target_words else None,
                           judge_addressed=addressed)
