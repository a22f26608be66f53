"""Write the tiny synthetic story data set (data/tiny/*.jsonl), deterministically.

    python data/make_synthetic.py            # rewrites data/tiny/{train,val,corpus,test}.jsonl
                                             # and data/synthetic/test.jsonl

Every story is assembled from the word lists and sentence templates below (no copyrighted
text). Rows follow the POLARIS release schema:
    {"uid", "prompt", "target_word_count", "story", "ground_truth_reasoning"}
and every prompt ends with "The story should be approximately N words long."

- train.jsonl / val.jsonl: RL prompts with targets uniform in 80..140 words; "story" is a
  human-reference stand-in written to about the target length (used by HRI).
- test.jsonl: held-out prompts for evaluation by requested length (eval/), targets spread evenly
  over the six buckets of eval/metrics.py at the tiny scale (eval.length_scale 0.035: 35..420
  words; the training targets sit in the first two), no reference story (the POLARIS test split's
  schema: uid, prompt, target_word_count). data/synthetic/test.jsonl is the same at full scale
  (1,000..12,000 words) for a GPU run without the POLARIS test split.
- corpus.jsonl: stories of 30..120 words for the tokenizer and the tiny model's warm-up.
  They are deliberately shorter on average than the RL targets, so the warmed-up policy
  under-shoots and the length reward has something to teach.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.metrics import bucket_edges  # noqa: E402

SEED = 20261128
OUT_DIR = Path(__file__).resolve().parent / "tiny"
TEST_SETS = {  # path: (bucket scale, prompts per bucket)
    OUT_DIR / "test.jsonl": (0.035, 4),
    Path(__file__).resolve().parent / "synthetic" / "test.jsonl": (1.0, 8),
}
SPLITS = {  # name: (rows, min target words, max target words)
    "train": (256, 80, 140),
    "val": (32, 80, 140),
    "corpus": (1600, 30, 120),
}

NAMES = [
    "Mara", "Tobin", "Elsa", "Nico", "Priya", "Oskar", "Lena", "Jonah", "Ines", "Felix",
    "Ada", "Ravi", "Wren", "Milo", "Hana", "Teo", "Greta", "Sami", "Iris", "Bram",
    "Noor", "Cal", "Yuki", "Dara", "Emil", "Zora", "Pablo", "Rosa", "Kofi", "Tess",
]
ROLES = [
    "baker", "lighthouse keeper", "young sailor", "clockmaker", "gardener", "librarian",
    "shepherd", "painter", "mail carrier", "fisher", "beekeeper", "potter", "cartographer",
    "night guard", "street musician", "blacksmith", "teacher", "nurse", "farmer", "inventor",
]
PLACES = [
    "a quiet harbor town", "the edge of a pine forest", "a city of narrow bridges",
    "a village in the hills", "an island of salt marshes", "a busy market street",
    "an old mountain station", "a farm beside a slow river", "a desert oasis",
    "a snowy valley", "a lantern-lit canal", "a windy cliff top", "a small school by the sea",
    "a crowded train yard", "a garden behind a library", "a mill at the end of the road",
]
OBJECTS = [
    "a brass key", "a torn map", "a silver whistle", "a wooden box", "a faded letter",
    "a cracked compass", "a jar of blue seeds", "a broken lantern", "a red kite",
    "a small bell", "a paper boat", "a locked diary", "a glass marble", "a woolen scarf",
    "a clay bird", "a stopped watch",
]
GOALS = [
    "find a missing friend", "repair the old bridge", "win back a lost bet",
    "deliver a message before dark", "keep a promise to a sister", "save the harvest",
    "learn who sent the letter", "bring music back to the square", "cross the frozen lake",
    "open a door that no one could open", "finish a painting for the fair",
    "find the way home", "calm a frightened horse", "rebuild a fallen wall",
]
TROUBLES = [
    "a storm rolled in from the west", "the road was washed away", "a stranger blocked the path",
    "the lantern went out", "the river rose higher than ever", "the key would not turn",
    "the map ended at a blank edge", "the bell rang by itself", "the wind tore at the roof",
    "a fog came down over the water", "the clock in the square stopped", "the dogs began to bark",
]
FRIENDS = [
    "an old neighbor", "a talking crow", "a shy cousin", "a traveling tinker", "a patient mule",
    "a grumpy ferryman", "a kind widow", "a lost child", "a stray cat", "a retired captain",
]
FEELINGS = ["nervous", "hopeful", "tired", "brave", "curious", "stubborn", "afraid", "calm",
            "restless", "proud", "lonely", "cheerful"]
WEATHER = ["The morning was grey and cold.", "Rain tapped on the windows.",
           "The sun rose slowly over the roofs.", "A soft wind moved through the grass.",
           "Snow covered every step.", "The air smelled of salt and smoke.",
           "Clouds hung low over the hills.", "It was the warmest day of the year."]
TONES = ["gentle", "funny", "quiet", "hopeful", "bittersweet", "mysterious", "adventurous", "warm"]

OPENINGS = [
    "{name} was a {role} who lived in {place}.",
    "In {place}, there lived a {role} named {name}.",
    "Everyone in {place} knew {name}, the {role}.",
    "{name} had been a {role} in {place} for many years.",
    "Long ago, in {place}, a {role} called {name} woke before dawn.",
]
SETUPS = [
    "One day {name} found {object} under the floor.",
    "That morning a stranger left {object} at the door.",
    "{name} wanted to {goal}, but no one believed it could be done.",
    "For weeks {name} had dreamed of a way to {goal}.",
    "A note tied to {object} asked {name} to {goal}.",
]
MIDDLES = [
    "{pronoun_cap} walked for hours and felt {feeling}.",
    "{weather}",
    "Then {trouble}.",
    "{name} met {friend}, who offered to help.",
    "{name} held {object} tightly and kept going.",
    "{pronoun_cap} stopped to rest and looked back at {place}.",
    "The path grew steep, and {name} began to doubt the plan.",
    "{friend_cap} pointed to a light far away.",
    "{name} remembered what {possessive} mother used to say about patience.",
    "At the crossroads {name} chose the narrow road.",
    "{pronoun_cap} shared bread with {friend} and they talked until the fire was low.",
    "Nothing went as planned, and {name} felt {feeling}.",
    "Somewhere a door creaked open.",
    "{name} counted the steps out loud to stay {feeling}.",
    "The hours passed, and the shadows grew long.",
    "{pronoun_cap} tried again, slower this time.",
]
DIALOGUE = [
    '"Are you sure about this?" asked {friend}.',
    '"We have to try," said {name}.',
    '"I have never seen anything like it," {name} whispered.',
    '"Follow me," said {friend}, "and do not look down."',
    '"What if we are too late?" {name} asked.',
    '"Some things take time," said {friend}.',
    '"Thank you," said {name}, "I could not have done it alone."',
]
ENDINGS = [
    "In the end {name} managed to {goal}, and {place} was never quite the same.",
    "When evening came, {name} smiled, because the hard part was over.",
    "{name} put {object} on the shelf and went to sleep, {feeling} and happy.",
    "The next morning the whole town talked about what {name} had done.",
    "{name} never forgot that day, and neither did {friend}.",
    "And so {name} learned that help often comes from the least likely place.",
]
PROMPTS = [
    "Write {a_tone} story about a {role} named {name} who wants to {goal}.",
    "Tell {a_tone} tale set in {place} in which {object} changes everything.",
    "Write a story about {name}, a {role}, and {friend} on the day {trouble}.",
    "Write {a_tone} short story where a {role} must {goal} in {place}.",
    "Tell a story about {object} and the {role} who found it.",
]
PLANS = [
    "Open with {name} in {place}, bring in {object}, add a setback, end {tone}.",
    "Plan: {name} the {role} wants to {goal}; trouble; help from {friend}; calm ending.",
    "Keep it {tone}: the setting, then {trouble_short}, then {name} changed.",
    "{name} wants to {goal}. One line of dialogue, a turning point, a short ending.",
]
PRONOUNS = [("she", "her"), ("he", "his"), ("they", "their")]


def words(text: str) -> int:
    return len(text.split())


def make_cast(rng: random.Random) -> dict:
    pronoun, possessive = rng.choice(PRONOUNS)
    friend = rng.choice(FRIENDS)
    trouble = rng.choice(TROUBLES)
    tone = rng.choice(TONES)
    return {
        "name": rng.choice(NAMES), "role": rng.choice(ROLES), "place": rng.choice(PLACES),
        "object": rng.choice(OBJECTS), "goal": rng.choice(GOALS), "trouble": trouble,
        "trouble_short": trouble.split(" ", 1)[1] if trouble.startswith("a ") else trouble,
        "friend": friend, "friend_cap": friend[0].upper() + friend[1:],
        "tone": tone, "a_tone": ("an " if tone[0] in "aeiou" else "a ") + tone,
        "pronoun_cap": pronoun.capitalize(),
        "possessive": possessive, "feeling": rng.choice(FEELINGS),
        "weather": rng.choice(WEATHER),
    }


def write_story(rng: random.Random, cast: dict, target: int) -> str:
    """Sentences from the templates until the story is about `target` words long."""
    def fill(template: str) -> str:
        values = dict(cast, feeling=rng.choice(FEELINGS), weather=rng.choice(WEATHER))
        return template.format(**values)

    ending = fill(rng.choice(ENDINGS))
    sentences = [fill(rng.choice(OPENINGS))]
    if target > 40:
        sentences.append(fill(rng.choice(SETUPS)))
    middles = rng.sample(MIDDLES, len(MIDDLES)) * 3  # no sentence repeats before all are used
    while True:
        used = sum(words(s) for s in sentences) + words(ending)
        pool = DIALOGUE if rng.random() < 0.18 else None
        nxt = fill(rng.choice(pool)) if pool else fill(middles.pop())
        if used + words(nxt) > target + 4 or not middles:
            break
        sentences.append(nxt)
    sentences.append(ending)
    # Paragraphs of two to four sentences.
    paragraphs, i = [], 0
    while i < len(sentences):
        k = rng.randint(2, 4)
        paragraphs.append(" ".join(sentences[i:i + k]))
        i += k
    return "\n\n".join(paragraphs)


def make_row(rng: random.Random, split: str, index: int, lo: int, hi: int) -> dict:
    cast = make_cast(rng)
    target = rng.randint(lo, hi)
    story = write_story(rng, cast, target)
    if split == "corpus":  # the corpus asks for the length it actually has, rounded to 10
        target = max(10, round(words(story) / 10) * 10)
    prompt = (rng.choice(PROMPTS).format(**cast)
              + f" The story should be approximately {target} words long.")
    return {
        "uid": f"tiny-{split}-{index:05d}",
        "prompt": prompt,
        "target_word_count": target,
        "story": story,
        "ground_truth_reasoning": rng.choice(PLANS).format(**cast),
    }


def make_test_rows(rng: random.Random, name: str, scale: float, per_bucket: int) -> list[dict]:
    """Targets uniform inside each bucket (the closed last edge included), prompts only."""
    edges, rows = bucket_edges(scale), []
    for b in range(len(edges) - 1):
        lo, hi = round(edges[b]), round(edges[b + 1]) - (b < len(edges) - 2)
        for _ in range(per_bucket):
            cast, target = make_cast(rng), rng.randint(lo, hi)
            prompt = rng.choice(PROMPTS).format(**cast) + f" The story should be approximately {target:,} words long."
            rows.append({"uid": f"{name}-test-{len(rows):05d}", "prompt": prompt, "target_word_count": target})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for split, (n, lo, hi) in SPLITS.items():
        rng = random.Random(f"{SEED}-{split}")
        rows = [make_row(rng, split, i, lo, hi) for i in range(n)]
        path = OUT_DIR / f"{split}.jsonl"
        write_jsonl(path, rows)
        mean = sum(words(r["story"]) for r in rows) / n
        print(f"{path}: {n} rows, mean story {mean:.1f} words, {path.stat().st_size} bytes")
    for path, (scale, per_bucket) in TEST_SETS.items():
        rows = make_test_rows(random.Random(f"{SEED}-test-{scale}"), "tiny" if scale < 1 else "synthetic", scale,
                              per_bucket)
        write_jsonl(path, rows)
        print(f"{path}: {len(rows)} prompts, targets {rows[0]['target_word_count']}..{rows[-1]['target_word_count']}")


if __name__ == "__main__":
    main()
