"""A dead judge is noticed: K stories in a row refused with a status that is not retried (a
revoked key), or M steps in a row in which no story was judged (an overloaded or unreachable
service). Pure: scored samples in, the reason out."""
from reward.judge_client import JudgeSettings
from reward.judge_watch import JudgeWatch
from reward.rubric import DIMENSIONS, Judgment
from reward.worker import ScoredSample

GEMINI = JudgeSettings(backend="gemini", model="gemini-3-flash-preview")
JUDGMENT = Judgment({k: 1 for k in DIMENSIONS}, {k: "q" for k in DIMENSIONS})


def judged():
    return ScoredSample("u/0", None, JUDGMENT, None, 1, 100, 20)


def cached():
    return ScoredSample("u/0", None, JUDGMENT, None, 0, 0, 0, cached=True)


def refused(status=401):
    return ScoredSample("u/0", None, None, f"JudgeHTTPError: HTTP {status}: API key not valid", 1, 0, 0,
                        rejected_status=status)


def overloaded():
    return ScoredSample("u/0", None, None, "HTTP 503: overloaded", 6, 0, 0)


def test_k_refusals_in_a_row_name_the_judge_the_status_and_the_key():
    watch = JudgeWatch(GEMINI, max_rejections=3, max_dry_steps=0)
    for sample in (refused(), refused(), judged(), refused(), refused()):
        watch.story(sample)
    assert watch.reason is None  # a judged story between them: not three in a row
    watch.story(refused())
    assert watch.reason.startswith("the judge (gemini gemini-3-flash-preview) refused 3 stories in a row with "
                                   "HTTP 401 (API key not valid)")
    assert watch.reason.endswith("check the key in $GEMINI_API_KEY")


def test_cache_hits_and_transient_failures_neither_count_nor_break_a_run_of_refusals():
    watch = JudgeWatch(GEMINI, max_rejections=3, max_dry_steps=0)
    for sample in (refused(404), cached(), overloaded(), refused(404)):
        watch.story(sample)
    assert watch.reason is None
    watch.story(refused(404))
    assert "refused 3 stories in a row with HTTP 404" in watch.reason
    assert watch.reason.endswith("check judge.model and judge.base_url")


def test_m_steps_in_a_row_without_a_judged_story():
    watch = JudgeWatch(JudgeSettings(backend="openai", model="gpt-5.4", base_url="http://judge:8000/v1"),
                       max_rejections=8, max_dry_steps=3)
    watch.story(overloaded())
    watch.step(stories=48, failed=48)
    watch.step(stories=48, failed=48)
    watch.step(stories=48, failed=47)  # one story judged: the service is alive
    watch.step(stories=48, failed=48)
    watch.step(stories=0, failed=0)  # nothing was asked of the judge: says nothing
    watch.step(stories=48, failed=48)
    assert watch.reason is None
    watch.step(stories=48, failed=48)
    assert watch.reason.startswith("the judge (openai gpt-5.4 at http://judge:8000/v1) judged no story in 3 steps "
                                   "in a row (last error: HTTP 503: overloaded)")


def test_zero_turns_each_check_off():
    watch = JudgeWatch(GEMINI, max_rejections=0, max_dry_steps=0)
    for _ in range(100):
        watch.story(refused())
        watch.step(stories=48, failed=48)
    assert watch.reason is None
