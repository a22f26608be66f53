"""Training prompts: load and validate a dataset file, drop over-long prompts, sample batches.

Two row shapes are read, from .parquet or .jsonl (the suffix decides):
  (a) the POLARIS prompt release: `uid` (str or int), `prompt` (a string), `target_word_count`;
  (b) the original training files: `prompt` is a list of chat messages `{role, content}`, with
      no uid (we derive one from the prompt) and no target (parsed from the prompt text:
      "... approximately 1,200 words long.").
Both may carry `story` and `ground_truth_reasoning` (the human reference used by HRI).

Every row is checked before anything is returned; all problems found go into one DataError
that names the file, the row (0-based) and the field.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from conf.errors import DataError
from reward.components import parse_target_words

_MAX_LISTED = 20  # problems spelled out in one DataError; the rest are counted


@dataclass(frozen=True)
class PromptRecord:
    uid: str
    messages: tuple[dict, ...]  # chat messages {"role", "content"}
    target_words: int
    story: str | None
    reasoning: str | None

    @property
    def prompt_text(self) -> str:
        """The content of the last user message (the story request)."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        raise DataError(f"prompt {self.uid} has no user message")  # load_prompts rules this out


# ---------------------------------------------------------------- loading


def load_prompts(path: str | Path, *, require_reference: bool) -> list[PromptRecord]:
    """Read every row of a .parquet or .jsonl prompt file; raise one DataError if any is bad."""
    path = Path(path)
    rows, where = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: the file has no rows")

    problems: list[str] = []
    records: list[PromptRecord] = []
    first_row_of_uid: dict[str, int] = {}
    occurrences: dict[str, int] = {}  # derived-uid base -> copies seen so far
    bad_rows = 0
    for i, row in enumerate(rows):
        record, row_problems = _parse_row(row, require_reference)
        if record is not None and record.uid == "":  # derive: a prompt hash, numbered when repeated
            base = _derived_uid(record.messages)
            copy = occurrences.get(base, 0)
            occurrences[base] = copy + 1
            record = _replace_uid(record, base if copy == 0 else f"{base}-{copy}")
        uid = record.uid if record is not None else _given_uid(row)
        if uid in first_row_of_uid:
            row_problems.append(f"field 'uid': duplicate uid {uid!r}, first seen in {where(first_row_of_uid[uid])}")
        elif uid:
            first_row_of_uid[uid] = i
        if row_problems:
            bad_rows += 1
            problems += [f"{where(i)}: {p}" for p in row_problems]
        else:
            records.append(record)

    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(
            f"{path}: {bad_rows} bad row(s) of {len(rows)} (rows counted from 0):\n  {listed}{more}"
        )
    return records


def _given_uid(row: Any) -> str | None:
    """The row's own uid as a string, if it has a usable one (for duplicate checks on bad rows)."""
    uid = row.get("uid") if isinstance(row, dict) else None
    if isinstance(uid, bool) or not isinstance(uid, (str, int)) or str(uid).strip() == "":
        return None
    return str(uid)


def _read_rows(path: Path) -> tuple[list[Any], Callable[[int], str]]:
    """Rows as Python objects, and a function naming row i for error messages."""
    if path.suffix not in (".parquet", ".jsonl"):
        raise DataError(f"{path}: unsupported dataset suffix {path.suffix!r} (use .parquet or .jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")

    if path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: cannot read as parquet (truncated or not parquet?): {e}") from e
        return rows, lambda i: f"row {i} (0-based)"

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    rows, lines = [], []
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: line {line_no} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {line_no} is not valid JSON: {e.msg} (column {e.colno})") from e
        lines.append(line_no)
    return rows, lambda i: f"row {i} (0-based; line {lines[i]})"


def _parse_row(row: Any, require_reference: bool) -> tuple[PromptRecord | None, list[str]]:
    """One row -> a record (uid "" when it must be derived) and the list of its problems."""
    if not isinstance(row, dict):
        return None, [f"a row must be an object, got {type(row).__name__}"]
    problems: list[str] = []

    uid = row.get("uid")
    if uid is None:
        uid = ""
    elif isinstance(uid, bool) or not isinstance(uid, (str, int)):
        problems.append(f"field 'uid': must be a string or an integer, got {type(uid).__name__}")
    elif str(uid).strip() == "":
        problems.append("field 'uid': is empty")
    else:
        uid = str(uid)

    messages = _parse_messages(row.get("prompt"), problems)

    target = row.get("target_word_count")
    text_target = parse_target_words(messages[-1]["content"]) if messages else None
    if target is None:
        if messages and text_target is None:
            problems.append(
                "field 'target_word_count': absent, and the prompt text has no "
                "'approximately N words long' sentence"
            )
        target = text_target
        if target is not None and target <= 0:
            problems.append(f"field 'prompt': the prompt text asks for {target} words; must be positive")
    elif isinstance(target, bool) or not isinstance(target, int):
        problems.append(f"field 'target_word_count': must be an integer, got {target!r}")
    elif target <= 0:
        problems.append(f"field 'target_word_count': must be positive, got {target}")
    elif text_target is not None and text_target != target:
        problems.append(
            f"field 'target_word_count': {target} disagrees with the prompt text, "
            f"which asks for {text_target} words"
        )

    story = _parse_reference(row, "story", require_reference, problems)
    reasoning = _parse_reference(row, "ground_truth_reasoning", require_reference, problems)

    if problems:
        return None, problems
    return PromptRecord(uid=uid, messages=messages, target_words=target, story=story, reasoning=reasoning), []


