"""Judge cache (persistent, keyed by everything that decides a judgment) and spend metering."""
import pytest

from conf.errors import DataError
from reward.cache import JudgeCache, cache_key
from reward.rubric import DIMENSIONS, Judgment
from reward.spend import Prices, budget_stop_reason, dollars

PARAMS = {"backend": "gemini", "model": "gemini-3-flash-preview", "rubric": "v1", "temperature": 0.2}


def judgment(score=3):
    return Judgment({k: min(score, mx) for k, (mx, _) in DIMENSIONS.items()}, {k: "q" for k in DIMENSIONS})


def test_key_changes_with_every_input():
    base = cache_key(PARAMS, "prompt", "story")
    assert base == cache_key(dict(reversed(list(PARAMS.items()))), "prompt", "story")  # order-free
    assert base != cache_key({**PARAMS, "model": "other"}, "prompt", "story")
    assert base != cache_key({**PARAMS, "rubric": "v2"}, "prompt", "story")
    assert base != cache_key({**PARAMS, "temperature": 0.3}, "prompt", "story")
    assert base != cache_key(PARAMS, "prompt!", "story")
    assert base != cache_key(PARAMS, "prompt", "story!")


def test_cache_persists_across_opens(tmp_path):
    path = tmp_path / "sub" / "judge_cache.sqlite"
    cache = JudgeCache(path)
    key = cache_key(PARAMS, "p", "s")
    assert cache.get(key) is None
    cache.put(key, judgment(3), 100, 20)
    cache.close()
    again = JudgeCache(path)
    assert again.get(key) == judgment(3) and len(again) == 1
    again.put(key, judgment(5))  # the same key: replaced, not duplicated
    assert again.get(key) == judgment(5) and len(again) == 1


def test_a_file_that_is_not_a_cache_is_named(tmp_path):
    bad = tmp_path / "judge_cache.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="judge_cache.sqlite"):
        JudgeCache(bad)


def test_dollars_flex_is_half_and_thoughts_bill_as_output():
    prices = Prices(input_per_mtok=0.50, output_per_mtok=3.00, flex_factor=0.5)
    assert dollars(1_000_000, 0, prices, flex=False) == pytest.approx(0.50)
    assert dollars(0, 1_000_000, prices, flex=False) == pytest.approx(3.00)
    assert dollars(2_000_000, 1_000_000, prices, flex=True) == pytest.approx((1.00 + 3.00) / 2)


def test_budget_stops_before_a_step_would_pass_it():
    assert budget_stop_reason(5.0, 1.0, 0.0) is None  # no cap
    assert budget_stop_reason(5.0, 1.0, 6.5) is None
    reason = budget_stop_reason(5.0, 1.0, 5.5)
    assert "judge.budget_usd" in reason and "$5.0000" in reason



def test_one_cache_is_safe_across_threads(tmp_path):
    """Threads that read and write one cache while another copies it into checkpoints: every put
    is found, nothing raises, and every copy opens as a cache. The interpreter switches threads
    every microsecond here, so unguarded calls on the shared connection interleave."""
    import sys
    import threading

    cache = JudgeCache(tmp_path / "judge_cache.sqlite")
    keys = {t: [cache_key(PARAMS, f"p{t}", f"story {i}") for i in range(150)] for t in range(3)}
    errors, copies = [], []

    def judge_thread(t):
        try:
            for i, key in enumerate(keys[t]):
                cache.put(key, judgment(i % 5), 100 + i, 20)
                assert cache.get(key) == judgment(i % 5)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    def checkpoint_thread():
        try:
            for n in range(20):
                copies.append(tmp_path / f"checkpoint_{n}.sqlite")
                cache.backup(copies[-1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=judge_thread, args=(t,)) for t in keys]
    threads.append(threading.Thread(target=checkpoint_thread))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(cache) == 3 * 150
    assert all(cache.get(k) == judgment(i % 5) for ks in keys.values() for i, k in enumerate(ks))
    for path in copies:
        with JudgeCache(path) as copy:
            assert len(copy) <= 3 * 150
    cache.close()
