"""Deterministic stand-in rubric scores from text features, for the loopback judge server.

Longer, more varied, paragraphed text with dialogue scores higher; repetition, cliches and
very short text are penalised. judge_json fills whatever response schema the client sent
(JSON-schema or OpenAPI spelling), so the answer is valid against the client's rubric.
"""

from __future__ import annotations

import re
from collections import Counter

_CLICHES = ("suddenly", "little did", "heart pounded", "once upon a time", "in the nick of time",
            "all of a sudden", "a chill ran down", "let out a breath", "testament to")
_TELLING = re.compile(r"\b(felt|feel|feeling|was (very )?(sad|happy|angry|afraid|scared))\b",
                      re.IGNORECASE)
_META = re.compile(r"^#|\*\*|word count|^title:", re.IGNORECASE | re.MULTILINE)

_PROMPT_STOPWORDS = {"write", "story", "about", "that", "with", "your", "their", "there", "this",
                     "from", "they", "have", "what", "when", "which", "where", "would", "should"}


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def story_features(story: str, prompt: str = "") -> dict[str, float]:
    """Text features in [0, 1] (1 = more of the thing named)."""
    words = re.findall(r"[a-z']+", story.lower())
    n = len(words)
    window = 50  # moving-average type/token ratio: independent of length
    ttrs = [len(set(words[i:i + window])) / window for i in range(0, max(1, n - window + 1), 10)]
    mattr = sum(ttrs) / len(ttrs) if n >= window else (len(set(words)) / n if n else 0.0)
    grams = [tuple(words[i:i + 4]) for i in range(n - 3)]
    rep4 = (sum(c for c in Counter(grams).values() if c > 1) / len(grams)) if grams else 0.0
    lines = [ln.strip() for ln in story.splitlines() if ln.strip()]
    dup = 1 - len(set(lines)) / len(lines) if lines else 0.0
    sents = [len(s.split()) for s in re.split(r"[.!?]+", story) if s.split()]
    mean = sum(sents) / len(sents) if sents else 0.0
    var = sum((x - mean) ** 2 for x in sents) / len(sents) if sents else 0.0
    p_words = set(re.findall(r"[a-z']{4,}", prompt.lower())) - _PROMPT_STOPWORDS
    return {
        "length": _clamp01(n / 400),
        "diversity": _clamp01((mattr - 0.4) / 0.4),
        "variety": _clamp01((var ** 0.5 / mean) / 0.6) if mean else 0.0,
        "paragraphs": _clamp01((len(re.split(r"\n\s*\n", story.strip())) - 1) / 5),
        "dialogue": _clamp01(story.count('"') / 2 / max(1, len(sents)) * 3),
        "punctuation": len(set(story) & set(",;:!?\"'-()")) / 10,
        "repetition": _clamp01(3 * rep4 + dup),
        "cliche": _clamp01(sum(story.lower().count(c) for c in _CLICHES) / 3),
        "telling": _clamp01(len(_TELLING.findall(story)) / max(1, len(sents)) * 4),
        "adverbs": _clamp01(sum(w.endswith("ly") for w in words) / max(1, n) * 15),
        "meta": _clamp01(len(_META.findall(story)) / 2),
        "on_prompt": len(p_words & set(words)) / len(p_words) if p_words else 1.0,
    }


def _fractions(f: dict[str, float]) -> dict[str, float]:
    """Per rubric dimension, the fraction of its maximum the stand-in judge awards;
    unknown schema properties ("") follow overall quality."""
    fresh = f["length"] * (1 - f["repetition"])
    quality = fresh * (0.4 + 0.3 * f["diversity"] + 0.15 * f["variety"] + 0.15 * f["paragraphs"])
    return {
        "plot": fresh * (0.5 + 0.5 * f["paragraphs"]),
        "character": fresh * (0.4 + 0.6 * f["dialogue"]),
        "prose": fresh * (0.3 + 0.4 * f["diversity"] + 0.3 * f["variety"]),
        "structure": fresh * (0.4 + 0.6 * f["paragraphs"]),
        "originality": fresh * f["diversity"],
        "emotional_impact": fresh * (0.4 + 0.3 * f["punctuation"] + 0.3 * f["dialogue"]),
        "cliche": f["cliche"],
        "purple_prose": f["adverbs"],
        "incoherence": 0.5 * (1 - f["diversity"]) + 0.5 * f["repetition"],
        "repetition": f["repetition"],
        "unresolved_threads": 1 - f["length"],
        "telling_not_showing": f["telling"],
        "flat_dialogue": 0.5 * (1 - f["dialogue"]),
        "pacing": 1 - f["variety"],
        "meta_artifacts": f["meta"],
        "prompt_neglect": 1 - f["on_prompt"],
        "bonus": _clamp01((quality - 0.75) * 4),
        "penalty": _clamp01(1 - f["length"] * 4) if f["length"] < 0.25 else f["repetition"] ** 2,
        "": quality,
    }


def _first_sentence(story: str) -> str:
    s = re.split(r"(?<=[.!?])\s", story.strip(), maxsplit=1)[0]
    return s[:120]


def first_key(d: dict, *keys: str):
    """d[k] for the first k of keys in d (the APIs accept camelCase and snake_case), or None."""
    for k in keys:
        if isinstance(d, dict) and k in d:
            return d[k]
    return None


def _scaled(schema: dict, x: float) -> int:
    lo, hi = int(first_key(schema, "minimum") or 0), int(first_key(schema, "maximum") or 10)
    return lo + round((hi - lo) * _clamp01(x))


def judge_json(schema: dict, prompt: str, story: str) -> dict:
    """A JSON object valid against schema (object of {evidence, score} objects, or of ints)."""
    frac = _fractions(story_features(story, prompt))
    quote = _first_sentence(story)
    out = {}
    for name, sub in (first_key(schema, "properties") or {}).items():
        x = frac.get(name, frac[""])
        sub_props = first_key(sub, "properties") or {}
        if sub_props:
            out[name] = {"evidence": quote if x > 0 else "",
                         "score": _scaled(sub_props.get("score", {}), x)}
        else:
            out[name] = _scaled(sub, x)
    return out


def break_schema(judgment: dict, variant: int) -> dict:
    """Valid JSON that violates the schema judgment was built for: variant 0 drops the first
    dimension, variant 1 gives it the score "high" instead of an integer."""
    broken = dict(judgment)
    if not broken:
        return {"score": "high"}
    name = next(iter(broken))
    if variant % 2 == 0:
        del broken[name]
    elif isinstance(broken[name], dict):
        broken[name] = {**broken[name], "score": "high"}
    else:
        broken[name] = "high"
    return broken