def _parse_messages(prompt: Any, problems: list[str]) -> tuple[dict, ...]:
    """The prompt as chat messages; its last message must be a non-empty user message."""
    if prompt is None:
        problems.append("field 'prompt': missing")
        return ()
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        problems.append(
            f"field 'prompt': must be a string or a non-empty list of chat messages, got {_describe(prompt)}"
        )
        return ()
    messages = []
    for j, message in enumerate(prompt):
        if not isinstance(message, dict):
            problems.append(f"field 'prompt[{j}]': a chat message must be an object, got {_describe(message)}")
            return ()
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            problems.append(f"field 'prompt[{j}].role': must be a non-empty string, got {_describe(role)}")
            return ()
        if not isinstance(content, str):
            problems.append(f"field 'prompt[{j}].content': must be a string, got {_describe(content)}")
            return ()
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        problems.append("field 'prompt': the last message must be a non-empty user message")
        return ()
    return tuple(messages)


def _parse_reference(row: dict, field: str, required: bool, problems: list[str]) -> str | None:
    value = row.get(field)
    if value is not None and not isinstance(value, str):
        problems.append(f"field '{field}': must be a string, got {_describe(value)}")
        return None
    if value is None or not value.strip():
        if required:
            problems.append(f"field '{field}': {'missing' if value is None else 'empty'} (a human reference is required)")
        return None
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _derived_uid(messages: tuple[dict, ...]) -> str:
    """A stable id from the prompt's content, so it survives reordering the file."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return "p" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _replace_uid(record: PromptRecord, uid: str) -> PromptRecord:
    return PromptRecord(uid, record.messages, record.target_words, record.story, record.reasoning)


# ---------------------------------------------------------------- filtering


def filter_long_prompts(
    records: list[PromptRecord], count_tokens: Callable[[PromptRecord], int], max_tokens: int
) -> tuple[list[PromptRecord], int]:
    """Drop prompts longer than max_tokens; return the kept ones and how many were dropped."""
    kept = [r for r in records if count_tokens(r) <= max_tokens]
    dropped = len(records) - len(kept)
    if not kept:
        raise DataError(f"all {len(records)} prompts are longer than the prompt limit of {max_tokens} tokens")
    return kept, dropped


# ---------------------------------------------------------------- sampling


class PromptSampler:
    """Batches of distinct prompts in a seeded order, reshuffled every epoch; resumable from
    (epoch, cursor).

    Epoch e visits every record once. A batch that reaches the end of an epoch takes its last
    prompts and fills up with the next epoch's first ones; the prompts it carries over are moved
    to the end of the next epoch's order, so no batch holds a prompt twice and every prompt is
    still seen once per epoch. The order of epoch e depends only on (seed, e) and the sizes, so a
    sampler restored from state_dict() yields exactly the batches the original would have.
    """

    def __init__(self, records: list[PromptRecord], *, batch_size: int, seed: int):
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if len(records) < batch_size:
            raise DataError(f"{len(records)} prompt(s) cannot fill a step of data.prompts_per_step={batch_size} "
                            "distinct prompts; lower data.prompts_per_step or add prompts")
        self._records = list(records)
        self._batch_size = batch_size
        self._seed = seed
        self._epoch = 0
        self._cursor = 0  # position inside this epoch's order
        self._order = self._shuffled(0)

    @classmethod
    def from_config(cls, records: list[PromptRecord], cfg) -> PromptSampler:
        """A run's sampler: data.prompts_per_step prompts a step, in trainer.seed's order."""
        return cls(records, batch_size=cfg.data.prompts_per_step, seed=cfg.trainer.seed)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self._records)))
        random.Random(f"polaris-prompts:{self._seed}:{epoch}").shuffle(order)  # str seed: stable
        return order

    def _next_order(self, order: list[int], epoch: int) -> list[int]:
        """Epoch `epoch`'s order, given the previous epoch's: the previous epoch's last prompts that
        share a batch with this epoch's first ones go to the end."""
        carried = (epoch * len(self._records)) % self._batch_size
        tail = set(order[len(order) - carried:]) if carried else set()
        fresh = self._shuffled(epoch)
        return [i for i in fresh if i not in tail] + [i for i in fresh if i in tail]

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_batch(self) -> list[PromptRecord]:
        batch = []
        while len(batch) < self._batch_size:
            if self._cursor == len(self._order):
                self._epoch += 1
                self._cursor = 0
                self._order = self._next_order(self._order, self._epoch)
            batch.append(self._records[self._order[self._cursor]])
            self._cursor += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        epoch, cursor = state.get("epoch"), state.get("cursor")
        for name, value in (("epoch", epoch), ("cursor", cursor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DataError(f"sampler state: {name!r} must be a non-negative integer, got {value!r}")
        if cursor > len(self._records):
            raise DataError(
                f"sampler state: cursor {cursor} is beyond this dataset's {len(self._records)} prompts "
                "(was the dataset changed since the checkpoint?)"
            )
        order = self._shuffled(0)
        for e in range(1, epoch + 1):
            order = self._next_order(order, e)
        self._epoch, self._cursor, self._order = epoch, cursor, order
