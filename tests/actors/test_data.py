"""actors/data.py: loading and validating prompt files, dropping long prompts, resumable sampling."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.data import PromptRecord, PromptSampler, filter_long_prompts, load_prompts
from conf.errors import DataError

PROMPT_800 = "Write a story about a fox. Your story should be approximately 800 words long."


def release_row(uid="a", **overrides):
    row = {
        "uid": uid,
        "prompt": PROMPT_800,
        "target_word_count": 800,
        "story": "Once upon a time.",
        "ground_truth_reasoning": "Plan the fox.",
    }
    row.update(overrides)
    return row


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the two POLARIS file shapes (tests/conftest.py)


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_original_training_files_load_with_parsed_targets_and_derived_uids(polaris_files, suffix):
    train = load_prompts(getattr(polaris_files, f"training_{suffix}"), require_reference=True)
    val = load_prompts(polaris_files.validation_parquet, require_reference=True)
    assert len(train) == 8 and len(val) == 2
    # the files repeat their prompts verbatim; copies are numbered, not rejected
    assert len({r.uid for r in train}) == 8 and len({r.uid for r in val}) == 2
    assert train[2].uid == train[0].uid + "-1" and train[4].uid == train[0].uid + "-2"
    assert [r.target_words for r in train] == [800, 900] * 4
    assert [r.target_words for r in val] == [700, 700]
    first = train[0]
    assert first.messages == ({"role": "user", "content": "Write a short story about a ferry pilot who finds a "
                               "stowaway cat on the last crossing. Your story should be approximately 800 words long."},)
    assert first.story.startswith("Ilse had piloted the Aurelia")
    assert first.reasoning.startswith("Open on routine")


def test_derived_uids_are_stable_across_loads_and_reordering(polaris_files, tmp_path):
    once = load_prompts(polaris_files.training_parquet, require_reference=True)
    again = load_prompts(polaris_files.training_parquet, require_reference=True)
    assert [r.uid for r in once] == [r.uid for r in again]

    table = pq.read_table(polaris_files.training_parquet)
    reversed_path = tmp_path / "reversed.parquet"
    pq.write_table(table.take(list(range(table.num_rows - 1, -1, -1))), reversed_path)
    shuffled = load_prompts(reversed_path, require_reference=True)
    assert {r.uid: r.prompt_text for r in shuffled} == {r.uid: r.prompt_text for r in once}


@pytest.mark.parametrize("suffix,uids", [("parquet", ["0", "1", "2"]), ("jsonl", ["r0", "1", "r2"])])
def test_release_files_load_with_integer_and_string_uids(polaris_files, suffix, uids):
    records = load_prompts(getattr(polaris_files, f"release_{suffix}"), require_reference=True)
    assert [r.uid for r in records] == uids
    assert [r.target_words for r in records] == [800, 900, 700]
    assert records[1].prompt_text.endswith("approximately 900 words long.")
    assert records[2].story.startswith("On Monday the bronze runner") and records[2].reasoning.startswith("Slow")


def test_release_schema_jsonl_loads(tmp_path):
    path = write_jsonl(
        tmp_path / "release.jsonl",
        [
            release_row("a"),
            {"uid": 7, "prompt": "Write about rain, approximately 1,200 words long.", "target_word_count": 1200},
        ],
    )
    records = load_prompts(path, require_reference=False)
    assert records == [
        PromptRecord("a", ({"role": "user", "content": PROMPT_800},), 800, "Once upon a time.", "Plan the fox."),
        PromptRecord(
            "7", ({"role": "user", "content": "Write about rain, approximately 1,200 words long."},), 1200, None, None
        ),
    ]


def test_release_schema_parquet_with_target_only_in_the_field(tmp_path):
    path = tmp_path / "release.parquet"
    pq.write_table(pa.Table.from_pylist([{"uid": "x", "prompt": "Write a long story.", "target_word_count": 5000}]), path)
    [record] = load_prompts(path, require_reference=False)
    assert (record.uid, record.target_words, record.prompt_text) == ("x", 5000, "Write a long story.")


def test_blank_lines_in_jsonl_are_not_rows(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(release_row("a")) + "\n\n" + json.dumps(release_row("b")) + "\n", encoding="utf-8")
    assert [r.uid for r in load_prompts(path, require_reference=True)] == ["a", "b"]


# ---------------------------------------------------------------- bad input: one DataError naming file/row/field

# (case id, row 1 of a two-row jsonl file (row 0 is good), require_reference, fragments of the message).
# Bad target values sit in prompts without a length sentence, so only the type/sign check can catch them.
BAD_ROWS = [
    ("missing prompt", {"uid": "b", "target_word_count": 800}, False, ["row 1", "'prompt'", "missing"]),
    ("prompt is a number", release_row("b", prompt=5), False, ["row 1", "'prompt'", "int"]),
    ("prompt is an empty list", release_row("b", prompt=[]), False, ["row 1", "'prompt'"]),
    ("message without role", release_row("b", prompt=[{"content": PROMPT_800}]), False, ["row 1", "prompt[0].role"]),
    ("message without content", release_row("b", prompt=[{"role": "user"}]), False, ["row 1", "prompt[0].content"]),
    (
        "last message not from the user",
        release_row("b", prompt=[{"role": "user", "content": PROMPT_800}, {"role": "assistant", "content": "ok"}]),
        False,
        ["row 1", "'prompt'", "user"],
    ),
    (
        "target in neither field nor text",
        {"uid": "b", "prompt": "Write a story about a fox."},
        False,
        ["row 1", "'target_word_count'", "absent"],
    ),
    ("target 12.5", release_row("b", prompt="Write a story.", target_word_count=12.5), False, ["row 1", "'target_word_count'", "12.5"]),
    ("target a string", release_row("b", prompt="Write a story.", target_word_count="800"), False, ["row 1", "'target_word_count'", "'800'"]),
    ("target a bool", release_row("b", prompt="Write a story.", target_word_count=True), False, ["row 1", "'target_word_count'", "True"]),
    ("target zero", release_row("b", prompt="Write a story.", target_word_count=0), False, ["row 1", "'target_word_count'", "positive"]),
    ("target negative", release_row("b", prompt="Write a story.", target_word_count=-800), False, ["row 1", "'target_word_count'"]),
    (
        "target disagrees with the text",
        release_row("b", target_word_count=900),
        False,
        ["row 1", "'target_word_count'", "900", "800"],
    ),
    ("uid a bool", release_row(True), False, ["row 1", "'uid'"]),
    ("duplicate uid", release_row("a"), False, ["row 1", "row 0", "'uid'", "duplicate"]),
    ("story missing", {k: v for k, v in release_row("b").items() if k != "story"}, True, ["row 1", "'story'"]),
    ("story empty", release_row("b", story="  "), True, ["row 1", "'story'", "empty"]),
    ("story not a string", release_row("b", story=3), False, ["row 1", "'story'"]),
    (
        "reasoning missing",
        release_row("b", ground_truth_reasoning=None),
        True,
        ["row 1", "'ground_truth_reasoning'", "missing"],
    ),
    ("row not an object", [1, 2], False, ["row 1", "object"]),
]


@pytest.mark.parametrize("bad_row,require_reference,fragments", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_row_is_named_by_file_row_and_field(tmp_path, bad_row, require_reference, fragments):
    path = write_jsonl(tmp_path / "bad_rows.jsonl", [release_row("a"), bad_row])
    with pytest.raises(DataError) as caught:
        load_prompts(path, require_reference=require_reference)
    message = str(caught.value)
    for fragment in ["bad_rows.jsonl", "0-based", *fragments]:
        assert fragment in message


def test_all_bad_rows_are_reported_in_one_error(tmp_path):
    path = write_jsonl(
        tmp_path / "many.jsonl",
        [release_row("a", story=""), release_row("b"), release_row("a", target_word_count="x")],
    )
    with pytest.raises(DataError) as caught:
        load_prompts(path, require_reference=True)
    message = str(caught.value)
    assert "2 bad row(s) of 3" in message
    assert "row 0 (0-based; line 1): field 'story'" in message
    assert "row 2 (0-based; line 3): field 'target_word_count'" in message
    # a row with other problems is still checked for a duplicate uid
    assert "row 2 (0-based; line 3): field 'uid': duplicate uid 'a', first seen in row 0" in message


def test_reference_may_be_absent_when_not_required(tmp_path):
    path = write_jsonl(tmp_path / "norefs.jsonl", [release_row("a", story=None, ground_truth_reasoning="")])
    [record] = load_prompts(path, require_reference=False)
    assert record.story is None and record.reasoning is None


def _empty_parquet(path):
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)


def _truncated_parquet(path):
    full = path.with_suffix(".full")
    pq.write_table(pa.Table.from_pylist([release_row(str(i)) for i in range(20)]), full)
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])


def _bad_target_parquet(path):
    pq.write_table(
        pa.Table.from_pylist([release_row("a"), release_row("b", target_word_count=12.5)]),  # column becomes double
        path,
    )


# (case id, file name, how to write it (None: do not create), fragments of the message)
BAD_FILES = [
    ("missing file", "absent.parquet", None, ["absent.parquet", "not found"]),
    ("unknown suffix", "prompts.csv", lambda p: p.write_text("prompt\n"), ["prompts.csv", "'.csv'"]),
    ("not parquet", "text.parquet", lambda p: p.write_text("hello"), ["text.parquet", "parquet"]),
    ("truncated parquet", "cut.parquet", _truncated_parquet, ["cut.parquet", "parquet"]),
    ("empty parquet", "empty.parquet", _empty_parquet, ["empty.parquet", "no rows"]),
    ("empty jsonl", "empty.jsonl", lambda p: p.write_text("\n"), ["empty.jsonl", "no rows"]),
    (
        "non-UTF-8 line",
        "latin.jsonl",
        lambda p: p.write_bytes(json.dumps(release_row("a")).encode() + b'\n{"prompt": "caf\xe9"}\n'),
        ["latin.jsonl", "line 2", "UTF-8"],
    ),
    (
        "invalid JSON line",
        "broken.jsonl",
        lambda p: p.write_text(json.dumps(release_row("a")) + '\n{"prompt": \n'),
        ["broken.jsonl", "line 2", "JSON"],
    ),
    (
        "float target column in parquet",
        "floats.parquet",
        _bad_target_parquet,
        ["floats.parquet", "row 0 (0-based)", "row 1 (0-based)", "'target_word_count'"],
    ),
]


@pytest.mark.parametrize("name,write,fragments", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_named(tmp_path, name, write, fragments):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(DataError) as caught:
        load_prompts(path, require_reference=False)
    for fragment in fragments:
        assert fragment in str(caught.value)


# ---------------------------------------------------------------- filtering


def make_records(n):
    return [
        PromptRecord(f"u{i}", ({"role": "user", "content": "w " * (i + 1)},), 800, None, None) for i in range(n)
    ]


def word_count(record):
    return len(record.prompt_text.split())


def test_filter_long_prompts_drops_and_counts():
    records = make_records(5)  # 1..5 words
    kept, dropped = filter_long_prompts(records, word_count, max_tokens=3)
    assert [r.uid for r in kept] == ["u0", "u1", "u2"]  # 3 words is at the limit: kept
    assert dropped == 2


def test_filter_long_prompts_keeps_everything_under_the_limit():
    records = make_records(4)
    assert filter_long_prompts(records, word_count, max_tokens=100) == (records, 0)


def test_filter_long_prompts_refuses_to_drop_everything():
    with pytest.raises(DataError, match="all 3 prompts are longer than .* 2 tokens"):
        filter_long_prompts(make_records(5)[2:], word_count, max_tokens=2)


# ---------------------------------------------------------------- sampling


def uids(batch):
    return [r.uid for r in batch]


def stream(sampler, batches):
    return [uid for _ in range(batches) for uid in uids(sampler.next_batch())]


def test_sampler_is_deterministic_per_seed():
    records = make_records(20)
    a = stream(PromptSampler(records, batch_size=4, seed=1), 10)
    b = stream(PromptSampler(records, batch_size=4, seed=1), 10)
    c = stream(PromptSampler(records, batch_size=4, seed=2), 10)
    assert a == b
    assert a != c
    assert a[:20] != [r.uid for r in records]  # shuffled, not file order


def test_each_epoch_is_a_fresh_permutation_and_batches_cross_epochs():
    records = make_records(10)
    sampler = PromptSampler(records, batch_size=3, seed=0)
    seen = stream(sampler, 7)  # 21 prompts: epoch 0, epoch 1, and one of epoch 2
    all_uids = sorted(r.uid for r in records)
    assert sorted(seen[:10]) == all_uids and sorted(seen[10:20]) == all_uids
    assert seen[:10] != seen[10:20]  # reshuffled per epoch
    assert sampler.state_dict() == {"epoch": 2, "cursor": 1}
    # the 4th batch straddles the boundary: the last prompt of epoch 0, the first two of epoch 1
    fresh = PromptSampler(records, batch_size=3, seed=0)
    stream(fresh, 3)
    assert fresh.state_dict() == {"epoch": 0, "cursor": 9}
    assert uids(fresh.next_batch()) == seen[9:12]
    assert fresh.state_dict() == {"epoch": 1, "cursor": 2}


def test_a_step_never_holds_a_prompt_twice_and_each_epoch_visits_every_prompt_once():
    # 10 prompts in steps of 4: batches 3, 5, 8, ... straddle an epoch boundary
    for n, batch_size in [(10, 4), (10, 3), (7, 7), (9, 8)]:
        sampler = PromptSampler(make_records(n), batch_size=batch_size, seed=3)
        batches = [uids(sampler.next_batch()) for _ in range(40)]
        assert all(len(set(b)) == batch_size for b in batches), (n, batch_size)
        flat = [uid for b in batches for uid in b]
        epochs = [flat[i:i + n] for i in range(0, len(flat) - n + 1, n)]
        assert all(sorted(e) == sorted(r.uid for r in make_records(n)) for e in epochs), (n, batch_size)


def test_the_prompts_a_straddling_step_carries_over_come_last_in_the_next_epoch():
    sampler = PromptSampler(make_records(10), batch_size=4, seed=0)
    stream(sampler, 2)
    straddling = uids(sampler.next_batch())  # the last 2 of epoch 0, the first 2 of epoch 1
    epoch_1 = straddling[2:] + stream(sampler, 2)  # the rest of epoch 1: 2 + 8 prompts
    assert sorted(epoch_1[-2:]) == sorted(straddling[:2])


def test_fewer_prompts_than_a_step_needs_are_refused():
    with pytest.raises(DataError, match="3 prompt.*data.prompts_per_step=5"):
        PromptSampler(make_records(3), batch_size=5, seed=0)


@pytest.mark.parametrize("taken", [0, 3, 4, 10])  # 4 x 3 = 12 crosses the first epoch boundary of 10
def test_resumed_sampler_yields_the_same_batches(taken):
    records = make_records(10)
    original = PromptSampler(records, batch_size=3, seed=5)
    stream(original, taken)
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint would store it
    assert set(state) == {"epoch", "cursor"}

    resumed = PromptSampler(records, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert stream(resumed, 8) == stream(original, 8)


def test_resume_neither_repeats_nor_skips_a_prompt():
    records = make_records(10)
    original = PromptSampler(records, batch_size=4, seed=9)
    before = stream(original, 2)  # 8 prompts of epoch 0
    resumed = PromptSampler(records, batch_size=4, seed=9)
    resumed.load_state_dict(original.state_dict())
    after = uids(resumed.next_batch())  # 2 more of epoch 0, then 2 of epoch 1
    assert sorted(before + after[:2]) == sorted(r.uid for r in records)


@pytest.mark.parametrize(
    "state", [{"epoch": 0, "cursor": 11}, {"epoch": -1, "cursor": 0}, {"epoch": 0}, {"epoch": 1.0, "cursor": 0}]
)
def test_sampler_rejects_a_state_that_does_not_fit(state):
    sampler = PromptSampler(make_records(10), batch_size=3, seed=0)
    with pytest.raises(DataError, match="sampler state"):
        sampler.load_state_dict(state)
