"""Evaluation by requested length against hand-computed values."""
import math

import pytest

from eval.metrics import (
    EvalRecord,
    bucket_edges,
    bucket_label,
    bucket_of,
    least_squares_slope,
    length_score,
    summarize,
)

EDGES = bucket_edges()


@pytest.mark.parametrize(("target", "bucket"), [
    (999, None), (1000, 0), (1999, 0), (2000, 1), (3999, 1), (4000, 2), (6000, 3), (8000, 4), (9999, 4),
    (10000, 5), (12000, 5), (12001, None),
])
def test_buckets_are_half_open_and_the_last_is_closed(target, bucket):
    assert bucket_of(target, EDGES) == bucket


def test_scaled_edges_and_labels():
    tiny = bucket_edges(0.035)
    assert tiny == pytest.approx((35, 70, 140, 210, 280, 350, 420))
    assert bucket_of(69.9, tiny) == 0 and bucket_of(70, tiny) == 1 and bucket_of(420, tiny) == 5
    assert bucket_label(0, EDGES) == "[1000,2000)" and bucket_label(5, EDGES) == "[10000,12000]"


def test_length_score_symmetric_tolerance():
    # T=3000: tolerance max(50, 300) = 300 both ways -> band [2700, 3300]
    assert length_score(2700, 3000) == 100 and length_score(3300, 3000) == 100
    assert length_score(2400, 3000) == pytest.approx(100 * 2400 / 2700)  # lp = 1 - 2400/2700
    assert length_score(3630, 3000) == pytest.approx(90)  # lp = 3630/3300 - 1 = 0.1
    assert length_score(9000, 3000) == 0  # lp capped at 1
    # T=200: the floor of 50 words wins over 10% -> band [150, 250]
    assert length_score(100, 200) == pytest.approx(100 * 100 / 150)
    # scaled floor: 50 x 0.5 = 25 -> band [175, 225]
    assert length_score(140, 200, scale=0.5) == pytest.approx(80)


def rec(uid, target, words, quality):
    return EvalRecord(uid, target, words, quality, length_score(words, target))


RECORDS = [
    rec("A", 1500, 1500, 60.0), rec("B", 1000, 500, 40.0),  # bucket 1
    rec("C", 2000, 2000, 70.0), rec("D", 3999, 3999, None),  # bucket 2: D's judgment failed
    # bucket 3 empty
    rec("E", 6000, 3000, 30.0),  # bucket 4
    rec("F", 8000, 4000, 20.0),  # bucket 5
    rec("G", 12000, 6000, 10.0), rec("H", 10000, 5000, 20.0),  # bucket 6 (12000 is in it)
    rec("I", 500, 500, 99.0),  # outside every bucket
]


def test_summary_by_bucket_with_an_empty_bucket_and_judge_failures():
    s = summarize(RECORDS, EDGES)
    b = s.buckets
    assert [x.count for x in b] == [2, 2, 0, 1, 1, 2] and [x.failed for x in b] == [0, 1, 0, 0, 0, 0]
    assert b[0].quality == 50 and b[0].length_ratio == 0.75
    assert b[0].length_score == pytest.approx((100 + 100 * (500 / 900)) / 2)  # B: band [900, 1100]
    assert b[1].quality == 70  # the failed story is in no mean
    assert b[1].length_ratio == 1.0  # its length needs no judge
    assert math.isnan(b[2].quality) and math.isnan(b[2].length_ratio) and b[2].count == 0
    assert b[5].quality == 15 and b[5].length_ratio == 0.5
    assert s.outside == 1 and s.count == 8 and s.failed == 1


def test_ranges_and_aggregate_are_means_over_prompts():
    s = summarize(RECORDS, EDGES)
    assert s.ranges["id"] == pytest.approx((60 + 40 + 70) / 3)  # not the mean of bucket means (60)
    assert s.ranges["near_ood"] == 30  # bucket 3 is empty
    assert s.ranges["far_ood"] == pytest.approx((20 + 10 + 20) / 3)
    assert s.aggregate == pytest.approx((60 + 40 + 70 + 30 + 20 + 10 + 20) / 7)  # "I" is outside
    assert s.range_length_ratio["id"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_slope_is_fitted_over_the_buckets_that_have_a_mean():
    s = summarize(RECORDS, EDGES)
    assert s.slope_buckets == [0, 1, 3, 4, 5]
    # x = 0,1,3,4,5; y = 50,70,30,20,15: sum dx*dy = -166, sum dx^2 = 17.2
    assert s.slope == pytest.approx(-166 / 17.2)
    assert least_squares_slope([0, 1, 2], [10, 20, 30]) == pytest.approx(10)
    assert math.isnan(least_squares_slope([2], [50]))


def test_flat_metrics_name_every_bucket():
    flat = summarize(RECORDS, EDGES).flat("val/")
    assert flat["val/quality/id"] == pytest.approx(170 / 3) and flat["val/bucket6/count"] == 2
    assert flat["val/failed"] == 1
