"""A persistent judge cache: a resumed or repeated run never pays twice for the same judgment.

Keyed by everything that decides a judgment (judge backend, model, rubric version, sampling and
thinking settings) plus the prompt and story texts the judge sees. It stores the judgment (the
rubric scores), not the reward: reward weights may change between runs, the judgment does not.
SQLite in WAL mode: safe across processes, and every put is committed as it arrives. One
connection serves the threads of a process (the reward pool's loop reads and writes), one at a
time under a lock: Python's sqlite3 keeps per-connection transaction state that interleaved
calls corrupt. A backup (the driver, into a checkpoint) reads through a connection of its own.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

from conf.errors import DataError
from reward.rubric import Judgment


def cache_key(params: dict, prompt_text: str, story: str) -> str:
    blob = json.dumps({"params": params, "prompt": prompt_text, "story": story}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, scores TEXT NOT NULL, "
                             "evidence TEXT NOT NULL, input_tokens INTEGER, output_tokens INTEGER, created REAL)")
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise DataError(f"judge cache {self.path} is not a usable SQLite file ({e}); move it away or set "
                            "judge.cache=false") from None

    def get(self, key: str) -> Judgment | None:
        with self._lock:
            row = self._db.execute("SELECT scores, evidence FROM judgments WHERE key = ?", (key,)).fetchone()
        return Judgment(json.loads(row[0]), json.loads(row[1])) if row else None

    def put(self, key: str, judgment: Judgment, input_tokens: int = 0, output_tokens: int = 0) -> None:
        row = (key, json.dumps(judgment.scores), json.dumps(judgment.evidence), input_tokens, output_tokens, time.time())
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?)", row)
            self._db.commit()

    def backup(self, destination: str | Path) -> None:
        """A consistent copy of what is committed (SQLite's online backup), e.g. into a checkpoint."""
        with closing(sqlite3.connect(self.path, timeout=30.0)) as source, closing(sqlite3.connect(destination)) as out:
            source.backup(out)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
