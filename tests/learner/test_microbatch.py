"""Token-budget micro-batching: hand-checked packings, the same answer on every rank."""
import random

import pytest

from learner.microbatch import pack_micro_batches


def all_ranks(lengths, world_size, max_tokens, max_rows=1):
    return [pack_micro_batches(lengths, r, world_size, max_tokens, max_rows) for r in range(world_size)]


def padded_size(micro, lengths):
    return len(micro) * max((lengths[i] for i in micro), default=0)


def test_rows_are_packed_longest_first_within_the_padded_budget():
    lengths = [10, 9, 7, 5, 4, 3, 2, 1]
    # [10, 9]: 2 x 10 = 20; 7 would make 3 x 10. [7, 5]: 14; 4 would make 21. [4, 3, 2, 1]: 16.
    assert pack_micro_batches(lengths, 0, 1, max_tokens=20, max_rows=1) == [[0, 1], [2, 3], [4, 5, 6, 7]]


def test_a_row_over_the_budget_goes_alone():
    assert pack_micro_batches([4, 30, 4], 0, 1, max_tokens=20, max_rows=1) == [[1], [0, 2]]
    assert pack_micro_batches([25, 30, 3], 0, 1, max_tokens=20, max_rows=1) == [[1], [0], [2]]


def test_rows_are_dealt_so_two_ranks_get_equal_tokens():
    lengths = [8, 7, 6, 5, 4, 3, 2, 1]  # 36 tokens; round robin would give 20 and 16
    rank0, rank1 = all_ranks(lengths, 2, max_tokens=16)
    # longest first, each to the rank with fewer tokens so far (rank 0 on ties):
    # 8->0, 7->1, 6->1, 5->0, 4->0 (13 each), 3->1, 2->1, 1->0
    assert rank0 == [[0, 3], [4, 7]]  # 8+5+4+1 = 18 tokens; padded 16 and 8
    assert rank1 == [[1, 2], [5, 6]]  # 7+6+3+2 = 18 tokens; padded 14 and 6


def test_a_rank_with_fewer_micro_batches_gets_empty_ones():
    lengths = [6, 6, 6, 6, 1]
    rank0, rank1 = all_ranks(lengths, 2, max_tokens=12)
    assert rank0 == [[0, 2], [4]]
    assert rank1 == [[1, 3], []]


def test_more_ranks_than_rows_still_run_one_micro_batch_each():
    assert all_ranks([5], 3, max_tokens=100) == [[[0]], [[]], [[]]]
    assert all_ranks([], 2, max_tokens=100) == [[[]], [[]]]


@pytest.mark.parametrize("world_size, max_tokens", [(1, 64), (2, 64), (3, 100), (2, 20)])
def test_every_row_runs_exactly_once_within_the_budget(world_size, max_tokens):
    lengths = [random.Random(world_size * max_tokens + i).randint(1, 40) for i in range(23)]
    per_rank = all_ranks(lengths, world_size, max_tokens)
    assert len({len(micro) for micro in per_rank}) == 1  # every rank: the same micro-batch count
    rows = [i for micro in per_rank for batch in micro for i in batch]
    assert sorted(rows) == list(range(len(lengths)))
    for batches in per_rank:
        for batch in batches:
            assert padded_size(batch, lengths) <= max_tokens or len(batch) == 1


def test_without_a_token_budget_rows_are_dealt_round_robin_in_fixed_counts():
    lengths = [6, 5, 4, 3, 2]
    rank0, rank1 = all_ranks(lengths, 2, max_tokens=0, max_rows=2)
    assert rank0 == [[0, 2], [4]]
    assert rank1 == [[1, 3], []]
